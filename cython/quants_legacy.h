/* Float weights (F32, F16, BF16) and the legacy 32-element quants (Q4_0, Q4_1, Q5_0, Q5_1,
 * Q8_0), plus the Q8_32 activation they are multiplied with. Conventions: quants_common.h.
 *
 * For each type: the scalar dequant/dot (the generic variant, and the ground truth), then the
 * SIMD dot for the variant being compiled. The legacy dots all reduce to, per block,
 *     d_w * d_a * sum_j(q_j * a_j)   (+ m_w * s_a for the types with a min),
 * with the inner sum in int32 (exact), so every path agrees up to the order of f32 additions.
 * The x86 SIMD paths treat Q4_0/Q5_0 the same way, as unsigned q with "min" -8·d / -16·d, which
 * saves the sign juggling of signed-by-signed byte products (~25% faster, same accuracy class
 * as Q4_1's min term).
 */
#ifndef QPACK_QUANTS_LEGACY_H
#define QPACK_QUANTS_LEGACY_H

#include "quants_common.h"

enum {
    QK_Q4_0_BYTES = 18, /* f16 d; qs[16] */
    QK_Q4_1_BYTES = 20, /* f16 d, f16 m; qs[16] */
    QK_Q5_0_BYTES = 22, /* f16 d; qh[4]; qs[16] */
    QK_Q5_1_BYTES = 24, /* f16 d, f16 m; qh[4]; qs[16] */
    QK_Q8_0_BYTES = 34, /* f16 d; int8 qs[32] */
};

/* ================================================================ Q8_32 activations */

static void qk_quantize_q8_32(const float *restrict x, void *restrict dst, int64_t n) {
    qk_act_q8_32 *restrict y = (qk_act_q8_32 *)dst;
    for (int64_t i = 0; i < n / 32; i++) {
        const float *xb = x + i * 32;
        float amax = 0.0f;
        for (int j = 0; j < 32; j++) {
            const float a = fabsf(xb[j]);
            amax = a > amax ? a : amax;
        }
        const float d = amax / 127.0f;
        const float id = d != 0.0f ? 1.0f / d : 0.0f;
        int sum = 0;
        for (int j = 0; j < 32; j++) {
            const int q = (int)roundf(xb[j] * id); /* |q| <= 127 by construction */
            y[i].qs[j] = (int8_t)q;
            sum += q;
        }
        y[i].d = d;
        y[i].s = d * (float)sum;
    }
}

/* ================================================================ F32 */

static void qk_dequant_f32(const void *restrict src, float *restrict dst, int64_t n) {
    memcpy(dst, src, (size_t)n * sizeof(float));
}

static float qk_dot_f32(int64_t n, const void *restrict w, const void *restrict act) {
    const float *restrict x = (const float *)w, *restrict y = (const float *)act;
    int64_t i = 0;
    float sum = 0.0f;
#if defined(__AVX512F__)
    __m512 acc[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps()};
    for (; i + 64 <= n; i += 64)
        for (int k = 0; k < 4; k++)
            acc[k] = _mm512_fmadd_ps(_mm512_loadu_ps(x + i + 16 * k), _mm512_loadu_ps(y + i + 16 * k), acc[k]);
    sum = _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(acc[0], acc[1]), _mm512_add_ps(acc[2], acc[3])));
#elif defined(__AVX2__)
    __m256 acc[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
    for (; i + 32 <= n; i += 32)
        for (int k = 0; k < 4; k++)
            acc[k] = _mm256_fmadd_ps(_mm256_loadu_ps(x + i + 8 * k), _mm256_loadu_ps(y + i + 8 * k), acc[k]);
    sum = qk_hsum_ps256(_mm256_add_ps(_mm256_add_ps(acc[0], acc[1]), _mm256_add_ps(acc[2], acc[3])));
#endif
#pragma omp simd reduction(+ : sum)
    for (int64_t j = i; j < n; j++) sum += x[j] * y[j];
    return sum;
}

/* ================================================================ F16 */

