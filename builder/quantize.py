"""`qpack quantize`: an F32/F16/BF16 GGUF to a quantized one, with llama.cpp's per-tensor rules.

Which tensor gets which type follows llama.cpp's llama-quant.cpp (the facts, rewritten):
- only tensors of 2+ dimensions whose name ends in "weight" are quantized, never norms, expert
  gates, position embeddings or a few small special tensors: those keep their input type;
- the output matrix (or the token embedding when the output is tied to it) becomes Q6_K (Q8_0
  when its row is not a multiple of the type's block);
- the _S/_M/_L mixes give attn_v, attn_output and ffn_down more bits in chosen layers;
- a type whose block does not divide a row falls back: Q2_K/Q3_K -> Q4_0, Q4_K -> Q5_0,
  Q5_K -> Q5_1, Q6_K -> Q8_0, IQ4_XS -> IQ4_NL (F16 if even that does not fit).
The data is written at final offsets by worker threads (numpy releases the GIL), chunk by chunk,
so the output never sits in memory whole.
"""

from __future__ import annotations

import os
import re
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from qpack.builder.gguf_write import (
    KeyValue,
    TensorPlan,
    data_offsets,
    data_size,
    header_bytes,
)
from qpack.builder.quant_blocks import quantize_rows
from qpack.runtime.errors import QpackError
from qpack.runtime.gguf import T_UINT32, GGUFFile, TensorInfo, open_gguf
from qpack.runtime.quants import QuantType, quant_type


@dataclass(frozen=True)
class FileType:
    """A llama_ftype: the name users type, its enum value (general.file_type), its base type."""

    name: str
    id: int
    base: str


FILE_TYPES: dict[str, FileType] = {
    f.name: f
    for f in (
        FileType("F32", 0, "F32"),
        FileType("F16", 1, "F16"),
        FileType("BF16", 32, "BF16"),
        FileType("Q4_0", 2, "Q4_0"),
        FileType("Q4_1", 3, "Q4_1"),
        FileType("Q8_0", 7, "Q8_0"),
        FileType("Q5_0", 8, "Q5_0"),
        FileType("Q5_1", 9, "Q5_1"),
        FileType("Q2_K", 10, "Q2_K"),
        FileType("Q3_K_S", 11, "Q3_K"),
        FileType("Q3_K_M", 12, "Q3_K"),
        FileType("Q3_K_L", 13, "Q3_K"),
        FileType("Q4_K_S", 14, "Q4_K"),
        FileType("Q4_K_M", 15, "Q4_K"),
        FileType("Q5_K_S", 16, "Q5_K"),
        FileType("Q5_K_M", 17, "Q5_K"),
        FileType("Q6_K", 18, "Q6_K"),
        FileType("IQ4_NL", 25, "IQ4_NL"),
        FileType("IQ4_XS", 30, "IQ4_XS"),
        FileType("IQ2_XXS", 19, "IQ2_XXS"),
        FileType("IQ2_XS", 20, "IQ2_XS"),
        FileType("IQ2_S", 28, "IQ2_XS"),  # llama.cpp's IQ2_S mix is IQ2_XS with more bits around
        FileType("IQ2_M", 29, "IQ2_S"),
        FileType("IQ3_XXS", 23, "IQ3_XXS"),
        FileType("IQ3_XS", 22, "IQ3_S"),
        FileType("IQ3_S", 26, "IQ3_S"),
        FileType("IQ3_M", 27, "IQ3_S"),
        FileType("IQ1_S", 24, "IQ1_S"),
        FileType("IQ1_M", 31, "IQ1_M"),
    )
}
FILE_TYPES["Q3_K"] = FILE_TYPES["Q3_K_M"]  # llama-quantize's aliases
FILE_TYPES["Q4_K"] = FILE_TYPES["Q4_K_M"]
FILE_TYPES["Q5_K"] = FILE_TYPES["Q5_K_M"]

