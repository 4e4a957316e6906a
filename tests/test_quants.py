"""The float and legacy quant kernels (cython/types/) against gguf's numpy reference.

Every test runs on every CPU variant this machine can execute (generic, avx2, avx512...), so the
scalar ground truth and each SIMD path meet the same oracle:
- dequantize equals gguf.quants.dequantize bit for bit;
- the Q8_32 activation equals gguf's own Q8_0 quantization of the same numbers (same d, qs);
- dot / matvec agree with a float64 product of the dequantized weights and activation;
- matvec agrees with the generic variant's, for every type (the K-quants of test_quants_k.py too).
"""

from __future__ import annotations

import numpy as np
import pytest
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
from gguf import quants as gq
from qpack.runtime.errors import UnsupportedModel
from quant_blocks import (
    DOT_RTOL,
    FLOAT_TYPES,
    K_TYPES,
    LEGACY_TYPES,
    MODULES,
    Q8_32,
    VARIANTS,
    assert_bits_equal,
    check_matvec,
    qtype,
    random_raw,
    reference_dequant,
)

ALL_TYPES = FLOAT_TYPES + LEGACY_TYPES


def quantize(name: str, data: np.ndarray) -> np.ndarray:
    """Rows of GGUF blocks (uint8, shape (rows, row_bytes)) made by gguf's reference quantizer."""
    q = gq.quantize(data.astype(np.float32), qtype(name))
    return np.ascontiguousarray(q).view(np.uint8).reshape(data.shape[0], -1)


def test_all_variants_built_and_runnable():
    assert "generic" in VARIANTS
    for name, mod in MODULES.items():
        assert mod.VARIANT == name


# ---------------------------------------------------------------------------- traits


@pytest.mark.parametrize("variant", VARIANTS)
def test_traits_match_the_type_tables(variant):
    from qpack.runtime import quants as rq

    mod = MODULES[variant]
    seen = []
    for type_id in range(64):
        t = mod.type_traits(type_id)
        if t is None:
            continue
        seen.append(t["name"])
        py = rq.QUANT_TYPES_BY_ID[type_id]
        assert (t["name"], t["block_elems"], t["block_bytes"]) == (
            py.name,
            py.block_elems,
            py.block_bytes,
        )
        assert (t["block_elems"], t["block_bytes"]) == GGML_QUANT_SIZES[
            GGMLQuantizationType(type_id)
        ]
        assert t["name"] in rq.SUPPORTED_WEIGHT_TYPES
    assert set(ALL_TYPES) <= set(seen)
    # one list (cython/quant_types.def): the same in every variant and in runtime/quants.py
    listed = mod.supported_types()
    assert listed == MODULES["generic"].supported_types()
    assert {name for _id, name, _e, _b in listed} == set(seen) == rq.SUPPORTED_WEIGHT_TYPES
    assert mod.type_traits(9) is None  # Q8_1: an activation type, never a weight here
    assert mod.type_traits(40) is None  # NVFP4: not supported


@pytest.mark.parametrize("variant", VARIANTS)
def test_activation_formats(variant):
    mod = MODULES[variant]
    for name in FLOAT_TYPES:
        assert mod.type_traits(qtype(name))["act_name"] == "f32"
    for name in LEGACY_TYPES:
        assert mod.type_traits(qtype(name))["act_name"] == "q8_32"


# ---------------------------------------------------------------------------- dequantize


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("name", ALL_TYPES)
def test_dequantize_quantized_data_bit_exact(variant, name):
    rng = np.random.default_rng(1)
    data = rng.standard_normal((8, 256)).astype(np.float32) * rng.uniform(0.01, 10, (8, 1))
    data[0, :32] = 0.0  # an all-zero block (d = 0)
    raw = quantize(name, data)
    got = MODULES[variant].dequantize(qtype(name), raw.reshape(-1), data.size)
    assert_bits_equal(got, reference_dequant(name, raw, 8).reshape(-1))


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("name", ALL_TYPES)
def test_dequantize_random_bytes_bit_exact(variant, name):
    rng = np.random.default_rng(2)
    n = 32 * 37  # odd block count: the SIMD loops' tails
    raw = random_raw(name, n, rng)
    got = MODULES[variant].dequantize(qtype(name), raw, n)
    assert_bits_equal(got, reference_dequant(name, raw, 1).reshape(-1))


@pytest.mark.parametrize("variant", VARIANTS)
def test_dequantize_every_f16_and_bf16_pattern(variant):
    mod = MODULES[variant]
    every = np.arange(65536, dtype=np.uint16).view(np.uint8)
    assert_bits_equal(
        mod.dequantize(qtype("F16"), every, 65536), every.view(np.float16).astype(np.float32)
    )
    want_bf16 = (every.view(np.uint16).astype(np.uint32) << 16).view(np.float32)
    assert_bits_equal(mod.dequantize(qtype("BF16"), every, 65536), want_bf16)


# ---------------------------------------------------------------------------- activations


