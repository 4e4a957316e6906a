/* Q4_0 and Q4_1: 32 elements, 4-bit quants, element j < 16 in the low nibble of qs[j] and
 * element j + 16 in its high nibble (ggml-common.h's block_q4_0 / block_q4_1).
 *   Q4_0: f16 d, qs[16]            x = d * (q - 8)
 *   Q4_1: f16 d, f16 m, qs[16]     x = d * q + m
 * Also the nibble and scale helpers the other 32-element files (q5.h, q8.h, iq4.h) share. */
#ifndef QPACK_TYPES_Q4_H
#define QPACK_TYPES_Q4_H

#include "../panel.h"
#include "decode32.h"

/* ---------------------------------------------------------------- shared scalar helpers */

/* u[j] = low nibble of qs[j], u[j + 16] = high nibble. Written as plain loops over a block so
 * that gcc vectorizes them even for baseline x86-64 (SSE2) and armv8-a. */
static inline void qk_u_q4(const uint8_t *qs, uint8_t u[32]) {
    for (int j = 0; j < 16; j++) {
        u[j] = qs[j] & 0x0f;
        u[j + 16] = qs[j] >> 4;
    }
}

/* q = u - offset as signed bytes. */
static inline void qk_unpack_q4(const uint8_t *qs, int offset, int8_t q[32]) {
    for (int j = 0; j < 16; j++) {
        q[j] = (int8_t)((qs[j] & 0x0f) - offset);
        q[j + 16] = (int8_t)((qs[j] >> 4) - offset);
    }
}

static inline int qk_sum_i8x32(const int8_t *x, const int8_t *y) {
    int s = 0;
    for (int j = 0; j < 32; j++) s += x[j] * y[j];
    return s;
}

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

#if QK_TILES_NEON
/* NEON: 16 bytes of nibbles at off of the 8 rows -> panel quads 0-7 (as qk_nibble_quads_x86). */
static inline void qk_nibble_quads_neon(const uint8_t *const rp[8], size_t off, uint8_t (*q)[QK_PANEL_ROWS][4]) {
    const uint8x16_t lo4 = vdupq_n_u8(0x0f);
    uint8x16_t g[4], h[4];
    qk_groups4_neon(rp, off, g, h);
    for (int k = 0; k < 4; k++) {
        qk_store_q_neon(q[k], vandq_u8(g[k], lo4), vandq_u8(h[k], lo4));
        qk_store_q_neon(q[k + 4], vshrq_n_u8(g[k], 4), vshrq_n_u8(h[k], 4));
    }
}
#endif

#if QK_TILES_X86
/* 16 bytes of nibbles at off of the 8 rows -> panel quads: low nibbles are quads 0-3 (elements
 * 0-15), high nibbles quads 4-7. */
static inline void qk_nibble_quads_x86(const uint8_t *const rp[8], size_t off, __m256i q[8]) {
    const __m256i lo4 = _mm256_set1_epi8(0x0f);
    __m256i g[4];
    qk_groups4(rp, off, g);
    for (int k = 0; k < 4; k++) {
        q[k] = _mm256_and_si256(g[k], lo4);
        q[k + 4] = _mm256_and_si256(_mm256_srli_epi16(g[k], 4), lo4);
    }
}
#endif

/* ---------------------------------------------------------------- Q4_0 */

QK_NO_CONTRACT static void qk_dequant_q4_0(const void *restrict src, float *restrict dst, int64_t n) {
    const uint8_t *b = (const uint8_t *)src;
    int8_t q[32];
    for (int64_t i = 0; i < n / 32; i++, b += 18, dst += 32) {
        qk_unpack_q4(b + 2, 8, q);
        qk_scale_block(q, qk_half_at(b), dst);
    }
}

/* Reference dot (tests, and the ground truth the tiles are held to). */
static float qk_dot_q4_0(int64_t n, const void *restrict w, const void *restrict act) {
    const uint8_t *b = (const uint8_t *)w;
    const qk_act_q8_32 *a = (const qk_act_q8_32 *)act;
    int8_t q[32];
    float sum = 0.0f;
    for (int64_t i = 0; i < n / 32; i++, b += 18, a++) {
        qk_unpack_q4(b + 2, 8, q);
        sum += qk_half_at(b) * a->d * (float)qk_sum_i8x32(q, a->qs);
    }
    return sum;
}

