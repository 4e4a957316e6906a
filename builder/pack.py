"""Write an executable: the runtime stub with the model stored inside it as a zip member.

Layout (measured with PyInstaller 6.22, see design.md): the bootloader finds its archive by
scanning the file backwards from the end on every start, so the model must sit BEFORE the
PyInstaller archive and only the zip's central directory after it:

    [stub image][model.gguf local header + padding][model data][.args][qpack.json]
    [PyInstaller archive ...][central directory][zip64 end + locator, if needed][end record]

Each OS's layout reads in its own module: builder/elf.py, builder/pe.py, builder/macho.py
(any other stub gets the zip appended, with a warning: it works, but every start then reads the
whole model). The zip records are builder/zipfmt.py, the copy-and-hash pipeline
builder/copier.py, the model checks builder/validate.py; this module puts them together.

With `split`, the model is written beside the executable as NAME.gguf instead (for a model
past Windows' 4 GiB executable limit, or to update the runtime without re-downloading the
weights); the executable's manifest names that file and its digests, and the runtime opens
it from the executable's directory.

Same inputs give the same bytes: fixed timestamps, fixed member order, sorted JSON.
"""

from __future__ import annotations

import json
import mmap
import os
import shutil
import struct
import tempfile
import zlib
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import click
from qpack.builder import copier, macho
from qpack.builder.digests import DigestCache, Digests, file_key
from qpack.builder.elf import plan_elf
from qpack.builder.fileio import write_at
from qpack.builder.layout import SHIFT_ALIGNMENT, StubLayout
from qpack.builder.pe import PE_SIZE_LIMIT, pe_checksum, plan_pe
from qpack.builder.sources import ModelSource, default_name, open_model_source
from qpack.builder.validate import ModelSummary, check_model
from qpack.builder.zipfmt import (
    ZIP32_LIMIT,
    ZipMember,
    central_directory,
    end_records,
    local_header,
    padding_field,
)
from qpack.runtime.embedded import (
    ARGS_MEMBER,
    DATA_ALIGNMENT,
    EXTRA_HEADER,
    LOCAL_HEADER,
    MANIFEST_MEMBER,
    MODEL_MEMBER,
    ZIP64_EXTRA_ID,
)
from qpack.runtime.errors import QpackError

__all__ = [
    "BuildReport",
    "ModelSummary",
    "build_executable",
    "check_model",
    "default_name",
    "open_model_source",
    "output_name",
    "plan_stub",
    "write_executable",
]


def plan_stub(stub: bytes | mmap.mmap, stub_name: str = "stub") -> StubLayout:
    """Where the members go in this stub, by its format; appended for an unknown one."""
    if stub[:4] == b"\x7fELF":
        return plan_elf(stub, stub_name)
    if stub[:2] == b"MZ":
        return plan_pe(stub, stub_name)
    if stub[:4] in macho.MAGICS:
        plan = macho.plan_macho(stub, stub_name)
        return StubLayout(
            "macho",
            plan.pkg_start,
            reserve=plan.reserve,
            tail=(plan.pkg_start, plan.pkg_end),  # the old signature after the archive is dropped
            finish=plan.finish,
        )
    return StubLayout(
        "append",
        len(stub),
        warning=(
            f"{stub_name} is neither ELF, PE nor Mach-O: the model is appended after the "
            "PyInstaller archive, which works but makes every start read the whole model"
        ),
    )


@dataclass
class WriteResult:
    data_offset: int  # where model.gguf's bytes start in the output (0: a --split sibling)
    size: int  # of the whole output
    model_sha256: str
    model_crc32: int
    stub_sha256: str
    layout: str


