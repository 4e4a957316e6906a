"""Regenerates tests/data/model_refs/*.npz: llama.cpp's logits, greedy continuations and
perplexity for the real models, the independent reference the engine tests compare with.

Run with a Python that has llama-cpp-python (never a test or runtime dependency):
    python -m venv /opt/refenv && /opt/refenv/bin/pip install numpy llama-cpp-python
    /opt/refenv/bin/python tests/reference/make_model_refs.py SMOLLM2.gguf GEMMA3.gguf
    /opt/refenv/bin/python tests/reference/make_model_refs.py --perplexity-only SMOLLM2.gguf GEMMA3.gguf
The test file tests/test_model.py names the texts and settings used here (keep them in sync).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
from llama_cpp import Llama

HERE = Path(__file__).resolve().parent
OUT = HERE.parent / "data" / "model_refs"
TEXTS = json.loads((HERE.parent / "data" / "model_texts.json").read_text())
TOP = 32  # logits kept per position: the top TOP of llama.cpp's, by id


def log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    m = x.max(axis=-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(axis=-1, keepdims=True))


def perplexity(
    llm: Llama, tokens: list[int], n_ctx: int, bos: int | None
) -> tuple[float, float, int]:
    """llama-perplexity's scheme: the text tokenized WITH the BOS the model adds, cut into
    non-overlapping windows of n_ctx tokens (the first of each replaced by BOS when the model
    adds one), each scored on its second half."""
    nll = nll2 = 0.0
    count = 0
    first = n_ctx // 2
    for start in range(0, len(tokens) - n_ctx + 1, n_ctx):
        window = list(tokens[start : start + n_ctx])
        if bos is not None:
            window[0] = bos
        llm.reset()
        llm.eval(window)
        lp = log_softmax(np.array(llm.scores[:n_ctx], dtype=np.float32))
        for j in range(first, n_ctx - 1):
            v = -lp[j, window[j + 1]]
            nll += v
            nll2 += v * v
            count += 1
    mean = nll / count
    err = np.sqrt(max(nll2 / count - mean * mean, 0.0) / max(count - 1, 1))
    return float(np.exp(mean)), float(np.exp(mean) * err), count


def make(name: str, path: str) -> None:
    llm = Llama(
        model_path=path, n_ctx=512, n_batch=512, n_threads=2, logits_all=True, verbose=False, seed=0
    )
    add_bos = llm.metadata.get("tokenizer.ggml.add_bos_token", "false") == "true"
    out: dict[str, np.ndarray] = {}

    toks = llm.tokenize(TEXTS["logits_text"].encode(), add_bos=add_bos, special=False)[:128]
    assert len(toks) == 128, len(toks)
    llm.reset()
    llm.eval(toks)
    logits = np.array(llm.scores[:128], dtype=np.float32)
    top = np.argsort(-logits, axis=1)[:, :TOP]
    out["logit_tokens"] = np.array(toks, np.int32)
    out["top_ids"] = top.astype(np.int32)
    out["top_logits"] = np.take_along_axis(logits, top, axis=1)
    out["argmax"] = logits.argmax(axis=1).astype(np.int32)
    out["full_logits_rows"] = np.array([0, 31, 64, 127], np.int32)
    out["full_logits"] = logits[[0, 31, 64, 127]].astype(np.float32)

    for k, prompt in enumerate(TEXTS["greedy_prompts"]):
        ptoks = llm.tokenize(prompt.encode(), add_bos=add_bos, special=False)
        llm.reset()
        gen = []
        for t in llm.generate(ptoks, temp=0.0, top_k=1, top_p=1.0, min_p=0.0, repeat_penalty=1.0):
            gen.append(t)
            if len(gen) == 32 or t == llm.token_eos():
                break
        out[f"greedy_prompt_{k}"] = np.array(ptoks, np.int32)
        out[f"greedy_{k}"] = np.array(gen, np.int32)

    out["perplexity"] = perplexity_ref(llm, name, add_bos)
    OUT.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(OUT / f"{name}.npz", **out)


def perplexity_ref(llm: Llama, name: str, add_bos: bool) -> np.ndarray:
    text = Path(TEXTS["perplexity_file"]).read_text()
    ptoks = llm.tokenize(text.encode(), add_bos=add_bos, special=False)
    ppl, err, count = perplexity(llm, ptoks, 128, llm.token_bos() if add_bos else None)
    print(f"{name}: perplexity {ppl:.4f} ± {err:.4f} over {count} tokens", flush=True)
    return np.array([ppl, err, count], np.float64)


def update_perplexity(name: str, path: str) -> None:
    """Only the perplexity entry of an existing reference file (the rest left as it is)."""
    llm = Llama(
        model_path=path, n_ctx=512, n_batch=512, n_threads=2, logits_all=True, verbose=False, seed=0
    )
    add_bos = llm.metadata.get("tokenizer.ggml.add_bos_token", "false") == "true"
    with np.load(OUT / f"{name}.npz") as f:
        out = dict(f)
    out["perplexity"] = perplexity_ref(llm, name, add_bos)
    np.savez_compressed(OUT / f"{name}.npz", **out)


if __name__ == "__main__":
    # --perplexity-only SMOLLM2.gguf GEMMA3.gguf: refresh just that entry
    step = update_perplexity if sys.argv[1] == "--perplexity-only" else make
    paths = sys.argv[2:] if step is update_perplexity else sys.argv[1:]
    step("smollm2", paths[0])
    step("gemma3", paths[1])
