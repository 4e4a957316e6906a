# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""Compiled quantizers for the builder (`qpack quantize`): the IQ1/IQ2/IQ3 grid searches
(iq_quantize.h) and Q8_0/Q4_K/Q6_K without an importance matrix (k_quantize.h). Built once
with generic flags by setup.py as qpack.builder._quantize."""

import numpy as np

cimport numpy as cnp
from libc.stdint cimport int64_t, uint8_t

cnp.import_array()

cdef extern from "quantize/iq_quantize.h":
    int QQ_IQ2_XXS, QQ_IQ2_XS, QQ_IQ2_S, QQ_IQ3_XXS, QQ_IQ3_S, QQ_IQ1_S, QQ_IQ1_M
    int qq_prepare(int type)
    int qq_quantize_rows(int type, const float *x, uint8_t *y, int64_t nrows, int64_t n_per_row,
                         const float *qw) nogil

cdef extern from "quantize/k_quantize.h":
    int QQ_Q8_0, QQ_Q4_K, QQ_Q6_K
    void qq_quantize_k_rows(int type, const float *x, uint8_t *y, int64_t nrows,
                            int64_t n_per_row) nogil

K_TYPES = {"Q8_0": (QQ_Q8_0, 32, 34), "Q4_K": (QQ_Q4_K, 256, 144), "Q6_K": (QQ_Q6_K, 256, 210)}

TYPES = {
    "IQ2_XXS": (QQ_IQ2_XXS, 66), "IQ2_XS": (QQ_IQ2_XS, 74), "IQ2_S": (QQ_IQ2_S, 82),
    "IQ3_XXS": (QQ_IQ3_XXS, 98), "IQ3_S": (QQ_IQ3_S, 110),
    "IQ1_S": (QQ_IQ1_S, 50), "IQ1_M": (QQ_IQ1_M, 56),
}


def quantize_rows(str type_name, x, imatrix=None):
    """float32 rows (n_rows, n_per_row), n_per_row a multiple of 256, -> uint8 (n_rows,
    row_bytes) blocks of `type_name`; `imatrix`: n_per_row column weights or None. The grid
    tables are built on first use (under the GIL); the search runs without it."""
    cdef int t
    cdef int block
    t, block = TYPES[type_name]
    cdef cnp.ndarray[cnp.float32_t, ndim=2, mode="c"] xa = np.ascontiguousarray(x, dtype=np.float32)
    cdef int64_t nrows = xa.shape[0], n = xa.shape[1]
    if n % 256:
        raise ValueError(f"{type_name} needs rows that are a multiple of 256 (got {n})")
    cdef cnp.ndarray[cnp.float32_t, ndim=1, mode="c"] qa
    cdef const float *qw = NULL
    if imatrix is not None:
        qa = np.ascontiguousarray(imatrix, dtype=np.float32).reshape(-1)
        if qa.shape[0] != n:
            raise ValueError(f"the importance matrix has {qa.shape[0]} values for rows of {n}")
        qw = &qa[0]
    if qq_prepare(t) != 0:
        raise MemoryError("building the IQ grid tables failed")
    out = np.empty((nrows, n // 256 * block), dtype=np.uint8)
    cdef cnp.ndarray[cnp.uint8_t, ndim=2, mode="c"] oa = out
    cdef int rc = 0
    if nrows:
        with nogil:
            rc = qq_quantize_rows(t, &xa[0, 0], &oa[0, 0], nrows, n, qw)
    if rc:
        raise ValueError(f"{type_name} needs an importance matrix")
    return out


def quantize_k_rows(str type_name, x):
    """float32 rows (n_rows, n_per_row) -> uint8 blocks of Q8_0, Q4_K or Q6_K (no imatrix)."""
    cdef int t, elems, block
    t, elems, block = K_TYPES[type_name]
    cdef cnp.ndarray[cnp.float32_t, ndim=2, mode="c"] xa = np.ascontiguousarray(x, dtype=np.float32)
    cdef int64_t nrows = xa.shape[0], n = xa.shape[1]
    if n % elems:
        raise ValueError(f"{type_name} needs rows that are a multiple of {elems} (got {n})")
    out = np.empty((nrows, n // elems * block), dtype=np.uint8)
    cdef cnp.ndarray[cnp.uint8_t, ndim=2, mode="c"] oa = out
    if nrows:
        with nogil:
            qq_quantize_k_rows(t, &xa[0, 0], &oa[0, 0], nrows, n)
    return out
