/* Shared pieces of the kernel files: fp16/bf16 conversion, the activation block formats, and
 * small SIMD helpers. Included by every file under types/ (through panel.h) and activations.h.
 *
 * Conventions every kernel file follows
 * -------------------------------------
 * - The types and their traits are listed once, in quant_types.def (how to add one: there).
 * - Per weight type T, in its family's file under types/:
 *       static void  qk_dequant_T(const void *restrict src, float *restrict dst, int64_t n);
 *       static float qk_dot_T(int64_t n, const void *restrict w, const void *restrict act);
 *   and, for quantized types, qk_pack_T (one block of eight rows into a tile panel, panel.h).
 *   n is the number of elements (a multiple of the block); `w` points at a row of GGUF blocks
 *   exactly as stored in the file (no alignment assumed: blocks of 18, 22, 34... bytes sit at
 *   any address); `act` is that row's activation in the format the type's traits name
 *   (activations.h). The quantized types' dot is the scalar reference (tests hold the tiles to
 *   it); the tiles (tiles.h) are their only product path in inference.
 * - Portable scalar C first (the generic variant, and the ground truth), then SIMD paths chosen
 *   at compile time (panel.h: QK_TILES_X86 2 = AVX-512 VNNI, 1 = AVX2; QK_TILES_NEON on
 *   aarch64). The same source compiles once per variant module (setup.py), so only the
 *   preprocessor picks.
 * - Dequantization must equal gguf.quants.dequantize bit for bit (tests/test_quants.py): where it
 *   computes d*q + m in two roundings, so must we, hence QK_NO_CONTRACT on dequant functions
 *   (gcc would otherwise fuse the multiply and add into one FMA on FMA-capable variants).
 * - gcc 12 miscompiles, with -mavx512vnni, a scalar reduction like
 *       for (j...) s += (int8_t)u8ptr[j] * i8ptr[j];
 *   into vpdpbusd, which treats the first operand as UNSIGNED (wrong sums in the avx512 module
 *   only). Read signed weight bytes through an `const int8_t *` pointer instead of casting each
 *   uint8_t; the tests run every variant against gguf, which is what caught it.
 */
#ifndef QPACK_QUANTS_COMMON_H
#define QPACK_QUANTS_COMMON_H

#include <stdint.h>
#include <stddef.h>
#include <string.h>
#include <math.h>

/* MSVC's /arch:AVX2 and /arch:AVX512 define __AVX2__ and __AVX512F/BW/CD/DQ/VL__ but not the
 * macros of what those levels also bring, which the kernels test: defined here, once, for every
 * header. setup.py's MSVC variants are the gcc ones: /arch:AVX2 = x86-64-v3 (FMA, F16C),
 * /arch:AVX512 = x86-64-v4 plus VNNI (runtime/cpu.py checks all of them before the import; cl
 * emits any intrinsic whatever /arch says). x64 always has SSE2. */
#if defined(_MSC_VER) && !defined(__clang__) && defined(_M_X64)
#ifndef __SSE2__
#define __SSE2__ 1
#endif
#if defined(__AVX2__) && !defined(__FMA__)
#define __FMA__ 1
#endif
#if defined(__AVX2__) && !defined(__F16C__)
#define __F16C__ 1
#endif
#if defined(__AVX512F__) && !defined(__AVX512VNNI__)
#define __AVX512VNNI__ 1
#endif
#endif

#if defined(__AVX2__) || defined(__AVX512F__) || defined(__F16C__) || defined(__SSE2__)
#include <immintrin.h>
#endif
#if defined(__ARM_NEON)
#include <arm_neon.h>
#endif

#if defined(__clang__)
#define QK_NO_CONTRACT
#define QK_NO_CONTRACT_BODY _Pragma("clang fp contract(off)")
#elif defined(__GNUC__)
#define QK_NO_CONTRACT __attribute__((optimize("fp-contract=off")))
#define QK_NO_CONTRACT_BODY
#else
#define QK_NO_CONTRACT
#define QK_NO_CONTRACT_BODY
#endif

/* ---------------------------------------------------------------- activation blocks */

typedef struct {
    float d;          /* scale: x ~ d * qs */
    float s;          /* d * sum(qs) */
    int8_t qs[32];
} qk_act_q8_32;

typedef struct {
    float d;
    int8_t qs[256];
    int16_t bsums[16];  /* sums of each 16 consecutive qs */
    int16_t bsums32[8]; /* sums of each 32 (the min term of 32-element sub-blocks, tiles.h) */
} qk_act_q8_256;

/* ---------------------------------------------------------------- loads from unaligned blocks */

