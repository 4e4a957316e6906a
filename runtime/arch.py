"""Architectures as data over one shared forward pass (cython/forward.h).

An architecture is a handful of switches: where the norms sit, which activation gates the FFN,
how rope pairs dimensions, whether q/k are normed, which layers use a sliding window. Every
number comes from the GGUF metadata (`facts.HParams.from_metadata`); adding an architecture is one
entry in ARCHITECTURES.
"""

from __future__ import annotations

from dataclasses import dataclass

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
