"""The K-quant and IQ4 kernels (cython/types/) against gguf's numpy reference.

Every test runs on every CPU variant this machine can execute, so the scalar ground truth and
each SIMD path meet the same oracle:
- dequantize equals gguf.quants.dequantize bit for bit (random blocks, extreme blocks, and real
  Q4_K / Q6_K tensors of Gemma 3 270M);
- the Q8_256 activation follows ggml's Q8_K rule (d = max|x|/127, round half to even, bsums,
  and the 32-element sums the prefill tile uses) and is byte-identical in every variant;
- dot / matvec agree with a float64 product of the dequantized weights and activation
  (and with the generic variant: test_variants_agree in test_quants.py covers these types).

gguf cannot quantize these types, so the weights are random bytes with sane f16 scales: every
bit pattern of the quants and of the packed sub-block scales occurs.
"""

from __future__ import annotations

import numpy as np
import pytest
from gguf import GGML_QUANT_SIZES
from qpack.runtime.gguf import open_gguf, rows
from quant_blocks import (
    K_TYPES,
    MODULES,
    Q8_256,
    SCALE_FIELDS,
    VARIANTS,
    assert_bits_equal,
    check_matvec,
    qtype,
    random_raw,
    reference_dequant,
)


def reference_q8_256(x: np.ndarray) -> np.ndarray:
    """ggml's Q8_K rule in numpy, in f32 like the kernels: d = amax/127, q = rint(x * 127/amax)."""
    blocks = x.reshape(-1, 256)
    out = np.zeros(blocks.shape[0], Q8_256)
    amax = np.abs(blocks).max(axis=1)
    for i, (b, m) in enumerate(zip(blocks, amax, strict=True)):
        if m == 0:
            continue
        out[i]["d"] = m / np.float32(127)
        out[i]["qs"] = np.rint(b * (np.float32(127) / m)).astype(np.int8)
        out[i]["bsums"] = out[i]["qs"].reshape(16, 16).astype(np.int16).sum(axis=1)
        out[i]["bsums32"] = out[i]["qs"].reshape(8, 32).astype(np.int16).sum(axis=1)
    return out


# ---------------------------------------------------------------------------- traits


@pytest.mark.parametrize("variant", VARIANTS)
def test_every_type_registered(variant):
    mod = MODULES[variant]
    for name in K_TYPES:
        t = mod.type_traits(qtype(name))
        assert t is not None, name
        assert (t["name"], t["block_elems"], t["block_bytes"]) == (
            name,
            *GGML_QUANT_SIZES[qtype(name)],
        )
        assert t["act_name"] == ("q8_32" if name == "IQ4_NL" else "q8_256")


@pytest.mark.parametrize("variant", VARIANTS)
def test_lengths_are_checked(variant):
    mod = MODULES[variant]
    raw = np.zeros(144 * 2, np.uint8)
    with pytest.raises(ValueError, match="multiple of 256"):
        mod.dequantize(qtype("Q4_K"), raw, 128)
    with pytest.raises(ValueError, match="need 432 bytes"):
        mod.dequantize(qtype("Q4_K"), raw, 768)
    with pytest.raises(ValueError, match="multiple of 256"):
        mod.dot(qtype("Q6_K"), raw, np.ones(288, np.float32))
    with pytest.raises(ValueError, match="multiple of 256"):
        mod.quantize_act(mod.ACT_Q8_256, np.ones(300, np.float32))


# ---------------------------------------------------------------------------- dequantize


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("name", K_TYPES)
def test_dequantize_random_blocks_bit_exact(variant, name):
    rng = np.random.default_rng(1)
    n = 256 * 13  # odd block count
    raw = random_raw(name, n, rng)
    got = MODULES[variant].dequantize(qtype(name), raw, n)
    assert_bits_equal(got, reference_dequant(name, raw, 1))


@pytest.fixture(scope="module")
def gemma_k_tensors(gemma3_path):
    """The first Q4_K and the first Q6_K tensor of Gemma 3 270M, as (rows, row_bytes) views."""
    gf = open_gguf(gemma3_path)
    found = {}
    for ti in gf.tensors.values():
        if ti.type.name in ("Q4_K", "Q6_K") and ti.type.name not in found:
            found[ti.type.name] = (ti.name, rows(ti))
    assert set(found) == {"Q4_K", "Q6_K"}
    return found


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("name", ["Q4_K", "Q6_K"])
def test_dequantize_gemma3_tensor_bit_exact(gemma_k_tensors, variant, name):
    _, raw = gemma_k_tensors[name]
    want = reference_dequant(name, raw, raw.shape[0])
    got = MODULES[variant].dequantize(qtype(name), raw.reshape(-1), want.size)
    assert_bits_equal(got, want)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("name", ["Q4_K", "Q6_K"])
