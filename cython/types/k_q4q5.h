/* Q4_K and Q5_K (ggml-common.h's block_q4_K / block_q5_K): 256 elements in 8 sub-blocks of 32,
 * each with a 6-bit scale and a 6-bit min; x = d * sc[b] * q - dmin * mn[b].
 *   Q4_K: f16 d, f16 dmin, scales[12], qs[128]             (144 bytes)
 *   Q5_K: f16 d, f16 dmin, scales[12], qh[32], qs[128]     (176 bytes)
 * Sub-block b = low nibbles (b even) or high nibbles (b odd) of qs[32*(b/2) .. +31]; Q5_K's
 * fifth bit of element 32*b + l is bit b of qh[l]. The two share every routine here, with
 * `five` selecting the fifth bit. */
#ifndef QPACK_TYPES_K_Q4Q5_H
#define QPACK_TYPES_K_Q4Q5_H

#include "k_common.h"

/* The 12 scale bytes -> 8 scales and 8 mins (ggml's get_scale_min_k4): bytes 0-3 hold scales
 * 0-3 (and the top bits of scales 4-7), bytes 4-7 mins 0-3 (and the top bits of mins 4-7),
 * bytes 8-11 the low nibbles of scales 4-7 and, in their high nibbles, of mins 4-7. The one
 * scalar decoder; the x86 panel code (below) decodes eight rows at once the same way. */
static inline void qk_k4_scales(const uint8_t *p, uint8_t sc[8], uint8_t mn[8]) {
    const uint32_t a = qk_load_u32(p), b = qk_load_u32(p + 4), c = qk_load_u32(p + 8);
    const uint32_t w[4] = {a & 0x3f3f3f3fu, (c & 0x0f0f0f0fu) | ((a >> 2) & 0x30303030u),
                           b & 0x3f3f3f3fu, ((c >> 4) & 0x0f0f0f0fu) | ((b >> 2) & 0x30303030u)};
    for (int j = 0; j < 4; j++) {
        sc[j] = (uint8_t)(w[0] >> (8 * j));
        sc[j + 4] = (uint8_t)(w[1] >> (8 * j));
        mn[j] = (uint8_t)(w[2] >> (8 * j));
        mn[j + 4] = (uint8_t)(w[3] >> (8 * j));
    }
}

/* Quants in element order (0..15 for Q4_K, 0..31 for Q5_K). */
static inline void qk_k45_unpack(const uint8_t *x, int five, uint8_t q[QK_SUPER]) {
    const uint8_t *qs = x + (five ? 48 : 16), *qh = x + 16;
    for (int c = 0; c < 4; c++)
        for (int l = 0; l < 32; l++) {
            uint8_t lo = qs[32 * c + l] & 0xf, hi = qs[32 * c + l] >> 4;
            if (five) {
                lo |= (uint8_t)(((qh[l] >> (2 * c)) & 1) << 4);
                hi |= (uint8_t)(((qh[l] >> (2 * c + 1)) & 1) << 4);
            }
            q[64 * c + l] = lo;
            q[64 * c + 32 + l] = hi;
        }
}

QK_NO_CONTRACT static inline void qk_k45_dequant(const uint8_t *x, int bytes, int five, float *restrict y,
                                                 int64_t n) {
    QK_NO_CONTRACT_BODY
    uint8_t q[QK_SUPER], sc[8], mn[8];
    for (int64_t i = 0; i < n / QK_SUPER; i++, x += bytes, y += QK_SUPER) {
        const float d = qk_half_at(x), dmin = qk_half_at(x + 2);
        qk_k4_scales(x + 4, sc, mn);
        qk_k45_unpack(x, five, q);
        for (int b = 0; b < 8; b++) {
            const float dl = d * (float)sc[b], ml = dmin * (float)mn[b];
            for (int l = 0; l < 32; l++) y[32 * b + l] = dl * (float)q[32 * b + l] - ml;
        }
    }
}

