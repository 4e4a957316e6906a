"""Small GGUF files for tests, written two independent ways.

- `write_gguf` / `tiny_llama` use llama.cpp's own writer (gguf.GGUFWriter) and gguf.quants, so
  files made with them are valid by an independent definition. `tiny_llama` makes a small random
  llama-architecture model (hyperparameters, byte-level "llama" vocabulary, every weight tensor)
  for engine and tokenizer tests.
- `GGUFBytes` assembles a file field by field with struct, so a test can forge any count,
  length, type id or offset (GGUFWriter refuses empty arrays and anything malformed) and knows
  where each section starts.

Import from a test with `from gguf_fixtures import ...` (pytest puts tests/ on sys.path).
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import gguf
import numpy as np
from gguf import GGMLQuantizationType, GGUFValueType
from gguf.constants import GGML_QUANT_SIZES

# --- files written by gguf.GGUFWriter -------------------------------------------------------


def quantized(values: np.ndarray, type_name: str) -> tuple[np.ndarray, GGMLQuantizationType]:
    """f32 `values` (numpy order: last axis contiguous) in ggml type `type_name`, as the
    (array, raw type) pair that GGUFWriter.add_tensor takes. gguf.quants can quantize F32, F16,
    BF16, Q4_0..Q8_0, TQ1_0, TQ2_0 and MXFP4; for the K and IQ types use random_quantized."""
    qtype = GGMLQuantizationType[type_name]
    data = gguf.quants.quantize(np.asarray(values, dtype=np.float32), qtype)
    return data, qtype


# Byte offsets of the f16 scale fields inside one block (ggml-common.h), so that random blocks
# get sane finite scales instead of random NaN/inf halves.
_F16_SCALE_FIELDS = {
    "Q4_0": (0,), "Q4_1": (0, 2), "Q5_0": (0,), "Q5_1": (0, 2), "Q8_0": (0,),
    "Q2_K": (80, 82), "Q3_K": (108,), "Q4_K": (0, 2), "Q5_K": (0, 2), "Q6_K": (208,),
    "IQ4_NL": (0,), "IQ4_XS": (0,),
}  # fmt: skip


def random_quantized(shape: Sequence[int], type_name: str, rng: np.random.Generator) -> np.ndarray:
    """Random blocks of `type_name` for a tensor of numpy `shape` (last axis = row length):
    random quants with small positive f16 scales, as uint8 of shape (..., row_bytes). Use
    gguf.quants.dequantize on the result as the reference values."""
    block_elems, block_bytes = GGML_QUANT_SIZES[GGMLQuantizationType[type_name]]
    *outer, row = shape
    n_blocks = int(np.prod(outer, dtype=np.int64)) * (row // block_elems)
    blocks = rng.integers(0, 256, size=(n_blocks, block_bytes), dtype=np.uint8)
    for at in _F16_SCALE_FIELDS[type_name]:
        scales = rng.uniform(0.001, 0.02, size=n_blocks).astype(np.float16)
        blocks[:, at : at + 2] = scales.view(np.uint8).reshape(n_blocks, 2)
    return blocks.reshape(*outer, row // block_elems * block_bytes)


def write_gguf(
    path: str | Path,
    metadata: dict[str, Any] | None = None,
    tensors: dict[str, tuple[np.ndarray, str]] | None = None,
    *,
    arch: str = "llama",
    alignment: int | None = None,
) -> Path:
    """Write a GGUF with GGUFWriter.

    metadata: key -> value, or key -> (GGUFValueType, value) to choose the type (for arrays,
    (GGUFValueType.ARRAY, (element GGUFValueType, items))); plain Python values get
    GGUFWriter's defaults (int -> i32, float -> f32, str, bool, list).
    tensors: name -> (f32 values in numpy order, ggml type name such as "Q8_0"), or
    (uint8 blocks from random_quantized, type name) for types gguf.quants cannot quantize.
    """
    path = Path(path)
    w = gguf.GGUFWriter(str(path), arch)
    if alignment is not None:
        w.add_custom_alignment(alignment)
    for key, spec in (metadata or {}).items():
        if isinstance(spec, tuple) and len(spec) == 2 and isinstance(spec[0], GGUFValueType):
            vtype, value = spec
            if vtype == GGUFValueType.ARRAY:
                sub, items = value
                w.add_key_value(key, list(items), GGUFValueType.ARRAY, sub_type=sub)
            else:
                w.add_key_value(key, value, vtype)
        else:
            w.add_key_value(key, spec, GGUFValueType.get_type(spec))
    for name, (values, type_name) in (tensors or {}).items():
        if values.dtype == np.uint8 and type_name not in ("F32", "F16"):
            data, qtype = values, GGMLQuantizationType[type_name]
        else:
            data, qtype = quantized(values, type_name)
        if qtype in (GGMLQuantizationType.F32, GGMLQuantizationType.F16):
            w.add_tensor(name, data)
        else:
            w.add_tensor(name, data, raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@dataclass
class TinyLlamaConfig:
    n_layers: int = 2
    n_embd: int = 64
    n_ff: int = 128
    n_heads: int = 4
    n_kv_heads: int = 2
    ctx: int = 256
    weight_type: str = "Q8_0"  # for the 2-D matrices; norms stay F32
    tied_output: bool = False
    rope_base: float = 10000.0
    rms_eps: float = 1e-5
    seed: int = 0
    extra_metadata: dict[str, Any] = field(default_factory=dict)


def tiny_llama_vocab() -> tuple[list[str], list[float], list[int]]:
    """A SentencePiece-style ("llama") vocabulary: <unk>, <s>, </s>, the 256 byte tokens and a
    few printable pieces. Returns tokens, scores, token types."""
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
    types = [2, 3, 3] + [6] * 256
    pieces = ["▁", "▁the", "▁a", "e", "t", "he", "in", "▁hello", "▁world", "!"]
    tokens += pieces
    types += [1] * len(pieces)
    scores = [0.0] * 259 + [-float(i) for i in range(len(pieces))]
    return tokens, scores, types


def tiny_llama(path: str | Path, config: TinyLlamaConfig | None = None) -> Path:
    """A small random llama-architecture GGUF (what SmolLM2 has, scaled down)."""
    c = config or TinyLlamaConfig()
    rng = np.random.default_rng(c.seed)
    tokens, scores, types = tiny_llama_vocab()
    head_dim = c.n_embd // c.n_heads
    kv_dim = head_dim * c.n_kv_heads
    U32, F32 = GGUFValueType.UINT32, GGUFValueType.FLOAT32
    md: dict[str, Any] = {
        "general.name": "tiny-llama",
        "llama.block_count": (U32, c.n_layers),
        "llama.context_length": (U32, c.ctx),
        "llama.embedding_length": (U32, c.n_embd),
        "llama.feed_forward_length": (U32, c.n_ff),
        "llama.attention.head_count": (U32, c.n_heads),
        "llama.attention.head_count_kv": (U32, c.n_kv_heads),
        "llama.rope.freq_base": (F32, c.rope_base),
        "llama.attention.layer_norm_rms_epsilon": (F32, c.rms_eps),
        "llama.rope.dimension_count": (U32, head_dim),
        "llama.vocab_size": (U32, len(tokens)),
        "tokenizer.ggml.model": "llama",
        "tokenizer.ggml.tokens": (GGUFValueType.ARRAY, (GGUFValueType.STRING, tokens)),
        "tokenizer.ggml.scores": (GGUFValueType.ARRAY, (F32, scores)),
        "tokenizer.ggml.token_type": (GGUFValueType.ARRAY, (GGUFValueType.INT32, types)),
        "tokenizer.ggml.bos_token_id": (U32, 1),
        "tokenizer.ggml.eos_token_id": (U32, 2),
        "tokenizer.ggml.unknown_token_id": (U32, 0),
        **c.extra_metadata,
    }

    def w(*shape: int) -> np.ndarray:  # numpy order: (rows, row length)
        x = (rng.standard_normal(shape) * 0.05).astype(np.float32)
        if c.weight_type == "NVFP4":  # gguf cannot quantize it: zero blocks, a type qpack refuses
            block_elems, block_bytes = GGML_QUANT_SIZES[GGMLQuantizationType.NVFP4]
            return np.zeros((*shape[:-1], shape[-1] // block_elems * block_bytes), np.uint8)
        return x

    def norm() -> np.ndarray:
        return (1.0 + 0.1 * rng.standard_normal(c.n_embd)).astype(np.float32)

    n_vocab = len(tokens)
    t: dict[str, tuple[np.ndarray, str]] = {
        "token_embd.weight": (w(n_vocab, c.n_embd), c.weight_type),
        "output_norm.weight": (norm(), "F32"),
    }
    if not c.tied_output:
        t["output.weight"] = (w(n_vocab, c.n_embd), c.weight_type)
    for i in range(c.n_layers):
        p = f"blk.{i}."
        t[p + "attn_norm.weight"] = (norm(), "F32")
        t[p + "attn_q.weight"] = (w(c.n_embd, c.n_embd), c.weight_type)
        t[p + "attn_k.weight"] = (w(kv_dim, c.n_embd), c.weight_type)
        t[p + "attn_v.weight"] = (w(kv_dim, c.n_embd), c.weight_type)
        t[p + "attn_output.weight"] = (w(c.n_embd, c.n_embd), c.weight_type)
        t[p + "ffn_norm.weight"] = (norm(), "F32")
        t[p + "ffn_gate.weight"] = (w(c.n_ff, c.n_embd), c.weight_type)
        t[p + "ffn_up.weight"] = (w(c.n_ff, c.n_embd), c.weight_type)
        t[p + "ffn_down.weight"] = (w(c.n_embd, c.n_ff), c.weight_type)
    return write_gguf(path, md, t, arch="llama")


def sparse_gguf(path: Path, n_bytes: int) -> Path:
    """A llama GGUF of the shape qpack runs (1 layer, embedding 64) whose weights, all zeros,
    are left as a hole of at least `n_bytes`: the feed-forward is as wide as that takes."""
    E = 64
    n_ff = -(-n_bytes // (3 * E * 4))
    w = gguf.GGUFWriter(str(path), "llama")
    for key, value in {
        "block_count": 1, "context_length": 64, "embedding_length": E,
        "feed_forward_length": n_ff, "attention.head_count": 4,
    }.items():  # fmt: skip
        w.add_uint32(f"llama.{key}", value)
    w.add_float32("llama.attention.layer_norm_rms_epsilon", 1e-5)
    tokens, scores, types = tiny_llama_vocab()
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_scores(scores)
    w.add_token_types(types)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    shapes = {  # numpy order: (rows, row length)
        "token_embd.weight": (len(tokens), E), "output_norm.weight": (E,),
        "blk.0.attn_norm.weight": (E,), "blk.0.ffn_norm.weight": (E,),
        "blk.0.attn_q.weight": (E, E), "blk.0.attn_k.weight": (E, E),
        "blk.0.attn_v.weight": (E, E), "blk.0.attn_output.weight": (E, E),
        "blk.0.ffn_gate.weight": (n_ff, E), "blk.0.ffn_up.weight": (n_ff, E),
        "blk.0.ffn_down.weight": (E, n_ff),
    }  # fmt: skip
    data_bytes = 0
    for name, shape in shapes.items():
        nbytes = 4 * int(np.prod(shape))
        w.add_tensor_info(name, shape, np.dtype(np.float32), nbytes)
        data_bytes += nbytes + (-nbytes % 32)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    w.close()
    size = path.stat().st_size
    with open(path, "r+b") as f:
        f.truncate(size + (-size % 32) + data_bytes)
    return path


# --- files assembled byte by byte -----------------------------------------------------------

_FMT = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<B", 10: "<Q",
        11: "<q", 12: "<d"}  # fmt: skip


def pack_string(s: str | bytes, length: int | None = None) -> bytes:
    """uint64 length + bytes; `length` forges the prefix."""
    raw = s.encode() if isinstance(s, str) else s
    return struct.pack("<Q", len(raw) if length is None else length) + raw


def pack_value(vtype: int, value: Any) -> bytes:
    """The bytes of one value (no type prefix). Arrays: value = (elem_type, items)."""
    if vtype == 8:
        return pack_string(value)
    if vtype == 9:
        elem_type, items = value
        return struct.pack("<IQ", elem_type, len(items)) + b"".join(
            pack_value(elem_type, x) for x in items
        )
    return struct.pack(_FMT[vtype], value)


def pack_kv(
    key: str | bytes, vtype: int, value: Any = None, *, raw_value: bytes | None = None
) -> bytes:
    """key string + uint32 type + value (or `raw_value` bytes verbatim, to forge)."""
    body = raw_value if raw_value is not None else pack_value(vtype, value)
    return pack_string(key) + struct.pack("<I", vtype) + body


def pack_tensor_info(
    name: str | bytes, dims: Sequence[int], type_id: int, offset: int, n_dims: int | None = None
) -> bytes:
    return (
        pack_string(name)
        + struct.pack("<I", len(dims) if n_dims is None else n_dims)
        + struct.pack(f"<{len(dims)}Q", *dims)
        + struct.pack("<IQ", type_id, offset)
    )


@dataclass
class GGUFBytes:
    """A GGUF assembled from already-packed pieces, with the offsets of every section.

    `build()` returns the bytes; afterwards `kv_starts`, `info_starts`, `data_start` tell
    where each part begins (useful for truncating at section boundaries).
    """

    kvs: list[bytes] = field(default_factory=list)
    infos: list[bytes] = field(default_factory=list)
    data: bytes = b""
    alignment: int = 32
    version: int = 3
    magic: bytes = b"GGUF"
    tensor_count: int | None = None  # forge the counts
    kv_count: int | None = None
    kv_starts: list[int] = field(default_factory=list)
    info_starts: list[int] = field(default_factory=list)
    data_start: int = 0

    def build(self) -> bytes:
        out = bytearray(self.magic)
        out += struct.pack("<I", self.version)
        out += struct.pack(
            "<Q", len(self.infos) if self.tensor_count is None else self.tensor_count
        )
        out += struct.pack("<Q", len(self.kvs) if self.kv_count is None else self.kv_count)
        self.kv_starts, self.info_starts = [], []
        for kv in self.kvs:
            self.kv_starts.append(len(out))
            out += kv
        for ti in self.infos:
            self.info_starts.append(len(out))
            out += ti
        out += bytes(-len(out) % self.alignment)
        self.data_start = len(out)
        out += self.data
        return bytes(out)


def small_valid_gguf() -> GGUFBytes:
    """A small well-formed file: a few keys of several types, a string array, two tensors."""
    f32 = np.arange(8, dtype=np.float32)
    q8 = gguf.quants.quantize(np.linspace(-1, 1, 64, dtype=np.float32).reshape(2, 32),
                              GGMLQuantizationType.Q8_0)  # fmt: skip
    g = GGUFBytes(
        kvs=[
            pack_kv("general.architecture", 8, "llama"),
            pack_kv("llama.block_count", 4, 2),
            pack_kv("x.flag", 7, 1),
            pack_kv("x.scale", 6, 0.5),
            pack_kv("x.words", 9, (8, ["a", "é", "", "long" * 40])),
            pack_kv("x.ids", 9, (5, [1, -2, 3])),
        ],
        infos=[
            pack_tensor_info("a.weight", [8], 0, 0),
            pack_tensor_info("b.weight", [32, 2], 8, 32),
        ],
    )
    data = f32.tobytes() + bytes(32 - f32.nbytes) + q8.tobytes()
    g.data = data
    return g
