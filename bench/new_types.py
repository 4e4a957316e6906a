"""Decode speed of the IQ, ternary and MXFP4 types: qpack against llama.cpp, same model, same
threads, in one run.

    python bench/new_types.py [--types IQ2_XXS,MXFP4] [-t 2] [--tokens 32] [--rounds 2]

Per type, a synthetic llama model (2048 wide, FFN 5632, 4 layers: ~200 M weights, every matrix
in that type, larger than any cache) is written once into --dir by the llama-cpp-python
environment (--llama-python): one 64-row chunk of random weights quantized by llama.cpp's
ggml_quantize_chunk (all-ones importance matrix, as tests/reference/make_quant_type_refs.py),
tiled over every matrix; speed does not depend on the values. Then, in alternating fresh
processes, each engine decodes --tokens single tokens from position 0 (after a warm-up) and
the best round counts. GB/s = weight bytes read per token (every matrix but the embedding
table, which is read one row at a time) x tokens/s. Printed with the ratio qpack/llama.cpp,
the load average before and after: other engineers share this machine.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
TYPES = ["IQ1_S", "IQ1_M", "IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ3_XXS", "IQ3_S", "TQ1_0", "TQ2_0", "MXFP4"]  # fmt: skip
SHAPE = {"n_layers": 4, "n_embd": 2048, "n_ff": 5632, "n_heads": 16, "n_kv_heads": 4}


def make_models(out: Path, types: list[str]) -> None:
    """Runs in the llama-cpp-python environment."""
    import numpy as np

    sys.path[:0] = [str(HERE.parent / "tests"), str(HERE.parent / "tests" / "reference")]
    from make_quant_type_refs import llama_cpp_quantize
    from tiny_models import tiny_model

    rng = np.random.default_rng(0)
    chunks: dict[tuple[str, int], np.ndarray] = {}

    def tiled(matrix: np.ndarray, type_name: str) -> np.ndarray:
        """A chunk of 64 quantized rows of this width, repeated to the matrix's shape."""
        rows, cols = matrix.shape
        if (type_name, cols) not in chunks:
            seed = (rng.standard_normal((64, cols)) * 0.05).astype(np.float32)
            chunks[type_name, cols] = llama_cpp_quantize(seed, type_name)
        reps = -(-rows // 64)
        return np.ascontiguousarray(np.tile(chunks[type_name, cols], (reps, 1))[:rows])

    for name in types:
        path = out / f"{name}.gguf"
        if path.exists():
            continue
        tiny_model(path.with_suffix(".tmp"), "llama", name, quantize=tiled, **SHAPE)
        path.with_suffix(".tmp").rename(path)


def qpack_worker(model: str, threads: int, tokens: int) -> tuple[float, float]:
    from qpack.runtime import cpu
    from qpack.runtime.gguf import open_gguf
    from qpack.runtime.model import Model

    m = Model(
        open_gguf(model), n_ctx=tokens + 8, n_batch=8, threads=threads, kernels=cpu.load("auto")
    )
    for i in range(4):  # warm-up: the mapping's pages, the threads
        m.forward([5 + i], [i], [0], [0])
    t0, c0 = time.perf_counter(), time.process_time()
    for i in range(tokens):
        m.forward([5 + i % 200], [i], [0], [0])
    return tokens / (time.perf_counter() - t0), tokens / (time.process_time() - c0)


def llama_worker(model: str, threads: int, tokens: int) -> tuple[float, float]:
    import llama_cpp as L

    L.llama_backend_init()
    lm = L.llama_model_load_from_file(model.encode(), L.llama_model_default_params())
    cp = L.llama_context_default_params()
    cp.n_ctx, cp.n_batch, cp.n_ubatch = tokens + 8, 8, 8
    cp.n_threads = cp.n_threads_batch = threads
    ctx = L.llama_init_from_model(lm, cp)
    mem = L.llama_get_memory(ctx)

    def decode(tok: int) -> None:
        arr = (L.llama_token * 1)(tok)
        if L.llama_decode(ctx, L.llama_batch_get_one(arr, 1)) != 0:
            raise RuntimeError("llama_decode failed")
        L.llama_synchronize(ctx)

    for i in range(4):
        decode(5 + i)
    L.llama_memory_clear(mem, True)
    t0, c0 = time.perf_counter(), time.process_time()
    for i in range(tokens):
        decode(5 + i % 200)
    return tokens / (time.perf_counter() - t0), tokens / (time.process_time() - c0)


def weight_bytes_per_token(model: str) -> int:
    from qpack.runtime.gguf import open_gguf

    g = open_gguf(model)
    return sum(
        t.nbytes for n, t in g.tensors.items() if len(t.shape) == 2 and n != "token_embd.weight"
    )


def run(python: str, kind: str, model: Path, a: argparse.Namespace) -> tuple[float, float]:
    cmd = [
        python,
        __file__,
        "--worker",
        kind,
        "-t",
        str(a.threads),
        "--tokens",
        str(a.tokens),
        str(model),
    ]
    p = subprocess.run(
        cmd, capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS=str(a.threads))
    )
    if p.returncode != 0:
        raise SystemExit(f"{kind} worker failed on {model}:\n{p.stderr[-2000:]}")
    wall, per_cpu = p.stdout.strip().splitlines()[-1].split()
    return float(wall), float(per_cpu)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--types", default=",".join(TYPES))
    ap.add_argument("-t", "--threads", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--dir", default="/tmp/qpack-bench-new-types")
    ap.add_argument("--llama-python", default="/opt/refenv/bin/python")
    ap.add_argument("--worker", choices=["qpack", "llama"])
    ap.add_argument("--make", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("model", nargs="?")
    a = ap.parse_args()
    types = a.types.split(",")
    if a.make:
        make_models(Path(a.dir), types)
        return
    if a.worker:
        fn = qpack_worker if a.worker == "qpack" else llama_worker
        print(*fn(a.model, a.threads, a.tokens))
        return

    out = Path(a.dir)
    out.mkdir(parents=True, exist_ok=True)
    subprocess.run(
        [a.llama_python, __file__, "--make", "--dir", str(out), "--types", a.types], check=True
    )
    load_before = os.getloadavg()[0]
    print(
        f"decode, {a.threads} threads, {a.tokens} tokens from position 0, best of {a.rounds} rounds"
    )
    print("tok/s: wall clock (best round); cpu: tokens per CPU-second of the process, which the")
    print("other users of the machine disturb less (with -t 1; threads that spin count in it)")
    head = (
        "type",
        "MB/token",
        "qpack tok/s",
        "GB/s",
        "cpu",
        "llama tok/s",
        "GB/s",
        "cpu",
        "ratio",
        "cpu ratio",
    )
    print("{:8} {:>9} {:>11} {:>6} {:>6} {:>11} {:>6} {:>6} {:>6} {:>9}".format(*head))
    for name in types:
        model = out / f"{name}.gguf"
        mb = weight_bytes_per_token(str(model)) / 1e6
        ours, theirs = (0.0, 0.0), (0.0, 0.0)
        for _ in range(a.rounds):
            l_wall, l_cpu = run(a.llama_python, "llama", model, a)
            q_wall, q_cpu = run(sys.executable, "qpack", model, a)
            theirs = (max(theirs[0], l_wall), max(theirs[1], l_cpu))
            ours = (max(ours[0], q_wall), max(ours[1], q_cpu))
        print(f"{name:8} {mb:9.1f} {ours[0]:11.2f} {ours[0] * mb / 1e3:6.2f} {ours[1]:6.1f} "
              f"{theirs[0]:11.2f} {theirs[0] * mb / 1e3:6.2f} {theirs[1]:6.1f} "
              f"{ours[0] / theirs[0]:6.2f} {ours[1] / theirs[1]:9.2f}")  # fmt: skip
    print(f"load average (1 min) before {load_before:.2f}, after {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
