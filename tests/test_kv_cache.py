"""The KV cache types (--cache-type-k / --cache-type-v: f16, q8_0).

- A cache row is written and read back bit-exactly as gguf-py's Q8_0 quantize/dequantize (the
  reference of ggml's block_q8_0), on every CPU variant.
- With q8_0 keys, a score is the integer dot of the query quantized to q8_0 (as llama.cpp's CPU
  attention does) with the cached key: it matches the float64 dot of both rows dequantized.
- A model run with a q8_0 cache matches the float64 reference whose keys and values went
  through that same quantizer (and its queries too, with q8_0 keys), far tighter than it
  matches the unquantized reference, or the reference with exact queries.
- The memory figure is exact for every combination; a head size q8_0 cannot hold is refused
  naming the flag; the command line refuses other types listing the choices.
"""

from __future__ import annotations

import gguf
import numpy as np
import pytest
from click.testing import CliRunner
from gguf.quants import dequantize, quantize
from qpack.runtime import cpu
from qpack.runtime.errors import UnsupportedModel
from qpack.runtime.facts import read_model_facts
from qpack.runtime.gguf import open_gguf
from qpack.runtime.kv_cache import CACHE_TYPES
from qpack.runtime.model import Model
from reference_forward import ReferenceModel
from tiny_models import tiny_model

VARIANTS = cpu.supported_variants()
Q8_0 = gguf.GGMLQuantizationType.Q8_0


def load(path, variant: str = "generic", **kw) -> Model:
    kw.setdefault("n_ctx", 64)
    kw.setdefault("threads", 2)
    return Model(open_gguf(str(path)), kernels=cpu._import(variant), **kw)


def tokens_for(n: int, seed: int = 1) -> list[int]:
    return np.random.default_rng(seed).integers(3, 269, n).tolist()


def hard_rows() -> list[np.ndarray]:
    """Rows of 128 values: random scales, an all-zero block, exact .5 ties after scaling,
    a lone value, tiny values (subnormal f16 scales) and large ones."""
    rng = np.random.default_rng(3)
    rows = [rng.standard_normal(128).astype(np.float32) * s for s in (1e-3, 0.1, 1.0, 37.0)]
    ties = np.tile(np.arange(-15.5, 16.5, 1.0, dtype=np.float32), 4)
    ties[::32] = 127.0  # max |x| = 127: scale 1, so every other value sits on a .5 tie
    special = np.zeros(128, np.float32)
    special[40] = -3.0  # one value in a block of zeros
    special[64:96] = rng.standard_normal(32).astype(np.float32) * 1e-6
    special[96:] = rng.standard_normal(32).astype(np.float32) * 1e4
    return [*rows, ties, special]


@pytest.mark.parametrize("variant", VARIANTS)
def test_q8_0_rows_are_gguf_blocks(variant):
    kernels = cpu._import(variant)
    q8 = CACHE_TYPES["q8_0"][0]
    for row in hard_rows():
        data = kernels.cache_encode(q8, row)
        assert data == quantize(row.reshape(1, -1), Q8_0).tobytes()
        back = kernels.cache_decode(q8, data, len(row))
        assert np.array_equal(back, dequantize(np.frombuffer(data, np.uint8), Q8_0).reshape(-1))


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("hd", [32, 64, 96, 256])
def test_q8_0_scores_are_dots_of_q8_0_queries_and_keys(variant, hd):
    kernels = cpu._import(variant)
    rng = np.random.default_rng(hd)
    for nq, tn in ((1, 1), (4, 64), (7, 23), (9, 40), (3, 17)):
        # rows of mixed magnitudes, a zero block and a row at the int8 extremes
        q = rng.standard_normal((nq, hd)).astype(np.float32) * rng.uniform(0.01, 30, (nq, 1))
        k = rng.standard_normal((tn, hd)).astype(np.float32) * rng.uniform(0.01, 30, (tn, 1))
        q[-1, :32] = 0.0 if nq > 1 else q[-1, :32]
        k[-1] = np.where(np.arange(hd) % 2, 127.0, -127.0)
        got = kernels.q8_0_scores(q, k)
        qq = dequantize(quantize(q, Q8_0), Q8_0).astype(np.float64)
        kk = dequantize(quantize(k, Q8_0), Q8_0).astype(np.float64)
        want = qq @ kk.T
        # f32 sums of exact per-block integer dots: a few ulp of the largest term
        bound = 1e-6 * (np.abs(qq) @ np.abs(kk).T) + 1e-30
        assert np.all(np.abs(got - want) <= bound), np.max(np.abs(got - want) / bound)
        # and not the dot with the exact query
        assert not np.allclose(got, q.astype(np.float64) @ kk.T, rtol=1e-5, atol=0)


