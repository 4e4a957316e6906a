"""The facts behind `qpack inspect`: what a model is, what it is made of, and the RAM it needs.

Everything here works on an already-opened GGUFFile, so the same code describes a .gguf file
and the model inside a built executable (`open_model` picks which). The facts are a plain
JSON-able dict; `format_facts` turns them into the text report.

For a model qpack runs, the hyperparameters and the memory figures come from
`facts.read_model_facts`, the object the runtime loads by and the builder validates with. A
file it cannot run is still described from what its metadata declares, with the reason it
cannot run and no memory estimate.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from .errors import UnsupportedModel
from .facts import DEFAULT_BATCH, DEFAULT_CTX, ModelFacts, read_model_facts
from .gguf import GGUFFile, StringArray, open_gguf
from .quants import SUPPORTED_WEIGHT_TYPES
from .terminal import printable

ARRAY_PREVIEW = 5  # items shown of a long metadata array
STRING_PREVIEW = 200  # characters shown of a long metadata string


def open_model(path: str | os.PathLike) -> tuple[GGUFFile, str | None]:
    """Open a GGUF file, or the model embedded in an executable built by `qpack build`.

    Returns the file and, for an executable, a note saying where the model sits in it.
    """
    path = os.fspath(path)
    try:
        with open(path, "rb") as fh:
            magic = fh.read(4)
    except OSError:
        magic = b""  # open_gguf reports the path's problem
    if magic != b"GGUF" and os.path.isfile(path):
        from . import embedded

        member = embedded.locate_model(path)
        if member is not None:
            note = (
                f"{embedded.MODEL_MEMBER} embedded at byte {member.offset} of the executable"
                if member.split_from is None
                else f"the model beside the executable ({os.path.basename(member.path)}, --split)"
            )
            return open_gguf(member.path, member.offset, member.length), note
    return open_gguf(path), None


# --- what the metadata declares, for files qpack cannot run (keys may be missing) -------------


def _int(md: dict[str, Any], key: str) -> int | None:
    v = md.get(key)
    if isinstance(v, (int, np.integer)) and not isinstance(v, bool):
        return int(v)
    return None


def _per_layer(md: dict[str, Any], key: str) -> int | list[int] | None:
    """An int, or a per-layer array of ints (some architectures vary head counts by layer)."""
    v = md.get(key)
    if isinstance(v, np.ndarray) and v.dtype.kind in "iu" and v.size:
        values = [int(x) for x in v]
        return values[0] if len(set(values)) == 1 else values
    return _int(md, key)


def _str(md: dict[str, Any], key: str) -> str | None:
    v = md.get(key)
    return v if isinstance(v, str) else None


def _first(value: int | list[int] | None) -> int | None:
    if isinstance(value, list):
        return max(value)
    return value


# --- the facts ---------------------------------------------------------------------------------


def quant_mix(gf: GGUFFile) -> list[dict[str, Any]]:
    """Per ggml type: how many tensors, elements and bytes, and the bits per weight."""
    mix: dict[str, dict[str, Any]] = {}
    for ti in gf.tensors.values():
        m = mix.setdefault(
            ti.type.name, {"type": ti.type.name, "tensors": 0, "elements": 0, "bytes": 0}
        )
        m["tensors"] += 1
        m["elements"] += ti.n_elements
        m["bytes"] += ti.nbytes
    rows = sorted(mix.values(), key=lambda m: -m["bytes"])
    for m in rows:
        m["bits_per_weight"] = round(8 * m["bytes"] / m["elements"], 4)
        m["supported"] = m["type"] in SUPPORTED_WEIGHT_TYPES
    return rows


def declared_hyperparameters(gf: GGUFFile) -> dict[str, Any]:
    """What the metadata says, unchecked: only to describe a file qpack cannot run."""
    md = gf.metadata
    arch = _str(md, "general.architecture") or ""
    p = arch + "."
    n_embd = _int(md, p + "embedding_length")
    n_heads = _per_layer(md, p + "attention.head_count")
    n_kv_heads = _per_layer(md, p + "attention.head_count_kv")
    if n_kv_heads is None:
        n_kv_heads = n_heads  # llama.cpp's default: no grouped-query attention
    heads = _first(n_heads)
    default_head_dim = n_embd // heads if n_embd and heads and heads > 0 else None
    key_length = _int(md, p + "attention.key_length") or default_head_dim
    return {
        "n_layers": _int(md, p + "block_count"),
        "n_heads": n_heads,
        "n_kv_heads": n_kv_heads,
        "n_embd": n_embd,
        "n_ff": _per_layer(md, p + "feed_forward_length"),
        "key_length": key_length,
        "value_length": _int(md, p + "attention.value_length") or key_length,
        "context_length": _int(md, p + "context_length"),
    }


def checked_hyperparameters(facts: ModelFacts) -> dict[str, Any]:
    hp = facts.hp
    return {
        "n_layers": hp.n_layer,
        "n_heads": hp.n_head,
        "n_kv_heads": hp.n_head_kv,
        "n_embd": hp.n_embd,
        "n_ff": hp.n_ff,
        "key_length": hp.head_dim,
        "value_length": hp.head_dim_v,
        "context_length": hp.n_ctx_train,
    }


def tokenizer_facts(gf: GGUFFile) -> dict[str, Any]:
    md = gf.metadata
    tokens = md.get("tokenizer.ggml.tokens")
    merges = md.get("tokenizer.ggml.merges")
    return {
        "vocab_size": len(tokens) if isinstance(tokens, StringArray) else None,
        "tokenizer": _str(md, "tokenizer.ggml.model"),
        "tokenizer_pre": _str(md, "tokenizer.ggml.pre"),
        "n_merges": len(merges) if isinstance(merges, StringArray) else None,
        "has_chat_template": isinstance(md.get("tokenizer.chat_template"), str),
    }


def ram_estimate(facts: ModelFacts | None, ctx: int) -> dict[str, Any]:
    """Weights (mapped), the f16 KV cache and the scratch the engine allocates at this context,
    for prompt batches of up to DEFAULT_BATCH tokens: model.pxi's formulas (ModelFacts)."""
    if facts is None:
        return {"ctx": ctx, "weights": None, "kv_cache": None, "scratch": None, "total": None}
    from .model import physical_cores

    kv = facts.kv_bytes(ctx)
    batch = min(DEFAULT_BATCH, ctx)  # as Model sizes it
    scratch = facts.buffer_bytes(batch) + facts.runtime_bytes_estimate(batch, physical_cores(), ctx)
    return {
        "ctx": ctx,
        "weights": facts.weight_bytes,
        "kv_cache": kv,
        "scratch": scratch,
        "total": facts.weight_bytes + kv + scratch,
    }


