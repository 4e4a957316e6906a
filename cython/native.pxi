# The compiled runtime, one source for every CPU variant (setup.py generates the thin
# per-variant .pyx files that include this). Kernels: quants.pxi; forward pass: model.pxi.

cdef extern from *:
    const char *QPACK_VARIANT

VARIANT = QPACK_VARIANT.decode()

cdef extern from *:
    """
    static int qk_cpu_supports(const char *feature) {
    #if defined(__x86_64__) || defined(__i386__)
        __builtin_cpu_init();
        if (!strcmp(feature, "avx2")) return __builtin_cpu_supports("avx2");
        if (!strcmp(feature, "fma")) return __builtin_cpu_supports("fma");
        if (!strcmp(feature, "f16c")) return __builtin_cpu_supports("f16c");
        if (!strcmp(feature, "x86-64-v3")) return __builtin_cpu_supports("x86-64-v3");
        if (!strcmp(feature, "x86-64-v4")) return __builtin_cpu_supports("x86-64-v4");
        if (!strcmp(feature, "avx512f")) return __builtin_cpu_supports("avx512f");
        if (!strcmp(feature, "avx512bw")) return __builtin_cpu_supports("avx512bw");
        if (!strcmp(feature, "avx512vl")) return __builtin_cpu_supports("avx512vl");
        if (!strcmp(feature, "avx512vnni")) return __builtin_cpu_supports("avx512vnni");
        return 0;
    #else
        (void)feature;
        return 0;
    #endif
    }
    """
    int qk_cpu_supports(const char *feature)


def cpu_supports(str feature) -> bool:
    """Whether the running CPU (and OS) supports an x86 feature; only meaningful in the
    generic variant, which is safe to import anywhere."""
    return bool(qk_cpu_supports(feature.encode()))


from libc.stdint cimport int32_t, int64_t, uint8_t

# quants.h's C API, declared once here for both quants.pxi and model.pxi.
cdef extern from "quants.h":
    ctypedef void (*qk_dequant_fn)(const void *src, float *dst, int64_t n) noexcept nogil
    ctypedef float (*qk_dot_fn)(int64_t n, const void *w, const void *act) noexcept nogil
    ctypedef void (*qk_gemm_fn)(int64_t n, const uint8_t *w, size_t row_bytes, int64_t nr,
                                const uint8_t *act, size_t act_stride, int64_t nt, float *out,
                                int64_t ldo, void *scratch) noexcept nogil
    ctypedef struct qk_traits:
        int type
        const char *name
        int block_elems
        int block_bytes
        int act
        qk_dequant_fn dequant
        qk_dot_fn dot
        qk_gemm_fn gemm
    enum:
        QK_ACT_F32
        QK_ACT_Q8_32
        QK_ACT_Q8_256
    const qk_traits *qk_get_traits(int ggml_type) noexcept nogil
    size_t qk_act_row_bytes(int act, int64_t n) noexcept nogil
    void qk_quantize_act(int act, const float *x, void *dst, int64_t n) noexcept nogil
    size_t qk_gemm_scratch_bytes(int64_t n) noexcept nogil


include "quants.pxi"
include "tiles.pxi"
include "model.pxi"
