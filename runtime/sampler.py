"""Turn one row of logits into one token, and cut the text at stop strings.

The chain follows llama.cpp's default order: logit_bias -> penalties -> top_k -> top_p ->
min_p -> temperature -> draw. Truncation works on temperature-1 probabilities, so top_p and
min_p mean the same thing whatever the temperature. Each Sampler owns its random generator:
requests decoded together in one batch never influence each other's draws.
"""

from __future__ import annotations

import math
import secrets
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from .errors import QpackError

MAX_LOGPROBS = 20
# Stop strings are checked at every token on the engine thread that serves every request:
# their number and length bound that work (and the text held back while one may be starting).
MAX_STOP_STRINGS = 16
MAX_STOP_CHARS = 256


class SamplingParamsError(QpackError):
    """A sampling parameter is out of range; `param` names it (OpenAI's error field)."""

    def __init__(self, param: str, problem: str):
        self.param = param
        super().__init__(f"invalid sampling parameter '{param}': {problem}")


def _number(name: str, value: object) -> float:
    # bool is an int in Python; `temperature: true` is a client bug, not 1.0.
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise SamplingParamsError(name, f"must be a number, got {value!r}")
    value = float(value)
    if math.isnan(value):
        raise SamplingParamsError(name, "must be a number, got NaN")
    return value


