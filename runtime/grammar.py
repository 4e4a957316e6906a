"""Constrained decoding: only tokens that keep the output inside a grammar may be drawn.

The engine is llguidance (the Rust library llama.cpp can use): JSON Schema and Lark grammars
compiled against the model's own vocabulary, the allowed-token mask computed lazily per step
(tens of microseconds, measured by bench/constrained.py). qpack hands it its vocabulary as
bytes; control tokens are marked with a leading 0xFF, as llguidance's llama.cpp adapter does,
so that no grammar literal can produce them by accident.

A schema keyword that llguidance cannot enforce is refused (SchemaError names it) instead of
being ignored: an answer that silently breaks its schema is the worst outcome.
"""

from __future__ import annotations

import copy
import json
import re
import threading
import weakref
from typing import Any

import llguidance
import numpy as np

from .errors import QpackError
from .tokenizer import Tokenizer


class SchemaError(QpackError):
    """A JSON schema (or grammar) that cannot be enforced; `keyword` names the culprit."""

    def __init__(self, message: str, keyword: str | None = None):
        self.keyword = keyword
        super().__init__(message)


_vocabularies: weakref.WeakKeyDictionary[Tokenizer, llguidance.LLTokenizer] = (
    weakref.WeakKeyDictionary()
)
_vocabulary_lock = threading.Lock()


class _Vocabulary:
    """What llguidance's TokenizerWrapper reads: every token's bytes, EOS/BOS, and a way to
    tokenize text (used for grammar literals it wants to fast-forward)."""

    def __init__(self, tokenizer: Tokenizer, n_vocab: int):
        self._tokenizer = continuation_encoder(tokenizer)
        self.eos_token_id = tokenizer.eos_id
        self.bos_token_id = tokenizer.bos_id
        tokens = []
        special = []
        for i in range(tokenizer.vocab_size):
            piece = tokenizer.token_bytes(i)
            if tokenizer.is_special(i):
                special.append(i)
                piece = b"\xff" + piece
            tokens.append(piece)
        tokens += [b""] * (n_vocab - len(tokens))  # output rows beyond the vocabulary: never
        self.tokens = tokens
        self.special_token_ids = special

    def __call__(self, text: str) -> list[int]:
        if not isinstance(text, str):
            raise TypeError("text only")  # llguidance then hands us str, not bytes
        return self._tokenizer.encode(text, add_bos=False, add_eos=False, parse_special=False)


def continuation_encoder(tokenizer: Tokenizer) -> Tokenizer:
    """The tokenizer for text that continues an output: SentencePiece's space prefix (which
    `encode` puts in front of a whole text) would be a byte the output does not have."""
    if not tokenizer.add_space_prefix:
        return tokenizer
    plain = copy.copy(tokenizer)  # shares the vocabulary and its caches
    plain.add_space_prefix = False
    return plain


def _consume_text(tokenizer: Tokenizer, constraint: GrammarConstraint, data: bytes) -> None:
    """Feed text that arrived inside an earlier token (after a trigger) to the grammar."""
    text = data.decode("utf-8", "replace")
    ids = continuation_encoder(tokenizer).encode(text, add_bos=False, add_eos=False)
    constraint.matcher.consume_tokens(ids)


def vocabulary(tokenizer: Tokenizer, n_vocab: int | None = None) -> llguidance.LLTokenizer:
    """llguidance's view of the vocabulary, built once per tokenizer (about 1 s for Gemma 3's
    262k tokens) and shared by every request."""
    with _vocabulary_lock:
        found = _vocabularies.get(tokenizer)
        if found is None:
            n = max(n_vocab or 0, tokenizer.vocab_size)
            wrapper = llguidance.TokenizerWrapper(_Vocabulary(tokenizer, n))
            stop = sorted(tokenizer.stop_ids) or [tokenizer.eos_id]
            found = llguidance.LLTokenizer(wrapper, n_vocab=n, eos_token=stop)
            _vocabularies[tokenizer] = found
        return found


# --- grammars -------------------------------------------------------------------------------

_UNIMPLEMENTED = re.compile(r"Unimplemented keys: \[(.*?)\]")
_UNKNOWN_FORMAT = re.compile(r"Unknown format: (\S+)")
_NOT_SUPPORTED = re.compile(r"(\$?\w+) constraints are not supported")