def test_matvec_gemma3_tensor(gemma_k_tensors, variant, name):
    _, raw = gemma_k_tensors[name]
    n = raw.shape[1] // GGML_QUANT_SIZES[qtype(name)][1] * 256
    x = np.random.default_rng(2).standard_normal(n).astype(np.float32)
    check_matvec(MODULES[variant], name, np.ascontiguousarray(raw[:64]), x)


# ---------------------------------------------------------------------------- activations


@pytest.mark.parametrize("variant", VARIANTS)
def test_q8_256_activation_follows_ggml_rule(variant):
    rng = np.random.default_rng(3)
    x = rng.standard_normal(256 * 6).astype(np.float32) * 3
    x[:256] = 0.0  # all-zero block: d = 0
    x[256:512] += 50.0  # far from zero mean
    x[512:768] = rng.choice([2.5, -3.5, 0.5, 126.5], 256)  # amax 127 -> scale 1: exact .5 ties
    x[512] = -127.0
    x[768] = 1e6  # one outlier: the rest of its block rounds to 0
    mod = MODULES[variant]
    got = mod.quantize_act(mod.ACT_Q8_256, x).view(Q8_256)
    want = reference_q8_256(x)
    np.testing.assert_array_equal(got["d"], want["d"])
    np.testing.assert_array_equal(got["qs"], want["qs"])
    np.testing.assert_array_equal(got["bsums"], want["bsums"])
    np.testing.assert_array_equal(got["bsums32"], want["bsums32"])
    # half to even, as ggml's nearest_int: 2.5 -> 2, -3.5 -> -4, 0.5 -> 0, 126.5 -> 126
    ties = x[512:768]
    np.testing.assert_array_equal(got[2]["qs"], np.rint(ties).astype(np.int8))


@pytest.mark.parametrize("variant", VARIANTS)
def test_q8_256_bytes_identical_across_variants(variant):
    x = np.random.default_rng(4).standard_normal(2048).astype(np.float32)
    mod, base = MODULES[variant], MODULES["generic"]
    np.testing.assert_array_equal(
        mod.quantize_act(mod.ACT_Q8_256, x), base.quantize_act(base.ACT_Q8_256, x)
    )


# ---------------------------------------------------------------------------- dot / matvec


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("name", K_TYPES)
@pytest.mark.parametrize("n", [256, 768, 2048])
def test_dot_of_random_blocks(variant, name, n):
    rng = np.random.default_rng(n)
    raw = np.stack([random_raw(name, n, rng) for _ in range(12)])
    x = rng.standard_normal(n).astype(np.float32)
    check_matvec(MODULES[variant], name, raw, x)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("name", K_TYPES)
def test_dot_of_skewed_activations(variant, name):
    rng = np.random.default_rng(5)
    n = 256 * 5
    raw = np.stack([random_raw(name, n, rng) for _ in range(8)])
    x = (rng.standard_normal(n) + 4.0).astype(np.float32)  # far from zero mean: the mins
    x[:256] = 0.0
    x[300] = 1e4
    check_matvec(MODULES[variant], name, raw, x)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("name", K_TYPES)
@pytest.mark.parametrize("fill", [0x00, 0x7F, 0x80, 0xFF])
def test_dot_of_extreme_blocks(variant, name, fill):
    """Every byte the same (0xFF: the largest quants and sub-block scales) against activations
    at +-127: the int16 intermediate sums of the SIMD paths must not saturate."""
    n = 1024
    block_elems, block_bytes = GGML_QUANT_SIZES[qtype(name)]
    raw = np.full((n // block_elems, block_bytes), fill, np.uint8)
    for off in SCALE_FIELDS[name]:
        raw[:, off : off + 2] = np.array([1.0], np.float16).view(np.uint8)
    signs = np.where(np.arange(n) % 3 == 0, -1.0, 1.0).astype(np.float32)
    for x in (signs, -signs):
        check_matvec(MODULES[variant], name, np.stack([raw.reshape(-1)] * 2), x)
