/* Q6_K (ggml-common.h's block_q6_K): ql[128] low 4 bits, qh[64] high 2 bits, int8 scales[16]
 * (one per 16 elements), f16 d; 210 bytes. Element 128*h + 32*k + l (k 0..3, l 0..31): low 4
 * bits = nibble k/2 of ql[64*h + 32*(k%2) + l], high 2 bits = bits 2k..2k+1 of qh[32*h + l];
 * x = d * scales[e/16] * (q - 32). In the panel, u = q and the -32 is the min term. */
#ifndef QPACK_TYPES_Q6_K_H
#define QPACK_TYPES_Q6_K_H

#include "k_common.h"

static inline void qk_unpack_q6_k(const uint8_t *x, uint8_t u[QK_SUPER]) {
    for (int h = 0; h < 2; h++) {
        const uint8_t *ql = x + 64 * h, *qh = x + 128 + 32 * h;
        uint8_t *o = u + 128 * h;
        for (int l = 0; l < 32; l++) {
            o[l] = (uint8_t)((ql[l] & 0xf) | ((qh[l] & 3) << 4));
            o[32 + l] = (uint8_t)((ql[32 + l] & 0xf) | (((qh[l] >> 2) & 3) << 4));
            o[64 + l] = (uint8_t)((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4));
            o[96 + l] = (uint8_t)((ql[32 + l] >> 4) | (((qh[l] >> 6) & 3) << 4));
        }
    }
}

static void qk_dequant_q6_k(const void *restrict src, float *restrict y, int64_t n) {
    const uint8_t *x = (const uint8_t *)src;
    uint8_t u[QK_SUPER];
    for (int64_t i = 0; i < n / QK_SUPER; i++, x += 210, y += QK_SUPER) {
        const float d = qk_half_at(x + 208);
        const int8_t *sc = (const int8_t *)(x + 192);
        qk_unpack_q6_k(x, u);
        for (int g = 0; g < 16; g++) {
            const float dl = d * (float)sc[g];
            for (int l = 0; l < 16; l++) y[16 * g + l] = dl * (float)((int)u[16 * g + l] - 32);
        }
    }
}

static float qk_dot_q6_k(int64_t n, const void *restrict w, const void *restrict act) {
    const uint8_t *x = (const uint8_t *)w;
    const qk_act_q8_256 *y = (const qk_act_q8_256 *)act;
    float sum = 0.0f;
    uint8_t u[QK_SUPER];
    int8_t q[QK_SUPER];
    for (int64_t i = 0; i < n / QK_SUPER; i++, x += 210, y++) {
        const int8_t *sc = (const int8_t *)(x + 192);
        qk_unpack_q6_k(x, u);
        for (int e = 0; e < QK_SUPER; e++) q[e] = (int8_t)(u[e] - 32);
        int32_t sumi = 0;
        for (int g = 0; g < 16; g++) sumi += sc[g] * qk_k_dot_i8(q + 16 * g, y->qs + 16 * g, 16);
        sum += y->d * qk_half_at(x + 208) * (float)sumi;
    }
    return sum;
}

static inline void qk_q6_k_row_scales(const uint8_t *x, qk_panel256 *p, int i) {
    const int8_t *sc = (const int8_t *)(x + 192);
    for (int s = 0; s < 16; s++) p->sc[s][i] = sc[s];
    for (int q = 0; q < 8; q++) p->mn[q][i] = qk_pair16(32 * sc[2 * q], 32 * sc[2 * q + 1]);
    const float d = qk_half_at(x + 208);
    p->d[i] = d;
    p->nd[i] = -d; /* x = d*sc*(q - 32) = d*sc*q - d*(32 sc) */
}

static inline void qk_row_q6_k(const uint8_t *x, uint8_t u[QK_SUPER], qk_panel256 *p, int i) {
    qk_unpack_q6_k(x, u);
    qk_q6_k_row_scales(x, p, i);
}

