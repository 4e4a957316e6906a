"""Tokenizers built from GGUF metadata, token-exact with llama.cpp (llama-vocab.cpp).

Two families, chosen by `tokenizer.ggml.model`:
- `gpt2`: byte-level BPE. The text is split by the pre-tokenizer regexes named by
  `tokenizer.ggml.pre` (applied one after another, each splitting the pieces of the last),
  each piece is mapped byte -> printable character (GPT-2's table) and merged by merge rank.
- `llama`: SentencePiece-style BPE (Gemma). Spaces become U+2581, the whole fragment is
  merged pairwise by token score, and characters missing from the vocabulary fall back to
  `<0xXX>` byte tokens.

Before either runs, special tokens are cut out of the text as whole pieces, longest first,
as llama.cpp does: user-defined tokens always, control tokens only with `parse_special=True`
(so a user typing "<|im_start|>" gets plain text, while a rendered chat template gets the
control token).

Construction only checks the metadata; the text -> id index (262k strings for Gemma 3) is
built on first use, so code that only inspects a model never pays for it.
"""

from __future__ import annotations

import codecs
import heapq
from collections.abc import Callable, Iterable, Mapping, Sequence
from functools import cached_property
from typing import Any

import numpy as np
import regex
from qpack.runtime.errors import QpackError, UnsupportedModel

# tokenizer.ggml.token_type values (llama.cpp's llama_token_type).
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6

# Tokens that llama.cpp recognises by their text (llama-vocab.cpp, load()): all become
# control tokens, even when a converter stored them as normal or user-defined.
END_OF_GENERATION_TEXTS = frozenset(
    {
        "<|eot_id|>", "<|im_end|>", "<|end|>", "<|return|>", "<|call|>", "<|flush|>",
        "<|calls|>", "<end_of_turn>", "<|endoftext|>", "</s>", "<|eom_id|>", "<EOT>", "_<EOT>",
        "[EOT]", "[EOS]", "<|end_of_text|>", "<end_of_utterance>", "<eos>", "<turn|>",
        "<|tool_response>", "<\uff5cend\u2581of\u2581sentence\uff5c>", "[e~[",
    }
)  # fmt: skip
# Fill-in-the-middle tokens: pad, repo and file-separator ones also end generation.
FIM_STOP_TEXTS = frozenset(
    {
        "<|fim_pad|>", "<fim-pad>", "<fim_pad>", "<PAD>", "[PAD]", "<|fim_repo|>",
        "<|repo_name|>", "<fim-repo>", "<REPO>", "<reponame>", "<|file_sep|>",
    }
)  # fmt: skip
FIM_OTHER_TEXTS = frozenset(
    {
        "<|fim_prefix|>", "<fim-prefix>", "<fim_prefix>", "<\uff5cfim\u2581begin\uff5c>",
        "<PRE>", "\u2581<PRE>", "<|code_prefix|>", "<|prefix|>", "<|fim_suffix|>",
        "<fim-suffix>", "<fim_suffix>", "<\uff5cfim\u2581hole\uff5c>", "<SUF>", "\u2581<SUF>",
        "<|code_suffix|>", "<|suffix|>", "<|fim_middle|>", "<fim-middle>", "<fim_middle>",
        "<\uff5cfim\u2581end\uff5c>", "<MID>", "\u2581<MID>", "<|code_middle|>", "<|middle|>",
    }
)  # fmt: skip

# --- pre-tokenizers (llama-vocab.cpp, llm_tokenizer_bpe) -----------------------------------
# llama.cpp's whitespace is Unicode White_Space (its unicode-data tables); Python's `\s`
# differs (it matches \x1c-\x1f), so patterns spell it out.
_WS = r"\p{White_Space}"
_NOT_WS = r"\P{White_Space}"


def _pattern(text: str) -> regex.Pattern:
    return regex.compile(text.replace(r"\S", _NOT_WS).replace(r"\s", _WS))