@pytest.mark.parametrize("variant", VARIANTS)
def test_f16_rows_are_ieee_halves(variant):
    kernels = cpu._import(variant)
    f16 = CACHE_TYPES["f16"][0]
    for row in hard_rows():
        data = kernels.cache_encode(f16, row)
        assert data == row.astype(np.float16).tobytes()
        assert np.array_equal(kernels.cache_decode(f16, data, len(row)), row.astype(np.float16))


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma3"])
@pytest.mark.parametrize("types", [("q8_0", "q8_0"), ("q8_0", "f16"), ("f16", "q8_0")])
def test_q8_0_cache_matches_the_reference_quantized_the_same_way(tmp_path, variant, arch, types):
    # gemma3: 7 layers, 6 with a 4-token sliding window; 40 tokens cross a 32-value block
    # boundary nowhere (head_dim 64 = 2 blocks) but fill many rows of each head
    path = tiny_model(tmp_path / "m.gguf", arch, "F32", n_layers=7 if arch == "gemma3" else 2)
    toks = tokens_for(40)
    ours = load(path, variant, cache_type_k=types[0], cache_type_v=types[1])
    got = ours.logits(toks, all_rows=True)
    scale = np.abs(got).max()
    as_cached = ReferenceModel(path, types)
    exact = ReferenceModel(path)
    diff_cached = np.abs(got - as_cached.logits(toks)) / scale
    diff_exact = np.abs(got - exact.logits(toks)) / scale
    # f32 activations: what remains is f32 vs f64 rounding, and here and there a value rounded
    # the other way (to a half, or to an int8 step) where the f32 and f64 keys or queries
    # straddle a tie
    assert diff_cached.max() < 1e-3, diff_cached.max()
    assert np.median(diff_cached) < 5e-5, np.median(diff_cached)
    # the cache's rounding is really there: typically 10-100x above what is left
    assert np.median(diff_exact) > 10 * np.median(diff_cached)
    if types[0] == "q8_0":  # and so is the queries' (5x and more: an f16 V leaves more behind)
        exact_queries = ReferenceModel(path, types, q8_0_queries=False)
        diff_queries = np.abs(got - exact_queries.logits(toks)) / scale
        assert np.median(diff_queries) > 5 * np.median(diff_cached)


@pytest.mark.parametrize("variant", VARIANTS)
def test_q8_0_cache_is_batch_and_thread_invariant(tmp_path, variant):
    path = tiny_model(tmp_path / "m.gguf", "gemma3", "Q8_0", n_layers=2, window=8)
    toks = tokens_for(70)
    kw = {"cache_type_k": "q8_0", "cache_type_v": "q8_0", "n_ctx": 96}
    whole = load(path, variant, n_batch=128, threads=1, **kw).logits(toks, all_rows=True)
    m = load(path, variant, n_batch=128, threads=3, **kw)
    steps = [m.forward([t], [i], [0], [0])[0] for i, t in enumerate(toks)]
    assert np.array_equal(np.stack(steps), whole)


@pytest.mark.parametrize("types", [("q8_0", "q8_0"), ("q8_0", "f16")])
def test_copied_q8_0_sequence_continues_like_the_original(tmp_path, types):
    path = tiny_model(tmp_path / "m.gguf", "qwen2", "Q8_0", n_layers=2)
    m = load(path, VARIANTS[0], n_seq=3, cache_type_k=types[0], cache_type_v=types[1])
    toks = tokens_for(20)
    m.forward(toks, list(range(20)), [0] * 20, [])
    m.native.copy_sequence(0, 1, 20)
    a, b = m.forward([7], [20], [0], [0]), m.forward([7], [20], [1], [0])
    c = m.forward([7], [20], [2], [0])  # slot 2 holds nothing: must differ
    assert np.array_equal(a, b)
    assert not np.allclose(a, c)


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_kv_bytes_are_exact_for_every_type(tmp_path, arch):
    path = tiny_model(tmp_path / "m.gguf", arch, "Q8_0", n_heads=4, n_kv_heads=2, head_dim=64)
    facts = read_model_facts(open_gguf(str(path)))
    sizes = {}
    for k in CACHE_TYPES:
        for v in CACHE_TYPES:
            m = load(path, n_ctx=96, n_seq=3, cache_type_k=k, cache_type_v=v)
            assert m.native.kv_bytes == facts.kv_bytes(96, 3, k, v)
            assert f"(K {k}, V {v})" in m.report.describe()
            sizes[k, v] = m.native.kv_bytes
    # rows of 64 values: f16 128 bytes, q8_0 two 34-byte blocks
    assert sizes["q8_0", "q8_0"] * 64 == sizes["f16", "f16"] * 34
    assert sizes["q8_0", "f16"] == sizes["f16", "q8_0"]