static inline void qk_row_q4_0(const uint8_t *x, uint8_t u[32], float *d, float *m) {
    qk_u_q4(x + 2, u);
    *d = qk_half_at(x);
    *m = -8.0f * *d;
}

static inline void qk_pack_q4_0(const uint8_t *const rp[8], size_t o, qk_panel32 *p) {
#if QK_TILES_X86
    __m256 d, junk;
    __m256i q[8];
    qk_split_f16x2(qk_gather_u32(rp, o), &d, &junk);
    qk_nibble_quads_x86(rp, o + 2, q);
    for (int k = 0; k < 8; k++) qk_store_q(p->q[k][0], q[k]);
    _mm256_store_ps(p->d, d);
    _mm256_store_ps(p->m, _mm256_mul_ps(d, _mm256_set1_ps(-8.0f)));
#elif QK_TILES_NEON
    qk_nibble_quads_neon(rp, o + 2, p->q);
    for (int i = 0; i < QK_PANEL_ROWS; i++) {
        p->d[i] = qk_half_at(rp[i] + o);
        p->m[i] = -8.0f * p->d[i];
    }
#else
    qk_pack32_rows(rp, o, p, qk_row_q4_0);
#endif
}

/* ---------------------------------------------------------------- Q4_1 */

QK_NO_CONTRACT static void qk_dequant_q4_1(const void *restrict src, float *restrict dst, int64_t n) {
    const uint8_t *b = (const uint8_t *)src;
    int8_t q[32];
    for (int64_t i = 0; i < n / 32; i++, b += 20, dst += 32) {
        qk_unpack_q4(b + 4, 0, q);
        qk_scale_min_block(q, qk_half_at(b), qk_half_at(b + 2), dst);
    }
}

static float qk_dot_q4_1(int64_t n, const void *restrict w, const void *restrict act) {
    const uint8_t *b = (const uint8_t *)w;
    const qk_act_q8_32 *a = (const qk_act_q8_32 *)act;
    int8_t q[32];
    float sum = 0.0f;
    for (int64_t i = 0; i < n / 32; i++, b += 20, a++) {
        qk_unpack_q4(b + 4, 0, q);
        sum += qk_half_at(b) * a->d * (float)qk_sum_i8x32(q, a->qs) + qk_half_at(b + 2) * a->s;
    }
    return sum;
}

static inline void qk_row_q4_1(const uint8_t *x, uint8_t u[32], float *d, float *m) {
    qk_u_q4(x + 4, u);
    *d = qk_half_at(x);
    *m = qk_half_at(x + 2);
}

static inline void qk_pack_q4_1(const uint8_t *const rp[8], size_t o, qk_panel32 *p) {
#if QK_TILES_X86
    __m256 d, m;
    __m256i q[8];
    qk_split_f16x2(qk_gather_u32(rp, o), &d, &m);
    qk_nibble_quads_x86(rp, o + 4, q);
    for (int k = 0; k < 8; k++) qk_store_q(p->q[k][0], q[k]);
    _mm256_store_ps(p->d, d);
    _mm256_store_ps(p->m, m);
#elif QK_TILES_NEON
    qk_nibble_quads_neon(rp, o + 4, p->q);
    for (int i = 0; i < QK_PANEL_ROWS; i++) {
        p->d[i] = qk_half_at(rp[i] + o);
        p->m[i] = qk_half_at(rp[i] + o + 2);
    }
#else
    qk_pack32_rows(rp, o, p, qk_row_q4_1);
#endif
}

#if QK_TILES_X86
/* One token (decode32.h): the panel's nibbles times the token's quants, in registers. */
static inline __m256i qk_isum_q4_0(const uint8_t *blk, __m256i a) { return qk_dot32_u8s8(qk_nibbles32(blk + 2), a); }
static inline __m256i qk_isum_q4_1(const uint8_t *blk, __m256i a) { return qk_dot32_u8s8(qk_nibbles32(blk + 4), a); }
#define QK_HAS_DECODE_q4_0 1
QK_SCALES_D(q4_0, -8.0f)
QK_DECODE32(q4_0, 18, qk_isum_q4_0, qk_scales_q4_0)
#define QK_HAS_DECODE_q4_1 1
QK_DECODE32(q4_1, 20, qk_isum_q4_1, qk_scales_dm)
#endif

#endif
