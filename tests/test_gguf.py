"""The GGUF reader against llama.cpp's own gguf.GGUFReader as the oracle, on the real SmolLM2
file and on files written by gguf.GGUFWriter (and byte by byte, for what the writer refuses)."""

from __future__ import annotations

import math
import mmap
import struct

import gguf
import numpy as np
import pytest
from gguf import GGMLQuantizationType, GGUFValueType
from gguf.constants import GGML_QUANT_SIZES
from gguf_fixtures import (
    GGUFBytes,
    pack_kv,
    random_quantized,
    small_valid_gguf,
    tiny_llama,
    write_gguf,
)
from qpack.runtime import quants
from qpack.runtime.errors import GGUFError, QpackError
from qpack.runtime.gguf import GGUFFile, StringArray, open_gguf, rows

# --- the oracle comparison -------------------------------------------------------------------


def _reader_value(f: gguf.ReaderField):
    """GGUFReader's value of a field: python scalars, lists of str, or numpy arrays."""
    main = f.types[0]
    if main == GGUFValueType.ARRAY:
        if f.types[-1] == GGUFValueType.STRING:
            return [bytes(f.parts[i]).decode() for i in f.data]
        if not f.data:
            return np.array([])
        return np.concatenate([f.parts[i] for i in f.data])
    if main == GGUFValueType.STRING:
        return bytes(f.parts[f.data[0]]).decode()
    return f.parts[f.data[0]][0]


def assert_matches_reader(gf: GGUFFile, reader: gguf.GGUFReader, *, compare_data: bool = True):
    fields = {k: f for k, f in reader.fields.items() if not k.startswith("GGUF.")}
    assert list(gf.metadata) == list(fields)  # same keys, same order
    for key, rf in fields.items():
        ours = gf.fields[key]
        assert ours.value_type == rf.types[0], key
        expected = _reader_value(rf)
        if rf.types[0] == GGUFValueType.ARRAY and len(rf.types) == 1:
            assert len(ours.value) == 0, key  # the reader records no element type when empty
        elif rf.types[0] == GGUFValueType.ARRAY:
            assert ours.elem_type == rf.types[-1], key
            if ours.elem_type == GGUFValueType.STRING:
                assert isinstance(ours.value, StringArray)
                assert ours.value.tolist() == expected, key
                assert list(ours.value) == expected, key
            else:
                assert isinstance(ours.value, np.ndarray)
                assert len(ours.value) == len(expected), key
                if len(expected):
                    assert ours.value.dtype == expected.dtype, key
                np.testing.assert_array_equal(ours.value, expected, err_msg=key)
        elif rf.types[0] == GGUFValueType.STRING:
            assert ours.value == expected, key
        elif rf.types[0] == GGUFValueType.BOOL:
            assert ours.value is bool(expected), key
        elif rf.types[0] in (GGUFValueType.FLOAT32, GGUFValueType.FLOAT64):
            assert isinstance(ours.value, float)
            assert ours.value == float(expected) or (math.isnan(ours.value) and np.isnan(expected))
        else:
            assert isinstance(ours.value, int) and ours.value == int(expected), key
    assert gf.alignment == reader.alignment
    assert gf.data_offset == reader.data_offset
    assert list(gf.tensors) == [t.name for t in reader.tensors]
    for rt in reader.tensors:
        ti = gf.tensors[rt.name]
        assert ti.ggml_type == int(rt.tensor_type), rt.name
        assert ti.type.name == rt.tensor_type.name
        assert ti.shape == tuple(int(d) for d in rt.shape), rt.name
        assert ti.n_elements == int(rt.n_elements)
        assert ti.nbytes == int(rt.n_bytes)
        assert ti.offset == int(rt.data_offset)
        if compare_data:
            expected = np.asarray(rt.data).view(np.uint8).reshape(-1)
            assert np.array_equal(ti.data, expected), rt.name


# --- the real model --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def smollm2_reader(smollm2_path):
    return gguf.GGUFReader(smollm2_path)  # ~3 s: shared by the tests below


