"""JSON mode's recognizer against Python's json module (the oracle), and the logits mask over
SmolLM2's real vocabulary."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from qpack.runtime.json_constraint import JsonConstraint, JsonPrefix

scalars = st.none() | st.booleans() | st.integers(-10**12, 10**12) | st.text(max_size=12) | st.floats(
    allow_nan=False, allow_infinity=False)  # fmt: skip
values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4),
                      max_leaves=20)  # fmt: skip
objects = st.dictionaries(st.text(max_size=8), values, max_size=5)


def strict_loads(text: str):
    """JSON as the standard says it: Python's json also takes NaN and Infinity."""

    def refuse(name):
        raise ValueError(f"{name} is not JSON")

    return json.loads(text, parse_constant=refuse)


def accepts(text: str) -> JsonPrefix | None:
    p = JsonPrefix()
    return p if p.feed(text.encode()) else None


@settings(max_examples=150, deadline=None)
@given(objects, st.sampled_from([None, 0, 2]), st.booleans())
def test_every_prefix_of_a_json_object_is_accepted(obj, indent, ascii_only):
    text = json.dumps(obj, indent=indent, ensure_ascii=ascii_only)
    p = JsonPrefix()
    for i, b in enumerate(text.encode()):
        assert p.feed([b]), (text, i)
        assert p.complete == (i == len(text.encode()) - 1)
    assert p.complete


ALPHABET = '{}[]":,. -+0123456789eEtrufalsn\\x\n\t'


@settings(max_examples=400, deadline=None)
@given(objects, st.lists(st.tuples(st.integers(0, 10**6), st.sampled_from(["del", "ins"]),
                                   st.sampled_from(list(ALPHABET))), min_size=1, max_size=3))  # fmt: skip
def test_accepted_complete_texts_are_json_objects(obj, edits):
    """Soundness and completeness on mutated JSON: complete here <=> a JSON object there."""
    text = json.dumps(obj)
    for pos, op, ch in edits:
        pos %= len(text) + 1
        text = text[:pos] + ch + text[pos:] if op == "ins" else text[:pos] + text[pos + 1 :]
    p = accepts(text)
    try:
        is_object = isinstance(strict_loads(text), dict)
    except ValueError:
        is_object = False
    assert (p is not None and p.complete) == is_object, text


@pytest.mark.parametrize("text", [
    "[1]", '"a"', "1", '{"a":01}', '{"a":1,}', '{"a" 1}', '{"a":tru}', '{"a":"\x01"}', "{} x",
    '{"a":-}', '{"a":1.}', '{"a":1e}', '{"a":.5}', '{"a":"\\q"}', '{"a":"\\u12g4"}', "{,}",
    '{"a":[1,]}', '{"a":[,1]}', "{}{}", '{"a":1}}', '{"a":Infinity}', '{"a":NaN}',
])  # fmt: skip
def test_not_json_objects_are_refused(text):
    p = accepts(text)
    assert p is None or not p.complete
    with pytest.raises((ValueError, AssertionError)):
        assert isinstance(strict_loads(text), dict)


def test_endless_whitespace_is_cut():
    assert accepts("{" + " " * 24) is not None
    assert accepts("{" + "\n" * 25) is None


@pytest.fixture(scope="module")
def tokenizer(smollm2_path):
    from qpack.runtime.gguf import open_gguf
    from qpack.runtime.tokenizer import Tokenizer

    return Tokenizer.from_gguf(open_gguf(str(smollm2_path)))


def test_mask_allows_exactly_tokens_that_keep_the_json_valid(tokenizer):
    rng = np.random.default_rng(3)
    c = JsonConstraint(tokenizer, keep=40)
    text = b""
    for _ in range(60):
        logits = rng.normal(size=tokenizer.vocab_size).astype(np.float32)
        masked = c.mask(logits)
        allowed = np.flatnonzero(np.isfinite(masked))
        assert 1 <= len(allowed) <= 40
        assert np.array_equal(masked[allowed], logits[allowed])
        for t in allowed.tolist():  # each allowed token continues a valid prefix
            assert not tokenizer.is_special(t)
            assert c.state.copy().feed(tokenizer.token_bytes(t))
        # ... and they are the most likely such tokens: a better-scored one left out breaks it.
        floor = masked[allowed].min()
        for t in np.flatnonzero(logits > floor).tolist():
            if t not in set(allowed.tolist()):
                data = tokenizer.token_bytes(t)
                assert tokenizer.is_special(t) or not data or not c.state.copy().feed(data)
        choice = int(random.Random(len(text)).choice(allowed.tolist()))
        c.advance(choice)
        text += tokenizer.token_bytes(choice)
    assert JsonPrefix().feed(text)


def test_mask_after_the_object_allows_only_end_of_turn(tokenizer):
    c = JsonConstraint(tokenizer)
    for t in tokenizer.encode('{"a": [1, 2.5, "x"]}', add_bos=False):
        c.advance(t)
    assert c.state.complete
    masked = c.mask(np.zeros(tokenizer.vocab_size, np.float32))
    assert set(np.flatnonzero(np.isfinite(masked)).tolist()) == set(tokenizer.stop_ids)
