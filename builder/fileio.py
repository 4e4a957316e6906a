"""Positioned reads and writes on raw file descriptors, for the packer and the Mach-O signer
(os.pread/os.pwrite are missing on Windows; short reads and writes are retried)."""

from __future__ import annotations

import os


def write_at(fd: int, data: bytes, position: int) -> None:
    view = memoryview(data)
    os.lseek(fd, position, os.SEEK_SET)
    while view:
        view = view[os.write(fd, view) :]


def read_at(fd: int, length: int, position: int) -> bytes:
    """Up to `length` bytes from `position` (fewer only at the end of the file)."""
    os.lseek(fd, position, os.SEEK_SET)
    chunks = []
    while length > 0 and (chunk := os.read(fd, length)):
        chunks.append(chunk)
        length -= len(chunk)
    return b"".join(chunks)