def _refusal(message: str) -> SchemaError:
    """llguidance's complaint as a SchemaError naming the keyword where it names one."""
    found = _UNIMPLEMENTED.search(message)
    if found:
        keys = [k.strip().strip('"') for k in found.group(1).split(",") if k.strip()]
        return SchemaError(
            f"JSON schema keyword {', '.join(repr(k) for k in keys)} is not supported by the "
            "constrained decoder; remove it",
            keyword=keys[0] if keys else None,
        )
    found = _UNKNOWN_FORMAT.search(message)
    if found:
        return SchemaError(
            f"JSON schema 'format': {found.group(1)!r} is not supported by the constrained "
            "decoder; remove it",
            keyword="format",
        )
    found = _NOT_SUPPORTED.search(message)
    if found:
        return SchemaError(
            f"JSON schema keyword {found.group(1)!r} is not supported by the constrained "
            "decoder; remove it",
            keyword=found.group(1),
        )
    if "Resource '" in message:  # a $ref outside the schema: nothing is fetched
        return SchemaError(
            "JSON schema '$ref' to a resource outside the schema is not supported; inline it",
            keyword="$ref",
        )
    if "regex" in message:
        first = message.strip().splitlines()
        return SchemaError(
            f"JSON schema 'pattern' cannot be enforced: {' '.join(first[-1:])}", keyword="pattern"
        )
    return SchemaError(f"the schema cannot be enforced: {message.strip().splitlines()[0]}")


def check(grammar: str) -> str:
    """The grammar, once llguidance agrees to enforce it; SchemaError otherwise."""
    is_error, messages = llguidance.LLMatcher.validate_grammar_with_warnings(grammar)
    if is_error:
        raise _refusal(messages[0] if messages else "invalid grammar")
    return grammar


# Whitespace between JSON tokens: compact or indented, as models write it, but bounded (one
# space, or one or two newlines and an indent of at most 20), so that a model stuck on
# whitespace still has to write the value: llama.cpp's json-schema-to-grammar SPACE rule.
WHITESPACE = r"( |\n{1,2}[ \t]{0,20})"


def json_schema(schema: dict[str, Any]) -> str:
    """A grammar for one JSON value valid against `schema`."""
    if not isinstance(schema, dict):
        raise SchemaError("a JSON schema must be an object")
    try:
        grammar = llguidance.LLMatcher.grammar_from_json_schema(
            json.dumps(schema),
            defaults={"whitespace_flexible": True, "whitespace_pattern": WHITESPACE},
        )
    except ValueError as e:
        raise SchemaError(f"the schema is not valid JSON: {e}") from None
    return check(grammar)


def lark(source: str) -> str:
    """A grammar from Lark text (may embed `%json {schema}` items)."""
    return check(llguidance.LLMatcher.grammar_from_lark(source))


def lark_literal(tokenizer: Tokenizer, text: str) -> str:
    """`text` as a Lark item: the special token itself if the vocabulary has `text` as one
    control token (which plain bytes could never produce), else a quoted string."""
    token = tokenizer.token_to_id(text)
    if token is not None and tokenizer.is_special(token):
        return f"<[{token}]>"
    return json.dumps(text)


# --- the mask -------------------------------------------------------------------------------


