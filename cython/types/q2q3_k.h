/* Q2_K and Q3_K (ggml-common.h's block_q2_K / block_q3_K): 2-bit quants, 16 sub-blocks of 16.
 *   Q2_K: scales[16] (low nibble scale, high nibble min), qs[64], f16 d, f16 dmin (84 bytes)
 *         x = d * (sc & 15) * q - dmin * (sc >> 4)
 *   Q3_K: hmask[32], qs[64], scales[12] (16 6-bit scales, offset 32), f16 d (110 bytes)
 *         x = d * (scale - 32) * (q - 4 + 4 * hbit)
 * Element 128*h + 32*j + l (h half, j 0..3, l 0..31) = bits 2j..2j+1 of qs[32*h + l]; Q3_K's
 * high bit is bit 4h+j of hmask[l]. In the panel, u = q + 4 * hbit (0..7) and -4 is a min. */
#ifndef QPACK_TYPES_Q2Q3_K_H
#define QPACK_TYPES_Q2Q3_K_H

#include "k_common.h"

/* u in element order; hmask NULL for Q2_K. */
static inline void qk_unpack_q23_k(const uint8_t *qs, const uint8_t *hmask, uint8_t u[QK_SUPER]) {
    for (int h = 0; h < 2; h++)
        for (int j = 0; j < 4; j++)
            for (int l = 0; l < 32; l++) {
                uint8_t q = (uint8_t)((qs[32 * h + l] >> (2 * j)) & 3);
                if (hmask) q |= (uint8_t)(((hmask[l] >> (4 * h + j)) & 1) << 2);
                u[128 * h + 32 * j + l] = q;
            }
}

/* Q3_K: 12 bytes -> 16 signed scales. Bytes 0-7: low nibbles of scales 0-7, high nibbles of
 * scales 8-15; bytes 8-11: the top two bits, scale i in byte 8 + i%4 at bit 2*(i/4). */
static inline void qk_k3_scales(const uint8_t *p, int8_t out[16]) {
    const uint32_t a0 = qk_load_u32(p), a1 = qk_load_u32(p + 4), a2 = qk_load_u32(p + 8);
    uint32_t w[4];
    w[0] = (a0 & 0x0f0f0f0fu) | ((a2 & 0x03030303u) << 4);
    w[1] = (a1 & 0x0f0f0f0fu) | (((a2 >> 2) & 0x03030303u) << 4);
    w[2] = ((a0 >> 4) & 0x0f0f0f0fu) | (((a2 >> 4) & 0x03030303u) << 4);
    w[3] = ((a1 >> 4) & 0x0f0f0f0fu) | (((a2 >> 6) & 0x03030303u) << 4);
    uint8_t u[16];
    memcpy(u, w, 16);
    for (int i = 0; i < 16; i++) out[i] = (int8_t)(u[i] - 32);
}

/* ---------------------------------------------------------------- Q2_K */

QK_NO_CONTRACT static void qk_dequant_q2_k(const void *restrict src, float *restrict y, int64_t n) {
    QK_NO_CONTRACT_BODY
    const uint8_t *x = (const uint8_t *)src;
    uint8_t u[QK_SUPER];
    for (int64_t i = 0; i < n / QK_SUPER; i++, x += 84, y += QK_SUPER) {
        const float d = qk_half_at(x + 80), dmin = qk_half_at(x + 82);
        qk_unpack_q23_k(x + 16, NULL, u);
        for (int g = 0; g < 16; g++) {
            const float dl = d * (float)(x[g] & 0xf);
            const float ml = dmin * (float)(x[g] >> 4);
            for (int l = 0; l < 16; l++) y[16 * g + l] = dl * (float)u[16 * g + l] - ml;
        }
    }
}

static float qk_dot_q2_k(int64_t n, const void *restrict w, const void *restrict act) {
    const uint8_t *x = (const uint8_t *)w;
    const qk_act_q8_256 *y = (const qk_act_q8_256 *)act;
    float sum = 0.0f;
    uint8_t u[QK_SUPER];
    for (int64_t i = 0; i < n / QK_SUPER; i++, x += 84, y++) {
        qk_unpack_q23_k(x + 16, NULL, u);
        int32_t sumi = 0, summ = 0;
        for (int g = 0; g < 16; g++) {
            sumi += (x[g] & 0xf) * qk_k_dot_i8((const int8_t *)u + 16 * g, y->qs + 16 * g, 16);
            summ += (x[g] >> 4) * y->bsums[g];
        }
        sum += y->d * qk_half_at(x + 80) * (float)sumi - y->d * qk_half_at(x + 82) * (float)summ;
    }
    return sum;
}

