"""Read the weights through 2 MiB pages where the kernel can (Linux).

Decode streams every weight once per token, and with 4 KiB pages the TLB misses cost a fifth
of it (1B Q4_K_M, 2 threads: 35.6 tok/s from a page cache in small folios, 45 through 2 MiB
pages; bench/README.md). Linux 6.x maps a file with 2 MiB pages when its page cache holds
2 MiB folios, and with MADV_HUGEPAGE a read from disk creates such folios. A file already
cached in small folios (written by a copy, or read without the advice) stays so until
evicted: we then drop the model's clean cached pages once, so that they come back as 2 MiB
folios on first use (a one-time re-read from disk), but only after trying it on 2 MiB of the
file, so that a filesystem without large folios is never evicted for nothing. Five pages
spread over the file are probed: part of a file can be cached small while the rest is not.
The bytes are unchanged: only how the kernel caches and maps them.
"""

from __future__ import annotations

import mmap
import os
import sys

import numpy as np

PMD = 2 << 20


def mapped_huge_bytes(address: int) -> int:
    """Bytes of the mapping starting at `address` that the process maps with 2 MiB pages."""
    inside = False
    with open("/proc/self/smaps", encoding="ascii", errors="replace") as f:
        for line in f:
            head = line.split(" ", 1)[0]
            if not head.endswith(":"):  # "start-end perms offset ...": the next mapping
                inside = int(head.split("-")[0], 16) == address
            elif inside and head == "FilePmdMapped:":
                return int(line.split()[1]) * 1024
    return 0


def _touch(view: np.ndarray, offset: int) -> None:
    int(view[offset])  # a read fault maps the page (and reads it in if it is not cached)


def prefer_huge_pages_for(gguf) -> str:
    """prefer_huge_pages for a GGUFFile from open_gguf ("unsupported" for one in memory)."""
    if getattr(gguf, "mapping", None) is None:
        return "unsupported"
    return prefer_huge_pages(gguf.mapping[0], gguf.path, gguf.mapping[1])


def prefer_huge_pages(mm: mmap.mmap, path: str, map_offset: int) -> str:
    """Advise 2 MiB pages for `mm` (mapping `path` from file offset `map_offset`) and, if the
    cache holds the file in small folios, evict it once. Returns what it found or did, for
    --verbose: "unsupported", "huge", "evicted" (2 MiB pages from now on) or "small"."""
    if not sys.platform.startswith("linux") or not hasattr(mmap, "MADV_HUGEPAGE"):
        return "unsupported"
    size = len(mm)
    # up to five whole 2 MiB pages of the file, spread over the mapping (part of a file can be
    # cached small while the rest is not)
    first = (map_offset + PMD - 1) // PMD * PMD - map_offset
    if first + PMD > size:
        return "unsupported"  # smaller than a huge page: nothing to gain
    last = (map_offset + size) // PMD * PMD - PMD - map_offset
    probes = sorted({first + (last - first) * k // 4 // PMD * PMD for k in range(5)})
    try:
        mm.madvise(mmap.MADV_HUGEPAGE)
    except OSError:
        return "unsupported"  # THP disabled ("never") or not built in
    view = np.frombuffer(mm, dtype=np.uint8)
    address = view.ctypes.data
    small = None
    for n, probe in enumerate(probes, 1):
        for _ in range(2):  # a fault that reads the page in may map it small: fault it again
            _touch(view, probe)
            if mapped_huge_bytes(address) >= n * PMD:
                break
            mm.madvise(mmap.MADV_DONTNEED, probe, PMD)
        else:
            small = probe
            break
    if small is None:
        return "huge"
    fd = os.open(path, os.O_RDONLY)
    try:
        # try on that page alone: drop it from the cache, fault it again (the whole mapping
        # unmapped first, so that the huge probes before it do not count)
        mm.madvise(mmap.MADV_DONTNEED)
        os.posix_fadvise(fd, map_offset + small, PMD, os.POSIX_FADV_DONTNEED)
        _touch(view, small)
        if mapped_huge_bytes(address) < PMD:
            return "small"  # no large folios here (filesystem, or pages mapped elsewhere)
        mm.madvise(mmap.MADV_DONTNEED)
        # from the huge page the mapping starts in: small folios cached before the mapping
        # would make the first read-ahead there, which spans two huge pages, small too
        start = map_offset // PMD * PMD
        os.posix_fadvise(fd, start, map_offset + size - start, os.POSIX_FADV_DONTNEED)
        return "evicted"
    finally:
        os.close(fd)
