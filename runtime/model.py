"""Builds the compiled model from an open GGUF file: weights stay views of the mapping.

`Model` is what the engine talks to: a forward pass over a batch of (token, position, slot)
rows, plus the facts a user wants reported at load (KV cache and scratch memory).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import numpy as np

from . import cpu
from .arch import ACT_GELU_TANH, HParams
from .errors import UnsupportedModel
from .quants import SUPPORTED_WEIGHT_TYPES

DEFAULT_CTX = 4096

# GGUF tensor name (per layer) -> field of the C layer struct (matrices: see Model.__init__).
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


def physical_cores() -> int:
    """Threads default to physical cores: hyperthreads share the units the kernels saturate."""
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            pairs = set()
            phys = core = None
            for line in f:
                if line.startswith("physical id"):
                    phys = line.split(":")[1].strip()
                elif line.startswith("core id"):
                    core = line.split(":")[1].strip()
                    pairs.add((phys, core))
            if pairs:
                return len(pairs)
    except OSError:
        pass
    return max(1, (os.cpu_count() or 2) // 2 if (os.cpu_count() or 1) > 2 else os.cpu_count() or 1)


@dataclass
class LoadReport:
    variant: str
    threads: int
    n_ctx: int
    n_seq: int
    weights_bytes: int
    kv_bytes: int
    scratch_bytes: int

    def describe(self) -> str:
        mib = 1 << 20
        return (
            f"kernels {self.variant}, {self.threads} threads, context {self.n_ctx} x {self.n_seq} "
            f"seq: weights {self.weights_bytes / mib:.0f} MiB (mapped), KV cache "
            f"{self.kv_bytes / mib:.1f} MiB, scratch {self.scratch_bytes / mib:.1f} MiB"
        )


class Model:
    """A GGUF model ready to run: hyperparameters, the compiled forward pass, the load report."""

    def __init__(
        self,
        gguf: Any,
        n_ctx: int | None = None,
        n_seq: int = 1,
        n_batch: int = 512,
        threads: int | None = None,
        kernels: ModuleType | None = None,
    ):
        self.gguf = gguf
        path = getattr(gguf, "path", "model")
        check_tensor_types(gguf)
        self.hp = hp = HParams.from_metadata(gguf.metadata, path)
        self.n_ctx = min(hp.n_ctx_train, DEFAULT_CTX) if n_ctx is None else int(n_ctx)
        if self.n_ctx < 8:
            raise UnsupportedModel(f"context size {self.n_ctx} is too small (at least 8)")
        self.threads = threads or physical_cores()
        self.kernels = kernels or cpu.current()
        self.n_batch = n_batch
        tensors = gguf.tensors

        def matrix(name: str, required: bool = True, dims: int = 2):
            """(type, rows, cols, bytes) of a 2-D tensor, or of a 3-D stack of experts seen
            as one matrix of n_expert x rows rows (expert e's rows follow expert e-1's)."""
            ti = tensors.get(name)
            if ti is None:
                if required:
                    raise UnsupportedModel(f"{path}: tensor {name} is missing")
                return None
            if len(ti.shape) != dims:
                raise UnsupportedModel(
                    f"{path}: tensor {name} should be {dims}-D, is {list(ti.shape)}"
                )
            return (ti.ggml_type, ti.n_rows, int(ti.shape[0]), ti.data)

        def vector(name: str):
            ti = tensors.get(name)
            if ti is None:
                return None
            return as_f32(ti, self.kernels)

        tok_embd = matrix("token_embd.weight")
        output = matrix("output.weight", required=False) or tok_embd  # tied embeddings
        globals_ = {
            "tok_embd": tok_embd,
            "output": output,
            "output_norm": vector("output_norm.weight"),
            "rope_factors": self._rope_factors(vector),
        }
        q_dim, kv_dim = hp.n_head * hp.head_dim, hp.n_head_kv * hp.head_dim
        layers = []
        for i in range(hp.n_layer):
            p = f"blk.{i}."
            fused_qkv = matrix(p + "attn_qkv.weight", required=False)
            spec: dict[str, Any] = {}
            if fused_qkv is not None:  # q, k, v rows one after the other
                spec.update(
                    zip(("wq", "wk", "wv"), split_rows(fused_qkv, q_dim, kv_dim), strict=True)
                )
            else:
                spec.update({k: matrix(p + f"attn_{k[1]}.weight") for k in ("wq", "wk", "wv")})
            spec["wo"] = matrix(p + "attn_output.weight")
            if hp.arch.moe:
                spec["router"] = matrix(p + "ffn_gate_inp.weight")
                for k in ("gate", "up", "down"):
                    spec[k + "_exps"] = matrix(p + f"ffn_{k}_exps.weight", dims=3)
            elif hp.arch.fused_gate_up:  # gate rows, then up rows
                spec["gate"], spec["up"] = split_rows(matrix(p + "ffn_up.weight"), hp.n_ff)
                spec["down"] = matrix(p + "ffn_down.weight")
            else:
                spec.update({k: matrix(p + f"ffn_{k}.weight") for k in ("gate", "up", "down")})
            spec.update({k: vector(p + v) for k, v in LAYER_VECTORS.items()})
            swa = hp.is_swa_layer(i)
            spec["window"] = hp.sliding_window if swa else 0
            spec["rope_base"] = hp.swa_rope_base if swa else hp.rope_base
            layers.append(spec)
        c_hp = {
            "n_layer": hp.n_layer,
            "n_embd": hp.n_embd,
            "n_ff": hp.n_ff,
            "n_head": hp.n_head,
            "n_head_kv": hp.n_head_kv,
            "head_dim": hp.head_dim,
            "head_dim_v": hp.head_dim_v,
            "n_rot": hp.n_rot,
            "n_expert": hp.n_expert,
            "n_expert_used": hp.n_expert_used,
            "rope_neox": int(hp.arch.rope_neox),
            "activation": int(hp.arch.activation == ACT_GELU_TANH),
            "qk_norm": int(hp.arch.qk_norm),
            "post_norms": int(hp.arch.post_norms),
            "norm_eps": hp.norm_eps,
            "embd_scale": math.sqrt(hp.n_embd) if hp.arch.embed_scale else 1.0,
            "attn_scale": hp.attn_scale,
            "attn_softcap": hp.attn_softcap,
            "final_softcap": hp.final_softcap,
            "rope_attn_factor": hp.rope_attn_factor,
        }
        self.native = self.kernels.NativeModel(
            c_hp, globals_, layers, self.n_ctx, n_seq, n_batch, self.threads
        )
        self.n_vocab = self.native.n_vocab
        self.report = LoadReport(
            variant=self.kernels.VARIANT,
            threads=self.threads,
            n_ctx=self.n_ctx,
            n_seq=n_seq,
            weights_bytes=sum(t.nbytes for t in tensors.values()),
            kv_bytes=self.native.kv_bytes,
            scratch_bytes=self.native.scratch_bytes,
        )

    def _rope_factors(self, vector) -> np.ndarray | None:
        """Per-frequency divisors of rope's angles, as llama.cpp picks them: llama 3's
        rope_freqs, else phi3's long factors past the original context, else its short ones."""
        factors = vector("rope_freqs.weight")
        if factors is None:
            long = self.n_ctx > self.hp.n_ctx_orig
            factors = vector("rope_factors_long.weight" if long else "rope_factors_short.weight")
        return factors

    def forward(self, tokens, positions, slots, out_rows, hidden: bool = False) -> np.ndarray:
        return self.native.forward(tokens, positions, slots, out_rows, hidden)

    def logits(
        self, tokens: list[int], start: int = 0, slot: int = 0, all_rows: bool = False
    ) -> np.ndarray:
        """Feed tokens at positions start.. of one slot, in batches; logits of the last token
        (or of every token with all_rows)."""
        outs = []
        for b in range(0, len(tokens), self.n_batch):
            chunk = tokens[b : b + self.n_batch]
            n = len(chunk)
            rows = np.arange(n) if all_rows else ([n - 1] if b + n == len(tokens) else [])
            out = self.forward(chunk, np.arange(start + b, start + b + n), np.full(n, slot), rows)
            outs.append(out)
        return np.concatenate(outs) if all_rows else outs[-1][0]


