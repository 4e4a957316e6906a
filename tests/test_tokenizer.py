"""Tokenizer tests. The oracle is llama.cpp: token ids, detokenized text, token attributes and
end-of-generation sets stored by tests/reference/make_tokenizer_refs.py (llama-cpp-python)."""

from __future__ import annotations

import json
from pathlib import Path

import gguf
import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from qpack.runtime.errors import QpackError, UnsupportedModel
from qpack.runtime.gguf import open_gguf
from qpack.runtime.tokenizer import StreamDecoder, Tokenizer

REFS = Path(__file__).parent / "data" / "tokenizer_refs"
MODELS = ["smollm2", "gemma3"]

# llama.cpp's llama_token_attr bits
ATTR_UNKNOWN, ATTR_CONTROL, ATTR_USER_DEFINED = 1 << 0, 1 << 3, 1 << 4


def load_refs(name: str) -> dict:
    return json.loads((REFS / f"{name}.json").read_text())


@pytest.fixture(scope="module")
def metadata(smollm2_path, gemma3_path):
    paths = {"smollm2": smollm2_path, "gemma3": gemma3_path}
    return {name: open_gguf(path).metadata for name, path in paths.items()}


@pytest.fixture(scope="module")
def tokenizers(metadata):
    return {name: Tokenizer.from_metadata(md) for name, md in metadata.items()}


def case_params(name: str) -> list:
    cases = load_refs(name)["cases"]
    return [
        pytest.param(name, i, id=f"{name}-{i}-{'bos' if c['add_special'] else 'nobos'}"
                     f"{'-special' if c['parse_special'] else ''}")
        for i, c in enumerate(cases)
    ]  # fmt: skip


@pytest.mark.parametrize("name,index", case_params("smollm2") + case_params("gemma3"))
def test_ids_match_llama_cpp(tokenizers, name, index):
    case = load_refs(name)["cases"][index]
    tok = tokenizers[name]
    ids = tok.encode(
        case["text"],
        add_bos=None if case["add_special"] else False,
        parse_special=case["parse_special"],
    )
    assert ids == case["ids"]


@pytest.mark.parametrize("name", MODELS)
def test_decode_matches_llama_cpp_detokenize(tokenizers, name):
    tok = tokenizers[name]
    for case in load_refs(name)["cases"]:
        assert tok.decode(case["ids"]) == case["detokenized"], case["text"]


@pytest.mark.parametrize("pre", ["gpt-2", "default", "llama-bpe", "qwen2"])
def test_other_pre_tokenizers_match_llama_cpp(metadata, pre):
    """SmolLM2's vocabulary under another pre-tokenizer name, tokenized by llama.cpp."""
    md = {**metadata["smollm2"], "tokenizer.ggml.pre": pre}
    del md["tokenizer.ggml.add_bos_token"]  # as in the reference file: the default applies
    tok = Tokenizer.from_metadata(md)
    cases = load_refs("smollm2")["pre_variants"][pre]
    assert len(cases) > 50
    for case in cases:
        ids = tok.encode(case["text"], add_bos=None if case["add_special"] else False)
        assert ids == case["ids"], (pre, case["text"])


def test_sentencepiece_space_prefix_matches_llama_cpp(metadata):
    """Gemma's vocabulary with add_space_prefix = true (as Llama 2 / Mistral files have):
    a space before the text and after every special token; detokenize drops the first."""
    tok = Tokenizer.from_metadata({**metadata["gemma3"], "tokenizer.ggml.add_space_prefix": True})
    cases = load_refs("gemma3")["space_prefix_variant"]
    assert len(cases) > 100
    for case in cases:
        ids = tok.encode(
            case["text"],
            add_bos=None if case["add_special"] else False,
            parse_special=case["parse_special"],
        )
        assert ids == case["ids"], case
        assert tok.decode(ids) == case["detokenized"], case
        dec = StreamDecoder(tok, from_start=True)
        assert "".join([*map(dec.feed, ids), dec.flush()]) == case["detokenized"]
    ids = tok.encode("Hello world", add_bos=False)
    assert tok.token_text(ids[0]) == "\u2581Hello"
    assert tok.decode(ids) == "Hello world"
    assert tok.decode(ids, from_start=False) == " Hello world"  # a continuation keeps it