#if QK_TILES_NEON
static inline void qk_q6_k_pack_neon(const uint8_t *const rp[8], size_t o, qk_panel256 *p) {
    const uint8x16_t lo4 = vdupq_n_u8(0x0f), m2 = vdupq_n_u8(0x03);
    uint8x16_t x[2][8], y[2][8], h[2][8];
    for (int half = 0; half < 2; half++) {
        qk_groups8_neon(rp, o + 64 * half, x[0], x[1]);
        qk_groups8_neon(rp, o + 64 * half + 32, y[0], y[1]);
        qk_groups8_neon(rp, o + 128 + 32 * half, h[0], h[1]);
        for (int k = 0; k < 8; k++) {
            uint8x16_t v[4][2];
            for (int r = 0; r < 2; r++) {
                v[0][r] = vorrq_u8(vandq_u8(x[r][k], lo4), vshlq_n_u8(vandq_u8(h[r][k], m2), 4));
                v[1][r] = vorrq_u8(vandq_u8(y[r][k], lo4), vshlq_n_u8(vandq_u8(vshrq_n_u8(h[r][k], 2), m2), 4));
                v[2][r] = vorrq_u8(vshrq_n_u8(x[r][k], 4), vshlq_n_u8(vandq_u8(vshrq_n_u8(h[r][k], 4), m2), 4));
                v[3][r] = vorrq_u8(vshrq_n_u8(y[r][k], 4), vshlq_n_u8(vshrq_n_u8(h[r][k], 6), 4));
            }
            for (int j = 0; j < 4; j++) qk_store_q_neon(p->q[32 * half + 8 * j + k], v[j][0], v[j][1]);
        }
    }
    for (int i = 0; i < QK_PANEL_ROWS; i++) qk_q6_k_row_scales(rp[i] + o, p, i);
}
#endif

#if QK_TILES_X86
static inline void qk_q6_k_pack_x86(const uint8_t *const rp[8], size_t o, qk_panel256 *p) {
    const __m256i lo4 = _mm256_set1_epi8(0x0f), m2 = _mm256_set1_epi8(0x03);
    __m256i x[8], y[8], h[8];
    for (int half = 0; half < 2; half++) {
        qk_groups8(rp, o + 64 * half, x);
        qk_groups8(rp, o + 64 * half + 32, y);
        qk_groups8(rp, o + 128 + 32 * half, h);
        for (int k = 0; k < 8; k++) {
            const __m256i xl = _mm256_and_si256(x[k], lo4), yl = _mm256_and_si256(y[k], lo4);
            const __m256i xh = _mm256_and_si256(_mm256_srli_epi16(x[k], 4), lo4);
            const __m256i yh = _mm256_and_si256(_mm256_srli_epi16(y[k], 4), lo4);
            const __m256i h0 = _mm256_slli_epi16(_mm256_and_si256(h[k], m2), 4);
            const __m256i h1 = _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(h[k], 2), m2), 4);
            const __m256i h2 = _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(h[k], 4), m2), 4);
            const __m256i h3 = _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(h[k], 6), m2), 4);
            qk_store_q(p->q[32 * half + k][0], _mm256_or_si256(xl, h0));
            qk_store_q(p->q[32 * half + 8 + k][0], _mm256_or_si256(yl, h1));
            qk_store_q(p->q[32 * half + 16 + k][0], _mm256_or_si256(xh, h2));
            qk_store_q(p->q[32 * half + 24 + k][0], _mm256_or_si256(yh, h3));
        }
    }
    /* 16 int8 scales at 192..207, f16 d at 208 */
    __m256i g[4];
    qk_groups4(rp, o + 192, g);
    __m256 junk, d;
    qk_split_f16x2(qk_gather_u32(rp, o + 206), &junk, &d);
    _mm256_store_ps(p->d, d);
    _mm256_store_ps(p->nd, _mm256_sub_ps(_mm256_setzero_ps(), d));
    for (int k = 0; k < 4; k++) {
        for (int j = 0; j < 4; j++)
            _mm256_store_si256((__m256i *)p->sc[4 * k + j], _mm256_srai_epi32(_mm256_slli_epi32(g[k], 24 - 8 * j), 24));
        const __m256i e = _mm256_srai_epi16(_mm256_slli_epi16(g[k], 8), 8); /* bytes 0, 2 */
        const __m256i od = _mm256_srai_epi16(g[k], 8);                       /* bytes 1, 3 */
        const __m256i p0 = _mm256_blend_epi16(e, _mm256_slli_epi32(od, 16), 0xAA);
        const __m256i p1 = _mm256_blend_epi16(_mm256_srli_epi32(e, 16), od, 0xAA);
        _mm256_store_si256((__m256i *)p->mn[2 * k], _mm256_slli_epi16(p0, 5)); /* 32 * sc */
        _mm256_store_si256((__m256i *)p->mn[2 * k + 1], _mm256_slli_epi16(p1, 5));
    }
}
#endif

static inline void qk_pack_q6_k(const uint8_t *const rp[8], size_t o, qk_panel256 *p) {
#if QK_TILES_X86
    qk_q6_k_pack_x86(rp, o, p);
#elif QK_TILES_NEON
    qk_q6_k_pack_neon(rp, o, p);
#else
    qk_pack256_rows(rp, o, p, qk_row_q6_k);
#endif
}

#endif
