"""An independent float64 transformer in numpy, the oracle for the engine's forward pass.

Written from the architectures' papers/reference code, not from cython/forward.h: weights are
dequantized with the `gguf` package (llama.cpp's reference dequantizers), everything runs in
float64 with full causal attention over the whole sequence at once (no KV cache, no batching,
no activation quantization; keys and values optionally rounded as an f16 or q8_0 KV cache holds
them, with numpy's halves and gguf-py's quantizer, and with q8_0 keys the queries quantized to
q8_0 alike, as the engine and llama.cpp's CPU attention do). Supports llama, qwen2, qwen3, qwen3moe, phi3, gemma2 and gemma3,
with the semantics of llama.cpp's src/models/*.cpp (the reference for GGUF files).
"""

from __future__ import annotations

import math

import gguf
import numpy as np
from gguf.quants import dequantize, quantize


class ReferenceModel:
    def __init__(
        self,
        path: str,
        cache_types: tuple[str | None, str | None] = (None, None),
        q8_0_queries: bool | None = None,
    ):
        self.cache_types = cache_types  # keys, values: None exact, else as that cache holds them
        # queries as q8_0 blocks (None: when the keys are, as the engine does)
        self.q8_0_queries = cache_types[0] == "q8_0" if q8_0_queries is None else q8_0_queries
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
        self.gemma = arch in ("gemma2", "gemma3")
        self.window = md("attention.sliding_window", 0) if self.gemma else 0
        self.swa_every = {"gemma2": 2, "gemma3": 6}.get(arch, 0)
        self.swa_base = self.rope_base if arch == "gemma2" else 10000.0
        self.attn_cap = md("attn_logit_softcapping", 50.0) if arch == "gemma2" else 0.0
        self.final_cap = md("final_logit_softcapping", 30.0 if arch == "gemma2" else 0.0)
        self.qk_norm = arch in ("gemma3", "qwen3", "qwen3moe")
        self.n_expert_used = md("expert_used_count", 0)
        self.rope_mscale = md("rope.scaling.attn_factor", 1.0)
        self.n_ctx_orig = md("rope.scaling.original_context_length", md("context_length"))
        self.n_ctx = self.n_ctx_orig  # the context the caller runs at (phi3's factors)

    def w(self, name: str) -> np.ndarray | None:
        t = self.t.get(name)
        if t is None:
            return None
        shape = tuple(int(x) for x in reversed(t.shape))
        return dequantize(np.asarray(t.data), t.tensor_type).reshape(shape).astype(np.float64)

    def rms(self, x: np.ndarray, w: np.ndarray) -> np.ndarray:
        return x / np.sqrt((x * x).mean(-1, keepdims=True) + self.eps) * w

    def rope_factors(self) -> np.ndarray:
        """phi3's LongRoPE divisors (long past the original context), llama 3's rope_freqs."""
        f = self.w("rope_freqs.weight")
        if f is None:
            long = self.n_ctx > self.n_ctx_orig
            f = self.w("rope_factors_long.weight" if long else "rope_factors_short.weight")
        return np.ones(self.n_rot // 2) if f is None else f

    def rope(self, x: np.ndarray, pos: np.ndarray, base: float) -> np.ndarray:
        """x: [n, heads, head_dim]. GGUF llama weights are permuted for adjacent pairs;
        the others rotate halves (NEOX)."""
        half = self.n_rot // 2
        freq = base ** (-2.0 * np.arange(half) / self.n_rot) / self.rope_factors()
        theta = pos[:, None] * freq[None]
        c = np.cos(theta)[:, None, :] * self.rope_mscale
        s = np.sin(theta)[:, None, :] * self.rope_mscale
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
        gemma = self.gemma
        emb = self.w("token_embd.weight")
        x = emb[np.asarray(tokens)]
        if gemma:
            x = x * math.sqrt(self.n_embd)
        pos = np.arange(n, dtype=np.float64)
        for layer in range(self.n_layer):
            p = f"blk.{layer}."
            swa = gemma and self.window and (layer + 1) % self.swa_every != 0
            xn = self.rms(x, self.w(p + "attn_norm.weight"))
            qkv = self.w(p + "attn_qkv.weight")
            if qkv is not None:  # fused: q rows, k rows, v rows
                q, k, v = np.split(xn @ qkv.T, [H * hd, H * hd + KV * hd], axis=-1)
            else:
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
            if self.qk_norm:
                q = self.rms(q, self.w(p + "attn_q_norm.weight"))
                k = self.rms(k, self.w(p + "attn_k_norm.weight"))
            base = self.swa_base if swa else self.rope_base
            q, k = self.rope(q, pos, base), self.rope(k, pos, base)
            k, v = self.cached(k, self.cache_types[0]), self.cached(v, self.cache_types[1])
            if self.q8_0_queries:
                q = self.cached(q, "q8_0")
            k, v = np.repeat(k, H // KV, axis=1), np.repeat(v, H // KV, axis=1)
            att = np.einsum("ihd,jhd->hij", q, k) / math.sqrt(hd)
            if self.attn_cap:
                att = self.attn_cap * np.tanh(att / self.attn_cap)
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
            if self.n_expert_used:
                f = self.experts(xn, p)
            else:
                gate = self.w(p + "ffn_gate.weight")
                if gate is None:  # phi3: ffn_up holds the gate rows, then the up rows
                    g, u = np.split(xn @ self.w(p + "ffn_up.weight").T, 2, axis=-1)
                else:
                    g, u = xn @ gate.T, xn @ self.w(p + "ffn_up.weight").T
                f = (self.act(g) * u) @ self.w(p + "ffn_down.weight").T
            if gemma:
                f = self.rms(f, self.w(p + "post_ffw_norm.weight"))
            x = x + f
        x = self.rms(x, self.w("output_norm.weight"))
        if hidden:
            return x
        out = self.w("output.weight")
        logits = x @ (emb if out is None else out).T
        if self.final_cap:
            logits = self.final_cap * np.tanh(logits / self.final_cap)
        return logits

    @staticmethod
    def cached(x: np.ndarray, cache_type: str | None) -> np.ndarray:
        """x [n, kv heads, d] as a KV cache of cache_type gives it back: rounded to halves
        (f16), or each head's row of d float32 values quantized to q8_0 blocks and dequantized
        (gguf-py's reference code)."""
        if cache_type is None:
            return x
        if cache_type == "f16":
            return x.astype(np.float16).astype(np.float64)
        qtype = {"q8_0": gguf.GGMLQuantizationType.Q8_0}[cache_type]
        rows = x.astype(np.float32).reshape(-1, x.shape[-1])
        return dequantize(quantize(rows, qtype), qtype).reshape(x.shape).astype(np.float64)

    def act(self, g: np.ndarray) -> np.ndarray:
        if self.gemma:
            return 0.5 * g * (1 + np.tanh(math.sqrt(2 / math.pi) * (g + 0.044715 * g**3)))
        return g / (1 + np.exp(-g))

    def experts(self, xn: np.ndarray, p: str) -> np.ndarray:
        """Mixture of experts: softmax router, top-k, weights renormalised, weighted sum."""
        logits = xn @ self.w(p + "ffn_gate_inp.weight").T
        probs = np.exp(logits - logits.max(-1, keepdims=True))
        probs /= probs.sum(-1, keepdims=True)
        gates, ups, downs = (self.w(p + f"ffn_{k}_exps.weight") for k in ("gate", "up", "down"))
        out = np.zeros_like(xn)
        for i in range(len(xn)):
            chosen = np.argsort(-probs[i], kind="stable")[: self.n_expert_used]
            weights = probs[i, chosen] / probs[i, chosen].sum()
            for e, w in zip(chosen, weights, strict=True):
                h = self.act(gates[e] @ xn[i]) * (ups[e] @ xn[i])
                out[i] += w * (downs[e] @ h)
        return out
