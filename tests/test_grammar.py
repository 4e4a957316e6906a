"""Constrained decoding through llguidance over qpack's vocabularies: random walks through the
mask end in JSON that the `jsonschema` package (the oracle) finds valid, and keywords the
decoder cannot enforce are refused by name."""

from __future__ import annotations

import json

import jsonschema
import numpy as np
import pytest
from qpack.runtime import grammar
from qpack.runtime.gguf import open_gguf
from qpack.runtime.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def smol_tokenizer(smollm2_path):
    return Tokenizer.from_gguf(open_gguf(smollm2_path))


SCHEMAS = [
    {"type": "object", "additionalProperties": {"type": "integer"}, "maxProperties": 3},
    {
        "type": "object",
        "properties": {
            "name": {"type": "string", "maxLength": 8},
            "age": {"type": "integer", "minimum": 0, "maximum": 120},
            "tags": {"type": "array", "items": {"enum": ["red", "green", "blue"]}, "maxItems": 3},
            "score": {"type": "number"},
        },
        "required": ["name", "age"],
        "additionalProperties": False,
    },
    {
        "type": "array",
        "items": {"anyOf": [{"type": "boolean"}, {"type": "null"}, {"const": "x"}]},
        "minItems": 2,
        "maxItems": 4,
    },
    {
        "$defs": {"point": {"type": "object", "properties": {"x": {"type": "integer"}},
                            "required": ["x"], "additionalProperties": False}},
        "type": "object",
        "properties": {"a": {"$ref": "#/$defs/point"}, "b": {"type": "string", "pattern": "^[a-c]{2,3}$"}},
        "required": ["a", "b"],
        "additionalProperties": False,
    },
]  # fmt: skip


CLOSING = set(b'"]},:0123456789')


def walk(tokenizer: Tokenizer, schema: dict, seed: int, max_steps: int = 150) -> str | None:
    """Draw random tokens among the allowed ones until an allowed end is drawn; the text, or
    None when the walk ran out of steps. Half the draws favour tokens that close something,
    so that strings and containers end."""
    rng = np.random.default_rng(seed)
    n = tokenizer.vocab_size
    c = grammar.GrammarConstraint(tokenizer, grammar.json_schema(schema), n)
    out = bytearray()
    stops = set(tokenizer.stop_ids)
    closes = np.array([bool(CLOSING & set(tokenizer.token_bytes(t))) for t in range(n)])
    for _ in range(max_steps):
        masked = c.mask(np.zeros(n, np.float32))
        allowed = np.flatnonzero(np.isfinite(masked))
        assert len(allowed), "the mask allows nothing"
        if any(int(t) in stops for t in allowed) and rng.random() < 0.5:
            return out.decode()
        closing = allowed[closes[allowed]]
        token = int(rng.choice(closing if len(closing) and rng.random() < 0.5 else allowed))
        if token in stops:
            return out.decode()
        c.advance(token)
        assert c.error is None
        out += tokenizer.token_bytes(token)
    return None


@pytest.mark.parametrize("index", range(len(SCHEMAS)))
def test_random_walks_through_the_mask_end_in_valid_json(smol_tokenizer, index):
    schema = SCHEMAS[index]
    finished = 0
    for seed in range(8):
        text = walk(smol_tokenizer, schema, seed)
        if text is None:
            continue
        finished += 1
        jsonschema.validate(json.loads(text), schema)
    assert finished >= 4  # most walks end within the step budget


def test_only_the_end_is_allowed_after_a_closed_object(smol_tokenizer):
    tok = smol_tokenizer
    c = grammar.GrammarConstraint(tok, grammar.json_schema({"const": {"a": 1}}), tok.vocab_size)
    for t in tok.encode('{"a": 1}', add_bos=False):
        assert np.isfinite(c.mask(np.zeros(tok.vocab_size, np.float32))[t])
        c.advance(t)
    allowed = np.flatnonzero(np.isfinite(c.mask(np.zeros(tok.vocab_size, np.float32))))
    assert set(allowed.tolist()) <= set(tok.stop_ids) and len(allowed)


@pytest.mark.parametrize(
    "schema, keyword",
    [
        ({"type": "array", "uniqueItems": True}, "uniqueItems"),
        ({"if": {"type": "string"}, "then": {"minLength": 2}}, "if"),
        ({"not": {"type": "integer"}}, "not"),
        ({"type": "object", "dependentRequired": {"a": ["b"]}}, "dependentRequired"),
        ({"type": "string", "format": "no-such-format"}, "format"),
        ({"type": "string", "pattern": "(?=a)a"}, "pattern"),
    ],
)
def test_unenforceable_keywords_are_refused_by_name(schema, keyword):
    with pytest.raises(grammar.SchemaError) as e:
        grammar.json_schema(schema)
    assert e.value.keyword == keyword
    assert keyword in str(e.value)


def test_lark_literal_uses_the_control_token(smol_tokenizer):
    tok = smol_tokenizer
    end = tok.token_to_id("<|im_end|>")
    assert grammar.lark_literal(tok, "<|im_end|>") == f"<[{end}]>"
    assert grammar.lark_literal(tok, "<tool_call>") == '"<tool_call>"'


def test_triggered_constraint_is_free_until_the_trigger(smol_tokenizer):
    tok = smol_tokenizer
    g = grammar.lark('start: " " %json {"type": "object", "properties": {"k": {"const": 7}}, '
                     '"required": ["k"], "additionalProperties": false} "</x>"')  # fmt: skip
    c = grammar.TriggeredConstraint(tok, g, tok.vocab_size, trigger="<x>")
    logits = np.arange(tok.vocab_size, dtype=np.float32)
    for t in tok.encode("Some prose first ", add_bos=False):
        assert np.array_equal(c.mask(logits), logits)  # free text
        c.advance(t)
    for t in tok.encode("<x>", add_bos=False):
        c.advance(t)
    assert c.inner is not None
    forced = tok.encode(' {"k": 7}</x>', add_bos=False)
    for t in forced:
        assert np.isfinite(c.mask(logits)[t])
        c.advance(t)
    assert c.inner.matcher.is_accepting()
    assert not np.isfinite(c.mask(logits)[tok.encode("x", add_bos=False)[0]])


def test_a_space_prefix_tokenizer_can_open_the_object(tmp_path):
    """SentencePiece's add_space_prefix must not reach llguidance: it would think '{' always
    comes after a space and allow nothing but spaces."""
    from gguf_fixtures import tiny_llama

    tok = Tokenizer.from_gguf(open_gguf(tiny_llama(tmp_path / "tiny.gguf")))
    assert tok.add_space_prefix
    c = grammar.GrammarConstraint(tok, grammar.json_schema({"type": "object"}), tok.vocab_size)
    allowed = {tok.token_bytes(int(t)) for t in np.flatnonzero(c.allowed())}
    assert b"{" in allowed