_GPT2 = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
_LLAMA3 = (
    r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+"
    r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2 = (
    r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+"
    r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)


class PreTokenizer:
    """One llama.cpp pre-tokenizer type: its regexes and the flags that go with it."""

    def __init__(self, patterns: list[str], *, ignore_merges: bool = False, add_bos: bool = False):
        self.patterns = [_pattern(p) for p in patterns]
        self.ignore_merges = ignore_merges  # a piece that is itself a token is not merged
        self.add_bos = add_bos  # default when tokenizer.ggml.add_bos_token is absent

    def split(self, text: str) -> list[str]:
        """Each regex splits every piece of the previous one; text between matches is kept."""
        pieces = [text]
        for pattern in self.patterns:
            out: list[str] = []
            for piece in pieces:
                pos = 0
                for m in pattern.finditer(piece):
                    start, end = m.span()
                    if start > pos:
                        out.append(piece[pos:start])
                    if end > start:
                        out.append(piece[start:end])
                    pos = end
                if pos < len(piece):
                    out.append(piece[pos:])
            pieces = out
        return pieces


_PRE_GPT2 = ([_GPT2], {})
_PRE_DIGITS_GPT2 = ([r"\p{N}", _GPT2], {})
_PRE_LLAMA3 = ([_LLAMA3], {"ignore_merges": True, "add_bos": True})
_PRE_QWEN2 = ([_QWEN2], {})
_PRE_DEFAULT = ([r"[\p{P}\$\+<=>\^~\|]+", _GPT2, r"\p{N}+", r"[0-9][0-9][0-9]"], {})

# tokenizer.ggml.pre -> (regexes, flags); names grouped as llama.cpp groups them.
PRE_TOKENIZERS: dict[str, tuple[list[str], dict]] = {
    "default": _PRE_DEFAULT,
    **dict.fromkeys(["gpt-2", "phi-2", "mpt", "olmo", "jais", "trillion", "exaone4"], _PRE_GPT2),
    **dict.fromkeys(
        ["smollm", "starcoder", "refact", "command-r", "codeshell", "exaone", "minerva-7b"],
        _PRE_DIGITS_GPT2,
    ),
    **dict.fromkeys(
        ["llama-bpe", "llama3", "llama-v3", "falcon3", "falcon-h1", "pixtral"], _PRE_LLAMA3
    ),
    **dict.fromkeys(["dbrx", "smaug-bpe"], ([_LLAMA3], {})),
    **dict.fromkeys(["qwen2", "deepseek-r1-qwen", "stablelm2", "megrez", "hunyuan"], _PRE_QWEN2),
}


def _gpt2_byte_table() -> list[str]:
    """GPT-2's byte -> printable character map: printable Latin-1 bytes map to themselves,
    the other 68 bytes to U+0100 onwards, in byte order."""
    keep = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    table = [""] * 256
    extra = 0
    for b in range(256):
        if b in keep:
            table[b] = chr(b)
        else:
            table[b] = chr(0x100 + extra)
            extra += 1
    return table


_BYTE_TO_CHAR = _gpt2_byte_table()
_CHAR_TO_BYTE = {c: b for b, c in enumerate(_BYTE_TO_CHAR)}
# str.translate table: a Latin-1-decoded byte string -> GPT-2's printable characters.
_LATIN1_TO_GPT2 = {b: c for b, c in enumerate(_BYTE_TO_CHAR)}

_SPM_SPACE = "\u2581"  # ▁
_LONE_SURROGATE = regex.compile("[\ud800-\udfff]")


# --- metadata access -------------------------------------------------------------------------


def _get(md: Mapping[str, Any], key: str, kind: type | tuple, default: Any = None) -> Any:
    value = md.get(key, default)
    if value is default:
        return value
    # bool is an int subclass: an id stored as bool is as wrong as a flag stored as int.
    if kind is int and (isinstance(value, bool) or not isinstance(value, (int, np.integer))):
        raise _bad(key, f"expected an integer, got {type(value).__name__}")
    if kind is bool and isinstance(value, np.bool_):
        return bool(value)
    if kind is not int and not isinstance(value, kind):
        raise _bad(key, f"expected {getattr(kind, '__name__', kind)}, got {type(value).__name__}")
    return int(value) if kind is int else value


def _bad(key: str, problem: str) -> UnsupportedModel:
    return UnsupportedModel(
        f"tokenizer metadata {key}: {problem}; the model file is damaged or was written by an "
        "unsupported converter (re-convert it with a current llama.cpp convert_hf_to_gguf.py)"
    )


def _string_array(md: Mapping[str, Any], key: str, required: bool) -> Sequence[str] | None:
    value = md.get(key)
    if value is None:
        if required:
            raise _bad(key, "missing")
        return None
    if isinstance(value, (str, bytes, np.ndarray)) or not isinstance(value, Sequence):
        raise _bad(key, f"expected an array of strings, got {type(value).__name__}")
    if len(value) and not isinstance(value[0], str):
        raise _bad(key, f"expected an array of strings, got items of {type(value[0]).__name__}")
    return value


def _numeric_array(md: Mapping[str, Any], key: str, n_tokens: int, kind: str) -> np.ndarray | None:
    value = md.get(key)
    if value is None:
        return None
    if isinstance(value, (str, bytes)):
        raise _bad(key, "expected a numeric array, got a string")
    try:
        arr = np.asarray(value)
    except (TypeError, ValueError) as e:
        raise _bad(key, f"expected a numeric array ({e})") from None
    if arr.ndim != 1 or arr.dtype.kind not in kind:
        raise _bad(key, f"expected a 1-D numeric array, got {arr.dtype} with shape {arr.shape}")
    if len(arr) < n_tokens:
        raise _bad(key, f"has {len(arr)} entries for {n_tokens} tokens")
    return arr


def _checked_strings(items: list, key: str) -> list[str]:
    kinds = set(map(type, items))
    if kinds - {str}:
        bad = ", ".join(sorted(k.__name__ for k in kinds - {str}))
        raise _bad(key, f"expected an array of strings, found items of type {bad}")
    return items


def _to_list(seq: Sequence[str]) -> list[str]:
    tolist = getattr(seq, "tolist", None)  # the GGUF reader's StringArray decodes in one pass
    return tolist() if tolist is not None else list(seq)


# --- the tokenizer -----------------------------------------------------------------------


class Tokenizer:
    """Text <-> token ids for one model. Use `Tokenizer.from_metadata(md)` or `.from_gguf(f)`."""

    model = ""  # tokenizer.ggml.model

    def __init__(self, md: Mapping[str, Any]):
        tokens = _string_array(md, "tokenizer.ggml.tokens", required=True)
        n = len(tokens)
        if n == 0:
            raise _bad("tokenizer.ggml.tokens", "the vocabulary is empty")
        self._tokens_source = tokens
        self.vocab_size = n
        types = _numeric_array(md, "tokenizer.ggml.token_type", n, "iu")
        self._types = (
            np.full(n, NORMAL, dtype=np.int32) if types is None else types[:n].astype(np.int32)
        )

        def token_id(key: str, default: int | None = None) -> int | None:
            value = _get(md, key, int)
            if value is None:
                return default
            if not 0 <= value < n:
                raise _bad(key, f"token id {value} is outside the vocabulary (0..{n - 1})")
            return value

        self.bos_id = token_id("tokenizer.ggml.bos_token_id", self._default_bos)
        self.eos_id = token_id("tokenizer.ggml.eos_token_id", self._default_eos)
        self.eot_id = token_id("tokenizer.ggml.eot_token_id")
        self.eom_id = token_id("tokenizer.ggml.eom_token_id")
        self.unk_id = token_id("tokenizer.ggml.unknown_token_id", self._default_unk)
        self.add_bos = bool(_get(md, "tokenizer.ggml.add_bos_token", bool, self._default_add_bos))
        self.add_eos = bool(_get(md, "tokenizer.ggml.add_eos_token", bool, False))
        self.add_space_prefix = bool(
            _get(md, "tokenizer.ggml.add_space_prefix", bool, self._default_space_prefix)
        )
        if self.add_bos and self.bos_id is None:
            raise _bad("tokenizer.ggml.bos_token_id", "missing, but add_bos_token is true")
        if self.add_eos and self.eos_id is None:
            raise _bad("tokenizer.ggml.eos_token_id", "missing, but add_eos_token is true")
        self._piece_cache: dict[int, bytes] = {}

    # Defaults when the metadata lacks a key (llama.cpp's, per tokenizer family).
    _default_bos: int | None = None
    _default_eos: int | None = None
    _default_unk: int | None = None
    _default_add_bos = False
    _default_space_prefix = False

    @staticmethod
    def from_metadata(md: Mapping[str, Any]) -> Tokenizer:
        """The tokenizer that `tokenizer.ggml.model` names, built from a metadata mapping."""
        model = _get(md, "tokenizer.ggml.model", str)
        if model is None:
            raise _bad("tokenizer.ggml.model", "missing (the file has no tokenizer)")
        cls = _TOKENIZERS.get(model)
        if cls is None:
            raise UnsupportedModel(
                f"tokenizer metadata tokenizer.ggml.model: {model!r} is not supported "
                f"(qpack supports {', '.join(sorted(_TOKENIZERS))})"
            )
        return cls(md)

    @staticmethod
    def from_gguf(gguf_file: Any) -> Tokenizer:
        """From an opened GGUF file (`qpack.runtime.gguf.open_gguf`)."""
        try:
            return Tokenizer.from_metadata(gguf_file.metadata)
        except UnsupportedModel as e:
            raise UnsupportedModel(f"{getattr(gguf_file, 'path', '<gguf>')}: {e}") from None

    # --- the index, built on first use ---------------------------------------------------

    @cached_property
    def _tokens(self) -> list[str]:
        tokens = _checked_strings(_to_list(self._tokens_source), "tokenizer.ggml.tokens")
        # llama.cpp names empty tokens, so that none can collide in the index or be cut out
        # of every text as an empty special piece (str.split("") raises).
        for i in [i for i, t in enumerate(tokens) if not t]:
            tokens[i] = f"[EMPTY_{i}]"
        return tokens

    @cached_property
    def _token_to_id(self) -> dict[str, int]:
        tokens = self._tokens
        index = dict(zip(tokens, range(len(tokens)), strict=False))
        if len(index) != len(tokens):
            seen: set[str] = set()
            dup = next(t for t in tokens if t in seen or seen.add(t))
            raise _bad("tokenizer.ggml.tokens", f"duplicate token {dup!r}")
        return index

    def _ids_of(self, texts: Iterable[str]) -> set[int]:
        index = self._token_to_id
        return {index[t] for t in texts if t in index}

    @cached_property
    def _stop_id_set(self) -> frozenset[int]:
        ids = self._ids_of(END_OF_GENERATION_TEXTS | FIM_STOP_TEXTS)
        ids |= {i for i in (self.eos_id, self.eot_id, self.eom_id) if i is not None}
        texts = {self._tokens[i] for i in ids}
        # llama.cpp's workarounds: gpt-oss (<|return|> + <|call|>) and solar-open (<|calls|> +
        # <|flush|>) do not stop at <|end|>; Gemma 4 (<|tool_response>) not at </s>.
        if {"<|return|>", "<|call|>"} <= texts or {"<|calls|>", "<|flush|>"} <= texts:
            ids -= self._ids_of(["<|end|>"])
        if "<|tool_response>" in texts:
            ids -= self._ids_of(["</s>"])
        return frozenset(ids)

    @cached_property
    def _control_ids(self) -> frozenset[int]:
        """Control and unknown tokens (hidden when decoding, cut from text only with
        parse_special), plus the tokens llama.cpp makes control by their text."""
        types = self._types
        ids = set(np.flatnonzero((types == CONTROL) | (types == UNKNOWN)).tolist())
        ids |= self._ids_of(END_OF_GENERATION_TEXTS | FIM_STOP_TEXTS | FIM_OTHER_TEXTS)
        if "<|tool_response>" in self._token_to_id:  # Gemma 4: </s> is plain text there
            ids -= self._ids_of(["</s>"])
        return frozenset(ids)

    def _special_pieces(self, parse_special: bool) -> list[tuple[str, int]]:
        """Tokens cut out of the text as whole pieces, longest text first (llama.cpp's
        cache_special_tokens): user-defined ones always, control/unknown with parse_special."""
        key = "_pieces_all" if parse_special else "_pieces_user"
        pieces = self.__dict__.get(key)
        if pieces is None:
            user = np.flatnonzero(self._types == USER_DEFINED).tolist()
            control = self._control_ids
            chosen = [i for i in user if i not in control]
            if parse_special:
                chosen = sorted(set(user) | control)
            tokens = self._tokens
            pieces = sorted(
                ((tokens[i], i) for i in chosen if tokens[i]), key=lambda p: (-len(p[0]), p[1])
            )
            self.__dict__[key] = pieces
        return pieces

    def _special_groups(self, parse_special: bool) -> dict[str, list[tuple[str, int]]]:
        """The special pieces grouped by their first two characters: a text lacking a
        two-character prefix needs none of that group's (often thousands of) checks."""
        key = "_groups_all" if parse_special else "_groups_user"
        groups = self.__dict__.get(key)
        if groups is None:
            groups = {}
            for piece in self._special_pieces(parse_special):
                groups.setdefault(piece[0][:2], []).append(piece)
            self.__dict__[key] = groups
        return groups

    # --- public interface -------------------------------------------------------------------

    @property
    def stop_ids(self) -> frozenset[int]:
        """Tokens that end generation: EOS, EOT/EOM and end-of-turn tokens such as
        <|im_end|> or <end_of_turn>."""
        return self._stop_id_set

    eot_ids = stop_ids

    def is_special(self, token_id: int) -> bool:
        """True for control and unknown tokens: the ones `decode` leaves out."""
        return token_id in self._control_ids

    def token_text(self, token_id: int) -> str:
        """The token's string as stored in the vocabulary (▁/Ġ-escaped, not decoded)."""
        self._check_id(token_id)
        return self._tokens[token_id]

    def token_to_id(self, text: str) -> int | None:
        """The id of the token whose stored string is exactly `text`, or None."""
        return self._token_to_id.get(text)

    def encode(
        self,
        text: str,
        add_bos: bool | None = None,
        parse_special: bool = False,
        add_eos: bool | None = None,
    ) -> list[int]:
        """Token ids of `text`. `add_bos`/`add_eos` None follow the model's metadata;
        `parse_special` turns control-token text (chat-template output) into those tokens."""
        if not isinstance(text, str):
            raise TypeError(f"encode() takes str, not {type(text).__name__}")
        if not text.isascii():
            # JSON may carry lone surrogates, which have no UTF-8 form: each becomes U+FFFD.
            text = _LONE_SURROGATE.sub("\ufffd", text)
        ids: list[int] = []
        if self.add_bos if add_bos is None else add_bos:
            if self.bos_id is None:
                raise UnsupportedModel("this model has no BOS token (tokenizer.ggml.bos_token_id)")
            ids.append(self.bos_id)
        prev_special = True
        for fragment in self._partition(text, parse_special):
            if isinstance(fragment, int):
                ids.append(fragment)
                prev_special = True
            else:
                ids.extend(self._encode_fragment(fragment, prev_special))
                prev_special = False
        if self.add_eos if add_eos is None else add_eos:
            if self.eos_id is None:
                raise UnsupportedModel("this model has no EOS token (tokenizer.ggml.eos_token_id)")
            ids.append(self.eos_id)
        return ids

    def decode(self, ids: Iterable[int], skip_special: bool = True, from_start: bool = True) -> str:
        """Text of `ids`. Control tokens (BOS, <|im_end|> ...) are left out unless
        skip_special is False; bytes that are not valid UTF-8 become U+FFFD.

        `from_start`: the ids begin a text, as `encode` returns them. With add_space_prefix
        (SentencePiece models such as Llama 2) the space `encode` put in front is removed, as
        llama.cpp's detokenize does. Pass False for a continuation (generated tokens), whose
        leading space is real.
        """
        ids = list(ids)
        # llama.cpp: the first token loses one leading space (a hidden control token uses
        # the strip up), except after a leading BOS that is removed.
        strip_space = self.add_space_prefix and from_start
        if skip_special and self.add_bos and ids and ids[0] == self.bos_id:
            ids, strip_space = ids[1:], False
        out = bytearray()
        for k, token_id in enumerate(ids):
            if skip_special and self.is_special(token_id):
                continue
            piece = self.token_bytes(token_id)
            if k == 0 and strip_space and piece.startswith(b" "):
                piece = piece[1:]
            out += piece
        return out.decode("utf-8", errors="replace")

    def token_bytes(self, token_id: int) -> bytes:
        """The bytes a token stands for (a control token's own text; byte tokens one byte)."""
        piece = self._piece_cache.get(token_id)
        if piece is None:
            self._check_id(token_id)
            kind = int(self._types[token_id])
            text = self._tokens[token_id]
            if kind in (CONTROL, UNKNOWN, USER_DEFINED) or token_id in self._control_ids:
                piece = text.encode()
            elif kind == BYTE:
                piece = _byte_token_value(text)
            elif kind == NORMAL:
                piece = self._normal_piece(text)
            else:  # unused / undefined types print nothing, as in llama.cpp
                piece = b""
            self._piece_cache[token_id] = piece
        return piece

    # --- internals -----------------------------------------------------------------------

    def _check_id(self, token_id: int) -> None:
        if not isinstance(token_id, (int, np.integer)) or not 0 <= token_id < self.vocab_size:
            raise QpackError(
                f"token id {token_id!r} is outside the vocabulary (0..{self.vocab_size - 1})"
            )

    def _partition(self, text: str, parse_special: bool) -> list[str | int]:
        """Cut special tokens out of `text` as whole pieces. As llama.cpp: the longest token
        first, each splitting every remaining text fragment at all its occurrences."""
        if not text:
            return []
        groups = self._special_groups(parse_special)
        present = [
            piece
            for prefix, group in groups.items()
            if prefix in text
            for piece in group
            if piece[0] in text
        ]
        if not present:
            return [text]
        present.sort(key=lambda p: (-len(p[0]), p[1]))
        fragments: list[str | int] = [text]
        for special, token_id in present:
            out: list[str | int] = []
            for fragment in fragments:
                if isinstance(fragment, int) or special not in fragment:
                    out.append(fragment)
                    continue
                parts = fragment.split(special)
                for k, part in enumerate(parts):
                    if k:
                        out.append(token_id)
                    if part:
                        out.append(part)
            fragments = out
        return fragments

    def _encode_fragment(self, text: str, after_special: bool) -> list[int]:
        raise NotImplementedError

    def _normal_piece(self, text: str) -> bytes:
        raise NotImplementedError


def _byte_token_value(text: str) -> bytes:
    """`<0x0A>` -> b"\\n"."""
    if len(text) == 6 and text.startswith("<0x") and text.endswith(">"):
        try:
            return bytes([int(text[3:5], 16)])
        except ValueError:
            pass
    return text.encode()


def _merge(text: str, priority: Callable[[str, str], Any]) -> list[str]:
    """BPE as llama.cpp does it, for both families: starting from the characters of `text`,
    merge the adjacent pair whose `priority(left, right)` is lowest (leftmost on ties) until
    no pair has one (None).

    The symbols are a linked list and the candidate pairs a heap, so a merge costs O(log n);
    a merge always absorbs the right symbol into the left one, so the symbols left over, in
    index order, are the result.
    """
    syms: list[str | None] = list(text)
    n = len(syms)
    nxt = [*range(1, n), -1]
    prv = list(range(-1, n - 1))
    # (priority, left, right, merged length): the length tells a stale entry, one whose side
    # has grown or gone since it was pushed.
    heap = []
    for i in range(n - 1):
        if (p := priority(syms[i], syms[i + 1])) is not None:
            heap.append((p, i, i + 1, len(syms[i]) + len(syms[i + 1])))
    heapq.heapify(heap)
    while heap:
        _, left, right, size = heapq.heappop(heap)
        a, b = syms[left], syms[right]
        if a is None or b is None or len(a) + len(b) != size:
            continue
        syms[left], syms[right] = a + b, None
        nxt[left] = nxt[right]
        if nxt[right] >= 0:
            prv[nxt[right]] = left
        for i, j in ((prv[left], left), (left, nxt[left])):
            if i >= 0 and j >= 0 and (p := priority(syms[i], syms[j])) is not None:
                heapq.heappush(heap, (p, i, j, len(syms[i]) + len(syms[j])))
    return [s for s in syms if s is not None]


# The BPE word cache is bounded in bytes (what an attacker's text costs), not in entries: 65536
# entries of 100 kB words were GBs. Words longer than WORD_CACHE_MAX_WORD are never kept.
WORD_CACHE_BYTES = 16 << 20
WORD_CACHE_MAX_WORD = 256


def _word_cache_cost(word: str, ids: tuple[int, ...]) -> int:
    """An upper bound of what a cache entry holds in CPython: the key (up to 4 bytes a
    character), the tuple of ints (8 bytes a slot, 32 an int) and the dict slot, ~200."""
    return 4 * len(word) + 40 * len(ids) + 200


class ByteLevelBPE(Tokenizer):
    """`gpt2`: byte-level BPE with merge ranks and a named pre-tokenizer."""

    model = "gpt2"

    def __init__(self, md: Mapping[str, Any]):
        pre = _get(md, "tokenizer.ggml.pre", str, "default")
        spec = PRE_TOKENIZERS.get(pre)
        if spec is None:
            raise UnsupportedModel(
                f"tokenizer metadata tokenizer.ggml.pre: pre-tokenizer {pre!r} is not supported "
                f"(qpack knows {', '.join(sorted(PRE_TOKENIZERS))})"
            )
        self.pre_name = pre
        self.pre = PreTokenizer(spec[0], **spec[1])
        self._default_add_bos = self.pre.add_bos
        super().__init__(md)
        self._merges_source = _string_array(md, "tokenizer.ggml.merges", required=True)
        self._word_cache: dict[str, tuple[int, ...]] = {}
        self._word_cache_bytes = 0  # _word_cache_cost summed over the entries

    @cached_property
    def _ranks(self) -> dict[str, int]:
        """ "left right" -> rank; the first of duplicate merges wins, as in llama.cpp."""
        merges = _checked_strings(_to_list(self._merges_source), "tokenizer.ggml.merges")
        ranks: dict[str, int] = {}
        for rank, merge in enumerate(merges):
            ranks.setdefault(merge, rank)
        return ranks

    def _normal_piece(self, text: str) -> bytes:
        table = _CHAR_TO_BYTE
        out = bytearray()
        for ch in text:
            b = table.get(ch)
            if b is None:  # not a byte-level character: keep it as UTF-8
                out += ch.encode()
            else:
                out.append(b)
        return bytes(out)

    def _encode_fragment(self, text: str, after_special: bool) -> list[int]:
        ids: list[int] = []
        cache = self._word_cache
        for piece in self.pre.split(text):
            word = piece.encode().decode("latin-1").translate(_LATIN1_TO_GPT2)
            word_ids = cache.get(word)
            if word_ids is None:
                word_ids = self._bpe(word)
                if len(word) <= WORD_CACHE_MAX_WORD:  # a long "word" is rare: not worth keeping
                    cost = _word_cache_cost(word, word_ids)
                    if self._word_cache_bytes + cost > WORD_CACHE_BYTES:
                        cache.clear()
                        self._word_cache_bytes = 0
                    cache[word] = word_ids
                    self._word_cache_bytes += cost
            ids.extend(word_ids)
        return ids

    def _bpe(self, word: str) -> tuple[int, ...]:
        """Merge the lowest-ranked adjacent pair (leftmost on ties) until none is left."""
        vocab = self._token_to_id
        if self.pre.ignore_merges and word in vocab:
            return (vocab[word],)
        ranks = self._ranks
        ids: list[int] = []
        for sym in _merge(word, lambda a, b: ranks.get(f"{a} {b}")):
            token_id = vocab.get(sym)
            if token_id is not None:
                ids.append(token_id)
            else:  # llama.cpp's fallback: single-byte pieces that are tokens, others dropped
                ids.extend(vocab[c] for c in sym if len(c.encode()) == 1 and c in vocab)
        return tuple(ids)


class SentencePieceBPE(Tokenizer):
    """`llama`: SentencePiece-style merges by token score with byte fallback (Gemma)."""

    model = "llama"
    _default_bos = 1
    _default_eos = 2
    _default_unk = 0
    _default_add_bos = True
    _default_space_prefix = True

    def __init__(self, md: Mapping[str, Any]):
        super().__init__(md)
        self._scores_source = _numeric_array(md, "tokenizer.ggml.scores", self.vocab_size, "iuf")

    @cached_property
    def _scores(self) -> list[float]:
        if self._scores_source is None:
            return [0.0] * self.vocab_size
        return self._scores_source[: self.vocab_size].astype(np.float32).tolist()

    def _normal_piece(self, text: str) -> bytes:
        return text.replace(_SPM_SPACE, " ").encode()

    def _encode_fragment(self, text: str, after_special: bool) -> list[int]:
        if self.add_space_prefix and after_special:
            text = " " + text
        text = text.replace(" ", _SPM_SPACE)
        vocab = self._token_to_id
        scores = self._scores

        def priority(a: str, b: str) -> float | None:  # best score first
            token_id = vocab.get(a + b)
            return None if token_id is None else -scores[token_id]

        ids: list[int] = []
        for sym in _merge(text, priority):
            token_id = vocab.get(sym)
            if token_id is not None:
                ids.append(token_id)
            else:
                ids.extend(self._byte_fallback(b) for b in sym.encode())
        return ids

    def _byte_fallback(self, byte: int) -> int:
        vocab = self._token_to_id
        token_id = vocab.get(f"<0x{byte:02X}>")
        if token_id is None:
            token_id = vocab.get(chr(byte)) if byte < 0x80 else None
        if token_id is None:
            if self.unk_id is None:
                raise UnsupportedModel(
                    f"the vocabulary has no byte token <0x{byte:02X}> and no unknown token"
                )
            token_id = self.unk_id
        return token_id


_TOKENIZERS: dict[str, type[Tokenizer]] = {"gpt2": ByteLevelBPE, "llama": SentencePieceBPE}


class StreamDecoder:
    """Turns a stream of token ids into text, never splitting a UTF-8 character: bytes of
    a character cut across tokens are held until the character is complete.

    The joined output equals `tokenizer.decode(ids, skip_special, from_start)`; `from_start`
    is False by default because a stream is usually generated text continuing a prompt.
    """

    def __init__(self, tokenizer: Tokenizer, skip_special: bool = True, from_start: bool = False):
        self.tokenizer = tokenizer
        self.skip_special = skip_special
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._first = from_start

    def feed(self, token_id: int) -> str:
        """The text that became complete with this token (may be empty)."""
        tok = self.tokenizer
        strip_space = False
        if self._first:  # the leading-space rule of Tokenizer.decode
            self._first = False
            if self.skip_special and tok.add_bos and token_id == tok.bos_id:
                return ""
            strip_space = tok.add_space_prefix
        if self.skip_special and tok.is_special(token_id):
            return ""
        piece = tok.token_bytes(token_id)
        if strip_space and piece.startswith(b" "):
            piece = piece[1:]
        return self._utf8.decode(piece)

    def flush(self) -> str:
        """What is left at the end of the stream (an incomplete character becomes U+FFFD)."""
        return self._utf8.decode(b"", final=True)