@pytest.mark.parametrize(
    "pre,pieces",
    [
        ("smollm", ["x", " ", "1", "2", "3", "4", "5", "6", "7", "'ll"]),
        ("gpt-2", ["x", " 1234567", "'ll"]),
        ("llama-bpe", ["x", " ", "123", "456", "7", "'ll"]),
        ("qwen2", ["x", " ", "1", "2", "3", "4", "5", "6", "7", "'ll"]),
        ("default", ["x", " ", "123", "456", "7", "'", "ll"]),
    ],
)
def test_pre_tokenizers_split_digits_differently(metadata, pre, pieces):
    """llama.cpp's pre-tokenizers differ on numbers (llama-vocab.cpp's regexes): one digit
    per piece, runs of three, or the whole run."""
    tok = Tokenizer.from_metadata({**metadata["smollm2"], "tokenizer.ggml.pre": pre})
    assert tok.pre.split("x 1234567'll") == pieces


@pytest.mark.parametrize("name", MODELS)
def test_stop_ids_are_llama_cpp_end_of_generation_set(tokenizers, name):
    refs = load_refs(name)
    tok = tokenizers[name]
    assert tok.stop_ids == set(refs["eog"])
    assert tok.eot_ids == tok.stop_ids
    assert tok.eos_id == refs["eos"] and tok.bos_id == refs["bos"]
    end_of_turn = {"smollm2": "<|im_end|>", "gemma3": "<end_of_turn>"}[name]
    assert tok.token_to_id(end_of_turn) in tok.stop_ids


@pytest.mark.parametrize("name", MODELS)
def test_is_special_matches_llama_cpp_attributes(tokenizers, name):
    tok = tokenizers[name]
    attrs = {int(k): v for k, v in load_refs(name)["attrs"].items()}
    hidden = {i for i, a in attrs.items() if a & (ATTR_CONTROL | ATTR_UNKNOWN)}
    assert hidden, "the reference has control tokens"
    assert {i for i in range(tok.vocab_size) if tok.is_special(i)} == hidden


@pytest.mark.parametrize("name,start,end", [("smollm2", "<|im_start|>", "<|im_end|>"),
                                            ("gemma3", "<start_of_turn>", "<end_of_turn>")])  # fmt: skip
def test_special_token_text_is_plain_text_unless_parse_special(tokenizers, name, start, end):
    tok = tokenizers[name]
    text = f"{start}user\nhi{end}"
    plain = tok.encode(text, add_bos=False)
    parsed = tok.encode(text, add_bos=False, parse_special=True)
    start_id, end_id = tok.token_to_id(start), tok.token_to_id(end)
    assert start_id not in plain and end_id not in plain
    assert parsed[0] == start_id and parsed[-1] == end_id
    assert tok.decode(plain) == text  # the user's text comes back as typed
    assert tok.decode(parsed) == "user\nhi"  # control tokens hidden
    assert tok.decode(parsed, skip_special=False) == text


def representable(tok: Tokenizer, text: str) -> bool:
    """Whether `text` can survive encode -> decode: every byte has a token (SmolLM2 has none
    for some bytes, e.g. 0xF1, which llama.cpp drops too), and no literal U+2581, which a
    SentencePiece vocabulary cannot tell from a space."""
    if tok.model == "llama":
        return "\u2581" not in text
    single = tok.__dict__.get("_single_bytes")
    if single is None:
        single = {b for i in range(tok.vocab_size) if len(b := tok.token_bytes(i)) == 1}
        tok.__dict__["_single_bytes"] = single
    return all(bytes([b]) in single for b in text.encode())


@pytest.mark.parametrize("name", MODELS)
def test_round_trip_on_corpus(tokenizers, name):
    tok = tokenizers[name]
    checked = 0
    for case in load_refs(name)["cases"]:
        text = case["text"]
        plain = not any(tok.is_special(i) for i in case["ids"]) and not case["parse_special"]
        if plain and representable(tok, text):
            assert tok.decode(tok.encode(text)) == text
            checked += 1
    assert checked > 30


_ALPHABET = st.one_of(
    st.characters(blacklist_categories=("Cs",)),
    st.sampled_from(list(" \t\n\r<>/'0123456789aAéß世🎉\u00a0\u2581")),
)


