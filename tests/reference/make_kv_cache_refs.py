"""Regenerates tests/data/kv_cache_refs.json: llama.cpp's perplexity of the real models with
an f16 and a q8_0 KV cache (type_k = type_v = q8_0, flash attention on, as llama.cpp requires
for a quantized V), the peer figures beside tests/test_kv_cache.py's perplexity check.

Run with a Python that has llama-cpp-python (never a test or runtime dependency):
    /opt/refenv/bin/python tests/reference/make_kv_cache_refs.py SMOLLM2.gguf GEMMA3.gguf
The settings (GPL-3 text, its first TOKENS tokens, windows of N_CTX) are the test's.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from llama_cpp import Llama
from make_model_refs import perplexity

HERE = Path(__file__).resolve().parent
OUT = HERE.parent / "data" / "kv_cache_refs.json"
TEXT = HERE.parent / "data" / "GPL-3.txt"
TOKENS, N_CTX = 4096, 512
GGML_TYPES = {"f16": 1, "q8_0": 8}


def ppl(path: str, cache: str) -> dict:
    llm = Llama(
        model_path=path, n_ctx=N_CTX, n_batch=N_CTX, n_threads=2, logits_all=True,
        verbose=False, seed=0, type_k=GGML_TYPES[cache], type_v=GGML_TYPES[cache],
        flash_attn=True,
    )  # fmt: skip
    add_bos = llm.metadata.get("tokenizer.ggml.add_bos_token", "false") == "true"
    toks = llm.tokenize(TEXT.read_text().encode(), add_bos=add_bos, special=False)[:TOKENS]
    value, err, count = perplexity(llm, toks, N_CTX, llm.token_bos() if add_bos else None)
    print(f"{Path(path).name} {cache}: perplexity {value:.4f} ± {err:.4f} ({count} tokens)")
    return {"ppl": value, "error": err, "tokens": count}


if __name__ == "__main__":
    out = {}
    for name, path in zip(("smollm2", "gemma3"), sys.argv[1:3], strict=True):
        out[name] = {cache: ppl(path, cache) for cache in GGML_TYPES}
    OUT.write_text(json.dumps(out, indent=1) + "\n")
