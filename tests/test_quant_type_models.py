"""Tiny models in the IQ, ternary and MXFP4 types against llama.cpp.

tests/data/quant_type_models/<TYPE>.gguf: a random 1-layer llama model whose every matrix
(embeddings and output too) llama.cpp quantized to TYPE; <TYPE>.npz: llama.cpp's logits for
its tokens (tests/reference/make_quant_type_refs.py). Both engines quantize activations to 8
bits the same way but sum in different orders, which moves log-probs by a few hundredths here
(the same tiny model in Q8_0, Q4_0 or Q4_K: max 0.024-0.036, mean ~0.005, measured 2026-12-04);
a wrong unpack or scale moves them by the logits' whole spread (~0.8).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from qpack.runtime import cpu
from qpack.runtime.gguf import open_gguf
from qpack.runtime.model import Model

DATA = Path(__file__).parent / "data" / "quant_type_models"
TYPES = ["IQ1_S", "IQ1_M", "IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ3_XXS", "IQ3_S", "TQ1_0", "TQ2_0", "MXFP4"]  # fmt: skip
MAX_DLOGP, MEAN_DLOGP = 0.1, 0.015
NEAR_TIE = 0.1  # logits: where the top-1 differs, llama.cpp's two candidates are this close


def log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    m = x.max(axis=-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(axis=-1, keepdims=True))


@pytest.mark.parametrize("variant", cpu.supported_variants())
@pytest.mark.parametrize("name", TYPES)
def test_logits_match_llama_cpp(name, variant):
    g = open_gguf(str(DATA / f"{name}.gguf"))
    matrices = [t for t in g.tensors.values() if len(t.shape) == 2]
    assert matrices and all(t.type.name == name for t in matrices)
    ref = np.load(DATA / f"{name}.npz")
    model = Model(g, kernels=cpu._import(variant), n_ctx=64, threads=2)
    ours = model.logits(ref["tokens"].tolist(), all_rows=True)
    theirs = ref["logits"]
    d = np.abs(log_softmax(ours) - log_softmax(theirs))
    assert d.max() <= MAX_DLOGP and d.mean() <= MEAN_DLOGP, (d.max(), d.mean())
    rows = np.arange(len(theirs))
    ours_top, their_top = ours.argmax(1), theirs.argmax(1)
    gap = theirs[rows, their_top] - theirs[rows, ours_top]
    assert (gap <= NEAR_TIE).all(), gap.max()
