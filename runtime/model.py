"""Builds the compiled model from an open GGUF file: weights stay views of the mapping.

`Model` is what the engine talks to: a forward pass over a batch of (token, position, slot)
rows, plus the facts a user wants reported at load (KV cache and scratch memory).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import numpy as np

from . import cpu
from .errors import UnsupportedModel
from .facts import (
    DEFAULT_BATCH,
    LAYER_VECTORS,
    MAX_LENGTH,
    ModelFacts,
    read_model_facts,
)
from .kv_cache import CACHE_TYPES, cache_row_bytes


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
    cache_type_k: str = "f16"
    cache_type_v: str = "f16"

    def describe(self) -> str:
        mib = 1 << 20
        return (
            f"kernels {self.variant}, {self.threads} threads, context {self.n_ctx} x {self.n_seq} "
            f"seq: weights {self.weights_bytes / mib:.0f} MiB (mapped), KV cache "
            f"{self.kv_bytes / mib:.1f} MiB (K {self.cache_type_k}, V {self.cache_type_v}), "
            f"scratch {self.scratch_bytes / mib:.1f} MiB"
        )


class Model:
    """A GGUF model ready to run: hyperparameters, the compiled forward pass, the load report."""

    def __init__(
        self,
        gguf: Any,
        n_ctx: int | None = None,
        n_seq: int = 1,
        n_batch: int = DEFAULT_BATCH,
        threads: int | None = None,
        kernels: ModuleType | None = None,
        cache_type_k: str = "f16",
        cache_type_v: str = "f16",
    ):
        self.gguf = gguf
        self.facts: ModelFacts = read_model_facts(gguf)
        self.hp = self.facts.hp
        self.n_ctx = self.facts.default_ctx if n_ctx is None else int(n_ctx)
        if not 8 <= self.n_ctx <= MAX_LENGTH:
            raise UnsupportedModel(f"context size {self.n_ctx} is out of range (8..{MAX_LENGTH})")
        self.threads = threads or physical_cores()
        self.kernels = kernels or cpu.current()
        # a batch never holds more tokens than the sequences' contexts together
        self.n_batch = min(n_batch, self.n_ctx * n_seq)
        check_cache_types(self.facts, cache_type_k, cache_type_v)
        c_hp, globals_, layers = native_arguments(gguf, self.facts, self.kernels, self.n_ctx)
        self.native = self.kernels.NativeModel(
            c_hp, globals_, layers, self.n_ctx, n_seq, self.n_batch, self.threads,
            CACHE_TYPES[cache_type_k][0], CACHE_TYPES[cache_type_v][0],
        )  # fmt: skip
        self.n_vocab = self.native.n_vocab
        self.report = LoadReport(
            variant=self.kernels.VARIANT,
            threads=self.threads,
            n_ctx=self.n_ctx,
            n_seq=n_seq,
            weights_bytes=self.facts.weight_bytes,
            kv_bytes=self.native.kv_bytes,
            scratch_bytes=self.native.scratch_bytes,
            cache_type_k=cache_type_k,
            cache_type_v=cache_type_v,
        )

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


def check_cache_types(facts: ModelFacts, type_k: str, type_v: str) -> None:
    """Refuses a KV cache type this model's head sizes cannot hold, naming the flag."""
    hp = facts.hp
    for flag, cache_type, n in (("k", type_k, hp.head_dim), ("v", type_v, hp.head_dim_v)):
        if cache_type not in CACHE_TYPES:
            raise UnsupportedModel(
                f"--cache-type-{flag} {cache_type}: not one of {', '.join(CACHE_TYPES)}"
            )
        try:
            cache_row_bytes(cache_type, n)
        except UnsupportedModel as e:
            raise UnsupportedModel(f"--cache-type-{flag} {cache_type}: {e}") from None


