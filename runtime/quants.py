"""One table of ggml tensor types: how many elements a block holds and how many bytes it takes.

The GGUF reader sizes every tensor from this table (including types the engine cannot run, so
that such a file still opens and `qpack inspect` can describe it); the engine refuses anything
not in SUPPORTED_WEIGHT_TYPES with a clear error. That set is the kernels' own list, read from
the compiled module (cython/quant_types.def is its one source); a test checks that the kernels'
block sizes agree with this table's.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class QuantType:
    """A ggml tensor type: `block_elems` elements are stored in `block_bytes` bytes."""

    id: int
    name: str
    block_elems: int
    block_bytes: int

    @property
    def bits_per_weight(self) -> float:
        return 8.0 * self.block_bytes / self.block_elems

    def row_bytes(self, n_elements: int) -> int:
        """Bytes of a row of `n_elements` (a multiple of block_elems)."""
        return n_elements // self.block_elems * self.block_bytes


# ggml_type ids and block sizes, as in ggml's ggml.h / ggml-common.h. Ids that ggml removed
# (4, 5: Q4_2/Q4_3; 31-33, 36-38: repacked variants) are absent on purpose: a file using
# them is rejected as having an unknown type.
_TABLE = (
    QuantType(0, "F32", 1, 4),
    QuantType(1, "F16", 1, 2),
    QuantType(2, "Q4_0", 32, 18),
    QuantType(3, "Q4_1", 32, 20),
    QuantType(6, "Q5_0", 32, 22),
    QuantType(7, "Q5_1", 32, 24),
    QuantType(8, "Q8_0", 32, 34),
    QuantType(9, "Q8_1", 32, 40),
    QuantType(10, "Q2_K", 256, 84),
    QuantType(11, "Q3_K", 256, 110),
    QuantType(12, "Q4_K", 256, 144),
    QuantType(13, "Q5_K", 256, 176),
    QuantType(14, "Q6_K", 256, 210),
    QuantType(15, "Q8_K", 256, 292),
    QuantType(16, "IQ2_XXS", 256, 66),
    QuantType(17, "IQ2_XS", 256, 74),
    QuantType(18, "IQ3_XXS", 256, 98),
    QuantType(19, "IQ1_S", 256, 50),
    QuantType(20, "IQ4_NL", 32, 18),
    QuantType(21, "IQ3_S", 256, 110),
    QuantType(22, "IQ2_S", 256, 82),
    QuantType(23, "IQ4_XS", 256, 136),
    QuantType(24, "I8", 1, 1),
    QuantType(25, "I16", 1, 2),
    QuantType(26, "I32", 1, 4),
    QuantType(27, "I64", 1, 8),
    QuantType(28, "F64", 1, 8),
    QuantType(29, "IQ1_M", 256, 56),
    QuantType(30, "BF16", 1, 2),
    QuantType(34, "TQ1_0", 256, 54),
    QuantType(35, "TQ2_0", 256, 66),
    QuantType(39, "MXFP4", 32, 17),
    QuantType(40, "NVFP4", 64, 36),
    QuantType(41, "Q1_0", 128, 18),
)

QUANT_TYPES_BY_ID: dict[int, QuantType] = {t.id: t for t in _TABLE}
QUANT_TYPES_BY_NAME: dict[str, QuantType] = {t.name: t for t in _TABLE}


def _kernel_types() -> frozenset[str]:
    """The types cython/quant_types.def lists, from the generic module (every build has it, and
    every variant compiles the same list)."""
    from . import _native_generic

    return frozenset(name for _id, name, _elems, _bytes in _native_generic.supported_types())


# The weight types the engine runs (kernels for each, tested against gguf.quants).
SUPPORTED_WEIGHT_TYPES: frozenset[str] = _kernel_types()


def quant_type(key: int | str) -> QuantType | None:
    """The type with this ggml id or name (e.g. 3 or "Q4_1"), or None if ggml has no such type."""
    if isinstance(key, str):
        return QUANT_TYPES_BY_NAME.get(key.upper())
    return QUANT_TYPES_BY_ID.get(key)


def is_supported(qtype: QuantType) -> bool:
    """Whether the engine has kernels for tensors of this type."""
    return qtype.name in SUPPORTED_WEIGHT_TYPES
