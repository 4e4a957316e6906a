"""Write an executable: the runtime stub with the model stored inside it as a zip member.

Layout (measured with PyInstaller 6.22, see design.md): the bootloader finds its archive by
scanning the file backwards from the end on every start, so the model must sit BEFORE the
PyInstaller archive and only the zip's central directory after it:

    [stub image][model.gguf local header + padding][model data][.args][qpack.json]
    [PyInstaller archive ...][central directory][zip64 end + locator, if needed][end record]

On ELF the archive is the `pydata` section near the end, followed by the section header table;
inserting bytes before it and shifting `e_shoff` and the later sections' `sh_offset` keeps the
ELF valid. On PE the archive is overlay data after the image; inserting there needs no header
change (only the checksum). On Mach-O the members go after a fresh ad-hoc code signature and
before the archive, all inside __LINKEDIT (builder/macho.py says why there). Any other stub gets
the zip appended, with a warning: it works, but every start then reads the whole model.

Same inputs give the same bytes: fixed timestamps, fixed member order, sorted JSON.
"""

from __future__ import annotations

import errno
import hashlib
import json
import mmap
import os
import re
import shutil
import struct
import sys
import tempfile
import threading
import zipfile
import zlib
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

import click
from qpack.builder import macho
from qpack.builder.digests import DigestCache, Digests, file_key
from qpack.builder.fileio import write_at
from qpack.runtime.embedded import (
    ARGS_MEMBER,
    CENTRAL_HEADER,
    CENTRAL_HEADER_SIG,
    DATA_ALIGNMENT,
    END_RECORD,
    END_RECORD_SIG,
    EXTRA_HEADER,
    LOCAL_HEADER,
    LOCAL_HEADER_SIG,
    MANIFEST_MEMBER,
    MODEL_MEMBER,
    ZIP64_END_RECORD,
    ZIP64_END_RECORD_SIG,
    ZIP64_EXTRA_ID,
    ZIP64_LOCATOR,
    ZIP64_LOCATOR_SIG,
)
from qpack.runtime.errors import QpackError

# Extra-field id of the alignment padding ("qp"; unregistered ids are skipped by every reader).
PADDING_EXTRA_ID = 0x7071
# The stub tail moves by a multiple of this, so every shifted ELF offset keeps its alignment.
SHIFT_ALIGNMENT = 64
# 1980-01-01 00:00, the earliest DOS date: no build time leaks into the output.
DOS_TIME, DOS_DATE = 0, (0 << 9) | (1 << 5) | 1
ZIP32_LIMIT = 0xFFFFFFFF
UNIX_FILE_MODE = 0o100644 << 16
VERSION_MADE_BY_UNIX = 3 << 8


# ---------------------------------------------------------------------------------------------
# Where the members go inside the stub


@dataclass
class StubLayout:
    """Where the zip members are inserted into the stub, and how to fix its headers."""

    kind: str  # "elf", "pe", "macho" or "append"
    insert_at: int
    # Called with the number of bytes inserted; returns the header fields to rewrite, as
    # (offset in the stub, new bytes). Each lies wholly before or wholly after `insert_at`.
    edits: Callable[[int], list[tuple[int, bytes]]] = field(repr=False, default=lambda shift: [])
    warning: str | None = None
    checksum_at: int | None = None  # PE: where the image checksum lives (recomputed at the end)
    # Mach-O: zero bytes left after `insert_at` (for the new signature), the stub's byte range
    # that follows the members (default: from `insert_at` to its end), and what completes the
    # file (fd, size) once written, returning a warning or None.
    reserve: int = 0
    tail: tuple[int, int] | None = None
    finish: Callable[[int, int], str | None] | None = field(repr=False, default=None)


def plan_stub(stub: bytes | mmap.mmap, stub_name: str = "stub") -> StubLayout:
    """Find where the PyInstaller archive starts in an ELF or PE stub; fall back to appending."""
    if stub[:4] == b"\x7fELF":
        return _plan_elf(stub, stub_name)
    if stub[:2] == b"MZ":
        return _plan_pe(stub, stub_name)
    if stub[:4] in macho.MAGICS:
        return _plan_macho(stub, stub_name)
    return StubLayout(
        "append",
        len(stub),
        warning=(
            f"{stub_name} is neither ELF nor PE: the model is appended after the PyInstaller "
            "archive, which works but makes every start read the whole model"
        ),
    )