def test_q8_0_needs_heads_of_whole_blocks(tmp_path):
    path = tiny_model(tmp_path / "m.gguf", "llama", "Q8_0", n_heads=4, n_kv_heads=2, head_dim=48)
    load(path, cache_type_k="f16", cache_type_v="f16")  # f16 holds any head size
    for flag in ("k", "v"):
        with pytest.raises(UnsupportedModel, match=f"--cache-type-{flag} q8_0: .*multiple of 32"):
            load(path, **{f"cache_type_{flag}": "q8_0"})


def test_command_line_cache_types(tmp_path):
    from qpack.builder.cli import main

    path = tiny_model(tmp_path / "m.gguf", "llama", "Q8_0", n_heads=4, n_kv_heads=2, head_dim=48)
    runner = CliRunner()
    bad = runner.invoke(main, ["run", str(path), "-p", "hi", "--cache-type-v", "q4_1"])
    assert bad.exit_code == 2
    assert "'q4_1' is not one of 'f16', 'q8_0'" in bad.output
    refused = runner.invoke(main, ["run", str(path), "-p", "hi", "--cache-type-k", "q8_0"])
    assert refused.exit_code != 0 and refused.exc_info[0] is SystemExit
    assert "--cache-type-k q8_0" in refused.output and "Traceback" not in refused.output
    good = tiny_model(tmp_path / "g.gguf", "llama", "Q8_0")
    ran = runner.invoke(
        main,
        ["run", str(good), "-p", "hi", "-n", "3", "--temp", "0", "-c", "32"]
        + ["--cache-type-k", "q8_0", "--cache-type-v", "q8_0"],
    )
    assert ran.exit_code == 0, ran.output
    assert "(K q8_0, V q8_0)" in ran.output
    for command in ("run", "serve", "perplexity"):
        text = runner.invoke(main, [command, "--help"]).output
        assert "--cache-type-k [f16|q8_0]" in text and "--cache-type-v [f16|q8_0]" in text


@pytest.mark.slow
@pytest.mark.parametrize("name", ["smollm2", "gemma3"])
def test_q8_0_cache_moves_perplexity_by_less_than_half_a_percent(name, request):
    """The issue's bar on both real models: |change| < 0.5 % with K and V in q8_0. Measured over
    every whole window of 512 of both texts in tests/data (6,885 scored tokens): over one
    text's first 4,096 tokens (2,040 scored) the change is noise-dominated (paired standard
    error 0.25-0.35 %; Gemma 3's +0.51 % there is -0.31 % on the other text). llama.cpp's change
    on the same windows is printed beside ours (tests/data/kv_cache_refs.json, made by
    tests/reference/make_kv_cache_refs.py)."""
    import json
    import math
    from pathlib import Path

    from qpack.runtime.perplexity import perplexity, scoring_stream
    from qpack.runtime.tokenizer import Tokenizer

    data = Path(__file__).parent / "data"
    peer = json.loads((data / "kv_cache_refs.json").read_text())[name]
    peer_change = peer["q8_0"]["ppl"] / peer["f16"]["ppl"] - 1
    gf = open_gguf(str(request.getfixturevalue(f"{name}_path")))
    tok = Tokenizer.from_gguf(gf)
    texts = [
        scoring_stream(tok, (data / t).read_text())
        for t in ("GPL-3.txt", "PyInstaller-COPYING.txt")
    ]
    ppl = {}
    for cache in ("f16", "q8_0"):
        model = Model(gf, n_ctx=512, n_batch=512, cache_type_k=cache, cache_type_v=cache)
        nll = count = 0
        for tokens, bos in texts:
            *_, last = perplexity(model, tokens, 512, bos)
            nll += math.log(last.ppl) * last.tokens
            count += last.tokens
        assert count == peer[cache]["tokens"]  # the same windows as llama.cpp's
        ppl[cache] = math.exp(nll / count)
    change = ppl["q8_0"] / ppl["f16"] - 1
    print(f"{name}: perplexity f16 {ppl['f16']:.4f}, q8_0 {ppl['q8_0']:.4f} ({change:+.3%}; "
          f"llama.cpp {peer_change:+.3%})")  # fmt: skip
    assert abs(change) < 0.005
