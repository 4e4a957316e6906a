"""Where the model bytes come from: a plain .gguf, or a .zip holding one (Deflate, Deflate64
or stored), and the executable's default name from the file's."""

from __future__ import annotations

import functools
import io
import os
import re
import struct
import zipfile
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from qpack.runtime.errors import QpackError

DEFLATE64 = 9  # zip method number
LOCAL_HEADER = struct.Struct("<IHHHHHIIIHH")
READ_CHUNK = 64 << 10  # compressed bytes per inflate: at most ~64 MiB out


@functools.cache
def deflate64_reader() -> str:
    """Which library reads Deflate64 members here: zipfile-deflate64 (it patches zipfile)
    where it is installed, which pyproject.toml limits to where it has wheels (cp310 on
    x86-64 Linux and Windows: none past cp310, and its sdist does not build with Xcode >=
    16.3); else inflate64 (wheels everywhere) through Deflate64Member."""
    try:
        import zipfile_deflate64  # noqa: F401
    except ImportError:
        return "inflate64"
    return "zipfile-deflate64"


class Deflate64Member(io.RawIOBase):
    """A Deflate64 zip member, decompressed by inflate64 as it is read; its CRC-32 and size
    are checked at the end, as zipfile does (zipfile.BadZipFile when they do not match)."""

    def __init__(self, path: Path, info: zipfile.ZipInfo) -> None:
        import inflate64

        self._file = open(path, "rb")
        self._file.seek(info.header_offset)
        head = self._file.read(LOCAL_HEADER.size)
        if len(head) != LOCAL_HEADER.size or head[:4] != b"PK\x03\x04":
            self._file.close()
            raise zipfile.BadZipFile(f"bad local header for member {info.filename}")
        name_len, extra_len = LOCAL_HEADER.unpack(head)[-2:]
        self._file.seek(name_len + extra_len, os.SEEK_CUR)
        self._info = info
        self._left = info.compress_size  # compressed bytes not yet read
        self._inflater = inflate64.Inflater()
        self._pending = b""
        self._crc = 0
        self._size = 0

    def readable(self) -> bool:
        return True

    def read(self, n: int = -1) -> bytes:
        if n is None or n < 0:
            n = 1 << 62
        parts, have = [], 0
        while have < n and (self._pending or self._left > 0):
            if not self._pending:
                chunk = self._file.read(min(READ_CHUNK, self._left))
                if not chunk:
                    raise EOFError(f"member {self._info.filename} is cut short")
                self._left -= len(chunk)
                self._pending = self._inflater.inflate(chunk)
            part, self._pending = self._pending[: n - have], self._pending[n - have :]
            parts.append(part)
            have += len(part)
        out = b"".join(parts)
        self._crc = zlib.crc32(out, self._crc)
        self._size += len(out)
        if not out and (self._size, self._crc) != (self._info.file_size, self._info.CRC):
            raise zipfile.BadZipFile(f"Bad CRC-32 or size for file {self._info.filename!r}")
        return out

    def close(self) -> None:
        self._file.close()
        super().close()


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
            return
        with zipfile.ZipFile(self.path) as zf:
            info = zf.getinfo(self.member)
            if info.compress_type == DEFLATE64 and deflate64_reader() == "inflate64":
                with Deflate64Member(self.path, info) as f:
                    yield f
            else:
                with zf.open(info) as f:
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
    deflate64_reader()  # teaches zipfile the Deflate64 method, where zipfile-deflate64 installs
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
    if info.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED, DEFLATE64):
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