static void qk_dequant_f16(const void *restrict src, float *restrict dst, int64_t n) {
    const uint8_t *p = (const uint8_t *)src;
    int64_t i = 0;
#if defined(__AVX512F__)
    for (; i + 16 <= n; i += 16)
        _mm512_storeu_ps(dst + i, _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(p + 2 * i))));
#elif defined(__F16C__)
    for (; i + 8 <= n; i += 8)
        _mm256_storeu_ps(dst + i, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(p + 2 * i))));
#endif
    for (; i < n; i++) dst[i] = qk_fp16_to_fp32(qk_load_u16(p + 2 * i));
}

static float qk_dot_f16(int64_t n, const void *restrict w, const void *restrict act) {
    const uint8_t *x = (const uint8_t *)w;
    const float *restrict y = (const float *)act;
    int64_t i = 0;
    float sum = 0.0f;
#if defined(__AVX512F__)
    __m512 acc[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps()};
    for (; i + 64 <= n; i += 64)
        for (int k = 0; k < 4; k++) {
            const __m512 wv = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(x + 2 * (i + 16 * k))));
            acc[k] = _mm512_fmadd_ps(wv, _mm512_loadu_ps(y + i + 16 * k), acc[k]);
        }
    sum = _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(acc[0], acc[1]), _mm512_add_ps(acc[2], acc[3])));
#elif defined(__AVX2__) && defined(__F16C__)
    __m256 acc[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
    for (; i + 32 <= n; i += 32)
        for (int k = 0; k < 4; k++) {
            const __m256 wv = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(x + 2 * (i + 8 * k))));
            acc[k] = _mm256_fmadd_ps(wv, _mm256_loadu_ps(y + i + 8 * k), acc[k]);
        }
    sum = qk_hsum_ps256(_mm256_add_ps(_mm256_add_ps(acc[0], acc[1]), _mm256_add_ps(acc[2], acc[3])));
#endif
    for (; i < n; i++) sum += qk_fp16_to_fp32(qk_load_u16(x + 2 * i)) * y[i];
    return sum;
}

/* ================================================================ BF16 */

static void qk_dequant_bf16(const void *restrict src, float *restrict dst, int64_t n) {
    const uint8_t *p = (const uint8_t *)src;
    uint32_t *restrict out = (uint32_t *)dst;
    for (int64_t i = 0; i < n; i++) out[i] = (uint32_t)qk_load_u16(p + 2 * i) << 16;
}

static float qk_dot_bf16(int64_t n, const void *restrict w, const void *restrict act) {
    const uint8_t *x = (const uint8_t *)w;
    const float *restrict y = (const float *)act;
    int64_t i = 0;
    float sum = 0.0f;
#if defined(__AVX512F__)
    __m512 acc[2] = {_mm512_setzero_ps(), _mm512_setzero_ps()};
    for (; i + 32 <= n; i += 32)
        for (int k = 0; k < 2; k++) {
            const __m256i h = _mm256_loadu_si256((const __m256i *)(x + 2 * (i + 16 * k)));
            const __m512 wv = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
            acc[k] = _mm512_fmadd_ps(wv, _mm512_loadu_ps(y + i + 16 * k), acc[k]);
        }
    sum = _mm512_reduce_add_ps(_mm512_add_ps(acc[0], acc[1]));
#elif defined(__AVX2__)
    __m256 acc[2] = {_mm256_setzero_ps(), _mm256_setzero_ps()};
    for (; i + 16 <= n; i += 16)
        for (int k = 0; k < 2; k++) {
            const __m128i h = _mm_loadu_si128((const __m128i *)(x + 2 * (i + 8 * k)));
            const __m256 wv = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
            acc[k] = _mm256_fmadd_ps(wv, _mm256_loadu_ps(y + i + 8 * k), acc[k]);
        }
    sum = qk_hsum_ps256(_mm256_add_ps(acc[0], acc[1]));
#endif
    for (; i < n; i++) sum += qk_bf16_to_fp32(qk_load_u16(x + 2 * i)) * y[i];
    return sum;
}

/* ================================================================ legacy quants: unpacking */

/* The scalar code unpacks a block into 32 signed bytes and then runs plain loops over them:
 * written this way gcc vectorizes them even for baseline x86-64 (SSE2), ~3x faster than
 * unpacking element by element inside the sum. */

