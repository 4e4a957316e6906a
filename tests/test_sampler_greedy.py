"""The sampler's greedy fast path (no logprob asked: argmax without the log-sum-exp over the
vocabulary) against the full path, which tests/test_sampler.py holds to its oracles."""

from __future__ import annotations

import numpy as np
import pytest
from qpack.runtime.errors import QpackError
from qpack.runtime.sampler import Sampler, SamplingParams, SamplingParamsError


def test_greedy_fast_path_picks_what_the_full_path_picks():
    rng = np.random.default_rng(3)
    fast = Sampler(SamplingParams(temperature=0, presence_penalty=0.7, logit_bias={5: 2.0}), 300)
    full = Sampler(
        SamplingParams(temperature=0, presence_penalty=0.7, logit_bias={5: 2.0}, n_logprobs=0), 300
    )
    history: list[int] = []
    for _ in range(40):
        logits = (rng.standard_normal(300) * 2).astype(np.float32)
        best = int(fast.adjusted_logits(logits, history).argmax())
        a, b = fast.sample(logits, history), full.sample(logits, history)
        assert a.id == b.id == best
        assert a.logprob is None and a.top == []
        assert b.logprob is not None and b.logprob <= 0
        history.append(a.id)
    # the presence penalty saw the same generated tokens on both paths
    assert fast._generated_counts == full._generated_counts


def test_greedy_fast_path_still_refuses_broken_logits():
    s = Sampler(SamplingParams(temperature=0), 4)
    for bad in ([0.0, np.nan, 1.0, 2.0], [0.0, np.inf, 1.0, 2.0]):
        with pytest.raises(QpackError, match="logits"):
            s.sample(np.array(bad, np.float32), [])
    banned = Sampler(SamplingParams(temperature=0, logit_bias={i: -np.inf for i in range(4)}), 4)
    with pytest.raises(SamplingParamsError, match="banned"):
        banned.sample(np.zeros(4, np.float32), [])