static inline float qk_k45_dot(int64_t n, const uint8_t *x, int bytes, int five, const qk_act_q8_256 *y) {
    float sum = 0.0f;
    uint8_t q[QK_SUPER], sc[8], mn[8];
    for (int64_t i = 0; i < n / QK_SUPER; i++, x += bytes, y++) {
        qk_k4_scales(x + 4, sc, mn);
        qk_k45_unpack(x, five, q);
        int32_t sumi = 0, summ = 0;
        for (int b = 0; b < 8; b++) {
            sumi += sc[b] * qk_k_dot_i8((const int8_t *)q + 32 * b, y->qs + 32 * b, 32);
            summ += mn[b] * (y->bsums[2 * b] + y->bsums[2 * b + 1]);
        }
        sum += y->d * qk_half_at(x) * (float)sumi - y->d * qk_half_at(x + 2) * (float)summ;
    }
    return sum;
}

/* Row i's scales: d, dmin and the 12 scale bytes at the start of block x. */
static inline void qk_k45_row_scales(const uint8_t *x, qk_panel256 *p, int i) {
    uint8_t sc[8], mn[8];
    qk_k4_scales(x + 4, sc, mn);
    for (int s = 0; s < 8; s++) {
        p->sc[s][i] = sc[s];
        p->mn[s][i] = qk_pair16(mn[s], mn[s]); /* a 32-element sub-block covers bsums 2s, 2s+1 */
    }
    p->d[i] = qk_half_at(x);
    p->nd[i] = -qk_half_at(x + 2);
}

static inline void qk_k45_row(const uint8_t *x, int five, uint8_t u[QK_SUPER], qk_panel256 *p, int i) {
    qk_k45_unpack(x, five, u);
    qk_k45_row_scales(x, p, i);
}

#if QK_TILES_NEON
static inline void qk_k45_pack_neon(const uint8_t *const rp[8], size_t o, int five, qk_panel256 *p) {
    const uint8x16_t lo4 = vdupq_n_u8(0x0f), one = vdupq_n_u8(1);
    uint8x16_t x[2][8], h[2][8];
    if (five) qk_groups8_neon(rp, o + 16, h[0], h[1]);
    for (int c = 0; c < 4; c++) {
        qk_groups8_neon(rp, o + (five ? 48 : 16) + 32 * c, x[0], x[1]);
        for (int k = 0; k < 8; k++) {
            uint8x16_t lo[2], hi[2];
            for (int r = 0; r < 2; r++) {
                lo[r] = vandq_u8(x[r][k], lo4);
                hi[r] = vshrq_n_u8(x[r][k], 4);
                if (five) { /* bit 2c (low nibbles) and 2c+1 (high) of qh[l] */
                    lo[r] = vorrq_u8(lo[r], vshlq_n_u8(vandq_u8(qk_shr_u8(h[r][k], 2 * c), one), 4));
                    hi[r] = vorrq_u8(hi[r], vshlq_n_u8(vandq_u8(qk_shr_u8(h[r][k], 2 * c + 1), one), 4));
                }
            }
            qk_store_q_neon(p->q[16 * c + k], lo[0], lo[1]);
            qk_store_q_neon(p->q[16 * c + 8 + k], hi[0], hi[1]);
        }
    }
    for (int i = 0; i < QK_PANEL_ROWS; i++) qk_k45_row_scales(rp[i] + o, p, i);
}
#endif