static inline void qk_q2_k_row_scales(const uint8_t *x, qk_panel256 *p, int i) {
    for (int g = 0; g < 16; g++) p->sc[g][i] = x[g] & 0xf;
    for (int q = 0; q < 8; q++) p->mn[q][i] = qk_pair16(x[2 * q] >> 4, x[2 * q + 1] >> 4);
    p->d[i] = qk_half_at(x + 80);
    p->nd[i] = -qk_half_at(x + 82);
}

static inline void qk_row_q2_k(const uint8_t *x, uint8_t u[QK_SUPER], qk_panel256 *p, int i) {
    qk_unpack_q23_k(x + 16, NULL, u);
    qk_q2_k_row_scales(x, p, i);
}

/* ---------------------------------------------------------------- Q3_K */

static void qk_dequant_q3_k(const void *restrict src, float *restrict y, int64_t n) {
    const uint8_t *x = (const uint8_t *)src;
    uint8_t u[QK_SUPER];
    int8_t sc[16];
    for (int64_t i = 0; i < n / QK_SUPER; i++, x += 110, y += QK_SUPER) {
        const float d = qk_half_at(x + 108);
        qk_unpack_q23_k(x + 32, x, u);
        qk_k3_scales(x + 96, sc);
        for (int g = 0; g < 16; g++) {
            const float dl = d * (float)sc[g];
            for (int l = 0; l < 16; l++) y[16 * g + l] = dl * (float)((int)u[16 * g + l] - 4);
        }
    }
}

static float qk_dot_q3_k(int64_t n, const void *restrict w, const void *restrict act) {
    const uint8_t *x = (const uint8_t *)w;
    const qk_act_q8_256 *y = (const qk_act_q8_256 *)act;
    float sum = 0.0f;
    uint8_t u[QK_SUPER];
    int8_t q[QK_SUPER], sc[16];
    for (int64_t i = 0; i < n / QK_SUPER; i++, x += 110, y++) {
        qk_unpack_q23_k(x + 32, x, u);
        for (int e = 0; e < QK_SUPER; e++) q[e] = (int8_t)(u[e] - 4);
        qk_k3_scales(x + 96, sc);
        int32_t sumi = 0;
        for (int g = 0; g < 16; g++) sumi += sc[g] * qk_k_dot_i8(q + 16 * g, y->qs + 16 * g, 16);
        sum += y->d * qk_half_at(x + 108) * (float)sumi;
    }
    return sum;
}

static inline void qk_q3_k_row_scales(const uint8_t *x, qk_panel256 *p, int i) {
    int8_t sc[16];
    qk_k3_scales(x + 96, sc);
    for (int g = 0; g < 16; g++) p->sc[g][i] = sc[g];
    for (int q = 0; q < 8; q++) p->mn[q][i] = qk_pair16(4 * sc[2 * q], 4 * sc[2 * q + 1]);
    const float d = qk_half_at(x + 108);
    p->d[i] = d;
    p->nd[i] = -d; /* x = d*sc*(u - 4) */
}

static inline void qk_row_q3_k(const uint8_t *x, uint8_t u[QK_SUPER], qk_panel256 *p, int i) {
    qk_unpack_q23_k(x + 32, x, u);
    qk_q3_k_row_scales(x, p, i);
}

#if QK_TILES_NEON
/* The 2-bit quants of eight rows (as qk_q23_k_quads_x86). */
static inline void qk_q23_k_quads_neon(const uint8_t *const rp[8], size_t o, int three, qk_panel256 *p) {
    const uint8x16_t m3 = vdupq_n_u8(3), one = vdupq_n_u8(1);
    uint8x16_t x[2][8], h[2][8];
    if (three) qk_groups8_neon(rp, o, h[0], h[1]);
    for (int half = 0; half < 2; half++) {
        qk_groups8_neon(rp, o + (three ? 32 : 16) + 32 * half, x[0], x[1]);
        for (int j = 0; j < 4; j++)
            for (int k = 0; k < 8; k++) {
                uint8x16_t q[2];
                for (int r = 0; r < 2; r++) {
                    q[r] = vandq_u8(qk_shr_u8(x[r][k], 2 * j), m3);
                    if (three)
                        q[r] = vorrq_u8(q[r], vshlq_n_u8(vandq_u8(qk_shr_u8(h[r][k], 4 * half + j), one), 2));
                }
                qk_store_q_neon(p->q[32 * half + 8 * j + k], q[0], q[1]);
            }
    }
}
#endif

/* ---------------------------------------------------------------- eight rows at once, x86 */

