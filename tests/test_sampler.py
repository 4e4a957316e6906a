"""The sampler against independent oracles: distributions computed here in plain Python,
penalties worked out by hand, np.argsort for the logprob lists, a character-by-character
scan for stop strings.

Speed (measured, never asserted). Vocab 262144, float32 logits 3*N(0,1) ("flat") or the same
with 30 tokens raised by 25 ("peaked"), a 500-token history, timeit best of 3 x 200 calls,
this machine (AMD EPYC Zen 4, numpy 2.4) while idle; per token:
  llama.cpp defaults (top_k 40, top_p .95, min_p .05, T .8)       320 us
  the same + 5 logprobs + repeat/presence/frequency + logit_bias   450 us
  greedy                                                           220 us
  top_k off, top_p .95: peaked 270 us; flat 4.6 ms (the worst case: most of the vocab
  must be sorted)
  no truncation at all (the whole vocab weighed and drawn)         620 us
About 200 us of each is the log-sum-exp over the whole vocabulary that the reported logprob
needs. With the 2 cores shared by other builds, the same runs take 1.5-2.5x longer.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st
from qpack.runtime.errors import QpackError
from qpack.runtime.sampler import (
    Sampler,
    SamplingParams,
    SamplingParamsError,
    StopMatcher,
    top_indices,
)

NO_TRUNCATION = dict(top_k=0, top_p=1.0, min_p=0.0)


def random_logits(n: int, seed: int, scale: float = 2.0) -> np.ndarray:
    return (np.random.default_rng(seed).standard_normal(n) * scale).astype(np.float32)


# ---------------------------------------------------------------- parameters


def test_defaults_are_llama_cpp_servers():
    p = SamplingParams()
    assert (p.temperature, p.top_k, p.top_p, p.min_p) == (0.8, 40, 0.95, 0.05)
    assert (p.repeat_penalty, p.repeat_last_n) == (1.0, 64)
    assert (p.presence_penalty, p.frequency_penalty) == (0.0, 0.0)
    assert p.seed is None and p.logit_bias == {} and p.n_logprobs is None and p.stop == []


@pytest.mark.parametrize(
    "field, value, words",
    [
        ("temperature", -0.1, ">= 0"),
        ("temperature", math.inf, ">= 0"),
        ("temperature", "0.5", "must be a number"),
        ("temperature", True, "must be a number"),
        ("top_k", -1, ">= 0"),
        ("top_k", 2.5, "must be an integer"),
        ("top_p", 1.5, "between 0.0 and 1.0"),
        ("top_p", math.nan, "NaN"),
        ("min_p", -0.01, "between 0.0 and 1.0"),
        ("repeat_penalty", 0.0, "> 0"),
        ("repeat_last_n", -2, ">= -1"),
        ("presence_penalty", 2.5, "between -2.0 and 2.0"),
        ("frequency_penalty", -3.0, "between -2.0 and 2.0"),
        ("seed", -1, "None = random"),
        ("seed", 2**64, "None = random"),
        ("logit_bias", {"abc": 1.0}, "not a token id"),
        ("logit_bias", {-3: 1.0}, "negative"),
        ("logit_bias", {5: math.inf}, "+inf"),
        ("logit_bias", [1, 2], "must map token ids"),
        ("n_logprobs", 21, "between 0 and 20"),
        ("n_logprobs", -1, "between 0 and 20"),
        ("stop", [""], "empty stop string"),
        ("stop", [3], "list of strings"),
        ("max_tokens", 0, ">= 1"),
    ],
)
def test_invalid_params_raise_a_clear_error(field, value, words):
    with pytest.raises(SamplingParamsError) as caught:
        SamplingParams(**{field: value})
    assert caught.value.param == field
    assert field in str(caught.value) and words in str(caught.value)
    assert isinstance(caught.value, QpackError)


def test_params_accept_what_json_clients_send():
    p = SamplingParams(logit_bias={"7": -100, 3: 2}, stop="###", temperature=1, seed=5)
    assert p.logit_bias == {7: -100.0, 3: 2.0}
    assert p.stop == ["###"]
    assert isinstance(p.temperature, float)


def test_logit_bias_ids_are_checked_against_the_vocab():
    Sampler(SamplingParams(logit_bias={9: 1.0}), vocab_size=10)
    with pytest.raises(
        SamplingParamsError, match=r"token id 10 is outside the vocabulary \(0..9\)"
    ):
        Sampler(SamplingParams(logit_bias={10: 1.0}), vocab_size=10)


def test_bad_inputs_raise_clear_errors():
    sampler = Sampler(SamplingParams(repeat_penalty=1.1), vocab_size=8)
    with pytest.raises(QpackError, match=r"shape \(7,\), expected \(8,\)"):
        sampler.sample(np.zeros(7, np.float32), [])
    with pytest.raises(QpackError, match="nan logits"):
        sampler.sample(np.array([0, 1, np.nan, 0, 0, 0, 0, 0], np.float32), [])
    with pytest.raises(QpackError, match="inf logits"):
        sampler.sample(np.array([0, 1, np.inf, 0, 0, 0, 0, 0], np.float32), [])
    with pytest.raises(QpackError, match="history holds token id 8"):
        sampler.sample(np.zeros(8, np.float32), [1, 8])
    banned = Sampler(SamplingParams(logit_bias={i: -math.inf for i in range(8)}), vocab_size=8)
    with pytest.raises(SamplingParamsError, match="every token of the vocabulary is banned"):
        banned.sample(np.zeros(8, np.float32), [])


# ---------------------------------------------------------------- greedy, seeds


def test_greedy_is_argmax():
    sampler = Sampler(SamplingParams(temperature=0.0), vocab_size=5000)
    for seed in range(50):
        logits = random_logits(5000, seed)
        assert sampler.sample(logits, []).id == int(np.argmax(logits))


def test_greedy_applies_bias_and_penalties_first():
    logits = np.array([1.0, 5.0, 4.0, 3.0], np.float32)
    # token 1 banned, token 2 repeated (4 / 2 = 2 < 3): the answer is token 3
    params = SamplingParams(temperature=0.0, logit_bias={1: -math.inf}, repeat_penalty=2.0)
    assert Sampler(params, 4).sample(logits, [2]).id == 3


def draws(sampler: Sampler, logits: np.ndarray, count: int) -> list[int]:
    return [sampler.sample(logits, []).id for _ in range(count)]


def test_same_seed_same_sequence_and_different_seeds_differ():
    logits = random_logits(3000, 1, scale=0.5)
    params = dict(temperature=1.0, **NO_TRUNCATION)
    first = draws(Sampler(SamplingParams(seed=42, **params), 3000), logits, 200)
    again = draws(Sampler(SamplingParams(seed=42, **params), 3000), logits, 200)
    other = draws(Sampler(SamplingParams(seed=43, **params), 3000), logits, 200)
    assert first == again
    assert first != other
    assert len(set(first)) > 100  # really random, not stuck on one token


def test_a_random_seed_is_reported_and_reproduces_the_run():
    logits = random_logits(3000, 2, scale=0.5)
    params = dict(temperature=1.0, **NO_TRUNCATION)
    unseeded = Sampler(SamplingParams(**params), 3000)
    sequence = draws(unseeded, logits, 100)
    replay = Sampler(SamplingParams(seed=unseeded.seed, **params), 3000)
    assert draws(replay, logits, 100) == sequence


def test_samplers_in_one_batch_do_not_influence_each_other():
    logits_a, logits_b = random_logits(3000, 3, 0.5), random_logits(3000, 4, 0.5)
    params = dict(temperature=1.0, **NO_TRUNCATION)
    alone = draws(Sampler(SamplingParams(seed=7, **params), 3000), logits_a, 100)
    a = Sampler(SamplingParams(seed=7, **params), 3000)
    b = Sampler(SamplingParams(seed=7, **params), 3000)  # same seed, other logits
    interleaved = []
    for _ in range(100):
        interleaved.append(a.sample(logits_a, []).id)
        b.sample(logits_b, [])
        b.sample(logits_b, [])
    assert interleaved == alone


def test_the_callers_logits_are_never_written():
    logits = random_logits(1000, 5)
    before = logits.copy()
    params = SamplingParams(
        seed=1,
        logit_bias={3: 5.0, 4: -math.inf},
        repeat_penalty=1.3,
        presence_penalty=0.5,
        frequency_penalty=0.5,
        n_logprobs=5,
    )
    sampler = Sampler(params, 1000)
    for _ in range(20):
        sampler.sample(logits, [1, 2, 3, 4, 5])
    assert np.array_equal(logits, before)


# ---------------------------------------------------------------- truncation, statistically


def reference_distribution(
    logits: np.ndarray, top_k: int, top_p: float, min_p: float, temperature: float
) -> dict[int, float]:
    """llama.cpp's chain, written out plainly in float64 Python: the exact probabilities of
    every token that may be drawn."""
    x = [float(v) for v in logits]
    order = sorted(range(len(x)), key=lambda i: (-x[i], i))
    if top_k > 0:
        order = order[:top_k]
    if top_p < 1.0:
        top = x[order[0]]
        total = sum(math.exp(x[i] - top) for i in order)
        kept, mass = [], 0.0
        for i in order:
            kept.append(i)
            mass += math.exp(x[i] - top) / total
            if mass >= top_p:
                break
        order = kept
    if min_p > 0.0:
        order = [i for i in order if x[i] >= x[order[0]] + math.log(min_p)]
    weights = {i: math.exp((x[i] - x[order[0]]) / temperature) for i in order}
    total = sum(weights.values())
    return {i: w / total for i, w in weights.items()}


def chi_square_is_plausible(cells: list[tuple[float, float]]) -> bool:
    """Pearson's statistic over (observed, expected) cells, against its mean + 6 sd."""
    chi2 = sum((o - e) ** 2 / e for o, e in cells)
    df = max(len(cells) - 1, 1)
    return chi2 < df + 6 * math.sqrt(2 * df)