/* q[j] = low nibble of qs[j] - offset, q[j+16] = high nibble - offset. */
static inline void qk_unpack_q4(const uint8_t *qs, int offset, int8_t q[32]) {
    for (int j = 0; j < 16; j++) {
        q[j] = (int8_t)((qs[j] & 0x0f) - offset);
        q[j + 16] = (int8_t)((qs[j] >> 4) - offset);
    }
}

static const uint32_t qk_bit32[32] = {
    1u << 0,  1u << 1,  1u << 2,  1u << 3,  1u << 4,  1u << 5,  1u << 6,  1u << 7,
    1u << 8,  1u << 9,  1u << 10, 1u << 11, 1u << 12, 1u << 13, 1u << 14, 1u << 15,
    1u << 16, 1u << 17, 1u << 18, 1u << 19, 1u << 20, 1u << 21, 1u << 22, 1u << 23,
    1u << 24, 1u << 25, 1u << 26, 1u << 27, 1u << 28, 1u << 29, 1u << 30, 1u << 31,
};

/* Q5: bit j of the little-endian u32 qh is element j's 5th bit. */
static inline void qk_unpack_q5(const uint8_t *qh, const uint8_t *qs, int offset, int8_t q[32]) {
    const uint32_t bits = qk_load_u32(qh);
    int8_t h[32];
    for (int j = 0; j < 32; j++) h[j] = (int8_t)(((bits & qk_bit32[j]) ? 16 : 0) - offset);
    for (int j = 0; j < 16; j++) {
        q[j] = (int8_t)((qs[j] & 0x0f) + h[j]);
        q[j + 16] = (int8_t)((qs[j] >> 4) + h[j + 16]);
    }
}

static inline int qk_sum_i8x32(const int8_t *x, const int8_t *y) {
    int s = 0;
    for (int j = 0; j < 32; j++) s += x[j] * y[j];
    return s;
}

/* ================================================================ legacy quants: dequant */

/* x = d * q (offset already in q), then + m for the types with a min: two roundings, as in
 * gguf's numpy reference. */
QK_NO_CONTRACT static inline void qk_scale_block(const int8_t q[32], float d, float *restrict dst) {
    QK_NO_CONTRACT_BODY
    for (int j = 0; j < 32; j++) dst[j] = d * (float)q[j];
}
QK_NO_CONTRACT static inline void qk_scale_min_block(const int8_t q[32], float d, float m,
                                                     float *restrict dst) {
    QK_NO_CONTRACT_BODY
    for (int j = 0; j < 32; j++) {
        const float t = d * (float)q[j];
        dst[j] = t + m;
    }
}

QK_NO_CONTRACT static void qk_dequant_q4_0(const void *restrict src, float *restrict dst, int64_t n) {
    const uint8_t *b = (const uint8_t *)src;
    int8_t q[32];
    for (int64_t i = 0; i < n / 32; i++, b += QK_Q4_0_BYTES, dst += 32) {
        qk_unpack_q4(b + 2, 8, q);
        qk_scale_block(q, qk_fp16_to_fp32(qk_load_u16(b)), dst);
    }
}

QK_NO_CONTRACT static void qk_dequant_q4_1(const void *restrict src, float *restrict dst, int64_t n) {
    const uint8_t *b = (const uint8_t *)src;
    int8_t q[32];
    for (int64_t i = 0; i < n / 32; i++, b += QK_Q4_1_BYTES, dst += 32) {
        qk_unpack_q4(b + 4, 0, q);
        qk_scale_min_block(q, qk_fp16_to_fp32(qk_load_u16(b)), qk_fp16_to_fp32(qk_load_u16(b + 2)), dst);
    }
}

QK_NO_CONTRACT static void qk_dequant_q5_0(const void *restrict src, float *restrict dst, int64_t n) {
    const uint8_t *b = (const uint8_t *)src;
    int8_t q[32];
    for (int64_t i = 0; i < n / 32; i++, b += QK_Q5_0_BYTES, dst += 32) {
        qk_unpack_q5(b + 2, b + 6, 16, q);
        qk_scale_block(q, qk_fp16_to_fp32(qk_load_u16(b)), dst);
    }
}