def _plan_elf(stub: bytes, stub_name: str) -> StubLayout:
    ei_class, ei_data = stub[4], stub[5]
    if ei_class not in (1, 2) or ei_data not in (1, 2):
        raise QpackError(f"{stub_name}: unknown ELF class {ei_class} / data encoding {ei_data}")
    is64 = ei_class == 2
    end = "<" if ei_data == 1 else ">"
    word = "Q" if is64 else "I"
    ehdr = struct.Struct(f"{end}16sHHI{word}{word}{word}IHHHHHH")
    (_, _, _, _, _, phoff, shoff, _, _, phentsize, phnum, shentsize, shnum, shstrndx) = (
        ehdr.unpack_from(stub, 0)
    )
    shoff_field = 0x28 if is64 else 0x20
    # Shdr: name, type, flags, addr, offset, size, link, info, addralign, entsize
    shdr = struct.Struct(f"{end}II{word}{word}{word}{word}II{word}{word}")
    sh_offset_field = 24 if is64 else 16
    if shoff == 0 or shnum == 0 or shentsize != shdr.size or shoff + shnum * shdr.size > len(stub):
        raise QpackError(f"{stub_name}: ELF section header table is missing or cut short")
    sections = [shdr.unpack_from(stub, shoff + i * shdr.size) for i in range(shnum)]
    if shstrndx >= shnum:
        raise QpackError(f"{stub_name}: ELF section name table index {shstrndx} is out of range")
    strtab_off, strtab_size = sections[shstrndx][4], sections[shstrndx][5]
    strtab = stub[strtab_off : strtab_off + strtab_size]

    def section_name(sh) -> bytes:
        start = sh[0]
        return strtab[start : strtab.find(b"\0", start)]

    pydata = [sh for sh in sections if section_name(sh) == b"pydata"]
    if not pydata:
        return StubLayout(
            "append",
            len(stub),
            warning=(
                f"{stub_name}: ELF without a `pydata` section (not a PyInstaller 6 one-file "
                "stub?): the model is appended, so every start reads the whole model"
            ),
        )
    insert_at = pydata[0][4]
    # Nothing that is loaded into memory may lie after the insertion point.
    phdr = struct.Struct(f"{end}IIQQQQQQ" if is64 else f"{end}IIIIIIII")
    for i in range(phnum):
        fields = phdr.unpack_from(stub, phoff + i * phentsize)
        p_offset, p_filesz = (fields[2], fields[5]) if is64 else (fields[1], fields[4])
        if p_filesz and p_offset + p_filesz > insert_at:
            raise QpackError(
                f"{stub_name}: an ELF segment (offset {p_offset}, {p_filesz} bytes) reaches past "
                f"the pydata section at byte {insert_at}; cannot insert the model there"
            )
    limit = 0xFFFFFFFFFFFFFFFF if is64 else 0xFFFFFFFF

    if shoff < insert_at < shoff + shnum * shdr.size:
        raise QpackError(f"{stub_name}: the ELF section header table straddles the pydata section")

    def edits(shift: int) -> list[tuple[int, bytes]]:
        if shoff + shift > limit:
            raise QpackError(f"{stub_name}: a 32-bit ELF cannot hold a model this large")
        offset = struct.Struct(f"{end}{word}")
        fields = [(shoff_field, offset.pack(shoff + shift))] if shoff >= insert_at else []
        for i, sh in enumerate(sections):
            if sh[4] >= insert_at and sh[1] != 8:  # SHT_NOBITS occupies no file bytes
                fields.append((shoff + i * shdr.size + sh_offset_field, offset.pack(sh[4] + shift)))
        return fields

    return StubLayout("elf", insert_at, edits)


def _plan_pe(stub: bytes, stub_name: str) -> StubLayout:
    (pe_at,) = struct.unpack_from("<I", stub, 0x3C)
    if pe_at + 24 > len(stub) or stub[pe_at : pe_at + 4] != b"PE\0\0":
        return StubLayout(
            "append",
            len(stub),
            warning=f"{stub_name}: MZ header without a PE image; the model is appended",
        )
    _, n_sections, _, symtab, _, opt_size, _ = struct.unpack_from("<HHIIIHH", stub, pe_at + 4)
    opt_at = pe_at + 24
    (magic,) = struct.unpack_from("<H", stub, opt_at)
    if magic not in (0x10B, 0x20B):
        raise QpackError(f"{stub_name}: unknown PE optional header magic {magic:#x}")
    dirs_at = opt_at + (96 if magic == 0x10B else 112)
    cert_at, cert_size = struct.unpack_from("<II", stub, dirs_at + 4 * 8)
    if cert_size:
        raise QpackError(
            f"{stub_name}: the stub is Authenticode-signed; inserting the model would break the "
            "signature. Build from an unsigned stub and sign the finished executable instead"
        )
    table_at = opt_at + opt_size
    end_of_image = 0
    for i in range(n_sections):
        size, pointer = struct.unpack_from("<II", stub, table_at + i * 40 + 16)
        end_of_image = max(end_of_image, pointer + size)
    if symtab and symtab >= end_of_image:
        raise QpackError(f"{stub_name}: PE with a COFF symbol table in its overlay")
    # Nothing in the headers points past the image: only the checksum changes.
    return StubLayout("pe", end_of_image, checksum_at=opt_at + 64)


