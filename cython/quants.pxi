# Python-facing wrappers of quants.h (owned by the kernels work): for tests, benchmarks and
# one-off dequantization. The engine calls the C API directly (forward.h).
# quants.h's C API (qk_traits, qk_get_traits, qk_act_row_bytes, qk_quantize_act) is declared
# once in native.pxi, shared with model.pxi: use those declarations, do not redeclare them.
# Every length is checked here before C touches a buffer.

import numpy as np

from qpack.runtime.errors import UnsupportedModel

ACT_F32 = QK_ACT_F32
ACT_Q8_32 = QK_ACT_Q8_32
ACT_Q8_256 = QK_ACT_Q8_256

_QK_ACT_NAMES = {QK_ACT_F32: "f32", QK_ACT_Q8_32: "q8_32", QK_ACT_Q8_256: "q8_256"}
_QK_ACT_BLOCK = {QK_ACT_F32: 1, QK_ACT_Q8_32: 32, QK_ACT_Q8_256: 256}


cdef const qk_traits *_qk_traits_or_raise(int ggml_type) except NULL:
    cdef const qk_traits *t = qk_get_traits(ggml_type)
    if t == NULL:
        raise UnsupportedModel(
            f"ggml tensor type {ggml_type} has no kernel in qpack ({VARIANT} build); "
            "re-quantize the model to a supported type (e.g. Q4_K_M or Q8_0)"
        )
    return t


cdef int64_t _qk_check_act(int act, int64_t n) except -1:
    if act not in _QK_ACT_BLOCK:
        raise ValueError(f"unknown activation format {act}")
    if n <= 0 or n % _QK_ACT_BLOCK[act]:
        raise ValueError(
            f"{n} elements: {_QK_ACT_NAMES[act]} activations need a positive multiple of "
            f"{_QK_ACT_BLOCK[act]}"
        )
    return n


cdef int64_t _qk_row_bytes(const qk_traits *t, int64_t n) except -1:
    if n <= 0 or n % t.block_elems:
        raise ValueError(
            f"{n} elements: a {t.name.decode()} row needs a positive multiple of {t.block_elems}"
        )
    return n // t.block_elems * t.block_bytes


def supported_types():
    """Every weight type this build runs (cython/quant_types.def, in its order), as
    (ggml id, name, block elems, block bytes): what runtime/quants.py reads."""
    cdef const qk_traits *t
    cdef int i = 0
    out = []
    while True:
        t = qk_traits_at(i)
        if t == NULL:
            return out
        out.append((t.type, t.name.decode(), t.block_elems, t.block_bytes))
        i += 1


def type_traits(int ggml_type):
    """The C kernels' view of a ggml type (block size, bytes, activation format), or None
    when this build has no kernel for it."""
    cdef const qk_traits *t = qk_get_traits(ggml_type)
    if t == NULL:
        return None
    return {
        "type": t.type,
        "name": t.name.decode(),
        "block_elems": t.block_elems,
        "block_bytes": t.block_bytes,
        "act": t.act,
        "act_name": _QK_ACT_NAMES[t.act],
    }


def dequantize(int ggml_type, const uint8_t[::1] raw, int64_t n):
    """The first n elements stored in `raw` (GGUF blocks of ggml_type), as float32."""
    cdef const qk_traits *t = _qk_traits_or_raise(ggml_type)
    cdef int64_t need = _qk_row_bytes(t, n)
    if raw.shape[0] < need:
        raise ValueError(f"{n} {t.name.decode()} elements need {need} bytes, got {raw.shape[0]}")
    out = np.empty(n, dtype=np.float32)
    cdef float[::1] o = out
    with nogil:
        t.dequant(&raw[0], &o[0], n)
    return out


def quantize_act(int act, const float[::1] x):
    """x quantized to an activation format (ACT_F32, ACT_Q8_32, ACT_Q8_256), as raw bytes."""
    cdef int64_t n = _qk_check_act(act, x.shape[0])
    out = np.empty(qk_act_row_bytes(act, n), dtype=np.uint8)
    cdef uint8_t[::1] o = out
    with nogil:
        qk_quantize_act(act, &x[0], &o[0], n)
    return out


def dot(int ggml_type, const uint8_t[::1] w_row, const float[::1] x):
    """w_row . x, with x quantized to the activation format the type's kernel takes."""
    cdef const qk_traits *t = _qk_traits_or_raise(ggml_type)
    cdef int64_t n = x.shape[0]
    cdef int64_t need = _qk_row_bytes(t, n)
    _qk_check_act(t.act, n)
    if w_row.shape[0] < need:
        raise ValueError(f"{n} {t.name.decode()} elements need {need} bytes, got {w_row.shape[0]}")
    act = quantize_act(t.act, x)
    cdef const uint8_t[::1] a = act
    cdef float r
    with nogil:
        r = t.dot(n, &w_row[0], &a[0])
    return r


def matvec(int ggml_type, const uint8_t[:, ::1] w, const float[::1] x):
    """W x for a matrix of rows of GGUF blocks (shape (rows, row_bytes)), one thread, through
    the path decode runs: the type's tile kernel with one token (its dot for float weights)."""
    cdef const qk_traits *t = _qk_traits_or_raise(ggml_type)
    cdef int64_t n = x.shape[0]
    cdef int64_t rows = w.shape[0], rb = _qk_row_bytes(t, n), r
    _qk_check_act(t.act, n)
    if w.shape[1] != rb:
        raise ValueError(
            f"rows of {n} {t.name.decode()} elements are {rb} bytes, the matrix has {w.shape[1]}"
        )
    out = np.empty(rows, dtype=np.float32)
    if rows == 0:
        return out
    if t.gemm != NULL:
        return gemm(ggml_type, w, np.asarray(x).reshape(1, n))[0]
    act = quantize_act(t.act, x)
    cdef const uint8_t[::1] a = act
    cdef float[::1] o = out
    with nogil:
        for r in range(rows):
            o[r] = t.dot(n, &w[r, 0], &a[0])
    return out
