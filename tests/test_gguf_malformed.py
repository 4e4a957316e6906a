"""Malformed GGUF files: each must raise GGUFError (file, offset, problem) and nothing else --
no struct.error, IndexError, MemoryError, UnicodeDecodeError, numpy error or hang.

The corpus is built here, byte by byte (gguf_fixtures.GGUFBytes), from the list of inputs a safe
reader must reject (gguf-facts.md); a hypothesis test then mutates a valid small file at random.
"""

from __future__ import annotations

import struct

import numpy as np
import pytest
from gguf_fixtures import (
    GGUFBytes,
    pack_kv,
    pack_string,
    pack_tensor_info,
    small_valid_gguf,
)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from qpack.runtime.errors import GGUFError
from qpack.runtime.gguf import GGUFFile, open_gguf

U64_MAX = 2**64 - 1
ARCH = pack_kv("general.architecture", 8, "llama")


def parse(data: bytes, name: str = "bad.gguf") -> GGUFFile:
    return GGUFFile.from_buffer(data, name)


def touch_everything(gf: GGUFFile) -> None:
    """Read every value and every tensor byte of a file that parsed: nothing lazy may fail."""
    for value in gf.metadata.values():
        if isinstance(value, np.ndarray):
            value.tobytes()
        elif hasattr(value, "tolist"):
            value.tolist()
            if len(value):
                value[-1]
    for ti in gf.tensors.values():
        int(ti.data.sum())
        assert ti.data.size == ti.nbytes


def assert_rejected(data: bytes, match: str | None = None) -> GGUFError:
    with pytest.raises(GGUFError) as e:
        parse(data)
    err = e.value
    assert err.path == "bad.gguf" and "bad.gguf" in str(err)
    if err.offset is not None:
        assert 0 <= err.offset <= len(data)
    if match:
        assert match in err.problem, err.problem
    return err


def one_tensor_file(info: bytes, data: bytes = bytes(64), kvs=(ARCH,)) -> bytes:
    return GGUFBytes(kvs=list(kvs), infos=[info], data=data).build()


# --- truncation --------------------------------------------------------------------------------


def test_the_small_file_itself_is_valid():
    data = small_valid_gguf().build()
    gf = parse(data)
    touch_everything(gf)
    assert gf.metadata["x.words"][1] == "é" and len(gf.tensors) == 2


def test_truncated_at_every_byte_of_a_small_file():
    data = small_valid_gguf().build()
    for n in range(len(data)):
        err = assert_rejected(data[:n])
        assert any(w in err.problem for w in ("truncated", "remain", "past", "fit", "end")), (
            err.problem
        )


def test_truncated_at_every_section_boundary():
    g = small_valid_gguf()
    data = g.build()
    cuts = {0, 3, 4, 7, 8, 15, 16, 23, 24, g.data_start}
    cuts |= set(g.kv_starts) | {s + 8 for s in g.kv_starts} | set(g.info_starts)
    for n in sorted(cuts):
        assert_rejected(data[:n])


@pytest.mark.slow
def test_real_header_truncated_at_each_key_and_inside_the_vocabulary(smollm2_path):
    with open_gguf(smollm2_path) as gf:
        key_starts = [f.offset for f in gf.fields.values()]
        data_offset = gf.data_offset
    with open(smollm2_path, "rb") as fh:
        header = fh.read(data_offset)
    rng = np.random.default_rng(0)
    cuts = key_starts + [int(x) for x in rng.integers(24, data_offset, 40)] + [data_offset - 1]
    for n in cuts:
        assert_rejected(header[:n])
    # the complete header with no tensor data: every tensor is past the end
    assert_rejected(header, "passes the end")


# --- header --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "magic, version, match",
    [
        (b"GGML", 3, "bad magic"),
        (b"FUGG", 3, "bad magic"),
        (b"\0\0\0\0", 3, "bad magic"),
        (b"GGUF", 0, "unknown GGUF version 0"),
        (b"GGUF", 1, "version 1 is not supported"),
        (b"GGUF", 4, "unknown GGUF version 4"),
        (b"GGUF", 0x03000000, "big-endian"),
        (b"GGUF", 0x02000000, "big-endian"),
        (b"GGUF", 0xFFFFFFFF, "unknown GGUF version"),
    ],
)
def test_bad_magic_or_version(magic, version, match):
    g = small_valid_gguf()
    g.magic, g.version = magic, version
    assert_rejected(g.build(), match)


