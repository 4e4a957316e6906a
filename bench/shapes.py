"""Synthetic GGUFs of real model shapes, for speed measurements at the sizes people run.

    python bench/shapes.py --list
    python bench/shapes.py [--only 1b-q4_k_m,3b-q4_k_m] [--rebuild] [--dir DIR]

Each model has the real shape of Llama 3.2 1B / 3B, Llama 3.1 8B or Qwen3 4B (widths, layers,
heads, FFN, tied or untied output, rope theta and llama 3's rope factors, q/k norms, the real
vocabulary size) in llama.cpp's Q4_K_M or Q8_0 mix: which tensor is Q6_K, Q4_K, Q8_0 or F32 is
decided by builder/quantize.py's `mix_type`, the rules of llama-quantize. The quantized blocks
are random bytes with sane scales (every f16 d/dmin a small positive constant, so the weights
stay within about +-0.05 like a trained model's), written straight: speed does not depend on
the values, and an 8B file takes about a minute. The vocabulary is SmolLM2's byte-level BPE
(tokens and merges) grown to the real size with generated tokens, each the concatenation of two
existing ones with its merge, so both qpack and llama.cpp load it and tokenize with it.

Files are cached in --dir (default ~/.cache/qpack/shapes/), written to NAME.gguf.PID.part and
renamed when complete. bench/compare.py takes the names (`1b-q4_k_m`) in place of paths.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np

HERE = Path(__file__).resolve().parent
DEFAULT_DIR = Path(os.path.expanduser("~/.cache/qpack/shapes"))


@dataclass(frozen=True)
class Shape:
    arch: str
    n_layer: int
    n_embd: int
    n_head: int
    n_head_kv: int
    head_dim: int
    n_ff: int
    n_vocab: int
    tied: bool
    rope_theta: float
    rope_scaling: tuple[float, float, float, int] | None  # llama 3: factor, low, high, orig ctx
    qk_norm: bool = False
    pre: str = "llama-bpe"
    ctx_train: int = 131072


SHAPES: dict[str, Shape] = {
    "1b": Shape("llama", 16, 2048, 32, 8, 64, 8192, 128256, True, 500000.0, (32.0, 1.0, 4.0, 8192)),
    "3b": Shape("llama", 28, 3072, 24, 8, 128, 8192, 128256, True, 500000.0, (32.0, 1.0, 4.0, 8192)),
    "8b": Shape("llama", 32, 4096, 32, 8, 128, 14336, 128256, False, 500000.0, (8.0, 1.0, 4.0, 8192)),
    "qwen3-4b": Shape("qwen3", 36, 2560, 32, 8, 128, 9728, 151936, True, 1000000.0, None,
                      qk_norm=True, pre="qwen2", ctx_train=40960),
}  # fmt: skip
MIXES = ("Q4_K_M", "Q8_0")
MODELS = {f"{s}-{m.lower()}": (s, m) for s in SHAPES for m in MIXES}

# ggml block layouts (gguf-facts.md): elements, bytes, {offset of an f16 scale: its value}.
# Q4_K: d*sc*q - dmin*m (6-bit sc, m; 4-bit q); Q5_K the same with 5-bit q; Q6_K: d*sc*(q-32)
# with int8 sc; Q8_0: d*q with int8 q. These d keep |w| below about 0.05.
BLOCKS = {
    "Q4_K": (256, 144, {0: 4e-5, 2: 2e-5}),
    "Q5_K": (256, 176, {0: 2e-5, 2: 1e-5}),
    "Q6_K": (256, 210, {208: 4e-6}),
    "Q8_0": (32, 34, {0: 2e-4}),
}


def llama3_rope_factors(s: Shape) -> np.ndarray:
    """rope_freqs.weight as llama.cpp's converter writes it for llama 3's rope scaling."""
    factor, low, high, orig = s.rope_scaling
    out = []
    for i in range(0, s.head_dim, 2):
        wavelen = 2 * math.pi * s.rope_theta ** (i / s.head_dim)
        if wavelen < orig / high:
            out.append(1.0)
        elif wavelen > orig / low:
            out.append(factor)
        else:
            smooth = (orig / wavelen - low) / (high - low)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return np.array(out, np.float32)


def tensor_plan(s: Shape) -> list[tuple[str, tuple[int, ...]]]:
    """(name, ggml shape: row length first) in llama.cpp's file order."""
    E, q_dim, kv_dim = s.n_embd, s.n_head * s.head_dim, s.n_head_kv * s.head_dim
    plan = [("token_embd.weight", (E, s.n_vocab))]
    if s.rope_scaling:
        plan.append(("rope_freqs.weight", (s.head_dim // 2,)))
    plan.append(("output_norm.weight", (E,)))
    if not s.tied:
        plan.append(("output.weight", (E, s.n_vocab)))
    for i in range(s.n_layer):
        p = f"blk.{i}."
        plan += [
            (p + "attn_norm.weight", (E,)),
            (p + "attn_q.weight", (E, q_dim)),
            (p + "attn_k.weight", (E, kv_dim)),
            (p + "attn_v.weight", (E, kv_dim)),
            (p + "attn_output.weight", (q_dim, E)),
        ]
        if s.qk_norm:
            plan += [(p + "attn_q_norm.weight", (s.head_dim,)), (p + "attn_k_norm.weight", (s.head_dim,))]  # fmt: skip
        plan += [
            (p + "ffn_norm.weight", (E,)),
            (p + "ffn_gate.weight", (E, s.n_ff)),
            (p + "ffn_up.weight", (E, s.n_ff)),
            (p + "ffn_down.weight", (s.n_ff, E)),
        ]
    return plan


def tensor_types(s: Shape, mix: str, plan: list[tuple[str, tuple[int, ...]]]) -> dict[str, str]:
    """Each tensor's type under llama-quantize's mix (its counters walk layer by layer)."""
    from qpack.builder.quantize import (
        FILE_TYPES,
        MixState,
        _layer,
        allows_quantization,
        fallback,
        mix_type,
    )

    names = [n for n, _ in plan]
    shapes = dict(plan)
    st = MixState(
        ftype=FILE_TYPES[mix],
        n_layer=s.n_layer,
        gqa=s.n_head // s.n_head_kv,
        has_imatrix=False,
        tied=s.tied,
        n_attention_wv=s.n_layer,
    )
    out = {}
    for name in sorted(names, key=lambda n: (_layer(n), n)):
        shape = shapes[name]
        if not allows_quantization(name, shape):
            out[name] = "F32"
        else:
            out[name] = fallback(mix_type(st, name, shape), shape[0])
    return out


def vocabulary(n_vocab: int) -> tuple[list[str], list[int], list[str], dict]:
    """SmolLM2's byte-level BPE grown to n_vocab tokens: each new token joins two existing
    ones (a merge of lower rank than every real one would not change them: appended last)."""
    from qpack.builder import models
    from qpack.runtime.gguf import open_gguf

    md = open_gguf(models.default_model_path()).metadata
    tokens = list(md["tokenizer.ggml.tokens"])
    types = [int(t) for t in md["tokenizer.ggml.token_type"]]
    merges = list(md["tokenizer.ggml.merges"])
    rng = np.random.default_rng(1)
    normal = [t for t, ty in zip(tokens, types, strict=True) if ty == 1 and len(t) <= 8]
    seen = set(tokens)
    while len(tokens) < n_vocab:
        a, b = rng.integers(0, len(normal), 2)
        left, right = normal[a], normal[b]
        if left + right not in seen:
            seen.add(left + right)
            tokens.append(left + right)
            types.append(1)
            merges.append(f"{left} {right}")
    special = {k: md[k] for k in ("tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id",
                                  "tokenizer.chat_template")}  # fmt: skip
    return tokens, types, merges, special


def random_blocks(rng: np.random.Generator, n_elems: int, kind: str) -> np.ndarray:
    elems, nbytes, scales = BLOCKS[kind]
    blocks = np.frombuffer(rng.bytes(n_elems // elems * nbytes), np.uint8).reshape(-1, nbytes)
    blocks = blocks.copy()
    for at, value in scales.items():
        blocks[:, at : at + 2] = np.frombuffer(np.float16(value).tobytes(), np.uint8)
    return blocks


class Progress:
    def __init__(self, label: str, total: int):
        self.label, self.total, self.done, self.t0 = label, total, 0, time.time()
        self.tty = sys.stderr.isatty()

    def add(self, n: int) -> None:
        self.done += n
        if self.tty or self.done == self.total:
            frac = self.done / self.total
            bar = "#" * int(30 * frac)
            end = "\n" if self.done == self.total else ""
            print(f"\r{self.label}: [{bar:30}] {self.done / 1e9:5.2f}/{self.total / 1e9:.2f} GB "
                  f"{time.time() - self.t0:4.0f} s", end=end, file=sys.stderr, flush=True)  # fmt: skip


def write_model(path: Path, name: str) -> None:
    """Header first, then each tensor generated and written in turn (never all in memory)."""
    shape_name, mix = MODELS[name]
    s = SHAPES[shape_name]
    plan = tensor_plan(s)
    types = tensor_types(s, mix, plan)
    rng = np.random.default_rng(0)
    w = gguf.GGUFWriter(str(path), s.arch)
    w.add_name(f"synthetic {shape_name} {mix}")
    w.add_file_type(15 if mix == "Q4_K_M" else 7)
    w.add_quantization_version(2)
    w.add_block_count(s.n_layer)
    w.add_context_length(s.ctx_train)
    w.add_embedding_length(s.n_embd)
    w.add_feed_forward_length(s.n_ff)
    w.add_head_count(s.n_head)
    w.add_head_count_kv(s.n_head_kv)
    w.add_key_length(s.head_dim)
    w.add_value_length(s.head_dim)
    w.add_rope_dimension_count(s.head_dim)
    w.add_rope_freq_base(s.rope_theta)
    w.add_layer_norm_rms_eps(1e-5 if s.arch == "llama" else 1e-6)
    w.add_vocab_size(s.n_vocab)
    tokens, token_types, merges, special = vocabulary(s.n_vocab)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(s.pre)
    w.add_token_list(tokens)
    w.add_token_types(token_types)
    w.add_token_merges(merges)
    w.add_bos_token_id(special["tokenizer.ggml.bos_token_id"])
    w.add_eos_token_id(special["tokenizer.ggml.eos_token_id"])
    w.add_add_bos_token(False)
    w.add_chat_template(special["tokenizer.chat_template"])

    total = 0
    for tname, shape in plan:
        kind = types[tname]
        if kind == "F32":
            nbytes = int(np.prod(shape)) * 4
            w.add_tensor_info(tname, shape[::-1], np.dtype(np.float32), nbytes)
        else:
            elems, block_bytes, _ = BLOCKS[kind]
            byte_shape = (*shape[:0:-1], shape[0] // elems * block_bytes)  # numpy order, bytes
            nbytes = int(np.prod(byte_shape))
            raw = gguf.GGMLQuantizationType[kind]
            w.add_tensor_info(tname, byte_shape, np.dtype(np.uint8), nbytes, raw)
        total += nbytes
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    bar = Progress(name, total)
    for tname, shape in plan:
        kind = types[tname]
        if tname == "rope_freqs.weight":
            data = llama3_rope_factors(s)
        elif kind == "F32":
            data = (1.0 + 0.1 * rng.standard_normal(shape[::-1])).astype(np.float32)
        else:
            data = random_blocks(rng, int(np.prod(shape)), kind).reshape(*shape[:0:-1], -1)
        w.write_tensor_data(data)
        bar.add(data.nbytes)
    w.close()


def model_path(name: str, directory: Path = DEFAULT_DIR, rebuild: bool = False) -> Path:
    """The cached file of model `name` (e.g. "1b-q4_k_m"), written first if missing."""
    if name not in MODELS:
        raise SystemExit(f"unknown shape {name!r}; known: {', '.join(MODELS)}")
    path = directory / f"{name}.gguf"
    if rebuild or not path.exists():
        directory.mkdir(parents=True, exist_ok=True)
        part = path.with_suffix(f".gguf.{os.getpid()}.part")  # several writers may race
        write_model(part, name)
        os.replace(part, path)
    return path


def describe(name: str) -> str:
    shape_name, mix = MODELS[name]
    s = SHAPES[shape_name]
    plan = tensor_plan(s)
    types = tensor_types(s, mix, plan)
    size = sum(
        int(np.prod(sh)) * 4
        if types[n] == "F32"
        else int(np.prod(sh)) // BLOCKS[types[n]][0] * BLOCKS[types[n]][1]
        for n, sh in plan
    )
    counts: dict[str, int] = {}
    for t in types.values():
        counts[t] = counts.get(t, 0) + 1
    mix_text = " ".join(f"{k}:{v}" for k, v in sorted(counts.items()))
    return (f"{name:18} {size / 1e9:5.2f} GB  {s.arch} {s.n_layer} layers, {s.n_embd} wide, "
            f"{s.n_head}/{s.n_head_kv} heads of {s.head_dim}, FFN {s.n_ff}, vocab {s.n_vocab}, "
            f"{'tied' if s.tied else 'untied'}; tensors {mix_text}")  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--list", action="store_true", help="print the models and their sizes")
    ap.add_argument("--only", help="comma-separated model names (default: all)")
    ap.add_argument("--dir", type=Path, default=DEFAULT_DIR)
    ap.add_argument("--rebuild", action="store_true", help="write even if the file exists")
    a = ap.parse_args()
    names = a.only.split(",") if a.only else list(MODELS)
    for name in names:
        if name not in MODELS:
            raise SystemExit(f"unknown shape {name!r}; known: {', '.join(MODELS)}")
    if a.list:
        for name in names:
            cached = (a.dir / f"{name}.gguf").exists()
            print(describe(name) + ("  [cached]" if cached else ""))
        return
    for name in names:
        t0 = time.time()
        path = model_path(name, a.dir, a.rebuild)
        print(f"{path}: {path.stat().st_size / 1e9:.2f} GB ({time.time() - t0:.0f} s)")


if __name__ == "__main__":
    main()