class GrammarConstraint:
    """Masks logits so that the output stays in the grammar; one per request. Once the
    grammar is complete only an end-of-generation token is allowed."""

    def __init__(self, tokenizer: Tokenizer, grammar: str, n_vocab: int):
        self.n_vocab = n_vocab
        self.stop_ids = np.array(sorted(tokenizer.stop_ids), dtype=np.intp)
        self.matcher = llguidance.LLMatcher(vocabulary(tokenizer, n_vocab), grammar)
        if self.matcher.is_error():
            raise _refusal(self.matcher.get_error())
        self._bits = np.zeros((n_vocab + 31) // 32, dtype=np.int32)

    def allowed(self) -> np.ndarray:
        """Boolean mask over the vocabulary of the tokens allowed next."""
        self.matcher.unsafe_compute_mask_ptr(self._bits.ctypes.data, self._bits.nbytes)
        bits = np.unpackbits(self._bits.view(np.uint8), bitorder="little")
        return bits[: self.n_vocab].view(bool)

    def mask(self, logits: np.ndarray) -> np.ndarray:
        """A copy of logits with every disallowed token at -inf."""
        n = min(len(logits), self.n_vocab)
        out = np.full(logits.shape, -np.inf, dtype=np.float32)
        allowed = self.allowed()[:n]
        if not allowed.any():  # the matcher failed (a limit hit): end rather than write garbage
            allowed = np.zeros(n, dtype=bool)
            allowed[self.stop_ids[self.stop_ids < n]] = True
        out[:n][allowed] = logits[:n][allowed]
        return out

    def advance(self, token: int) -> None:
        """Take the drawn token (always an allowed one) into the matcher's state."""
        if not self.matcher.is_stopped():
            self.matcher.consume_token(token)

    @property
    def error(self) -> str | None:
        return self.matcher.get_error() if self.matcher.is_error() else None


class TriggeredConstraint:
    """No constraint until the output holds `trigger`, then `grammar` over the text after it
    (or from it, `include_trigger`): a model in tool_choice `auto` may answer in prose, but once
    it opens a call the call must be well-formed. `at_start`: only a trigger that begins the
    answer (after whitespace) counts."""

    def __init__(self, tokenizer: Tokenizer, grammar: str, n_vocab: int, trigger: str,
                 include_trigger: bool = False, at_start: bool = False):  # fmt: skip
        self.tokenizer = tokenizer
        self.grammar = grammar
        self.n_vocab = n_vocab
        self.trigger = trigger.encode()
        self.include_trigger = include_trigger
        self.at_start = at_start
        self._seen = b""
        self.inner: GrammarConstraint | None = None
        self._off = False  # the answer began with something else (at_start)
        vocabulary(tokenizer, n_vocab)  # built now, not in the engine thread's first step

    def mask(self, logits: np.ndarray) -> np.ndarray:
        return logits if self.inner is None else self.inner.mask(logits)

    def advance(self, token: int) -> None:
        if self.inner is not None:
            self.inner.advance(token)
            return
        if self._off or token in self.tokenizer.stop_ids:
            return
        self._seen += self.tokenizer.token_bytes(token)
        if self.at_start:
            head = self._seen.lstrip()
            if not head or (len(head) < len(self.trigger) and self.trigger.startswith(head)):
                return  # could still become the trigger
            if not head.startswith(self.trigger):
                self._off = True
                return
            at = len(self._seen) - len(head)
        else:
            at = self._seen.find(self.trigger)
            if at < 0:
                return
        self.inner = GrammarConstraint(self.tokenizer, self.grammar, self.n_vocab)
        rest = self._seen[at if self.include_trigger else at + len(self.trigger) :]
        if rest:  # the trigger's token carried more text: the grammar starts with it
            _consume_text(self.tokenizer, self.inner, rest)


class ThinkingFirst:
    """A thinking model may first reason in `<think>...</think>` (free text), then the grammar
    holds for the answer. `opened`: the prompt already opened the block. Without a single
    `<think>` token in the vocabulary the grammar holds from the first token."""

    def __init__(self, tokenizer: Tokenizer, grammar: str, n_vocab: int, opened: bool = False,
                 open_text: str = "<think>", close_text: str = "</think>"):  # fmt: skip
        self.tokenizer = tokenizer
        self.answer = GrammarConstraint(tokenizer, grammar, n_vocab)
        self.open_id = tokenizer.token_to_id(open_text)
        self.close = close_text.encode()
        self.state = "thinking" if opened else ("start" if self.open_id is not None else "answer")
        self._seen = b""

    def mask(self, logits: np.ndarray) -> np.ndarray:
        if self.state == "thinking":
            return logits
        out = self.answer.mask(logits)
        if self.state == "start":
            out[self.open_id] = logits[self.open_id]
        return out

    def advance(self, token: int) -> None:
        if self.state == "start":
            if token == self.open_id:
                self.state = "thinking"
                return
            self.state = "answer"
        if self.state == "answer":
            self.answer.advance(token)
            return
        self._seen += self.tokenizer.token_bytes(token)
        at = self._seen.find(self.close)
        if at >= 0:
            self.state = "answer"
            rest = self._seen[at + len(self.close) :].lstrip()
            if rest:
                _consume_text(self.tokenizer, self.answer, rest)

    @property
    def error(self) -> str | None:
        return self.answer.error
