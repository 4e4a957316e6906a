"""A strict, fast GGUF reader whose results are views of one read-only mapping.

A model file is untrusted input. Every count, length, dimension, type id, offset and size is
checked against the bytes actually present *before* it is used, and every problem is raised
as GGUFError(path, byte offset, what is wrong) -- never struct.error, IndexError, MemoryError,
UnicodeDecodeError or a hang. Loops run at most as many times as the remaining bytes allow.

Nothing is copied: tensor data and numeric metadata arrays are read-only numpy views of the
mapping, and long string arrays (the vocabulary, the merges) are decoded lazily, item by item,
after their structure and UTF-8 have been validated at open.
"""

from __future__ import annotations

import codecs
import mmap
import os
import stat
import struct
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .errors import GGUFError, QpackError
from .quants import QuantType, quant_type

GGUF_MAGIC = b"GGUF"
SUPPORTED_VERSIONS = (2, 3)
DEFAULT_ALIGNMENT = 32
MAX_ALIGNMENT = 1 << 16  # the executable's model member is aligned to 64 KiB; more is absurd
MAX_TENSOR_NAME_BYTES = 63  # ggml's GGML_MAX_NAME is 64 including the terminating NUL
MAX_DIMS = 4
INT64_MAX = (1 << 63) - 1

# GGUF metadata value types.
T_UINT8, T_INT8, T_UINT16, T_INT16, T_UINT32, T_INT32, T_FLOAT32, T_BOOL = range(8)
T_STRING, T_ARRAY, T_UINT64, T_INT64, T_FLOAT64 = range(8, 13)

VALUE_TYPE_NAMES: dict[int, str] = {
    T_UINT8: "u8", T_INT8: "i8", T_UINT16: "u16", T_INT16: "i16",
    T_UINT32: "u32", T_INT32: "i32", T_FLOAT32: "f32", T_BOOL: "bool",
    T_STRING: "string", T_ARRAY: "array",
    T_UINT64: "u64", T_INT64: "i64", T_FLOAT64: "f64",
}  # fmt: skip
INTEGER_TYPES = frozenset(
    {T_UINT8, T_INT8, T_UINT16, T_INT16, T_UINT32, T_INT32, T_UINT64, T_INT64}
)

# Fixed-size value types: struct format (scalars) and numpy dtype (arrays), both little-endian.
_SCALAR_STRUCT = {
    t: struct.Struct(f)
    for t, f in {
        T_UINT8: "<B", T_INT8: "<b", T_UINT16: "<H", T_INT16: "<h", T_UINT32: "<I",
        T_INT32: "<i", T_FLOAT32: "<f", T_BOOL: "<B", T_UINT64: "<Q", T_INT64: "<q",
        T_FLOAT64: "<d",
    }.items()
}  # fmt: skip
_ARRAY_DTYPE = {
    T_UINT8: np.dtype("u1"), T_INT8: np.dtype("i1"), T_UINT16: np.dtype("<u2"),
    T_INT16: np.dtype("<i2"), T_UINT32: np.dtype("<u4"), T_INT32: np.dtype("<i4"),
    T_FLOAT32: np.dtype("<f4"), T_BOOL: np.dtype("?"), T_UINT64: np.dtype("<u8"),
    T_INT64: np.dtype("<i8"), T_FLOAT64: np.dtype("<f8"),
}  # fmt: skip

_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")
# Smallest possible encodings, used to refuse counts that the remaining bytes cannot hold.
_MIN_KV_BYTES = 8 + 4 + 1  # empty key... (rejected later) + type + 1-byte value
_MIN_TENSOR_INFO_BYTES = 8 + 4 + 8 + 4 + 8  # name length, n_dims, one dim, type, offset


def value_type_name(value_type: int, elem_type: int | None = None) -> str:
    """'u32', 'string', 'array[i32]' ... for messages and `qpack inspect --all`."""
    if value_type == T_ARRAY:
        return f"array[{VALUE_TYPE_NAMES.get(elem_type, '?')}]"
    return VALUE_TYPE_NAMES.get(value_type, f"type {value_type}")


