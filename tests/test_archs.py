"""qwen3, qwen3moe, phi3 and gemma2 against llama.cpp, the reference for GGUF semantics.

tests/reference/make_arch_refs.py wrote tiny random GGUFs of each architecture (F32, and Q8_0
by llama.cpp's quantizer) into tests/data/arch_refs/ and scored prompts with llama-cpp-python;
here qpack scores the same files: the same most likely token, and log-probabilities within
0.02 (F32) at every position of every prompt. The float64 reference (reference_forward.py)
checks the same architectures with K-quant weights, the mixture of experts on every CPU
variant, and bit-identical results whatever the threads and batching.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from gguf import GGUFValueType
from qpack.runtime import cpu
from qpack.runtime.errors import UnsupportedModel
from qpack.runtime.facts import read_model_facts
from qpack.runtime.gguf import open_gguf
from qpack.runtime.model import Model, native_arguments
from reference_forward import ReferenceModel
from tiny_models import tiny_model

U32, F32 = GGUFValueType.UINT32, GGUFValueType.FLOAT32
ARRAY, BOOL = GGUFValueType.ARRAY, GGUFValueType.BOOL
DATA = Path(__file__).parent / "data" / "arch_refs"
CASES = ["qwen3", "qwen3moe", "phi3", "phi3-long", "gemma2"]
TOLERANCE = {"f32": 0.02, "q8_0": 0.05}  # Q8_0: both engines quantize activations to 8 bits
VARIANTS = cpu.supported_variants()


def log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    m = x.max(axis=-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(axis=-1, keepdims=True))


@pytest.mark.parametrize("weights", ["f32", "q8_0"])
@pytest.mark.parametrize("case", CASES)
def test_log_probabilities_match_llama_cpp(case, weights):
    ref = np.load(DATA / f"{case}-{weights}.npz")
    model = Model(open_gguf(str(DATA / f"{case}-{weights}.gguf")), n_ctx=int(ref["n_ctx"]))
    tol = TOLERANCE[weights]
    for p, prompt in enumerate(ref["prompts"]):
        ours = log_softmax(model.logits(prompt.tolist(), all_rows=True))
        ids, theirs = ref["top_ids"][p], ref["top_logprobs"][p]
        diff = np.abs(np.take_along_axis(ours, ids, axis=1) - theirs)
        assert diff.max() <= tol, (p, diff.max(), np.argmax(diff.max(axis=1)))
        # the same top-1 wherever llama.cpp's top two are not within the tolerance
        clear = theirs[:, 0] - theirs[:, 1] > tol
        assert np.array_equal(ours.argmax(axis=1)[clear], ids[clear, 0]), p


@pytest.mark.parametrize(
    "arch,weights",
    [
        ("qwen3", "Q4_K"),
        ("qwen3moe", "Q4_K"),
        ("qwen3moe", "Q4_0"),
        ("phi3", "Q6_K"),
        ("gemma2", "Q5_K"),
    ],
)
def test_quantized_weights_track_the_float64_reference(tmp_path, arch, weights):
    path = tiny_model(tmp_path / "m.gguf", arch, weights, n_layers=2, window=8, softcaps=(20, 30))
    toks = np.random.default_rng(3).integers(3, 269, 24).tolist()
    ours = Model(open_gguf(str(path)), n_ctx=64).logits(toks, all_rows=True)
    exact = ReferenceModel(path).logits(toks)
    # 8-bit activations: errors of a few percent of the logits' spread (as test_model.py)
    spread = exact.std()
    assert np.abs(ours - exact).mean() / spread < 0.03
    assert np.abs(ours - exact).max() / spread < 0.2
    assert (ours.argmax(1) == exact.argmax(1)).mean() >= 0.75


@pytest.mark.parametrize("variant", VARIANTS)
def test_mixture_of_experts_on_every_variant(tmp_path, variant):
    """Many experts, several used: the grouped kernel on each CPU variant against float64."""
    path = tiny_model(
        tmp_path / "m.gguf", "qwen3moe", "F32", n_ff=256, n_expert=16, n_expert_used=4
    )
    toks = np.random.default_rng(4).integers(3, 269, 70).tolist()  # > one 64-token block
    model = Model(open_gguf(str(path)), n_ctx=96, kernels=cpu._import(variant), threads=2)
    ours = model.logits(toks, all_rows=True)
    assert np.abs(ours - ReferenceModel(path).logits(toks)).max() < 2e-3


@pytest.mark.parametrize("variant", VARIANTS)
def test_experts_do_not_depend_on_threads_or_batching(tmp_path, variant):
    """A token's experts give the same bits whoever shares its batch and however many
    threads take the (expert x rows) chunks: prefill, chunked prefill and decode agree."""
    path = tiny_model(tmp_path / "m.gguf", "qwen3moe", "Q4_K", n_expert=16, n_expert_used=4)
    toks = np.random.default_rng(5).integers(3, 269, 50).tolist()

    def load(**kw) -> Model:
        return Model(open_gguf(str(path)), n_ctx=64, kernels=cpu._import(variant), **kw)

    whole = load(threads=1).logits(toks, all_rows=True)
    assert np.array_equal(load(threads=3).logits(toks, all_rows=True), whole)
    assert np.array_equal(load(threads=2, n_batch=7).logits(toks, all_rows=True), whole)
    m = load(threads=2)
    steps = [m.forward([t], [i], [0], [0])[0] for i, t in enumerate(toks)]
    assert np.array_equal(np.stack(steps), whole)


def test_phi3_rope_factors_follow_the_context(tmp_path):
    """phi3 picks its long rope factors only past the original context, as llama.cpp does."""
    path = tiny_model(tmp_path / "m.gguf", "phi3", "F32", n_ctx_orig=64)
    toks = np.random.default_rng(6).integers(3, 269, 20).tolist()
    short = Model(open_gguf(str(path)), n_ctx=64).logits(toks, all_rows=True)
    long = Model(open_gguf(str(path)), n_ctx=128).logits(toks, all_rows=True)
    assert not np.allclose(short, long, atol=1e-3)
    ref = ReferenceModel(path)
    ref.n_ctx = 128
    assert np.abs(long - ref.logits(toks)).max() < 2e-3


def test_gemma2_soft_caps_bound_the_logits(tmp_path):
    """tiny_model's gemma2 caps attention scores at 5 and logits at 3: both bind here."""
    path = tiny_model(tmp_path / "m.gguf", "gemma2", "F32", n_layers=2)
    toks = [5, 6, 7, 100, 200]
    logits = Model(open_gguf(str(path)), n_ctx=32).logits(toks, all_rows=True)
    ref = ReferenceModel(path)
    assert np.abs(logits - ref.logits(toks)).max() < 2e-3
    assert np.abs(logits).max() <= 3.0
    ref.final_cap = 0.0
    assert np.abs(ref.logits(toks)).max() > 3.0