def _plan_macho(stub: bytes, stub_name: str) -> StubLayout:
    plan = macho.plan_macho(stub, stub_name)
    return StubLayout(
        "macho",
        plan.pkg_start,
        reserve=plan.reserve,
        tail=(plan.pkg_start, plan.pkg_end),  # the old signature after the archive is dropped
        finish=plan.finish,
    )


def pe_checksum(f: BinaryIO, checksum_at: int) -> int:
    """The PE image checksum (as imagehlp's CheckSumMappedFile) of the whole file."""
    import numpy as np

    f.seek(0, os.SEEK_END)
    length = f.tell()
    f.seek(0)
    total = 0
    pos = 0
    while True:
        chunk = bytearray(f.read(COPY_CHUNK))  # COPY_CHUNK is even: words never straddle
        if not chunk:
            break
        if pos <= checksum_at < pos + len(chunk):
            chunk[checksum_at - pos : checksum_at - pos + 4] = b"\0\0\0\0"
        if len(chunk) % 2:
            chunk.append(0)
        total += int(np.frombuffer(chunk, dtype="<u2").sum(dtype=np.uint64))
        pos += len(chunk)
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return (total + length) & 0xFFFFFFFF


# ---------------------------------------------------------------------------------------------
# Where the model bytes come from


@dataclass
class ModelSource:
    """A GGUF to embed: a plain file, or one member of a zip (Deflate, Deflate64 or stored)."""

    path: Path
    size: int
    file_name: str  # the GGUF's own name (the zip member's, for a zip)
    member: str | None = None

    @contextmanager
    def open(self) -> Iterator[BinaryIO]:
        if self.member is None:
            with open(self.path, "rb") as f:
                yield f
        else:
            with zipfile.ZipFile(self.path) as zf, zf.open(self.member) as f:
                yield f

    def describe(self) -> str:
        return f"{self.path}:{self.member}" if self.member else str(self.path)


def open_model_source(path: Path) -> ModelSource:
    """A .gguf file, or a .zip holding exactly one .gguf."""
    try:
        with open(path, "rb") as f:
            magic = f.read(4)
            size = os.fstat(f.fileno()).st_size
    except OSError as e:
        raise QpackError(f"{path}: cannot read the model: {e.strerror}") from None
    if magic[:2] != b"PK":
        return ModelSource(path, size, path.name)
    import zipfile_deflate64  # noqa: F401  (teaches zipfile the Deflate64 method)

    try:
        with zipfile.ZipFile(path) as zf:
            ggufs = [i for i in zf.infolist() if i.filename.lower().endswith(".gguf")]
    except zipfile.BadZipFile as e:
        raise QpackError(f"{path}: not a valid zip file ({e})") from None
    if len(ggufs) != 1:
        found = ", ".join(i.filename for i in ggufs) or "none"
        raise QpackError(
            f"{path}: a zipped model must hold exactly one .gguf member (found: {found}); "
            "unzip it and pass the GGUF file"
        )
    info = ggufs[0]
    if info.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED, 9):
        raise QpackError(
            f"{path}: member {info.filename} uses zip method {info.compress_type}; qpack reads "
            "stored, Deflate and Deflate64 members: unzip it and pass the GGUF file"
        )
    return ModelSource(path, info.file_size, Path(info.filename).name, info.filename)


_QUANT_SUFFIX = re.compile(r"[.\-_](?:I?Q\d\w*|B?F(?:16|32)|GGUF)$", re.IGNORECASE)


def default_name(file_name: str) -> str:
    """`SmolLM2-135M-Instruct.Q4_1.gguf` -> `SmolLM2-135M-Instruct`."""
    stem = Path(file_name).stem
    while True:
        shorter = _QUANT_SUFFIX.sub("", stem)
        if shorter == stem or not shorter:
            return stem
        stem = shorter


# ---------------------------------------------------------------------------------------------
# Zip records


def _padding_field(base: int, zip64_len: int) -> bytes:
    """An extra field of zero padding after which data starting at `base` lands on
    DATA_ALIGNMENT (ValueError when its length would not fit the 16-bit extra length: the
    caller then moves the header a little)."""
    pad = (-(base + EXTRA_HEADER.size)) % DATA_ALIGNMENT
    if pad + EXTRA_HEADER.size + zip64_len > 0xFFFF:
        raise ValueError("no padding length fits")
    return EXTRA_HEADER.pack(PADDING_EXTRA_ID, pad) + bytes(pad)


def local_header(name: bytes, crc: int, size: int, extra: bytes, zip64: bool) -> bytes:
    stored = ZIP32_LIMIT if zip64 else size
    return (
        LOCAL_HEADER.pack(
            LOCAL_HEADER_SIG,
            45 if zip64 else 10,
            0,
            0,
            DOS_TIME,
            DOS_DATE,
            crc,
            stored,
            stored,
            len(name),
            len(extra),
        )
        + name
        + extra
    )


