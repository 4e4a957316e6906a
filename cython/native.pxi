# The compiled runtime, one source for every CPU variant (setup.py generates the thin
# per-variant .pyx files that include this). Kernels: quants.pxi; forward pass: model.pxi.

cdef extern from *:
    const char *QPACK_VARIANT

VARIANT = QPACK_VARIANT.decode()

cdef extern from *:
    """
    #if defined(__x86_64__) || defined(__i386__) || defined(_M_X64) || defined(_M_IX86)
    #if defined(_MSC_VER)
    #include <intrin.h>
    #else
    #include <cpuid.h>
    #endif
    static void qk_cpuid(unsigned leaf, unsigned sub, unsigned r[4]) {
    #if defined(_MSC_VER)
        int v[4];
        __cpuidex(v, (int)leaf, (int)sub);
        for (int k = 0; k < 4; k++) r[k] = (unsigned)v[k];
    #else
        __cpuid_count(leaf, sub, r[0], r[1], r[2], r[3]);
    #endif
    }
    /* The register state the OS saves on a context switch (XCR0). */
    static unsigned long long qk_xcr0(void) {
    #if defined(_MSC_VER) && !defined(__clang__)
        return _xgetbv(0);
    #else
        unsigned lo, hi;
        __asm__ __volatile__("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
        return (unsigned long long)hi << 32 | lo;
    #endif
    }
    #endif
    /* cpuid's feature bits, and for AVX and AVX-512 the OS's consent too: without it saving the
     * ymm / zmm registers (XCR0, readable when OSXSAVE is set), their first use faults. The
     * same code for every compiler (MSVC has no __builtin_cpu_supports). */
    static int qk_cpu_supports(const char *feature) {
    #if defined(__x86_64__) || defined(__i386__) || defined(_M_X64) || defined(_M_IX86)
        unsigned r0[4], r1[4], r7[4] = {0}, rx[4] = {0};
        qk_cpuid(0, 0, r0);
        qk_cpuid(1, 0, r1);
        if (r0[0] >= 7) qk_cpuid(7, 0, r7);
        qk_cpuid(0x80000000u, 0, rx);
        if (rx[0] >= 0x80000001u) qk_cpuid(0x80000001u, 0, rx); else rx[2] = 0;
        const unsigned c1 = r1[2], b7 = r7[1], c7 = r7[2], cx = rx[2];
        const unsigned long long xcr0 = (c1 >> 27 & 1) ? qk_xcr0() : 0;
        const int avx = (c1 >> 28 & 1) && (xcr0 & 0x6) == 0x6;          /* xmm, ymm */
        const int avx512 = avx && (xcr0 & 0xe0) == 0xe0;                /* opmask, zmm */
        const int fma = avx && (c1 >> 12 & 1), f16c = avx && (c1 >> 29 & 1);
        const int avx2 = avx && (b7 >> 5 & 1);
        const int avx512f = avx512 && (b7 >> 16 & 1), avx512dq = avx512 && (b7 >> 17 & 1);
        const int avx512cd = avx512 && (b7 >> 28 & 1), avx512bw = avx512 && (b7 >> 30 & 1);
        const int avx512vl = avx512 && (b7 >> 31 & 1), avx512vnni = avx512 && (c7 >> 11 & 1);
        /* x86-64-v2: SSE3, SSSE3, SSE4.1, SSE4.2, POPCNT, CMPXCHG16B, LAHF; v3 adds AVX, AVX2,
         * FMA, F16C, BMI1, BMI2, LZCNT, MOVBE; v4 adds AVX-512 F, BW, CD, DQ, VL */
        const int v2 = (c1 & 1) && (c1 >> 9 & 1) && (c1 >> 19 & 1) && (c1 >> 20 & 1) &&
                       (c1 >> 23 & 1) && (c1 >> 13 & 1) && (cx & 1);
        const int v3 = v2 && avx2 && fma && f16c && (b7 >> 3 & 1) && (b7 >> 8 & 1) &&
                       (cx >> 5 & 1) && (c1 >> 22 & 1);
        const int v4 = v3 && avx512f && avx512bw && avx512cd && avx512dq && avx512vl;
        if (!strcmp(feature, "avx2")) return avx2;
        if (!strcmp(feature, "fma")) return fma;
        if (!strcmp(feature, "f16c")) return f16c;
        if (!strcmp(feature, "x86-64-v3")) return v3;
        if (!strcmp(feature, "x86-64-v4")) return v4;
        if (!strcmp(feature, "avx512f")) return avx512f;
        if (!strcmp(feature, "avx512bw")) return avx512bw;
        if (!strcmp(feature, "avx512cd")) return avx512cd;
        if (!strcmp(feature, "avx512dq")) return avx512dq;
        if (!strcmp(feature, "avx512vl")) return avx512vl;
        if (!strcmp(feature, "avx512vnni")) return avx512vnni;
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


from libc.stdint cimport int32_t, int64_t, uint8_t, uint16_t, uint32_t

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
    const qk_traits *qk_traits_at(int i) noexcept nogil
    size_t qk_act_row_bytes(int act, int64_t n) noexcept nogil
    void qk_quantize_act(int act, const float *x, void *dst, int64_t n) noexcept nogil
    size_t qk_gemm_scratch_bytes(int64_t n) noexcept nogil


include "quants.pxi"
include "tiles.pxi"
include "model.pxi"
