"""Regenerates tests/data/arch_refs/: for every architecture beyond llama/qwen2/gemma3, tiny
random GGUFs written with gguf-py under llama.cpp's tensor and key names (F32, and Q8_0 made by
llama.cpp's own quantizer), and llama.cpp's log-probabilities for several prompts.
tests/test_archs.py loads the same files with qpack and compares.

Run with a Python that has llama-cpp-python (never a test or runtime dependency):
    /opt/refenv/bin/python tests/reference/make_arch_refs.py
"""

from __future__ import annotations

import ctypes
import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # tests/: tiny_models, gguf_fixtures

import llama_cpp  # noqa: E402
from tiny_models import tiny_model  # noqa: E402

OUT = HERE.parent / "data" / "arch_refs"
TOP = 8  # log-probabilities kept per position: llama.cpp's TOP most likely tokens
N_PROMPTS, PROMPT_LEN = 4, 40
SMALL = {"n_embd": 64, "n_ff": 128, "n_heads": 4, "n_kv_heads": 2, "n_layers": 2}

# name -> (tiny_model arguments, context size both engines run with)
CASES: dict[str, tuple[dict, int]] = {
    "qwen3": ({"arch": "qwen3", **SMALL}, 256),
    # 8 experts of 64 rows, 2 used per token
    "qwen3moe": ({"arch": "qwen3moe", **SMALL, "n_ff": 64, "n_expert": 8, "n_expert_used": 2}, 256),
    # context within the original one: the short rope factors
    "phi3": ({"arch": "phi3", **SMALL, "n_ctx_orig": 4096}, 256),
    # context past the original one: the long rope factors
    "phi3-long": ({"arch": "phi3", **SMALL, "n_ctx_orig": 128, "seed": 1}, 256),
    # 4 layers alternate an 8-position sliding window with global attention
    "gemma2": ({"arch": "gemma2", **SMALL, "n_layers": 4, "window": 8}, 256),
}


def log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    m = x.max(axis=-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(axis=-1, keepdims=True))


def quantize(src: Path, dst: Path, ftype: int) -> None:
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = ftype
    rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params))
    if rc != 0:
        raise SystemExit(f"llama_model_quantize failed on {src}")


def score(path: Path, n_ctx: int, prompts: np.ndarray) -> dict[str, np.ndarray]:
    llm = llama_cpp.Llama(
        model_path=str(path), n_ctx=n_ctx, n_batch=512, n_threads=2, logits_all=True, verbose=False
    )
    ids, lps = [], []
    for prompt in prompts:
        llm.reset()
        llm.eval(prompt.tolist())
        lp = log_softmax(np.array(llm.scores[: len(prompt)], dtype=np.float32))
        top = np.argsort(-lp, axis=1, kind="stable")[:, :TOP]
        ids.append(top)
        lps.append(np.take_along_axis(lp, top, axis=1))
    return {"top_ids": np.array(ids, np.int32), "top_logprobs": np.array(lps, np.float32)}


def main() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    for case, (name, (kwargs, n_ctx)) in enumerate(CASES.items()):
        f32 = tiny_model(OUT / f"{name}-f32.gguf", weight_type="F32", **kwargs)
        q8 = OUT / f"{name}-q8_0.gguf"
        quantize(f32, q8, llama_cpp.LLAMA_FTYPE_MOSTLY_Q8_0)
        rng = np.random.default_rng(1000 + case)
        prompts = rng.integers(3, 269, (N_PROMPTS, PROMPT_LEN)).astype(np.int32)
        for variant, path in (("f32", f32), ("q8_0", q8)):
            out = {"prompts": prompts, "n_ctx": np.array(n_ctx), **score(path, n_ctx, prompts)}
            np.savez_compressed(OUT / f"{name}-{variant}.npz", **out)
            print(f"{name} {variant}: {path.stat().st_size // 1024} KiB", flush=True)


if __name__ == "__main__":
    main()
