/* IQ4_NL and IQ4_XS (ggml-common.h's block_iq4_nl / block_iq4_xs): 4-bit indices into 16
 * non-linear levels, laid out as Q4 nibbles (element j < 16 low nibble of qs[j], j + 16 high).
 *   IQ4_NL: f16 d, qs[16]                                   x = d * value      (18 bytes)
 *   IQ4_XS: f16 d, u16 scales_h, scales_l[4], qs[128]: 8 sub-blocks of 32 with a signed 6-bit
 *           scale ls (4 low bits in scales_l, 2 high in scales_h)   x = d * ls * value (136)
 * Wide types (group 0): panel bytes value + 128 with a -128 min, or the signed value itself
 * where the product is signed (QK_WIDE_SIGNED). */
#ifndef QPACK_TYPES_IQ4_H
#define QPACK_TYPES_IQ4_H

#include "k_common.h"
#include "q4.h"

static const int8_t qk_iq4_values[16] = {
    -127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113,
};
/* The panel's bytes per index: the value, or value + 128 (unsigned; the -128 is a min term). */
#if QK_WIDE_SIGNED
static const uint8_t qk_iq4_u[16] = {0x81, 0x98, 0xad, 0xbf, 0xcf, 0xdd, 0xea, 0xf6, 1, 13, 25, 38, 53, 69, 89, 113};
#define QK_IQ4_MIN 0
#else
static const uint8_t qk_iq4_u[16] = {1, 24, 45, 63, 79, 93, 106, 118, 129, 141, 153, 166, 181, 197, 217, 241};
#define QK_IQ4_MIN 128
#endif

static inline void qk_unpack_iq4(const uint8_t *qs, int8_t q[32]) {
    for (int j = 0; j < 16; j++) {
        q[j] = qk_iq4_values[qs[j] & 0xf];
        q[j + 16] = qk_iq4_values[qs[j] >> 4];
    }
}

static inline void qk_u_iq4(const uint8_t *qs, uint8_t u[32]) {
    for (int j = 0; j < 16; j++) {
        u[j] = qk_iq4_u[qs[j] & 0xf];
        u[j + 16] = qk_iq4_u[qs[j] >> 4];
    }
}

/* IQ4_XS: sub-block scale ib (0..7), signed 6-bit. */
static inline int qk_iq4xs_scale(const uint8_t *x, int ib) {
    const int lo = (x[4 + ib / 2] >> (4 * (ib % 2))) & 0xf;
    const int hi = (qk_load_u16(x + 2) >> (2 * ib)) & 3;
    return (lo | (hi << 4)) - 32;
}

#if QK_TILES_X86
/* 16 bytes of indices at off of the 8 rows -> the panel's 8 quads, through qk_iq4_u. */
static inline void qk_iq4_quads_x86(const uint8_t *const rp[8], size_t off, uint8_t (*dst)[QK_PANEL_ROWS][4]) {
    const __m256i lut = _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)qk_iq4_u));
    __m256i q[8];
    qk_nibble_quads_x86(rp, off, q);
    for (int k = 0; k < 8; k++) qk_store_q(dst[k][0], _mm256_shuffle_epi8(lut, q[k]));
}
#endif

#if QK_TILES_NEON
/* NEON: the same through a 16-byte table lookup. */
static inline void qk_iq4_quads_neon(const uint8_t *const rp[8], size_t off, uint8_t (*dst)[QK_PANEL_ROWS][4]) {
    const uint8x16_t lut = vld1q_u8(qk_iq4_u), lo4 = vdupq_n_u8(0x0f);
    uint8x16_t g[4], h[4];
    qk_groups4_neon(rp, off, g, h);
    for (int k = 0; k < 4; k++) {
        qk_store_q_neon(dst[k], vqtbl1q_u8(lut, vandq_u8(g[k], lo4)), vqtbl1q_u8(lut, vandq_u8(h[k], lo4)));
        qk_store_q_neon(dst[k + 4], vqtbl1q_u8(lut, vshrq_n_u8(g[k], 4)), vqtbl1q_u8(lut, vshrq_n_u8(h[k], 4)));
    }
}
#endif

