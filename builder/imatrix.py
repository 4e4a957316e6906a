"""`qpack imatrix`: the importance matrix of a model on a text, in llama-imatrix's GGUF format.

For every matrix multiplication `W @ x` of the layers, llama-imatrix accumulates, per input
column j, the sum over tokens of x_j^2 (`<name>.in_sum2`, F32 [n_in, 1]) and the number of
tokens (`<name>.counts`, F32 [1, 1]); `--imatrix` on quantize then weighs column j's rounding
error by in_sum2 / counts. The output matrix is left out (as llama-imatrix does by default) and
the token embedding is a lookup, not a product.

The activations come from a float32 numpy forward pass over the same architecture declarations
(runtime/arch.py) as the engine, with weights dequantized by the engine's own kernels, one layer
at a time: the compiled forward pass keeps no intermediate activations, and a hook in it would
cost every user a branch per matmul. tests/test_imatrix.py checks this pass's logits against the
engine's, so the activations it records are the engine's up to float rounding.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Callable
from pathlib import Path

import numpy as np
from qpack.builder.gguf_write import KeyValue, TensorPlan, data_offsets, header_bytes
from qpack.runtime.arch import ACT_GELU_TANH
from qpack.runtime.errors import QpackError
from qpack.runtime.facts import HParams
from qpack.runtime.gguf import T_ARRAY, T_STRING, T_UINT32, GGUFFile, open_gguf
from qpack.runtime.quants import quant_type


class ActivationRecorder:
    """A numpy forward pass that records sum(x^2) per input column of every layer matmul."""

    def __init__(self, gf: GGUFFile, dequantize: Callable):
        self.gf = gf
        self.hp = HParams.from_metadata(gf.metadata, gf.path)
        self._dequantize = dequantize
        self._cache: dict[str, np.ndarray] = {}
        self.sums: dict[str, np.ndarray] = {}
        self.counts: dict[str, int] = {}

    def weight(self, name: str) -> np.ndarray | None:
        """Dequantized tensor in numpy order (rows = outputs), cached per layer call."""
        ti = self.gf.tensors.get(name)
        if ti is None:
            return None
        w = self._cache.get(name)
        if w is None:
            flat = self._dequantize(ti.ggml_type, ti.data, ti.n_elements)
            w = np.asarray(flat, dtype=np.float32).reshape(tuple(reversed(ti.shape)))
            if len(ti.shape) > 1:  # keep only the small vectors: matrices are re-read per layer
                return w
            self._cache[name] = w
        return w

    def matmul(self, name: str, x: np.ndarray) -> np.ndarray:
        sq = (x.astype(np.float64) ** 2).sum(axis=0)
        if name in self.sums:
            self.sums[name] += sq
            self.counts[name] += x.shape[0]
        else:
            self.sums[name] = sq
            self.counts[name] = x.shape[0]
        return x @ self.weight(name).T

    def rms(self, x: np.ndarray, w: np.ndarray | None) -> np.ndarray:
        y = x / np.sqrt((x * x).mean(-1, keepdims=True) + np.float32(self.hp.norm_eps))
        return y if w is None else y * w

    def rope(self, x: np.ndarray, pos: np.ndarray, base: float) -> np.ndarray:
        n_rot = self.hp.n_rot
        half = n_rot // 2
        theta = pos[:, None] * base ** (-2.0 * np.arange(half) / n_rot)[None]
        c = np.cos(theta)[:, None, :].astype(np.float32)
        s = np.sin(theta)[:, None, :].astype(np.float32)
        out = x.copy()
        if self.hp.arch.rope_neox:
            a, b = x[..., :half], x[..., half:n_rot]
            out[..., :half] = a * c - b * s
            out[..., half:n_rot] = a * s + b * c
        else:
            a, b = x[..., 0:n_rot:2], x[..., 1:n_rot:2]
            out[..., 0:n_rot:2] = a * c - b * s
            out[..., 1:n_rot:2] = a * s + b * c
        return out

    def forward(self, tokens: list[int], logits: bool = False) -> np.ndarray | None:
        hp, arch = self.hp, self.hp.arch
        n = len(tokens)
        emb = self.weight("token_embd.weight")
        x = emb[np.asarray(tokens)].astype(np.float32)
        if arch.embed_scale:
            x = x * np.float32(math.sqrt(hp.n_embd))
        pos = np.arange(n, dtype=np.float64)
        i, j = np.arange(n)[:, None], np.arange(n)[None, :]
        for layer in range(hp.n_layer):
            p = f"blk.{layer}."
            w = self.weight
            xn = self.rms(x, w(p + "attn_norm.weight"))
            q = self.matmul(p + "attn_q.weight", xn)
            k = self.matmul(p + "attn_k.weight", xn)
            v = self.matmul(p + "attn_v.weight", xn)
            for t, bias in ((q, "attn_q.bias"), (k, "attn_k.bias"), (v, "attn_v.bias")):
                b = w(p + bias)
                if b is not None:
                    t += b
            q = q.reshape(n, hp.n_head, hp.head_dim)
            k = k.reshape(n, hp.n_head_kv, hp.head_dim)
            v = v.reshape(n, hp.n_head_kv, hp.head_dim_v)
            if arch.qk_norm:
                q = self.rms(q, w(p + "attn_q_norm.weight"))
                k = self.rms(k, w(p + "attn_k_norm.weight"))
            swa = hp.is_swa_layer(layer)
            base = arch.swa_rope_base if swa else hp.rope_base
            q, k = self.rope(q, pos, base), self.rope(k, pos, base)
            group = hp.n_head // hp.n_head_kv
            k, v = np.repeat(k, group, axis=1), np.repeat(v, group, axis=1)
            att = np.einsum("ihd,jhd->hij", q, k) * np.float32(hp.attn_scale)
            masked = j > i
            if swa:
                masked = masked | (i - j >= hp.sliding_window)
            att[:, masked] = -np.inf
            att = np.exp(att - att.max(-1, keepdims=True))
            att /= att.sum(-1, keepdims=True)
            o = np.einsum("hij,jhd->ihd", att, v).reshape(n, -1)
            o = self.matmul(p + "attn_output.weight", o)
            if arch.post_norms:
                o = self.rms(o, w(p + "post_attention_norm.weight"))
            x = x + o
            xn = self.rms(x, w(p + "ffn_norm.weight"))
            g = self.matmul(p + "ffn_gate.weight", xn)
            u = self.matmul(p + "ffn_up.weight", xn)
            if arch.activation == ACT_GELU_TANH:
                a = (
                    0.5
                    * g
                    * (1 + np.tanh(np.float32(math.sqrt(2 / math.pi)) * (g + 0.044715 * g**3)))
                )
            else:
                a = g / (1 + np.exp(-g))
            f = self.matmul(p + "ffn_down.weight", (a * u).astype(np.float32))
            if arch.post_norms:
                f = self.rms(f, w(p + "post_ffw_norm.weight"))
            x = x + f
        if not logits:
            return None
        x = self.rms(x, self.weight("output_norm.weight"))
        out = self.weight("output.weight")
        return x @ (emb if out is None else out).T


def compute_imatrix(
    model_path: str | Path,
    tokens: list[int],
    chunk_size: int,
    bos: int | None,
    dequantize: Callable,
    progress: Callable[[int], None] | None = None,
) -> tuple[dict[str, np.ndarray], dict[str, int], int]:
    """Sum of squared activations per matmul input column over chunks of `chunk_size` tokens
    (the first of each replaced by BOS, as llama-imatrix does). Returns (sums, counts, chunks)."""
    gf = open_gguf(model_path)
    rec = ActivationRecorder(gf, dequantize)
    n_chunks = len(tokens) // chunk_size
    if n_chunks == 0:
        raise QpackError(f"the text has {len(tokens)} tokens, fewer than one chunk of {chunk_size}")
    for c in range(n_chunks):
        chunk = list(tokens[c * chunk_size : (c + 1) * chunk_size])
        if bos is not None:
            chunk[0] = bos
        rec.forward(chunk)
        if progress:
            progress(1)
    return rec.sums, rec.counts, n_chunks


def write_imatrix(
    path: str | Path,
    sums: dict[str, np.ndarray],
    counts: dict[str, int],
    chunk_count: int,
    chunk_size: int,
    datasets: list[str],
) -> None:
    """llama-imatrix's GGUF: `<name>.in_sum2` F32 [n_in, 1] and `<name>.counts` F32 [1, 1]."""
    f32 = quant_type("F32")
    kvs = [
        KeyValue("general.type", T_STRING, "imatrix"),
        KeyValue("imatrix.datasets", T_ARRAY, list(datasets), T_STRING),
        KeyValue("imatrix.chunk_count", T_UINT32, chunk_count),
        KeyValue("imatrix.chunk_size", T_UINT32, chunk_size),
    ]
    plans, blobs = [], []
    for name in sorted(sums):
        plans.append(TensorPlan(f"{name}.in_sum2", (sums[name].size, 1), f32))
        blobs.append(sums[name].astype(np.float32).tobytes())
        plans.append(TensorPlan(f"{name}.counts", (1, 1), f32))
        blobs.append(struct.pack("<f", float(counts[name])))
    alignment = 32
    head = header_bytes(kvs, plans, alignment)
    with open(path, "wb") as fh:
        fh.write(head)
        at = 0
        for off, blob in zip(data_offsets(plans, alignment), blobs, strict=True):
            fh.write(bytes(off - at))
            fh.write(blob)
            at = off + len(blob)
        fh.write(bytes(-at % alignment))


