"""Find the model inside the running executable: a zip whose central directory ends the file.

`qpack build` writes `[stub][model.gguf local header + padding][model data][.args][qpack.json]
[PyInstaller archive][central directory][zip64 end][end]`. Zip offsets are absolute, so the
members can sit before the PyInstaller archive (whose bootloader scans the file backwards from
the end on every start: the model must not be there) while `unzip -l` still lists them.

The model member is STORED with its data on a 64 KiB boundary of the file, so it can be mapped
in place. Its data offset comes from the member's LOCAL header: the alignment padding lives in
that header's extra field only (the central directory's extra length differs).

This module also holds the zip record layouts; the packer (qpack.builder.pack) writes them.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import struct
import sys
import zlib
from dataclasses import dataclass, field

from .errors import EmbeddedModelError

MODEL_MEMBER = "model.gguf"
ARGS_MEMBER = ".args"
MANIFEST_MEMBER = "qpack.json"

# Where the model's data starts in the file: Windows' mmap granularity, and a multiple of the
# 4/16/64 KiB pages elsewhere.
DATA_ALIGNMENT = 65536

# llamafile's convention: a line `...` in .args marks where the command-line arguments go.
ARGV_MARKER = "..."

# Zip record layouts (APPNOTE.TXT 4.3), little-endian.
LOCAL_HEADER = struct.Struct("<IHHHHHIIIHH")  # 30 bytes
LOCAL_HEADER_SIG = 0x04034B50
CENTRAL_HEADER = struct.Struct("<IHHHHHHIIIHHHHHII")  # 46 bytes
CENTRAL_HEADER_SIG = 0x02014B50
END_RECORD = struct.Struct("<IHHHHIIH")  # 22 bytes
END_RECORD_SIG = 0x06054B50
ZIP64_END_RECORD = struct.Struct("<IQHHIIQQQQ")  # 56 bytes
ZIP64_END_RECORD_SIG = 0x06064B50
ZIP64_LOCATOR = struct.Struct("<IIQI")  # 20 bytes
ZIP64_LOCATOR_SIG = 0x07064B50
ZIP64_EXTRA_ID = 0x0001
EXTRA_HEADER = struct.Struct("<HH")

# A central directory larger than this is not one qpack wrote (it holds three entries); the
# cap keeps a forged size from allocating gigabytes.
MAX_CENTRAL_DIRECTORY = 1 << 20
MAX_MEMBER_READ = 1 << 20  # .args and qpack.json are small text files
_MAX_COMMENT = 0xFFFF


@dataclass(frozen=True)
class ZipEntry:
    """One central-directory entry (zip64 values already resolved)."""

    name: str
    method: int
    crc32: int
    compressed_size: int
    size: int
    header_offset: int


@dataclass(frozen=True)
class EmbeddedModel:
    """The model member of an executable: where its bytes are, plus the other members."""

    path: str  # the file holding the GGUF's bytes: the executable, or its --split sibling
    offset: int  # absolute offset of the GGUF's first byte in `path`
    length: int
    crc32: int
    entries: dict[str, ZipEntry] = field(repr=False)
    split_from: str | None = None  # the executable (holding the members) of a --split build

    @property
    def executable(self) -> str:
        return self.split_from or self.path

    def read_member(self, name: str) -> bytes | None:
        """A small stored member's bytes (None when absent)."""
        entry = self.entries.get(name)
        if entry is None:
            return None
        with open(self.executable, "rb") as f:
            offset = member_data_offset(f, self.executable, entry, os.fstat(f.fileno()).st_size)
            if entry.size > MAX_MEMBER_READ:
                raise EmbeddedModelError(
                    f"{self.executable}: member {name} claims {entry.size} bytes (a qpack member "
                    "is a few KiB); the executable is corrupt, rebuild it with `qpack build`"
                )
            f.seek(offset)
            data = f.read(entry.size)
        if zlib.crc32(data) != entry.crc32:
            raise EmbeddedModelError(
                f"{self.executable}: member {name} at byte {offset} fails its CRC-32 check; "
                "the executable is corrupt, rebuild it with `qpack build`"
            )
        return data

    def args(self) -> list[str]:
        """Default arguments from `.args`: one per line, empty lines ignored."""
        data = self.read_member(ARGS_MEMBER)
        if data is None:
            return []
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as e:
            raise EmbeddedModelError(
                f"{self.path}: member {ARGS_MEMBER} is not UTF-8 (byte {e.start}); "
                "rebuild with `qpack build --args`"
            ) from None
        return [line for line in text.splitlines() if line.strip()]

    def manifest(self) -> dict:
        """The build manifest `qpack.json` ({} when absent)."""
        data = self.read_member(MANIFEST_MEMBER)
        if data is None:
            return {}
        try:
            manifest = json.loads(data.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise EmbeddedModelError(
                f"{self.path}: member {MANIFEST_MEMBER} is not valid JSON ({e}); "
                "rebuild with `qpack build`"
            ) from None
        if not isinstance(manifest, dict):
            raise EmbeddedModelError(f"{self.path}: member {MANIFEST_MEMBER} is not a JSON object")
        return manifest


def read_zip_directory(path: str) -> dict[str, ZipEntry] | None:
    """The central directory of the zip that ends `path`, or None when the file does not end
    with a zip (a plain interpreter, or an executable that carries no model)."""
    with open(path, "rb") as f:
        file_size = os.fstat(f.fileno()).st_size
        tail_len = min(file_size, END_RECORD.size + _MAX_COMMENT + ZIP64_LOCATOR.size)
        f.seek(file_size - tail_len)
        tail = f.read(tail_len)
        end_at = _find_end_record(tail)
        if end_at is None:
            return None
        end_offset = file_size - tail_len + end_at
        (_, disk, cd_disk, n_here, n_total, cd_size, cd_offset, _) = END_RECORD.unpack_from(
            tail, end_at
        )
        if disk != 0 or cd_disk != 0 or n_here != n_total:
            raise EmbeddedModelError(f"{path}: the zip at byte {end_offset} spans several disks")
        if n_total == 0xFFFF or 0xFFFFFFFF in (cd_size, cd_offset):
            n_total, cd_size, cd_offset = _read_zip64_end(f, path, end_offset, file_size)
        if cd_offset + cd_size > end_offset:
            raise EmbeddedModelError(
                f"{path}: the zip's central directory (byte {cd_offset}, {cd_size} bytes) "
                f"runs past its end record at byte {end_offset}: the file is truncated or corrupt"
            )
        if cd_size > MAX_CENTRAL_DIRECTORY:
            raise EmbeddedModelError(
                f"{path}: the zip's central directory claims {cd_size} bytes; "
                "this is not an executable qpack built"
            )
        f.seek(cd_offset)
        directory = f.read(cd_size)
    return _parse_central_directory(path, directory, cd_offset, n_total)


def _find_end_record(tail: bytes) -> int | None:
    sig = struct.pack("<I", END_RECORD_SIG)
    pos = len(tail) - END_RECORD.size
    while pos >= 0:
        pos = tail.rfind(sig, 0, pos + 4)
        if pos < 0:
            return None
        comment_len = struct.unpack_from("<H", tail, pos + 20)[0]
        if pos + END_RECORD.size + comment_len == len(tail):
            return pos
        pos -= 1
    return None


def _read_zip64_end(f, path: str, end_offset: int, file_size: int) -> tuple[int, int, int]:
    locator_at = end_offset - ZIP64_LOCATOR.size
    if locator_at < 0:
        raise EmbeddedModelError(f"{path}: zip64 end locator missing before byte {end_offset}")
    f.seek(locator_at)
    sig, _, record_at, _ = ZIP64_LOCATOR.unpack(f.read(ZIP64_LOCATOR.size))
    if sig != ZIP64_LOCATOR_SIG:
        raise EmbeddedModelError(
            f"{path}: the zip needs zip64 records but has no zip64 locator at byte {locator_at}"
        )
    if record_at + ZIP64_END_RECORD.size > locator_at:
        raise EmbeddedModelError(
            f"{path}: the zip64 end record offset {record_at} is past the locator "
            f"(byte {locator_at}): the file is truncated or corrupt"
        )
    f.seek(record_at)
    fields = ZIP64_END_RECORD.unpack(f.read(ZIP64_END_RECORD.size))
    if fields[0] != ZIP64_END_RECORD_SIG:
        raise EmbeddedModelError(f"{path}: no zip64 end record at byte {record_at}")
    n_total, cd_size, cd_offset = fields[7], fields[8], fields[9]
    return n_total, cd_size, cd_offset


def _parse_central_directory(
    path: str, directory: bytes, cd_offset: int, count: int
) -> dict[str, ZipEntry]:
    entries: dict[str, ZipEntry] = {}
    pos = 0
    for _ in range(count):
        if pos + CENTRAL_HEADER.size > len(directory):
            raise EmbeddedModelError(
                f"{path}: the zip's central directory ends early at byte {cd_offset + pos}"
            )
        (sig, _, _, _, method, _, _, crc, csize, size, nlen, elen, clen, _, _, _, lho) = (
            CENTRAL_HEADER.unpack_from(directory, pos)
        )
        if sig != CENTRAL_HEADER_SIG:
            raise EmbeddedModelError(
                f"{path}: bad central directory entry at byte {cd_offset + pos}"
            )
        name_at = pos + CENTRAL_HEADER.size
        end = name_at + nlen + elen + clen
        if end > len(directory):
            raise EmbeddedModelError(
                f"{path}: central directory entry at byte {cd_offset + pos} runs past its end"
            )
        name = directory[name_at : name_at + nlen].decode("utf-8", errors="replace")
        extra = directory[name_at + nlen : name_at + nlen + elen]
        size, csize, lho = _apply_zip64(path, extra, size, csize, lho, cd_offset + pos)
        entries[name] = ZipEntry(name, method, crc, csize, size, lho)
        pos = end
    return entries


def _apply_zip64(
    path: str, extra: bytes, size: int, csize: int, lho: int, where: int
) -> tuple[int, int, int]:
    """Replace 0xFFFFFFFF fields with their values from the zip64 extra field, in APPNOTE
    order (size, compressed size, header offset)."""
    needed = [v == 0xFFFFFFFF for v in (size, csize, lho)]
    if not any(needed):
        return size, csize, lho
    values = [size, csize, lho]
    for header_id, data in iter_extra_fields(extra):
        if header_id != ZIP64_EXTRA_ID:
            continue
        pos = 0
        for i, need in enumerate(needed):
            if need:
                if pos + 8 > len(data):
                    break
                values[i] = struct.unpack_from("<Q", data, pos)[0]
                pos += 8
        else:
            return values[0], values[1], values[2]
    raise EmbeddedModelError(f"{path}: zip entry at byte {where} lacks its zip64 sizes")


def iter_extra_fields(extra: bytes):
    """(header id, data) for each field of a zip extra block."""
    pos = 0
    while pos + EXTRA_HEADER.size <= len(extra):
        header_id, length = EXTRA_HEADER.unpack_from(extra, pos)
        pos += EXTRA_HEADER.size
        yield header_id, extra[pos : pos + length]
        pos += length


def member_data_offset(f, path: str, entry: ZipEntry, file_size: int) -> int:
    """Absolute offset of a stored member's first data byte, from its LOCAL header (which
    carries the alignment padding), after checking that the member fits in the file."""
    if entry.method != 0 or entry.compressed_size != entry.size:
        raise EmbeddedModelError(
            f"{path}: member {entry.name} is compressed (method {entry.method}); qpack only "
            "maps stored members: rebuild with `qpack build`"
        )
    if entry.header_offset + LOCAL_HEADER.size > file_size:
        raise EmbeddedModelError(
            f"{path}: member {entry.name}'s local header (byte {entry.header_offset}) is past "
            f"the end of the file ({file_size} bytes): the executable is truncated"
        )
    f.seek(entry.header_offset)
    header = f.read(LOCAL_HEADER.size)
    sig, _, _, _, _, _, _, _, _, nlen, elen = LOCAL_HEADER.unpack(header)
    if sig != LOCAL_HEADER_SIG:
        raise EmbeddedModelError(
            f"{path}: no zip local header for {entry.name} at byte {entry.header_offset}: "
            "the executable is corrupt, rebuild it with `qpack build`"
        )
    name = f.read(nlen).decode("utf-8", errors="replace")
    if name != entry.name:
        raise EmbeddedModelError(
            f"{path}: the local header at byte {entry.header_offset} names {name!r}, the "
            f"central directory {entry.name!r}: the executable is corrupt"
        )
    offset = entry.header_offset + LOCAL_HEADER.size + nlen + elen
    if offset + entry.size > file_size:
        raise EmbeddedModelError(
            f"{path}: member {entry.name} ({entry.size} bytes from byte {offset}) runs past "
            f"the end of the file ({file_size} bytes): the executable is truncated"
        )
    return offset


def locate_model(path: str) -> EmbeddedModel | None:
    """The model carried by the executable at `path`, or None when the file ends with no zip.

    Raises EmbeddedModelError when there is a zip but its model member is missing, compressed,
    misaligned or cut short.
    """
    entries = read_zip_directory(path)
    if entries is None:
        return None
    entry = entries.get(MODEL_MEMBER)
    if entry is None and (sibling := _split_sibling(path, entries)) is not None:
        return sibling
    if entry is None:
        raise EmbeddedModelError(
            f"{path}: the executable's zip has no {MODEL_MEMBER} member (it holds "
            f"{', '.join(sorted(entries)) or 'nothing'}); rebuild it with `qpack build`, "
            "or run another model with -m FILE.gguf"
        )
    with open(path, "rb") as f:
        offset = member_data_offset(f, path, entry, os.fstat(f.fileno()).st_size)
    if offset % DATA_ALIGNMENT:
        raise EmbeddedModelError(
            f"{path}: {MODEL_MEMBER}'s data starts at byte {offset}, not on a "
            f"{DATA_ALIGNMENT // 1024} KiB boundary, so it cannot be mapped in place; "
            "rebuild the executable with `qpack build`"
        )
    return EmbeddedModel(path, offset, entry.size, entry.crc32, entries)


def _split_sibling(path: str, entries: dict[str, ZipEntry]) -> EmbeddedModel | None:
    """The model of a `qpack build --split` executable: the GGUF its manifest names, in the
    executable's own directory (None when the manifest names none)."""
    members = EmbeddedModel(path, 0, 0, 0, entries)
    model = members.manifest().get("model")
    if not isinstance(model, dict) or not isinstance(model.get("split_file"), str):
        return None
    name = model["split_file"]
    size, crc = model.get("size"), model.get("crc32")
    if os.path.basename(name) != name or not isinstance(size, int) or not isinstance(crc, int):
        raise EmbeddedModelError(f"{path}: member {MANIFEST_MEMBER} names a bad split model")
    sibling = os.path.join(os.path.dirname(os.path.abspath(path)), name)
    try:
        found = os.stat(sibling).st_size
    except OSError:
        raise EmbeddedModelError(
            f"{sibling}: missing; this executable was built with --split and opens its model "
            f"from that file beside it: copy {name} next to it, or pass -m FILE.gguf"
        ) from None
    if found != size:
        raise EmbeddedModelError(
            f"{sibling}: {found} bytes, the executable was built with {size}: the model file "
            "is not the one it was built with (or is cut short); rebuild with `qpack build --split`"
        )
    return EmbeddedModel(sibling, 0, size, crc, entries, split_from=path)


@functools.lru_cache(maxsize=1)
def own_model() -> EmbeddedModel | None:
    """The model inside the running executable (None for a plain `python -m qpack.runtime`)."""
    path = sys.executable
    if not path or not os.path.isfile(path):
        return None
    model = locate_model(path)
    if model is None and getattr(sys, "frozen", False):
        raise EmbeddedModelError(
            f"{path}: this executable carries no model (no zip at its end); it was built "
            "without one or its end was cut off: rebuild it with `qpack build`, or pass -m FILE.gguf"
        )
    return model


@dataclass(frozen=True)
class VerifyReport:
    size: int
    crc32: int
    sha256: str


def verify(model: EmbeddedModel, progress=None) -> VerifyReport:
    """Read the whole member: its CRC-32 must match the zip and its SHA-256 the manifest.

    `progress(n)` is called with the bytes read so far, if given.
    """
    manifest = model.manifest()
    crc = 0
    digest = hashlib.sha256()
    done = 0
    with open(model.path, "rb") as f:
        f.seek(model.offset)
        while done < model.length:
            chunk = f.read(min(1 << 20, model.length - done))
            if not chunk:
                raise EmbeddedModelError(
                    f"{model.path}: {MODEL_MEMBER} ends early at byte {model.offset + done}"
                )
            crc = zlib.crc32(chunk, crc)
            digest.update(chunk)
            done += len(chunk)
            if progress is not None:
                progress(len(chunk))
    if crc != model.crc32:
        raise EmbeddedModelError(
            f"{model.path}: {MODEL_MEMBER} fails its CRC-32 check (zip says {model.crc32:08x}, "
            f"data gives {crc:08x}): the model bytes are corrupt, rebuild the executable"
        )
    sha = digest.hexdigest()
    expected = manifest.get("model", {}).get("sha256")
    if expected is not None and expected != sha:
        raise EmbeddedModelError(
            f"{model.path}: {MODEL_MEMBER}'s SHA-256 is {sha}, the manifest says {expected}: "
            "the model bytes are corrupt, rebuild the executable"
        )
    return VerifyReport(done, crc, sha)


def merge_args(defaults: list[str], argv: list[str]) -> list[str]:
    """The executable's arguments: `.args` defaults with the command line inserted at the
    `...` line (or after them), so a repeated option on the command line wins."""
    if ARGV_MARKER in defaults:
        at = defaults.index(ARGV_MARKER)
        return defaults[:at] + argv + [a for a in defaults[at + 1 :] if a != ARGV_MARKER]
    return defaults + argv
