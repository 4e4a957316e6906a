"""The engine: owns the model, decodes every active request together (continuous batching).

Each step builds ONE batch: one token for every sequence that is generating, then chunks of
waiting prompts up to the batch size. A new request joins at the next step; a finished or
cancelled one leaves and frees its slot at once. A slot keeps its cached tokens after a request
ends, so the next request with the same prompt prefix (a chat's next turn) reuses its KV cache.

The CLI pumps `run_until_done` in its own thread; the server runs `serve_forever` in an engine
thread and talks to it only through `submit` (thread-safe) and the per-request event queues.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np

from .errors import ContextOverflow, QpackError
from .model import Model
from .sampler import Sampler, SamplingParams, StopMatcher
from .tokenizer import StreamDecoder, Tokenizer

PREFILL_CHUNK_WHILE_DECODING = 64  # prompt tokens per step when some sequences are decoding


@dataclass
class Event:
    """A piece of a request's output: text (possibly empty while UTF-8 or a stop string is held
    back), the token it came from, its logprob and alternatives, or the finish."""

    text: str = ""
    token: int | None = None
    logprob: float | None = None
    top_logprobs: list[tuple[int, float]] | None = None
    finish_reason: str | None = None  # "stop" | "length" | "cancelled" | "error"
    error: str | None = None


@dataclass
class Usage:
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    prompt_seconds: float = 0.0
    generation_seconds: float = 0.0


class Request:
    """One generation: the caller reads `events()`; `cancel()` frees its slot at the next step."""

    def __init__(self, prompt: list[int], params: SamplingParams, constraint=None):
        self.prompt = list(prompt)
        self.params = params
        # Optional: .mask(logits) -> logits allowed next, .advance(token) (grammar.py).
        self.constraint = constraint
        self.usage = Usage(prompt_tokens=len(prompt))
        self._queue: queue.Queue[Event] = queue.Queue()
        self._cancelled = threading.Event()
        self.done = threading.Event()

    def cancel(self) -> None:
        self._cancelled.set()

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    def events(self, timeout: float | None = None) -> Iterator[Event]:
        """Events until (and including) the one with a finish_reason."""
        while True:
            ev = self._queue.get(timeout=timeout)
            yield ev
            if ev.finish_reason is not None:
                return

    def poll(self) -> list[Event]:
        """The events that have arrived so far, without waiting."""
        out = []
        while True:
            try:
                out.append(self._queue.get_nowait())
            except queue.Empty:
                return out

    def _emit(self, ev: Event) -> None:
        self._queue.put(ev)
        if ev.finish_reason is not None:
            self.done.set()


class EmbeddingRequest:
    """Mean-pooled, L2-normalised final hidden states of each input, filled in by the engine;
    `done` is set when `vectors` is complete (or `error` / cancellation ended it)."""

    def __init__(self, inputs: list[list[int]]):
        self.inputs = inputs
        self.vectors: list[np.ndarray] = []
        self.error: str | None = None
        self.done = threading.Event()
        self._cancelled = threading.Event()
        self._at = 0  # position reached in the current input
        self._sum: np.ndarray | None = None

    def cancel(self) -> None:
        self._cancelled.set()

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    def _fail(self, message: str) -> None:
        self.error = message
        self.done.set()


@dataclass
class _Slot:
    """A KV-cache sequence slot and, while busy, the request decoding in it."""

    index: int
    cached: list[int] = field(default_factory=list)  # tokens whose K/V are in this slot
    request: Request | EmbeddingRequest | None = None
    tokens: list[int] = field(default_factory=list)  # prompt + generated so far
    generated: int = 0
    sampler: Sampler | None = None
    decoder: StreamDecoder | None = None
    stopper: StopMatcher | None = None
    started: float = 0.0
    first_token_at: float = 0.0


class Engine:
    def __init__(self, model: Model, tokenizer: Tokenizer, n_parallel: int = 1):
        if model.native.n_seq < n_parallel:
            raise QpackError(
                f"the model was loaded with {model.native.n_seq} sequence slots, not {n_parallel}"
            )
        self.model = model
        self.tokenizer = tokenizer
        self.slots = [_Slot(i) for i in range(n_parallel)]
        self._incoming: queue.Queue[Request | EmbeddingRequest | None] = queue.Queue()
        self._waiting: list[Request | EmbeddingRequest] = []
        self.stop_ids = set(tokenizer.stop_ids)
        self.stats = {"requests": 0, "prompt_tokens": 0, "generated_tokens": 0, "steps": 0}

    @property
    def n_ctx(self) -> int:
        return self.model.n_ctx

    # ------------------------------------------------------------------ API (any thread)

    def submit(self, prompt: list[int], params: SamplingParams, constraint=None) -> Request:
        """Queue a generation. Raises ContextOverflow when the prompt leaves no room."""
        if not prompt:
            raise QpackError("the prompt is empty")
        if len(prompt) >= self.n_ctx:
            raise ContextOverflow(
                f"the prompt has {len(prompt)} tokens but the context holds {self.n_ctx}; "
                f"shorten it or raise --ctx-size"
            )
        req = Request(prompt, params, constraint)
        self._incoming.put(req)
        return req

    def submit_embedding(self, inputs: list[list[int]]) -> EmbeddingRequest:
        """Queue embeddings of token lists: they wait for a slot like generations do and are
        computed a chunk per step, so a long input does not pause the running streams."""
        for tokens in inputs:
            if not tokens:
                raise QpackError("cannot embed an empty input")
            if len(tokens) > self.n_ctx:
                raise ContextOverflow(
                    f"the input has {len(tokens)} tokens but the context holds {self.n_ctx}"
                )
        req = EmbeddingRequest(inputs)
        self._incoming.put(req)
        return req

    # ------------------------------------------------------------------ the loop (one thread)

    def serve_forever(self) -> None:
        """The engine thread: block for work when idle, else step until idle."""
        while True:
            if not self._busy():
                item = self._incoming.get()
                if item is None:
                    return
                self._accept(item)
            self._drain_incoming()
            try:
                self.step()
            except Exception as e:  # never leave a client waiting on a dead engine
                self._fail_all(f"internal error: {e}")

    def _fail_all(self, message: str) -> None:
        for s in self.slots:
            if s.request is not None:
                req, s.request = s.request, None
                s.cached = []
                _end(req, Event(finish_reason="error", error=message))
        for req in self._waiting:
            _end(req, Event(finish_reason="error", error=message))
        self._waiting = []

    def shutdown(self) -> None:
        self._incoming.put(None)

    def run_until_done(self, req: Request) -> None:
        """Pump steps on the calling thread until req finishes (CLI use, no engine thread)."""
        while not req.done.is_set():
            self.pump()

    def pump(self) -> None:
        """One step on the calling thread, after taking in what was submitted."""
        self._drain_incoming()
        self.step()

    def _drain_incoming(self) -> None:
        while True:
            try:
                item = self._incoming.get_nowait()
            except queue.Empty:
                return
            if item is None:
                self._incoming.put(None)  # keep the shutdown for serve_forever
                return
            self._accept(item)

    def _accept(self, item: Request | EmbeddingRequest) -> None:
        self._waiting.append(item)

    def _busy(self) -> bool:
        return bool(self._waiting) or any(s.request is not None for s in self.slots)

    def _free_slot_for(self, prompt: list[int]) -> _Slot | None:
        """The free slot whose cache shares the longest prefix with prompt."""
        free = [s for s in self.slots if s.request is None]
        if not free:
            return None
        return max(free, key=lambda s: common_prefix(s.cached, prompt))

    def _start(self, req: Request | EmbeddingRequest, slot: _Slot) -> None:
        if isinstance(req, EmbeddingRequest):
            slot.cached = []  # its cache is about to be overwritten
            slot.request = req
            return
        try:
            sampler = Sampler(req.params, self.model.n_vocab)
        except QpackError as e:  # e.g. a logit_bias id outside the vocabulary: only it fails
            req._emit(Event(finish_reason="error", error=str(e)))
            return
        reuse = min(common_prefix(slot.cached, req.prompt), len(req.prompt) - 1)
        slot.cached = slot.cached[:reuse]
        slot.request = req
        slot.tokens = list(req.prompt)
        slot.generated = 0
        slot.sampler = sampler
        slot.decoder = StreamDecoder(self.tokenizer)
        slot.stopper = StopMatcher(req.params.stop)
        slot.started = time.perf_counter()
        slot.first_token_at = 0.0
        req.usage.cached_tokens = reuse
        self.stats["requests"] += 1

    def step(self) -> None:
        """One batch through the model: decode tokens first, then prompt chunks."""
        for slot in self.slots:  # cancelled requests leave before any work is spent on them
            if slot.request is not None and slot.request.cancelled:
                if isinstance(slot.request, EmbeddingRequest):
                    _end(slot.request, Event(finish_reason="cancelled"))
                    slot.request = None
                else:
                    self._finish(slot, "cancelled")
        still_waiting = []
        for req in self._waiting:
            if req.cancelled:
                _end(req, Event(finish_reason="cancelled"))
                continue
            slot = self._free_slot_for(req.prompt if isinstance(req, Request) else [])
            if slot is None:
                still_waiting.append(req)
            else:
                self._start(req, slot)
        self._waiting = still_waiting

        budget = self.model.n_batch
        tokens: list[int] = []
        positions: list[int] = []
        slots_idx: list[int] = []
        out_rows: list[int] = []
        out_slots: list[_Slot] = []
        busy = [s for s in self.slots if isinstance(s.request, Request)]
        embedding = [s for s in self.slots if isinstance(s.request, EmbeddingRequest)]
        decoding = [s for s in busy if len(s.cached) == len(s.tokens) - 1]
        prefilling = [s for s in busy if len(s.cached) < len(s.tokens) - 1]
        for s in decoding:
            tokens.append(s.tokens[-1])
            positions.append(len(s.cached))
            slots_idx.append(s.index)
            out_rows.append(len(tokens) - 1)
            out_slots.append(s)
        budget -= len(decoding)
        if decoding:
            # While others are generating, feed prompts in small chunks: a long prompt must not
            # pause every running stream for the seconds its whole prefill takes.
            budget = min(budget, PREFILL_CHUNK_WHILE_DECODING)
        fed: dict[int, int] = {}
        for s in prefilling:
            if budget <= 0:
                break
            start = len(s.cached)
            chunk = s.tokens[start : start + budget]
            tokens.extend(chunk)
            positions.extend(range(start, start + len(chunk)))
            slots_idx.extend([s.index] * len(chunk))
            fed[s.index] = len(chunk)
            budget -= len(chunk)
            if start + len(chunk) == len(s.tokens):
                out_rows.append(len(tokens) - 1)
                out_slots.append(s)
        for s in embedding:  # one chunk each, as a prompt chunk would be
            self._embed_chunk(s, min(self.model.n_batch, max(budget, PREFILL_CHUNK_WHILE_DECODING)))
        if not tokens:
            return
        logits = self.model.forward(tokens, positions, slots_idx, out_rows)
        self.stats["steps"] += 1
        for s in decoding:
            s.cached.append(s.tokens[-1])
        for s in prefilling:
            n = fed.get(s.index, 0)
            s.cached.extend(s.tokens[len(s.cached) : len(s.cached) + n])
            self.stats["prompt_tokens"] += n
        for row, s in zip(logits, out_slots, strict=True):
            self._advance(s, row)

    def _embed_chunk(self, s: _Slot, budget: int) -> None:
        req = s.request
        tokens = req.inputs[len(req.vectors)]
        start = req._at
        chunk = tokens[start : start + budget]
        n = len(chunk)
        h = self.model.forward(chunk, np.arange(start, start + n), np.full(n, s.index),
                               np.arange(n), hidden=True)  # fmt: skip
        if req._sum is None:
            req._sum = np.zeros(self.model.native.n_embd, np.float64)
        req._sum += h.sum(axis=0, dtype=np.float64)
        req._at += n
        self.stats["prompt_tokens"] += n
        if req._at < len(tokens):
            return
        v = req._sum / len(tokens)
        norm = np.linalg.norm(v)
        req.vectors.append((v / norm if norm > 0 else v).astype(np.float32))
        req._at, req._sum = 0, None
        if len(req.vectors) == len(req.inputs):
            s.request = None
            req.done.set()

    def _advance(self, s: _Slot, logits: np.ndarray) -> None:
        req = s.request
        now = time.perf_counter()
        if s.generated == 0:
            s.first_token_at = now
            req.usage.prompt_seconds = now - s.started
        if req.constraint is not None:
            logits = req.constraint.mask(logits)
        tok = s.sampler.sample(logits, s.tokens)
        if req.constraint is not None:
            req.constraint.advance(tok.id)
        s.generated += 1
        req.usage.completion_tokens = s.generated
        req.usage.generation_seconds = now - s.first_token_at
        self.stats["generated_tokens"] += 1
        params = req.params
        if tok.id in self.stop_ids:
            self._finish(s, "stop", tok)
            return
        s.tokens.append(tok.id)
        text, stopped = s.stopper.feed(s.decoder.feed(tok.id))
        if stopped:
            self._finish(s, "stop", None, text)
            return
        if params.max_tokens is not None and s.generated >= params.max_tokens:
            self._finish(s, "length", tok, text)
        elif len(s.tokens) >= self.n_ctx:
            self._finish(s, "length", tok, text)
        else:
            req._emit(Event(text=text, token=tok.id, logprob=tok.logprob, top_logprobs=tok.top))

    def _finish(self, s: _Slot, reason: str, tok=None, text: str = "") -> None:
        """Flush held-back text, send the final event, free the slot (its cache stays for reuse)."""
        req = s.request
        if reason != "cancelled" and s.stopper is not None:
            if reason == "length" or (reason == "stop" and tok is not None):
                tail, _ = s.stopper.feed(s.decoder.flush())
                text += tail + s.stopper.flush()
        ev = Event(text=text, finish_reason=reason)
        if tok is not None and tok.id not in self.stop_ids:
            ev.token, ev.logprob, ev.top_logprobs = tok.id, tok.logprob, tok.top
        req.usage.generation_seconds = time.perf_counter() - (s.first_token_at or s.started)
        s.request = None
        s.sampler = s.decoder = s.stopper = None
        req._emit(ev)


def _end(req: Request | EmbeddingRequest, ev: Event) -> None:
    """Tell a request that it ended without finishing (an error or a cancellation)."""
    if isinstance(req, EmbeddingRequest):
        req._fail(ev.error or ev.finish_reason)
    else:
        req._emit(ev)


def common_prefix(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    if n == 0:
        return 0
    x = np.asarray(a[:n]) != np.asarray(b[:n])
    return int(np.argmax(x)) if x.any() else n