@dataclass
class ZipMember:
    name: bytes
    crc: int
    size: int
    header_offset: int


def central_directory(members: Sequence[ZipMember]) -> bytes:
    out = bytearray()
    for m in members:
        zip64_values = [v for v in (m.size, m.size, m.header_offset) if v >= ZIP32_LIMIT]
        extra = b""
        if zip64_values:
            data = b"".join(struct.pack("<Q", v) for v in zip64_values)
            extra = EXTRA_HEADER.pack(ZIP64_EXTRA_ID, len(data)) + data
        version = 45 if zip64_values else 10

        def clamp(v: int) -> int:
            return min(v, ZIP32_LIMIT)

        out += CENTRAL_HEADER.pack(
            CENTRAL_HEADER_SIG,
            VERSION_MADE_BY_UNIX | version,
            version,
            0,
            0,
            DOS_TIME,
            DOS_DATE,
            m.crc,
            clamp(m.size),
            clamp(m.size),
            len(m.name),
            len(extra),
            0,
            0,
            0,
            UNIX_FILE_MODE,
            clamp(m.header_offset),
        )
        out += m.name + extra
    return bytes(out)


def end_records(n_members: int, cd_offset: int, cd_size: int) -> bytes:
    out = b""
    if cd_offset >= ZIP32_LIMIT or cd_size >= ZIP32_LIMIT:
        record_at = cd_offset + cd_size
        out += ZIP64_END_RECORD.pack(
            ZIP64_END_RECORD_SIG,
            ZIP64_END_RECORD.size - 12,
            VERSION_MADE_BY_UNIX | 45,
            45,
            0,
            0,
            n_members,
            n_members,
            cd_size,
            cd_offset,
        )
        out += ZIP64_LOCATOR.pack(ZIP64_LOCATOR_SIG, 0, record_at, 1)
    out += END_RECORD.pack(
        END_RECORD_SIG,
        0,
        0,
        n_members,
        n_members,
        min(cd_size, ZIP32_LIMIT),
        min(cd_offset, ZIP32_LIMIT),
        0,
    )
    return out


# ---------------------------------------------------------------------------------------------
# Writing
#
# The model's bytes go from the source to the output in the kernel (copy_file_range: no trip
# through Python's memory, and a reflink where the filesystem has them), on one thread. Two
# more threads hash the copied bytes in the output, mapped, while they are still in the page
# cache: one the SHA-256, one the CRC-32 (hashlib and zlib release the GIL). So the digests
# describe exactly what was written, and the source is read once. The SHA-256 (~1.8 GB/s
# with SHA-NI) is the slowest part: with three free cores everything else overlaps with it
# (bench/startup.py; on 2 busy vCPUs the parts mostly add up).

COPY_CHUNK = 32 << 20  # bytes per copy_file_range call: cancellation and progress granularity
# Bytes per digest update: large enough that a digest thread, which needs the GIL back after
# each, is not held up by the main thread's Python (validating the model meanwhile).
DIGEST_CHUNK = 8 << 20
DIGEST_WINDOW = 64 << 20  # mapped at a time: the digests' memory stays bounded
# copy_file_range errors that mean "not between these files": copy through a buffer instead.
_NO_KERNEL_COPY = {errno.EXDEV, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL, errno.EPERM}


@dataclass
class WriteResult:
    data_offset: int  # where model.gguf's bytes start in the output
    size: int  # of the whole output
    model_sha256: str
    model_crc32: int
    stub_sha256: str
    layout: str


