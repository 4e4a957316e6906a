"""Regenerates tests/data/quant_type_models/: per weight type, a tiny random llama model whose
every matrix (embeddings and output included) is in that type, quantized by llama.cpp, and
llama.cpp's logits for a fixed token sequence (tests/test_quant_type_models.py compares).

The quantizer is llama.cpp's own ggml_quantize_chunk (from llama-cpp-python's libggml-base),
the routine llama_model_quantize runs per tensor: llama_model_quantize takes its importance
matrix only as a C++ std::unordered_map pointer, which ctypes cannot build, and refuses
IQ1_S/IQ1_M/IQ2_* without one. The importance matrix here is all ones per column (uniform
importance, the simplest one llama.cpp accepts), passed for every IQ type.

Run with a Python that has llama-cpp-python (never a test or runtime dependency):
    /opt/refenv/bin/python tests/reference/make_quant_type_refs.py
"""

from __future__ import annotations

import ctypes
import json
import sys
from pathlib import Path

import llama_cpp
import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
from llama_cpp import Llama

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
from tiny_models import tiny_model  # noqa: E402

OUT = HERE.parent / "data" / "quant_type_models"
TYPES = ["IQ1_S", "IQ1_M", "IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ3_XXS", "IQ3_S", "TQ1_0", "TQ2_0", "MXFP4"]  # fmt: skip
N_TOKENS = 24
SEED = 5

_ggml = ctypes.CDLL(str(Path(llama_cpp.__file__).parent / "lib" / "libggml-base.so"))
_ggml.ggml_quantize_chunk.restype = ctypes.c_size_t
_ggml.ggml_quantize_chunk.argtypes = [
    ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64,
    ctypes.c_int64, ctypes.c_void_p,
]  # fmt: skip


def llama_cpp_quantize(matrix: np.ndarray, type_name: str) -> np.ndarray:
    """matrix (rows, cols) f32 -> raw blocks (rows, row_bytes), by llama.cpp."""
    qtype = GGMLQuantizationType[type_name]
    block_elems, block_bytes = GGML_QUANT_SIZES[qtype]
    rows, cols = matrix.shape
    src = np.ascontiguousarray(matrix, dtype=np.float32)
    dst = np.zeros((rows, cols // block_elems * block_bytes), np.uint8)
    imatrix = np.ones(cols, np.float32)
    written = _ggml.ggml_quantize_chunk(
        int(qtype), src.ctypes.data, dst.ctypes.data, 0, rows, cols,
        imatrix.ctypes.data if type_name.startswith("IQ") else None,
    )  # fmt: skip
    assert written == dst.size, (type_name, written, dst.size)
    return dst


def main() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    tokens = np.random.default_rng(SEED).integers(3, 269, N_TOKENS).tolist()
    for name in TYPES:
        path = OUT / f"{name}.gguf"
        tiny_model(path, "llama", name, n_layers=1, n_embd=256, n_ff=256, seed=SEED,
                   quantize=llama_cpp_quantize)  # fmt: skip
        llm = Llama(str(path), n_ctx=64, n_batch=64, n_threads=2, logits_all=True, verbose=False)
        llm.eval(tokens)
        logits = np.array(llm.scores[:N_TOKENS], dtype=np.float32)
        np.savez_compressed(OUT / f"{name}.npz", tokens=np.array(tokens), logits=logits)
        print(name, path.stat().st_size, "bytes; top-1", logits.argmax(1)[:8].tolist())
        del llm
    (OUT / "README.md").write_text(
        "Written by tests/reference/make_quant_type_refs.py (llama-cpp-python "
        f"{llama_cpp.__version__}): a tiny llama model per type, every matrix quantized by "
        "llama.cpp's ggml_quantize_chunk (IQ types with an all-ones importance matrix), and "
        "llama.cpp's logits for `tokens` (one batch), in <TYPE>.npz.\n"
    )
    print(json.dumps({"tokens": tokens}))


if __name__ == "__main__":
    main()
