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
    swa_rope_base: float = 10000.0  # rope base of the sliding-window layers


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

    def is_swa_layer(self, layer: int) -> bool:
        every = self.arch.swa_every
        return bool(every and self.sliding_window and (layer + 1) % every != 0)

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
        hp = cls(
            arch=arch,
            n_layer=get("block_count"),
            n_embd=n_embd,
            n_ff=get("feed_forward_length"),
            n_head=n_head,
            n_head_kv=n_head_kv,
            head_dim=head_dim,
            head_dim_v=head_dim_v,
            n_rot=n_rot,
            n_ctx_train=get("context_length", 2048),
            norm_eps=get("attention.layer_norm_rms_epsilon", 1e-5, float),
            rope_base=get("rope.freq_base", 10000.0, float),
            attn_scale=1.0 / math.sqrt(head_dim),
            sliding_window=get("attention.sliding_window", 0) if arch.swa_every else 0,
        )
        for key in ("n_layer", "n_ff", "head_dim", "head_dim_v", "n_ctx_train"):
            if not 0 < getattr(hp, key) <= 1 << 24:
                raise UnsupportedModel(
                    f"{path}: hyperparameter {key} = {getattr(hp, key)} is out of range"
                )
        return hp