# ---------------------------------------------------------------- hostile files


@pytest.mark.parametrize(
    "arch, metadata, tensors, problem",
    [
        ("qwen3moe", {"qwen3moe.expert_used_count": (U32, 9)}, {}, "expert_used_count = 9"),
        ("qwen3moe", {"qwen3moe.expert_count": (U32, 0)}, {}, "expert_count = 0"),
        (
            "qwen3moe",
            {"qwen3moe.expert_feed_forward_length": None, "qwen3moe.feed_forward_length": None},
            {},
            "expert_feed_forward_length is missing",
        ),
        (  # 7 experts stored where the metadata says 8
            "qwen3moe",
            {},
            {"blk.1.ffn_up_exps.weight": (np.zeros((7, 256, 256), np.float32), "F32")},
            r"blk\.1\.ffn_up_exps\.weight has shape \[256, 256, 7\]",
        ),
        (
            "phi3",
            {},
            {"blk.0.attn_qkv.weight": (np.zeros((500, 256), np.float32), "F32")},
            r"blk\.0\.attn_qkv\.weight has shape",
        ),
        (
            "phi3",
            {},
            {"rope_factors_short.weight": (np.ones(5, np.float32), "F32")},
            r"rope_factors_short\.weight has shape \[5\]",
        ),
        ("gemma2", {"gemma2.attn_logit_softcapping": (F32, float("nan"))}, {}, "out of range"),
        (
            "gemma2",
            {"gemma2.attention.sliding_window_pattern": (ARRAY, (BOOL, [True, False, True]))},
            {},
            "sliding_window_pattern",
        ),
    ],
)
def test_hostile_files_are_refused_by_name(tmp_path, arch, metadata, tensors, problem):
    path = tiny_model(tmp_path / "m.gguf", arch, metadata=metadata, tensors=tensors)
    with pytest.raises(UnsupportedModel, match=problem):
        Model(open_gguf(str(path)), n_ctx=32, threads=1)


def test_compiled_model_refuses_bad_experts_itself(tmp_path):
    """Handed hostile expert counts directly (facts.py bypassed), the C side refuses them."""
    path = tiny_model(tmp_path / "m.gguf", "qwen3moe")
    gf = open_gguf(str(path))
    c_hp, globals_, layers = native_arguments(gf, read_model_facts(gf), cpu._import("generic"))
    for changes, problem in (
        ({"n_expert_used": 9}, "experts used"),
        ({"n_expert": 4, "n_expert_used": 2}, r"ffn_gate_inp\.weight has shape"),
        ({"attn_softcap": float("nan")}, "not finite"),
    ):
        with pytest.raises(UnsupportedModel, match=problem):
            cpu._import("generic").NativeModel({**c_hp, **changes}, globals_, layers, 32, 1, 8, 2)