@pytest.mark.parametrize("field", ["tensor_count", "kv_count"])
@pytest.mark.parametrize("count", [U64_MAX, 2**63, 2**61, 2**60 + 1, 10**6])
def test_counts_that_cannot_fit(field, count):
    g = small_valid_gguf()
    setattr(g, field, count)
    assert_rejected(g.build(), "cannot fit")


def test_counts_one_too_many():
    g = small_valid_gguf()
    g.kv_count = len(g.kvs) + 1
    assert_rejected(g.build())
    g = small_valid_gguf()
    g.tensor_count = len(g.infos) + 1
    assert_rejected(g.build())


# --- metadata ------------------------------------------------------------------------------------

STRING_TYPE = struct.pack("<I", 8)


@pytest.mark.parametrize(
    "kv, match",
    [
        # string lengths that overflow or pass the end
        (pack_string("k") + STRING_TYPE + struct.pack("<Q", U64_MAX) + b"abc", "length"),
        (pack_string("k") + STRING_TYPE + struct.pack("<Q", U64_MAX - 7) + b"abc", "length"),
        (pack_string("k") + STRING_TYPE + struct.pack("<Q", 2**63) + b"abc", "length"),
        (pack_string("k", length=U64_MAX), "length"),
        (pack_string("k", length=2**64 - 16), "length"),
        # unknown value types
        (pack_kv("k", 13, raw_value=b"\0" * 8), "unknown value type 13"),
        (pack_kv("k", 0xFFFFFFFF, raw_value=b"\0" * 8), "unknown value type"),
        # arrays: overflowing counts, invalid or nested element types
        (pack_kv("k", 9, raw_value=struct.pack("<IQ", 0, U64_MAX)), "claims"),
        (pack_kv("k", 9, raw_value=struct.pack("<IQ", 5, 2**62)), "claims"),
        (pack_kv("k", 9, raw_value=struct.pack("<IQ", 12, 2**61 + 1)), "claims"),
        (pack_kv("k", 9, raw_value=struct.pack("<IQ", 8, U64_MAX)), "claims"),
        (pack_kv("k", 9, raw_value=struct.pack("<IQ", 8, 2**61)), "claims"),
        (
            pack_kv(
                "k",
                9,
                raw_value=struct.pack("<IQ", 8, 3)
                + pack_string("a")
                + pack_string("bb", length=40)
                + bytes(10),
            ),
            "string #1 of array 'k' runs past the end",
        ),
        (
            pack_kv(
                "k",
                9,
                raw_value=struct.pack("<IQ", 8, 2) + pack_string("a", length=U64_MAX) + bytes(20),
            ),
            "string #0 of array 'k' runs past the end",
        ),
        (
            pack_kv(
                "k",
                9,
                raw_value=struct.pack("<IQ", 8, 2) + pack_string("a") + pack_string("b")[:-2],
            ),
            "runs past the end",
        ),
        (pack_kv("k", 9, raw_value=struct.pack("<IQ", 9, 1) + struct.pack("<IQ", 0, 0)), "nested"),
        (pack_kv("k", 9, raw_value=struct.pack("<IQ", 13, 1) + b"\0" * 8), "unknown element type"),
        (pack_kv("k", 9, raw_value=struct.pack("<IQ", 0xFFFFFFFF, 0)), "unknown element type"),
        # bools that are neither 0 nor 1
        (pack_kv("k", 7, 2), "not 0 or 1"),
        (pack_kv("k", 9, (7, [0, 1, 255])), "other than 0 or 1"),
        # keys
        (pack_kv("", 4, 1), "empty"),
        (pack_kv(b"bad\xffkey", 4, 1), "UTF-8"),
        # invalid UTF-8 in values and array items (the last one: an item ending with a lead
        # byte, followed by a length whose low byte 0xA9 would complete it)
        (pack_kv("k", 8, b"caf\xc3"), "UTF-8"),
        (pack_kv("k", 8, b"\xed\xa0\x80"), "UTF-8"),  # a UTF-16 surrogate
        (pack_kv("k", 9, (8, ["ok", b"\x80x", "fine"])), "string #1"),
        (pack_kv("k", 9, (8, [b"ab\xc3", "x" * 0xA9])), "string #0"),
        (pack_kv("k", 9, (8, ["x" * 300, b"\xc3", "y" * 200])), "string #1"),
        (pack_kv("k", 9, (8, ["x", "y" * 0xBF, b"\xe2\x82"])), "string #2"),
        (pack_kv("k", 9, (8, ["a", b"\x80" + b"y" * 200, "z"])), "string #1"),
        (pack_kv("k", 9, (8, ["a", b"y" * 200 + b"\xf0\x9f", "z"])), "string #1"),
    ],
)
def test_bad_metadata(kv, match):
    data = GGUFBytes(kvs=[ARCH, kv], alignment=1).build()  # no padding to read on into
    assert_rejected(data, match)