@pytest.mark.parametrize("variant", VARIANTS)
def test_q8_32_activation_matches_gguf_q8_0(variant):
    rng = np.random.default_rng(3)
    x = rng.standard_normal(32 * 40).astype(np.float32) * 3
    x[:32] = 0.0
    x[32:64] += 50.0  # a block far from zero mean
    x[64:96] = rng.choice([0.25, 0.75, -1.25], 32)  # with amax 63.5, d = 0.5: exact .5 ties
    x[64] = 63.5
    mod = MODULES[variant]
    blocks = mod.quantize_act(mod.ACT_Q8_32, x).view(Q8_32)
    ref = quantize("Q8_0", x.reshape(1, -1)).reshape(-1, 34)  # gguf's ggml-exact Q8_0
    np.testing.assert_array_equal(blocks["qs"].view(np.uint8), ref[:, 2:])
    np.testing.assert_array_equal(
        blocks["d"].astype(np.float16).view(np.uint8), ref[:, :2].reshape(-1)
    )
    np.testing.assert_array_equal(
        blocks["d"], np.abs(x.reshape(-1, 32)).max(axis=1) / np.float32(127)
    )
    sums = blocks["qs"].astype(np.int64).sum(axis=1)
    np.testing.assert_array_equal(blocks["s"], blocks["d"] * sums.astype(np.float32))


@pytest.mark.parametrize("variant", VARIANTS)
def test_activation_bytes_identical_across_variants(variant):
    x = np.random.default_rng(4).standard_normal(1536).astype(np.float32)
    mod, base = MODULES[variant], MODULES["generic"]
    for act in (mod.ACT_F32, mod.ACT_Q8_32):
        np.testing.assert_array_equal(mod.quantize_act(act, x), base.quantize_act(act, x))


# ---------------------------------------------------------------------------- dot / matvec


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("name", ALL_TYPES)
@pytest.mark.parametrize("n", [32, 96, 576, 1536])
def test_dot_of_quantized_weights(variant, name, n):
    rng = np.random.default_rng(n)
    data = rng.standard_normal((12, n)).astype(np.float32)
    x = rng.standard_normal(n).astype(np.float32)
    check_matvec(MODULES[variant], name, quantize(name, data), x)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("name", ALL_TYPES)
def test_dot_of_random_bytes_and_skewed_activations(variant, name):
    rng = np.random.default_rng(5)
    n, rows = 32 * 9, 16
    raw = np.stack([random_raw(name, n, rng) for _ in range(rows)])
    x = (rng.standard_normal(n) + 4.0).astype(np.float32)  # far from zero mean
    x[:32] = 0.0
    x[32] = 1e4  # one outlier: its block's other elements round to 0
    check_matvec(MODULES[variant], name, raw, x)


# Float and legacy types on 1536 elements, K-quants and IQ4 (test_quants_k.py) on 2048.
@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize(
    ("name", "n"),
    [pytest.param(name, 1536, id=name) for name in ALL_TYPES]
    + [pytest.param(name, 2048, id=name) for name in K_TYPES],
)
def test_variants_agree(variant, name, n):
    rng = np.random.default_rng(6)
    raw = np.stack([random_raw(name, n, rng) for _ in range(8)])
    x = rng.standard_normal(n).astype(np.float32)
    got = MODULES[variant].matvec(qtype(name), raw, x)
    base = MODULES["generic"].matvec(qtype(name), raw, x)
    w = reference_dequant(name, raw, 8).astype(np.float64)
    scale = np.abs(w) @ np.abs(x.astype(np.float64))
    assert (np.abs(got - base) <= DOT_RTOL * scale).all()


# ---------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("variant", VARIANTS)
def test_lengths_are_checked(variant):
    mod = MODULES[variant]
    q4 = qtype("Q4_0")
    raw = np.zeros(18 * 4, np.uint8)
    x = np.ones(128, np.float32)
    with pytest.raises(ValueError, match="multiple of 32"):
        mod.dequantize(q4, raw, 100)
    with pytest.raises(ValueError, match="need 90 bytes"):
        mod.dequantize(q4, raw, 160)
    with pytest.raises(ValueError, match="positive"):
        mod.dequantize(q4, raw, 0)
    with pytest.raises(ValueError, match="need 90 bytes"):
        mod.dot(q4, raw, np.ones(160, np.float32))
    with pytest.raises(ValueError, match="multiple of 32"):
        mod.dot(q4, raw, np.ones(40, np.float32))
    with pytest.raises(ValueError, match="has 36"):
        mod.matvec(q4, raw.reshape(2, 36), x)
    with pytest.raises(ValueError, match="multiple of 32"):
        mod.quantize_act(mod.ACT_Q8_32, np.ones(33, np.float32))
    with pytest.raises(ValueError, match="unknown activation"):
        mod.quantize_act(7, x)
    with pytest.raises(UnsupportedModel, match="type 40"):  # NVFP4
        mod.dequantize(40, raw, 64)
    with pytest.raises(UnsupportedModel):
        mod.matvec(9, raw.reshape(4, 18), x)
    assert mod.matvec(q4, raw.reshape(4, 18)[:0], x[:32]).shape == (0,)


@pytest.mark.parametrize("variant", VARIANTS)
def test_q8_256_activation_size(variant):
    mod = MODULES[variant]
    x = np.ones(256, np.float32)
    assert mod.quantize_act(mod.ACT_Q8_256, x).size == 308  # f32 d, 256 qs, 16 + 8 int16 sums