def write_executable(
    out: BinaryIO,
    out_path: str,
    stub: Path,
    source: ModelSource | None,
    args: Sequence[str],
    manifest: dict | Callable[[int], dict],
    show_progress: bool = False,
    while_copying: Callable[[], None] | None = None,
    known: Digests | None = None,
    known_stub_sha256: str | None = None,
) -> WriteResult:
    """Write the executable into `out` (an empty, unbuffered file, opened at `out_path`).

    `manifest` is stored as qpack.json with the model's size and SHA-256 and the stub's
    SHA-256 added; a callable is called with the model data's offset once the model is in
    `out` (to validate the copied bytes first, for a model that arrived zipped).
    `while_copying` runs on this thread while other threads copy and hash the model (to
    validate a plain GGUF meanwhile); an exception from it stops the copy. `known` and
    `known_stub_sha256` are digests remembered from an earlier build (not computed again).
    With `source` None (--split) no model member is written: `known` must then hold the
    digests of the sibling model file, which the manifest already names."""
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
        copier.copy_bytes(stub_file.fileno(), fd, 0, 0, head_len, str(stub))
        members: list[ZipMember] = []
        at = head_len + layout.reserve
        write_at(fd, bytes(layout.reserve), head_len)

        if source is not None:
            at, data_offset, digests, stub_sha = _write_model_member(
                fd, out_path, at, head_len, source, stub_file.fileno(), stub_size,
                show_progress, while_copying, known, known_stub_sha256, members,
            )  # fmt: skip
            model_size = source.size
        else:
            assert known is not None, "a split build names the sibling's digests"
            data_offset, digests = 0, known
            stub_sha = known_stub_sha256 or copier.file_sha256(stub_file.fileno(), stub_size)
            model_size = None

        manifest = dict(manifest(data_offset) if callable(manifest) else manifest)
        if model_size is not None:
            manifest["model"] = {
                **manifest.get("model", {}),
                "size": model_size,
                "sha256": digests.sha256,
            }
        manifest["stub"] = {"sha256": stub_sha, "size": stub_size}
        small = [
            (ARGS_MEMBER, "".join(f"{a}\n" for a in args).encode("utf-8")),
            (MANIFEST_MEMBER, (json.dumps(manifest, indent=2, sort_keys=True) + "\n").encode()),
        ]
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
            copier.copy_bytes(stub_file.fileno(), fd, tail_from, at, tail_to - tail_from, str(stub))
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
    return WriteResult(data_offset, size, digests.sha256, digests.crc32, stub_sha, layout.kind)


def _write_model_member(
    fd: int,
    out_path: str,
    header_at: int,
    head_len: int,
    source: ModelSource,
    stub_fd: int,
    stub_size: int,
    show_progress: bool,
    while_copying: Callable[[], None] | None,
    known: Digests | None,
    known_stub_sha256: str | None,
    members: list[ZipMember],
) -> tuple[int, int, Digests, str]:
    """model.gguf at `header_at`: its local header, padded so that the data starts on
    DATA_ALIGNMENT, then the data. Returns where the next record goes, the data's offset,
    the model's digests and the stub's SHA-256."""
    name = MODEL_MEMBER.encode()
    zip64 = source.size >= ZIP32_LIMIT
    zip64_extra = (
        EXTRA_HEADER.pack(ZIP64_EXTRA_ID, 16) + struct.pack("<QQ", source.size, source.size)
        if zip64
        else b""
    )
    while True:
        base = header_at + LOCAL_HEADER.size + len(name) + len(zip64_extra)
        try:
            extra = zip64_extra + padding_field(base, len(zip64_extra))
            break
        except ValueError:
            header_at += 16  # a few filler bytes before the header make a padding length fit
    header = local_header(name, 0, source.size, extra, zip64)  # CRC-32 filled in below
    write_at(fd, bytes(header_at - head_len) + header, head_len)
    data_offset = header_at + len(header)
    assert data_offset % DATA_ALIGNMENT == 0
    end_of_data = data_offset + source.size
    os.ftruncate(fd, end_of_data)  # the model's place; holes in the model stay holes here
    digests, stub_sha = copier.copy_model(
        fd, out_path, data_offset, source, stub_fd, stub_size, show_progress, while_copying,
        known, known_stub_sha256,
    )  # fmt: skip
    write_at(fd, struct.pack("<I", digests.crc32), header_at + 14)
    members.append(ZipMember(name, digests.crc32, source.size, header_at))
    return end_of_data, data_offset, digests, stub_sha


@contextmanager
def atomic_output(
    path: Path, expected_size: int, mode: int = 0o755
) -> Iterator[tuple[BinaryIO, str]]:
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
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


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


def sibling_model_name(name: str) -> str:
    """The model file a --split executable opens from its own directory."""
    return f"{name}.gguf"


# The executable format each target OS runs, by the stub's first bytes.
_FORMATS = {
    "linux": ("ELF", (b"\x7fELF",)),
    "windows": ("PE", (b"MZ",)),
    "macos": ("Mach-O", macho.MAGICS),
}


