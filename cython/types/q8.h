/* Q8_0: 32 elements, f16 d, int8 qs[32]; x = d * q (ggml-common.h's block_q8_0).
 * A wide type (group 0): its panel bytes are q + 128 with min -128 d, or, where the product
 * is signed (QK_WIDE_SIGNED: AVX2, NEON), q itself with no min. */
#ifndef QPACK_TYPES_Q8_H
#define QPACK_TYPES_Q8_H

#include "decode32.h"
#include "q4.h"

QK_NO_CONTRACT static void qk_dequant_q8_0(const void *restrict src, float *restrict dst, int64_t n) {
    const uint8_t *b = (const uint8_t *)src;
    for (int64_t i = 0; i < n / 32; i++, b += 34, dst += 32)
        qk_scale_block((const int8_t *)(b + 2), qk_half_at(b), dst);
}

static float qk_dot_q8_0(int64_t n, const void *restrict w, const void *restrict act) {
    const uint8_t *b = (const uint8_t *)w;
    const qk_act_q8_32 *a = (const qk_act_q8_32 *)act;
    float sum = 0.0f;
    for (int64_t i = 0; i < n / 32; i++, b += 34, a++) {
        /* through an int8_t pointer, not (int8_t)b[j]: see quants_common.h */
        sum += qk_half_at(b) * a->d * (float)qk_sum_i8x32((const int8_t *)(b + 2), a->qs);
    }
    return sum;
}

static inline void qk_row_q8_0(const uint8_t *x, uint8_t u[32], float *d, float *m) {
    *d = qk_half_at(x);
    for (int j = 0; j < 32; j++) u[j] = (uint8_t)(x[2 + j] ^ (QK_WIDE_SIGNED ? 0 : 0x80));
    *m = QK_WIDE_SIGNED ? 0.0f : -128.0f * *d;
}

static inline void qk_pack_q8_0(const uint8_t *const rp[8], size_t o, qk_panel32 *p) {
#if QK_TILES_X86
    const __m256i flip = _mm256_set1_epi8((char)(QK_WIDE_SIGNED ? 0 : 0x80));
    __m256 d, junk;
    __m256i g[4];
    qk_split_f16x2(qk_gather_u32(rp, o), &d, &junk);
    qk_groups4(rp, o + 2, g);
    for (int k = 0; k < 4; k++) qk_store_q(p->q[k][0], _mm256_xor_si256(g[k], flip));
    qk_groups4(rp, o + 18, g);
    for (int k = 0; k < 4; k++) qk_store_q(p->q[k + 4][0], _mm256_xor_si256(g[k], flip));
    _mm256_store_ps(p->d, d);
    _mm256_store_ps(p->m, QK_WIDE_SIGNED ? _mm256_setzero_ps() : _mm256_mul_ps(d, _mm256_set1_ps(-128.0f)));
#elif QK_TILES_NEON /* signed panel: the bytes as they are */
    uint8x16_t g[4], h[4];
    for (int part = 0; part < 2; part++) {
        qk_groups4_neon(rp, o + 2 + 16 * part, g, h);
        for (int k = 0; k < 4; k++) qk_store_q_neon(p->q[4 * part + k], g[k], h[k]);
    }
    for (int i = 0; i < QK_PANEL_ROWS; i++) {
        p->d[i] = qk_half_at(rp[i] + o);
        p->m[i] = 0.0f;
    }
#else
    qk_pack32_rows(rp, o, p, qk_row_q8_0);
#endif
}

#if QK_TILES_X86
/* One token (decode32.h): the block's panel bytes times the token's quants, in registers. */
static inline __m256i qk_isum_q8_0(const uint8_t *blk, __m256i a) {
    const __m256i q = _mm256_loadu_si256((const __m256i *)(blk + 2));
#if QK_TILES_X86 == 2 /* u = q + 128 */
    return _mm256_dpbusd_epi32(_mm256_setzero_si256(), _mm256_xor_si256(q, _mm256_set1_epi8((char)0x80)), a);
#else /* signed panel: |q| times a with q's sign (|q| <= 128, |a| <= 127: no int16 overflow) */
    const __m256i p = _mm256_maddubs_epi16(_mm256_sign_epi8(q, q), _mm256_sign_epi8(a, q));
    return _mm256_madd_epi16(p, _mm256_set1_epi16(1));
#endif
}
#define QK_HAS_DECODE_q8_0 1
QK_DECODE32(q8_0, 34, 0, QK_WIDE_SIGNED ? 0.0f : -128.0f, qk_isum_q8_0)
#endif

#endif
