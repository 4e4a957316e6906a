"""The IQ1/IQ2/IQ3, ternary and MXFP4 kernels (cython/types/) against gguf's numpy reference.

On every CPU variant this machine runs:
- dequantize equals gguf.quants.dequantize bit for bit (random blocks: every grid index, sign
  pattern, packed scale and delta bit occurs; f16 scales of both signs incl. subnormal ones;
  and, for the types gguf can quantize, quantized data);
- the tile product (what decode and prefill run) equals a float64 product of the
  gguf-dequantized weights and the dequantized activations to float rounding, for 1 and many
  tokens, and is within the activation-quantization error of the product with the float
  activations (quant_blocks.check_matvec);
- dot (the per-row reference) equals gemm, and a (row, token) result does not depend on the
  batch it was computed in.
"""

from __future__ import annotations

import numpy as np
import pytest
from gguf import GGML_QUANT_SIZES
from gguf import quants as gq
from qpack.runtime import quants as rq
from quant_blocks import (
    MODULES,
    VARIANTS,
    activations,
    assert_batch_invariant,
    assert_bits_equal,
    check_matvec,
    dequant_act,
    qtype,
)

IQ_TYPES = ["IQ1_S", "IQ1_M", "IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ3_XXS", "IQ3_S"]
NEW_TYPES = IQ_TYPES + ["TQ1_0", "TQ2_0", "MXFP4"]
# Byte offset of the f16 d in the block (IQ1_M spreads it over its scales, MXFP4 has E8M0).
D_OFFSET = {name: 0 for name in IQ_TYPES if name != "IQ1_M"} | {"TQ1_0": 52, "TQ2_0": 64}
RTOL = 1e-5  # as tests/test_quants_tiles.py: integer sums exact, f32 rounding per block
CASES = [(v, name) for v in VARIANTS for name in NEW_TYPES]


def random_rows(name: str, rows: int, n: int, rng: np.random.Generator) -> np.ndarray:
    """Random blocks with finite scales of both signs; in row 0 the first block has a subnormal
    f16 d (or the smallest E8M0 exponents for MXFP4)."""
    block_elems, block_bytes = GGML_QUANT_SIZES[qtype(name)]
    nb = n // block_elems
    raw = rng.integers(0, 256, size=(rows, nb, block_bytes), dtype=np.uint8)
    d = (rng.uniform(1e-3, 0.05, (rows, nb)) * rng.choice([-1, 1], (rows, nb))).astype(np.float16)
    d[0, 0] = np.uint16(0x0203).view(np.float16)
    if name in D_OFFSET:
        raw[:, :, D_OFFSET[name] : D_OFFSET[name] + 2] = d.view(np.uint8).reshape(rows, nb, 2)
    elif name == "IQ1_M":  # d's four nibbles are the top nibbles of the four scale words
        scales = raw[:, :, 48:56].copy().view(np.uint16) & np.uint16(0x0FFF)
        bits = d.view(np.uint16)
        for k in range(4):
            scales[:, :, k] |= ((bits >> np.uint16(4 * k)) & np.uint16(0xF)) << np.uint16(12)
        raw[:, :, 48:56] = scales.view(np.uint8)
    else:  # MXFP4: exponents around 2^0 (e = 127), and the two subnormal-float ones
        assert name == "MXFP4"
        raw[:, :, 0] = rng.integers(110, 135, (rows, nb))
        raw[0, 0, 0], raw[0, -1, 0] = 0, 1
    return raw.reshape(rows, nb * block_bytes)


def row_len(name: str, blocks: int) -> int:
    return GGML_QUANT_SIZES[qtype(name)][0] * blocks


def check_against_exact(mod, name: str, w: np.ndarray, x: np.ndarray, out: np.ndarray) -> None:
    act = mod.type_traits(int(qtype(name)))["act"]
    xa = np.stack([dequant_act(mod, act, mod.quantize_act(act, row)) for row in x])
    wd = gq.dequantize(w, qtype(name)).astype(np.float64)
    bound = RTOL * (np.abs(xa) @ np.abs(wd).T) + 1e-30
    assert (np.abs(out - xa @ wd.T) <= bound).all(), np.max(np.abs(out - xa @ wd.T) / bound)


@pytest.mark.parametrize("variant", VARIANTS)
def test_registered_with_gguf_sizes_and_a_tile_kernel(variant):
    mod = MODULES[variant]
    for name in NEW_TYPES:
        t = mod.type_traits(int(qtype(name)))
        assert t is not None, name
        assert (t["name"], t["block_elems"], t["block_bytes"]) == (
            name,
            *GGML_QUANT_SIZES[qtype(name)],
        )
        assert t["act_name"] == ("q8_32" if name == "MXFP4" else "q8_256")
        assert mod.has_gemm(int(qtype(name)))
        assert name in rq.SUPPORTED_WEIGHT_TYPES