def write_executable(
    out: BinaryIO,
    stub: Path,
    source: ModelSource,
    args: Sequence[str],
    manifest: dict | Callable[[int], dict],
    show_progress: bool = False,
    while_copying: Callable[[], None] | None = None,
    known: Digests | None = None,
    known_stub_sha256: str | None = None,
) -> WriteResult:
    """Write the executable into `out` (an empty, unbuffered file).

    `manifest` is stored as qpack.json with the model's size and SHA-256 and the stub's
    SHA-256 added; a callable is called with the model data's offset once the model is in
    `out` (to validate the copied bytes first, for a model that arrived zipped).
    `while_copying` runs on this thread while other threads copy and hash the model (to
    validate a plain GGUF meanwhile); an exception from it stops the copy. `known` and
    `known_stub_sha256` are digests remembered from an earlier build (not computed again)."""
    try:
        stub_file = open(stub, "rb", buffering=0)
    except OSError as e:
        raise QpackError(f"{stub}: cannot read the runtime stub: {e.strerror}") from None
    with stub_file:
        stub_size = os.fstat(stub_file.fileno()).st_size
        if stub_size == 0:
            raise QpackError(f"{stub}: the runtime stub is empty; rebuild it (--rebuild-stub)")
        with mmap.mmap(stub_file.fileno(), 0, access=mmap.ACCESS_READ) as image:
            layout = plan_stub(image, str(stub))
        if layout.warning:
            click.echo(f"qpack: warning: {layout.warning}", err=True)
        fd = out.fileno()
        head_len = layout.insert_at
        _copy_bytes(stub_file.fileno(), fd, 0, 0, head_len, str(stub))

        # model.gguf: local header padded so that the data starts on DATA_ALIGNMENT.
        name = MODEL_MEMBER.encode()
        zip64 = source.size >= ZIP32_LIMIT
        zip64_extra = (
            EXTRA_HEADER.pack(ZIP64_EXTRA_ID, 16) + struct.pack("<QQ", source.size, source.size)
            if zip64
            else b""
        )
        header_at = head_len + layout.reserve
        while True:
            base = header_at + LOCAL_HEADER.size + len(name) + len(zip64_extra)
            try:
                extra = zip64_extra + _padding_field(base, len(zip64_extra))
                break
            except ValueError:
                header_at += 16  # a few filler bytes before the header make a padding length fit
        header = local_header(name, 0, source.size, extra, zip64)  # CRC-32 filled in below
        write_at(fd, bytes(header_at - head_len) + header, head_len)
        data_offset = header_at + len(header)
        assert data_offset % DATA_ALIGNMENT == 0
        end_of_data = data_offset + source.size
        os.ftruncate(fd, end_of_data)  # the model's place; holes in the model stay holes here
        digests, stub_sha = _copy_model(
            fd,
            data_offset,
            source,
            stub_file.fileno(),
            stub_size,
            show_progress,
            while_copying,
            known,
            known_stub_sha256,
        )
        crc, sha = digests.crc32, digests.sha256
        write_at(fd, struct.pack("<I", crc), header_at + 14)
        members = [ZipMember(name, crc, source.size, header_at)]

        manifest = dict(manifest(data_offset) if callable(manifest) else manifest)
        manifest["model"] = {**manifest.get("model", {}), "size": source.size, "sha256": sha}
        manifest["stub"] = {"sha256": stub_sha, "size": stub_size}
        small = [
            (ARGS_MEMBER, "".join(f"{a}\n" for a in args).encode("utf-8")),
            (MANIFEST_MEMBER, (json.dumps(manifest, indent=2, sort_keys=True) + "\n").encode()),
        ]
        at = end_of_data
        for member_name, data in small:
            crc_small = zlib.crc32(data)
            record = local_header(member_name.encode(), crc_small, len(data), b"", False) + data
            write_at(fd, record, at)
            members.append(ZipMember(member_name.encode(), crc_small, len(data), at))
            at += len(record)

        # The stub's tail (PyInstaller archive, ELF section headers) follows, shifted.
        tail_from, tail_to = layout.tail or (head_len, stub_size)
        if tail_from < tail_to:
            filler = bytes(-(at - tail_from) % SHIFT_ALIGNMENT)
            write_at(fd, filler, at)
            at += len(filler)
            shift = at - tail_from
            _copy_bytes(stub_file.fileno(), fd, tail_from, at, tail_to - tail_from, str(stub))
            at += tail_to - tail_from
            for offset, data in layout.edits(shift):
                write_at(fd, data, offset if offset < head_len else offset + shift)

    cd_offset = at
    directory = central_directory(members)
    tail = directory + end_records(len(members), cd_offset, len(directory))
    write_at(fd, tail, at)
    size = at + len(tail)
    if layout.checksum_at is not None:
        checksum = pe_checksum(out, layout.checksum_at)
        write_at(fd, struct.pack("<I", checksum), layout.checksum_at)
    if layout.finish is not None and (warning := layout.finish(fd, size)):
        click.echo(f"qpack: warning: {warning}", err=True)
    return WriteResult(data_offset, size, sha, crc, stub_sha, layout.kind)


def _copy_bytes(
    src: int,
    dst: int,
    src_at: int,
    dst_at: int,
    length: int,
    src_name: str,
    progress: _Progress | None = None,
) -> None:
    """Copy `length` bytes between two file descriptors, in the kernel where it can."""
    kernel = hasattr(os, "copy_file_range")
    done = 0
    while done < length:
        if progress:
            progress.check()
        n = min(COPY_CHUNK, length - done)
        if kernel:
            try:
                copied = os.copy_file_range(src, dst, n, src_at + done, dst_at + done)
            except OSError as e:
                if e.errno not in _NO_KERNEL_COPY:
                    raise
                copied = 0
            if copied == 0:  # refused, or 0 from a filesystem that cannot: read() will tell
                kernel = False
                continue
        else:
            os.lseek(src, src_at + done, os.SEEK_SET)
            chunk = os.read(src, n)
            write_at(dst, chunk, dst_at + done)
            copied = len(chunk)
        if copied == 0:
            raise QpackError(
                f"{src_name}: ended at byte {src_at + done} of {src_at + length}: the file "
                "changed or was truncated while it was copied"
            )
        done += copied
        if progress:
            progress.advance(copied)


