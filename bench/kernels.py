"""Single-thread matvec throughput of the quant kernels, per CPU variant.

Prints GB/s of weight bytes streamed by `matvec` (decode is memory-bound, so bytes/s is the
figure that matters) at SmolLM2-135M's shapes: 576x1536 (ffn_down, fits in L2) and
49152x576 (the tied output head, ~30 MB for Q8_0: L3 / DRAM); the 256-element K-quants and
IQ4_XS at Gemma 3 270M's ffn_down, 640x2048, and at 24576x2048 (past L3). The peers are numpy:
gguf's dequantize followed by a dot, and a plain f32 matvec on weights dequantized beforehand.

    python bench/kernels.py [--types Q4_0,Q8_0] [--repeat 20]
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # one thread everywhere, like the kernels

import numpy as np  # noqa: E402
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType  # noqa: E402
from gguf import quants as gq  # noqa: E402
from qpack.runtime import cpu  # noqa: E402

SHAPES = ((576, 1536), (49152, 576))
# Super-block types (256 elements) need longer rows: Gemma 3 270M's ffn_down (640x2048, in L2)
# and a matrix larger than the L3 cache.
K_SHAPES = ((640, 2048), (24576, 2048))
SCALE_FIELDS = {
    "Q4_0": (0,), "Q4_1": (0, 2), "Q5_0": (0,), "Q5_1": (0, 2), "Q8_0": (0,),
    "Q2_K": (80, 82), "Q3_K": (108,), "Q4_K": (0, 2), "Q5_K": (0, 2), "Q6_K": (208,),
    "IQ4_NL": (0,), "IQ4_XS": (0,),
}  # fmt: skip


def cases(names: list[str]) -> list[tuple[int, int, str]]:
    """(rows, cols, type) to measure, shape by shape; 256-element types at K_SHAPES."""
    out = []
    for shapes, super_blocks in ((SHAPES, False), (K_SHAPES, True)):
        for rows, cols in shapes:
            for name in names:
                if (GGML_QUANT_SIZES[GGMLQuantizationType[name]][0] == 256) == super_blocks:
                    out.append((rows, cols, name))
    return out


def random_weights(name: str, rows: int, cols: int, rng: np.random.Generator) -> np.ndarray:
    """Random blocks with sane f16 scales: the kernels' speed does not depend on the values."""
    block_elems, block_bytes = GGML_QUANT_SIZES[GGMLQuantizationType[name]]
    nb = rows * cols // block_elems
    raw = rng.integers(0, 256, size=(nb, block_bytes), dtype=np.uint8)
    for off in SCALE_FIELDS[name]:
        raw[:, off : off + 2] = rng.uniform(1e-3, 1e-2, (nb, 1)).astype(np.float16).view(np.uint8)
    return raw.reshape(rows, -1)


def best_time(repeat: int, fn, *args) -> float:
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn(*args)
        best = min(best, time.perf_counter() - t0)
    return best


def numpy_dequant_dot(w: np.ndarray, qt: GGMLQuantizationType, x: np.ndarray) -> np.ndarray:
    return gq.dequantize(w, qt).reshape(w.shape[0], -1) @ x


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--types", default="Q4_0,Q4_1,Q5_0,Q8_0,Q4_K,Q6_K")
    parser.add_argument("--repeat", type=int, default=20)
    parser.add_argument("--no-numpy", action="store_true", help="skip the numpy peers")
    args = parser.parse_args()

    variants = cpu.supported_variants()
    rng = np.random.default_rng(0)
    header = f"{'type':<6}{'shape':>12}" + "".join(f"{v:>10}" for v in variants)
    if not args.no_numpy:
        header += f"{'np deq+dot':>12}{'np f32':>9}"
    print("GB/s of quantized weights streamed by one-thread matvec (best of", args.repeat, "runs)")
    print(header)
    for rows, cols, name in cases(args.types.split(",")):
        qt = GGMLQuantizationType[name]
        w = random_weights(name, rows, cols, rng)
        x = rng.standard_normal(cols).astype(np.float32)
        line = f"{name:<6}{f'{rows}x{cols}':>12}"
        for v in variants:
            mod = cpu._import(v)
            mod.matvec(qt, w, x)  # warm the caches and the page tables
            reps = args.repeat if v != "generic" else max(3, args.repeat // 5)
            line += f"{w.nbytes / best_time(reps, mod.matvec, qt, w, x) / 1e9:>10.2f}"
        if not args.no_numpy:
            reps = max(2, args.repeat // 10)
            t = best_time(reps, numpy_dequant_dot, w, qt, x)
            wf = gq.dequantize(w, qt).reshape(rows, cols)
            tf = best_time(args.repeat, np.matmul, wf, x)
            line += f"{w.nbytes / t / 1e9:>12.2f}{w.nbytes / tf / 1e9:>9.2f}"
        print(line, flush=True)


if __name__ == "__main__":
    main()