@pytest.mark.slow
def test_smollm2_matches_gguf_reader(smollm2_path, smollm2_reader):
    with open_gguf(smollm2_path) as gf:
        reader = smollm2_reader
        assert gf.version == 3
        assert gf.architecture == "llama"
        assert gf.file_size == smollm2_path.stat().st_size
        assert len(gf.metadata) == 33 and len(gf.tensors) == 272
        assert len(gf.metadata["tokenizer.ggml.tokens"]) == 49152
        assert len(gf.metadata["tokenizer.ggml.merges"]) == 48900
        assert_matches_reader(gf, reader)


@pytest.mark.slow
def test_smollm2_rows_match_reader_layout(smollm2_path, smollm2_reader):
    gf = open_gguf(smollm2_path)
    reader = {t.name: t for t in smollm2_reader.tensors}
    for name in ("token_embd.weight", "blk.0.attn_q.weight", "blk.29.ffn_down.weight"):
        ti = gf.tensor(name)
        r = rows(ti)
        assert r.shape == (ti.n_rows, ti.row_bytes)
        assert np.array_equal(r, np.asarray(reader[name].data).reshape(r.shape))
        # and the bytes dequantize to the reader's values (the kernels' starting point)
        qt = GGMLQuantizationType(ti.ggml_type)
        np.testing.assert_array_equal(
            gguf.quants.dequantize(r[:4], qt), gguf.quants.dequantize(reader[name].data[:4], qt)
        )


@pytest.mark.slow
def test_gemma3_matches_gguf_reader(gemma3_path):
    with open_gguf(gemma3_path) as gf:
        assert gf.architecture == "gemma3"
        assert_matches_reader(gf, gguf.GGUFReader(gemma3_path), compare_data=False)


# --- files written by GGUFWriter --------------------------------------------------------------

EVERY_SCALAR = {
    "t.u8": (GGUFValueType.UINT8, 255),
    "t.i8": (GGUFValueType.INT8, -128),
    "t.u16": (GGUFValueType.UINT16, 65535),
    "t.i16": (GGUFValueType.INT16, -32768),
    "t.u32": (GGUFValueType.UINT32, 2**32 - 1),
    "t.i32": (GGUFValueType.INT32, -(2**31)),
    "t.f32": (GGUFValueType.FLOAT32, 1.1),
    "t.bool_true": (GGUFValueType.BOOL, True),
    "t.bool_false": (GGUFValueType.BOOL, False),
    "t.string": (GGUFValueType.STRING, "héllo wörld ✓ 🦙"),
    "t.u64": (GGUFValueType.UINT64, 2**64 - 1),
    "t.i64": (GGUFValueType.INT64, -(2**63)),
    "t.f64": (GGUFValueType.FLOAT64, -2.5e300),
    "t.f32_inf": (GGUFValueType.FLOAT32, float("inf")),
}
ARRAY_ITEMS = {
    GGUFValueType.UINT8: [0, 1, 255],
    GGUFValueType.INT8: [-128, 0, 127],
    GGUFValueType.UINT16: [0, 65535],
    GGUFValueType.INT16: [-32768, 32767, 5],
    GGUFValueType.UINT32: [0, 2**32 - 1],
    GGUFValueType.INT32: [-(2**31), 2**31 - 1, 7],
    GGUFValueType.FLOAT32: [0.5, -1.25, 3e38],
    GGUFValueType.BOOL: [True, False, True],
    GGUFValueType.STRING: ["a", "", "é" * 200, "Ġthe", "x" * 300],
    GGUFValueType.UINT64: [2**64 - 1, 0],
    GGUFValueType.INT64: [-(2**63), 2**63 - 1],
    GGUFValueType.FLOAT64: [1e-300, -2.0],
}


def _every_type_metadata() -> dict:
    md = dict(EVERY_SCALAR)
    for t, items in ARRAY_ITEMS.items():
        md[f"a.{t.name.lower()}"] = (GGUFValueType.ARRAY, (t, items))
    return md


