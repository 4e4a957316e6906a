"""The one source of model facts, and the one validation boundary for what C reads.

A GGUF file is untrusted. `read_model_facts` checks every number the compiled forward pass
(cython/model.pxi, cython/forward.h) will use, with exact Python integers: hyperparameter
ranges, the products C computes in 32-bit `int`, divisibility, and every tensor's type and
dims against what the architecture expects. What comes out (`ModelFacts`) is what the runtime
hands to C, what `qpack inspect` prints and what the builder validates with; its memory
figures are the formulas model.pxi allocates by (a test holds them equal).

The C side re-checks its own invariants at load (qk_model_check in forward.h), so a caller
that skips this module still gets an error, never an out-of-bounds access.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from .arch import ACT_GELU_TANH, Architecture, get_architecture
from .errors import UnsupportedModel
from .kv_cache import cache_row_bytes
from .quants import SUPPORTED_WEIGHT_TYPES

INT32_MAX = 2**31 - 1
# Limits of the C side (forward.h): rope and score tables of 1024 floats, at most 256 query
# heads per KV head in an attention chunk.
MAX_HEAD_DIM = 1024
MAX_GROUP = 256
MAX_LAYERS = 4096
MAX_DIM = 1 << 20  # embedding, heads
MAX_LENGTH = 1 << 24  # feed-forward, context, sliding window
MAX_EXPERTS = 4096  # forward.h's bound on a mixture of experts
F16_BYTES, F32_BYTES = 2, 4
DEFAULT_CTX = 4096  # the context when none is asked for, if the model was trained on more
DEFAULT_BATCH = 512  # prompt tokens processed together; sizes the activation buffers

# GGUF tensor name (per layer) -> vector field of the C layer struct (matrices: model.py).
LAYER_VECTORS = {
    "attn_norm": "attn_norm.weight",
    "ffn_norm": "ffn_norm.weight",
    "post_attn_norm": "post_attention_norm.weight",
    "post_ffn_norm": "post_ffw_norm.weight",
    "q_norm": "attn_q_norm.weight",
    "k_norm": "attn_k_norm.weight",
    "bq": "attn_q.bias",
    "bk": "attn_k.bias",
    "bv": "attn_v.bias",
}


@dataclass(frozen=True)
class HParams:
    """The hyperparameters the forward pass needs, read and checked from metadata."""

    arch: Architecture
    n_layer: int
    n_embd: int
    n_ff: int
    n_head: int
    n_head_kv: int
    head_dim: int  # key/query length per head
    head_dim_v: int
    n_rot: int
    n_ctx_train: int
    norm_eps: float
    rope_base: float
    sliding_window: int  # 0: every layer attends globally
    swa_layers: tuple[bool, ...] = ()  # per layer: uses the sliding window
    swa_rope_base: float = 10000.0  # rope base of the sliding-window layers
    attn_scale_dim: int = 0  # queries are scaled by 1/sqrt(this); 0: the head size
    attn_softcap: float = 0.0  # cap*tanh(score/cap) on attention scores; 0: none
    final_softcap: float = 0.0  # cap*tanh(logit/cap) on the logits; 0: none
    rope_attn_factor: float = 1.0  # multiplies rope's cos and sin (LongRoPE)
    n_ctx_orig: int = 0  # beyond this context, phi3's long rope factors apply
    n_expert: int = 0  # 0: dense FFNs; else n_ff is one expert's width
    n_expert_used: int = 0

    @property
    def attn_scale(self) -> float:
        return 1.0 / math.sqrt(self.attn_scale_dim or self.head_dim)

    @property
    def q_dim(self) -> int:
        return self.n_head * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.n_head_kv * self.head_dim

    @property
    def kv_dim_v(self) -> int:
        return self.n_head_kv * self.head_dim_v

    @property
    def att_dim(self) -> int:
        return self.n_head * self.head_dim_v

    def is_swa_layer(self, layer: int) -> bool:
        return bool(self.sliding_window and self.swa_layers[layer])

    def layer_window(self, layer: int) -> int:
        return self.sliding_window if self.is_swa_layer(layer) else 0

    def layer_rope_base(self, layer: int) -> float:
        return self.swa_rope_base if self.is_swa_layer(layer) else self.rope_base

    @classmethod
    def from_metadata(cls, md: Mapping[str, Any], path: str = "model") -> HParams:
        arch = get_architecture(str(md.get("general.architecture", "")))
        p = arch.name

        def integer(key: str, low: int, high: int, default: int | None = None) -> int:
            value = md.get(f"{p}.{key}", default)
            if value is None:
                raise UnsupportedModel(f"{path}: metadata key {p}.{key} is missing")
            # exact: a float, bool, string or array is refused rather than truncated
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
                raise UnsupportedModel(f"{path}: metadata {p}.{key} = {value!r} is not an integer")
            value = int(value)
            if not low <= value <= high:
                raise UnsupportedModel(
                    f"{path}: metadata {p}.{key} = {value} is out of range ({low}..{high})"
                )
            return value

        def real(key: str, low: float, high: float, default: float) -> float:
            value = md.get(f"{p}.{key}", default)
            if isinstance(value, bool) or not isinstance(value, (int, float, np.number)):
                raise UnsupportedModel(f"{path}: metadata {p}.{key} = {value!r} is not a number")
            value = float(value)
            if not (math.isfinite(value) and low <= value <= high):
                raise UnsupportedModel(
                    f"{path}: metadata {p}.{key} = {value} is out of range ({low}..{high})"
                )
            return value

        n_embd = integer("embedding_length", 1, MAX_DIM)
        n_head = integer("attention.head_count", 1, MAX_DIM)
        n_head_kv = integer("attention.head_count_kv", 1, MAX_DIM, n_head)
        if n_head % n_head_kv or n_head // n_head_kv > MAX_GROUP:
            raise UnsupportedModel(
                f"{path}: {n_head} heads do not divide into groups of at most {MAX_GROUP} "
                f"for {n_head_kv} kv heads"
            )
        # the default head size is the embedding split over heads, which must then be exact
        default_hd = n_embd // n_head if n_embd % n_head == 0 else None
        head_dim = integer("attention.key_length", 1, MAX_HEAD_DIM, default_hd)
        head_dim_v = integer("attention.value_length", 1, MAX_HEAD_DIM, head_dim)
        n_rot = integer("rope.dimension_count", 0, head_dim, head_dim)
        if n_rot % 2:
            raise UnsupportedModel(f"{path}: rope dimension {n_rot} is odd")
        n_layer = integer("block_count", 1, MAX_LAYERS)
        n_expert = n_expert_used = 0
        if arch.moe:
            n_expert = integer("expert_count", 1, MAX_EXPERTS)
            n_expert_used = integer("expert_used_count", 1, n_expert)
            # llama.cpp's fallback: the dense width split over the experts used
            dense = md.get(f"{p}.feed_forward_length")
            split = int(dense) // n_expert_used if isinstance(dense, (int, np.integer)) else None
            n_ff = integer("expert_feed_forward_length", 1, MAX_LENGTH, split)
            for what, rows in (
                ("n_expert x n_ff", n_expert * n_ff),
                ("n_expert x n_embd", n_expert * n_embd),
            ):
                if rows > INT32_MAX:
                    raise UnsupportedModel(f"{path}: {what} = {rows} is too large")
        else:
            n_ff = integer("feed_forward_length", 1, MAX_LENGTH)
        n_ctx_train = integer("context_length", 1, MAX_LENGTH, 2048)
        window, swa_layers = 0, (False,) * n_layer
        rope_base = real("rope.freq_base", 1e-3, 1e30, 10000.0)
        swa_base = rope_base if arch.swa_rope_base is None else arch.swa_rope_base
        if arch.swa_every:
            window = integer("attention.sliding_window", 0, MAX_LENGTH, arch.default_window)
            pattern = md.get(f"{p}.attention.sliding_window_pattern")
            swa_layers = _swa_layers(pattern, arch, n_layer, path)
            swa_base = real("rope.freq_base_swa", 1e-3, 1e30, swa_base)
        # gemma2/3 27B scale queries by n_embd / n_head, the others by the head size (llama.cpp
        # tells them apart by layer count, as gemma_pytorch's configs do)
        big_gemma = (arch.name, n_layer) in (("gemma2", 46), ("gemma3", 62))
        finals = arch.final_softcap
        hp = cls(
            arch=arch,
            n_layer=n_layer,
            n_embd=n_embd,
            n_ff=n_ff,
            n_head=n_head,
            n_head_kv=n_head_kv,
            head_dim=head_dim,
            head_dim_v=head_dim_v,
            n_rot=n_rot,
            n_ctx_train=n_ctx_train,
            norm_eps=real("attention.layer_norm_rms_epsilon", 0.0, 1.0, 1e-5),
            rope_base=rope_base,
            sliding_window=window,
            swa_layers=swa_layers,
            swa_rope_base=swa_base,
            attn_scale_dim=n_embd // n_head if big_gemma else 0,
            attn_softcap=(
                real("attn_logit_softcapping", 1e-3, 1e6, arch.attn_softcap)
                if arch.attn_softcap
                else 0.0
            ),
            final_softcap=0.0
            if finals is None
            else real("final_logit_softcapping", 0.0, 1e6, finals),
            rope_attn_factor=real("rope.scaling.attn_factor", 1e-6, 1e6, 1.0),
            n_ctx_orig=integer("rope.scaling.original_context_length", 1, MAX_LENGTH, n_ctx_train),
            n_expert=n_expert,
            n_expert_used=n_expert_used,
        )
        for name in ("q_dim", "kv_dim", "kv_dim_v", "att_dim"):
            if getattr(hp, name) > INT32_MAX:  # C holds them in int
                raise UnsupportedModel(f"{path}: {name} = {getattr(hp, name)} is too large")
        return hp


def _swa_layers(pattern: Any, arch: Architecture, n_layer: int, path: str) -> tuple[bool, ...]:
    """Which layers slide, as llama.cpp reads attention.sliding_window_pattern: a per-layer
    array, or a period N (every Nth layer global, 0: all slide), or the architecture's own."""
    key = f"{path}: metadata {arch.name}.attention.sliding_window_pattern"
    if pattern is not None and not isinstance(pattern, (int, np.integer)):
        flags = (
            list(pattern) if hasattr(pattern, "__len__") and not isinstance(pattern, str) else None
        )
        if flags is None or len(flags) != n_layer:
            raise UnsupportedModel(f"{key} is neither a period nor one flag per layer")
        return tuple(bool(x) for x in flags)
    every = arch.swa_every if pattern is None else int(pattern)
    if not 0 <= every <= MAX_LAYERS:
        raise UnsupportedModel(f"{key} = {every} is out of range (0..{MAX_LAYERS})")
    return tuple(every == 0 or (i + 1) % every != 0 for i in range(n_layer))