class StringArray(Sequence):
    """A GGUF string array decoded on demand (the vocabulary has ~50k-250k items).

    Structure and UTF-8 were validated when the file was opened, so decoding cannot fail.
    Compares equal to any sequence of the same strings.
    """

    __slots__ = ("_buf", "_starts", "_end")

    def __init__(self, buf: memoryview, starts: list[int], end: int):
        self._buf = buf  # the region; item i is buf[starts[i] : next length field or end]
        self._starts = starts
        self._end = end

    def __len__(self) -> int:
        return len(self._starts)

    def _item_end(self, i: int) -> int:
        return self._starts[i + 1] - 8 if i + 1 < len(self._starts) else self._end

    def __getitem__(self, index):
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        n = len(self._starts)
        if index < 0:
            index += n
        if not 0 <= index < n:
            raise IndexError(f"string array index {index} out of range ({n} items)")
        return str(self._buf[self._starts[index] : self._item_end(index)], "utf-8")

    def tolist(self) -> list[str]:
        """All items at once: one copy of the array's bytes, then a slice per item (fast)."""
        if not self._starts:
            return []
        base = self._starts[0] - 8
        raw = bytes(self._buf[base : self._end])
        starts = self._starts
        ends = [s - 8 for s in starts[1:]]
        ends.append(self._end)
        return [raw[s - base : e - base].decode() for s, e in zip(starts, ends, strict=True)]

    def __iter__(self) -> Iterator[str]:
        return iter(self.tolist())

    def __eq__(self, other: object) -> bool:
        if isinstance(other, (StringArray, list, tuple)):
            return len(self) == len(other) and all(a == b for a, b in zip(self, other, strict=True))
        return NotImplemented

    __hash__ = None  # mutable-sequence semantics for equality; not hashable

    def __repr__(self) -> str:
        head = ", ".join(repr(s) for s in self[:3])
        more = ", ..." if len(self) > 3 else ""
        return f"StringArray([{head}{more}], {len(self)} items)"


@dataclass(frozen=True)
class MetadataField:
    """One key-value pair as stored: its GGUF value type (and element type for arrays), where
    the key starts in the file, and the parsed value."""

    key: str
    value_type: int
    elem_type: int | None
    offset: int
    value: Any = field(repr=False)

    @property
    def type_name(self) -> str:
        return value_type_name(self.value_type, self.elem_type)


@dataclass(frozen=True)
class TensorInfo:
    """A tensor's description; `data` is a read-only uint8 view of its bytes in the mapping."""

    name: str
    ggml_type: int
    type: QuantType
    shape: tuple[int, ...]  # ggml order: shape[0] is the contiguous axis
    n_elements: int
    nbytes: int
    offset: int  # absolute byte offset of the data within the GGUF region
    _region: np.ndarray = field(repr=False, compare=False)

    @property
    def data(self) -> np.ndarray:
        return self._region[self.offset : self.offset + self.nbytes]

    @property
    def row_elems(self) -> int:
        return self.shape[0]

    @property
    def row_bytes(self) -> int:
        return self.type.row_bytes(self.shape[0])

    @property
    def n_rows(self) -> int:
        return self.n_elements // self.shape[0]


def rows(ti: TensorInfo) -> np.ndarray:
    """The tensor's bytes as (n_rows, row_bytes): one quantized row per line, no copy."""
    return ti.data.reshape(ti.n_rows, ti.row_bytes)