SOURCE_TYPES = frozenset({"F32", "F16", "BF16"})
QUANTIZATION_VERSION = 2  # GGML_QNT_VERSION
FALLBACK = {
    "Q2_K": "Q4_0", "Q3_K": "Q4_0", "Q4_K": "Q5_0", "Q5_K": "Q5_1", "Q6_K": "Q8_0",
    "IQ4_XS": "IQ4_NL", "IQ1_S": "IQ4_NL", "IQ1_M": "IQ4_NL", "IQ2_XXS": "IQ4_NL",
    "IQ2_XS": "IQ4_NL", "IQ2_S": "IQ4_NL", "IQ3_XXS": "IQ4_NL", "IQ3_S": "IQ4_NL",
}  # fmt: skip
# Tensor types whose quantization needs an importance matrix (llama.cpp refuses without one:
# "the result will be garbage"), except in the output and token embedding.
NEEDS_IMATRIX = frozenset({"IQ1_S", "IQ1_M", "IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ3_XXS"})
# The mixes below 3 bits per weight, which share llama.cpp's rules for attn_v, ffn_down...
LOW_BIT_MIXES = frozenset({"IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ2_M", "IQ1_S", "IQ1_M"})
# Substrings of 2-D weights that llama.cpp never quantizes (small or special tensors).
KEEP_TYPE = (
    "_norm.weight", "ffn_gate_inp.weight", "altup", "laurel", "per_layer_model_proj",
    "position_embd.weight", "token_types.weight", "ssm_conv1d", "shortconv.conv.weight",
    "time_mix_first.weight", "time_mix_w0.weight", "time_mix_w1.weight", "time_mix_w2.weight",
    "time_mix_v0.weight", "time_mix_v1.weight", "time_mix_v2.weight", "time_mix_a0.weight",
    "time_mix_a1.weight", "time_mix_a2.weight", "time_mix_g1.weight", "time_mix_g2.weight",
    "time_mix_decay_w1.weight", "time_mix_decay_w2.weight", "time_mix_lerp_fused.weight",
    "attn_rel_b.weight",
)  # fmt: skip
CHUNK_ELEMENTS = 1 << 20  # rows per work item: about this many weights (bounds temporaries)


def n_dims(shape: tuple[int, ...]) -> int:
    """ggml_n_dims: trailing dimensions of size 1 do not count."""
    n = len(shape)
    while n > 1 and shape[n - 1] == 1:
        n -= 1
    return n


def allows_quantization(name: str, shape: tuple[int, ...]) -> bool:
    if n_dims(shape) < 2 or not name.endswith("weight"):
        return False
    return not any(s in name for s in KEEP_TYPE)


def category(name: str) -> str:
    if name == "output.weight":
        return "output"
    if name in ("token_embd.weight", "per_layer_token_embd.weight"):
        return "token_embd"
    for key, cat in (
        ("attn_qkv.weight", "attn_v"),  # fused and MLA value projections count as attn_v
        ("attn_kv_b.weight", "attn_v"),
        ("attn_v.weight", "attn_v"),
        ("attn_k.weight", "attn_k"),
        ("attn_q.weight", "attn_q"),
        ("attn_output.weight", "attn_output"),
        ("ffn_up", "ffn_up"),
        ("ffn_gate", "ffn_gate"),
        ("ffn_down", "ffn_down"),
    ):
        if key in name:
            return "attn_qkv" if key == "attn_qkv.weight" else cat
    return "other"


def _layer(name: str) -> int:
    m = re.match(r"blk\.(\d+)\.", name)
    return int(m.group(1)) if m else -1


def use_more_bits(i: int, n: int) -> bool:
    return i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2


@dataclass
class MixState:
    """llama.cpp's quantize_state_impl: counters over attn_v and ffn_down in layer order."""

    ftype: FileType
    n_layer: int
    gqa: int
    has_imatrix: bool
    tied: bool
    n_attention_wv: int = 0
    n_expert: int = 0
    i_attention_wv: int = 0
    i_ffn_down: int = 0
    i_ffn_gate: int = 0
    i_ffn_up: int = 0


