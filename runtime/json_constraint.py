"""JSON mode by constrained decoding: at each step only tokens that keep the output a prefix of
one JSON object may be drawn, and once the object is closed only an end-of-turn token.

`JsonPrefix` is an incremental byte-level JSON recognizer (a pushdown automaton: a stack of open
containers and a lexical mode). `JsonConstraint` masks a row of logits with it: candidates are
tried most likely first and the search stops after enough valid ones, so a step costs a few
hundred byte transitions, not one pass over the vocabulary.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

from .tokenizer import Tokenizer

_WS = frozenset(b" \t\n\r")
_DIGITS = frozenset(b"0123456789")
_HEX = frozenset(b"0123456789abcdefABCDEF")
_ESCAPES = frozenset(b'"\\/bfnrtu')
MAX_WHITESPACE_RUN = 24  # a model stuck emitting newlines must still produce JSON

# Lexical modes.
(
    START,
    VALUE,
    ARRAY_FIRST,
    KEY_OR_END,
    KEY,
    COLON,
    AFTER,
    STRING,
    ESCAPE,
    UNICODE,
    NUMBER,
    LITERAL,
    DONE,
) = range(13)
# Number sub-states: where the number is, and whether it could end here.
N_MINUS, N_ZERO, N_INT, N_DOT, N_FRAC, N_E, N_ESIGN, N_EXP = range(8)
_NUMBER_CAN_END = {N_ZERO, N_INT, N_FRAC, N_EXP}


class JsonPrefix:
    """Bytes fed so far are a prefix of `{...}` followed by whitespace."""

    __slots__ = ("stack", "mode", "sub", "literal", "is_key", "ws_run")

    def __init__(self) -> None:
        self.stack: list[int] = []  # b"{" or b"[" of each open container
        self.mode = START
        self.sub = 0  # NUMBER: its sub-state; UNICODE: hex digits still due
        self.literal = b""  # LITERAL: the bytes of true/false/null still due
        self.is_key = False  # STRING: an object key (a colon follows) or a value
        self.ws_run = 0

    def copy(self) -> JsonPrefix:
        c = JsonPrefix.__new__(JsonPrefix)
        c.stack = self.stack.copy()
        c.mode, c.sub, c.literal, c.is_key, c.ws_run = (
            self.mode,
            self.sub,
            self.literal,
            self.is_key,
            self.ws_run,
        )
        return c

    @property
    def complete(self) -> bool:
        return self.mode == DONE

    def feed(self, data: Iterable[int]) -> bool:
        """Advance over the bytes; False (state then undefined) as soon as one is invalid."""
        for b in data:
            if not self._byte(b):
                return False
        return True

    def _end_value(self) -> None:
        self.mode = AFTER if self.stack else DONE

    def _byte(self, b: int) -> bool:
        mode = self.mode
        if mode == STRING:
            if b == 0x22:  # "
                if self.is_key:
                    self.mode = COLON
                else:
                    self._end_value()
            elif b == 0x5C:  # backslash
                self.mode = ESCAPE
            elif b < 0x20:  # control characters must be escaped
                return False
            return True
        if mode == ESCAPE:
            if b not in _ESCAPES:
                return False
            if b == 0x75:  # \uXXXX
                self.mode, self.sub = UNICODE, 4
            else:
                self.mode = STRING
            return True
        if mode == UNICODE:
            if b not in _HEX:
                return False
            self.sub -= 1
            if self.sub == 0:
                self.mode = STRING
            return True
        if mode == LITERAL:
            if b != self.literal[0]:
                return False
            self.literal = self.literal[1:]
            if not self.literal:
                self._end_value()
            return True
        if mode == NUMBER:
            if self._number_byte(b):
                return True
            if self.sub not in _NUMBER_CAN_END:
                return False
            self._end_value()  # the byte after a number belongs to what follows it
            return self._byte(b)
        if b in _WS:
            self.ws_run += 1
            return self.ws_run <= MAX_WHITESPACE_RUN
        self.ws_run = 0
        if mode == DONE:
            return False
        if mode == START:
            if b != 0x7B:  # the answer is one object
                return False
            self.stack.append(0x7B)
            self.mode = KEY_OR_END
            return True
        if mode == KEY_OR_END or mode == KEY:
            if b == 0x22:
                self.mode, self.is_key = STRING, True
                return True
            if b == 0x7D and mode == KEY_OR_END:  # {}
                self.stack.pop()
                self._end_value()
                return True
            return False
        if mode == COLON:
            if b != 0x3A:
                return False
            self.mode = VALUE
            return True
        if mode == AFTER:
            top = self.stack[-1]
            if b == 0x2C:  # ,
                self.mode = KEY if top == 0x7B else VALUE
                return True
            if (b == 0x7D and top == 0x7B) or (b == 0x5D and top == 0x5B):
                self.stack.pop()
                self._end_value()
                return True
            return False
        # VALUE or ARRAY_FIRST: a value starts here.
        if b == 0x5D and mode == ARRAY_FIRST:  # []
            self.stack.pop()
            self._end_value()
            return True
        if b == 0x7B:
            self.stack.append(0x7B)
            self.mode = KEY_OR_END
        elif b == 0x5B:
            self.stack.append(0x5B)
            self.mode = ARRAY_FIRST
        elif b == 0x22:
            self.mode, self.is_key = STRING, False
        elif b == 0x2D:
            self.mode, self.sub = NUMBER, N_MINUS
        elif b in _DIGITS:
            self.mode, self.sub = NUMBER, (N_ZERO if b == 0x30 else N_INT)
        elif b in (0x74, 0x66, 0x6E):  # t f n
            self.mode = LITERAL
            self.literal = {0x74: b"rue", 0x66: b"alse", 0x6E: b"ull"}[b]
        else:
            return False
        if len(self.stack) > 64:  # nesting no answer needs
            return False
        return True

    def _number_byte(self, b: int) -> bool:
        s = self.sub
        digit = b in _DIGITS
        if s == N_MINUS:
            if not digit:
                return False
            self.sub = N_ZERO if b == 0x30 else N_INT
        elif s in (N_ZERO, N_INT):
            if digit and s == N_INT:
                pass
            elif b == 0x2E:
                self.sub = N_DOT
            elif b in (0x65, 0x45):
                self.sub = N_E
            else:
                return False
        elif s in (N_DOT, N_FRAC):
            if digit:
                self.sub = N_FRAC
            elif s == N_FRAC and b in (0x65, 0x45):
                self.sub = N_E
            else:
                return False
        elif s in (N_E, N_ESIGN):
            if digit:
                self.sub = N_EXP
            elif s == N_E and b in (0x2B, 0x2D):
                self.sub = N_ESIGN
            else:
                return False
        else:  # N_EXP
            if not digit:
                return False
        return True


class JsonConstraint:
    """Masks logits so that the answer is one JSON object; one per request."""

    CANDIDATES = 256  # tried first, most likely first; the rest only if none of these fits

    def __init__(self, tokenizer: Tokenizer, keep: int = 40):
        self.tokenizer = tokenizer
        self.state = JsonPrefix()
        self.keep = max(1, keep)  # valid candidates to find before sampling among them
        self.stop_ids = np.array(sorted(tokenizer.stop_ids), dtype=np.intp)

    def _bytes(self, token: int) -> bytes | None:
        tok = self.tokenizer
        if tok.is_special(token):
            return None
        return tok.token_bytes(token) or None

    def mask(self, logits: np.ndarray) -> np.ndarray:
        """A copy of logits with every token that would break the JSON set to -inf."""
        out = np.full(logits.shape, -np.inf, dtype=np.float32)
        if self.state.complete:
            allowed = self.stop_ids
        else:
            allowed = self._search(logits)
            if not len(allowed):  # nothing fits (cannot happen mid-JSON): end, and say so later
                allowed = self.stop_ids
        out[allowed] = logits[allowed]
        return out

    def _search(self, logits: np.ndarray) -> np.ndarray:
        found: list[int] = []
        n = logits.shape[0]
        k = min(self.CANDIDATES, n)
        first = np.argpartition(-logits, k - 1)[:k] if k < n else np.arange(n)
        first = first[np.argsort(-logits[first], kind="stable")]
        for batch in (first, None):
            if batch is None:  # none of the likely ones fits: go through the rest
                rest = np.setdiff1d(np.arange(n), first, assume_unique=True)
                batch = rest[np.argsort(-logits[rest], kind="stable")]
            for token in batch.tolist():
                data = self._bytes(token)
                if data is not None and self.state.copy().feed(data):
                    found.append(token)
                    if len(found) >= self.keep:
                        return np.array(found, dtype=np.intp)
            if found:
                break
        return np.array(found, dtype=np.intp)

    def advance(self, token: int) -> None:
        """Take the drawn token into the state (a stop token ends the answer)."""
        data = self._bytes(token)
        if data is not None:
            self.state.feed(data)
