"""The tiled products (cython/tiles.h) against gguf's numpy reference and the dot kernels.

The forward pass sends every batch of quantized weights, decode or prefill, through the type's
tile kernel. So on every CPU variant this machine runs:
- gemm equals a float64 product of gguf-dequantized weights and the dequantized activations,
  and the per-row dot, to float rounding (random bytes: every quant value and sub-scale occurs;
  blocks of maximal quants against maximal activations catch int16 saturation in AVX2);
- a (row, token) result is bit-identical whichever rows and tokens share its panel and tile,
  so a token's logits do not depend on the batch it came in (ragged edges included).
"""

from __future__ import annotations

import numpy as np
import pytest
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
from gguf import quants as gq
from qpack.runtime import cpu
from quant_blocks import activations, assert_batch_invariant

VARIANTS = cpu.supported_variants()
MODULES = {name: cpu._import(name) for name in VARIANTS}

TILE_TYPES = ["Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "IQ4_NL", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K",
              "IQ4_XS"]  # fmt: skip
# f16 scale fields (byte offsets in the block) that random bytes must not turn into inf/NaN.
SCALE_FIELDS = {
    "Q4_0": (0,), "Q4_1": (0, 2), "Q5_0": (0,), "Q5_1": (0, 2), "Q8_0": (0,), "IQ4_NL": (0,),
    "Q2_K": (80, 82), "Q3_K": (108,), "Q4_K": (0, 2), "Q5_K": (0, 2), "Q6_K": (208,),
    "IQ4_XS": (0,),
}  # fmt: skip
Q8_32 = np.dtype([("d", "<f4"), ("s", "<f4"), ("qs", "i1", 32)])
Q8_256 = np.dtype([("d", "<f4"), ("qs", "i1", 256), ("bsums", "<i2", 16), ("bsums32", "<i2", 8)])
# |gemm - exact| <= RTOL * sum |w_i a_i|: integer sums are exact, the f32 rounding is per block.
RTOL = 1e-5


def qtype(name: str) -> GGMLQuantizationType:
    return GGMLQuantizationType[name]


def cases():
    for variant in VARIANTS:
        for name in TILE_TYPES:
            yield variant, name


def random_rows(name: str, rows: int, n: int, rng: np.random.Generator) -> np.ndarray:
    """Random blocks with finite f16 scales of both signs; row 0 has every quant bit set."""
    block_elems, block_bytes = GGML_QUANT_SIZES[qtype(name)]
    nb = n // block_elems
    raw = rng.integers(0, 256, size=(rows, nb, block_bytes), dtype=np.uint8)
    raw[0] = 0xFF
    for off in SCALE_FIELDS[name]:
        scales = rng.uniform(-0.02, 0.02, size=(rows, nb, 1)).astype(np.float16)
        raw[:, :, off : off + 2] = scales.view(np.uint8)
    return raw.reshape(rows, nb * block_bytes)


def dequant_act(mod, act: int, x: np.ndarray) -> np.ndarray:
    raw = mod.quantize_act(act, np.ascontiguousarray(x, dtype=np.float32))
    if act == mod.ACT_Q8_32:
        b = raw.view(Q8_32)
    else:
        b = raw.view(Q8_256)
    return (b["d"][:, None].astype(np.float64) * b["qs"]).ravel()


def check_against_exact(mod, name: str, w: np.ndarray, x: np.ndarray, out: np.ndarray) -> None:
    act = mod.type_traits(int(qtype(name)))["act"]
    xa = np.stack([dequant_act(mod, act, row) for row in x])
    wd = gq.dequantize(w, qtype(name)).astype(np.float64)
    exact = xa @ wd.T
    bound = RTOL * (np.abs(xa) @ np.abs(wd).T) + 1e-30
    assert (np.abs(out - exact) <= bound).all(), np.max(np.abs(out - exact) / bound)


def test_every_quantized_type_has_a_tile_kernel():
    for variant, mod in MODULES.items():
        for type_id, name, _elems, _bytes in mod.supported_types():
            quantized = mod.type_traits(type_id)["act_name"] != "f32"
            assert mod.has_gemm(type_id) == quantized, (variant, name)
        assert set(TILE_TYPES) <= {n for _i, n, _e, _b in mod.supported_types()}


