"""Architectures as data over one shared forward pass (cython/forward.h).

An architecture is a handful of switches: where the norms sit, which activation gates the FFN,
how rope pairs dimensions, whether q/k are normed, which layers use a sliding window. Every
number comes from the GGUF metadata (`HParams.from_metadata`); adding an architecture is one
entry in ARCHITECTURES.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from .errors import UnsupportedModel

ACT_SILU = 0
ACT_GELU_TANH = 1


@dataclass(frozen=True)
class Architecture:
    name: str
    rope_neox: bool  # rotate halves (NEOX) instead of adjacent pairs (GGUF llama Q/K are permuted)
    activation: int = ACT_SILU  # gate activation of the FFN
    qk_norm: bool = False  # RMSNorm over each head of q and k before rope
    post_norms: bool = False  # RMSNorm on the attention and FFN outputs before the residual add
    embed_scale: bool = False  # multiply embeddings by sqrt(n_embd)
    swa_every: int = 0  # every Nth layer is global, the others use the sliding window
    swa_rope_base: float | None = 10000.0  # rope base of the sliding-window layers (None: global)
    default_window: int = 0  # sliding window when the GGUF does not give one
    attn_softcap: float = 0.0  # default cap*tanh(score/cap) on attention scores (0: none)
    final_softcap: float | None = None  # default cap*tanh(logit/cap) on the logits (None: never)
    fused_gate_up: bool = False  # ffn_up holds the gate rows, then the up rows (no ffn_gate)
    moe: bool = False  # every FFN is a router over experts (ffn_*_exps, 3-D)


ARCHITECTURES: dict[str, Architecture] = {
    "llama": Architecture("llama", rope_neox=False),
    # qwen2's q/k/v biases are optional tensors the loader picks up wherever they exist.
    "qwen2": Architecture("qwen2", rope_neox=True),
    "gemma3": Architecture(
        "gemma3",
        rope_neox=True,
        activation=ACT_GELU_TANH,
        qk_norm=True,
        post_norms=True,
        embed_scale=True,
        swa_every=6,
        swa_rope_base=10000.0,
        final_softcap=0.0,  # only when the GGUF asks for it
    ),
    # q/k RMS-normed per head like gemma3, otherwise qwen2 without biases.
    "qwen3": Architecture("qwen3", rope_neox=True, qk_norm=True),
    # Experts replace the FFN: softmax router, top-k, weights renormalised to sum 1.
    "qwen3moe": Architecture("qwen3moe", rope_neox=True, qk_norm=True, moe=True),
    # Fused attn_qkv (split by rows at load) and fused gate+up; rope factors as tensors.
    "phi3": Architecture("phi3", rope_neox=True, fused_gate_up=True),
    "gemma2": Architecture(
        "gemma2",
        rope_neox=True,
        activation=ACT_GELU_TANH,
        post_norms=True,
        embed_scale=True,
        swa_every=2,
        swa_rope_base=None,
        default_window=4096,
        attn_softcap=50.0,
        final_softcap=30.0,
    ),
}


def get_architecture(name: str) -> Architecture:
    try:
        return ARCHITECTURES[name]
    except KeyError:
        raise UnsupportedModel(
            f"architecture {name!r} is not supported; qpack runs: {', '.join(ARCHITECTURES)}"
        ) from None


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
    attn_scale: float
    sliding_window: int
    swa_layers: tuple[bool, ...]  # per layer: uses the sliding window
    swa_rope_base: float
    attn_softcap: float  # 0: none
    final_softcap: float  # 0: none
    rope_attn_factor: float  # multiplies rope's cos and sin (LongRoPE's attention scaling)
    n_ctx_orig: int  # beyond this context, phi3 uses its long rope factors
    n_expert: int  # 0: a dense FFN
    n_expert_used: int

    def is_swa_layer(self, layer: int) -> bool:
        return bool(self.sliding_window and self.swa_layers[layer])

    @classmethod
    def from_metadata(cls, md: Mapping[str, Any], path: str = "model") -> HParams:
        arch = get_architecture(str(md.get("general.architecture", "")))
        p = arch.name

        def get(key: str, default: Any = None, kind: type = int) -> Any:
            value = md.get(f"{p}.{key}", default)
            if value is None:
                raise UnsupportedModel(f"{path}: metadata key {p}.{key} is missing")
            try:
                return kind(value)
            except (TypeError, ValueError):
                raise UnsupportedModel(
                    f"{path}: metadata {p}.{key} = {value!r} is not a {kind.__name__}"
                ) from None

        n_embd = get("embedding_length")
        n_head = get("attention.head_count")
        n_head_kv = get("attention.head_count_kv", n_head)
        for key, value in (
            ("embedding_length", n_embd),
            ("attention.head_count", n_head),
            ("attention.head_count_kv", n_head_kv),
        ):
            if not 0 < value <= 1 << 20:
                raise UnsupportedModel(f"{path}: metadata {p}.{key} = {value} is out of range")
        if n_head % n_head_kv:
            raise UnsupportedModel(
                f"{path}: {n_head} heads do not divide into {n_head_kv} kv heads"
            )
        head_dim = get("attention.key_length", n_embd // n_head)
        head_dim_v = get("attention.value_length", head_dim)
        n_rot = get("rope.dimension_count", head_dim)
        if n_rot > head_dim or n_rot % 2:
            raise UnsupportedModel(
                f"{path}: rope dimension {n_rot} does not fit head size {head_dim}"
            )
        n_layer = get("block_count")
        n_expert = get("expert_count", 0) if arch.moe else 0
        n_expert_used = get("expert_used_count", 0) if arch.moe else 0
        if arch.moe and not 0 < n_expert_used <= n_expert <= 1 << 12:
            raise UnsupportedModel(
                f"{path}: {n_expert_used} experts used of {n_expert} is not a mixture of experts "
                f"qpack runs (metadata {p}.expert_count, {p}.expert_used_count)"
            )
        if arch.moe and f"{p}.expert_feed_forward_length" in md:
            n_ff = get("expert_feed_forward_length")
        elif arch.moe:  # llama.cpp's fallback: the dense width split over the used experts
            n_ff = get("feed_forward_length") // n_expert_used
        else:
            n_ff = get("feed_forward_length")
        n_ctx_train = get("context_length", 2048)
        # gemma2/3 27B scale queries by n_embd / n_head, the others by the head size
        # (llama.cpp tells them apart by layer count, as gemma_pytorch's config does).
        big_gemma = (arch.name, n_layer) in (("gemma2", 46), ("gemma3", 62))
        scale_dim = n_embd // n_head if big_gemma else head_dim
        window = 0
        swa_layers = (False,) * n_layer
        if arch.swa_every:
            window = get("attention.sliding_window", arch.default_window)
            swa_layers = _swa_layers(md.get(f"{p}.attention.sliding_window_pattern"), arch, n_layer)
        global_base = get("rope.freq_base", 10000.0, float)
        swa_base = global_base if arch.swa_rope_base is None else arch.swa_rope_base
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
            norm_eps=get("attention.layer_norm_rms_epsilon", 1e-5, float),
            rope_base=global_base,
            attn_scale=1.0 / math.sqrt(scale_dim),
            sliding_window=window,
            swa_layers=swa_layers,
            swa_rope_base=get("rope.freq_base_swa", swa_base, float) if window else swa_base,
            attn_softcap=(
                get("attn_logit_softcapping", arch.attn_softcap, float)
                if arch.attn_softcap
                else 0.0
            ),
            final_softcap=(
                0.0
                if arch.final_softcap is None
                else get("final_logit_softcapping", arch.final_softcap, float)
            ),
            rope_attn_factor=get("rope.scaling.attn_factor", 1.0, float),
            n_ctx_orig=get("rope.scaling.original_context_length", n_ctx_train),
            n_expert=n_expert,
            n_expert_used=n_expert_used,
        )
        for key in ("attn_softcap", "final_softcap"):
            if not 0.0 <= getattr(hp, key) < 1e6:
                raise UnsupportedModel(f"{path}: {key} = {getattr(hp, key)} is out of range")
        for key in ("n_layer", "n_ff", "head_dim", "head_dim_v", "n_ctx_train"):
            if not 0 < getattr(hp, key) <= 1 << 24:
                raise UnsupportedModel(
                    f"{path}: hyperparameter {key} = {getattr(hp, key)} is out of range"
                )
        return hp


def _swa_layers(pattern: Any, arch: Architecture, n_layer: int) -> tuple[bool, ...]:
    """Which layers slide, as llama.cpp reads it: a per-layer array, or a period N (every Nth
    layer global), or the architecture's own period."""
    if hasattr(pattern, "__len__"):  # a list or numpy array of per-layer flags
        if len(pattern) != n_layer:
            raise UnsupportedModel(
                f"{arch.name}.attention.sliding_window_pattern has {len(pattern)} entries "
                f"for {n_layer} layers"
            )
        return tuple(bool(x) for x in pattern)
    every = arch.swa_every if pattern is None else int(pattern)
    if not 0 <= every <= 1 << 16:
        raise UnsupportedModel(f"{arch.name}.attention.sliding_window_pattern = {every}")
    return tuple(every == 0 or (i + 1) % every != 0 for i in range(n_layer))
