"""An independent float64 transformer in numpy, the oracle for the engine's forward pass.

Written from the architectures' papers/reference code, not from cython/forward.h: weights are
dequantized with the `gguf` package (llama.cpp's reference dequantizers), everything runs in
float64 with full causal attention over the whole sequence at once (no KV cache, no batching,
no activation quantization). Supports llama, qwen2 and gemma3.
"""

from __future__ import annotations

import math

import gguf
import numpy as np
from gguf.quants import dequantize


class ReferenceModel:
    def __init__(self, path: str):
        self.r = gguf.GGUFReader(str(path))
        self.t = {t.name: t for t in self.r.tensors}
        f = self.r.fields
        self.arch = arch = bytes(f["general.architecture"].parts[-1]).decode()

        def md(key, default=None):
            fld = f.get(f"{arch}.{key}")
            return default if fld is None else fld.parts[-1][0].item()

        self.n_layer = md("block_count")
        self.n_embd = md("embedding_length")
        self.n_head = md("attention.head_count")
        self.n_head_kv = md("attention.head_count_kv", self.n_head)
        self.head_dim = md("attention.key_length", self.n_embd // self.n_head)
        self.n_rot = md("rope.dimension_count", self.head_dim)
        self.eps = md("attention.layer_norm_rms_epsilon", 1e-5)
        self.rope_base = md("rope.freq_base", 10000.0)
        self.window = md("attention.sliding_window", 0) if arch == "gemma3" else 0

    def w(self, name: str) -> np.ndarray | None:
        t = self.t.get(name)
        if t is None:
            return None
        shape = tuple(int(x) for x in reversed(t.shape))
        return dequantize(np.asarray(t.data), t.tensor_type).reshape(shape).astype(np.float64)

    def rms(self, x: np.ndarray, w: np.ndarray) -> np.ndarray:
        return x / np.sqrt((x * x).mean(-1, keepdims=True) + self.eps) * w

    def rope(self, x: np.ndarray, pos: np.ndarray, base: float) -> np.ndarray:
        """x: [n, heads, head_dim]. GGUF llama weights are permuted for adjacent pairs;
        qwen2 and gemma3 rotate halves (NEOX)."""
        half = self.n_rot // 2
        theta = pos[:, None] * base ** (-2.0 * np.arange(half) / self.n_rot)[None]
        c, s = np.cos(theta)[:, None, :], np.sin(theta)[:, None, :]
        out = x.copy()
        if self.arch == "llama":
            a, b = x[..., 0 : self.n_rot : 2], x[..., 1 : self.n_rot : 2]
            out[..., 0 : self.n_rot : 2] = a * c - b * s
            out[..., 1 : self.n_rot : 2] = a * s + b * c
        else:
            a, b = x[..., :half], x[..., half : self.n_rot]
            out[..., :half] = a * c - b * s
            out[..., half : self.n_rot] = a * s + b * c
        return out

    def logits(self, tokens: list[int], hidden: bool = False) -> np.ndarray:
        n, hd, H, KV = len(tokens), self.head_dim, self.n_head, self.n_head_kv
        gemma = self.arch == "gemma3"
        emb = self.w("token_embd.weight")
        x = emb[np.asarray(tokens)]
        if gemma:
            x = x * math.sqrt(self.n_embd)
        pos = np.arange(n, dtype=np.float64)
        for layer in range(self.n_layer):
            p = f"blk.{layer}."
            swa = gemma and self.window and (layer + 1) % 6 != 0
            xn = self.rms(x, self.w(p + "attn_norm.weight"))
            q, k, v = (xn @ self.w(p + f"attn_{c}.weight").T for c in "qkv")
            for name, bias in (("q", "attn_q.bias"), ("k", "attn_k.bias"), ("v", "attn_v.bias")):
                b = self.w(p + bias)
                if b is not None:
                    if name == "q":
                        q = q + b
                    elif name == "k":
                        k = k + b
                    else:
                        v = v + b
            q, k, v = q.reshape(n, H, hd), k.reshape(n, KV, hd), v.reshape(n, KV, -1)
            if gemma:
                q = self.rms(q, self.w(p + "attn_q_norm.weight"))
                k = self.rms(k, self.w(p + "attn_k_norm.weight"))
            base = 10000.0 if swa else self.rope_base
            q, k = self.rope(q, pos, base), self.rope(k, pos, base)
            k, v = np.repeat(k, H // KV, axis=1), np.repeat(v, H // KV, axis=1)
            att = np.einsum("ihd,jhd->hij", q, k) / math.sqrt(hd)
            i, j = np.arange(n)[:, None], np.arange(n)[None, :]
            masked = j > i
            if swa:
                masked |= i - j >= self.window
            att[:, masked] = -np.inf
            att = np.exp(att - att.max(-1, keepdims=True))
            att /= att.sum(-1, keepdims=True)
            o = (
                np.einsum("hij,jhd->ihd", att, v).reshape(n, -1)
                @ self.w(p + "attn_output.weight").T
            )
            if gemma:
                o = self.rms(o, self.w(p + "post_attention_norm.weight"))
            x = x + o
            xn = self.rms(x, self.w(p + "ffn_norm.weight"))
            g, u = xn @ self.w(p + "ffn_gate.weight").T, xn @ self.w(p + "ffn_up.weight").T
            if gemma:
                a = 0.5 * g * (1 + np.tanh(math.sqrt(2 / math.pi) * (g + 0.044715 * g**3)))
            else:
                a = g / (1 + np.exp(-g))
            f = (a * u) @ self.w(p + "ffn_down.weight").T
            if gemma:
                f = self.rms(f, self.w(p + "post_ffw_norm.weight"))
            x = x + f
        x = self.rms(x, self.w("output_norm.weight"))
        if hidden:
            return x
        out = self.w("output.weight")
        return x @ (emb if out is None else out).T