class GGUFFile:
    """A parsed GGUF file (or region of a larger file) over one read-only mapping."""

    def __init__(self, buffer: Any, path: str, *, base_offset: int = 0, _mmap=None):
        mv = memoryview(buffer)
        if mv.ndim != 1 or mv.format != "B":
            mv = mv.cast("B")
        self.path = str(path)
        self._mv = mv
        self._mmap = _mmap
        self._base = base_offset  # where the region starts in the file, for error offsets
        self.file_size = len(mv)
        region = np.frombuffer(mv, dtype=np.uint8)
        if region.flags.writeable:  # a bytearray from a test: still hand out read-only views
            region = region.view()
            region.flags.writeable = False
        self._region = region
        self.closed = False
        _Parser(self).parse()

    @classmethod
    def from_buffer(cls, buf: Any, name: str = "<buffer>") -> GGUFFile:
        """Parse GGUF bytes already in memory (bytes, bytearray, memoryview, mmap)."""
        return cls(buf, name)

    # The following are set by _Parser.parse().
    version: int
    fields: dict[str, MetadataField]
    metadata: dict[str, Any]
    alignment: int
    data_offset: int
    tensors: dict[str, TensorInfo]

    @property
    def mapping(self) -> tuple[mmap.mmap, int] | None:
        """The mapping and the file offset it starts at (open_gguf maps from a granule
        boundary), or None for bytes already in memory or once closed."""
        if self._mmap is None:
            return None
        return self._mmap, self._base - self._base % mmap.ALLOCATIONGRANULARITY

    @property
    def architecture(self) -> str:
        arch = self.metadata.get("general.architecture")
        if not isinstance(arch, str) or not arch:
            raise GGUFError(self.path, None, "no general.architecture string in the metadata")
        return arch

    def tensor(self, name: str) -> TensorInfo:
        try:
            return self.tensors[name]
        except KeyError:
            raise GGUFError(self.path, None, f"no tensor named {name!r}") from None

    def close(self) -> None:
        """Drop this object's hold on the mapping. It is unmapped as soon as nothing else
        holds a view into it (tensor data, metadata arrays, string arrays); views kept
        elsewhere stay valid, since mmap never unmaps memory that is still exported."""
        self.closed = True
        self._region = None
        self._mv = None
        self._mmap = None
        self.tensors = {}
        self.fields = {}
        self.metadata = {}

    def __enter__(self) -> GGUFFile:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self.closed else f"{len(self.tensors)} tensors"
        return f"<GGUFFile {self.path!r} v{getattr(self, 'version', '?')} {state}>"