def mix_type(st: MixState, name: str, shape: tuple[int, ...]) -> str:
    """The type llama.cpp's mix `st.ftype` gives this (quantizable) tensor, before fallback."""
    f = st.ftype.name
    t = st.ftype.base
    cat = category(name)
    if cat == "output" or (st.tied and cat == "token_embd"):
        if shape[0] % quant_type(t).block_elems:
            return "Q8_0"
        if f in LOW_BIT_MIXES or f == "IQ3_XXS":
            return "Q5_K"
        return "Q6_K" if t != "Q8_0" else t
    if cat == "token_embd":
        if f in ("IQ2_XXS", "IQ2_XS", "IQ1_S", "IQ1_M"):
            return "Q2_K"
        return "IQ3_S" if f in ("IQ2_S", "IQ2_M", "IQ3_XXS") else t
    if f in LOW_BIT_MIXES:
        return _low_bit_mix_type(st, cat)
    if cat == "attn_v" or cat == "attn_qkv":
        if cat == "attn_qkv":
            t = {"Q3_K_M": "Q4_K", "Q3_K_L": "Q4_K", "Q4_K_M": "Q5_K", "Q5_K_M": "Q6_K", "IQ3_M": "Q4_K"}.get(f, t)  # fmt: skip
            return t
        i, n = st.i_attention_wv, st.n_attention_wv
        if f == "Q2_K":
            t = "Q4_K" if st.gqa >= 4 else "Q3_K"
        elif f == "IQ3_XXS":
            t = "Q4_K" if st.gqa >= 4 else "IQ3_XXS" if st.has_imatrix else "IQ3_S"
        elif f in ("IQ3_XS", "IQ3_S") and st.gqa >= 4:
            t = "Q4_K"
        elif f == "IQ3_M":
            t = "Q4_K"
        elif f == "Q3_K_M":
            t = "Q5_K" if i < 2 else "Q4_K"
        elif f == "Q3_K_L":
            t = "Q5_K"
        elif f in ("IQ4_NL", "IQ4_XS") and st.gqa >= 4:
            t = "Q5_K"
        elif f in ("Q4_K_M", "Q5_K_M") and use_more_bits(i, n):
            t = "Q6_K"
        elif f == "Q4_K_S" and i < 4:
            t = "Q5_K"
        st.i_attention_wv += 1
        return t
    if cat in ("attn_k", "attn_q"):
        return {"IQ3_XS": "IQ3_XXS", "IQ3_XXS": "IQ2_S"}.get(f, t)
    if cat == "ffn_down":
        i, n = st.i_ffn_down, st.n_layer
        if f == "Q2_K":
            t = "Q3_K"
        elif f == "IQ3_XXS" and not st.has_imatrix:
            t = "Q4_K" if i < n // 8 else "Q3_K"
        elif f == "Q3_K_M":
            t = "Q5_K" if i < n // 16 else "Q4_K"
        elif f == "IQ3_M" and i < n // 8:
            t = "Q4_K"
        elif f == "Q3_K_L":
            t = "Q5_K"
        elif f == "Q4_K_M":
            if use_more_bits(i, n):
                t = "Q6_K"
        elif i < n // 8 and f in ("IQ4_NL", "IQ4_XS") and not st.has_imatrix:
            t = "Q5_K"
        elif f == "Q5_K_M" and use_more_bits(i, n):
            t = "Q6_K"
        elif f == "Q4_K_S" and i < n // 8:
            t = "Q5_K"
        elif f in ("Q4_0", "Q5_0") and st.has_imatrix and i < n // 8:
            t = "Q4_1" if f == "Q4_0" else "Q5_1"
        st.i_ffn_down += 1
        return t
    if cat == "attn_output":
        return {"Q2_K": "Q3_K", "IQ3_XXS": "IQ3_S", "Q3_K_M": "Q4_K", "Q3_K_L": "Q5_K", "IQ3_M": "Q4_K"}.get(f, t)  # fmt: skip
    if cat in ("ffn_gate", "ffn_up"):
        attr = "i_ffn_gate" if cat == "ffn_gate" else "i_ffn_up"
        i, n = getattr(st, attr), st.n_layer
        setattr(st, attr, i + 1)
        if f == "IQ3_XS" and n // 8 <= i < 7 * n // 8:
            return "IQ3_XXS"
    return t