def _tensors(rng) -> dict:
    return {
        "f32.weight": (rng.standard_normal((3, 5)).astype(np.float32), "F32"),
        "f16.weight": (rng.standard_normal((4, 7)).astype(np.float32), "F16"),
        "q8_0.weight": (rng.standard_normal((3, 64)).astype(np.float32), "Q8_0"),
        "q4_k.weight": (random_quantized((2, 512), "Q4_K", rng), "Q4_K"),
        "q6_k.weight": (random_quantized((3, 256), "Q6_K", rng), "Q6_K"),
        "q4_0.vec": (rng.standard_normal(96).astype(np.float32), "Q4_0"),
        "f32.4d": (rng.standard_normal((2, 3, 1, 4)).astype(np.float32), "F32"),
    }


def test_every_value_type_and_several_tensor_types(tmp_path):
    rng = np.random.default_rng(1)
    tensors = _tensors(rng)
    path = write_gguf(tmp_path / "all.gguf", _every_type_metadata(), tensors)
    gf = open_gguf(path)
    assert_matches_reader(gf, gguf.GGUFReader(path))
    # independent of the reader: what we wrote is what we read
    for key, (_, value) in EVERY_SCALAR.items():
        assert gf.metadata[key] == (np.float32(value) if key.startswith("t.f32") else value), key
    assert gf.metadata["a.string"] == ARRAY_ITEMS[GGUFValueType.STRING]
    assert gf.metadata["a.bool"].dtype == np.bool_
    assert gf.metadata["a.bool"].tolist() == [True, False, True]
    for name, (values, type_name) in tensors.items():
        ti = gf.tensor(name)
        qt = GGMLQuantizationType[type_name]
        assert ti.type.name == type_name
        if values.dtype == np.uint8:  # random blocks: bytes as written, values via the oracle
            assert ti.data.tobytes() == values.tobytes()
            deq = gguf.quants.dequantize(rows(ti), qt)
            np.testing.assert_array_equal(deq, gguf.quants.dequantize(values, qt))
            assert deq.shape[-1] == ti.shape[0] and np.isfinite(deq).all()
        else:
            assert ti.shape == tuple(reversed(values.shape))  # ggml order
            q = gguf.quants.quantize(values, qt)
            assert ti.data.tobytes() == q.tobytes()
        assert ti.offset % gf.alignment == 0


def test_custom_alignment(tmp_path):
    rng = np.random.default_rng(2)
    path = write_gguf(tmp_path / "al.gguf", {}, _tensors(rng), alignment=256)
    gf = open_gguf(path)
    assert gf.alignment == 256
    assert gf.data_offset % 256 == 0
    assert all(t.offset % 256 == 0 for t in gf.tensors.values())
    assert_matches_reader(gf, gguf.GGUFReader(path))


def test_empty_arrays_of_every_type(tmp_path):
    """GGUFWriter refuses empty arrays, so assemble them byte by byte."""
    g = GGUFBytes(
        kvs=[pack_kv("general.architecture", 8, "llama")]
        + [pack_kv(f"e.{t.name.lower()}", 9, (int(t), [])) for t in ARRAY_ITEMS]
    )
    path = tmp_path / "empty.gguf"
    path.write_bytes(g.build())
    gf = open_gguf(path)
    for t in ARRAY_ITEMS:
        v = gf.metadata[f"e.{t.name.lower()}"]
        assert len(v) == 0
        assert gf.fields[f"e.{t.name.lower()}"].elem_type == t
    assert gf.tensors == {}
    assert_matches_reader(gf, gguf.GGUFReader(path))


def test_version_2_is_read_like_3(tmp_path):
    path = write_gguf(
        tmp_path / "v3.gguf", _every_type_metadata(), _tensors(np.random.default_rng(3))
    )
    raw = bytearray(path.read_bytes())
    raw[4:8] = struct.pack("<I", 2)
    v2 = tmp_path / "v2.gguf"
    v2.write_bytes(raw)
    gf = open_gguf(v2)
    assert gf.version == 2
    assert_matches_reader(gf, gguf.GGUFReader(v2))


