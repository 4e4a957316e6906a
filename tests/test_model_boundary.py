"""A model file is hostile: each attack of issue 11 on the model side, with its safe outcome.

Two layers are tested apart. `read_model_facts` (runtime/facts.py) refuses a bad file with a
clear UnsupportedModel naming the key or tensor. The compiled model (model.pxi + forward.h)
refuses the same shapes when handed them directly, bypassing facts.py: its own check, not
trust in its caller. tests/fuzz/ runs many more mutations under ASan/UBSan.
"""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
from gguf import GGUFValueType
from qpack.runtime import cpu
from qpack.runtime.errors import QpackError, UnsupportedModel
from qpack.runtime.facts import read_model_facts
from qpack.runtime.gguf import open_gguf
from qpack.runtime.model import Model, native_arguments
from tiny_models import tiny_model

I32, U32, U64, F32 = (
    GGUFValueType.INT32,
    GGUFValueType.UINT32,
    GGUFValueType.UINT64,
    GGUFValueType.FLOAT32,
)
GENERIC = cpu._import("generic")


def load(path, **kw) -> Model:
    return Model(open_gguf(str(path)), n_ctx=32, threads=2, kernels=GENERIC, **kw)


# ---------------------------------------------------------------- the file, through facts.py


@pytest.mark.parametrize("window", [-1, -5, -(2**31)])
def test_negative_sliding_window_is_refused(tmp_path, window):
    """Was: -1 ran and printed garbage, a large negative window crashed with SIGSEGV."""
    path = tiny_model(
        tmp_path / "m.gguf", "gemma3", metadata={"gemma3.attention.sliding_window": (I32, window)}
    )
    with pytest.raises(UnsupportedModel, match=r"sliding_window = -\d+ is out of range"):
        load(path)


def test_wrapping_kv_product_is_refused(tmp_path):
    """Was: 257 kv heads x value length 16711681 wrapped to 256 in a 32-bit int, passed the
    shape checks, and the KV write ran past its buffer."""
    md = {
        "llama.attention.head_count": (U32, 257),
        "llama.attention.head_count_kv": (U32, 257),
        "llama.attention.value_length": (U32, 16711681),
    }
    path = tiny_model(tmp_path / "m.gguf", "llama", metadata=md)
    with pytest.raises(UnsupportedModel, match="value_length = 16711681 is out of range"):
        load(path)


@pytest.mark.parametrize(
    "key, value, problem",
    [
        ("llama.block_count", (F32, 2.7), "is not an integer"),  # was truncated to 2
        ("llama.block_count", (U32, 0), "out of range"),
        ("llama.block_count", (U64, 2**32 + 2), "out of range"),  # was 2 in a C int
        ("llama.embedding_length", (I32, -256), "out of range"),
        ("llama.attention.head_count_kv", (U32, 3), "do not divide"),
        ("llama.attention.key_length", (U32, 2**31), "out of range"),
        ("llama.rope.dimension_count", (U32, 65), "out of range"),
        ("llama.rope.dimension_count", (U32, 63), "odd"),
        ("llama.attention.layer_norm_rms_epsilon", (F32, float("nan")), "out of range"),
        ("llama.rope.freq_base", (F32, float("-inf")), "out of range"),
        ("llama.context_length", (U64, 2**63), "out of range"),
    ],
)
def test_hostile_hyperparameters_are_refused(tmp_path, key, value, problem):
    path = tiny_model(tmp_path / "m.gguf", "llama", metadata={key: value})
    with pytest.raises(UnsupportedModel, match=f"{key}.*{problem}|{problem}"):
        load(path)


@pytest.mark.parametrize(
    "tensor, shape",
    [
        ("blk.1.attn_v.weight", (129, 256)),  # one row too many
        ("blk.0.ffn_down.weight", (512, 256)),  # transposed
        ("blk.0.attn_norm.weight", (255,)),
        ("output_norm.weight", (16, 16)),  # the right count, the wrong rank
        ("output.weight", (268, 256)),  # vocabulary differs from token_embd
    ],
)
def test_tensor_dims_are_checked_against_the_architecture(tmp_path, tensor, shape):
    data = np.zeros(shape, np.float32)
    path = tiny_model(tmp_path / "m.gguf", "llama", tensors={tensor: (data, "F32")})
    with pytest.raises(UnsupportedModel, match=tensor.replace(".", r"\.")):
        load(path)


def test_missing_required_norm_is_named(tmp_path):
    path = tiny_model(tmp_path / "m.gguf", "gemma3", tensors={"blk.1.attn_k_norm.weight": None})
    with pytest.raises(UnsupportedModel, match=r"blk\.1\.attn_k_norm\.weight is missing"):
        load(path)


def test_vocabulary_size_is_checked_against_the_model_rows(tmp_path):
    """Was: never compared, so a logit_bias or token id past the rows failed every running
    request. Now the load fails, naming both sizes."""
    from gguf_fixtures import tiny_llama_vocab

    tokens, scores, types = tiny_llama_vocab()
    md = {
        "tokenizer.ggml.tokens": (GGUFValueType.ARRAY, (GGUFValueType.STRING, tokens + ["x"])),
        "tokenizer.ggml.scores": (GGUFValueType.ARRAY, (F32, scores + [-99.0])),
        "tokenizer.ggml.token_type": (GGUFValueType.ARRAY, (I32, types + [1])),
    }
    path = tiny_model(tmp_path / "m.gguf", "qwen2", metadata=md)
    with pytest.raises(UnsupportedModel, match="tokenizer has 270 tokens but .* 269 rows"):
        load(path)


