# Python-facing wrapper of the tiled products (tiles.h), for tests and benchmarks; the
# forward pass calls them from C (forward.h). Every shape is checked before C touches a buffer.

from libc.stdint cimport uintptr_t
from libc.stdlib cimport free, malloc


def has_gemm(int ggml_type) -> bool:
    """Whether the type has a tile kernel (every quantized type; float weights use dot)."""
    cdef const qk_traits *t = qk_get_traits(ggml_type)
    return t != NULL and t.gemm != NULL


def gemm(int ggml_type, const uint8_t[:, ::1] w, const float[:, ::1] x):
    """W X^T through the tile kernel: out[t, r] = W[r] . x[t], each x row quantized to the
    type's activation format first, as the forward pass does. Shape (tokens, rows)."""
    cdef const qk_traits *t = _qk_traits_or_raise(ggml_type)
    if t.gemm == NULL:
        raise ValueError(f"{t.name.decode()} has no tile kernel in the {VARIANT} build")
    cdef int64_t n = x.shape[1], nt = x.shape[0], nr = w.shape[0], i
    cdef int64_t rb = _qk_row_bytes(t, n)
    _qk_check_act(t.act, n)
    if w.shape[1] != rb:
        raise ValueError(f"rows of {n} {t.name.decode()} elements are {rb} bytes, the matrix has {w.shape[1]}")
    out = np.zeros((nt, nr), dtype=np.float32)
    if nt == 0 or nr == 0:
        return out
    cdef size_t arb = qk_act_row_bytes(t.act, n)
    act = np.empty((nt, arb), dtype=np.uint8)
    cdef uint8_t[:, ::1] a = act
    cdef float[:, ::1] o = out
    cdef void *raw = malloc(qk_gemm_scratch_bytes(n) + 63)
    if raw == NULL:
        raise MemoryError("no memory for the tile scratch")
    cdef void *scratch = <void *>((<uintptr_t>raw + 63) & ~(<uintptr_t>63))  # panels: aligned loads
    try:
        with nogil:
            for i in range(nt):
                qk_quantize_act(t.act, &x[i, 0], &a[i, 0], n)
            t.gemm(n, &w[0, 0], rb, nr, &a[0, 0], arb, nt, &o[0, 0], nr, scratch)
    finally:
        free(raw)
    return out