@pytest.mark.parametrize("variant,name", CASES)
def test_dequantize_random_blocks_bit_exact(variant, name):
    rng = np.random.default_rng(3)
    n = row_len(name, 24)
    raw = random_rows(name, 6, n, rng)
    want = gq.dequantize(raw, qtype(name))
    got = np.stack([MODULES[variant].dequantize(int(qtype(name)), r, n) for r in raw])
    assert np.isfinite(want).all()
    assert_bits_equal(got, want)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("name", ["TQ1_0", "TQ2_0", "MXFP4"])
def test_dequantize_quantized_data_bit_exact(variant, name):
    """The types gguf-py can quantize: real codes from real values, incl. an all-zero row."""
    rng = np.random.default_rng(4)
    x = (rng.standard_normal((5, 1024)) * rng.uniform(0.01, 3, (5, 1))).astype(np.float32)
    x[4] = 0
    raw = gq.quantize(x, qtype(name))
    got = np.stack([MODULES[variant].dequantize(int(qtype(name)), r, 1024) for r in raw])
    assert_bits_equal(got, gq.dequantize(raw, qtype(name)))


@pytest.mark.parametrize("variant,name", CASES)
@pytest.mark.parametrize("rows,n_tok", [(1, 1), (8, 4), (13, 5), (37, 9)])
def test_gemm_equals_the_exact_product(variant, name, rows, n_tok):
    mod = MODULES[variant]
    rng = np.random.default_rng(rows * 100 + n_tok)
    n = row_len(name, 2 if name != "MXFP4" else 3)
    w = random_rows(name, rows, n, rng)
    x = activations(n_tok, n, rng)
    out = mod.gemm(int(qtype(name)), w, x)
    assert out.shape == (n_tok, rows)
    check_against_exact(mod, name, w, x, out)


@pytest.mark.parametrize("variant,name", CASES)
def test_one_token_product_within_activation_error(variant, name):
    """matvec/dot (one token) against float64 with the float activations: within what
    quantizing the activation to 8 bits may cost, and dot equal at an unaligned address."""
    rng = np.random.default_rng(5)
    n = row_len(name, 4 if name != "MXFP4" else 32)
    w = random_rows(name, 9, n, rng)
    x = (rng.standard_normal(n) * rng.uniform(0.1, 10)).astype(np.float32)
    check_matvec(MODULES[variant], name, w, x)


@pytest.mark.parametrize("variant,name", CASES)
def test_gemm_matches_the_dot_kernel(variant, name):
    mod = MODULES[variant]
    rng = np.random.default_rng(7)
    n = row_len(name, 3 if name != "MXFP4" else 18)
    w = random_rows(name, 11, n, rng)
    x = activations(6, n, rng)
    t = int(qtype(name))
    out = mod.gemm(t, w, x)
    dots = np.array([[mod.dot(t, wr, xr) for wr in w] for xr in x])
    act = mod.type_traits(t)["act"]
    xa = np.stack([dequant_act(mod, act, mod.quantize_act(act, row)) for row in x])
    scale = np.abs(xa) @ np.abs(gq.dequantize(w, qtype(name)).astype(np.float64)).T
    assert (np.abs(out - dots) <= 2 * RTOL * scale + 1e-30).all()


@pytest.mark.parametrize("variant,name", CASES)
def test_results_do_not_depend_on_the_batch(variant, name):
    mod = MODULES[variant]
    rng = np.random.default_rng(11)
    n = row_len(name, 3 if name != "MXFP4" else 6)  # several blocks: the order of the sums counts
    w = random_rows(name, 21, n, rng)
    x = activations(10, n, rng)
    assert_batch_invariant(mod, int(qtype(name)), w, x)


@pytest.mark.parametrize("variant", VARIANTS)
def test_variants_agree_with_generic(variant):
    rng = np.random.default_rng(12)
    for name in NEW_TYPES:
        n = row_len(name, 2 if name != "MXFP4" else 16)
        w = random_rows(name, 17, n, rng)
        x = activations(3, n, rng)
        t = int(qtype(name))
        got, base = MODULES[variant].gemm(t, w, x), MODULES["generic"].gemm(t, w, x)
        scale = (
            np.abs(x.astype(np.float64))
            @ np.abs(gq.dequantize(w, qtype(name)).astype(np.float64)).T
        )
        assert (np.abs(got - base) <= 2 * RTOL * scale + 1e-30).all(), name
