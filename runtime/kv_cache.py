"""The KV cache's element types (--cache-type-k / --cache-type-v), as forward.h stores them:
f16 values, or ggml's q8_0 blocks (32 int8 values and an f16 scale) quantized per token and
KV head when written. Kept free of numpy: the command line imports it for its choices."""

from __future__ import annotations

from .errors import UnsupportedModel

# name -> (ggml type id, values per block, bytes per block)
CACHE_TYPES = {"f16": (1, 1, 2), "q8_0": (8, 32, 34)}


def cache_row_bytes(cache_type: str, n: int) -> int:
    """Bytes of one cached row of n values (one head at one position) in a KV cache type."""
    _, block_values, block_bytes = CACHE_TYPES[cache_type]
    if n % block_values:
        raise UnsupportedModel(
            f"a {cache_type} KV cache needs head sizes that are a multiple of {block_values}, "
            f"not {n}"
        )
    return n // block_values * block_bytes