def _data_extents(fd: int, size: int) -> Iterator[tuple[int, int]]:
    """(start, length) of each stretch of data in the first `size` bytes of a file, leaving out
    the holes of a sparse file (they read as zeros) where the system tells where they are."""
    position = 0
    while position < size:
        try:
            start = os.lseek(fd, position, os.SEEK_DATA)
            end = os.lseek(fd, start, os.SEEK_HOLE)
        except AttributeError:  # no SEEK_DATA here (Windows)
            start, end = position, size
        except OSError as e:
            if e.errno == errno.ENXIO:  # nothing but a hole from `position` on
                return
            start, end = position, size  # the filesystem cannot tell
        if start >= size:
            return
        end = min(end, size)
        yield start, end - start
        position = end


class _Cancelled(Exception):
    """Another part of the copy failed, or the user pressed Ctrl-C: stop."""


class _Progress:
    """How many of the model's bytes are in the output so far. The digest threads wait on it;
    cancel() stops every thread at its next chunk."""

    def __init__(self) -> None:
        self._changed = threading.Condition()
        self.copied = 0
        self.cancelled = False

    def advance(self, n: int) -> None:
        with self._changed:
            self.copied += n
            self._changed.notify_all()

    def wait_for(self, position: int) -> None:
        with self._changed:
            while self.copied < position and not self.cancelled:
                self._changed.wait()
        self.check()

    def check(self) -> None:
        if self.cancelled:
            raise _Cancelled

    def cancel(self) -> None:
        with self._changed:
            self.cancelled = True
            self._changed.notify_all()


try:  # ISA-L's CRC-32 folds with carry-less multiplies: ~25 GB/s here against zlib's ~4
    from isal.isal_zlib import crc32 as _crc32
except ImportError:  # a platform without isal wheels
    _crc32 = zlib.crc32


class _Crc32:
    """The zip CRC-32 behind hashlib's update()."""

    def __init__(self) -> None:
        self.value = 0

    def update(self, data: memoryview) -> None:
        self.value = _crc32(data, self.value)


class _Digest:
    """Feeds a range of a file to a digest, each chunk once `progress` says the copy has put it
    there (when the range is the model in the output). The file is mapped, a window at a time:
    the page cache is hashed in place. Only files that nothing else truncates are mapped (the
    output being written, the cached stub, which is only ever replaced by a rename): reading a
    mapping past a truncated end is a SIGBUS."""

    def __init__(self, digest) -> None:
        self.digest = digest
        self.done = 0

    def feed(self, fd: int, start: int, length: int, progress: _Progress, trail_copy: bool) -> None:
        assert start % mmap.ALLOCATIONGRANULARITY == 0
        for window in range(0, length, DIGEST_WINDOW):
            size = min(DIGEST_WINDOW, length - window)
            with (
                mmap.mmap(fd, size, offset=start + window, access=mmap.ACCESS_READ) as mapping,
                memoryview(mapping) as view,
            ):
                if not trail_copy and hasattr(mmap, "MADV_WILLNEED"):
                    mapping.madvise(mmap.MADV_WILLNEED)  # read ahead, for a cold page cache
                for at in range(0, size, DIGEST_CHUNK):
                    end = min(at + DIGEST_CHUNK, size)
                    if trail_copy:
                        progress.wait_for(window + end)
                    else:
                        progress.check()
                    self.digest.update(view[at:end])
                    self.done = window + end