class _Parser:
    """Reads the header, metadata and tensor infos of a GGUFFile's region, checking as it goes."""

    def __init__(self, gf: GGUFFile):
        self.gf = gf
        self.mv = gf._mv
        self.end = len(self.mv)
        self.pos = 0

    # --- primitives -------------------------------------------------------------------------

    def fail(self, problem: str, at: int | None = None) -> GGUFError:
        return GGUFError(self.gf.path, self.gf._base + (self.pos if at is None else at), problem)

    def need(self, n: int, what: str) -> None:
        if n > self.end - self.pos:
            raise self.fail(
                f"truncated: {what} needs {n} bytes but only {self.end - self.pos} remain"
            )

    def u32(self, what: str) -> int:
        self.need(4, what)
        (v,) = _U32.unpack_from(self.mv, self.pos)
        self.pos += 4
        return v

    def u64(self, what: str) -> int:
        self.need(8, what)
        (v,) = _U64.unpack_from(self.mv, self.pos)
        self.pos += 8
        return v

    def string(self, what: str) -> str:
        at = self.pos
        n = self.u64(f"length of {what}")
        if n > self.end - self.pos:
            raise self.fail(
                f"{what} has length {n} but only {self.end - self.pos} bytes remain", at
            )
        raw = self.mv[self.pos : self.pos + n]
        try:
            s = codecs.utf_8_decode(raw, "strict", True)[0]
        except UnicodeDecodeError as e:
            raise self.fail(f"{what} is not valid UTF-8 ({e.reason})", self.pos + e.start) from None
        self.pos += n
        return s

    # --- sections ---------------------------------------------------------------------------

    def parse(self) -> None:
        gf = self.gf
        self.need(4, "magic")
        magic = bytes(self.mv[0:4])
        if magic != GGUF_MAGIC:
            raise self.fail(f"bad magic {magic!r} (expected {GGUF_MAGIC!r}): not a GGUF file")
        self.pos = 4
        version = self.u32("version")
        if version not in SUPPORTED_VERSIONS:
            raise self.fail(_version_problem(version), 4)
        gf.version = version
        tensor_count = self.u64("tensor count")
        kv_count = self.u64("metadata key-value count")
        if kv_count > (self.end - self.pos) // _MIN_KV_BYTES:
            raise self.fail(
                f"metadata count {kv_count} cannot fit in the {self.end - self.pos} bytes "
                "that follow", 16
            )  # fmt: skip
        if tensor_count > (self.end - self.pos) // _MIN_TENSOR_INFO_BYTES:
            raise self.fail(
                f"tensor count {tensor_count} cannot fit in the {self.end - self.pos} bytes "
                "that follow", 8
            )  # fmt: skip

        fields: dict[str, MetadataField] = {}
        for i in range(kv_count):
            f = self.key_value(i)
            if f.key in fields:
                raise self.fail(f"duplicate metadata key {f.key!r}", f.offset)
            fields[f.key] = f
        gf.fields = fields
        gf.metadata = {k: f.value for k, f in fields.items()}
        gf.alignment = self.alignment(fields.get("general.alignment"))

        infos = [self.tensor_info(i) for i in range(tensor_count)]
        gf.data_offset = _align_up(self.pos, gf.alignment)
        if infos and gf.data_offset > self.end:
            raise self.fail("truncated: the tensor data section starts past the end", self.pos)
        gf.tensors = self.place_tensors(infos)

    def key_value(self, index: int) -> MetadataField:
        at = self.pos
        key = self.string(f"metadata key #{index}")
        if not key:
            raise self.fail(f"metadata key #{index} is empty", at)
        value_type = self.u32(f"value type of {key!r}")
        if value_type == T_ARRAY:
            elem_type, value = self.array(key)
            return MetadataField(key, T_ARRAY, elem_type, self.gf._base + at, value)
        return MetadataField(
            key, value_type, None, self.gf._base + at, self.scalar(key, value_type)
        )

    def scalar(self, key: str, value_type: int) -> Any:
        if value_type == T_STRING:
            return self.string(f"value of {key!r}")
        s = _SCALAR_STRUCT.get(value_type)
        if s is None:
            raise self.fail(f"unknown value type {value_type} for key {key!r}", self.pos - 4)
        self.need(s.size, f"value of {key!r}")
        (v,) = s.unpack_from(self.mv, self.pos)
        if value_type == T_BOOL:
            if v > 1:
                raise self.fail(f"bool value of {key!r} is {v}, not 0 or 1")
            v = bool(v)
        self.pos += s.size
        return v

    def array(self, key: str) -> tuple[int, Any]:
        type_at = self.pos
        elem_type = self.u32(f"element type of array {key!r}")
        count = self.u64(f"item count of array {key!r}")
        if elem_type == T_ARRAY:
            raise self.fail(f"array {key!r} holds arrays: nested arrays are not allowed", type_at)
        if elem_type == T_STRING:
            return elem_type, self.string_array(key, count)
        dtype = _ARRAY_DTYPE.get(elem_type)
        if dtype is None:
            raise self.fail(f"array {key!r} has unknown element type {elem_type}", type_at)
        if count > (self.end - self.pos) // dtype.itemsize:
            raise self.fail(
                f"array {key!r} claims {count} items of {dtype.itemsize} bytes but only "
                f"{self.end - self.pos} bytes remain", type_at + 4
            )  # fmt: skip
        values = np.frombuffer(self.mv, dtype=dtype, count=count, offset=self.pos)
        if elem_type == T_BOOL and count and values.view(np.uint8).max() > 1:
            raise self.fail(f"bool array {key!r} holds a value other than 0 or 1")
        if values.flags.writeable:
            values.flags.writeable = False
        self.pos += count * dtype.itemsize
        return elem_type, values

    def string_array(self, key: str, count: int) -> StringArray:
        count_at = self.pos - 8
        if count > (self.end - self.pos) // 8:
            raise self.fail(
                f"string array {key!r} claims {count} items but only {self.end - self.pos} "
                "bytes remain", count_at
            )  # fmt: skip
        # Walk the length prefixes. A length past the end makes the next read fail (or the
        # final check below), so each step needs no bounds test of its own: that is the hot loop.
        mv = self.mv
        unpack = _U64.unpack_from
        starts: list[int] = []
        append = starts.append
        pos = self.pos
        try:
            for _ in range(count):
                (n,) = unpack(mv, pos)
                pos += 8
                append(pos)
                pos += n
        except (struct.error, OverflowError):
            pos = -1
        if not 0 <= pos <= self.end:
            bad = len(starts) - 1  # the last length read is the one that overran
            at = starts[bad] - 8 if starts else self.pos
            raise self.fail(f"string #{bad} of array {key!r} runs past the end of the data", at)
        self.check_utf8(key, starts, pos)
        self.pos = pos
        return StringArray(self.mv, starts, pos)

    def check_utf8(self, key: str, starts: list[int], end: int) -> None:
        """Validate every item of a string array with a few decodes of long spans.

        Between items sit 8-byte length fields. A length below 128 is all ASCII bytes, which
        end any multi-byte sequence, so a span of items separated by such fields decodes as
        UTF-8 exactly when each item does. The span is cut around the (rare) fields of longer
        items, whose bytes could complete a sequence that an item leaves open.
        """
        if not starts:
            return
        st = np.array(starts, dtype=np.int64)
        lengths = np.empty_like(st)
        lengths[:-1] = st[1:] - 8 - st[:-1]
        lengths[-1] = end - st[-1]
        cuts = st[np.flatnonzero(lengths[1:] >= 128) + 1].tolist()
        seg_start = starts[0]
        for seg_end, next_start in [(c - 8, c) for c in cuts] + [(end, end)]:
            try:
                codecs.utf_8_decode(self.mv[seg_start:seg_end], "strict", True)
            except UnicodeDecodeError as e:
                at = seg_start + e.start
                item = int(np.searchsorted(st, at, side="right")) - 1
                raise self.fail(
                    f"string #{item} of array {key!r} is not valid UTF-8 ({e.reason})", at
                ) from None
            seg_start = next_start

    def alignment(self, f: MetadataField | None) -> int:
        if f is None:
            return DEFAULT_ALIGNMENT
        if f.value_type not in INTEGER_TYPES:
            raise self.fail(
                f"general.alignment must be an integer, not {f.type_name}", f.offset - self.gf._base
            )
        a = f.value
        if a <= 0 or a & (a - 1) or a > MAX_ALIGNMENT:
            raise self.fail(
                f"general.alignment {a} is not a power of two between 1 and {MAX_ALIGNMENT}",
                f.offset - self.gf._base,
            )
        return a

    def tensor_info(self, index: int) -> tuple:
        """(info offset, name, shape, type, n_elements, nbytes, relative data offset)."""
        at = self.pos
        name = self.string(f"name of tensor #{index}")
        if len(name.encode()) > MAX_TENSOR_NAME_BYTES:
            raise self.fail(
                f"tensor #{index} name is {len(name.encode())} bytes (at most "
                f"{MAX_TENSOR_NAME_BYTES} allowed)", at
            )  # fmt: skip
        n_dims = self.u32(f"n_dims of tensor {name!r}")
        if not 1 <= n_dims <= MAX_DIMS:
            raise self.fail(f"tensor {name!r} has {n_dims} dimensions (1 to {MAX_DIMS} allowed)")
        self.need(8 * n_dims, f"dimensions of tensor {name!r}")
        shape = struct.unpack_from(f"<{n_dims}Q", self.mv, self.pos)
        n_elements = 1
        for d in shape:
            if d == 0 or d > INT64_MAX:
                raise self.fail(f"tensor {name!r} has an invalid dimension {d} in {shape}")
            n_elements *= d
        if n_elements > INT64_MAX:
            raise self.fail(f"tensor {name!r} shape {shape} has too many elements (overflow)")
        self.pos += 8 * n_dims
        type_id = self.u32(f"type of tensor {name!r}")
        qtype = quant_type(type_id)
        if qtype is None:
            raise self.fail(
                f"tensor {name!r} has unknown or removed ggml type {type_id}", self.pos - 4
            )
        if shape[0] % qtype.block_elems:
            raise self.fail(
                f"tensor {name!r} row length {shape[0]} is not a multiple of the "
                f"{qtype.name} block size {qtype.block_elems}"
            )
        nbytes = n_elements // qtype.block_elems * qtype.block_bytes
        if nbytes > INT64_MAX:
            raise self.fail(f"tensor {name!r} byte size overflows ({nbytes})")
        rel_offset = self.u64(f"data offset of tensor {name!r}")
        return at, name, shape, qtype, n_elements, nbytes, rel_offset

    def place_tensors(self, infos: list) -> dict[str, TensorInfo]:
        gf = self.gf
        tensors: dict[str, TensorInfo] = {}
        spans = []
        for at, name, shape, qtype, n_elements, nbytes, rel in infos:
            if name in tensors:
                raise self.fail(f"duplicate tensor name {name!r}", at)
            if rel % gf.alignment:
                raise self.fail(
                    f"tensor {name!r} data offset {rel} is not a multiple of the alignment "
                    f"{gf.alignment}", at
                )  # fmt: skip
            start = gf.data_offset + rel
            if nbytes > self.end - start:  # also catches start past the end
                raise self.fail(
                    f"tensor {name!r} data [{start}, {start + nbytes}) passes the end of the "
                    f"file ({self.end} bytes)", at
                )  # fmt: skip
            tensors[name] = TensorInfo(
                name, qtype.id, qtype, tuple(shape), n_elements, nbytes, start, gf._region
            )
            spans.append((start, start + nbytes, name, at))
        spans.sort()
        for (_, end_a, name_a, _), (start_b, _, name_b, at_b) in zip(
            spans, spans[1:], strict=False
        ):
            if start_b < end_a:
                raise self.fail(f"tensor {name_b!r} data overlaps tensor {name_a!r}", at_b)
        return tensors