QK_NO_CONTRACT static void qk_dequant_q5_1(const void *restrict src, float *restrict dst, int64_t n) {
    const uint8_t *b = (const uint8_t *)src;
    int8_t q[32];
    for (int64_t i = 0; i < n / 32; i++, b += QK_Q5_1_BYTES, dst += 32) {
        qk_unpack_q5(b + 4, b + 8, 0, q);
        qk_scale_min_block(q, qk_fp16_to_fp32(qk_load_u16(b)), qk_fp16_to_fp32(qk_load_u16(b + 2)), dst);
    }
}

QK_NO_CONTRACT static void qk_dequant_q8_0(const void *restrict src, float *restrict dst, int64_t n) {
    const uint8_t *b = (const uint8_t *)src;
    for (int64_t i = 0; i < n / 32; i++, b += QK_Q8_0_BYTES, dst += 32)
        qk_scale_block((const int8_t *)(b + 2), qk_fp16_to_fp32(qk_load_u16(b)), dst);
}

/* ================================================================ legacy quants: scalar dots */

static float qk_dot_q4_0_scalar(int64_t n, const void *restrict w, const void *restrict act) {
    const uint8_t *b = (const uint8_t *)w;
    const qk_act_q8_32 *a = (const qk_act_q8_32 *)act;
    int8_t q[32];
    float sum = 0.0f;
    for (int64_t i = 0; i < n / 32; i++, b += QK_Q4_0_BYTES, a++) {
        qk_unpack_q4(b + 2, 8, q);
        sum += qk_fp16_to_fp32(qk_load_u16(b)) * a->d * (float)qk_sum_i8x32(q, a->qs);
    }
    return sum;
}

static float qk_dot_q4_1_scalar(int64_t n, const void *restrict w, const void *restrict act) {
    const uint8_t *b = (const uint8_t *)w;
    const qk_act_q8_32 *a = (const qk_act_q8_32 *)act;
    int8_t q[32];
    float sum = 0.0f;
    for (int64_t i = 0; i < n / 32; i++, b += QK_Q4_1_BYTES, a++) {
        qk_unpack_q4(b + 4, 0, q);
        sum += qk_fp16_to_fp32(qk_load_u16(b)) * a->d * (float)qk_sum_i8x32(q, a->qs) +
               qk_fp16_to_fp32(qk_load_u16(b + 2)) * a->s;
    }
    return sum;
}

static float qk_dot_q5_0_scalar(int64_t n, const void *restrict w, const void *restrict act) {
    const uint8_t *b = (const uint8_t *)w;
    const qk_act_q8_32 *a = (const qk_act_q8_32 *)act;
    int8_t q[32];
    float sum = 0.0f;
    for (int64_t i = 0; i < n / 32; i++, b += QK_Q5_0_BYTES, a++) {
        qk_unpack_q5(b + 2, b + 6, 16, q);
        sum += qk_fp16_to_fp32(qk_load_u16(b)) * a->d * (float)qk_sum_i8x32(q, a->qs);
    }
    return sum;
}

static float qk_dot_q5_1_scalar(int64_t n, const void *restrict w, const void *restrict act) {
    const uint8_t *b = (const uint8_t *)w;
    const qk_act_q8_32 *a = (const qk_act_q8_32 *)act;
    int8_t q[32];
    float sum = 0.0f;
    for (int64_t i = 0; i < n / 32; i++, b += QK_Q5_1_BYTES, a++) {
        qk_unpack_q5(b + 4, b + 8, 0, q);
        sum += qk_fp16_to_fp32(qk_load_u16(b)) * a->d * (float)qk_sum_i8x32(q, a->qs) +
               qk_fp16_to_fp32(qk_load_u16(b + 2)) * a->s;
    }
    return sum;
}

static float qk_dot_q8_0_scalar(int64_t n, const void *restrict w, const void *restrict act) {
    const uint8_t *b = (const uint8_t *)w;
    const qk_act_q8_32 *a = (const qk_act_q8_32 *)act;
    float sum = 0.0f;
    for (int64_t i = 0; i < n / 32; i++, b += QK_Q8_0_BYTES, a++) {
        /* through an int8_t pointer, not (int8_t)b[j]: see quants_common.h */
        sum += qk_fp16_to_fp32(qk_load_u16(b)) * a->d * (float)qk_sum_i8x32((const int8_t *)(b + 2), a->qs);
    }
    return sum;
}