/* ---------------------------------------------------------------- IQ4_NL */

static void qk_dequant_iq4_nl(const void *restrict src, float *restrict y, int64_t n) {
    const uint8_t *x = (const uint8_t *)src;
    int8_t q[32];
    for (int64_t i = 0; i < n / 32; i++, x += 18, y += 32) {
        const float d = qk_half_at(x);
        qk_unpack_iq4(x + 2, q);
        for (int j = 0; j < 32; j++) y[j] = d * (float)q[j];
    }
}

static float qk_dot_iq4_nl(int64_t n, const void *restrict w, const void *restrict act) {
    const uint8_t *x = (const uint8_t *)w;
    const qk_act_q8_32 *y = (const qk_act_q8_32 *)act;
    float sum = 0.0f;
    int8_t q[32];
    for (int64_t i = 0; i < n / 32; i++, x += 18, y++) {
        qk_unpack_iq4(x + 2, q);
        sum += y->d * qk_half_at(x) * (float)qk_k_dot_i8(q, y->qs, 32);
    }
    return sum;
}

static inline void qk_row_iq4_nl(const uint8_t *x, uint8_t u[32], float *d, float *m) {
    qk_u_iq4(x + 2, u);
    *d = qk_half_at(x);
    *m = QK_IQ4_MIN ? -128.0f * *d : 0.0f;
}

static inline void qk_pack_iq4_nl(const uint8_t *const rp[8], size_t o, qk_panel32 *p) {
#if QK_TILES_X86
    __m256 d, junk;
    qk_split_f16x2(qk_gather_u32(rp, o), &d, &junk);
    qk_iq4_quads_x86(rp, o + 2, p->q);
    _mm256_store_ps(p->d, d);
    _mm256_store_ps(p->m, QK_IQ4_MIN ? _mm256_mul_ps(d, _mm256_set1_ps(-128.0f)) : _mm256_setzero_ps());
#elif QK_TILES_NEON
    qk_iq4_quads_neon(rp, o + 2, p->q);
    for (int i = 0; i < QK_PANEL_ROWS; i++) {
        p->d[i] = qk_half_at(rp[i] + o);
        p->m[i] = 0.0f; /* signed panel */
    }
#else
    qk_pack32_rows(rp, o, p, qk_row_iq4_nl);
#endif
}

#if QK_TILES_X86
/* One token (decode32.h): the panel's bytes through the table, in registers. */
static inline __m256i qk_isum_iq4_nl(const uint8_t *blk, __m256i a) {
    const __m256i lut = _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)qk_iq4_u));
    return qk_dot32_wide(_mm256_shuffle_epi8(lut, qk_nibbles32(blk + 2)), a);
}
QK_SCALES_D(iq4_nl, QK_IQ4_MIN ? -128.0f : 0.0f)
#define QK_HAS_DECODE_iq4_nl 1
QK_DECODE32(iq4_nl, 18, qk_isum_iq4_nl, qk_scales_iq4_nl)
#endif

/* ---------------------------------------------------------------- IQ4_XS */

static void qk_dequant_iq4_xs(const void *restrict src, float *restrict y, int64_t n) {
    const uint8_t *x = (const uint8_t *)src;
    int8_t q[32];
    for (int64_t i = 0; i < n / QK_SUPER; i++, x += 136) {
        const float d = qk_half_at(x);
        for (int ib = 0; ib < 8; ib++, y += 32) {
            const float dl = d * (float)qk_iq4xs_scale(x, ib);
            qk_unpack_iq4(x + 8 + 16 * ib, q);
            for (int j = 0; j < 32; j++) y[j] = dl * (float)q[j];
        }
    }
}

