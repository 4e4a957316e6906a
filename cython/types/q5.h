/* Q5_0 and Q5_1: Q4's nibbles plus a fifth bit, bit j of the little-endian u32 qh for
 * element j (ggml-common.h's block_q5_0 / block_q5_1).
 *   Q5_0: f16 d, qh[4], qs[16]          x = d * (q - 16)
 *   Q5_1: f16 d, f16 m, qh[4], qs[16]   x = d * q + m */
#ifndef QPACK_TYPES_Q5_H
#define QPACK_TYPES_Q5_H

#include "q4.h"

/* Bit j by a mask table: vectorizes without variable shifts (SSE2). */
static const uint32_t qk_bit32[32] = {
    1u << 0,  1u << 1,  1u << 2,  1u << 3,  1u << 4,  1u << 5,  1u << 6,  1u << 7,
    1u << 8,  1u << 9,  1u << 10, 1u << 11, 1u << 12, 1u << 13, 1u << 14, 1u << 15,
    1u << 16, 1u << 17, 1u << 18, 1u << 19, 1u << 20, 1u << 21, 1u << 22, 1u << 23,
    1u << 24, 1u << 25, 1u << 26, 1u << 27, 1u << 28, 1u << 29, 1u << 30, 1u << 31,
};

/* u = nibble | 16 * (bit j of qh). */
static inline void qk_u_q5(const uint8_t *qh, const uint8_t *qs, uint8_t u[32]) {
    const uint32_t bits = qk_load_u32(qh);
    uint8_t h[32];
    for (int j = 0; j < 32; j++) h[j] = (bits & qk_bit32[j]) ? 16 : 0;
    qk_u_q4(qs, u);
    for (int j = 0; j < 32; j++) u[j] |= h[j];
}

/* q = u - offset as signed bytes. */
static inline void qk_unpack_q5(const uint8_t *qh, const uint8_t *qs, int offset, int8_t q[32]) {
    uint8_t u[32];
    qk_u_q5(qh, qs, u);
    for (int j = 0; j < 32; j++) q[j] = (int8_t)(u[j] - offset);
}

#if QK_TILES_X86
#if QK_TILES_X86 == 1
/* Bits k..k+3 of each lane's qh -> bit 4 of bytes 0..3 (the fifth bit of four elements). */
static inline __m256i qk_qh_quad(__m256i qh, int k) {
    const __m256i v = _mm256_and_si256(_mm256_srli_epi32(qh, k), _mm256_set1_epi32(0xf));
    /* bit b of v goes to bit 8b + 4: the four shifted copies do not overlap */
    return _mm256_and_si256(_mm256_mullo_epi32(v, _mm256_set1_epi32(0x02040810)),
                            _mm256_set1_epi32(0x10101010));
}
#endif

/* Eight rows of a Q5 block: qh at qh_off, qs right after it. */
static inline void qk_q5_quads_x86(const uint8_t *const rp[8], size_t qh_off, __m256i q[8]) {
    qk_nibble_quads_x86(rp, qh_off + 4, q);
    const __m256i qh = qk_gather_u32(rp, qh_off);
#if QK_TILES_X86 == 2
    /* AVX-512BW: byte k/2 of each lane's qh to its four bytes, test one bit each, set 16 */
    const __m256i sixteen = _mm256_set1_epi8(0x10);
    for (int k = 0; k < 8; k++) {
        const char c = (char)(k / 2), bl = (char)(1 << (4 * (k % 2)));
        const __m256i ctrl = _mm256_setr_epi8(c, c, c, c, c + 4, c + 4, c + 4, c + 4, c + 8, c + 8, c + 8, c + 8,
                                              c + 12, c + 12, c + 12, c + 12, c, c, c, c, c + 4, c + 4, c + 4,
                                              c + 4, c + 8, c + 8, c + 8, c + 8, c + 12, c + 12, c + 12, c + 12);
        const __m256i bits = _mm256_set1_epi32((int)((uint32_t)(uint8_t)bl | (uint32_t)(uint8_t)(bl << 1) << 8 |
                                                     (uint32_t)(uint8_t)(bl << 2) << 16 |
                                                     (uint32_t)(uint8_t)(bl << 3) << 24));
        const __mmask32 set = _mm256_test_epi8_mask(_mm256_shuffle_epi8(qh, ctrl), bits);
        q[k] = _mm256_mask_add_epi8(q[k], set, q[k], sixteen); /* q <= 15: + 16 = | 16 */
    }
#else
    for (int k = 0; k < 8; k++) q[k] = _mm256_or_si256(q[k], qk_qh_quad(qh, 4 * k));
#endif
}
#endif