def split_rows(spec: tuple, *counts: int) -> list[tuple]:
    """A fused matrix (type, rows, cols, bytes) cut into consecutive row ranges of the given
    counts, the last taking the rest: views of the same bytes."""
    ggml_type, rows, cols, data = spec
    row_bytes = len(data) // rows if rows else 0
    parts, at = [], 0
    for n in (*counts, rows - sum(counts)):
        if n <= 0 or at + n > rows:
            raise UnsupportedModel(f"a fused tensor of {rows} rows cannot hold parts of {counts}")
        parts.append((ggml_type, n, cols, data[at * row_bytes : (at + n) * row_bytes]))
        at += n
    return parts


def as_f32(ti: Any, kernels: ModuleType) -> np.ndarray:
    """A small vector (norm weights, biases) as float32: the F32 view itself, or a converted copy."""
    if ti.ggml_type == 0:
        return ti.data.view(np.float32)
    return kernels.dequantize(ti.ggml_type, ti.data, ti.n_elements)


def check_tensor_types(gguf: Any) -> None:
    """Refuse at load, naming the type, rather than give a wrong answer."""
    for ti in gguf.tensors.values():
        if ti.type.name not in SUPPORTED_WEIGHT_TYPES:
            raise UnsupportedModel(
                f"{getattr(gguf, 'path', 'model')}: tensor {ti.name} has type {ti.type.name}, which "
                f"qpack does not run (supported: {', '.join(sorted(SUPPORTED_WEIGHT_TYPES))})"
            )