def native_arguments(
    gguf: Any, facts: ModelFacts, kernels: ModuleType, n_ctx: int | None = None
) -> tuple[dict, dict, list]:
    """What NativeModel takes: hyperparameters, global tensors and per-layer tensors (matrices
    as (ggml type, rows, cols, bytes), vectors as float32), all views of the mapping. Shapes
    were checked by read_model_facts; model.pxi and forward.h check them again. Fused
    matrices (phi3's attn_qkv and gate+up) are cut into row ranges of the same bytes; a 3-D
    stack of experts is one matrix of n_expert x rows rows."""
    tensors = gguf.tensors
    hp = facts.hp

    def matrix(name: str):
        ti = tensors.get(name)
        return None if ti is None else (ti.ggml_type, ti.n_rows, int(ti.shape[0]), ti.data)

    def vector(name: str):
        ti = tensors.get(name)
        return None if ti is None else as_f32(ti, kernels)

    # rope angle divisors as llama.cpp picks them: llama 3's rope_freqs, else phi3's long
    # factors when the context passes the original one, else its short ones
    rope_factors = vector("rope_freqs.weight")
    if rope_factors is None:
        long = (facts.default_ctx if n_ctx is None else n_ctx) > hp.n_ctx_orig
        rope_factors = vector("rope_factors_long.weight" if long else "rope_factors_short.weight")
    tok_embd = matrix("token_embd.weight")
    globals_ = {
        "tok_embd": tok_embd,
        "output": matrix("output.weight") or tok_embd,  # tied embeddings
        "output_norm": vector("output_norm.weight"),
        "rope_factors": rope_factors,
    }
    layers = []
    for i in range(hp.n_layer):
        p = f"blk.{i}."
        spec: dict[str, Any] = {"wo": matrix(p + "attn_output.weight")}
        fused_qkv = matrix(p + "attn_qkv.weight")
        if fused_qkv is not None:
            qkv = split_rows(fused_qkv, hp.q_dim, hp.kv_dim)
            spec.update(zip(("wq", "wk", "wv"), qkv, strict=True))
        else:
            spec.update({k: matrix(p + f"attn_{k[1]}.weight") for k in ("wq", "wk", "wv")})
        if hp.arch.moe:
            spec["router"] = matrix(p + "ffn_gate_inp.weight")
            for k in ("gate", "up", "down"):
                spec[k + "_exps"] = matrix(p + f"ffn_{k}_exps.weight")
        elif hp.arch.fused_gate_up:
            spec["gate"], spec["up"] = split_rows(matrix(p + "ffn_up.weight"), hp.n_ff)
            spec["down"] = matrix(p + "ffn_down.weight")
        else:
            spec.update({k: matrix(p + f"ffn_{k}.weight") for k in ("gate", "up", "down")})
        spec.update({k: vector(p + v) for k, v in LAYER_VECTORS.items()})
        spec["window"] = hp.layer_window(i)
        spec["rope_base"] = hp.layer_rope_base(i)
        layers.append(spec)
    return facts.c_hparams(), globals_, layers


def split_rows(spec: tuple, *counts: int) -> list[tuple]:
    """A matrix (type, rows, cols, bytes) cut into consecutive row ranges of the given counts,
    the last range taking the rest: views of the same bytes."""
    ggml_type, rows, cols, data = spec
    row_bytes = len(data) // rows
    parts, at = [], 0
    for n in (*counts, rows - sum(counts)):
        if n <= 0:
            raise UnsupportedModel(f"a fused matrix of {rows} rows cannot hold parts of {counts}")
        parts.append((ggml_type, n, cols, data[at * row_bytes : (at + n) * row_bytes]))
        at += n
    return parts


def as_f32(ti: Any, kernels: ModuleType) -> np.ndarray:
    """A small vector (norm weights, biases) as float32: the F32 view itself, or a converted copy."""
    if ti.ggml_type == 0:
        return ti.data.view(np.float32)
    return kernels.dequantize(ti.ggml_type, ti.data, ti.n_elements)
