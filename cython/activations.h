/* The activation formats (quants.h QK_ACT_*; blocks in quants_common.h): an f32 row is
 * quantized ONCE into the format its weights' traits name and reused for every weight row.
 *   Q8_32   qk_act_q8_32[n / 32]    - Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, IQ4_NL
 *   Q8_256  qk_act_q8_256[n / 256]  - Q2_K..Q6_K, IQ4_XS
 * Every variant produces the same bytes (tests/test_quants*.py), so the variants' products
 * differ only by f32 summation order. */
#ifndef QPACK_ACTIVATIONS_H
#define QPACK_ACTIVATIONS_H

#include "quants_common.h"

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

/* Round to nearest int8 with d = max|x| / 127 (ggml's Q8_K), plus the 16- and 32-element sums. Every
 * variant produces the same bytes (one f32 multiply, round half to even), so the variants'
 * dot products differ only by f32 summation order. */
static void qk_quantize_q8_256(const float *restrict x, void *restrict dst, int64_t n) {
    qk_act_q8_256 *y = (qk_act_q8_256 *)dst;
    for (int64_t i = 0; i < n / 256; i++, x += 256) {
        float amax = 0.0f;
#if defined(__AVX512F__) && defined(__AVX512BW__)
        __m512 vmax = _mm512_setzero_ps();
        for (int j = 0; j < 256; j += 16)
            vmax = _mm512_max_ps(vmax, _mm512_abs_ps(_mm512_loadu_ps(x + j)));
        amax = _mm512_reduce_max_ps(vmax);
#else
        for (int j = 0; j < 256; j++) amax = fmaxf(amax, fabsf(x[j]));
#endif
        if (!(amax > 0.0f) || !isfinite(amax)) {
            /* all zero (or not finite: nothing sensible to keep) */
            y[i].d = 0.0f;
            memset(y[i].qs, 0, sizeof y[i].qs);
            memset(y[i].bsums, 0, sizeof y[i].bsums);
            memset(y[i].bsums32, 0, sizeof y[i].bsums32);
            continue;
        }
        const float id = 127.0f / amax;
        y[i].d = amax / 127.0f;
#if defined(__AVX512F__) && defined(__AVX512BW__)
        const __m512 vid = _mm512_set1_ps(id);
        for (int j = 0; j < 256; j += 16) {
            const __m512i v = _mm512_cvtps_epi32(_mm512_mul_ps(_mm512_loadu_ps(x + j), vid));
            _mm_storeu_si128((__m128i *)(y[i].qs + j), _mm512_cvtsepi32_epi8(v));
            y[i].bsums[j / 16] = (int16_t)_mm512_reduce_add_epi32(v);
        }
#elif defined(__AVX2__)
        const __m256 vid = _mm256_set1_ps(id);
        for (int j = 0; j < 256; j += 32) {
            __m256i v[4];
            for (int k = 0; k < 4; k++)
                v[k] = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(x + j + 8 * k), vid));
            /* packs work per 128-bit lane: the permute restores element order */
            const __m256i w = _mm256_packs_epi16(_mm256_packs_epi32(v[0], v[1]),
                                                 _mm256_packs_epi32(v[2], v[3]));
            const __m256i q = _mm256_permutevar8x32_epi32(w, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
            _mm256_storeu_si256((__m256i *)(y[i].qs + j), q);
        }
        for (int g = 0; g < 16; g++) {
            int s = 0;
            for (int l = 0; l < 16; l++) s += y[i].qs[16 * g + l];
            y[i].bsums[g] = (int16_t)s;
        }
#else
        for (int j = 0; j < 256; j++) {
            long v = lrintf(x[j] * id);
            y[i].qs[j] = (int8_t)(v > 127 ? 127 : v < -127 ? -127 : v);
        }
        for (int g = 0; g < 16; g++) {
            int s = 0;
            for (int l = 0; l < 16; l++) s += y[i].qs[16 * g + l];
            y[i].bsums[g] = (int16_t)s;
        }
#endif
        for (int g = 0; g < 8; g++) y[i].bsums32[g] = (int16_t)(y[i].bsums[2 * g] + y[i].bsums[2 * g + 1]);
    }
}

#endif