def _integer(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise SamplingParamsError(name, f"must be an integer, got {value!r}")
    return value


def _in_range(name: str, value: float, low: float, high: float, hint: str = "") -> None:
    if not low <= value <= high:
        raise SamplingParamsError(name, f"must be between {low} and {high}, got {value}{hint}")


@dataclass
class SamplingParams:
    """What a request asks of the sampler. Defaults are llama.cpp server's."""

    temperature: float = 0.8  # 0 = greedy
    top_k: int = 40  # 0 = off
    top_p: float = 0.95  # 1 = off
    min_p: float = 0.05  # 0 = off
    repeat_penalty: float = 1.0  # 1 = off
    repeat_last_n: int = 64  # 0 = off, -1 = the whole history
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None  # None = random
    logit_bias: dict[int, float] = field(default_factory=dict)
    n_logprobs: int | None = None  # top alternatives to report per token, 0..20
    stop: list[str] = field(default_factory=list)
    max_tokens: int | None = None  # None = until the context is full

    def __post_init__(self) -> None:
        self.temperature = _number("temperature", self.temperature)
        if not 0.0 <= self.temperature < math.inf:
            raise SamplingParamsError(
                "temperature", f"must be >= 0 (0 = greedy), got {self.temperature}"
            )
        self.top_k = _integer("top_k", self.top_k)
        if self.top_k < 0:
            raise SamplingParamsError("top_k", f"must be >= 0 (0 = off), got {self.top_k}")
        self.top_p = _number("top_p", self.top_p)
        _in_range("top_p", self.top_p, 0.0, 1.0, " (1 = off)")
        self.min_p = _number("min_p", self.min_p)
        _in_range("min_p", self.min_p, 0.0, 1.0, " (0 = off)")
        self.repeat_penalty = _number("repeat_penalty", self.repeat_penalty)
        if not 0.0 < self.repeat_penalty < math.inf:
            raise SamplingParamsError(
                "repeat_penalty", f"must be > 0 (1 = off), got {self.repeat_penalty}"
            )
        self.repeat_last_n = _integer("repeat_last_n", self.repeat_last_n)
        if self.repeat_last_n < -1:
            raise SamplingParamsError(
                "repeat_last_n",
                f"must be >= -1 (0 = off, -1 = whole history), got {self.repeat_last_n}",
            )
        # OpenAI documents -2..2 for both; beyond that a penalty only wrecks the text.
        self.presence_penalty = _number("presence_penalty", self.presence_penalty)
        _in_range("presence_penalty", self.presence_penalty, -2.0, 2.0)
        self.frequency_penalty = _number("frequency_penalty", self.frequency_penalty)
        _in_range("frequency_penalty", self.frequency_penalty, -2.0, 2.0)
        if self.seed is not None:
            self.seed = _integer("seed", self.seed)
            if not 0 <= self.seed < 2**64:
                raise SamplingParamsError(
                    "seed", f"must be between 0 and 2**64-1 (or None = random), got {self.seed}"
                )
        self.logit_bias = self._checked_bias(self.logit_bias)
        if self.n_logprobs is not None:
            self.n_logprobs = _integer("n_logprobs", self.n_logprobs)
            _in_range("n_logprobs", self.n_logprobs, 0, MAX_LOGPROBS)
        self.stop = self._checked_stop(self.stop)
        if self.max_tokens is not None:
            self.max_tokens = _integer("max_tokens", self.max_tokens)
            if self.max_tokens < 1:
                raise SamplingParamsError(
                    "max_tokens", f"must be >= 1 (or None = no limit), got {self.max_tokens}"
                )

    @staticmethod
    def _checked_bias(bias: object) -> dict[int, float]:
        if not isinstance(bias, dict):
            raise SamplingParamsError("logit_bias", f"must map token ids to numbers, got {bias!r}")
        out: dict[int, float] = {}
        for key, value in bias.items():
            # JSON object keys are strings: accept "50256" as well as 50256.
            token = key
            if isinstance(key, str):
                try:
                    token = int(key)
                except ValueError:
                    raise SamplingParamsError(
                        "logit_bias", f"key {key!r} is not a token id"
                    ) from None
            token = _integer("logit_bias", token)
            if token < 0:
                raise SamplingParamsError("logit_bias", f"token id {token} is negative")
            amount = _number("logit_bias", value)
            if amount == math.inf:
                raise SamplingParamsError(
                    "logit_bias", f"bias for token {token} is +inf (use a large finite number)"
                )
            out[token] = amount
        return out

    @staticmethod
    def _checked_stop(stop: object) -> list[str]:
        if stop is None:
            return []
        if isinstance(stop, str):  # OpenAI accepts one string or a list of them
            stop = [stop]
        if not isinstance(stop, list | tuple) or not all(isinstance(s, str) for s in stop):
            raise SamplingParamsError(
                "stop", f"must be a string or a list of strings, got {stop!r}"
            )
        if any(s == "" for s in stop):
            raise SamplingParamsError("stop", "an empty stop string would stop at once")
        if len(stop) > MAX_STOP_STRINGS:
            raise SamplingParamsError(
                "stop", f"at most {MAX_STOP_STRINGS} strings, got {len(stop)}"
            )
        longest = max((len(s) for s in stop), default=0)
        if longest > MAX_STOP_CHARS:
            raise SamplingParamsError(
                "stop", f"stop strings are at most {MAX_STOP_CHARS} characters, got {longest}"
            )
        return list(stop)


class StopMatcher:
    """Cuts streamed text at the first stop string, even one split across several tokens.

    Text that could still become the start of a stop string is held back until the next
    feed decides it. The cut falls where a stop string is first complete reading left to
    right (the longest one if several end there), so how the text was split into pieces
    never changes the result.

    The stop strings are one Aho-Corasick automaton: each character fed moves it one state
    (failure links amortized), and the state's depth is the length of text to hold back. So a
    token costs O(its text + held text), never O(stop length squared); stop strings are at
    most MAX_STOP_CHARS long (SamplingParams checks), which bounds the held text.
    """

    def __init__(self, stop_strings: Sequence[str]):
        if any(s == "" for s in stop_strings):
            raise QpackError("StopMatcher: an empty stop string would stop at once")
        self.stop_strings = list(stop_strings)
        self.stopped = False
        self.matched: str | None = None  # the stop string that ended the text
        self._held = ""
        self._state = 0
        # The trie: goto[state][char] -> state; depth = length of the prefix it spells.
        self._goto: list[dict[str, int]] = [{}]
        self._depth = [0]
        self._word: list[str | None] = [None]  # the stop string a state completes
        for stop in self.stop_strings:
            state = 0
            for ch in stop:
                nxt = self._goto[state].get(ch)
                if nxt is None:
                    nxt = len(self._goto)
                    self._goto[state][ch] = nxt
                    self._goto.append({})
                    self._depth.append(self._depth[state] + 1)
                    self._word.append(None)
                state = nxt
            self._word[state] = stop
        # Failure links (longest proper suffix that is a trie state) and, per state, the
        # longest stop string ending there, in breadth-first order.
        self._fail = [0] * len(self._goto)
        self._ends: list[str | None] = list(self._word)
        order = list(self._goto[0].values())
        for state in order:
            for ch, nxt in self._goto[state].items():
                order.append(nxt)
                if state == 0:
                    continue
                f = self._fail[state]
                while ch not in self._goto[f] and f != 0:
                    f = self._fail[f]
                self._fail[nxt] = self._goto[f].get(ch, 0)
            if self._ends[state] is None and state != 0:
                self._ends[state] = self._ends[self._fail[state]]

    def _step(self, state: int, ch: str) -> int:
        goto, fail = self._goto, self._fail
        while True:
            nxt = goto[state].get(ch)
            if nxt is not None:
                return nxt
            if state == 0:
                return 0
            state = fail[state]

    def feed(self, text: str) -> tuple[str, bool]:
        """Returns the text that is safe to show now, and whether a stop string was reached."""
        if self.stopped:
            return "", True
        if not self.stop_strings:
            return text, False
        buffer = self._held + text
        base = len(self._held)
        state, ends = self._state, self._ends
        for i, ch in enumerate(text):
            state = self._step(state, ch)
            if ends[state] is not None:
                self.matched = ends[state]
                self.stopped = True
                self._held = ""
                return buffer[: base + i + 1 - len(self.matched)], True
        self._state = state
        keep = self._depth[state]
        self._held = buffer[len(buffer) - keep :]
        return buffer[: len(buffer) - keep], False

    def flush(self) -> str:
        """The held-back text, at the end of generation (it turned out not to be a stop)."""
        held, self._held, self._state = self._held, "", 0
        return held


@dataclass(frozen=True)
class SampledToken:
    """A drawn token, its log-probability and the most likely alternatives (OpenAI logprobs).

    Log-probabilities are those of the logits after logit_bias and penalties, before any
    truncation or temperature, as OpenAI reports them.
    """

    id: int
    logprob: float | None  # None: greedy and not asked for (n_logprobs None)
    top: list[tuple[int, float]]


def top_indices(values: np.ndarray, k: int) -> np.ndarray:
    """Ids of the k largest values, largest first, ties by lowest id (= a stable argsort of
    -values, cut at k) without sorting the whole array.

    Split the values into groups and take each group's maximum (one vectorized pass): the
    k-th largest maximum is a lower bound for the k-th largest value, so only the groups
    whose maximum reaches it can hold the top k: a few thousand candidates, not the vocab.
    """
    n = values.size
    k = min(k, n)
    if k <= 0:
        return np.empty(0, dtype=np.intp)
    # Power-of-two group size near sqrt(n / k) balances the two partitions below.
    group = 1 << max(0, round(math.log2(max(1.0, math.sqrt(n / k)))))
    columns = n // group
    if group > 1 and columns > k:
        grid = values[: group * columns].reshape(group, columns)  # column j = one group
        maxima = np.maximum.reduce(grid, axis=0)
        lower = np.partition(maxima, columns - k)[columns - k]
        hit = np.flatnonzero(maxima >= lower)
        candidates = (hit[None, :] + (np.arange(group) * columns)[:, None]).ravel()
        candidates = np.concatenate([candidates, np.arange(group * columns, n)])
    else:
        candidates = np.arange(n)
    chosen = values[candidates]
    if candidates.size > k:
        kth = np.partition(chosen, candidates.size - k)[candidates.size - k]
        above = candidates[chosen > kth]
        ties = np.sort(candidates[chosen == kth])[: k - above.size]  # lowest ids first
        candidates = np.concatenate([above, ties])
        chosen = values[candidates]
    return candidates[np.lexsort((candidates, -chosen))]


class Sampler:
    """Draws tokens for one request. Not shared between requests: it holds the request's
    random generator and the counts of the tokens it has produced (presence/frequency
    penalties, as OpenAI defines them, count generated tokens, not the prompt)."""

    def __init__(self, params: SamplingParams, vocab_size: int):
        if vocab_size < 1:
            raise QpackError(f"Sampler: vocab_size must be >= 1, got {vocab_size}")
        for token in params.logit_bias:
            if token >= vocab_size:
                raise SamplingParamsError(
                    "logit_bias",
                    f"token id {token} is outside the vocabulary (0..{vocab_size - 1})",
                )
        self.params = params
        self.vocab_size = vocab_size
        # A drawn seed is kept so that a response can report it and be reproduced.
        self.seed = params.seed if params.seed is not None else secrets.randbits(32)
        self._rng = np.random.default_rng(self.seed)
        self._bias_ids = np.fromiter(params.logit_bias.keys(), dtype=np.intp)
        self._bias_values = np.fromiter(params.logit_bias.values(), dtype=np.float32)
        self._track_counts = params.presence_penalty != 0.0 or params.frequency_penalty != 0.0
        self._generated_counts: dict[int, int] = {}
        self._scratch = np.empty(vocab_size, dtype=np.float32)

    def adjusted_logits(self, logits: np.ndarray, history: Sequence[int]) -> np.ndarray:
        """The logits after logit_bias and penalties; the caller's array is never written:
        a copy is made only when something changes."""
        p = self.params
        x = self._checked_logits(logits)
        repeat = p.repeat_penalty != 1.0 and p.repeat_last_n != 0 and len(history) > 0
        counted = self._track_counts and bool(self._generated_counts)
        if not (self._bias_ids.size or repeat or counted):
            return x
        x = x.copy()
        if self._bias_ids.size:
            x[self._bias_ids] += self._bias_values
        if repeat:
            window = history if p.repeat_last_n < 0 else history[-p.repeat_last_n :]
            ids = np.unique(np.asarray(window, dtype=np.intp))
            self._check_ids(ids, "history")
            v = x[ids]
            # llama.cpp's rule: a penalty always makes the token less likely, whatever its sign.
            x[ids] = np.where(v <= 0, v * p.repeat_penalty, v / p.repeat_penalty)
        if counted:
            ids = np.fromiter(self._generated_counts.keys(), dtype=np.intp)
            counts = np.fromiter(self._generated_counts.values(), dtype=np.float32)
            x[ids] -= counts * np.float32(p.frequency_penalty) + np.float32(p.presence_penalty)
        return x

    def _checked_logits(self, logits: np.ndarray) -> np.ndarray:
        x = np.asarray(logits)
        if x.shape != (self.vocab_size,):
            raise QpackError(
                f"Sampler: logits of shape {x.shape}, expected ({self.vocab_size},) (one row)"
            )
        return x if x.dtype == np.float32 else x.astype(np.float32)

    def _check_ids(self, ids: np.ndarray, what: str) -> None:
        # ids is sorted (np.unique), so its ends are its extremes.
        if ids.size and (ids[0] < 0 or ids[-1] >= self.vocab_size):
            raise QpackError(
                f"Sampler: {what} holds token id {ids[0] if ids[0] < 0 else ids[-1]}, "
                f"outside the vocabulary (0..{self.vocab_size - 1})"
            )

    def sample(self, logits: np.ndarray, history: Sequence[int]) -> SampledToken:
        """Draw the next token. `history` is the sequence so far (prompt and generated);
        the repeat penalty looks at its last repeat_last_n tokens."""
        p = self.params
        x = self.adjusted_logits(logits, history)
        # Greedy with no logprob asked (the common decode): argmax alone, no log-sum-exp over
        # the vocabulary (~200 us of a ~220 us step with 262144 tokens).
        greedy_only = p.temperature == 0.0 and p.n_logprobs is None
        token = int(x.argmax()) if greedy_only else -1
        top_logit = float(x[token]) if greedy_only else float(x.max())
        if math.isnan(top_logit) or top_logit == math.inf:
            raise QpackError(
                f"the model produced {top_logit} logits (a broken model file or kernel)"
            )
        if top_logit == -math.inf:
            raise SamplingParamsError("logit_bias", "every token of the vocabulary is banned")
        if greedy_only:
            if self._track_counts:
                self._generated_counts[token] = self._generated_counts.get(token, 0) + 1
            return SampledToken(token, None, [])
        # log-sum-exp over the whole vocabulary, in a reused buffer (no allocation per token).
        np.subtract(x, np.float32(top_logit), out=self._scratch)
        np.exp(self._scratch, out=self._scratch)
        log_norm = top_logit + math.log(float(self._scratch.sum()))

        if p.temperature == 0.0:
            token = int(x.argmax())
        else:
            token = self._draw(x, top_logit, log_norm)

        if self._track_counts:
            self._generated_counts[token] = self._generated_counts.get(token, 0) + 1
        top: list[tuple[int, float]] = []
        if p.n_logprobs:
            top = [(int(i), float(x[i]) - log_norm) for i in top_indices(x, p.n_logprobs)]
        return SampledToken(token, float(x[token]) - log_norm, top)

    def _draw(self, x: np.ndarray, top_logit: float, log_norm: float) -> int:
        p = self.params
        ids: np.ndarray | None = None  # None = the whole vocabulary is still allowed
        if 0 < p.top_k < x.size:
            ids = top_indices(x, p.top_k)
        if p.top_p < 1.0:
            ids = self._top_p(x, ids, log_norm)
        if p.min_p > 0.0:
            # Relative to the most likely token, which every step above keeps.
            floor = top_logit + math.log(p.min_p)
            ids = np.flatnonzero(x >= floor) if ids is None else ids[x[ids] >= floor]
        if ids is None:  # no truncation: weigh the whole vocabulary without gathering it
            weights = self._scratch
            np.subtract(x, np.float32(top_logit), out=weights)
            weights /= np.float32(p.temperature)
            np.exp(weights, out=weights)
            return self._pick(weights)
        weights = np.exp((x[ids].astype(np.float64) - top_logit) / p.temperature)
        return int(ids[self._pick(weights)])

    def _top_p(self, x: np.ndarray, ids: np.ndarray | None, log_norm: float) -> np.ndarray:
        """The most likely tokens whose probability first reaches top_p, the token that crosses
        the threshold included (as llama.cpp), over the current set. Tokens tied with that one
        are kept too, so the set never depends on an arbitrary order among equals."""
        top_p = self.params.top_p
        if ids is not None:
            chosen = x[ids].astype(np.float64)  # already most likely first
            probs = np.exp(chosen - chosen[0])
            cdf = np.cumsum(probs / probs.sum())
        else:
            # Sorting a 262144 vocabulary costs ~7 ms, so sort only the tokens that can matter:
            # those under (1 - top_p) / n each weigh less than 1 - top_p all together.
            floor = log_norm + math.log((1.0 - top_p) / x.size)
            ids = np.flatnonzero(x >= floor)
            chosen = np.sort(x[ids].astype(np.float64))[::-1]
            cdf = np.cumsum(np.exp(chosen - log_norm))
        crossing = min(int(np.searchsorted(cdf, top_p, side="left")), cdf.size - 1)
        return ids[x[ids] >= chosen[crossing]]

    def _pick(self, weights: np.ndarray) -> int:
        """Index drawn with probability proportional to weights (>= 0, some > 0), from one
        uniform number. Large arrays go by blocks: a full cumsum of 262144 costs ~0.9 ms."""
        target = self._rng.random()
        block = 4096
        if weights.size <= block:
            return _search_cdf(np.cumsum(weights, dtype=np.float64), target)
        n_blocks = -(-weights.size // block)
        sums = np.add.reduceat(weights, np.arange(n_blocks) * block, dtype=np.float64)
        cdf = np.cumsum(sums)
        b = _search_cdf(cdf, target)
        before = cdf[b - 1] if b else 0.0
        # Where the draw falls inside block b, as a fraction of that block's weight.
        inside = min(max((target * cdf[-1] - before) / sums[b], 0.0), 1.0)
        part = weights[b * block : (b + 1) * block]
        return b * block + _search_cdf(np.cumsum(part, dtype=np.float64), inside)


def _search_cdf(cdf: np.ndarray, fraction: float) -> int:
    """First index whose cumulative weight exceeds fraction * total; never a zero-weight one
    (rounding can put the target on the total itself)."""
    index = int(np.searchsorted(cdf, fraction * cdf[-1], side="right"))
    if index >= cdf.size:
        index = int(np.searchsorted(cdf, cdf[-1], side="left"))
    return index