static float qk_dot_iq4_xs(int64_t n, const void *restrict w, const void *restrict act) {
    const uint8_t *x = (const uint8_t *)w;
    const qk_act_q8_256 *y = (const qk_act_q8_256 *)act;
    float sum = 0.0f;
    int8_t q[32];
    for (int64_t i = 0; i < n / QK_SUPER; i++, x += 136, y++) {
        int32_t sumi = 0;
        for (int ib = 0; ib < 8; ib++) {
            qk_unpack_iq4(x + 8 + 16 * ib, q);
            sumi += qk_iq4xs_scale(x, ib) * qk_k_dot_i8(q, y->qs + 32 * ib, 32);
        }
        sum += y->d * qk_half_at(x) * (float)sumi;
    }
    return sum;
}

static inline void qk_iq4_xs_row_scales(const uint8_t *x, qk_panel256 *p, int i) {
    for (int ib = 0; ib < 8; ib++) {
        const int ls = qk_iq4xs_scale(x, ib);
        p->sc[ib][i] = ls;
        p->mn[ib][i] = qk_pair16(QK_IQ4_MIN * ls, QK_IQ4_MIN * ls);
    }
    const float d = qk_half_at(x);
    p->d[i] = d;
    p->nd[i] = -d; /* x = d*ls*(u - 128) */
}

static inline void qk_row_iq4_xs(const uint8_t *x, uint8_t u[QK_SUPER], qk_panel256 *p, int i) {
    for (int ib = 0; ib < 8; ib++) qk_u_iq4(x + 8 + 16 * ib, u + 32 * ib);
    qk_iq4_xs_row_scales(x, p, i);
}

static inline void qk_pack_iq4_xs(const uint8_t *const rp[8], size_t o, qk_panel256 *p) {
#if QK_TILES_X86
    for (int ib = 0; ib < 8; ib++) qk_iq4_quads_x86(rp, o + 8 + 16 * ib, p->q + 8 * ib);
    /* f16 d at 0, u16 scales_h at 2, scales_l[4] at 4 */
    const __m256i dh = qk_gather_u32(rp, o), sl = qk_gather_u32(rp, o + 4);
    const __m256i sh = _mm256_srli_epi32(dh, 16), off = _mm256_set1_epi32(32);
    for (int ib = 0; ib < 8; ib++) {
        const __m256i lo = _mm256_and_si256(_mm256_srli_epi32(sl, 4 * ib), _mm256_set1_epi32(0xf));
        const __m256i hi = _mm256_and_si256(_mm256_srli_epi32(sh, 2 * ib), _mm256_set1_epi32(3));
        const __m256i ls = _mm256_sub_epi32(_mm256_or_si256(lo, _mm256_slli_epi32(hi, 4)), off);
        const __m256i m = QK_IQ4_MIN ? _mm256_and_si256(_mm256_slli_epi32(ls, 7), _mm256_set1_epi32(0xffff))
                                     : _mm256_setzero_si256(); /* 128 ls */
        _mm256_store_si256((__m256i *)p->sc[ib], ls);
        _mm256_store_si256((__m256i *)p->mn[ib], _mm256_or_si256(m, _mm256_slli_epi32(m, 16)));
    }
    __m256 d, junk;
    qk_split_f16x2(dh, &d, &junk);
    _mm256_store_ps(p->d, d);
    _mm256_store_ps(p->nd, _mm256_sub_ps(_mm256_setzero_ps(), d));
#elif QK_TILES_NEON
    for (int ib = 0; ib < 8; ib++) qk_iq4_quads_neon(rp, o + 8 + 16 * ib, p->q + 8 * ib);
    for (int i = 0; i < QK_PANEL_ROWS; i++) qk_iq4_xs_row_scales(rp[i] + o, p, i);
#else
    qk_pack256_rows(rp, o, p, qk_row_iq4_xs);
#endif
}

#endif
