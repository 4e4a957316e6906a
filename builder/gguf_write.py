"""Writes GGUF files (version 3): metadata copied with its original value types, tensor infos
placed at `alignment`, tensor data written by the caller at the offsets this module computes.

The quantizer and the imatrix writer use it; the reader (runtime/gguf.py) checks what it writes.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np
from qpack.runtime.gguf import (
    _ARRAY_DTYPE,
    _SCALAR_STRUCT,
    GGUF_MAGIC,
    T_ARRAY,
    T_BOOL,
    T_STRING,
    MetadataField,
)
from qpack.runtime.quants import QuantType


@dataclass(frozen=True)
class KeyValue:
    key: str
    value_type: int
    value: Any
    elem_type: int | None = None  # for arrays

    @classmethod
    def of(cls, f: MetadataField) -> KeyValue:
        return cls(f.key, f.value_type, f.value, f.elem_type)


@dataclass(frozen=True)
class TensorPlan:
    name: str
    shape: tuple[int, ...]  # ggml order
    type: QuantType

    @property
    def nbytes(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n // self.type.block_elems * self.type.block_bytes


def _string(s: str) -> bytes:
    b = s.encode()
    return struct.pack("<Q", len(b)) + b


def _value(value_type: int, value: Any, elem_type: int | None) -> bytes:
    if value_type == T_STRING:
        return _string(value)
    if value_type == T_ARRAY:
        items = list(value) if elem_type == T_STRING else value
        head = struct.pack("<IQ", elem_type, len(items))
        if elem_type == T_STRING:
            return head + b"".join(_string(s) for s in items)
        arr = np.asarray(items, dtype=_ARRAY_DTYPE[elem_type])
        return head + arr.tobytes()
    if value_type == T_BOOL:
        return struct.pack("<B", int(bool(value)))
    return _SCALAR_STRUCT[value_type].pack(value)


def header_bytes(kvs: Iterable[KeyValue], tensors: list[TensorPlan], alignment: int) -> bytes:
    """Everything before the tensor data, padded to `alignment`."""
    kvs = list(kvs)
    out = [GGUF_MAGIC, struct.pack("<IQQ", 3, len(tensors), len(kvs))]
    for kv in kvs:
        out.append(_string(kv.key) + struct.pack("<I", kv.value_type))
        out.append(_value(kv.value_type, kv.value, kv.elem_type))
    for t, offset in zip(tensors, data_offsets(tensors, alignment), strict=True):
        out.append(_string(t.name) + struct.pack("<I", len(t.shape)))
        out.append(struct.pack(f"<{len(t.shape)}Q", *t.shape))
        out.append(struct.pack("<IQ", t.type.id, offset))
    head = b"".join(out)
    return head + bytes(-len(head) % alignment)


def data_offsets(tensors: list[TensorPlan], alignment: int) -> list[int]:
    """Each tensor's offset from the start of the data section (each padded to alignment)."""
    offsets, at = [], 0
    for t in tensors:
        offsets.append(at)
        at += t.nbytes + (-t.nbytes % alignment)
    return offsets


def data_size(tensors: list[TensorPlan], alignment: int) -> int:
    return sum(t.nbytes + (-t.nbytes % alignment) for t in tensors)