def _align_up(n: int, alignment: int) -> int:
    return (n + alignment - 1) // alignment * alignment


def _version_problem(version: int) -> str:
    if version == 1:
        return "GGUF version 1 is not supported: re-convert the model with a current llama.cpp"
    if int.from_bytes(version.to_bytes(4, "little"), "big") in (1, 2, 3):
        return "big-endian GGUF files are not supported: use a little-endian conversion"
    return f"unknown GGUF version {version} (supported: 2 and 3)"


def open_gguf(path: str | os.PathLike, offset: int = 0, length: int | None = None) -> GGUFFile:
    """Map `path` read-only and parse the GGUF in [offset, offset + length) (default: to the end).

    The region form reads a model embedded in an executable in place. The mapping starts at
    `offset` rounded down to mmap.ALLOCATIONGRANULARITY, as mmap requires; errors name bytes
    of the file (not of the region).
    """
    path = os.fspath(path)
    try:
        st = os.stat(path)
    except OSError as e:
        raise QpackError(f"{path}: cannot open: {e.strerror or e}") from None
    if not stat.S_ISREG(st.st_mode):
        raise QpackError(f"{path}: not a regular file")
    size = st.st_size
    if offset < 0 or offset > size:
        raise GGUFError(path, offset, f"region offset {offset} is outside the file ({size} bytes)")
    if length is None:
        length = size - offset
    if length < 0 or length > size - offset:
        raise GGUFError(
            path, offset, f"region of {length} bytes passes the end of the file ({size} bytes)"
        )
    if length == 0:
        raise GGUFError(path, offset, "empty: no GGUF header")
    start = offset - offset % mmap.ALLOCATIONGRANULARITY
    try:
        with open(path, "rb") as fh:
            mm = mmap.mmap(
                fh.fileno(), offset - start + length, access=mmap.ACCESS_READ, offset=start
            )
    except (OSError, ValueError) as e:
        raise QpackError(f"{path}: cannot map the file: {e}") from None
    # On a parse error the mapping is released with the last reference to it.
    view = memoryview(mm)[offset - start : offset - start + length]
    return GGUFFile(view, path, base_offset=offset, _mmap=mm)