@dataclass(frozen=True)
class ModelFacts:
    """What a model is, checked: hyperparameters, vocabulary rows, weights, memory needs."""

    path: str
    hp: HParams
    n_vocab: int  # rows of the embedding and of the output head
    tied_output: bool
    n_parameters: int
    weight_bytes: int

    @property
    def default_ctx(self) -> int:
        return min(self.hp.n_ctx_train, DEFAULT_CTX)

    def kv_bytes(self, n_ctx: int, n_seq: int = 1, type_k: str = "f16", type_v: str = "f16") -> int:
        """K and V of the given cache types for every layer, sequence and position
        (model.pxi's allocation)."""
        hp = self.hp
        rows = hp.n_layer * n_seq * n_ctx * hp.n_head_kv
        return rows * (
            cache_row_bytes(type_k, hp.head_dim) + cache_row_bytes(type_v, hp.head_dim_v)
        )

    def buffer_bytes(self, n_batch: int) -> int:
        """The f32 activations model.pxi allocates for batches of n_batch tokens: residual,
        normed input and block output (3 x n_embd), q, k, v, attention output, gate and up."""
        hp = self.hp
        dense_ff = 0 if hp.n_expert else hp.n_ff  # the experts' buffers are forward.h's
        per_token = 3 * hp.n_embd + hp.q_dim + hp.kv_dim + hp.kv_dim_v + hp.att_dim + 2 * dense_ff
        return n_batch * per_token * F32_BYTES

    def runtime_bytes_estimate(
        self, n_batch: int, n_threads: int, n_ctx: int, cache_type_k: str = "f16"
    ) -> int:
        """An upper estimate of forward.h's own scratch (qk_model_init): quantized activation
        rows (at most f32-sized), per thread a tile panel and attention scratch, the states of
        attention split across threads, and with a q8_0 K cache the queries in q8_0 (34-byte
        blocks and a 4-byte sum per 32 values)."""
        hp = self.hp
        query_q8 = 0
        if cache_type_k == "q8_0":  # the blocks, and an int32 sum per block
            query_q8 = (
                n_batch * hp.n_head * (cache_row_bytes("q8_0", hp.head_dim) + hp.head_dim // 8)
            )
        widest = max(hp.n_embd, hp.n_ff, hp.att_dim)
        group = hp.n_head // hp.n_head_kv
        rows = max(64 // group, 1) * group
        att = (
            hp.head_dim * 64
            + 64 * hp.head_dim_v
            + rows * (64 + hp.head_dim_v + 2)
            + 2 * rows * (hp.head_dim_v + 2)
            + 64
        )
        # the states of attention split across threads (forward.h's qk_att_parts_floats)
        spans = -(-n_ctx // 256)
        parts = min(min(n_batch, 4) * hp.n_head * spans * (hp.head_dim_v + 2), 8 << 20)
        parts += 4 * (n_batch + 1)  # two int64 per block
        rope = 4 * n_batch * max(hp.n_rot, 1)
        # mixture of experts (qk_moe_init): router outputs, routes, gate/up/down rows per route,
        # and grouped quantized inputs (at most f32-sized, in at most 3 formats)
        routes = n_batch * hp.n_expert_used
        moe = (
            n_batch * hp.n_expert
            + routes * (4 + 2 * hp.n_ff + hp.n_embd + 3 * max(hp.n_embd, hp.n_ff))
            + 3 * hp.n_expert
            + 1
        )
        floats = n_batch * widest + n_threads * (att + 8 * widest) + rope + moe + parts
        return F32_BYTES * floats + query_q8

    def c_hparams(self) -> dict[str, Any]:
        """The hyperparameters as the C model struct takes them."""
        hp = self.hp
        return {
            "n_layer": hp.n_layer,
            "n_embd": hp.n_embd,
            "n_ff": hp.n_ff,
            "n_head": hp.n_head,
            "n_head_kv": hp.n_head_kv,
            "head_dim": hp.head_dim,
            "head_dim_v": hp.head_dim_v,
            "n_rot": hp.n_rot,
            "rope_neox": int(hp.arch.rope_neox),
            "activation": int(hp.arch.activation == ACT_GELU_TANH),
            "qk_norm": int(hp.arch.qk_norm),
            "post_norms": int(hp.arch.post_norms),
            "norm_eps": hp.norm_eps,
            "embd_scale": math.sqrt(hp.n_embd) if hp.arch.embed_scale else 1.0,
            "attn_scale": hp.attn_scale,
            "n_expert": hp.n_expert,
            "n_expert_used": hp.n_expert_used,
            "attn_softcap": hp.attn_softcap,
            "final_softcap": hp.final_softcap,
            "rope_attn_factor": hp.rope_attn_factor,
        }


def check_tensor_types(gguf: Any, path: str) -> None:
    """Refuse at load, naming the type, rather than give a wrong answer."""
    for ti in gguf.tensors.values():
        if ti.type.name not in SUPPORTED_WEIGHT_TYPES:
            raise UnsupportedModel(
                f"{path}: tensor {ti.name} has type {ti.type.name}, which qpack does not run "
                f"(supported: {', '.join(sorted(SUPPORTED_WEIGHT_TYPES))}); "
                "use a GGUF quantized to one of those"
            )


def expected_tensors(
    hp: HParams, fused_qkv: frozenset[int] = frozenset()
) -> dict[str, tuple[tuple[int, ...], bool]]:
    """Every tensor the forward pass reads: name -> (ggml dims, required). The vocabulary
    dimension of token_embd/output is -1 (any, checked apart). Layers in fused_qkv hold q, k
    and v as one attn_qkv matrix (phi3; llama.cpp takes one for any architecture)."""
    E, F, X, a = hp.n_embd, hp.n_ff, hp.n_expert, hp.arch
    t: dict[str, tuple[tuple[int, ...], bool]] = {
        "token_embd.weight": ((E, -1), True),
        "output.weight": ((E, -1), False),
        "output_norm.weight": ((E,), True),
        # divisors of the rope angles: llama 3's, or phi3's LongRoPE long/short pair
        "rope_freqs.weight": ((hp.n_rot // 2,), False),
        "rope_factors_long.weight": ((hp.n_rot // 2,), False),
        "rope_factors_short.weight": ((hp.n_rot // 2,), False),
    }
    for i in range(hp.n_layer):
        p = f"blk.{i}."
        if i in fused_qkv:
            t[p + "attn_qkv.weight"] = ((E, hp.q_dim + hp.kv_dim + hp.kv_dim_v), True)
        else:
            t.update({
                p + "attn_q.weight": ((E, hp.q_dim), True),
                p + "attn_k.weight": ((E, hp.kv_dim), True),
                p + "attn_v.weight": ((E, hp.kv_dim_v), True),
            })  # fmt: skip
        if a.moe:
            t.update({
                p + "ffn_gate_inp.weight": ((E, X), True),
                p + "ffn_gate_exps.weight": ((E, F, X), True),
                p + "ffn_up_exps.weight": ((E, F, X), True),
                p + "ffn_down_exps.weight": ((F, E, X), True),
            })  # fmt: skip
        elif a.fused_gate_up:  # gate rows, then up rows
            t[p + "ffn_up.weight"] = ((E, 2 * F), True)
            t[p + "ffn_down.weight"] = ((F, E), True)
        else:
            t.update({
                p + "ffn_gate.weight": ((E, F), True),
                p + "ffn_up.weight": ((E, F), True),
                p + "ffn_down.weight": ((F, E), True),
            })  # fmt: skip
        t.update({
            p + "attn_output.weight": ((hp.att_dim, E), True),
            p + "attn_norm.weight": ((E,), True),
            p + "ffn_norm.weight": ((E,), True),
            p + "post_attention_norm.weight": ((E,), a.post_norms),
            p + "post_ffw_norm.weight": ((E,), a.post_norms),
            p + "attn_q_norm.weight": ((hp.head_dim,), a.qk_norm),
            p + "attn_k_norm.weight": ((hp.head_dim,), a.qk_norm),
            p + "attn_q.bias": ((hp.q_dim,), False),
            p + "attn_k.bias": ((hp.kv_dim,), False),
            p + "attn_v.bias": ((hp.kv_dim_v,), False),
        })  # fmt: skip
    return t


def read_model_facts(gguf: Any, path: str | None = None) -> ModelFacts:
    """Check everything the forward pass will read from `gguf` and return its facts; raises
    UnsupportedModel naming the key or tensor otherwise."""
    path = path or getattr(gguf, "path", "model")
    try:
        get_architecture(str(gguf.metadata.get("general.architecture", "")))
    except UnsupportedModel as e:
        raise UnsupportedModel(f"{path}: {e}") from None
    check_tensor_types(gguf, path)
    if not gguf.tensors:
        raise UnsupportedModel(f"{path}: the GGUF holds no tensors")
    hp = HParams.from_metadata(gguf.metadata, path)
    fused = frozenset(i for i in range(hp.n_layer) if f"blk.{i}.attn_qkv.weight" in gguf.tensors)
    n_vocab = None
    for name, (dims, required) in expected_tensors(hp, fused).items():
        ti = gguf.tensors.get(name)
        if ti is None:
            if required:
                raise UnsupportedModel(f"{path}: tensor {name} is missing")
            continue
        shape = tuple(int(d) for d in ti.shape)
        if name in ("token_embd.weight", "output.weight"):
            if len(shape) != 2 or shape[0] != dims[0]:
                raise UnsupportedModel(
                    f"{path}: tensor {name} has shape {list(shape)}, expected [{dims[0]}, vocab]"
                )
            if not 0 < shape[1] <= INT32_MAX:
                raise UnsupportedModel(f"{path}: tensor {name} has {shape[1]} rows (vocabulary)")
            if n_vocab is not None and shape[1] != n_vocab:
                raise UnsupportedModel(
                    f"{path}: token_embd.weight has {n_vocab} rows but output.weight {shape[1]}"
                )
            n_vocab = shape[1]
        elif shape != dims:
            raise UnsupportedModel(
                f"{path}: tensor {name} has shape {list(shape)}, expected {list(dims)}"
            )
    assert n_vocab is not None  # token_embd.weight is required
    tokens = gguf.metadata.get("tokenizer.ggml.tokens")
    if tokens is not None and len(tokens) != n_vocab:
        raise UnsupportedModel(
            f"{path}: the tokenizer has {len(tokens)} tokens but the model's embedding "
            f"{n_vocab} rows"
        )
    return ModelFacts(
        path=path,
        hp=hp,
        n_vocab=n_vocab,
        tied_output="output.weight" not in gguf.tensors,
        n_parameters=sum(ti.n_elements for ti in gguf.tensors.values()),
        weight_bytes=sum(ti.nbytes for ti in gguf.tensors.values()),
    )
