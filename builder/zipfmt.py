"""The zip records qpack writes: local headers (the model's padded so its data is aligned),
the central directory and the end records (zip64 when an offset or size needs it).

Same inputs give the same bytes: fixed timestamps, fixed member order.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from dataclasses import dataclass

from qpack.runtime.embedded import (
    CENTRAL_HEADER,
    CENTRAL_HEADER_SIG,
    DATA_ALIGNMENT,
    END_RECORD,
    END_RECORD_SIG,
    EXTRA_HEADER,
    LOCAL_HEADER,
    LOCAL_HEADER_SIG,
    ZIP64_END_RECORD,
    ZIP64_END_RECORD_SIG,
    ZIP64_EXTRA_ID,
    ZIP64_LOCATOR,
    ZIP64_LOCATOR_SIG,
)

# Extra-field id of the alignment padding ("qp"; unregistered ids are skipped by every reader).
PADDING_EXTRA_ID = 0x7071
# 1980-01-01 00:00, the earliest DOS date: no build time leaks into the output.
DOS_TIME, DOS_DATE = 0, (0 << 9) | (1 << 5) | 1
ZIP32_LIMIT = 0xFFFFFFFF
UNIX_FILE_MODE = 0o100644 << 16
VERSION_MADE_BY_UNIX = 3 << 8


def padding_field(base: int, zip64_len: int) -> bytes:
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