#if QK_TILES_NEON
/* Bits 4k..4k+3 of each lane's qh -> bit 4 of bytes 0..3 (as qk_qh_quad). */
static inline uint8x16_t qk_qh_quad_neon(uint32x4_t qh, int k) {
    const uint32x4_t v = vandq_u32(vshlq_u32(qh, vdupq_n_s32(-4 * k)), vdupq_n_u32(0xf));
    return vreinterpretq_u8_u32(vandq_u32(vmulq_u32(v, vdupq_n_u32(0x02040810)), vdupq_n_u32(0x10101010)));
}

/* Eight rows of a Q5 block: qh at qh_off, qs right after it. */
static inline void qk_q5_quads_neon(const uint8_t *const rp[8], size_t qh_off, uint8_t (*q)[QK_PANEL_ROWS][4]) {
    const uint8x16_t lo4 = vdupq_n_u8(0x0f);
    uint32_t w[8];
    for (int i = 0; i < 8; i++) w[i] = qk_load_u32(rp[i] + qh_off);
    const uint32x4_t qh[2] = {vld1q_u32(w), vld1q_u32(w + 4)};
    uint8x16_t g[2][4];
    qk_groups4_neon(rp, qh_off + 4, g[0], g[1]);
    for (int k = 0; k < 4; k++) {
        uint8x16_t lo[2], hi[2];
        for (int r = 0; r < 2; r++) {
            lo[r] = vorrq_u8(vandq_u8(g[r][k], lo4), qk_qh_quad_neon(qh[r], k));
            hi[r] = vorrq_u8(vshrq_n_u8(g[r][k], 4), qk_qh_quad_neon(qh[r], k + 4));
        }
        qk_store_q_neon(q[k], lo[0], lo[1]);
        qk_store_q_neon(q[k + 4], hi[0], hi[1]);
    }
}
#endif

/* ---------------------------------------------------------------- Q5_0 */

QK_NO_CONTRACT static void qk_dequant_q5_0(const void *restrict src, float *restrict dst, int64_t n) {
    const uint8_t *b = (const uint8_t *)src;
    int8_t q[32];
    for (int64_t i = 0; i < n / 32; i++, b += 22, dst += 32) {
        qk_unpack_q5(b + 2, b + 6, 16, q);
        qk_scale_block(q, qk_half_at(b), dst);
    }
}

static float qk_dot_q5_0(int64_t n, const void *restrict w, const void *restrict act) {
    const uint8_t *b = (const uint8_t *)w;
    const qk_act_q8_32 *a = (const qk_act_q8_32 *)act;
    int8_t q[32];
    float sum = 0.0f;
    for (int64_t i = 0; i < n / 32; i++, b += 22, a++) {
        qk_unpack_q5(b + 2, b + 6, 16, q);
        sum += qk_half_at(b) * a->d * (float)qk_sum_i8x32(q, a->qs);
    }
    return sum;
}

static inline void qk_row_q5_0(const uint8_t *x, uint8_t u[32], float *d, float *m) {
    qk_u_q5(x + 2, x + 6, u);
    *d = qk_half_at(x);
    *m = -16.0f * *d;
}