def _low_bit_mix_type(st: MixState, cat: str) -> str:
    """llama.cpp's choices for the IQ1/IQ2 mixes (output and token embedding already decided)."""
    f, t = st.ftype.name, st.ftype.base
    wide = "IQ3_S" if f in ("IQ2_S", "IQ2_M") else "Q2_K"
    if cat in ("attn_v", "attn_qkv"):
        st.i_attention_wv += 1
        return "Q4_K" if st.gqa >= 4 or st.n_expert >= 4 else wide
    if cat == "attn_k" and st.n_expert == 8:
        return "Q4_K"
    if cat == "ffn_down":
        i = st.i_ffn_down
        st.i_ffn_down += 1
        return wide if i < st.n_layer // 8 else t
    if cat == "attn_output":
        if st.n_expert == 8:
            return "Q5_K"
        if f in ("IQ1_S", "IQ1_M"):
            return "IQ2_XXS"
        return "IQ3_S" if f in ("IQ2_S", "IQ2_M") else t
    return t


def fallback(type_name: str, row: int) -> str:
    """A type whose block divides `row`, as llama.cpp's tensor_type_fallback chooses it."""
    if row % quant_type(type_name).block_elems == 0:
        return type_name
    alt = FALLBACK.get(type_name)
    if alt is None:
        raise QpackError(f"no fallback type for {type_name} with rows of {row}")
    return alt if row % quant_type(alt).block_elems == 0 else "F16"


def choose_types(gf: GGUFFile, ftype: FileType, has_imatrix: bool = False) -> dict[str, QuantType]:
    """Every tensor's output type under `ftype`, as llama.cpp's mixes choose them."""
    return plan_types(gf, ftype, has_imatrix)[0]


def plan_types(
    gf: GGUFFile, ftype: FileType, has_imatrix: bool = False
) -> tuple[dict[str, QuantType], list[str]]:
    """(every tensor's output type, the tensors whose row forced a fallback type)."""
    md = gf.metadata
    arch = gf.architecture
    n_head = int(md.get(f"{arch}.attention.head_count", 1) or 1)
    n_head_kv = int(md.get(f"{arch}.attention.head_count_kv", n_head) or n_head)
    names = list(gf.tensors)
    st = MixState(
        ftype=ftype,
        n_layer=int(md.get(f"{arch}.block_count", 0)),
        gqa=n_head // max(n_head_kv, 1),
        has_imatrix=has_imatrix,
        tied="output.weight" not in gf.tensors,
        n_attention_wv=sum(category(n) in ("attn_v", "attn_qkv") for n in names),
        n_expert=int(md.get(f"{arch}.expert_count", 0) or 0),
    )
    out: dict[str, QuantType] = {}
    fallbacks: list[str] = []
    # llama.cpp walks the tensors by layer, then by name: its counters depend on that order.
    for name in sorted(names, key=lambda n: (_layer(n), n)):
        ti = gf.tensors[name]
        if not allows_quantization(name, ti.shape):
            new = ti.type.name
        elif ftype.base in SOURCE_TYPES:
            new = ftype.base
        else:
            wanted = mix_type(st, name, ti.shape)
            new = fallback(wanted, ti.shape[0])
            if new != wanted:
                fallbacks.append(name)
        out[name] = quant_type(new)
    return {n: out[n] for n in names}, fallbacks


@dataclass
class QuantizeReport:
    output: Path
    ftype: str
    size_in: int
    size_out: int
    n_fallback: int
    types: dict[str, int] = field(default_factory=dict)  # type name -> tensor count
    seconds: float = 0.0


def _as_f32(ti: TensorInfo, dequantize: Callable | None) -> np.ndarray:
    data = ti.data
    name = ti.type.name
    if name == "F32":
        return data.view(np.float32)
    if name == "F16":
        return data.view(np.float16).astype(np.float32)
    if name == "BF16":
        return (data.view(np.uint16).astype(np.uint32) << 16).view(np.float32)
    if dequantize is None:
        raise QpackError(
            f"tensor {ti.name} is already quantized ({name}): requantizing loses quality; "
            "pass --allow-requantize to do it anyway"
        )
    return dequantize(ti.ggml_type, data, ti.n_elements)