@pytest.mark.parametrize("name", MODELS)
@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(text=st.text(alphabet=_ALPHABET, max_size=120))
def test_round_trip_random_unicode(tokenizers, name, text):
    tok = tokenizers[name]
    ids = tok.encode(text, add_bos=False)
    assert all(0 <= i < tok.vocab_size for i in ids)
    assume(representable(tok, text))
    assert tok.decode(ids) == text


@pytest.mark.parametrize("name", MODELS)
def test_bos_follows_metadata_unless_asked(tokenizers, metadata, name):
    tok = tokenizers[name]
    assert tok.add_bos == metadata[name]["tokenizer.ggml.add_bos_token"]
    assert (tok.encode("hi")[0] == tok.bos_id) == tok.add_bos
    assert tok.encode("hi", add_bos=True)[0] == tok.bos_id
    assert tok.bos_id not in tok.encode("hi", add_bos=False)
    assert tok.encode("", add_bos=False) == []


def test_lone_surrogates_become_replacement_characters(tokenizers):
    tok = tokenizers["smollm2"]
    assert tok.encode("a\ud800b\udfff") == tok.encode("a\ufffdb\ufffd")


def test_token_bytes(tokenizers):
    gemma, smol = tokenizers["gemma3"], tokenizers["smollm2"]
    assert gemma.token_bytes(gemma.token_to_id("<0x0A>")) == b"\n"
    assert gemma.token_bytes(gemma.token_to_id("\u2581the")) == b" the"
    assert gemma.token_bytes(gemma.bos_id) == b"<bos>"
    assert smol.token_bytes(smol.token_to_id("\u0120the")) == b" the"
    assert smol.token_bytes(smol.token_to_id("<|im_end|>")) == b"<|im_end|>"
    # byte-level pieces of a multi-byte character are not UTF-8 on their own
    emoji_ids = smol.encode("🎉", add_bos=False)
    assert b"".join(smol.token_bytes(i) for i in emoji_ids) == "🎉".encode()
    for bad in (-1, smol.vocab_size, 10**12):
        with pytest.raises(QpackError, match="outside the vocabulary"):
            smol.token_bytes(bad)


@pytest.mark.parametrize("name", MODELS)
def test_stream_decoder_holds_split_characters(tokenizers, name):
    tok = tokenizers[name]
    text = "Héllo 世界 🎉 \U0010fffd\U0001f9ec ok"
    ids = tok.encode(text)
    dec = StreamDecoder(tok)
    chunks = [dec.feed(i) for i in ids] + [dec.flush()]
    assert "".join(chunks) == text
    assert not any("\ufffd" in c for c in chunks)
    # at least one character was cut across tokens and came out whole, late
    split = [i for i in ids if not _complete_utf8(tok.token_bytes(i))]
    assert split, "the text should make the tokenizer split a character"
    held = [c for i, c in zip(ids, chunks, strict=False) if i in split]
    assert "" in held


def _complete_utf8(b: bytes) -> bool:
    try:
        b.decode()
        return True
    except UnicodeDecodeError:
        return False