def test_tiny_llama_fixture_is_a_readable_model(tmp_path):
    path = tiny_llama(tmp_path / "tiny.gguf")
    gf = open_gguf(path)
    assert_matches_reader(gf, gguf.GGUFReader(path))
    assert gf.architecture == "llama"
    assert gf.tensor("blk.1.ffn_down.weight").shape == (128, 64)
    assert len(gf.metadata["tokenizer.ggml.tokens"]) == gf.metadata["llama.vocab_size"]


# --- regions, views, lifetime -----------------------------------------------------------------


@pytest.mark.parametrize("prefix", [0, 1, 4095, mmap.ALLOCATIONGRANULARITY + 12345])
def test_region_inside_a_larger_file(tmp_path, prefix):
    model = write_gguf(
        tmp_path / "m.gguf", _every_type_metadata(), _tensors(np.random.default_rng(4))
    )
    body = model.read_bytes()
    big = tmp_path / "big.bin"
    big.write_bytes(b"\x7fELF" * (prefix // 4) + b"x" * (prefix % 4) + body + b"TRAILER" * 100)
    gf = open_gguf(big, offset=prefix, length=len(body))
    ref = GGUFFile.from_buffer(body, "m")
    assert gf.file_size == len(body)
    assert gf.data_offset == ref.data_offset
    assert list(gf.metadata) == list(ref.metadata)
    for name, ti in ref.tensors.items():
        assert gf.tensors[name].offset == ti.offset  # offsets are relative to the region
        assert np.array_equal(gf.tensors[name].data, ti.data)
    assert_matches_reader(gf, gguf.GGUFReader(model))


def test_region_errors_name_bytes_of_the_whole_file(tmp_path):
    body = bytearray(small_valid_gguf().build())
    body[4:8] = struct.pack("<I", 7)  # bad version at region byte 4
    big = tmp_path / "big.bin"
    big.write_bytes(b"z" * 5000 + body)
    with pytest.raises(GGUFError) as e:
        open_gguf(big, offset=5000, length=len(body))
    assert e.value.offset == 5004
    assert str(big) in str(e.value) and "version 7" in str(e.value)


def test_region_past_the_end_of_the_file(tmp_path):
    p = tmp_path / "m.gguf"
    p.write_bytes(small_valid_gguf().build())
    size = p.stat().st_size
    for offset, length in [(0, size + 1), (10, size), (size + 1, None), (-1, None)]:
        with pytest.raises(GGUFError, match="file"):
            open_gguf(p, offset=offset, length=length)


def test_views_are_not_copies(smollm2_path):
    gf = open_gguf(smollm2_path)
    ti = gf.tensor("blk.0.attn_k.weight")
    for view in (ti.data, rows(ti), gf.metadata["tokenizer.ggml.token_type"]):
        assert not view.flags.owndata and not view.flags.writeable
        base = view
        while isinstance(base, np.ndarray):
            base = base.base
        assert isinstance(base, memoryview) and isinstance(base.obj, mmap.mmap)
    assert np.shares_memory(rows(ti), ti.data)


def test_views_see_the_buffer_they_were_parsed_from():
    """A change to the underlying bytes shows through: nothing was copied."""
    g = small_valid_gguf()
    buf = bytearray(g.build())
    gf = GGUFFile.from_buffer(buf, "mem")
    ti = gf.tensor("a.weight")
    ids = gf.metadata["x.ids"]
    words = gf.metadata["x.words"]
    assert ids.tolist() == [1, -2, 3] and words[0] == "a"
    buf[ti.offset] ^= 0xFF
    ids_at = gf.fields["x.ids"].offset + len(b"x.ids") + 8 + 4 + 4 + 8
    buf[ids_at] = 9
    assert ti.data[0] == buf[ti.offset]
    assert ids[0] == 9
    with pytest.raises(ValueError):
        ti.data[0] = 1  # read-only even over a writable buffer


def test_close_keeps_held_views_valid(smollm2_path):
    gf = open_gguf(smollm2_path)
    data = gf.tensor("output_norm.weight").data
    tokens = gf.metadata["tokenizer.ggml.tokens"]
    before = data.copy()
    gf.close()
    gf.close()  # idempotent
    assert gf.closed
    assert np.array_equal(data, before)
    assert tokens[1] == "<|im_start|>"
    with open_gguf(smollm2_path) as gf2:
        assert not gf2.closed
    assert gf2.closed


@pytest.mark.slow
def test_string_array_sequence_behaviour(smollm2_path, smollm2_reader):
    gf = open_gguf(smollm2_path)
    tokens = gf.metadata["tokenizer.ggml.tokens"]
    oracle = smollm2_reader.fields["tokenizer.ggml.tokens"]
    expected = [bytes(oracle.parts[i]).decode() for i in oracle.data]
    assert len(tokens) == len(expected)
    assert tokens[0] == expected[0] and tokens[-1] == expected[-1] and tokens[123] == expected[123]
    assert tokens[100:110] == expected[100:110]
    assert tokens[::5000] == expected[::5000]
    assert list(tokens) == expected
    assert tokens == expected and tokens != expected[:-1]
    assert "Ġthe" in tokens and tokens.index("Ġthe") == expected.index("Ġthe")
    with pytest.raises(IndexError):
        tokens[len(expected)]
    with pytest.raises(IndexError):
        tokens[-len(expected) - 1]


def test_lookups_name_what_is_missing(tmp_path):
    gf = GGUFFile.from_buffer(small_valid_gguf().build(), "small")
    with pytest.raises(GGUFError, match="no tensor named 'nope'"):
        gf.tensor("nope")
    g = small_valid_gguf()
    g.kvs = g.kvs[1:]  # drop general.architecture
    with pytest.raises(GGUFError, match="general.architecture"):
        _ = GGUFFile.from_buffer(g.build(), "noarch").architecture


def test_unopenable_paths_are_qpack_errors(tmp_path):
    for p in (tmp_path / "missing.gguf", tmp_path):
        with pytest.raises(QpackError, match=str(p)) as e:
            open_gguf(p)
        assert not isinstance(e.value, GGUFError)
    empty = tmp_path / "empty.gguf"
    empty.write_bytes(b"")
    with pytest.raises(GGUFError, match="empty"):
        open_gguf(empty)


# --- the type table ---------------------------------------------------------------------------

FACTS_IDS = {
    "F32": 0, "F16": 1, "Q4_0": 2, "Q4_1": 3, "Q5_0": 6, "Q5_1": 7, "Q8_0": 8, "Q8_1": 9,
    "Q2_K": 10, "Q3_K": 11, "Q4_K": 12, "Q5_K": 13, "Q6_K": 14, "Q8_K": 15, "IQ2_XXS": 16,
    "IQ2_XS": 17, "IQ3_XXS": 18, "IQ1_S": 19, "IQ4_NL": 20, "IQ3_S": 21, "IQ2_S": 22,
    "IQ4_XS": 23, "I8": 24, "I16": 25, "I32": 26, "I64": 27, "F64": 28, "IQ1_M": 29,
    "BF16": 30, "TQ1_0": 34, "TQ2_0": 35, "MXFP4": 39,
}  # fmt: skip


def test_type_table_matches_gguf_package():
    for name, type_id in FACTS_IDS.items():
        qt = quants.quant_type(type_id)
        assert qt is not None and qt.name == name and quants.quant_type(name) is qt
        assert quants.quant_type(name.lower()) is qt
    for qt in quants.QUANT_TYPES_BY_ID.values():
        ref = GGMLQuantizationType[qt.name]
        assert int(ref) == qt.id
        assert GGML_QUANT_SIZES[ref] == (qt.block_elems, qt.block_bytes), qt.name
    assert quants.SUPPORTED_WEIGHT_TYPES <= set(quants.QUANT_TYPES_BY_NAME)
    assert len(quants.SUPPORTED_WEIGHT_TYPES) == 25
    for removed in (4, 5, 31, 32, 33, 36, 37, 38, 1000):
        assert quants.quant_type(removed) is None
    assert quants.quant_type("Q4_1").bits_per_weight == 5.0