def read_imatrix(path: str | Path) -> dict[str, np.ndarray]:
    """name -> in_sum2 / counts per column (1 where a matrix saw no tokens), as llama-quantize
    loads it."""
    gf = open_gguf(path)
    with gf:
        if gf.metadata.get("general.type") != "imatrix":
            raise QpackError(f"{path}: not an imatrix GGUF (general.type is not 'imatrix')")
        out: dict[str, np.ndarray] = {}
        for name, ti in gf.tensors.items():
            if not name.endswith(".in_sum2"):
                continue
            base = name[: -len(".in_sum2")]
            ct = gf.tensors.get(base + ".counts")
            if ct is None or ti.type.name != "F32" or ct.type.name != "F32":
                raise QpackError(f"{path}: {base} needs F32 .in_sum2 and .counts tensors")
            sums = ti.data.view(np.float32).reshape(-1, ti.shape[0]).astype(np.float32)
            cnt = ct.data.view(np.float32)
            if cnt.size != sums.shape[0]:
                raise QpackError(f"{path}: {base}.counts has {cnt.size} values for {sums.shape[0]} matrices")  # fmt: skip
            vals = np.where(cnt[:, None] > 0, sums / np.where(cnt > 0, cnt, 1)[:, None], 1.0)
            if not np.isfinite(vals).all():
                raise QpackError(f"{path}: the importance matrix of {base} is not finite")
            out[base] = vals.astype(np.float32).ravel()
        if not out:
            raise QpackError(f"{path}: no <name>.in_sum2 tensors: not an importance matrix")
        return out