def model_facts(gf: GGUFFile, ctx: int | None = None) -> dict[str, Any]:
    """Everything `qpack inspect` reports, as a JSON-able dict."""
    try:
        facts: ModelFacts | None = read_model_facts(gf)
        problem = None
    except UnsupportedModel as e:
        facts, problem = None, str(e)
    hp = checked_hyperparameters(facts) if facts else declared_hyperparameters(gf)
    mix = quant_mix(gf)
    n_params = sum(ti.n_elements for ti in gf.tensors.values())
    weight_bytes = sum(ti.nbytes for ti in gf.tensors.values())
    if ctx is None:
        ctx = facts.default_ctx if facts else DEFAULT_CTX
    return {
        "file": gf.path,
        "file_size": gf.file_size,
        "gguf_version": gf.version,
        "alignment": gf.alignment,
        "n_metadata": len(gf.metadata),
        "n_tensors": len(gf.tensors),
        "architecture": _str(gf.metadata, "general.architecture"),
        "name": _str(gf.metadata, "general.name"),
        "parameters": n_params,
        **hp,
        **tokenizer_facts(gf),
        "runs": problem is None,
        "problem": problem,
        "quant_mix": mix,
        "weight_bytes": weight_bytes,
        "bits_per_weight": round(8 * weight_bytes / n_params, 4) if n_params else None,
        "unsupported_types": [m["type"] for m in mix if not m["supported"]],
        "ram": ram_estimate(facts, ctx),
    }


def tensor_table(gf: GGUFFile) -> list[dict[str, Any]]:
    return [
        {
            "name": t.name,
            "type": t.type.name,
            "shape": list(t.shape),
            "bytes": t.nbytes,
            "offset": t.offset,
        }
        for t in gf.tensors.values()
    ]


def _plain(x: Any) -> Any:
    if isinstance(x, float) and not np.isfinite(x):
        return str(x)  # JSON has no inf/nan
    return x


def summarize_value(value: Any) -> Any:
    """A metadata value made JSON-able, long arrays and strings shortened."""
    if isinstance(value, (StringArray, np.ndarray)):
        head = value[:ARRAY_PREVIEW]
        items = [_plain(x) for x in (head.tolist() if isinstance(head, np.ndarray) else head)]
        if len(value) <= ARRAY_PREVIEW:
            return items
        return {"count": len(value), "first": items}
    if isinstance(value, str) and len(value) > STRING_PREVIEW:
        return {"length": len(value), "start": value[:STRING_PREVIEW]}
    return _plain(value)


