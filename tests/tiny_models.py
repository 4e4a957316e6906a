"""Tiny random-weight models of every architecture the engine runs, written with gguf.GGUFWriter
(through gguf_fixtures.write_gguf), so the forward pass can be checked against the float64
reference in reference_forward.py without a real model."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import gguf
import numpy as np
from gguf import GGUFValueType
from gguf.quants import dequantize
from gguf_fixtures import _F16_SCALE_FIELDS, random_quantized, tiny_llama_vocab, write_gguf

U32, F32 = GGUFValueType.UINT32, GGUFValueType.FLOAT32
K_QUANTS = {"Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "IQ4_XS", "IQ4_NL"}


def tiny_model(
    path: str | Path,
    arch: str = "llama",
    weight_type: str = "F32",
    n_layers: int = 2,
    n_embd: int = 256,
    n_ff: int = 512,
    n_heads: int = 4,
    n_kv_heads: int = 2,
    head_dim: int | None = None,
    window: int = 4,
    tied: bool = False,
    seed: int = 0,
    n_expert: int = 8,
    n_expert_used: int = 2,
    n_ctx_orig: int = 4096,
    softcaps: tuple[float, float] = (5.0, 3.0),
    metadata: dict | None = None,
    tensors: dict | None = None,
    quantize: Callable[[np.ndarray, str], np.ndarray] | None = None,
) -> Path:
    """A random model of `arch` (llama, qwen2, qwen3, qwen3moe, phi3, gemma2, gemma3) under
    llama.cpp's tensor and key names. Matrices in weight_type (K-quants and IQ types as random
    blocks, or, given `quantize`, random f32 matrices passed through quantize(matrix,
    weight_type) -> raw blocks); norms and biases F32. n_embd/n_ff multiples of 256 fit every
    quant type. qwen3moe has n_expert experts of n_ff rows each; phi3 has rope factors (long ones past n_ctx_orig);
    gemma2 caps attention scores and logits at `softcaps` (small enough to bind by default).
    `metadata` and `tensors` override entries (a value of None drops one): hostile variants
    for the fuzz and boundary tests."""
    rng = np.random.default_rng(seed)
    tokens, scores, types = tiny_llama_vocab()
    n_vocab = len(tokens)
    hd = head_dim or n_embd // n_heads
    md = {
        f"{arch}.block_count": (U32, n_layers),
        f"{arch}.context_length": (U32, 512),
        f"{arch}.embedding_length": (U32, n_embd),
        f"{arch}.feed_forward_length": (U32, n_ff),
        f"{arch}.attention.head_count": (U32, n_heads),
        f"{arch}.attention.head_count_kv": (U32, n_kv_heads),
        f"{arch}.attention.key_length": (U32, hd),
        f"{arch}.attention.value_length": (U32, hd),
        f"{arch}.rope.freq_base": (F32, 1000000.0 if arch in ("gemma3", "qwen3moe") else 10000.0),
        f"{arch}.attention.layer_norm_rms_epsilon": (F32, 1e-6),
        "tokenizer.ggml.model": "llama",
        "tokenizer.ggml.tokens": (GGUFValueType.ARRAY, (GGUFValueType.STRING, tokens)),
        "tokenizer.ggml.scores": (GGUFValueType.ARRAY, (F32, scores)),
        "tokenizer.ggml.token_type": (GGUFValueType.ARRAY, (GGUFValueType.INT32, types)),
        "tokenizer.ggml.bos_token_id": (U32, 1),
        "tokenizer.ggml.eos_token_id": (U32, 2),
    }
    if arch in ("gemma2", "gemma3"):
        md[f"{arch}.attention.sliding_window"] = (U32, window)
    if arch == "gemma2":
        md[f"{arch}.attn_logit_softcapping"] = (F32, softcaps[0])
        md[f"{arch}.final_logit_softcapping"] = (F32, softcaps[1])
    if arch == "qwen3moe":
        md[f"{arch}.expert_count"] = (U32, n_expert)
        md[f"{arch}.expert_used_count"] = (U32, n_expert_used)
        md[f"{arch}.expert_feed_forward_length"] = (U32, n_ff)
    if arch == "phi3":
        md[f"{arch}.rope.dimension_count"] = (U32, hd)
        md[f"{arch}.rope.scaling.original_context_length"] = (U32, n_ctx_orig)
        md[f"{arch}.rope.scaling.attn_factor"] = (F32, 1.19)

    def mat(rows: int, cols: int, scale: float = 0.05):
        if quantize is not None:
            f32 = (rng.standard_normal((rows, cols)) * scale).astype(np.float32)
            return quantize(f32, weight_type), weight_type
        if weight_type in K_QUANTS:
            return scaled_blocks(
                random_quantized((rows, cols), weight_type, rng), weight_type, scale
            ), weight_type
        return (rng.standard_normal((rows, cols)) * scale).astype(np.float32), weight_type

    def mat3(n: int, rows: int, cols: int, scale: float = 0.05):
        if weight_type in K_QUANTS:
            blocks = random_quantized((n, rows, cols), weight_type, rng)
            return scaled_blocks(blocks, weight_type, scale), weight_type
        return (rng.standard_normal((n, rows, cols)) * scale).astype(np.float32), weight_type

    def vec(n: int, around: float = 1.0):
        return (around + 0.1 * rng.standard_normal(n)).astype(np.float32), "F32"

    q_dim, kv_dim = n_heads * hd, n_kv_heads * hd
    t = {"token_embd.weight": mat(n_vocab, n_embd, 0.5), "output_norm.weight": vec(n_embd)}
    if not tied and arch != "gemma2":  # llama.cpp's gemma2 always ties the output
        t["output.weight"] = mat(n_vocab, n_embd)
    if arch == "phi3":  # LongRoPE: divisors of the rope angles, per frequency
        t["rope_factors_short.weight"] = (
            (1.0 + rng.uniform(0, 0.5, hd // 2)).astype(np.float32),
            "F32",
        )
        t["rope_factors_long.weight"] = (1.0 + rng.uniform(0, 8, hd // 2)).astype(np.float32), "F32"
    for i in range(n_layers):
        p = f"blk.{i}."
        t[p + "attn_norm.weight"] = vec(n_embd)
        if arch == "phi3":
            t[p + "attn_qkv.weight"] = mat(q_dim + 2 * kv_dim, n_embd)
        else:
            t[p + "attn_q.weight"] = mat(q_dim, n_embd)
            t[p + "attn_k.weight"] = mat(kv_dim, n_embd)
            t[p + "attn_v.weight"] = mat(kv_dim, n_embd)
        t[p + "attn_output.weight"] = mat(n_embd, q_dim)
        t[p + "ffn_norm.weight"] = vec(n_embd)
        if arch == "qwen3moe":
            # router logits of about unit spread, as a trained router's
            router = rng.standard_normal((n_expert, n_embd)) / np.sqrt(n_embd)
            t[p + "ffn_gate_inp.weight"] = router.astype(np.float32), "F32"
            t[p + "ffn_gate_exps.weight"] = mat3(n_expert, n_ff, n_embd)
            t[p + "ffn_up_exps.weight"] = mat3(n_expert, n_ff, n_embd)
            t[p + "ffn_down_exps.weight"] = mat3(n_expert, n_embd, n_ff)
        elif arch == "phi3":
            t[p + "ffn_up.weight"] = mat(2 * n_ff, n_embd)
            t[p + "ffn_down.weight"] = mat(n_embd, n_ff)
        else:
            t[p + "ffn_gate.weight"] = mat(n_ff, n_embd)
            t[p + "ffn_up.weight"] = mat(n_ff, n_embd)
            t[p + "ffn_down.weight"] = mat(n_embd, n_ff)
        if arch in ("gemma3", "qwen3", "qwen3moe"):
            t[p + "attn_q_norm.weight"] = vec(hd)
            t[p + "attn_k_norm.weight"] = vec(hd)
        if arch in ("gemma2", "gemma3"):
            t[p + "post_attention_norm.weight"] = vec(n_embd)
            t[p + "post_ffw_norm.weight"] = vec(n_embd)
        if arch == "qwen2":
            t[p + "attn_q.bias"] = vec(q_dim, 0.0)
            t[p + "attn_k.bias"] = vec(kv_dim, 0.0)
            t[p + "attn_v.bias"] = vec(kv_dim, 0.0)
    for overrides, target in ((metadata, md), (tensors, t)):
        for key, value in (overrides or {}).items():
            if value is None:
                target.pop(key, None)
            else:
                target[key] = value
    return write_gguf(path, md, t, arch=arch)


def scaled_blocks(blocks: np.ndarray, type_name: str, std: float) -> np.ndarray:
    """Random blocks rescaled (through their f16 scale fields: every value is linear in them)
    so the weights have about `std` spread, like a trained model's, not the hundreds that
    random sub-scales give."""
    qtype = gguf.GGMLQuantizationType[type_name]
    factor = std / float(dequantize(blocks, qtype).std())
    flat = blocks.reshape(-1, blocks.shape[-1]).copy()
    block_bytes = gguf.constants.GGML_QUANT_SIZES[qtype][1]
    per_row = flat.reshape(-1, block_bytes)
    for at in _F16_SCALE_FIELDS[type_name]:
        d = per_row[:, at : at + 2].copy().view(np.float16).astype(np.float32) * factor
        per_row[:, at : at + 2] = d.astype(np.float16).view(np.uint8).reshape(-1, 2)
    return per_row.reshape(blocks.shape)
