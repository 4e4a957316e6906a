"""runtime/hugepages.py: the weights' file cached and mapped in 2 MiB pages where Linux can,
evicting a copy cached in small folios once, never changing a byte."""

from __future__ import annotations

import hashlib
import mmap
import os
import sys
from pathlib import Path

import numpy as np
import pytest
from gguf_fixtures import tiny_llama
from qpack.runtime import hugepages
from qpack.runtime.gguf import GGUFFile, open_gguf

THP = Path("/sys/kernel/mm/transparent_hugepage/enabled")
linux_thp = pytest.mark.skipif(
    not sys.platform.startswith("linux") or not THP.exists() or "[never]" in THP.read_text(),
    reason="transparent huge pages are a Linux feature, here disabled or absent",
)


def write_small_folios(path, size: int, prefix: int = 0) -> bytes:
    """A file written 4 KiB at a time and synced: cached clean, in small folios."""
    rng = np.random.default_rng(1)
    data = rng.integers(0, 256, size, dtype=np.uint8).tobytes()
    with open(path, "wb") as f:
        f.write(b"\0" * prefix)
        for i in range(0, size, 4096):
            f.write(data[i : i + 4096])
        f.flush()
        os.fsync(f.fileno())
    return data


def huge_after_touching(mm: mmap.mmap) -> int:
    view = np.frombuffer(mm, dtype=np.uint8)
    int(view[::4096].sum())  # fault every page in
    return hugepages.mapped_huge_bytes(view.ctypes.data)


def large_folios_here(tmp_path) -> bool:
    """Whether a file here, read cold through an advised mapping, comes in 2 MiB pages."""
    path = tmp_path / "probe.bin"
    write_small_folios(path, 4 << 20)
    with open(path, "rb") as f:
        os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
        mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    mm.madvise(mmap.MADV_HUGEPAGE)
    return huge_after_touching(mm) > 0


@linux_thp
@pytest.mark.parametrize("prefix", [0, 3 * 65536])  # a GGUF alone, or a member of an executable
def test_small_folios_are_evicted_once_then_mapped_huge(tmp_path, prefix):
    path = tmp_path / "weights.bin"
    data = write_small_folios(path, 8 << 20, prefix)
    results = []
    for _ in range(2):
        with open(path, "rb") as f:
            start = prefix - prefix % mmap.ALLOCATIONGRANULARITY
            mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ, offset=start)
        results.append(hugepages.prefer_huge_pages(mm, str(path), start))
        huge = huge_after_touching(mm)
        assert mm[prefix - start :] == data  # the same bytes, whatever the pages
        del mm
    # where the filesystem has large folios: evicted once, then 2 MiB pages over the whole
    # 2 MiB-aligned inside of the file; elsewhere nothing is evicted, ever
    if large_folios_here(tmp_path):
        assert results == ["evicted", "huge"]
        assert huge >= (8 << 20) - 2 * hugepages.PMD
    else:
        assert results == ["small", "small"]


@linux_thp
def test_gguf_mapping_from_open_gguf(tmp_path):
    path = tmp_path / "tiny.gguf"
    tiny_llama(path)
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    gf = open_gguf(path)
    mm, offset = gf.mapping
    assert offset == 0 and len(mm) == path.stat().st_size
    # a file smaller than one huge page gains nothing: left alone
    assert hugepages.prefer_huge_pages_for(gf) == "unsupported"
    assert hashlib.sha256(path.read_bytes()).hexdigest() == digest


def test_in_memory_gguf_is_left_alone(tmp_path):
    path = tmp_path / "tiny.gguf"
    tiny_llama(path)
    gf = GGUFFile.from_buffer(path.read_bytes())
    assert gf.mapping is None
    assert hugepages.prefer_huge_pages_for(gf) == "unsupported"


def test_mapped_huge_bytes_of_an_address_not_mapped():
    assert hugepages.mapped_huge_bytes(1) == 0