def test_vocabulary_rows_past_int32_are_refused():
    """`m.n_vocab = <int>m.output.rows` truncated; no file that large is needed to see that
    the facts refuse such a shape (the reader hands shapes through as exact ints)."""
    gf = open_gguf(str(tiny_model_path()))
    tensors = dict(gf.tensors)
    ti = tensors["token_embd.weight"]
    tensors["token_embd.weight"] = SimpleNamespace(
        **{k: getattr(ti, k) for k in ("name", "type", "n_elements", "nbytes")},
        shape=(ti.shape[0], 2**32 + 269),
    )
    with pytest.raises(UnsupportedModel, match="rows"):
        read_model_facts(SimpleNamespace(path="m.gguf", metadata=gf.metadata, tensors=tensors))


_TINY: dict = {}


def tiny_model_path():
    if "path" not in _TINY:
        import tempfile
        from pathlib import Path

        _TINY["path"] = tiny_model(Path(tempfile.mkdtemp()) / "m.gguf", "gemma3", n_layers=6)
    return _TINY["path"]


# ---------------------------------------------------------------- C's own checks, facts bypassed


@pytest.fixture(scope="module")
def native_args():
    gf = open_gguf(str(tiny_model_path()))
    return native_arguments(gf, read_model_facts(gf), GENERIC)


def build_native(args, n_ctx=32, n_seq=1, n_batch=16, threads=2):
    c_hp, globals_, layers = args
    return GENERIC.NativeModel(c_hp, globals_, layers, n_ctx, n_seq, n_batch, threads)


def test_the_untouched_arguments_load(native_args):
    m = build_native(native_args)
    assert m.forward([5, 6], [0, 1], [0, 0], [1]).shape == (1, 269)


@pytest.mark.parametrize(
    "changes, problem",
    [
        ({"n_head": 257, "n_head_kv": 257, "head_dim_v": 16711681}, "head size is above 1024"),
        ({"n_head": 2**22, "n_head_kv": 2**14, "head_dim": 1024}, "does not fit a 32-bit int"),
        ({"n_head": 4, "n_head_kv": 3}, "do not divide"),
        ({"n_rot": -2}, "n_rot = -2 is out of range"),
        ({"n_rot": 3}, "rope dimension"),
        ({"n_rot": 1000}, "rope dimension"),
        ({"n_layer": 0}, "n_layer = 0 is out of range"),
        ({"n_layer": 2**31}, r"n_layer = 2147483648 is out of range"),
        ({"n_embd": -256}, "out of range"),
        ({"norm_eps": float("nan")}, "not finite"),
        ({"activation": 7}, "not finite or out of range"),
        ({"n_layer": 7}, "expected 7 layers, found 6"),
    ],
)
def test_c_refuses_hostile_hyperparameters(native_args, changes, problem):
    args = ({**native_args[0], **changes}, native_args[1], native_args[2])
    with pytest.raises(UnsupportedModel, match=problem):
        build_native(args)


def test_c_refuses_a_negative_window(native_args):
    layers = [dict(spec) for spec in native_args[2]]
    layers[3]["window"] = -1
    with pytest.raises(UnsupportedModel, match="sliding window = -1 is out of range"):
        build_native((native_args[0], native_args[1], layers))


@pytest.mark.parametrize("rows", [2**31, 2**32 + 269, -1])
def test_c_refuses_vocabulary_rows_past_int32(native_args, rows):
    c_hp, globals_, layers = native_args
    t, _, cols, data = globals_["output"]
    with pytest.raises(UnsupportedModel, match="rows"):
        build_native((c_hp, {**globals_, "output": (t, rows, cols, data)}, layers))


@pytest.mark.parametrize(
    "field, make",
    [
        ("wv", lambda t, r, c, d: (t, r * 2, c, d)),  # shape not the architecture's
        ("wo", lambda t, r, c, d: (t, r, c, d[: len(d) // 2])),  # fewer bytes than the shape
        ("gate", lambda t, r, c, d: (99, r, c, d)),  # unknown ggml type
        ("down", lambda t, r, c, d: (2**40, r, c, d)),  # a type id past C's int
        ("up", lambda t, r, c, d: None),  # missing
    ],
)
def test_c_refuses_bad_matrices(native_args, field, make):
    c_hp, globals_, layers = native_args
    layers = [dict(spec) for spec in layers]
    layers[1][field] = make(*layers[1][field])
    with pytest.raises(UnsupportedModel):
        build_native((c_hp, globals_, layers))


def test_c_refuses_missing_qk_norm(native_args):
    c_hp, globals_, layers = native_args
    layers = [dict(spec) for spec in layers]
    layers[2]["k_norm"] = None
    with pytest.raises(UnsupportedModel, match=r"blk\.2\.attn_k_norm\.weight is missing"):
        build_native((c_hp, globals_, layers))


@pytest.mark.parametrize("n_ctx, n_seq", [(2**30, 2**30), (0, 1), (32, -1)])
def test_huge_or_empty_state_is_an_error_not_a_wrap(native_args, n_ctx, n_seq):
    with pytest.raises(QpackError):
        build_native(native_args, n_ctx=n_ctx, n_seq=n_seq)
