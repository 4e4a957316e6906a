"""Regenerates tests/data/kv_cache_refs.json: llama.cpp's perplexity of the real models with
an f16 and a q8_0 KV cache (type_k = type_v = q8_0, flash attention on, as llama.cpp requires
for a quantized V), the peer figures beside tests/test_kv_cache.py's perplexity check.

Run with a Python that has llama-cpp-python (never a test or runtime dependency):
    /opt/refenv/bin/python tests/reference/make_kv_cache_refs.py SMOLLM2.gguf GEMMA3.gguf
The settings (every whole window of N_CTX tokens of each of TEXTS, pooled) are the test's:
over one text's first 4,096 tokens (2,040 scored) the change is noise-dominated, its paired
standard error 0.25-0.35 %.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import numpy as np
from llama_cpp import Llama
from make_model_refs import log_softmax

HERE = Path(__file__).resolve().parent
OUT = HERE.parent / "data" / "kv_cache_refs.json"
TEXTS = ("GPL-3.txt", "PyInstaller-COPYING.txt")
N_CTX = 512
GGML_TYPES = {"f16": 1, "q8_0": 8}


def window_nlls(llm: Llama, toks: list[int], bos: int | None) -> list[float]:
    """llama-perplexity's scheme: whole windows of N_CTX, the first token replaced by BOS when
    the model adds one, each scored on its second half."""
    out = []
    for start in range(0, len(toks) - N_CTX + 1, N_CTX):
        window = list(toks[start : start + N_CTX])
        if bos is not None:
            window[0] = bos
        llm.reset()
        llm.eval(window)
        lp = log_softmax(np.array(llm.scores[:N_CTX], dtype=np.float32))
        out += [float(-lp[j, window[j + 1]]) for j in range(N_CTX // 2, N_CTX - 1)]
    return out


def ppl(path: str, cache: str) -> dict:
    llm = Llama(
        model_path=path, n_ctx=N_CTX, n_batch=N_CTX, n_threads=2, logits_all=True,
        verbose=False, seed=0, type_k=GGML_TYPES[cache], type_v=GGML_TYPES[cache],
        flash_attn=True,
    )  # fmt: skip
    add_bos = llm.metadata.get("tokenizer.ggml.add_bos_token", "false") == "true"
    bos = llm.token_bos() if add_bos else None
    nlls = []
    for text in TEXTS:
        toks = llm.tokenize((HERE.parent / "data" / text).read_text().encode(), add_bos=add_bos)
        nlls += window_nlls(llm, toks, bos)
    v = np.array(nlls)
    value = math.exp(v.mean())
    err = value * v.std(ddof=1) / math.sqrt(len(v))
    print(f"{Path(path).name} {cache}: perplexity {value:.4f} ± {err:.4f} ({len(v)} tokens)")
    return {"ppl": value, "error": err, "tokens": len(v)}


if __name__ == "__main__":
    out = {}
    for name, path in zip(("smollm2", "gemma3"), sys.argv[1:3], strict=True):
        out[name] = {cache: ppl(path, cache) for cache in GGML_TYPES}
    OUT.write_text(json.dumps(out, indent=1) + "\n")