def check_stub_target(stub_head: bytes, stub: Path, target: str) -> None:
    """Refuse a stub of another OS's executable format than the target's (a --stub from the
    wrong platform); a format qpack does not know is left to plan_stub's warning."""
    system = target.split("-", 1)[0]
    found = [fmt for fmt, magics in _FORMATS.values() if stub_head.startswith(magics)]
    if system in _FORMATS and found and found[0] != _FORMATS[system][0]:
        raise QpackError(
            f"{stub}: {'an' if found[0] == 'ELF' else 'a'} {found[0]} executable, not a "
            f"runtime stub for --target {target} "
            f"({_FORMATS[system][0]}); pass the stub built on {target} (the workflow's "
            "stub artifact)"
        )


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
    split: bool = False,
) -> BuildReport:
    """Validate the model and write stub + model + .args + qpack.json to `output`
    (atomically: an error or Ctrl-C leaves no file there). With a `digest_cache`, the digests
    of a model or stub built before are taken from it, and new ones are added to it. With
    `split`, the model goes to NAME.gguf beside `output` and the executable names it."""
    from qpack.runtime.version import __version__

    source = open_model_source(model)
    try:
        stub_stat = os.stat(stub)
        with open(stub, "rb") as f:
            stub_head = f.read(4)
        # Taken before the copy: the copy refuses a model that changes while it is copied.
        model_key = file_key(model, os.stat(model), source.member)
    except OSError as e:
        raise QpackError(f"{e.filename}: cannot read it: {e.strerror}") from None
    check_stub_target(stub_head, stub, target)
    expected = stub_stat.st_size + source.size + 2 * DATA_ALIGNMENT + (1 << 20)
    windows = target.startswith("windows") or stub_head.startswith(b"MZ")
    if windows and not split and expected > PE_SIZE_LIMIT:
        raise QpackError(
            f"{source.describe()}: {source.size / 2**30:.2f} GiB; Windows does not run an "
            "executable over 4 GiB: build with --split (writes the model beside the .exe, "
            "which finds it by itself)"
        )
    known = digest_cache.get(model_key) if digest_cache else None
    stub_key = file_key(stub, stub_stat)
    known_stub = digest_cache.get(stub_key) if digest_cache else None
    summary: ModelSummary | None = None

    def check_plain() -> None:  # a plain GGUF: checked while it is being copied
        nonlocal summary
        summary = check_model(model)

    def model_facts() -> dict:
        assert summary is not None
        return {
            "file": source.file_name,
            "general_name": summary.name,
            "architecture": summary.architecture,
            "tensors": summary.n_tensors,
            "parameters": summary.n_parameters,
            "quant_mix": summary.quant_mix,
        }

    def manifest_of(model_entry: dict) -> dict:
        return {
            "format": 1,
            "name": name,
            "qpack_version": __version__,
            "target": target,
            "args": list(args),
            "model": model_entry,
        }

    try:
        if split:
            sibling = output.parent / sibling_model_name(name)
            with atomic_output(sibling, source.size + (1 << 20), mode=0o644) as (out, tmp_path):
                # sized first, as the embedded member's place is: the digest threads map
                # windows of it before the copy has reached them
                os.ftruncate(out.fileno(), source.size)
                digests, _ = copier.copy_model(
                    out.fileno(), tmp_path, 0, source, None, 0, show_progress,
                    check_plain if source.member is None else None, known, "",
                )  # fmt: skip
                if summary is None:  # a zipped GGUF: checked once copied out
                    summary = check_model(tmp_path, 0, source.size, source.describe())
            entry = {
                **model_facts(),
                "split_file": sibling.name,
                "size": source.size,
                "sha256": digests.sha256,
                "crc32": digests.crc32,
            }
            with atomic_output(output, stub_stat.st_size + (1 << 20)) as (out, tmp_path):
                result = write_executable(
                    out, tmp_path, stub, None, args, manifest_of(entry),
                    known=digests, known_stub_sha256=known_stub.sha256 if known_stub else None,
                )  # fmt: skip
        else:
            with atomic_output(output, expected) as (out, tmp_path):

                def manifest(data_offset: int) -> dict:
                    nonlocal summary
                    if summary is None:  # a zipped GGUF: checked once copied out, in the output
                        summary = check_model(tmp_path, data_offset, source.size, source.describe())
                    return manifest_of(model_facts())

                result = write_executable(
                    out,
                    tmp_path,
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
