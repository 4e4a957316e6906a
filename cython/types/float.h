/* Float weights: F32, F16, BF16. They have no tile kernel (panel 0 in quant_types.def): their
 * dot, SIMD where the build has it, runs for every batch against f32 activations. */
#ifndef QPACK_TYPES_FLOAT_H
#define QPACK_TYPES_FLOAT_H

#include "../quants_common.h"

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

#endif
