"""The copy-and-hash pipeline: the model's bytes into the output, hashed on the way.

The model's bytes go from the source to the output in the kernel (copy_file_range: no trip
through Python's memory, and a reflink where the filesystem has them), on one thread. Two
more threads hash the copied bytes in the output, mapped, while they are still in the page
cache: one the SHA-256, one the CRC-32 (hashlib and zlib release the GIL). So the digests
describe exactly what was written, and the source is read once. The SHA-256 (~1.8 GB/s
with SHA-NI) is the slowest part: with three free cores everything else overlaps with it
(bench/startup.py; on 2 busy vCPUs the parts mostly add up).

The digest threads map the output through descriptors of their own: Windows' mmap seeks the
descriptor it maps, which would move the copy thread's position under its writes.
"""

from __future__ import annotations

import errno
import hashlib
import mmap
import os
import sys
import threading
import zipfile
import zlib
from collections.abc import Callable, Iterator
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from contextlib import contextmanager

import click
from qpack.builder.digests import Digests
from qpack.builder.fileio import write_at
from qpack.builder.sources import ModelSource
from qpack.runtime.embedded import MODEL_MEMBER
from qpack.runtime.errors import QpackError

COPY_CHUNK = 32 << 20  # bytes per copy_file_range call: cancellation and progress granularity
# Bytes per digest update: large enough that a digest thread, which needs the GIL back after
# each, is not held up by the main thread's Python (validating the model meanwhile).
DIGEST_CHUNK = 8 << 20
DIGEST_WINDOW = 64 << 20  # mapped at a time: the digests' memory stays bounded
# copy_file_range errors that mean "not between these files": copy through a buffer instead.
_NO_KERNEL_COPY = {errno.EXDEV, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL, errno.EPERM}


def copy_bytes(
    src: int,
    dst: int,
    src_at: int,
    dst_at: int,
    length: int,
    src_name: str,
    progress: Progress | None = None,
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


def data_extents(fd: int, size: int) -> Iterator[tuple[int, int]]:
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


class Cancelled(Exception):
    """Another part of the copy failed, or the user pressed Ctrl-C: stop."""


class Progress:
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
            raise Cancelled

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

    def feed(self, fd: int, start: int, length: int, progress: Progress, trail_copy: bool) -> None:
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


@contextmanager
def _reopened(path: str) -> Iterator[int]:
    """A read-only descriptor of its own on `path`, for a digest thread to map."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_BINARY", 0))
    try:
        yield fd
    finally:
        os.close(fd)


def copy_model(
    out: int,
    out_path: str,
    data_offset: int,
    source: ModelSource,
    stub: int | None,
    stub_size: int,
    show_progress: bool,
    while_copying: Callable[[], None] | None,
    known: Digests | None,
    known_stub_sha256: str | None,
) -> tuple[Digests, str]:
    """Copy the model into the output `out` (the descriptor of `out_path`) at `data_offset`
    (the file is already that long) while hashing it; returns its digests, and the SHA-256 of the stub `stub` (hashed
    meanwhile; "" without a `stub`). Digests already `known` (remembered from an earlier build) are not computed
    again: the build is then a copy in the kernel."""
    progress = Progress()
    sha = _Digest(hashlib.sha256())
    crc = _Digest(_Crc32())
    stub_sha = _Digest(hashlib.sha256())

    def copy() -> None:
        if source.member is None:
            _copy_plain(source, out, data_offset, progress)
        else:
            _copy_zipped(source, out, data_offset, progress)

    def hash_sha() -> None:
        with _reopened(out_path) as fd:
            sha.feed(fd, data_offset, source.size, progress, trail_copy=True)

    def hash_stub_and_crc() -> None:  # the CRC-32 is fast: this thread has time for the stub
        if known_stub_sha256 is None and stub is not None:
            stub_sha.feed(stub, 0, stub_size, progress, trail_copy=False)
        if known is None:
            with _reopened(out_path) as fd:
                crc.feed(fd, data_offset, source.size, progress, trail_copy=True)

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
                file=sys.stderr if show_progress else NullFile(),
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
    if stub is None:
        return digests, ""
    return digests, known_stub_sha256 or stub_sha.digest.hexdigest()


def file_sha256(fd: int, size: int) -> str:
    """The SHA-256 of a file's first `size` bytes, mapped a window at a time."""
    digest = _Digest(hashlib.sha256())
    digest.feed(fd, 0, size, Progress(), trail_copy=False)
    return digest.digest.hexdigest()


def _copy_plain(source: ModelSource, out: int, data_offset: int, progress: Progress) -> None:
    name = source.describe()
    with open(source.path, "rb", buffering=0) as f:
        before = os.fstat(f.fileno())
        if before.st_size == source.size:
            if hasattr(os, "posix_fadvise"):  # a larger readahead, as cp asks for
                os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_SEQUENTIAL)
            copied = 0
            for start, length in data_extents(f.fileno(), source.size):
                progress.advance(start - copied)  # a hole: nothing to copy
                copy_bytes(f.fileno(), out, start, data_offset + start, length, name, progress)
                copied = start + length
            progress.advance(source.size - copied)
        after = os.fstat(f.fileno())
    if (after.st_size, after.st_mtime_ns) != (source.size, before.st_mtime_ns):
        raise QpackError(
            f"{name}: the file changed or was truncated while it was copied (expected "
            f"{source.size} bytes, now {after.st_size}); build again once it is complete"
        )


def _copy_zipped(source: ModelSource, out: int, data_offset: int, progress: Progress) -> None:
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


class NullFile:
    def write(self, _text: str) -> None:
        pass

    def flush(self) -> None:
        pass

    def isatty(self) -> bool:
        return False