def _copy_model(
    out: int,
    data_offset: int,
    source: ModelSource,
    stub: int,
    stub_size: int,
    show_progress: bool,
    while_copying: Callable[[], None] | None,
    known: Digests | None,
    known_stub_sha256: str | None,
) -> tuple[Digests, str]:
    """Copy the model into the output `out` at `data_offset` (the file is already that long)
    while hashing it; returns its digests, and the SHA-256 of the stub `stub` (hashed
    meanwhile). Digests already `known` (remembered from an earlier build) are not computed
    again: the build is then a copy in the kernel."""
    progress = _Progress()
    sha = _Digest(hashlib.sha256())
    crc = _Digest(_Crc32())
    stub_sha = _Digest(hashlib.sha256())

    def copy() -> None:
        if source.member is None:
            _copy_plain(source, out, data_offset, progress)
        else:
            _copy_zipped(source, out, data_offset, progress)

    def hash_sha() -> None:
        sha.feed(out, data_offset, source.size, progress, trail_copy=True)

    def hash_stub_and_crc() -> None:  # the CRC-32 is fast: this thread has time for the stub
        if known_stub_sha256 is None:
            stub_sha.feed(stub, 0, stub_size, progress, trail_copy=False)
        if known is None:
            crc.feed(out, data_offset, source.size, progress, trail_copy=True)

    def done() -> int:  # bytes of the model copied, and hashed where they need to be
        return progress.copied if known else min(sha.done, crc.done)

    with ThreadPoolExecutor(max_workers=3, thread_name_prefix="qpack-copy") as pool:
        try:
            jobs = [pool.submit(copy), pool.submit(hash_stub_and_crc)]
            if known is None:
                jobs.append(pool.submit(hash_sha))
            if while_copying is not None:
                while_copying()
            with click.progressbar(  # only now: a model refused by while_copying shows none
                length=source.size,
                label=f"writing {MODEL_MEMBER}",
                file=sys.stderr if show_progress else _NullFile(),
                show_pos=False,
            ) as bar:
                shown = 0
                while True:
                    _, running = wait(jobs, timeout=0.1, return_when=FIRST_EXCEPTION)
                    for job in jobs:  # the copy first: its error explains the others'
                        if job.done() and job.exception() is not None:
                            raise job.exception()
                    now = done()
                    bar.update(now - shown)
                    shown = now
                    if not running:
                        break
        except BaseException:
            progress.cancel()  # the pool's exit then waits for threads that stop at once
            raise
    digests = known or Digests(sha.digest.hexdigest(), crc.digest.value)
    return digests, known_stub_sha256 or stub_sha.digest.hexdigest()


def _copy_plain(source: ModelSource, out: int, data_offset: int, progress: _Progress) -> None:
    name = source.describe()
    with open(source.path, "rb", buffering=0) as f:
        before = os.fstat(f.fileno())
        if before.st_size == source.size:
            if hasattr(os, "posix_fadvise"):  # a larger readahead, as cp asks for
                os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_SEQUENTIAL)
            copied = 0
            for start, length in _data_extents(f.fileno(), source.size):
                progress.advance(start - copied)  # a hole: nothing to copy
                _copy_bytes(f.fileno(), out, start, data_offset + start, length, name, progress)
                copied = start + length
            progress.advance(source.size - copied)
        after = os.fstat(f.fileno())
    if (after.st_size, after.st_mtime_ns) != (source.size, before.st_mtime_ns):
        raise QpackError(
            f"{name}: the file changed or was truncated while it was copied (expected "
            f"{source.size} bytes, now {after.st_size}); build again once it is complete"
        )


def _copy_zipped(source: ModelSource, out: int, data_offset: int, progress: _Progress) -> None:
    """Stream a zip member out (decompressed by zipfile); a chunk of zeros is left as a hole."""
    zeros = bytes(COPY_CHUNK)
    copied = 0
    with source.open() as f:
        try:
            while chunk := f.read(COPY_CHUNK):
                progress.check()
                if copied + len(chunk) > source.size:
                    break
                if chunk != zeros:
                    write_at(out, chunk, data_offset + copied)
                copied += len(chunk)
                progress.advance(len(chunk))
        except zipfile.BadZipFile as e:
            raise QpackError(f"{source.describe()}: the zipped model is corrupt ({e})") from None
        except (zlib.error, EOFError) as e:
            raise QpackError(f"{source.describe()}: cannot decompress the model ({e})") from None
    if copied != source.size:
        raise QpackError(
            f"{source.describe()}: expected {source.size} bytes, read {copied} or more: "
            "the file changed or is truncated"
        )


class _NullFile:
    def write(self, _text: str) -> None:
        pass

    def flush(self) -> None:
        pass

    def isatty(self) -> bool:
        return False


@contextmanager
def atomic_output(path: Path, expected_size: int) -> Iterator[tuple[BinaryIO, str]]:
    """A temporary file next to `path` (yielded unbuffered, with its name), renamed onto `path`
    only when the block succeeds (Ctrl-C or any error removes it), after checking that the disk
    has room.

    No fsync before the rename, as with cp, compilers and PyInstaller: it would wait for the
    whole model to reach the disk (~0.3 s per GiB here). The rename still means no reader ever
    sees a partial file under `path`; only a power cut right after a build could leave zeros
    in it, which `--verify` reports."""
    directory = path.parent if str(path.parent) else Path(".")
    if not directory.is_dir():
        raise QpackError(f"{directory}: the output directory does not exist")
    free = shutil.disk_usage(directory).free
    if free < expected_size + (16 << 20):
        raise QpackError(
            f"{directory}: {free / 2**30:.2f} GiB free, the executable needs "
            f"{expected_size / 2**30:.2f} GiB: free some space or choose another -o"
        )
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".part", dir=directory)
    except OSError as e:
        raise QpackError(f"{directory}: cannot write the output there: {e.strerror}") from None
    try:
        with os.fdopen(fd, "w+b", buffering=0) as f:
            yield f, tmp
        os.chmod(tmp, 0o755)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


# ---------------------------------------------------------------------------------------------
# The whole build


