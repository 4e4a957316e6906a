"""How far a quantized model's next-token distributions are from its base model's, on a text:
llama-perplexity's --kl-divergence statistics (KL divergence, change in the probability of the
right token, agreement of the top token), over the same windows perplexity scores.

Both models see the same windows of n_ctx tokens (the first replaced by BOS when the model adds
one) and are compared on each window's second half.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from .errors import QpackError
from .model import Model

KLD_PERCENTILES = (99.9, 99.0, 95.0, 90.0, 50.0, 10.0, 5.0, 1.0, 0.1)
DP_PERCENTILES = (99.9, 99.0, 95.0, 90.0, 75.0, 50.0, 25.0, 10.0, 5.0, 1.0, 0.1)


@dataclass
class KLDivergence:
    """Per scored token: KL(base || model), the NLLs of both, Δp and top-token agreement."""

    kld: np.ndarray
    nll: np.ndarray
    nll_base: np.ndarray
    delta_p: np.ndarray
    same_top: np.ndarray

    @property
    def n(self) -> int:
        return int(self.kld.size)

    def summary(self) -> dict[str, float]:
        n = max(self.n, 2)
        s: dict[str, float] = {}
        s["ppl"] = math.exp(self.nll.mean())
        s["ppl_base"] = math.exp(self.nll_base.mean())
        s["ln_ppl_ratio"] = float((self.nll - self.nll_base).mean())
        s["ppl_ratio"] = math.exp(s["ln_ppl_ratio"])
        s["cor_ln_ppl"] = float(np.corrcoef(self.nll, self.nll_base)[0, 1]) if self.n > 1 else 1.0
        s["kld_mean"] = float(self.kld.mean())
        s["kld_err"] = float(self.kld.std() / math.sqrt(n - 1))
        s["kld_max"] = float(self.kld.max())
        s["kld_min"] = float(self.kld.min())
        for p in KLD_PERCENTILES:
            s[f"kld_{p:g}"] = float(np.percentile(self.kld, p))
        dp = self.delta_p
        s["dp_mean"] = float(dp.mean())
        s["dp_err"] = float(dp.std() / math.sqrt(n - 1))
        s["dp_max"], s["dp_min"] = float(dp.max()), float(dp.min())
        for p in DP_PERCENTILES:
            s[f"dp_{p:g}"] = float(np.percentile(dp, p))
        s["dp_rms"] = float(math.sqrt((dp * dp).mean()))
        top = self.same_top.mean()
        s["same_top"] = float(top)
        s["same_top_err"] = float(math.sqrt(top * (1 - top) / (n - 1)))
        return s


def _log_softmax(logits: np.ndarray) -> np.ndarray:
    x = logits.astype(np.float64)
    m = x.max(axis=1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(axis=1, keepdims=True))


def kl_divergence(
    model: Model, base: Model, tokens: list[int], n_ctx: int, bos: int | None
) -> Iterator[KLDivergence]:
    """Yields the statistics so far after each window; the last one covers the whole text."""
    if n_ctx < 4 or n_ctx > min(model.n_ctx, base.n_ctx):
        raise QpackError(f"window {n_ctx} must be between 4 and both models' context sizes")
    if model.n_vocab != base.n_vocab:
        raise QpackError(
            f"the models have different vocabularies ({model.n_vocab} and {base.n_vocab} tokens)"
        )
    n_windows = len(tokens) // n_ctx
    if n_windows == 0:
        raise QpackError(f"the text has {len(tokens)} tokens, fewer than one window of {n_ctx}")
    first = n_ctx // 2
    parts: dict[str, list[np.ndarray]] = {k: [] for k in KLDivergence.__dataclass_fields__}
    for w in range(n_windows):
        window = list(tokens[w * n_ctx : (w + 1) * n_ctx])
        if bos is not None:
            window[0] = bos
        targets = np.asarray(window[first + 1 : n_ctx])
        rows = np.arange(len(targets))
        lq = _log_softmax(model.logits(window, all_rows=True)[first : n_ctx - 1])
        lb = _log_softmax(base.logits(window, all_rows=True)[first : n_ctx - 1])
        pb = np.exp(lb)
        parts["kld"].append((pb * (lb - lq)).sum(axis=1))
        parts["nll"].append(-lq[rows, targets])
        parts["nll_base"].append(-lb[rows, targets])
        parts["delta_p"].append(np.exp(lq[rows, targets]) - pb[rows, targets])
        parts["same_top"].append(lq.argmax(axis=1) == lb.argmax(axis=1))
        yield KLDivergence(**{k: np.concatenate(v) for k, v in parts.items()})


def format_summary(s: dict[str, float]) -> str:
    """The report llama-perplexity prints for --kl-divergence."""
    lines = [
        "====== Perplexity statistics ======",
        f"Mean PPL(Q)                   : {s['ppl']:10.6f}",
        f"Mean PPL(base)                : {s['ppl_base']:10.6f}",
        f"Cor(ln(PPL(Q)), ln(PPL(base))): {100 * s['cor_ln_ppl']:6.2f}%",
        f"Mean ln(PPL(Q)/PPL(base))     : {s['ln_ppl_ratio']:10.6f}",
        f"Mean PPL(Q)/PPL(base)         : {s['ppl_ratio']:10.6f}",
        f"Mean PPL(Q)-PPL(base)         : {s['ppl'] - s['ppl_base']:10.6f}",
        "",
        "====== KL divergence statistics ======",
        f"Mean    KLD: {s['kld_mean']:10.6f} ± {s['kld_err']:8.6f}",
        f"Maximum KLD: {s['kld_max']:10.6f}",
    ]
    for p in KLD_PERCENTILES:
        label = "Median " if p == 50.0 else f"{p:4.1f}%  "
        lines.append(f"{label} KLD: {s[f'kld_{p:g}']:10.6f}")
    lines += [
        f"Minimum KLD: {s['kld_min']:10.6f}",
        "",
        "====== Token probability statistics ======",
    ]
    lines.append(f"Mean    Δp: {100 * s['dp_mean']:7.3f} ± {100 * s['dp_err']:5.3f} %")
    lines.append(f"Maximum Δp: {100 * s['dp_max']:7.3f}%")
    for p in DP_PERCENTILES:
        label = "Median " if p == 50.0 else f"{p:4.1f}%  "
        lines.append(f"{label} Δp: {100 * s[f'dp_{p:g}']:7.3f}%")
    lines += [
        f"Minimum Δp: {100 * s['dp_min']:7.3f}%",
        f"RMS Δp    : {100 * s['dp_rms']:7.3f} %",
        f"Same top p: {100 * s['same_top']:7.3f} ± {100 * s['same_top_err']:5.3f} %",
    ]
    return "\n".join(lines)