/* ================================================================ legacy quants: SIMD dots */

#if defined(__AVX2__)
/* Each type's block as 32 unsigned bytes q (the offset-free part: Q4_0 and Q5_0 are handled as
 * q*d - 8d and q*d - 16d, their offset term folded into the min term below), dotted with the
 * activation's 32 signed bytes: eight int32 lanes (one vpdpbusd with VNNI, maddubs+madd
 * without; q <= 31 cannot saturate maddubs). */
static inline __m256i qk_q4_0_block_i32(const uint8_t *b, const qk_act_q8_32 *a) {
    return qk_dot_u8s8_epi32(qk_nibbles_to_bytes32(b + 2), _mm256_loadu_si256((const __m256i *)a->qs));
}
static inline __m256i qk_q4_1_block_i32(const uint8_t *b, const qk_act_q8_32 *a) {
    return qk_dot_u8s8_epi32(qk_nibbles_to_bytes32(b + 4), _mm256_loadu_si256((const __m256i *)a->qs));
}
static inline __m256i qk_q5_block_i32(const uint8_t *qh, const uint8_t *qs, const qk_act_q8_32 *a) {
    const __m256i hi = _mm256_and_si256(qk_bits_to_bytes32(qk_load_u32(qh)), _mm256_set1_epi8(0x10));
    const __m256i q = _mm256_or_si256(qk_nibbles_to_bytes32(qs), hi);
    return qk_dot_u8s8_epi32(q, _mm256_loadu_si256((const __m256i *)a->qs));
}
static inline __m256i qk_q5_0_block_i32(const uint8_t *b, const qk_act_q8_32 *a) {
    return qk_q5_block_i32(b + 2, b + 6, a);
}
static inline __m256i qk_q5_1_block_i32(const uint8_t *b, const qk_act_q8_32 *a) {
    return qk_q5_block_i32(b + 4, b + 8, a);
}
static inline __m256i qk_q8_0_block_i32(const uint8_t *b, const qk_act_q8_32 *a) {
    return qk_dot_s8s8_epi32(_mm256_loadu_si256((const __m256i *)(b + 2)), _mm256_loadu_si256((const __m256i *)a->qs));
}

/* Block scales, computed two at a time in one 4-lane multiply against the activation's
 * adjacent (d, s): lane 0 = d_w * d_a (scales the integer sum), lane 1 = m_w * s_a (the min
 * term). With a min (Q4_1, Q5_1) lanes 0-1 of the f16 pair (d, m) are converted; without
 * one (Q4_0, Q5_0) d_w is broadcast so that lane 1 = d_w * s_a, times -8 or -16 at the end;
 * Q8_0 needs lane 0 only. */
static inline __m128 qk_scales_dm(const uint8_t *b, const qk_act_q8_32 *a) {
    const __m128 w = _mm_cvtph_ps(_mm_cvtsi32_si128((int)qk_load_u32(b)));
    return _mm_mul_ps(w, _mm_castpd_ps(_mm_load_sd((const double *)&a->d)));
}
static inline __m128 qk_scales_dd(const uint8_t *b, const qk_act_q8_32 *a) {
    const __m128 w = _mm_cvtph_ps(_mm_set1_epi16((short)qk_load_u16(b)));
    return _mm_mul_ps(w, _mm_castpd_ps(_mm_load_sd((const double *)&a->d)));
}
static inline __m128 qk_scales_d(const uint8_t *b, const qk_act_q8_32 *a) {
    return _mm_mul_ss(_mm_cvtph_ps(_mm_cvtsi32_si128((int)qk_load_u32(b))), _mm_load_ss(&a->d));
}