static inline void qk_pack_q5_0(const uint8_t *const rp[8], size_t o, qk_panel32 *p) {
#if QK_TILES_X86
    __m256 d, junk;
    __m256i q[8];
    qk_split_f16x2(qk_gather_u32(rp, o), &d, &junk);
    qk_q5_quads_x86(rp, o + 2, q);
    for (int k = 0; k < 8; k++) qk_store_q(p->q[k][0], q[k]);
    _mm256_store_ps(p->d, d);
    _mm256_store_ps(p->m, _mm256_mul_ps(d, _mm256_set1_ps(-16.0f)));
#elif QK_TILES_NEON
    qk_q5_quads_neon(rp, o + 2, p->q);
    for (int i = 0; i < QK_PANEL_ROWS; i++) {
        p->d[i] = qk_half_at(rp[i] + o);
        p->m[i] = -16.0f * p->d[i];
    }
#else
    qk_pack32_rows(rp, o, p, qk_row_q5_0);
#endif
}

/* ---------------------------------------------------------------- Q5_1 */

QK_NO_CONTRACT static void qk_dequant_q5_1(const void *restrict src, float *restrict dst, int64_t n) {
    const uint8_t *b = (const uint8_t *)src;
    int8_t q[32];
    for (int64_t i = 0; i < n / 32; i++, b += 24, dst += 32) {
        qk_unpack_q5(b + 4, b + 8, 0, q);
        qk_scale_min_block(q, qk_half_at(b), qk_half_at(b + 2), dst);
    }
}

static float qk_dot_q5_1(int64_t n, const void *restrict w, const void *restrict act) {
    const uint8_t *b = (const uint8_t *)w;
    const qk_act_q8_32 *a = (const qk_act_q8_32 *)act;
    int8_t q[32];
    float sum = 0.0f;
    for (int64_t i = 0; i < n / 32; i++, b += 24, a++) {
        qk_unpack_q5(b + 4, b + 8, 0, q);
        sum += qk_half_at(b) * a->d * (float)qk_sum_i8x32(q, a->qs) + qk_half_at(b + 2) * a->s;
    }
    return sum;
}

static inline void qk_row_q5_1(const uint8_t *x, uint8_t u[32], float *d, float *m) {
    qk_u_q5(x + 4, x + 8, u);
    *d = qk_half_at(x);
    *m = qk_half_at(x + 2);
}

static inline void qk_pack_q5_1(const uint8_t *const rp[8], size_t o, qk_panel32 *p) {
#if QK_TILES_X86
    __m256 d, m;
    __m256i q[8];
    qk_split_f16x2(qk_gather_u32(rp, o), &d, &m);
    qk_q5_quads_x86(rp, o + 4, q);
    for (int k = 0; k < 8; k++) qk_store_q(p->q[k][0], q[k]);
    _mm256_store_ps(p->d, d);
    _mm256_store_ps(p->m, m);
#elif QK_TILES_NEON
    qk_q5_quads_neon(rp, o + 4, p->q);
    for (int i = 0; i < QK_PANEL_ROWS; i++) {
        p->d[i] = qk_half_at(rp[i] + o);
        p->m[i] = qk_half_at(rp[i] + o + 2);
    }
#else
    qk_pack32_rows(rp, o, p, qk_row_q5_1);
#endif
}

#if QK_TILES_X86
/* One token (decode32.h): nibble | 16 * (bit j of qh) times the token's quants, in registers. */
static inline __m256i qk_isum_q5(const uint8_t *qh, __m256i a) {
    return qk_dot32_u8s8(qk_add16_where(qk_nibbles32(qh + 4), qk_load_u32(qh)), a);
}
static inline __m256i qk_isum_q5_0(const uint8_t *blk, __m256i a) { return qk_isum_q5(blk + 2, a); }
static inline __m256i qk_isum_q5_1(const uint8_t *blk, __m256i a) { return qk_isum_q5(blk + 4, a); }
#define QK_HAS_DECODE_q5_0 1
QK_SCALES_D(q5_0, -16.0f)
QK_DECODE32(q5_0, 22, qk_isum_q5_0, qk_scales_q5_0)
#define QK_HAS_DECODE_q5_1 1
QK_DECODE32(q5_1, 24, qk_isum_q5_1, qk_scales_dm)
#endif

#endif