static inline uint16_t qk_load_u16(const uint8_t *p) {
    uint16_t v;
    memcpy(&v, p, 2);
    return v;
}

static inline uint32_t qk_load_u32(const uint8_t *p) {
    uint32_t v;
    memcpy(&v, p, 4);
    return v;
}

/* ---------------------------------------------------------------- fp16 / bf16 */

/* Exact IEEE half -> float for every input (subnormals, inf, NaN payloads kept), branch-light
 * so the generic variant needs no table. */
static inline float qk_fp16_to_fp32_portable(uint16_t h) {
    const uint32_t shifted = (uint32_t)(h & 0x7fff) << 13; /* exponent/mantissa bits */
    const uint32_t exp = shifted & 0x0f800000u;
    uint32_t bits = shifted + ((127u - 15u) << 23);
    float f;
    if (exp == 0x0f800000u) {
        bits += (128u - 16u) << 23; /* inf / NaN: exponent all ones */
        memcpy(&f, &bits, 4);
    } else if (exp == 0) {
        bits += 1u << 23;            /* subnormal: renormalize through a float subtraction */
        memcpy(&f, &bits, 4);
        f -= 6.103515625e-05f;       /* 2^-14 */
    } else {
        memcpy(&f, &bits, 4);
    }
    uint32_t out;
    memcpy(&out, &f, 4);
    out |= (uint32_t)(h & 0x8000) << 16;
    memcpy(&f, &out, 4);
    return f;
}

/* The F16C conversions through the vector intrinsics every x86 compiler has: MSVC lacks the
 * scalar _cvtsh_ss/_cvtss_sh of gcc and clang (tests/crossplat.py checks it). */
#if defined(__F16C__)
static inline float qk_f16c_to_f32(uint16_t h) {
    return _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(h)));
}
static inline uint16_t qk_f16c_from_f32(float f) {
    return (uint16_t)_mm_cvtsi128_si32(_mm_cvtps_ph(_mm_set_ss(f), _MM_FROUND_TO_NEAREST_INT));
}
#endif

static inline float qk_fp16_to_fp32(uint16_t h) {
#if defined(__F16C__)
    return qk_f16c_to_f32(h);
#elif defined(__ARM_NEON) && defined(__aarch64__)
    __fp16 v;
    memcpy(&v, &h, 2);
    return (float)v;
#else
    return qk_fp16_to_fp32_portable(h);
#endif
}

/* Float -> IEEE half, rounded to nearest even, exactly as F16C's vcvtps2ph and a _Float16
 * cast do: subnormal halves, overflow to inf, NaN kept quiet with its top payload bits. */
static inline uint16_t qk_fp32_to_fp16_portable(float f) {
    uint32_t x;
    memcpy(&x, &f, 4);
    const uint16_t sign = (uint16_t)((x >> 16) & 0x8000);
    const uint32_t a = x & 0x7fffffffu;
    if (a >= 0x7f800000u) /* inf, NaN */
        return sign | 0x7c00 | (a > 0x7f800000u ? 0x0200 | (uint16_t)((a >> 13) & 0x3ff) : 0);
    if (a >= 0x477ff000u) return sign | 0x7c00; /* rounds to >= 65520: inf */
    if (a >= 0x38800000u) {                     /* normal half: drop 13 bits, round half to even */
        const uint32_t r = a + 0xfffu + ((a >> 13) & 1);
        return sign | (uint16_t)((r - 0x38000000u) >> 13);
    }
    if (a < 0x33000000u) return sign; /* below half the smallest subnormal (ties round to 0) */
    /* subnormal half: the 24-bit significand shifted right by 126 - e, rounded to even */
    const uint32_t e = a >> 23, m = (a & 0x7fffffu) | 0x800000u, sh = 126 - e;
    const uint32_t q = m >> sh, rest = m & ((1u << sh) - 1), half = 1u << (sh - 1);
    return sign | (uint16_t)(q + (rest > half || (rest == half && (q & 1))));
}

static inline uint16_t qk_fp32_to_fp16(float f) {
#if defined(__F16C__)
    return qk_f16c_from_f32(f);
#else
    return qk_fp32_to_fp16_portable(f);
#endif
}

/* The f16 stored at p (any alignment): a block's scale. */
static inline float qk_half_at(const uint8_t *p) { return qk_fp16_to_fp32(qk_load_u16(p)); }

static inline float qk_bf16_to_fp32(uint16_t h) {
    const uint32_t bits = (uint32_t)h << 16;
    float f;
    memcpy(&f, &bits, 4);
    return f;
}

/* ---------------------------------------------------------------- x86 helpers */

#if defined(__AVX2__)
static inline float qk_hsum_ps256(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}
#endif

#endif