def load_imatrix_for(imatrix: dict[str, np.ndarray] | None, ti: TensorInfo) -> np.ndarray | None:
    if not imatrix or ti.name not in imatrix:
        return None
    im = imatrix[ti.name]
    expected = ti.shape[0] * (ti.shape[2] if len(ti.shape) > 2 else 1)
    if im.size != expected:
        if ti.name in ("token_embd.weight", "per_layer_token_embd.weight"):
            return None
        raise QpackError(
            f"the importance matrix for {ti.name} has {im.size} values, the tensor needs {expected}"
        )
    return im.astype(np.float32)


def quantize_file(
    src: str | os.PathLike,
    dst: str | os.PathLike,
    ftype_name: str,
    *,
    imatrix: dict[str, np.ndarray] | None = None,
    allow_requantize: bool = False,
    threads: int | None = None,
    progress: Callable[[int], None] | None = None,
    warn: Callable[[str], None] | None = None,
) -> QuantizeReport:
    """Quantize the GGUF at `src` into `dst` as the llama.cpp file type `ftype_name`.

    `progress(n)` is called with input bytes done as chunks finish; `warn(text)` for notes."""
    import time

    start = time.perf_counter()
    ftype = FILE_TYPES.get(ftype_name.upper())
    if ftype is None:
        raise QpackError(
            f"unknown quantization type {ftype_name!r} (choose from {', '.join(FILE_TYPES)})"
        )
    gf = open_gguf(src)
    with gf:
        types, fallbacks = plan_types(gf, ftype, has_imatrix=bool(imatrix))
        dequantize = None
        requant = [n for n, t in types.items() if t != gf.tensors[n].type and gf.tensors[n].type.name not in SOURCE_TYPES]  # fmt: skip
        if requant:
            if not allow_requantize:
                first = gf.tensors[requant[0]]
                raise QpackError(
                    f"{src}: tensor {first.name} is already {first.type.name}: quantize from an "
                    "F32, F16 or BF16 model, or pass --allow-requantize (quality suffers)"
                )
            if warn:
                warn(
                    f"requantizing {len(requant)} already quantized tensors: the result is worse "
                    "than quantizing the original F16/F32 model"
                )
            from qpack.runtime import cpu

            dequantize = cpu.current().dequantize
        plans = [TensorPlan(n, gf.tensors[n].shape, types[n]) for n in gf.tensors]
        kvs = [KeyValue.of(f) for f in gf.fields.values()]
        kvs = _set_u32(kvs, "general.quantization_version", QUANTIZATION_VERSION)
        kvs = _set_u32(kvs, "general.file_type", ftype.id)
        head = header_bytes(kvs, plans, gf.alignment)
        offsets = data_offsets(plans, gf.alignment)
        total = len(head) + data_size(plans, gf.alignment)
        jobs = []
        for plan, off in zip(plans, offsets, strict=True):
            ti = gf.tensors[plan.name]
            at = len(head) + off
            if plan.type == ti.type:
                jobs.append((_copy_job, ti, plan, at, None))
                continue
            im = load_imatrix_for(imatrix, ti)
            if im is None and plan.type.name in NEEDS_IMATRIX:
                _refuse_without_imatrix(ti.name, plan.type.name, ftype.name, bool(imatrix))
            jobs.extend(_chunk_jobs(ti, plan, at, im))
        tmp = Path(f"{os.fspath(dst)}.part")
        fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            os.ftruncate(fd, total)
            write_at(fd, head, 0)
            lock = threading.Lock()

            def run(job):
                fn, ti, plan, at, arg = job
                done = fn(fd, ti, plan, at, arg, dequantize)
                if progress:
                    with lock:
                        progress(done)

            with ThreadPoolExecutor(max_workers=threads or os.cpu_count() or 1) as pool:
                for fut in [pool.submit(run, j) for j in jobs]:
                    fut.result()
        except BaseException:
            os.close(fd)
            tmp.unlink(missing_ok=True)
            raise
        os.close(fd)
        os.replace(tmp, dst)
        counts: dict[str, int] = {}
        for t in types.values():
            counts[t.name] = counts.get(t.name, 0) + 1
        return QuantizeReport(
            output=Path(dst),
            ftype=ftype.name,
            size_in=gf.file_size,
            size_out=total,
            n_fallback=len(fallbacks),
            types=counts,
            seconds=time.perf_counter() - start,
        )


