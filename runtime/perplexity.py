"""Perplexity as llama-perplexity computes it: the text cut into non-overlapping windows of
n_ctx tokens (the first replaced by BOS when the model adds one), each scored on its second
half, so every scored token sees at least n_ctx/2 tokens of context."""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from .errors import QpackError
from .model import Model


@dataclass
class Estimate:
    windows: int
    tokens: int
    ppl: float
    error: float  # standard error of the perplexity (delta method on the mean NLL)


def perplexity(model: Model, tokens: list[int], n_ctx: int, bos: int | None) -> Iterator[Estimate]:
    """Yields the running estimate after each window; the last one is the result."""
    if n_ctx < 4 or n_ctx > model.n_ctx:
        raise QpackError(
            f"perplexity window {n_ctx} must be between 4 and the context size {model.n_ctx}"
        )
    n_windows = len(tokens) // n_ctx
    if n_windows == 0:
        raise QpackError(f"the text has {len(tokens)} tokens, fewer than one window of {n_ctx}")
    first = n_ctx // 2
    nll = nll2 = 0.0
    count = 0
    for w in range(n_windows):
        window = list(tokens[w * n_ctx : (w + 1) * n_ctx])
        if bos is not None:
            window[0] = bos
        logits = model.logits(window, all_rows=True)[first : n_ctx - 1].astype(np.float64)
        targets = np.asarray(window[first + 1 : n_ctx])
        m = logits.max(axis=1)
        logz = m + np.log(np.exp(logits - m[:, None]).sum(axis=1))
        v = logz - logits[np.arange(len(targets)), targets]
        nll += float(v.sum())
        nll2 += float((v * v).sum())
        count += len(v)
        mean = nll / count
        var = max(nll2 / count - mean * mean, 0.0) / max(count - 1, 1)
        ppl = math.exp(mean)
        yield Estimate(w + 1, count, ppl, ppl * math.sqrt(var))