def test_valid_utf8_next_to_long_length_fields_is_accepted():
    """The zeroing of length fields must not reject what is valid."""
    items = ["é" * 100, "x" * 0xC3, "€" * 60, "", "🦙" * 70, "end"]
    data = GGUFBytes(kvs=[ARCH, pack_kv("k", 9, (8, items))]).build()
    assert parse(data).metadata["k"] == items


def test_duplicate_keys():
    data = GGUFBytes(kvs=[ARCH, pack_kv("a", 4, 1), pack_kv("a", 4, 2)]).build()
    assert_rejected(data, "duplicate metadata key 'a'")


@pytest.mark.parametrize(
    "kv, match",
    [
        (pack_kv("general.alignment", 4, 0), "power of two"),
        (pack_kv("general.alignment", 4, 3), "power of two"),
        (pack_kv("general.alignment", 4, 48), "power of two"),
        (pack_kv("general.alignment", 4, 2**31), "power of two"),
        (pack_kv("general.alignment", 4, 2**32 - 1), "power of two"),
        (pack_kv("general.alignment", 5, -32), "power of two"),
        (pack_kv("general.alignment", 10, 2**64 - 1), "power of two"),
        (pack_kv("general.alignment", 8, "32"), "must be an integer"),
        (pack_kv("general.alignment", 6, 32.0), "must be an integer"),
    ],
)
def test_wrong_alignment(kv, match):
    data = GGUFBytes(kvs=[ARCH, kv], infos=[pack_tensor_info("t", [8], 0, 0)], data=bytes(32))
    assert_rejected(data.build(), match)


# --- tensor infos --------------------------------------------------------------------------------


def _dims_info(name, dims, type_id=0, offset=0, n_dims=None):
    return pack_tensor_info(name, dims, type_id, offset, n_dims=n_dims)


@pytest.mark.parametrize(
    "info, match",
    [
        (_dims_info("t" * 64, [8]), "64 bytes"),
        (_dims_info("é" * 32, [8]), "64 bytes"),
        (_dims_info(b"t\xff", [8]), "UTF-8"),
        (_dims_info("t", [1, 1, 1, 1, 1]), "5 dimensions"),
        (_dims_info("t", [], n_dims=0), "0 dimensions"),
        (_dims_info("t", [8], n_dims=0xFFFFFFFF), "dimensions"),
        (_dims_info("t", [8], n_dims=2), "dimension"),  # the 2nd dim reads the type field
        (_dims_info("t", [0]), "invalid dimension 0"),
        (_dims_info("t", [8, 0, 2]), "invalid dimension 0"),
        (_dims_info("t", [2**63]), "invalid dimension"),
        (_dims_info("t", [U64_MAX]), "invalid dimension"),
        (_dims_info("t", [2**32, 2**32]), "too many elements"),
        (_dims_info("t", [2**40, 2**20, 2**10]), "too many elements"),
        (_dims_info("t", [2**61]), "byte size overflows"),  # F32: 2^63 bytes
        (_dims_info("t", [2**40]), "passes the end"),
        (_dims_info("t", [8], type_id=4), "unknown or removed ggml type 4"),
        (_dims_info("t", [8], type_id=5), "ggml type 5"),
        (_dims_info("t", [8], type_id=31), "ggml type 31"),
        (_dims_info("t", [8], type_id=36), "ggml type 36"),
        (_dims_info("t", [8], type_id=0xFFFFFFFF), "ggml type"),
        (_dims_info("t", [33], type_id=8), "not a multiple of the Q8_0 block size 32"),
        (_dims_info("t", [128], type_id=12), "not a multiple of the Q4_K block size 256"),
        (_dims_info("t", [8], offset=1), "not a multiple of the alignment"),
        (_dims_info("t", [8], offset=16), "not a multiple of the alignment"),
        (_dims_info("t", [8], offset=64), "passes the end"),
        (_dims_info("t", [8], offset=2**64 - 32), "passes the end"),
        (_dims_info("t", [17]), "passes the end"),
    ],
)
def test_bad_tensor_info(info, match):
    assert_rejected(one_tensor_file(info), match)


