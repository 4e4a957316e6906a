"""Remembered digests of input files, so that building the same model again is just a copy.

The SHA-256 of a model (for the manifest) runs at ~1.7 GB/s on one core with SHA-NI: on its own
2.5x the time `cp` takes for the same file with a warm page cache. The digests of a file that
has not changed are looked up instead, as git's index and rsync's quick check do. A file counts
as unchanged while its device, inode, size, mtime and change time are; the change time (POSIX
ctime, NTFS ChangeTime) moves on every write and no tool can set it back, so an edit that
restores the mtime still invalidates the entry.
`qpack build` copies the cached model bytes in the kernel; `./model.bin --verify` re-reads the
embedded copy against these digests.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

CACHE_FILE = "digests.json"
MAX_ENTRIES = 256  # a few KiB: the oldest entries go first


@dataclass(frozen=True)
class Digests:
    sha256: str  # hex
    crc32: int


def file_key(path: str | os.PathLike, st: os.stat_result, member: str | None = None) -> str:
    """What identifies one version of a file (and, for a zip, one member of it)."""
    key = f"{st.st_dev}:{st.st_ino}:{st.st_size}:{st.st_mtime_ns}:{change_time_ns(path, st)}"
    return key if member is None else f"{key}:{member}"


def change_time_ns(path: str | os.PathLike, st: os.stat_result) -> int:
    """When the file's data or metadata last changed (what no tool can set back). POSIX: the
    ctime. Windows: os.stat's st_ctime is the *creation* time there, which a rewrite in place
    keeps, so the NTFS ChangeTime is read from the file itself (FILE_BASIC_INFO)."""
    if sys.platform != "win32":
        return st.st_ctime_ns
    return _windows_change_time(path)


def _windows_change_time(path: str | os.PathLike) -> int:
    import ctypes
    from ctypes import wintypes

    class FileBasicInfo(ctypes.Structure):
        _fields_ = [
            ("CreationTime", ctypes.c_int64),
            ("LastAccessTime", ctypes.c_int64),
            ("LastWriteTime", ctypes.c_int64),
            ("ChangeTime", ctypes.c_int64),
            ("FileAttributes", wintypes.DWORD),
        ]

    kernel32 = ctypes.WinDLL("kernel32", use_last_error=True)
    get_info = kernel32.GetFileInformationByHandleEx
    get_info.argtypes = [wintypes.HANDLE, ctypes.c_int, ctypes.c_void_p, wintypes.DWORD]
    get_info.restype = wintypes.BOOL
    import msvcrt

    info = FileBasicInfo()
    with open(path, "rb") as f:
        handle = msvcrt.get_osfhandle(f.fileno())
        if not get_info(handle, 0, ctypes.byref(info), ctypes.sizeof(info)):  # 0: FileBasicInfo
            raise ctypes.WinError(ctypes.get_last_error())
    return info.ChangeTime * 100  # 100 ns units


class DigestCache:
    """A small JSON file of file key -> digests in the qpack cache directory. Reads and writes
    never fail a build: an unreadable or corrupt cache is treated as empty, a write that fails
    is skipped."""

    def __init__(self, directory: Path) -> None:
        self.path = directory / CACHE_FILE

    def _load(self) -> dict[str, dict]:
        try:
            entries = json.loads(self.path.read_text())
        except (OSError, ValueError):
            return {}
        return entries if isinstance(entries, dict) else {}

    def get(self, key: str) -> Digests | None:
        entry = self._load().get(key)
        try:
            sha, crc = entry["sha256"], entry["crc32"]
        except (TypeError, KeyError):
            return None
        valid = isinstance(sha, str) and len(sha) == 64 and isinstance(crc, int)
        return Digests(sha, crc) if valid and 0 <= crc <= 0xFFFFFFFF else None

    def put(self, new: dict[str, Digests]) -> None:
        """Remember `new` (file key -> digests) in one read and one write of the file."""
        entries = self._load()
        for key, digests in new.items():
            entries.pop(key, None)
            entries[key] = {"sha256": digests.sha256, "crc32": digests.crc32}  # newest last
        entries = dict(list(entries.items())[-MAX_ENTRIES:])
        partial = None
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd, partial = tempfile.mkstemp(prefix=f".{CACHE_FILE}.", dir=self.path.parent)
            with os.fdopen(fd, "w") as f:
                json.dump(entries, f)
            os.replace(partial, self.path)  # concurrent builds: the last writer wins, whole
        except OSError:
            if partial is not None:
                Path(partial).unlink(missing_ok=True)