@dataclass
class ModelSummary:
    """What the manifest records about the model (after the runtime's reader accepted it)."""

    architecture: str
    name: str | None
    n_tensors: int
    n_parameters: int
    quant_mix: dict[str, dict[str, int]]  # type name -> {"tensors": n, "bytes": n}


def check_model(
    path: str | os.PathLike, offset: int = 0, length: int | None = None, describe: str = ""
) -> ModelSummary:
    """Open the GGUF with the runtime's own reader and refuse what the runtime cannot run
    (architecture, hyperparameters, tokenizer, tensor types), so no build yields a useless
    executable."""
    from qpack.runtime.errors import GGUFError, UnsupportedModel
    from qpack.runtime.facts import read_model_facts
    from qpack.runtime.gguf import open_gguf
    from qpack.runtime.tokenizer import Tokenizer

    describe = describe or str(path)
    try:
        gf = open_gguf(path, offset, length)
    except GGUFError as e:
        where = None if e.offset is None else e.offset - offset
        raise GGUFError(describe, where, e.problem) from None
    with gf:
        arch = gf.architecture
        facts = read_model_facts(gf, describe)  # the runtime's own checks, the same object
        try:
            Tokenizer.from_metadata(gf.metadata)
        except UnsupportedModel as e:
            raise UnsupportedModel(f"{describe}: {e}") from None
        mix: dict[str, dict[str, int]] = {}
        for ti in gf.tensors.values():
            entry = mix.setdefault(ti.type.name, {"tensors": 0, "bytes": 0})
            entry["tensors"] += 1
            entry["bytes"] += ti.nbytes
        name = gf.metadata.get("general.name")
        return ModelSummary(
            arch,
            name if isinstance(name, str) else None,
            len(gf.tensors),
            facts.n_parameters,
            dict(sorted(mix.items())),
        )


@dataclass
class BuildReport:
    output: Path
    size: int
    data_offset: int
    layout: str
    model: ModelSummary
    model_sha256: str


def output_name(name: str, target: str) -> str:
    return f"{name}.exe" if target.startswith("windows") else f"{name}.bin"


def build_executable(
    model: Path,
    output: Path,
    stub: Path,
    *,
    name: str,
    target: str,
    args: Sequence[str] = (),
    show_progress: bool = True,
    digest_cache: DigestCache | None = None,
) -> BuildReport:
    """Validate the model and write stub + model + .args + qpack.json to `output`
    (atomically: an error or Ctrl-C leaves no file there). With a `digest_cache`, the digests
    of a model or stub built before are taken from it, and new ones are added to it."""
    from qpack.runtime.version import __version__

    source = open_model_source(model)
    try:
        stub_stat = os.stat(stub)
        # Taken before the copy: _copy_plain refuses a model that changes while it is copied.
        model_key = file_key(os.stat(model), source.member)
    except OSError as e:
        raise QpackError(f"{e.filename}: cannot read it: {e.strerror}") from None
    known = digest_cache.get(model_key) if digest_cache else None
    stub_key = file_key(stub_stat)
    known_stub = digest_cache.get(stub_key) if digest_cache else None
    expected = stub_stat.st_size + source.size + 2 * DATA_ALIGNMENT + (1 << 20)
    summary: ModelSummary | None = None

    def check_plain() -> None:  # a plain GGUF: checked while it is being copied
        nonlocal summary
        summary = check_model(model)

    with atomic_output(output, expected) as (out, tmp_path):

        def manifest(data_offset: int) -> dict:
            nonlocal summary
            if summary is None:  # a zipped GGUF: checked once copied out, in the output
                summary = check_model(tmp_path, data_offset, source.size, source.describe())
            return {
                "format": 1,
                "name": name,
                "qpack_version": __version__,
                "target": target,
                "args": list(args),
                "model": {
                    "file": source.file_name,
                    "general_name": summary.name,
                    "architecture": summary.architecture,
                    "tensors": summary.n_tensors,
                    "parameters": summary.n_parameters,
                    "quant_mix": summary.quant_mix,
                },
            }

        try:
            result = write_executable(
                out,
                stub,
                source,
                args,
                manifest,
                show_progress,
                while_copying=check_plain if source.member is None else None,
                known=known,
                known_stub_sha256=known_stub.sha256 if known_stub else None,
            )
        except OSError as e:  # a full disk, an I/O error
            where = e.filename or f"{source.describe()} -> {output}"
            raise QpackError(f"{where}: {e.strerror or e}") from None
    if digest_cache is not None and not (known and known_stub):
        digest_cache.put(
            {
                model_key: Digests(result.model_sha256, result.model_crc32),
                stub_key: Digests(result.stub_sha256, 0),  # the stub's CRC-32 is never needed
            }
        )
    assert summary is not None
    return BuildReport(
        output, result.size, result.data_offset, result.layout, summary, result.model_sha256
    )