def test_longest_allowed_tensor_name():
    gf = parse(one_tensor_file(_dims_info("t" * 63, [8])))
    assert list(gf.tensors) == ["t" * 63]


def test_duplicate_tensor_names():
    g = GGUFBytes(
        kvs=[ARCH], infos=[_dims_info("w", [8]), _dims_info("w", [8], offset=32)], data=bytes(64)
    )
    assert_rejected(g.build(), "duplicate tensor name 'w'")


@pytest.mark.parametrize(
    "offsets, dims",
    [
        ((0, 0), ([8], [8])),  # same place
        ((0, 32), ([16], [8])),  # the first runs into the second
        ((32, 0), ([8], [16])),  # listed out of order and overlapping
    ],
)
def test_overlapping_tensors(offsets, dims):
    infos = [
        _dims_info(f"t{i}", d, offset=o) for i, (o, d) in enumerate(zip(offsets, dims, strict=True))
    ]
    assert_rejected(GGUFBytes(kvs=[ARCH], infos=infos, data=bytes(128)).build(), "overlaps")


def test_adjacent_tensors_out_of_order_are_fine():
    infos = [_dims_info("b", [8], offset=32), _dims_info("a", [8], offset=0)]
    gf = parse(GGUFBytes(kvs=[ARCH], infos=infos, data=bytes(64)).build())
    assert gf.tensor("a").offset + 32 == gf.tensor("b").offset


def test_tensor_data_must_start_within_the_file():
    # the padding to the data section is itself missing
    g = GGUFBytes(kvs=[ARCH], infos=[_dims_info("t", [8])], data=bytes(32))
    data = g.build()
    assert_rejected(data[: g.info_starts[0] + len(g.infos[0]) + 1])


# --- random mutations of a valid file ------------------------------------------------------------

VALID = small_valid_gguf().build()
INTERESTING_U64 = [0, 1, 2**31, 2**32 - 1, 2**32, 2**63 - 1, 2**63, U64_MAX, U64_MAX - 7, 64, 65]


@st.composite
def mutated_files(draw) -> bytes:
    data = bytearray(VALID)
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(["byte", "u64", "u32", "cut"]))
        if not data:
            break
        pos = draw(st.integers(0, len(data) - 1))
        if kind == "byte":
            data[pos] = draw(st.sampled_from([0, 1, 0x7F, 0x80, 0xC3, 0xFF]) | st.integers(0, 255))
        elif kind == "u64":
            value = draw(st.sampled_from(INTERESTING_U64) | st.integers(0, U64_MAX))
            data[pos : pos + 8] = struct.pack("<Q", value)
        elif kind == "u32":
            value = draw(
                st.sampled_from([0, 4, 5, 9, 13, 31, 2**32 - 1]) | st.integers(0, 2**32 - 1)
            )
            data[pos : pos + 4] = struct.pack("<I", value)
        else:
            del data[pos:]
    return bytes(data)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(mutated_files())
def test_mutated_files_parse_or_raise_gguf_error(data):
    try:
        gf = parse(data)
    except GGUFError as e:
        assert e.path == "bad.gguf"
        assert e.offset is None or 0 <= e.offset <= len(data)
        return
    touch_everything(gf)