#if QK_TILES_X86
static inline void qk_k45_pack_x86(const uint8_t *const rp[8], size_t o, int five, qk_panel256 *p) {
    const __m256i lo4 = _mm256_set1_epi8(0x0f), one = _mm256_set1_epi8(1);
    __m256i x[8], h[8];
    if (five) qk_groups8(rp, o + 16, h);
    for (int c = 0; c < 4; c++) {
        qk_groups8(rp, o + (five ? 48 : 16) + 32 * c, x);
        for (int k = 0; k < 8; k++) {
            __m256i lo = _mm256_and_si256(x[k], lo4);
            __m256i hi = _mm256_and_si256(_mm256_srli_epi16(x[k], 4), lo4);
            if (five) { /* bit 2c (low nibbles) and 2c+1 (high) of qh[l] */
                const __m256i b0 = _mm256_and_si256(_mm256_srli_epi16(h[k], 2 * c), one);
                const __m256i b1 = _mm256_and_si256(_mm256_srli_epi16(h[k], 2 * c + 1), one);
                lo = _mm256_or_si256(lo, _mm256_slli_epi16(b0, 4));
                hi = _mm256_or_si256(hi, _mm256_slli_epi16(b1, 4));
            }
            qk_store_q(p->q[16 * c + k][0], lo);
            qk_store_q(p->q[16 * c + 8 + k][0], hi);
        }
    }
    /* bytes 0..15: d, dmin, the 12 scale bytes, decoded as qk_k4_scales does */
    __m256i g[4];
    qk_groups4(rp, o, g);
    __m256 d, dmin;
    qk_split_f16x2(g[0], &d, &dmin);
    _mm256_store_ps(p->d, d);
    _mm256_store_ps(p->nd, _mm256_sub_ps(_mm256_setzero_ps(), dmin));
    const __m256i m6 = _mm256_set1_epi8(0x3f), m4 = _mm256_set1_epi8(0x0f), m2 = _mm256_set1_epi8(0x30);
    const __m256i a = g[1], b = g[2], c = g[3];
    const __m256i sc[2] = {_mm256_and_si256(a, m6),
                           _mm256_or_si256(_mm256_and_si256(c, m4), _mm256_and_si256(_mm256_srli_epi32(a, 2), m2))};
    const __m256i mn[2] = {_mm256_and_si256(b, m6),
                           _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi32(c, 4), m4),
                                           _mm256_and_si256(_mm256_srli_epi32(b, 2), m2))};
    const __m256i byte = _mm256_set1_epi32(0xff);
    for (int s = 0; s < 8; s++) {
        const __m256i scale = _mm256_and_si256(_mm256_srli_epi32(sc[s / 4], 8 * (s % 4)), byte);
        const __m256i min = _mm256_and_si256(_mm256_srli_epi32(mn[s / 4], 8 * (s % 4)), byte);
        _mm256_store_si256((__m256i *)p->sc[s], scale);
        _mm256_store_si256((__m256i *)p->mn[s], _mm256_or_si256(min, _mm256_slli_epi32(min, 16)));
    }
}
#endif

/* ---------------------------------------------------------------- Q4_K */

QK_NO_CONTRACT static void qk_dequant_q4_k(const void *restrict src, float *restrict y, int64_t n) {
    qk_k45_dequant((const uint8_t *)src, 144, 0, y, n);
}
static float qk_dot_q4_k(int64_t n, const void *restrict w, const void *restrict act) {
    return qk_k45_dot(n, (const uint8_t *)w, 144, 0, (const qk_act_q8_256 *)act);
}
static inline void qk_row_q4_k(const uint8_t *x, uint8_t u[QK_SUPER], qk_panel256 *p, int i) {
    qk_k45_row(x, 0, u, p, i);
}
static inline void qk_pack_q4_k(const uint8_t *const rp[8], size_t o, qk_panel256 *p) {
#if QK_TILES_X86
    qk_k45_pack_x86(rp, o, 0, p);
#elif QK_TILES_NEON
    qk_k45_pack_neon(rp, o, 0, p);
#else
    qk_pack256_rows(rp, o, p, qk_row_q4_k);
#endif
}

/* ---------------------------------------------------------------- Q5_K */

QK_NO_CONTRACT static void qk_dequant_q5_k(const void *restrict src, float *restrict y, int64_t n) {
    qk_k45_dequant((const uint8_t *)src, 176, 1, y, n);
}
static float qk_dot_q5_k(int64_t n, const void *restrict w, const void *restrict act) {
    return qk_k45_dot(n, (const uint8_t *)w, 176, 1, (const qk_act_q8_256 *)act);
}
static inline void qk_row_q5_k(const uint8_t *x, uint8_t u[QK_SUPER], qk_panel256 *p, int i) {
    qk_k45_row(x, 1, u, p, i);
}
static inline void qk_pack_q5_k(const uint8_t *const rp[8], size_t o, qk_panel256 *p) {
#if QK_TILES_X86
    qk_k45_pack_x86(rp, o, 1, p);
#elif QK_TILES_NEON
    qk_k45_pack_neon(rp, o, 1, p);
#else
    qk_pack256_rows(rp, o, p, qk_row_q5_k);
#endif
}

#endif
