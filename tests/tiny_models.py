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
    quantize: Callable[[np.ndarray, str], np.ndarray] | None = None,
) -> Path:
    """A random model of `arch` (llama, qwen2, gemma3). Matrices in weight_type (K-quants and
    IQ types as random blocks, or, given `quantize`, random f32 matrices passed through
    quantize(matrix, weight_type) -> raw blocks); norms and biases F32. n_embd/n_ff are
    multiples of 256 so that every quant type fits."""
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
        f"{arch}.rope.freq_base": (F32, 10000.0 if arch != "gemma3" else 1000000.0),
        f"{arch}.attention.layer_norm_rms_epsilon": (F32, 1e-6),
        "tokenizer.ggml.model": "llama",
        "tokenizer.ggml.tokens": (GGUFValueType.ARRAY, (GGUFValueType.STRING, tokens)),
        "tokenizer.ggml.scores": (GGUFValueType.ARRAY, (F32, scores)),
        "tokenizer.ggml.token_type": (GGUFValueType.ARRAY, (GGUFValueType.INT32, types)),
        "tokenizer.ggml.bos_token_id": (U32, 1),
        "tokenizer.ggml.eos_token_id": (U32, 2),
    }
    if arch == "gemma3":
        md[f"{arch}.attention.sliding_window"] = (U32, window)

    def mat(rows: int, cols: int, scale: float = 0.05):
        if quantize is not None:
            f32 = (rng.standard_normal((rows, cols)) * scale).astype(np.float32)
            return quantize(f32, weight_type), weight_type
        if weight_type in K_QUANTS:
            return scaled_blocks(
                random_quantized((rows, cols), weight_type, rng), weight_type, scale
            ), weight_type
        return (rng.standard_normal((rows, cols)) * scale).astype(np.float32), weight_type

    def vec(n: int, around: float = 1.0):
        return (around + 0.1 * rng.standard_normal(n)).astype(np.float32), "F32"

    q_dim, kv_dim = n_heads * hd, n_kv_heads * hd
    t = {"token_embd.weight": mat(n_vocab, n_embd, 0.5), "output_norm.weight": vec(n_embd)}
    if not tied:
        t["output.weight"] = mat(n_vocab, n_embd)
    for i in range(n_layers):
        p = f"blk.{i}."
        t[p + "attn_norm.weight"] = vec(n_embd)
        t[p + "attn_q.weight"] = mat(q_dim, n_embd)
        t[p + "attn_k.weight"] = mat(kv_dim, n_embd)
        t[p + "attn_v.weight"] = mat(kv_dim, n_embd)
        t[p + "attn_output.weight"] = mat(n_embd, q_dim)
        t[p + "ffn_norm.weight"] = vec(n_embd)
        t[p + "ffn_gate.weight"] = mat(n_ff, n_embd)
        t[p + "ffn_up.weight"] = mat(n_ff, n_embd)
        t[p + "ffn_down.weight"] = mat(n_embd, n_ff)
        if arch == "qwen2":
            t[p + "attn_q.bias"] = vec(q_dim, 0.0)
            t[p + "attn_k.bias"] = vec(kv_dim, 0.0)
            t[p + "attn_v.bias"] = vec(kv_dim, 0.0)
        if arch == "gemma3":
            t[p + "attn_q_norm.weight"] = vec(hd)
            t[p + "attn_k_norm.weight"] = vec(hd)
            t[p + "post_attention_norm.weight"] = vec(n_embd)
            t[p + "post_ffw_norm.weight"] = vec(n_embd)
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
