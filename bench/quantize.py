"""`qpack quantize` against llama.cpp's quantizer (llama_model_quantize) on the same F16 GGUF,
same thread count, alternating in one run; prints wall-clock seconds and the ratio per type.

    python bench/quantize.py MODEL-F16.gguf [-t 2] [--types Q4_K_M,Q8_0] [--rounds 2]
                             [--imatrix FILE]   (the IQ1/IQ2 types need one; both sides get it)

llama.cpp runs through llama-cpp-python in its own environment (--llama-python, default
/opt/refenv/bin/python); qpack runs in a fresh process of this Python. Each timing is the
whole call, load and write included, output to a temporary directory. Other engineers share
the machine: the load average before and after is printed; compare ratios, not seconds.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile

LLAMA_FTYPES = {
    "Q4_0": 2, "Q4_1": 3, "Q8_0": 7, "Q5_0": 8, "Q5_1": 9, "Q2_K": 10, "Q3_K_S": 11,
    "Q3_K_M": 12, "Q3_K_L": 13, "Q4_K_S": 14, "Q4_K_M": 15, "Q5_K_S": 16, "Q5_K_M": 17,
    "Q6_K": 18, "IQ4_NL": 25, "IQ4_XS": 30, "IQ2_XXS": 19, "IQ2_XS": 20, "IQ3_XS": 22,
    "IQ3_XXS": 23, "IQ1_S": 24, "IQ3_S": 26, "IQ3_M": 27, "IQ2_S": 28, "IQ2_M": 29, "IQ1_M": 31,
}  # fmt: skip

LLAMA_SNIPPET = """
import ctypes, sys, time, llama_cpp
sys.path.insert(0, "tests")
p = llama_cpp.llama_model_quantize_default_params()
p.ftype, p.nthread = int(sys.argv[3]), int(sys.argv[4])
if len(sys.argv) > 5:  # the importance matrix, read as llama-quantize reads it
    import numpy as np
    from f16_models import read_imatrix_values
    values = read_imatrix_values(sys.argv[5])
    entries = (llama_cpp.llama_model_imatrix_data * (len(values) + 1))()
    keep = [np.ascontiguousarray(v, dtype=np.float32) for v in values.values()]
    for e, name, arr in zip(entries, values, keep):
        e.name, e.size = name.encode(), arr.size
        e.data = arr.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
    p.imatrix = entries
t = time.perf_counter()
rc = llama_cpp.llama_model_quantize(sys.argv[1].encode(), sys.argv[2].encode(), ctypes.byref(p))
print(time.perf_counter() - t if rc == 0 else -1)
"""

QPACK_SNIPPET = """
import sys, time
from qpack.builder.imatrix import read_imatrix
from qpack.builder.quantize import quantize_file
t = time.perf_counter()
im = read_imatrix(sys.argv[5]) if len(sys.argv) > 5 else None
quantize_file(sys.argv[1], sys.argv[2], sys.argv[3], threads=int(sys.argv[4]), imatrix=im)
print(time.perf_counter() - t)
"""


def run(cmd: list[str]) -> float:
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.strip()
    seconds = float(out.splitlines()[-1])
    if seconds < 0:
        raise SystemExit(f"failed: {' '.join(cmd)}")
    return seconds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("model")
    ap.add_argument("-t", "--threads", type=int, default=2)
    ap.add_argument("--types", default="Q8_0,Q4_0,Q4_K_M,Q6_K,IQ4_XS")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--llama-python", default="/opt/refenv/bin/python")
    ap.add_argument("--imatrix", help="importance matrix GGUF given to both quantizers")
    args = ap.parse_args()
    print(f"load average before: {os.getloadavg()[0]:.1f} ({os.cpu_count()} CPUs)")
    print(f"{'type':8} {'qpack s':>9} {'llama.cpp s':>12} {'ratio':>7}")
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "out.gguf")
        for t in args.types.split(","):
            ours, theirs = [], []
            im = [args.imatrix] if args.imatrix else []
            for _ in range(args.rounds):
                theirs.append(run([args.llama_python, "-c", LLAMA_SNIPPET, args.model, out, str(LLAMA_FTYPES[t]), str(args.threads), *im]))  # fmt: skip
                ours.append(run([sys.executable, "-c", QPACK_SNIPPET, args.model, out, t, str(args.threads), *im]))  # fmt: skip
            a, b = statistics.median(ours), statistics.median(theirs)
            print(f"{t:8} {a:9.2f} {b:12.2f} {a / b:7.2f}", flush=True)
    print(f"load average after: {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
