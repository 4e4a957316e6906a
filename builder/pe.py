"""The PE layout (Windows): the model goes in the overlay, before PyInstaller's archive.

PyInstaller appends its archive to a PE stub as overlay data after the image; inserting there
needs no header change, only the image checksum. Windows refuses to load a PE file over 4 GiB
(the loader maps the whole file's view with 32-bit sizes): PE_SIZE_LIMIT, checked by the packer.
"""

from __future__ import annotations

import os
import struct
from typing import BinaryIO

from qpack.builder.layout import StubLayout
from qpack.runtime.errors import QpackError

# The largest file Windows runs ("not a valid Win32 application" beyond it).
PE_SIZE_LIMIT = (4 << 30) - 1
CHECKSUM_CHUNK = 32 << 20  # even: 16-bit words never straddle two chunks


def plan_pe(stub: bytes, stub_name: str) -> StubLayout:
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


def pe_checksum(f: BinaryIO, checksum_at: int) -> int:
    """The PE image checksum (as imagehlp's CheckSumMappedFile) of the whole file."""
    import numpy as np

    f.seek(0, os.SEEK_END)
    length = f.tell()
    f.seek(0)
    total = 0
    pos = 0
    while True:
        chunk = bytearray(f.read(CHECKSUM_CHUNK))
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