#if QK_TILES_X86
/* Q2_K: 16 bytes of scales at 0, f16 d, dmin at 80. */
static inline void qk_q2_k_scales_x86(const uint8_t *const rp[8], size_t o, qk_panel256 *p) {
    __m256i g[4];
    qk_groups4(rp, o, g);
    const __m256i m4 = _mm256_set1_epi32(0xf);
    for (int k = 0; k < 4; k++) {
        __m256i mins[4];
        for (int b = 0; b < 4; b++) {
            _mm256_store_si256((__m256i *)p->sc[4 * k + b], _mm256_and_si256(_mm256_srli_epi32(g[k], 8 * b), m4));
            mins[b] = _mm256_and_si256(_mm256_srli_epi32(g[k], 8 * b + 4), m4);
        }
        _mm256_store_si256((__m256i *)p->mn[2 * k], _mm256_or_si256(mins[0], _mm256_slli_epi32(mins[1], 16)));
        _mm256_store_si256((__m256i *)p->mn[2 * k + 1], _mm256_or_si256(mins[2], _mm256_slli_epi32(mins[3], 16)));
    }
    __m256 d, dmin;
    qk_split_f16x2(qk_gather_u32(rp, o + 80), &d, &dmin);
    _mm256_store_ps(p->d, d);
    _mm256_store_ps(p->nd, _mm256_sub_ps(_mm256_setzero_ps(), dmin));
}

/* Q3_K: 12 bytes of 6-bit scales at 96 (as qk_k3_scales), f16 d at 108. */
static inline void qk_q3_k_scales_x86(const uint8_t *const rp[8], size_t o, qk_panel256 *p) {
    const __m256i a0 = qk_gather_u32(rp, o + 96), a1 = qk_gather_u32(rp, o + 100), a2 = qk_gather_u32(rp, o + 104);
    __m256i w[4];
    qk_nibbles_2bits(a0, a1, a2, w);
    const __m256i byte = _mm256_set1_epi32(0xff), off = _mm256_set1_epi32(32), lo16 = _mm256_set1_epi32(0xffff);
    for (int k = 0; k < 4; k++) {
        __m256i sc[4];
        for (int b = 0; b < 4; b++) {
            sc[b] = _mm256_sub_epi32(_mm256_and_si256(_mm256_srli_epi32(w[k], 8 * b), byte), off);
            _mm256_store_si256((__m256i *)p->sc[4 * k + b], sc[b]);
        }
        for (int q = 0; q < 2; q++) { /* pair 2k + q: 4 * scales 4k + 2q, 4k + 2q + 1 */
            const __m256i lo = _mm256_and_si256(_mm256_slli_epi32(sc[2 * q], 2), lo16);
            _mm256_store_si256((__m256i *)p->mn[2 * k + q], _mm256_or_si256(lo, _mm256_slli_epi32(sc[2 * q + 1], 18)));
        }
    }
    __m256 junk, d;
    qk_split_f16x2(qk_gather_u32(rp, o + 106), &junk, &d);
    _mm256_store_ps(p->d, d);
    _mm256_store_ps(p->nd, _mm256_sub_ps(_mm256_setzero_ps(), d));
}

/* The 2-bit quants of both (Q2_K: qs at 16; Q3_K: hmask at 0, qs at 32, u = q + 4 * hbit). */
static inline void qk_q23_k_quads_x86(const uint8_t *const rp[8], size_t o, int three, qk_panel256 *p) {
    const __m256i m3 = _mm256_set1_epi8(3), one = _mm256_set1_epi8(1);
    __m256i x[8], h[8];
    if (three) qk_groups8(rp, o, h);
    for (int half = 0; half < 2; half++) {
        qk_groups8(rp, o + (three ? 32 : 16) + 32 * half, x);
        for (int j = 0; j < 4; j++)
            for (int k = 0; k < 8; k++) {
                __m256i q = _mm256_and_si256(_mm256_srli_epi16(x[k], 2 * j), m3);
                if (three)
                    q = _mm256_or_si256(
                        q, _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(h[k], 4 * half + j), one), 2));
                qk_store_q(p->q[32 * half + 8 * j + k][0], q);
            }
    }
}
#endif

static inline void qk_pack_q2_k(const uint8_t *const rp[8], size_t o, qk_panel256 *p) {
#if QK_TILES_X86
    qk_q23_k_quads_x86(rp, o, 0, p);
    qk_q2_k_scales_x86(rp, o, p);
#elif QK_TILES_NEON
    qk_q23_k_quads_neon(rp, o, 0, p);
    for (int i = 0; i < QK_PANEL_ROWS; i++) qk_q2_k_row_scales(rp[i] + o, p, i);
#else
    qk_pack256_rows(rp, o, p, qk_row_q2_k);
#endif
}

static inline void qk_pack_q3_k(const uint8_t *const rp[8], size_t o, qk_panel256 *p) {
#if QK_TILES_X86
    qk_q23_k_quads_x86(rp, o, 1, p);
    qk_q3_k_scales_x86(rp, o, p);
#elif QK_TILES_NEON
    qk_q23_k_quads_neon(rp, o, 1, p);
    for (int i = 0; i < QK_PANEL_ROWS; i++) qk_q3_k_row_scales(rp[i] + o, p, i);
#else
    qk_pack256_rows(rp, o, p, qk_row_q3_k);
#endif
}

#endif