/* The loop every legacy type shares, for both x86 SIMD variants: the avx512 module gets
 * vpdpbusd through the helpers (AVX512-VNNI on 256-bit vectors). Measured on Zen 4 (bench/
 * kernels.py), and kept simple because of it:
 *   - 512-bit vectors holding two blocks were slower (Zen 4 splits them in two 256-bit halves,
 *     and gathering two 18/20-byte blocks into one register costs extra shuffles);
 *   - two blocks per step into independent accumulators hide the FMA latency; four were slower;
 *   - a four-row variant sharing the activation loads gained only ~10%, not worth a wider API.
 * Most of the remaining cost per block is the scale arithmetic (f16 convert, multiply,
 * broadcast, int->float, FMA), not the integer dot. */
#define QK_LEGACY_DOT_AVX2(name, BYTES, scales, min_factor)                                     \
    static float qk_dot_##name(int64_t n, const void *restrict w, const void *restrict act) {  \
        const uint8_t *b = (const uint8_t *)w;                                                 \
        const qk_act_q8_32 *a = (const qk_act_q8_32 *)act;                                     \
        const int64_t nb = n / 32;                                                             \
        __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();                         \
        __m128 min0 = _mm_setzero_ps(), min1 = _mm_setzero_ps();                               \
        int64_t i = 0;                                                                         \
        for (; i + 2 <= nb; i += 2, b += 2 * (BYTES), a += 2) {                                \
            const __m256i p0 = qk_##name##_block_i32(b, a);                                    \
            const __m256i p1 = qk_##name##_block_i32(b + (BYTES), a + 1);                      \
            const __m128 s0 = scales(b, a), s1 = scales(b + (BYTES), a + 1);                   \
            if (min_factor != 0.0f) {                                                          \
                min0 = _mm_add_ps(min0, s0);                                                   \
                min1 = _mm_add_ps(min1, s1);                                                   \
            }                                                                                  \
            acc0 = _mm256_fmadd_ps(_mm256_broadcastss_ps(s0), _mm256_cvtepi32_ps(p0), acc0);   \
            acc1 = _mm256_fmadd_ps(_mm256_broadcastss_ps(s1), _mm256_cvtepi32_ps(p1), acc1);   \
        }                                                                                      \
        if (i < nb) {                                                                          \
            const __m256i p0 = qk_##name##_block_i32(b, a);                                    \
            const __m128 s0 = scales(b, a);                                                    \
            if (min_factor != 0.0f) min0 = _mm_add_ps(min0, s0);                               \
            acc0 = _mm256_fmadd_ps(_mm256_broadcastss_ps(s0), _mm256_cvtepi32_ps(p0), acc0);   \
        }                                                                                      \
        float sum = qk_hsum_ps256(_mm256_add_ps(acc0, acc1));                                  \
        if (min_factor != 0.0f) {                                                              \
            const __m128 m = _mm_add_ps(min0, min1);                                           \
            sum += (min_factor) * _mm_cvtss_f32(_mm_movehdup_ps(m));                           \
        }                                                                                      \
        return sum;                                                                            \
    }

QK_LEGACY_DOT_AVX2(q4_0, QK_Q4_0_BYTES, qk_scales_dd, -8.0f)
QK_LEGACY_DOT_AVX2(q4_1, QK_Q4_1_BYTES, qk_scales_dm, 1.0f)
QK_LEGACY_DOT_AVX2(q5_0, QK_Q5_0_BYTES, qk_scales_dd, -16.0f)
QK_LEGACY_DOT_AVX2(q5_1, QK_Q5_1_BYTES, qk_scales_dm, 1.0f)
QK_LEGACY_DOT_AVX2(q8_0, QK_Q8_0_BYTES, qk_scales_d, 0.0f)

#elif defined(__ARM_NEON) && defined(__aarch64__)

/* Low and high 16 elements of a 4-bit block as signed bytes (offset subtracted by the caller). */
static inline int32x4_t qk_neon_block_q8(int32x4_t acc, const int8_t *q, const qk_act_q8_32 *a) {
    acc = qk_neon_dot_s8(acc, vld1q_s8(q), vld1q_s8(a->qs));
    return qk_neon_dot_s8(acc, vld1q_s8(q + 16), vld1q_s8(a->qs + 16));
}