@pytest.mark.parametrize("variant,name", list(cases()))
@pytest.mark.parametrize("rows,n_tok", [(1, 1), (8, 4), (13, 5), (37, 9)])
def test_gemm_equals_the_exact_product(variant, name, rows, n_tok):
    mod = MODULES[variant]
    rng = np.random.default_rng(rows * 100 + n_tok)
    n = 512 if GGML_QUANT_SIZES[qtype(name)][0] == 256 else 96
    w = random_rows(name, rows, n, rng)
    x = activations(n_tok, n, rng)
    out = mod.gemm(int(qtype(name)), w, x)
    assert out.shape == (n_tok, rows)
    check_against_exact(mod, name, w, x, out)


@pytest.mark.parametrize("variant,name", list(cases()))
def test_gemm_matches_the_dot_kernel(variant, name):
    mod = MODULES[variant]
    rng = np.random.default_rng(7)
    n = 768 if GGML_QUANT_SIZES[qtype(name)][0] == 256 else 576
    w = random_rows(name, 11, n, rng)
    x = activations(6, n, rng)
    out = mod.gemm(int(qtype(name)), w, x)
    dots = np.array([[mod.dot(int(qtype(name)), wr, xr) for wr in w] for xr in x])
    act = mod.type_traits(int(qtype(name)))["act"]
    xa = np.stack([dequant_act(mod, act, row) for row in x])
    scale = np.abs(xa) @ np.abs(gq.dequantize(w, qtype(name)).astype(np.float64)).T
    assert (np.abs(out - dots) <= 2 * RTOL * scale + 1e-30).all()


@pytest.mark.parametrize("variant,name", list(cases()))
def test_results_do_not_depend_on_the_batch(variant, name):
    """Every (row, token) bit-identical whether computed alone, in a ragged panel, or in a
    full tile of tokens: what makes a sequence's logits independent of who shares the batch."""
    mod = MODULES[variant]
    rng = np.random.default_rng(11)
    n = 256 if GGML_QUANT_SIZES[qtype(name)][0] == 256 else 64
    w = random_rows(name, 21, n, rng)
    x = activations(10, n, rng)
    assert_batch_invariant(mod, int(qtype(name)), w, x)


@pytest.mark.parametrize("variant", VARIANTS)
def test_gemm_checks_shapes(variant):
    mod = MODULES[variant]
    w = gq.quantize(np.ones((4, 64), np.float32), qtype("Q4_0"))
    with pytest.raises(ValueError):
        mod.gemm(int(qtype("Q4_0")), w, np.ones((2, 32), np.float32))  # row length differs
    with pytest.raises(ValueError):
        mod.gemm(int(qtype("F32")), np.ones((4, 256), np.uint8), np.ones((2, 64), np.float32))
    assert mod.gemm(int(qtype("Q4_0")), w, np.ones((0, 64), np.float32)).shape == (0, 4)


@pytest.mark.parametrize("variant,name", list(cases()))
def test_one_token_equals_its_row_in_a_batch_over_many_blocks(variant, name):
    """Decode (one token) may take a direct path without panels (cython/gemv.h, and
    types/decode32.h on x86 for the 32-element types): over rows of 1 to 19 blocks (gemv's
    per-8-block sums and their padding) and 19 rows (two groups of eight and a ragged one),
    every row's result for a token alone is bit-identical to the same token's in a batch of 5."""
    mod = MODULES[variant]
    rng = np.random.default_rng(23)
    elems = GGML_QUANT_SIZES[qtype(name)][0]
    for nb in (1, 7, 8, 9, 19):
        w = random_rows(name, 19, nb * elems, rng)
        x = activations(5, nb * elems, rng)
        whole = mod.gemm(int(qtype(name)), w, x)
        for t in range(5):
            alone = mod.gemm(int(qtype(name)), w, np.ascontiguousarray(x[t : t + 1]))
            assert np.array_equal(alone[0], whole[t]), (nb, t)
        check_against_exact(mod, name, w, x, whole)
