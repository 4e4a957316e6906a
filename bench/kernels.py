"""Single-thread throughput of the product path decode and prefill run, per type and CPU variant.

Every quantized matrix product of the forward pass goes through the type's tile kernel
(cython/tiles.h, called by forward.h's qk_matmul): decode with 1 token, prefill with a batch.
This measures exactly that kernel (`gemm`, activation quantization included) on one thread, as
GB/s of weight bytes streamed:
  - tg: 1 token against a 1536x2048 matrix (in L2/L3: the unpacking speed) and one of at
    least 96 MB, rows rounded up to 1024 (past any L3 up to 64 MB, like an output head: from
    memory; until 2026-12-05 it was 24576x2048, whose 28 MB of Q4_K stayed in a 32 MB L3);
  - pp64: 64 tokens against the 1536x2048 matrix (each panel unpacked once, met by 64 tokens).
On x86 the IQ1-3 and ternary types (types/panel_unpack.h's qk_decode256), Q4_0, Q4_1, Q5_0,
Q5_1, Q8_0 and IQ4_NL (types/decode32.h) and Q4_K and Q6_K (gemv.h) run tg without
a panel: the same numbers, unpacked in registers; the other types and arm64 use the panel.

    python bench/kernels.py [--types Q4_0,Q4_K] [--repeat 10] [--variants avx2,avx512]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
from qpack.runtime import cpu

# (label, rows, cols, tokens); rows None: enough for PAST_L3 bytes
CASES = (("tg", 1536, 2048, 1), ("tg", None, 2048, 1), ("pp64", 1536, 2048, 64))
PAST_L3 = 96 << 20
# f16 scale fields (byte offsets in the block) that random bytes must not turn into inf/NaN.
SCALE_FIELDS = {
    "Q4_0": (0,), "Q4_1": (0, 2), "Q5_0": (0,), "Q5_1": (0, 2), "Q8_0": (0,),
    "Q2_K": (80, 82), "Q3_K": (108,), "Q4_K": (0, 2), "Q5_K": (0, 2), "Q6_K": (208,),
    "IQ4_NL": (0,), "IQ4_XS": (0,),
    "IQ1_S": (0,), "IQ2_XXS": (0,), "IQ2_XS": (0,), "IQ2_S": (0,), "IQ3_XXS": (0,), "IQ3_S": (0,),
    "TQ1_0": (52,), "TQ2_0": (64,),  # IQ1_M (d in its scales) and MXFP4 (E8M0): random is fine
}  # fmt: skip


def random_weights(name: str, rows: int, cols: int, rng: np.random.Generator) -> np.ndarray:
    """Random blocks with sane f16 scales: the kernels' speed does not depend on the values."""
    block_elems, block_bytes = GGML_QUANT_SIZES[GGMLQuantizationType[name]]
    nb = rows * cols // block_elems
    raw = rng.integers(0, 256, size=(nb, block_bytes), dtype=np.uint8)
    for off in SCALE_FIELDS.get(name, ()):
        raw[:, off : off + 2] = rng.uniform(1e-3, 1e-2, (nb, 1)).astype(np.float16).view(np.uint8)
    return raw.reshape(rows, -1)


def rows_past_l3(name: str, cols: int) -> int:
    """Rows of `cols` weights of type `name` holding at least PAST_L3 bytes, a multiple of 1024."""
    block_elems, block_bytes = GGML_QUANT_SIZES[GGMLQuantizationType[name]]
    return -(-PAST_L3 // (cols // block_elems * block_bytes) // 1024) * 1024


def best_time(repeat: int, fn, *args) -> float:
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn(*args)
        best = min(best, time.perf_counter() - t0)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--types",
        default="Q4_0,Q4_1,Q5_0,Q8_0,Q2_K,Q3_K,Q4_K,Q5_K,Q6_K,IQ4_NL,IQ4_XS,"
        "IQ1_S,IQ1_M,IQ2_XXS,IQ2_XS,IQ2_S,IQ3_XXS,IQ3_S,TQ1_0,TQ2_0,MXFP4",
    )
    parser.add_argument("--repeat", type=int, default=10)
    parser.add_argument(
        "--variants", default="", help="comma-separated (default: all this CPU runs)"
    )
    args = parser.parse_args()

    variants = [v for v in args.variants.split(",") if v] or cpu.supported_variants()
    mods = {v: cpu._import(v) for v in variants}
    rng = np.random.default_rng(0)
    print(f"GB/s of weights through the tile kernel, one thread, best of {args.repeat} runs")
    print(f"{'type':<7}{'case':<6}{'shape':>11}" + "".join(f"{v:>10}" for v in variants))
    for name in args.types.split(","):
        qt = int(GGMLQuantizationType[name])
        for label, rows, cols, tokens in CASES:
            rows = rows or rows_past_l3(name, cols)
            w = random_weights(name, rows, cols, rng)
            x = rng.standard_normal((tokens, cols)).astype(np.float32)
            line = f"{name:<7}{label:<6}{f'{rows}x{cols}':>11}"
            for v, mod in mods.items():
                mod.gemm(qt, w, x)  # warm the caches and the page tables
                reps = args.repeat if v != "generic" else max(2, args.repeat // 4)
                line += f"{w.nbytes / best_time(reps, mod.gemm, qt, w, x) / 1e9:>10.2f}"
            print(line, flush=True)


if __name__ == "__main__":
    main()