@pytest.mark.parametrize("name", MODELS)
@settings(
    max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(data=st.data())
def test_stream_decoder_equals_decode_for_any_ids(tokenizers, name, data):
    """Whatever the ids (byte tokens in any order, control tokens, broken UTF-8), the streamed
    pieces join to exactly what decode gives."""
    tok = tokenizers[name]
    byte_like = st.sampled_from([i for i in range(600) if len(tok.token_bytes(i)) == 1])
    any_id = st.integers(0, tok.vocab_size - 1)
    ids = data.draw(st.lists(st.one_of(any_id, byte_like), max_size=40))
    for skip_special in (True, False):
        for from_start in (True, False):
            dec = StreamDecoder(tok, skip_special=skip_special, from_start=from_start)
            streamed = "".join([*map(dec.feed, ids), dec.flush()])
            assert streamed == tok.decode(ids, skip_special=skip_special, from_start=from_start)


def test_stream_decoder_gemma_byte_fallback_character(tokenizers):
    """A character missing from Gemma's vocabulary arrives as 4 byte tokens: nothing is
    emitted until the last one."""
    tok = tokenizers["gemma3"]
    ids = tok.encode("\U0010fffd", add_bos=False)
    assert len(ids) == 4 and all(tok.token_text(i).startswith("<0x") for i in ids)
    dec = StreamDecoder(tok)
    assert [dec.feed(i) for i in ids] == ["", "", "", "\U0010fffd"]
    assert dec.flush() == ""


def test_stream_decoder_skips_control_and_flushes_partial(tokenizers):
    tok = tokenizers["gemma3"]
    dec = StreamDecoder(tok)
    assert dec.feed(tok.bos_id) == ""
    assert dec.feed(tok.token_to_id("<end_of_turn>")) == ""
    first_byte = tok.token_to_id("<0xF0>")
    assert dec.feed(first_byte) == ""
    assert dec.flush() == "\ufffd"  # an unfinished character at the end is shown, replaced
    dec = StreamDecoder(tok, skip_special=False)
    assert dec.feed(tok.token_to_id("<end_of_turn>")) == "<end_of_turn>"


@pytest.mark.slow  # gguf-py reads the whole vocabulary field by field: seconds
def test_from_metadata_accepts_plain_lists_from_gguf_py(smollm2_path, tokenizers):
    """Built from gguf-py's reader (plain lists, other value types), the tokenizer is the same."""
    reader = gguf.GGUFReader(str(smollm2_path))
    md = {k: f.contents() for k, f in reader.fields.items() if k.startswith("tokenizer.")}
    tok = Tokenizer.from_metadata(md)
    text = "Numbers 12345, don't, café 世界 🎉 <|im_start|>"
    assert tok.encode(text) == tokenizers["smollm2"].encode(text)
    assert tok.stop_ids == tokenizers["smollm2"].stop_ids


# --- malformed metadata -------------------------------------------------------------------


def _tiny_bpe(**overrides):
    md = {
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": "gpt-2",
        "tokenizer.ggml.tokens": ["<|endoftext|>", "a", "b", "ab", "\u0120", "\u0120a"],
        "tokenizer.ggml.token_type": np.array([3, 1, 1, 1, 1, 1], dtype=np.int32),
        "tokenizer.ggml.merges": ["a b", "\u0120 a"],
        "tokenizer.ggml.eos_token_id": 0,
    }
    md.update(overrides)
    return {k: v for k, v in md.items() if v is not None}


def test_tiny_vocabulary_merges():
    tok = Tokenizer.from_metadata(_tiny_bpe())
    assert [tok.token_text(i) for i in tok.encode("ab a")] == ["ab", "\u0120a"]
    assert tok.stop_ids == {0}


@pytest.mark.parametrize(
    "overrides,key",
    [
        ({"tokenizer.ggml.model": None}, "tokenizer.ggml.model"),
        ({"tokenizer.ggml.model": "wordpiece-9000"}, "tokenizer.ggml.model"),
        ({"tokenizer.ggml.model": 7}, "tokenizer.ggml.model"),
        ({"tokenizer.ggml.pre": "mystery-pre"}, "tokenizer.ggml.pre"),
        ({"tokenizer.ggml.tokens": None}, "tokenizer.ggml.tokens"),
        ({"tokenizer.ggml.tokens": []}, "tokenizer.ggml.tokens"),
        ({"tokenizer.ggml.tokens": "abc"}, "tokenizer.ggml.tokens"),
        ({"tokenizer.ggml.tokens": [1, 2, 3]}, "tokenizer.ggml.tokens"),
        ({"tokenizer.ggml.merges": None}, "tokenizer.ggml.merges"),
        ({"tokenizer.ggml.merges": 5}, "tokenizer.ggml.merges"),
        ({"tokenizer.ggml.merges": np.array([1, 2])}, "tokenizer.ggml.merges"),
        ({"tokenizer.ggml.token_type": np.array([1, 1])}, "tokenizer.ggml.token_type"),
        ({"tokenizer.ggml.token_type": ["x"] * 6}, "tokenizer.ggml.token_type"),
        ({"tokenizer.ggml.eos_token_id": 6}, "tokenizer.ggml.eos_token_id"),
        ({"tokenizer.ggml.bos_token_id": -1}, "tokenizer.ggml.bos_token_id"),
        ({"tokenizer.ggml.bos_token_id": "1"}, "tokenizer.ggml.bos_token_id"),
        ({"tokenizer.ggml.add_bos_token": True}, "tokenizer.ggml.bos_token_id"),
        ({"tokenizer.ggml.add_bos_token": "yes"}, "tokenizer.ggml.add_bos_token"),
    ],
)
def test_malformed_metadata_names_the_key(overrides, key):
    with pytest.raises(UnsupportedModel, match=key.replace(".", r"\.")):
        Tokenizer.from_metadata(_tiny_bpe(**overrides))


def test_malformed_spm_scores_name_the_key(metadata):
    md = {**metadata["gemma3"], "tokenizer.ggml.scores": np.zeros(10, dtype=np.float32)}
    with pytest.raises(UnsupportedModel, match=r"tokenizer\.ggml\.scores"):
        Tokenizer.from_metadata(md)


@pytest.mark.parametrize(
    "key,value",
    [
        ("tokenizer.ggml.tokens", ["<|endoftext|>", "a", "b", 4, "\u0120", "\u0120a"]),
        ("tokenizer.ggml.merges", ["a b", None]),
    ],
)
def test_non_string_items_are_refused_when_the_index_is_built(key, value):
    tok = Tokenizer.from_metadata(_tiny_bpe(**{key: value}))
    with pytest.raises(UnsupportedModel, match=key.replace(".", r"\.") + ".*(int|NoneType)"):
        tok.encode("ab")


def test_duplicate_tokens_are_refused_when_the_index_is_built():
    tok = Tokenizer.from_metadata(
        _tiny_bpe(**{"tokenizer.ggml.tokens": ["x", "a", "b", "a", "c", "d"]})
    )
    with pytest.raises(UnsupportedModel, match=r"tokenizer\.ggml\.tokens.*duplicate"):
        tok.encode("ab")


def test_from_gguf_names_the_file(tmp_path):
    path = tmp_path / "notok.gguf"
    writer = gguf.GGUFWriter(str(path), arch="llama")
    writer.add_string("tokenizer.ggml.model", "unheard-of")
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(UnsupportedModel, match=r"notok\.gguf.*unheard-of"):
        Tokenizer.from_gguf(open_gguf(path))


# --- a hostile vocabulary (issue 11) --------------------------------------------------------


@pytest.mark.parametrize("token_type", [3, 4])  # control, user-defined
def test_an_empty_token_is_never_a_separator(token_type):
    """Was: a control (or user-defined) token with empty text was cut out of every text, and
    str.split("") made every encode raise. It is named [EMPTY_i], as llama.cpp does."""
    md = _tiny_bpe(
        **{
            "tokenizer.ggml.tokens": ["<|endoftext|>", "a", "b", "ab", "\u0120", "\u0120a", ""],
            "tokenizer.ggml.token_type": np.array([3, 1, 1, 1, 1, 1, token_type], np.int32),
        }
    )
    tok = Tokenizer.from_metadata(md)
    for parse_special in (False, True):
        assert [tok.token_text(i) for i in tok.encode("ab a", parse_special=parse_special)] == [
            "ab",
            "\u0120a",
        ]
    assert tok.token_text(6) == "[EMPTY_6]"


def test_word_cache_is_bounded_in_bytes(monkeypatch):
    """Was: 65536 entries whatever their size. Distinct long words fill it to its byte bound
    (measured with sys.getsizeof, not the cache's own accounting) and no further."""
    import random
    import sys

    from qpack.runtime import tokenizer as tk

    monkeypatch.setattr(tk, "WORD_CACHE_BYTES", 256 << 10)
    tok = Tokenizer.from_metadata(_tiny_bpe())
    rng = random.Random(0)
    peak = 0
    for _ in range(40):
        words = ["".join(rng.choice("ab") for _ in range(rng.randint(20, 250))) for _ in range(50)]
        tok.encode(" ".join(words))
        cache = tok._word_cache
        held = sum(
            sys.getsizeof(k) + sys.getsizeof(v) + 32 * len(v) + 100 for k, v in cache.items()
        )
        assert held <= tk.WORD_CACHE_BYTES
        peak = max(peak, held)
    assert peak > tk.WORD_CACHE_BYTES // 2  # it was used, up to its bound
    tok.encode("a" * 5000)  # one huge word: encoded, not kept
    assert "a" * 5000 not in tok._word_cache