def metadata_listing(gf: GGUFFile) -> list[dict[str, Any]]:
    return [
        {"key": f.key, "type": f.type_name, "value": summarize_value(f.value)}
        for f in gf.fields.values()
    ]


# --- the text report ---------------------------------------------------------------------------


def human_bytes(n: int | None) -> str:
    if n is None:
        return "?"
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n} B"


def human_count(n: int) -> str:
    for unit, size in (("B", 10**9), ("M", 10**6), ("K", 10**3)):
        if n >= size:
            return f"{n / size:.1f}{unit}"
    return str(n)


def _show(value: Any) -> str:
    if value is None:
        return "?"
    if isinstance(value, list):
        return f"{min(value)}-{max(value)} (per layer)"
    return str(value)


def format_facts(f: dict[str, Any], note: str | None = None) -> str:
    lines = [f"{f['file']}  (GGUF v{f['gguf_version']}, {human_bytes(f['file_size'])})"]
    if note:
        lines.append(f"  {note}")
    heads = f"{_show(f['n_heads'])} (kv {_show(f['n_kv_heads'])}, head dim {_show(f['key_length'])}"
    if f["value_length"] != f["key_length"]:
        heads += f"/{_show(f['value_length'])}"
    vocab = _show(f["vocab_size"])
    if f["tokenizer"]:
        vocab += (
            f" ({f['tokenizer']}"
            + (f", pre {f['tokenizer_pre']}" if f["tokenizer_pre"] else "")
            + ")"
        )
    rows = [
        ("architecture", _show(f["architecture"])),
        ("name", _show(f["name"])),
        ("parameters", f"{human_count(f['parameters'])} ({f['parameters']:,})"),
        ("layers", _show(f["n_layers"])),
        ("heads", heads + ")"),
        ("embedding", _show(f["n_embd"])),
        ("feed-forward", _show(f["n_ff"])),
        ("context", _show(f["context_length"])),
        ("vocabulary", vocab),
        ("tensors", f"{f['n_tensors']} ({human_bytes(f['weight_bytes'])}, "
                    f"{f['bits_per_weight'] or 0:.2f} bits per weight on average)"),
    ]  # fmt: skip
    if f["problem"]:
        rows.append(("runs", f"no: {f['problem']}"))
    lines += [f"  {k:<14}{v}" for k, v in rows]
    lines.append(f"  {'quant types':<14}{'type':<9}{'tensors':>8}{'bytes':>12}{'bits/weight':>13}")
    for m in f["quant_mix"]:
        flag = "" if m["supported"] else "  (not supported by qpack)"
        lines.append(
            f"  {'':<14}{m['type']:<9}{m['tensors']:>8}{human_bytes(m['bytes']):>12}"
            f"{m['bits_per_weight']:>13.2f}{flag}"
        )
    ram = f["ram"]
    lines.append(
        f"  {'RAM':<14}{human_bytes(ram['total'])} at ctx {ram['ctx']}: weights "
        f"{human_bytes(ram['weights'])} + KV cache (f16) {human_bytes(ram['kv_cache'])} + "
        f"scratch {human_bytes(ram['scratch'])} (estimate)"
    )
    return printable("\n".join(lines), keep="\n")  # names and values come from the file


def format_tensors(table: list[dict[str, Any]]) -> str:
    width = max((len(t["name"]) for t in table), default=4)
    lines = [f"{'name':<{width}}  {'type':<8}{'shape':<22}{'bytes':>12}{'offset':>14}"]
    for t in table:
        shape = "×".join(str(d) for d in t["shape"])
        lines.append(
            f"{t['name']:<{width}}  {t['type']:<8}{shape:<22}{t['bytes']:>12}{t['offset']:>14}"
        )
    return printable("\n".join(lines), keep="\n")  # names and values come from the file


def format_metadata(listing: list[dict[str, Any]]) -> str:
    lines = []
    for item in listing:
        v = item["value"]
        if isinstance(v, dict) and "count" in v:
            shown = f"[{', '.join(repr(x) for x in v['first'])}, ...] ({v['count']} items)"
        elif isinstance(v, dict) and "length" in v:
            shown = f"{v['start']!r}... ({v['length']} characters)"
        else:
            shown = repr(v)
        lines.append(f"{item['key']} ({item['type']}) = {shown}")
    return printable("\n".join(lines), keep="\n")  # names and values come from the file
