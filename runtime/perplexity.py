"""Perplexity exactly as llama-perplexity computes it (tools/perplexity, default mode).

The whole text is tokenized once *with* the BOS the model adds, and cut into non-overlapping
windows of n_ctx tokens from that stream (so the BOS is the stream's first token, and every
later window starts one token later than it would without it). The first token of each window
is then replaced by BOS when the model adds one, and each window is scored on its second half,
so every scored token sees at least n_ctx/2 tokens of context. At least 2 x n_ctx tokens are
needed, as there.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from .errors import QpackError
from .model import Model
from .tokenizer import Tokenizer


@dataclass
class Estimate:
    windows: int
    tokens: int
    ppl: float
    error: float  # standard error of the perplexity (delta method on the mean NLL)


def scoring_stream(tok: Tokenizer, text: str) -> tuple[list[int], int | None]:
    """The token stream windows are cut from, and the BOS that starts each window (None when
    the model adds none): llama-perplexity's common_tokenize(text, add_special=true)."""
    tokens = tok.encode(text, add_bos=tok.add_bos, add_eos=False)
    return tokens, tok.bos_id if tok.add_bos else None


def perplexity(model: Model, tokens: list[int], n_ctx: int, bos: int | None) -> Iterator[Estimate]:
    """Yields the running estimate after each window; the last one is the result. `tokens`
    and `bos` come from scoring_stream."""
    if n_ctx < 4 or n_ctx > model.n_ctx:
        raise QpackError(
            f"perplexity window {n_ctx} must be between 4 and the context size {model.n_ctx}"
        )
    if len(tokens) < 2 * n_ctx:
        raise QpackError(
            f"the text has {len(tokens)} tokens; a window of {n_ctx} needs at least {2 * n_ctx}"
        )
    n_windows = len(tokens) // n_ctx
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