def assert_matches_distribution(ids: list[int], expected: dict[int, float]) -> None:
    n = len(ids)
    counts: dict[int, int] = {}
    for i in ids:
        counts[i] = counts.get(i, 0) + 1
    outside = set(counts) - set(expected)
    assert not outside, f"drew tokens outside the allowed set: {sorted(outside)[:10]}"
    # Tokens expected often enough for the normal approximation: within 5 sd each ...
    big = [t for t, p in expected.items() if n * p >= 20]
    for token in big:
        p = expected[token]
        assert abs(counts.get(token, 0) - n * p) <= 5 * math.sqrt(n * p * (1 - p)), (
            token,
            counts.get(token, 0),
            n * p,
        )
    # ... chi-square over them with the rare ones pooled ...
    cells = [(counts.get(t, 0), n * expected[t]) for t in big]
    rest = 1.0 - sum(expected[t] for t in big)
    if n * rest >= 5:
        cells.append((n - sum(counts.get(t, 0) for t in big), n * rest))
    assert chi_square_is_plausible(cells), cells
    # ... and over ranges of ids, which catches a draw that favours a part of the vocabulary.
    width = max(1, max(expected) // 40 + 1)
    buckets: dict[int, list[float]] = {}
    for token, p in expected.items():
        buckets.setdefault(token // width, [0.0, 0.0])[1] += n * p
    for token, c in counts.items():
        buckets[token // width][0] += c
    cells = [(o, e) for o, e in buckets.values() if e >= 5]
    assert chi_square_is_plausible(cells), cells


@pytest.mark.parametrize(
    "vocab, scale, top_k, top_p, min_p, temperature",
    [
        (300, 2.0, 5, 1.0, 0.0, 1.0),  # top_k alone
        (300, 2.0, 0, 0.8, 0.0, 1.0),  # top_p alone, over the whole vocabulary
        (300, 2.0, 0, 1.0, 0.1, 1.0),  # min_p alone
        (300, 2.0, 40, 0.95, 0.05, 0.8),  # llama.cpp's defaults
        (300, 2.0, 10, 0.5, 0.0, 1.5),  # top_p on the top_k set, hot
        (300, 1.0, 0, 0.9, 0.2, 0.6),  # top_p then min_p, cool
        (20000, 1.0, 0, 1.0, 0.0, 0.7),  # whole vocabulary (drawn by blocks)
        (20000, 3.0, 0, 0.6, 0.0, 1.0),  # top_p over a large vocabulary
        (20000, 1.5, 100, 1.0, 0.0, 1.0),  # top_k over a large vocabulary
    ],
)
def test_draws_follow_the_exact_truncated_distribution(
    vocab, scale, top_k, top_p, min_p, temperature
):
    logits = random_logits(vocab, seed=vocab + top_k, scale=scale)
    expected = reference_distribution(logits, top_k, top_p, min_p, temperature)
    params = SamplingParams(
        temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p, seed=1234
    )
    ids = draws(Sampler(params, vocab), logits, 10000)
    assert_matches_distribution(ids, expected)


def test_truncation_is_applied_to_the_biased_logits():
    # Token 0 is the best raw logit; the bias sinks it below the top_k=2 cut.
    logits = np.array([5.0, 4.0, 3.0, 0.0], np.float32)
    params = SamplingParams(
        top_k=2, top_p=1.0, min_p=0.0, temperature=1.0, seed=3, logit_bias={0: -4.0}
    )
    sampler = Sampler(params, 4)
    ids = draws(sampler, logits, 4000)
    biased = np.array([1.0, 4.0, 3.0, 0.0], np.float32)
    assert_matches_distribution(ids, reference_distribution(biased, 2, 1.0, 0.0, 1.0))


@pytest.mark.parametrize("top_k", [0, 5])  # top_p over the whole vocabulary / the top_k set
def test_top_p_keeps_every_token_tied_with_the_crossing_one(top_k):
    # probabilities ~ .45 .16 .16 .16 .06 .00: top_p = 0.5 is crossed by one of the tied 1.0s
    logits = np.array([2.0, 1.0, 1.0, 1.0, 0.0, -9.0], np.float32)
    params = SamplingParams(top_k=top_k, top_p=0.5, min_p=0.0, temperature=1.0, seed=4)
    assert set(draws(Sampler(params, 6), logits, 2000)) == {0, 1, 2, 3}


def test_logit_bias_minus_infinity_bans_a_token():
    logits = np.array([3.0, 2.9, 2.8, -1.0], np.float32)
    params = SamplingParams(temperature=5.0, seed=9, logit_bias={0: -math.inf}, **NO_TRUNCATION)
    ids = draws(Sampler(params, 4), logits, 3000)
    assert 0 not in ids and {1, 2, 3} <= set(ids)
    greedy = SamplingParams(temperature=0.0, logit_bias={0: -math.inf})
    assert Sampler(greedy, 4).sample(logits, []).id == 1


def test_top_indices_is_a_stable_argsort_cut_at_k():
    rng = np.random.default_rng(0)
    for n in (1, 9, 1000, 49152, 32001):
        # coarse values: many ties, some banned tokens
        x = (np.round(rng.standard_normal(n) * 3) / 2).astype(np.float32)
        x[rng.integers(0, n, n // 10)] = -np.inf
        for k in (1, 2, 5, 40, 1000, n):
            assert np.array_equal(top_indices(x, k), np.argsort(-x, kind="stable")[:k]), (n, k)


# ---------------------------------------------------------------- penalties


def test_repeat_penalty_changes_exactly_the_tokens_in_the_window():
    logits = np.array([2.0, -1.0, 0.5, 3.0, -2.0, 0.0, 1.0], np.float32)
    history = [0, 4, 1, 3, 1, 5]  # the last 4: 1, 3, 1, 5
    params = SamplingParams(repeat_penalty=2.0, repeat_last_n=4)
    got = Sampler(params, 7).adjusted_logits(logits, history)
    # positive logits divided, the rest multiplied, once per distinct token (1 twice = once)
    assert got.tolist() == [2.0, -2.0, 0.5, 1.5, -2.0, 0.0, 1.0]
    whole = SamplingParams(repeat_penalty=2.0, repeat_last_n=-1)
    got = Sampler(whole, 7).adjusted_logits(logits, history)
    assert got.tolist() == [1.0, -2.0, 0.5, 1.5, -4.0, 0.0, 1.0]
    off = SamplingParams(repeat_penalty=2.0, repeat_last_n=0)
    assert Sampler(off, 7).adjusted_logits(logits, history).tolist() == logits.tolist()


def test_presence_and_frequency_penalties_count_the_generated_tokens():
    vocab = 6
    params = SamplingParams(
        temperature=0.0, presence_penalty=0.5, frequency_penalty=0.25, logit_bias={5: 1.0}
    )
    sampler = Sampler(params, vocab)
    prompt = [0, 0, 0, 1]  # the prompt does not count (OpenAI's definition)
    history = list(prompt)
    for forced in (2, 4, 2):  # generate 2, 4, 2 through one-hot logits
        one_hot = np.full(vocab, -10.0, np.float32)
        one_hot[forced] = 10.0
        history.append(sampler.sample(one_hot, history).id)
    assert history[4:] == [2, 4, 2]
    base = np.array([1.0, 1.0, 1.0, 1.0, 1.0, 1.0], np.float32)
    got = sampler.adjusted_logits(base, history)
    # token 2: 1 - (2 * 0.25 + 0.5) = 0; token 4: 1 - (0.25 + 0.5) = 0.25; bias +1 on 5
    assert got.tolist() == [1.0, 1.0, 0.0, 1.0, 0.25, 2.0]


def test_all_penalties_together_in_llama_cpp_order():
    # bias first, then repeat (sign-dependent), then presence/frequency on the result
    vocab = 4
    params = SamplingParams(
        temperature=0.0,
        logit_bias={1: -3.0},
        repeat_penalty=2.0,
        presence_penalty=1.0,
        frequency_penalty=1.0,
    )
    sampler = Sampler(params, vocab)
    one_hot = np.array([-10.0, 10.0, -10.0, -10.0], np.float32)
    assert sampler.sample(one_hot, [3]).id == 1  # 10 - 3, then /2 = 3.5: still the best
    got = sampler.adjusted_logits(np.array([2.0, 2.0, 2.0, 2.0], np.float32), [3, 1])
    # token 1: (2 - 3) * 2 - (1 + 1) = -4; token 3: 2 / 2 = 1
    assert got.tolist() == [2.0, -4.0, 2.0, 1.0]


# ---------------------------------------------------------------- logprobs


def log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    return x - x.max() - math.log(np.exp(x - x.max()).sum())


def test_logprobs_are_the_untruncated_log_softmax_of_the_adjusted_logits():
    vocab = 5000
    logits = random_logits(vocab, 11)
    params = SamplingParams(
        seed=5, n_logprobs=7, top_k=3, temperature=3.0, logit_bias={17: 4.0}, repeat_penalty=1.5
    )
    sampler = Sampler(params, vocab)
    history = [17, 20, 21]
    expected = log_softmax(sampler.adjusted_logits(logits, history))
    for _ in range(20):
        token = sampler.sample(logits, history)
        assert token.logprob == pytest.approx(expected[token.id], abs=1e-4)
        ids = [i for i, _ in token.top]
        assert ids == np.argsort(-expected, kind="stable")[:7].tolist()
        assert [lp for _, lp in token.top] == pytest.approx(expected[ids].tolist(), abs=1e-4)


def test_logprobs_over_a_whole_small_vocabulary_sum_to_one():
    logits = random_logits(20, 12, scale=3.0)
    token = Sampler(SamplingParams(seed=1, n_logprobs=20), 20).sample(logits, [])
    assert sorted(i for i, _ in token.top) == list(range(20))
    assert sum(math.exp(lp) for _, lp in token.top) == pytest.approx(1.0, abs=1e-5)
    assert dict(token.top)[token.id] == token.logprob


def test_no_logprob_list_unless_asked():
    logits = random_logits(50, 13)
    assert Sampler(SamplingParams(seed=1), 50).sample(logits, []).top == []
    assert Sampler(SamplingParams(seed=1, n_logprobs=0), 50).sample(logits, []).top == []


# ---------------------------------------------------------------- stop strings


def reference_stop(text: str, stops: list[str]) -> tuple[str, str | None]:
    """Read the text one character at a time; stop where a stop string first ends (the
    longest of those that end there). Returns the text before it and the stop string."""
    for end in range(1, len(text) + 1):
        ending = [s for s in stops if text[:end].endswith(s)]
        if ending:
            longest = max(ending, key=len)
            return text[: end - len(longest)], longest
    return text, None


def pending_prefix(text: str, stops: list[str]) -> int:
    """Length of the longest end of text that a stop string could still grow from."""
    return max(
        (n for s in stops for n in range(1, len(s)) if text.endswith(s[:n])),
        default=0,
    )


# Few letters in the stop strings, so that they overlap, nest and share prefixes often.
STOP_ALPHABET = "ab<é"
TEXT_ALPHABET = "ab<é\n "


@settings(max_examples=500, deadline=None)
@given(
    stops=st.lists(st.text(STOP_ALPHABET, min_size=1, max_size=5), min_size=1, max_size=3),
    text=st.text(TEXT_ALPHABET, max_size=30),
    cuts=st.lists(st.integers(0, 30), max_size=10),
)
@example(stops=["ab", "b"], text="xxab", cuts=[3])  # both end together: the longer wins
@example(stops=["b", "ab"], text="xxab", cuts=[])
@example(stops=["abcd", "c"], text="abcd", cuts=[])  # "c" is complete first
def test_stop_strings_split_any_way_are_never_emitted(stops, text, cuts):
    bounds = sorted({0, len(text), *(c for c in cuts if c <= len(text))})
    pieces = [text[a:b] for a, b in zip(bounds, bounds[1:], strict=False)]
    matcher = StopMatcher(stops)
    emitted, fed, stopped = "", "", False
    for piece in pieces:
        out, stopped = matcher.feed(piece)
        emitted += out
        fed += piece
        if stopped:
            break
        # prompt: everything that cannot grow into a stop string is out already
        assert emitted == fed[: len(fed) - pending_prefix(fed, stops)]
    if not stopped:
        emitted += matcher.flush()
    expected, stop = reference_stop(text, stops)
    assert (emitted, stopped, matcher.matched) == (expected, stop is not None, stop)
    assert not any(s in emitted for s in stops)


def test_stop_string_arriving_in_token_pieces():
    matcher = StopMatcher(["</s>", "\nUser:"])
    outputs = [matcher.feed(t) for t in ["Hello", " world", "\n", "Us", "age is <", "/", "s>x"]]
    assert outputs == [
        ("Hello", False),
        (" world", False),
        ("", False),  # "\n" could start "\nUser:"
        ("", False),  # "\nUs" still could
        ("\nUsage is ", False),  # it did not; "<" could start "</s>"
        ("", False),  # "</" could still be "</s>"
        ("", True),  # it is: nothing of it comes out
    ]
    assert "".join(o for o, _ in outputs) == "Hello world\nUsage is "
    assert matcher.matched == "</s>"
    assert matcher.feed("more") == ("", True) and matcher.flush() == ""


def test_no_stop_strings_passes_text_straight_through():
    matcher = StopMatcher([])
    assert matcher.feed("abc") == ("abc", False) and matcher.flush() == ""


def test_held_back_text_comes_out_at_flush():
    matcher = StopMatcher(["###"])
    assert matcher.feed("total ##") == ("total ", False)
    assert matcher.flush() == "##"


def test_stop_matching_costs_linear_time_in_the_text_fed():
    """The issue's attack: 16 long stop strings that the text keeps almost matching. Work is
    counted, not timed: an Aho-Corasick failure link is followed at most once per character
    fed (amortized), whatever the stop strings' length."""

    class CountingList(list):
        reads = 0

        def __getitem__(self, i):
            CountingList.reads += 1
            return super().__getitem__(i)

    stops = ["a" * 255 + chr(ord("b") + i) for i in range(16)]
    matcher = StopMatcher(stops)
    matcher._fail = CountingList(matcher._fail)
    fed = 0
    for i in range(3000):
        piece = "aaa" if i % 100 else "aax"  # nearly a stop, then broken off
        fed += len(piece)
        out, stopped = matcher.feed(piece)
        assert not stopped and len(matcher._held) < 256
    assert CountingList.reads <= fed
    assert matcher.feed("b")[1] and matcher.matched == "a" * 255 + "b"


def test_stop_strings_are_bounded():
    with pytest.raises(SamplingParamsError, match="at most 256 characters"):
        SamplingParams(stop=["x" * 257])
    with pytest.raises(SamplingParamsError, match="at most 16 strings"):
        SamplingParams(stop=["x"] * 17)