static inline int32x4_t qk_neon_block_nibbles(const uint8_t *qs, int8_t offset, const qk_act_q8_32 *a) {
    const uint8x16_t v = vld1q_u8(qs);
    const int8x16_t lo = vsubq_s8(vreinterpretq_s8_u8(vandq_u8(v, vdupq_n_u8(0x0f))), vdupq_n_s8(offset));
    const int8x16_t hi = vsubq_s8(vreinterpretq_s8_u8(vshrq_n_u8(v, 4)), vdupq_n_s8(offset));
    int32x4_t acc = qk_neon_dot_s8(vdupq_n_s32(0), lo, vld1q_s8(a->qs));
    return qk_neon_dot_s8(acc, hi, vld1q_s8(a->qs + 16));
}

static float qk_dot_q4_0(int64_t n, const void *restrict w, const void *restrict act) {
    const uint8_t *b = (const uint8_t *)w;
    const qk_act_q8_32 *a = (const qk_act_q8_32 *)act;
    float32x4_t acc = vdupq_n_f32(0.0f);
    for (int64_t i = 0; i < n / 32; i++, b += QK_Q4_0_BYTES, a++) {
        const int32x4_t p = qk_neon_block_nibbles(b + 2, 8, a);
        acc = vmlaq_n_f32(acc, vcvtq_f32_s32(p), qk_fp16_to_fp32(qk_load_u16(b)) * a->d);
    }
    return vaddvq_f32(acc);
}

static float qk_dot_q4_1(int64_t n, const void *restrict w, const void *restrict act) {
    const uint8_t *b = (const uint8_t *)w;
    const qk_act_q8_32 *a = (const qk_act_q8_32 *)act;
    float32x4_t acc = vdupq_n_f32(0.0f);
    float mins = 0.0f;
    for (int64_t i = 0; i < n / 32; i++, b += QK_Q4_1_BYTES, a++) {
        const int32x4_t p = qk_neon_block_nibbles(b + 4, 0, a);
        acc = vmlaq_n_f32(acc, vcvtq_f32_s32(p), qk_fp16_to_fp32(qk_load_u16(b)) * a->d);
        mins += qk_fp16_to_fp32(qk_load_u16(b + 2)) * a->s;
    }
    return vaddvq_f32(acc) + mins;
}

static float qk_dot_q8_0(int64_t n, const void *restrict w, const void *restrict act) {
    const uint8_t *b = (const uint8_t *)w;
    const qk_act_q8_32 *a = (const qk_act_q8_32 *)act;
    float32x4_t acc = vdupq_n_f32(0.0f);
    for (int64_t i = 0; i < n / 32; i++, b += QK_Q8_0_BYTES, a++) {
        const int32x4_t p = qk_neon_block_q8(vdupq_n_s32(0), (const int8_t *)(b + 2), a);
        acc = vmlaq_n_f32(acc, vcvtq_f32_s32(p), qk_fp16_to_fp32(qk_load_u16(b)) * a->d);
    }
    return vaddvq_f32(acc);
}

/* Q5: rarer in practice; the scalar loop is what runs there. */
static float qk_dot_q5_0(int64_t n, const void *restrict w, const void *restrict act) {
    return qk_dot_q5_0_scalar(n, w, act);
}
static float qk_dot_q5_1(int64_t n, const void *restrict w, const void *restrict act) {
    return qk_dot_q5_1_scalar(n, w, act);
}

#else /* portable */

static float qk_dot_q4_0(int64_t n, const void *restrict w, const void *restrict act) {
    return qk_dot_q4_0_scalar(n, w, act);
}
static float qk_dot_q4_1(int64_t n, const void *restrict w, const void *restrict act) {
    return qk_dot_q4_1_scalar(n, w, act);
}
static float qk_dot_q5_0(int64_t n, const void *restrict w, const void *restrict act) {
    return qk_dot_q5_0_scalar(n, w, act);
}
static float qk_dot_q5_1(int64_t n, const void *restrict w, const void *restrict act) {
    return qk_dot_q5_1_scalar(n, w, act);
}
static float qk_dot_q8_0(int64_t n, const void *restrict w, const void *restrict act) {
    return qk_dot_q8_0_scalar(n, w, act);
}

#endif

#endif
