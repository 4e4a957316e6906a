"""What the quant kernel tests share (test_quants.py: float and legacy types, test_quants_k.py:
K-quants and IQ4): the CPU variants to run, random blocks, and the checks against gguf's numpy
reference and a float64 product.

Import from a test with `from quant_blocks import ...` (pytest puts tests/ on sys.path).
"""

from __future__ import annotations

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
from gguf import quants as gq
from gguf_fixtures import _F16_SCALE_FIELDS as SCALE_FIELDS
from qpack.runtime import cpu

# Every variant this machine can execute: the scalar ground truth and each SIMD path.
VARIANTS = cpu.supported_variants()
MODULES = {name: cpu._import(name) for name in VARIANTS}

FLOAT_TYPES = ["F32", "F16", "BF16"]
LEGACY_TYPES = ["Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0"]
K_TYPES = ["Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "IQ4_XS", "IQ4_NL"]  # cython/types/

Q8_32 = np.dtype([("d", "<f4"), ("s", "<f4"), ("qs", "i1", 32)])
Q8_256 = np.dtype([("d", "<f4"), ("qs", "i1", 256), ("bsums", "<i2", 16), ("bsums32", "<i2", 8)])

# dot vs the float64 product: |error| <= DOT_RTOL * sum |w_i a_i|. The kernels sum each block
# (super-block for K-quants) exactly in int32 and round only when adding blocks in f32; a wrong
# kernel is off by O(1) of that sum.
DOT_RTOL = 1e-5


def qtype(name: str) -> GGMLQuantizationType:
    return GGMLQuantizationType[name]


def random_raw(name: str, n_elems: int, rng: np.random.Generator) -> np.ndarray:
    """Random bytes for n_elems elements of a type, with finite f16 scales of both signs, so
    that the quants themselves (every bit pattern, incl. packed sub-block scales) are what
    varies. For the K_TYPES, block 0 is all ones (largest quants and sub-block scales), block 1
    all zeros, and block 2 has a subnormal d (the generic variant's f16 conversion)."""
    block_elems, block_bytes = GGML_QUANT_SIZES[qtype(name)]
    nb = n_elems // block_elems
    if name == "F32":
        return rng.standard_normal(n_elems).astype(np.float32).view(np.uint8)
    raw = rng.integers(0, 256, size=(nb, block_bytes), dtype=np.uint8)
    if name == "BF16":  # keep values finite: exponent byte never all ones
        raw[:, 1] &= 0xBF
    if name == "F16":
        raw[:, 1] &= 0xBB
    extremes = name in K_TYPES
    if extremes:
        raw[0] = 0xFF
        if nb > 1:
            raw[1] = 0x00
    for off in SCALE_FIELDS.get(name, ()):
        scales = (rng.uniform(1e-3, 2.0, nb) * rng.choice([-1, 1], nb)).astype(np.float16)
        if extremes and nb > 2:
            scales[2] = np.uint16(0x0203).view(np.float16)
        raw[:, off : off + 2] = scales.view(np.uint8).reshape(nb, 2)
    return raw.reshape(-1)


def reference_dequant(name: str, raw: np.ndarray, n_rows: int) -> np.ndarray:
    """gguf's dequantization, as (n_rows, row elements) float32."""
    return (
        gq.dequantize(raw.reshape(n_rows, -1), qtype(name)).reshape(n_rows, -1).astype(np.float32)
    )


def assert_bits_equal(got: np.ndarray, want: np.ndarray) -> None:
    """Equal bit for bit (NaN payloads aside: where both are NaN)."""
    want = want.astype(np.float32).reshape(got.shape)
    both_nan = np.isnan(got) & np.isnan(want)
    bad = (got.view(np.uint32) != want.view(np.uint32)) & ~both_nan
    assert not bad.any(), f"{bad.sum()} mismatches, first at {np.argmax(bad)}"


def dequant_act(mod, act: int, raw: np.ndarray) -> np.ndarray:
    """The activation as the kernel sees it, decoded independently of the C code."""
    if act == mod.ACT_F32:
        return raw.view(np.float32).astype(np.float64)
    if act == mod.ACT_Q8_256:
        blocks = raw.view(Q8_256)
        qs = blocks["qs"].astype(np.int64)
        # the sums the min/offset terms use must be those of the quants
        np.testing.assert_array_equal(blocks["bsums"], qs.reshape(-1, 16, 16).sum(axis=2))
        np.testing.assert_array_equal(blocks["bsums32"], qs.reshape(-1, 8, 32).sum(axis=2))
    else:
        assert act == mod.ACT_Q8_32
        blocks = raw.view(Q8_32)
        qs = blocks["qs"]
    return (blocks["d"][:, None].astype(np.float64) * qs).reshape(-1)


def check_matvec(mod, name: str, raw_rows: np.ndarray, x: np.ndarray) -> np.ndarray:
    """matvec (the tile kernel, one token) and dot against float64 products; returns the
    matvec result."""
    n_rows = raw_rows.shape[0]
    t = mod.type_traits(qtype(name))
    w = reference_dequant(name, raw_rows, n_rows).astype(np.float64)
    a = dequant_act(mod, t["act"], mod.quantize_act(t["act"], x))
    got = mod.matvec(qtype(name), raw_rows, x)
    scale = np.abs(w) @ np.abs(a)
    err = np.abs(got - w @ a)
    assert (err <= DOT_RTOL * scale + 1e-30).all(), f"worst {np.max(err / (scale + 1e-30)):.3g}"
    # Close to the unquantized product too: each quantized activation element is within
    # d/2 = amax/254 of x, amax over its activation block.
    act_err = 0.0
    if t["act_name"] != "f32":
        blk = 32 if t["act_name"] == "q8_32" else 256
        amax = np.abs(x.reshape(-1, blk)).max(axis=1).astype(np.float64)
        act_err = (np.abs(w).reshape(n_rows, amax.size, blk).sum(axis=2) @ amax) / 254.0
    assert (np.abs(got - w @ x.astype(np.float64)) <= act_err + 2 * DOT_RTOL * scale + 1e-30).all()
    # dot() (the scalar reference for quantized types, the kernel itself for float ones) on
    # one row, read at any (unaligned) address, agrees to float rounding.
    shifted = np.empty(raw_rows.shape[1] + 1, np.uint8)[1:]
    shifted[:] = raw_rows[-1]
    one = mod.dot(qtype(name), shifted, x)
    assert abs(one - got[-1]) <= DOT_RTOL * scale[-1] + 1e-30
    return got


def activations(n_tok: int, n: int, rng: np.random.Generator) -> np.ndarray:
    """Gaussian rows of skewed magnitudes, a row of +1 (every quant 127) and one of -1."""
    x = rng.standard_normal((n_tok, n)).astype(np.float32) * rng.uniform(0.1, 10, (n_tok, 1))
    x[0] = 1.0
    if n_tok > 1:
        x[1] = -1.0
    return x.astype(np.float32)


def assert_batch_invariant(mod, ggml_type: int, w: np.ndarray, x: np.ndarray) -> None:
    """Every (row, token) of W.x bit-identical whether computed alone, in a ragged panel or in a
    full tile of tokens (w: 21 rows, x: 10 tokens)."""
    whole = mod.gemm(ggml_type, w, x)
    for r0, r1, t0, t1 in [
        (0, 1, 0, 1),
        (3, 20, 2, 3),
        (5, 13, 1, 9),
        (16, 21, 9, 10),
        (0, 21, 4, 8),
    ]:
        part = mod.gemm(ggml_type, np.ascontiguousarray(w[r0:r1]), np.ascontiguousarray(x[t0:t1]))
        assert np.array_equal(part, whole[t0:t1, r0:r1]), (r0, r1, t0, t1)