def _refuse_without_imatrix(name: str, type_name: str, ftype: str, have_any: bool) -> None:
    if category(name) in ("output", "token_embd"):
        return  # llama.cpp quantizes these without one
    if have_any:
        raise QpackError(
            f"the importance matrix has no entry for {name}, which {ftype} makes {type_name}: "
            "that type needs one (compute it on this model with `qpack imatrix`)"
        )
    raise QpackError(
        f"{ftype} needs an importance matrix ({name} becomes {type_name}, which is garbage "
        "without one): pass --imatrix FILE (make it with `qpack imatrix MODEL -f TEXT`)"
    )


_WRITE_LOCK = threading.Lock()


def write_at(fd: int, data: bytes, position: int) -> None:
    """A positioned write that worker threads can share one descriptor for: os.pwrite where
    it exists, else seek + write under a lock (Windows)."""
    if hasattr(os, "pwrite"):
        view = memoryview(data)
        while view:
            n = os.pwrite(fd, view, position)
            view, position = view[n:], position + n
        return
    from qpack.builder import fileio

    with _WRITE_LOCK:
        fileio.write_at(fd, data, position)


def _set_u32(kvs: list[KeyValue], key: str, value: int) -> list[KeyValue]:
    new = KeyValue(key, T_UINT32, value)
    for i, kv in enumerate(kvs):
        if kv.key == key:
            return kvs[:i] + [new] + kvs[i + 1 :]
    return kvs + [new]


def _copy_job(fd, ti: TensorInfo, plan, at: int, _arg, _deq) -> int:
    write_at(fd, ti.data.tobytes(), at)
    return ti.nbytes


def _chunk_jobs(ti: TensorInfo, plan: TensorPlan, at: int, imatrix: np.ndarray | None):
    row = ti.shape[0]
    n_rows = ti.n_rows
    rows_per_matrix = ti.shape[1] if len(ti.shape) > 1 else 1
    step = max(1, CHUNK_ELEMENTS // row)
    out_row_bytes = plan.type.row_bytes(row)
    r0 = 0
    while r0 < n_rows:
        # a chunk never spans two experts, whose importance matrices differ
        r1 = min(n_rows, r0 + step, (r0 // rows_per_matrix + 1) * rows_per_matrix)
        im = None
        if imatrix is not None:
            expert = r0 // rows_per_matrix
            im = imatrix[expert * row : (expert + 1) * row]
        yield (_quantize_chunk, ti, plan, at + r0 * out_row_bytes, (r0, r1, im))
        r0 = r1


def _quantize_chunk(fd, ti: TensorInfo, plan: TensorPlan, at: int, arg, dequantize) -> int:
    r0, r1, im = arg
    row = ti.shape[0]
    in_row_bytes = ti.row_bytes
    sub = TensorInfo(
        ti.name,
        ti.ggml_type,
        ti.type,
        (row, r1 - r0),
        row * (r1 - r0),
        in_row_bytes * (r1 - r0),
        ti.offset + r0 * in_row_bytes,
        ti._region,
    )
    x = _as_f32(sub, dequantize).reshape(r1 - r0, row)
    try:
        out = quantize_rows(plan.type.name, x, im)
    except QpackError as e:
        raise QpackError(f"tensor {ti.name}: {e}") from None
    write_at(fd, out.tobytes(), at)
    return sub.nbytes


def tensor_work_bytes(src: str | os.PathLike, ftype_name: str) -> int:
    """The total that quantize_file's progress callback counts up to (input tensor bytes)."""
    with open_gguf(src) as gf:
        return sum(t.nbytes for t in gf.tensors.values())
