"""Memory read bandwidth of this machine, and decode speed as a fraction of what it allows.

    python bench/membw.py [-t THREADS] [--gib 1] [--runs 5]

A tiny C loop (compiled once with the system's cc into ~/.cache/qpack/membw/, loaded with
ctypes, which releases the GIL) sums 64-bit words of a buffer of --gib GiB; with N threads each
thread reads its own buffer, all at once, and the bandwidth is the total bytes over the slowest
thread's time. Buffers are 2 MiB aligned and advised as huge pages (the best case a reader can
get), touched before timing. Best of --runs. Printed for 1 thread and for N.

Decode has to read every weight once per token, so `bandwidth / bytes per token` is the speed
limit of a model on this machine; `decode_limit` gives it to bench/compare.py. Bytes per token
are all the tensors' bytes but the token embedding's (one row of it is read per token), the
output head counted: with a tied embedding the table is read whole as the head.
"""

from __future__ import annotations

import argparse
import ctypes
import hashlib
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

C_SOURCE = r"""
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>

void *membw_alloc(size_t n) {
    void *p = NULL;
    if (posix_memalign(&p, 2u << 20, n)) return NULL;
#ifdef MADV_HUGEPAGE
    madvise(p, n, MADV_HUGEPAGE);
#endif
    memset(p, 1, n);
    return p;
}

void membw_free(void *p) { free(p); }

/* Eight independent sums so that the compiler vectorizes and no add chain limits the loads. */
uint64_t membw_read(const uint64_t *p, size_t n_words) {
    uint64_t s[8] = {0};
    for (size_t i = 0; i + 8 <= n_words; i += 8)
        for (int k = 0; k < 8; k++) s[k] += p[i + k];
    return s[0] + s[1] + s[2] + s[3] + s[4] + s[5] + s[6] + s[7];
}
"""
CACHE = Path(os.path.expanduser("~/.cache/qpack/membw"))


def _library() -> ctypes.CDLL:
    tag = hashlib.sha256(C_SOURCE.encode()).hexdigest()[:12]
    so = CACHE / f"membw-{tag}.so"
    if not so.exists():
        CACHE.mkdir(parents=True, exist_ok=True)
        src = CACHE / f"membw-{tag}.c"
        src.write_text(C_SOURCE)
        tmp = so.with_suffix(f".{os.getpid()}.tmp")
        cmd = ["cc", "-O3", "-march=native", "-shared", "-fPIC", str(src), "-o", str(tmp)]
        subprocess.run(cmd, check=True)
        os.replace(tmp, so)
    lib = ctypes.CDLL(str(so))
    lib.membw_alloc.restype = ctypes.c_void_p
    lib.membw_alloc.argtypes = [ctypes.c_size_t]
    lib.membw_free.argtypes = [ctypes.c_void_p]
    lib.membw_read.restype = ctypes.c_uint64
    lib.membw_read.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    return lib


def _timed_read(lib, buf: int, n: int, start: threading.Barrier, times: list, i: int) -> None:
    start.wait()
    t0 = time.perf_counter()
    lib.membw_read(buf, n // 8)
    times[i] = time.perf_counter() - t0


def read_bandwidth(threads: int = 1, gib: float = 1.0, runs: int = 10) -> float:
    """Best GB/s (1e9 bytes) of `threads` threads reading their own buffers concurrently."""
    lib = _library()
    n = int(gib * (1 << 30)) // 64 * 64
    bufs = [lib.membw_alloc(n) for _ in range(threads)]
    try:
        if not all(bufs):
            raise MemoryError(f"cannot allocate {threads} x {gib} GiB")
        best = 0.0
        for _ in range(runs):
            times = [0.0] * threads
            start = threading.Barrier(threads)
            workers = [
                threading.Thread(target=_timed_read, args=(lib, bufs[i], n, start, times, i))
                for i in range(threads)
            ]
            for w in workers:
                w.start()
            for w in workers:
                w.join()
            best = max(best, threads * n / max(times) / 1e9)
        return best
    finally:
        for b in bufs:
            if b:
                lib.membw_free(b)


def measure_in_subprocess(threads: int) -> dict[int, float]:
    """{1: GB/s, threads: GB/s} measured by a child process: the buffers must not raise the
    caller's peak RSS, which the children it starts later inherit (ru_maxrss survives fork and
    exec on Linux)."""
    cmd = [sys.executable, os.path.abspath(__file__), "-t", str(threads), "--json"]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return {int(k): v for k, v in json.loads(out.splitlines()[-1]).items()}


def bytes_per_token(model_path: str) -> int:
    """Weight bytes a decode step reads: every tensor but the embedding table when the model
    has its own output head (then only a row of the table is read)."""
    from qpack.runtime.gguf import open_gguf

    tensors = open_gguf(model_path).tensors
    total = sum(t.nbytes for t in tensors.values())
    if "output.weight" in tensors and "token_embd.weight" in tensors:
        total -= tensors["token_embd.weight"].nbytes
    return total


def decode_limit(model_path: str, bandwidth_gbs: float) -> tuple[float, int]:
    """(tokens/s this bandwidth allows for this model, bytes read per token)."""
    per_token = bytes_per_token(model_path)
    return bandwidth_gbs * 1e9 / per_token, per_token


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("-t", "--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--gib", type=float, default=1.0, help="buffer per thread")
    ap.add_argument("--runs", type=int, default=10)
    ap.add_argument("--json", action="store_true", help="print {threads: GB/s} only")
    ap.add_argument("models", nargs="*", help="GGUF files: also print their decode limits")
    a = ap.parse_args()
    one = read_bandwidth(1, a.gib, a.runs)
    many = read_bandwidth(a.threads, a.gib, a.runs) if a.threads > 1 else one
    if a.json:
        print(json.dumps({1: one, a.threads: many}))
        return
    load = os.getloadavg()[0]
    print(f"read bandwidth: {one:.1f} GB/s with 1 thread, {many:.1f} GB/s with {a.threads} "
          f"threads ({a.gib:g} GiB each, best of {a.runs}; load average {load:.2f})")  # fmt: skip
    for m in a.models:
        limit, per_token = decode_limit(m, many)
        print(f"{os.path.basename(m)}: {per_token / 1e9:.3f} GB per token, decode limit {limit:.1f} tok/s")  # fmt: skip


if __name__ == "__main__":
    main()
