/* TQ1_0 and TQ2_0: ternary weights x = d * (q - 1), q in {0, 1, 2} (TQ2_0 may also store 3),
 * one f16 d per 256 elements (gguf-py's TQ1_0 / TQ2_0, ggml's dequantize_row_tq*).
 *     TQ1_0: five trits per byte in base 3, scaled so that trit n of byte v is
 *            ((uint8_t)(v * 3^n) * 3) >> 8; bytes 0..31 give elements 32 n + m, bytes 32..47
 *            elements 160 + 16 n + m, the 4 qh bytes (four trits each) elements 240 + 4 n + m
 *     TQ2_0: 2 bits each; bit pair l of byte 32 j + m is element 128 j + 32 l + m
 * Panel form (panel_unpack.h): u = q, sc = 1, x = d * (u - 1): the bsums coefficient is 1.
 * max(u) = 3: AVX2 group 8.
 */
#ifndef QPACK_TYPES_TQ_H
#define QPACK_TYPES_TQ_H

#include "panel_unpack.h"

typedef struct {
    uint8_t qs[48];
    uint8_t qh[4];
    uint8_t d[2];
} qk_block_tq1_0;
QK_BLOCK_SIZE_IS(qk_block_tq1_0, 54);

typedef struct {
    uint8_t qs[64];
    uint8_t d[2];
} qk_block_tq2_0;
QK_BLOCK_SIZE_IS(qk_block_tq2_0, 66);

static inline void qk_tq1_0_trits(const qk_block_tq1_0 *x, uint8_t q[256]) {
    static const uint8_t pow3[5] = {1, 3, 9, 27, 81};
    for (int n = 0; n < 5; n++) {
        for (int m = 0; m < 32; m++) q[32 * n + m] = (uint8_t)(((uint8_t)(x->qs[m] * pow3[n]) * 3) >> 8);
        for (int m = 0; m < 16; m++) q[160 + 16 * n + m] = (uint8_t)(((uint8_t)(x->qs[32 + m] * pow3[n]) * 3) >> 8);
    }
    for (int n = 0; n < 4; n++)
        for (int m = 0; m < 4; m++) q[240 + 4 * n + m] = (uint8_t)(((uint8_t)(x->qh[m] * pow3[n]) * 3) >> 8);
}

static inline void qk_tq2_0_quants(const qk_block_tq2_0 *x, uint8_t q[256]) {
    for (int j = 0; j < 2; j++)
        for (int l = 0; l < 4; l++)
            for (int m = 0; m < 32; m++) q[128 * j + 32 * l + m] = (x->qs[32 * j + m] >> (2 * l)) & 3;
}

QK_NO_CONTRACT static void qk_dequant_tq1_0(const void *restrict src, float *restrict y, int64_t n) {
    QK_NO_CONTRACT_BODY
    const qk_block_tq1_0 *x = (const qk_block_tq1_0 *)src;
    uint8_t q[256];
    for (int64_t b = 0; b < n / 256; b++, x++, y += 256) {
        const float d = qk_fp16_to_fp32(qk_load_u16(x->d));
        qk_tq1_0_trits(x, q);
        for (int k = 0; k < 256; k++) y[k] = d * (float)((int)q[k] - 1);
    }
}

QK_NO_CONTRACT static void qk_dequant_tq2_0(const void *restrict src, float *restrict y, int64_t n) {
    QK_NO_CONTRACT_BODY
    const qk_block_tq2_0 *x = (const qk_block_tq2_0 *)src;
    uint8_t q[256];
    for (int64_t b = 0; b < n / 256; b++, x++, y += 256) {
        const float d = qk_fp16_to_fp32(qk_load_u16(x->d));
        qk_tq2_0_quants(x, q);
        for (int k = 0; k < 256; k++) y[k] = d * (float)((int)q[k] - 1);
    }
}

static inline void qk_tq_panel_scales(const uint8_t *d16, qk_panel256 *p, int i) {
    for (int s = 0; s < 8; s++) {
        p->sc[s][i] = 1;
        p->mn[s][i] = qk_pair16(1, 1);
    }
    const float d = qk_fp16_to_fp32(qk_load_u16(d16));
    p->d[i] = d;
    p->nd[i] = -d;
}

#if QK_TILES_X86
/* Trit n of bytes v (32 at a time): t = v * 3^n mod 256 by repeated byte additions, then
 * (t * 3) >> 8 = (t >= 86) + (t >= 171). */
static inline __m256i qk_trit_of(__m256i t) {
    const __m256i ge86 = _mm256_cmpeq_epi8(_mm256_max_epu8(t, _mm256_set1_epi8(86)), t);
    const __m256i ge171 = _mm256_cmpeq_epi8(_mm256_max_epu8(t, _mm256_set1_epi8((char)171)), t);
    return _mm256_sub_epi8(_mm256_sub_epi8(_mm256_setzero_si256(), ge86), ge171);
}

static inline __m256i qk_times3_epi8(__m256i t) { return _mm256_add_epi8(_mm256_add_epi8(t, t), t); }
#endif

static inline void qk_unpack_tq1_0(const uint8_t *blk, uint8_t *u, qk_panel256 *p, int i) {
    const qk_block_tq1_0 *x = (const qk_block_tq1_0 *)blk;
#if QK_TILES_X86
    __m256i a = _mm256_loadu_si256((const __m256i *)x->qs);                  /* elements 32 n + m */
    __m256i b = _mm256_castsi128_si256(_mm_loadu_si128((const __m128i *)(x->qs + 32))); /* 160 + 16 n + m */
    for (int n = 0; n < 5; n++) {
        _mm256_storeu_si256((__m256i *)(u + 32 * n), qk_trit_of(a));
        _mm_storeu_si128((__m128i *)(u + 160 + 16 * n), _mm256_castsi256_si128(qk_trit_of(b)));
        a = qk_times3_epi8(a);
        b = qk_times3_epi8(b);
    }
    static const uint8_t pow3[4] = {1, 3, 9, 27};
    for (int n = 0; n < 4; n++)
        for (int m = 0; m < 4; m++) u[240 + 4 * n + m] = (uint8_t)(((uint8_t)(x->qh[m] * pow3[n]) * 3) >> 8);
#else
    qk_tq1_0_trits(x, u);
#endif
    qk_tq_panel_scales(x->d, p, i);
}

static inline void qk_unpack_tq2_0(const uint8_t *blk, uint8_t *u, qk_panel256 *p, int i) {
    const qk_block_tq2_0 *x = (const qk_block_tq2_0 *)blk;
    qk_tq2_0_quants(x, u);
    qk_tq_panel_scales(x->d, p, i);
}

#if QK_TILES_X86
/* The scales of the eight rows: sc = 1, bsums coefficient 1, d and -d from the f16 at d_off. */
static inline void qk_tq_panel_scales_x86(const uint8_t *const rp[8], size_t d_off, qk_panel256 *p) {
    for (int s = 0; s < 8; s++) {
        _mm256_store_si256((__m256i *)p->sc[s], _mm256_set1_epi32(1));
        _mm256_store_si256((__m256i *)p->mn[s], _mm256_set1_epi32(qk_pair16(1, 1)));
    }
    uint16_t h[8];
    for (int i = 0; i < 8; i++) h[i] = qk_load_u16(rp[i] + d_off);
    const __m256 d = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)h));
    _mm256_store_ps(p->d, d);
    _mm256_store_ps(p->nd, _mm256_sub_ps(_mm256_setzero_ps(), d));
}

/* Eight rows straight into the panel: the byte-wise trit and bit-pair extraction works on the
 * transposed 4-byte groups as well as on a row. */
static inline void qk_pack_tq1_0(const uint8_t *const rp[8], size_t o, qk_panel256 *p) {
    __m256i x[8], g[4];
    qk_groups8(rp, o, x); /* bytes 4k..4k+3: elements 32 n + 4k.. for trit n */
    for (int n = 0; n < 5; n++)
        for (int k = 0; k < 8; k++) {
            qk_store_q(p->q[8 * n + k][0], qk_trit_of(x[k]));
            x[k] = qk_times3_epi8(x[k]);
        }
    qk_groups4(rp, o + 32, g); /* bytes 32 + 4k..: elements 160 + 16 n + 4k.. */
    for (int n = 0; n < 5; n++)
        for (int k = 0; k < 4; k++) {
            qk_store_q(p->q[40 + 4 * n + k][0], qk_trit_of(g[k]));
            g[k] = qk_times3_epi8(g[k]);
        }
    __m256i h = qk_gather_u32(rp, o + 48); /* qh: elements 240 + 4 n + m */
    for (int n = 0; n < 4; n++) {
        qk_store_q(p->q[60 + n][0], qk_trit_of(h));
        h = qk_times3_epi8(h);
    }
    qk_tq_panel_scales_x86(rp, o + 52, p);
}

/* TQ2_0's bit pairs are laid out as Q2_K's: bit pair l of byte 32 j + m is element 128 j + 32 l + m. */
static inline void qk_pack_tq2_0(const uint8_t *const rp[8], size_t o, qk_panel256 *p) {
    const __m256i m3 = _mm256_set1_epi8(3);
    for (int half = 0; half < 2; half++) {
        __m256i x[8];
        qk_groups8(rp, o + 32 * half, x);
        for (int l = 0; l < 4; l++)
            for (int k = 0; k < 8; k++)
                qk_store_q(p->q[32 * half + 8 * l + k][0], _mm256_and_si256(_mm256_srli_epi16(x[k], 2 * l), m3));
    }
    qk_tq_panel_scales_x86(rp, o + 64, p);
}


/* Decode (panel_unpack.h): sc = 1 everywhere, so the u . a of a block sum in int16 (8 maddubs
 * pairs of 2 * 3 * 127 each) before one widening; the bsums coefficient is 1. */
static inline int32_t qk_tq_sum16(const __m256i p[8]) {
    __m256i s = p[0];
    for (int k = 1; k < 8; k++) s = _mm256_add_epi16(s, p[k]);
    return qk_hsum_epi32(_mm256_madd_epi16(s, _mm256_set1_epi16(1)));
}

static inline int32_t qk_bsums_total(const qk_act_q8_256 *a) {
    const __m256i b = _mm256_loadu_si256((const __m256i *)a->bsums);
    return qk_hsum_epi32(_mm256_madd_epi16(b, _mm256_set1_epi16(1)));
}

static inline __m256i qk_maddubs_at(__m256i u, const int8_t *a) {
    return _mm256_maddubs_epi16(u, _mm256_loadu_si256((const __m256i *)a));
}

static inline float qk_fused_tq1_0(const uint8_t *blk, const qk_act_q8_256 *a, int32_t *tot, int32_t *mins) {
    const qk_block_tq1_0 *x = (const qk_block_tq1_0 *)blk;
    __m256i p[8];
    __m256i v = _mm256_loadu_si256((const __m256i *)x->qs); /* elements 32 n + m */
    for (int n = 0; n < 5; n++) {
        p[n] = qk_maddubs_at(qk_trit_of(v), a->qs + 32 * n);
        v = qk_times3_epi8(v);
    }
    /* elements 160 + 16 n + m: bytes 32..47 times 3^n, two n to a vector; the last one pairs
     * n = 4 with the qh trits (elements 240 + 4 n + m: qh times 3^n in u32 n) */
    const __m128i b0 = _mm_loadu_si128((const __m128i *)(x->qs + 32));
    const __m128i b1 = _mm_add_epi8(_mm_add_epi8(b0, b0), b0), b2 = _mm_add_epi8(_mm_add_epi8(b1, b1), b1);
    const __m128i b3 = _mm_add_epi8(_mm_add_epi8(b2, b2), b2), b4 = _mm_add_epi8(_mm_add_epi8(b3, b3), b3);
    const __m128i h0 = _mm_cvtsi32_si128((int)qk_load_u32(x->qh)), h1 = _mm_add_epi8(_mm_add_epi8(h0, h0), h0);
    const __m128i h2 = _mm_add_epi8(_mm_add_epi8(h1, h1), h1), h3 = _mm_add_epi8(_mm_add_epi8(h2, h2), h2);
    const __m128i h = _mm_unpacklo_epi64(_mm_unpacklo_epi32(h0, h1), _mm_unpacklo_epi32(h2, h3));
    p[5] = qk_maddubs_at(qk_trit_of(_mm256_set_m128i(b1, b0)), a->qs + 160);
    p[6] = qk_maddubs_at(qk_trit_of(_mm256_set_m128i(b3, b2)), a->qs + 192);
    p[7] = qk_maddubs_at(qk_trit_of(_mm256_set_m128i(h, b4)), a->qs + 224);
    *tot = qk_tq_sum16(p);
    *mins = qk_bsums_total(a);
    return qk_fp16_to_fp32(qk_load_u16(x->d));
}

static inline float qk_fused_tq2_0(const uint8_t *blk, const qk_act_q8_256 *a, int32_t *tot, int32_t *mins) {
    const qk_block_tq2_0 *x = (const qk_block_tq2_0 *)blk;
    const __m256i m3 = _mm256_set1_epi8(3);
    __m256i p[8];
    for (int j = 0; j < 2; j++) {
        const __m256i v = _mm256_loadu_si256((const __m256i *)(x->qs + 32 * j));
        for (int l = 0; l < 4; l++)
            p[4 * j + l] = qk_maddubs_at(_mm256_and_si256(_mm256_srli_epi16(v, 2 * l), m3), a->qs + 128 * j + 32 * l);
    }
    *tot = qk_tq_sum16(p);
    *mins = qk_bsums_total(a);
    return qk_fp16_to_fp32(qk_load_u16(x->d));
}

QK_DECODE256(tq1_0, qk_fused_tq1_0, 54)
QK_DECODE256(tq2_0, qk_fused_tq2_0, 66)
#define QK_HAS_DECODE_tq1_0 1
#define QK_HAS_DECODE_tq2_0 1
#elif QK_TILES_NEON
/* The NEON forms of the x86 code above: the same byte-wise work on transposed groups, the low
 * half of each panel quad (rows 0-3) in one register, the high half (rows 4-7) in another. */
static inline uint8x16_t qk_trit_of_neon(uint8x16_t t) {
    return vsubq_u8(vsubq_u8(vdupq_n_u8(0), vcgeq_u8(t, vdupq_n_u8(86))), vcgeq_u8(t, vdupq_n_u8(171)));
}

static inline uint8x16_t qk_times3_u8(uint8x16_t t) { return vaddq_u8(vaddq_u8(t, t), t); }

static inline void qk_tq_panel_scales_rows(const uint8_t *const rp[8], size_t d_off, qk_panel256 *p) {
    for (int s = 0; s < 8; s++) {
        vst1q_s32(p->sc[s], vdupq_n_s32(1));
        vst1q_s32(p->sc[s] + 4, vdupq_n_s32(1));
        vst1q_s32(p->mn[s], vdupq_n_s32(qk_pair16(1, 1)));
        vst1q_s32(p->mn[s] + 4, vdupq_n_s32(qk_pair16(1, 1)));
    }
    for (int i = 0; i < 8; i++) {
        p->d[i] = qk_fp16_to_fp32(qk_load_u16(rp[i] + d_off));
        p->nd[i] = -p->d[i];
    }
}

static inline void qk_pack_tq1_0(const uint8_t *const rp[8], size_t o, qk_panel256 *p) {
    uint8x16_t x[8], y[8];
    qk_groups8_neon(rp, o, x, y); /* bytes 4k..4k+3: elements 32 n + 4k.. for trit n */
    for (int n = 0; n < 5; n++)
        for (int k = 0; k < 8; k++) {
            qk_store_q_neon(p->q[8 * n + k], qk_trit_of_neon(x[k]), qk_trit_of_neon(y[k]));
            x[k] = qk_times3_u8(x[k]);
            y[k] = qk_times3_u8(y[k]);
        }
    qk_groups4_neon(rp, o + 32, x, y); /* bytes 32 + 4k..: elements 160 + 16 n + 4k.. */
    for (int n = 0; n < 5; n++)
        for (int k = 0; k < 4; k++) {
            qk_store_q_neon(p->q[40 + 4 * n + k], qk_trit_of_neon(x[k]), qk_trit_of_neon(y[k]));
            x[k] = qk_times3_u8(x[k]);
            y[k] = qk_times3_u8(y[k]);
        }
    uint32_t qh[8]; /* qh: elements 240 + 4 n + m */
    for (int i = 0; i < 8; i++) qh[i] = qk_load_u32(rp[i] + o + 48);
    uint8x16_t lo = vreinterpretq_u8_u32(vld1q_u32(qh)), hi = vreinterpretq_u8_u32(vld1q_u32(qh + 4));
    for (int n = 0; n < 4; n++) {
        qk_store_q_neon(p->q[60 + n], qk_trit_of_neon(lo), qk_trit_of_neon(hi));
        lo = qk_times3_u8(lo);
        hi = qk_times3_u8(hi);
    }
    qk_tq_panel_scales_rows(rp, o + 52, p);
}

static inline void qk_pack_tq2_0(const uint8_t *const rp[8], size_t o, qk_panel256 *p) {
    const uint8x16_t m3 = vdupq_n_u8(3);
    for (int half = 0; half < 2; half++) {
        uint8x16_t x[8], y[8];
        qk_groups8_neon(rp, o + 32 * half, x, y);
        for (int l = 0; l < 4; l++)
            for (int k = 0; k < 8; k++)
                qk_store_q_neon(p->q[32 * half + 8 * l + k], vandq_u8(qk_shr_u8(x[k], 2 * l), m3),
                                vandq_u8(qk_shr_u8(y[k], 2 * l), m3));
    }
    qk_tq_panel_scales_rows(rp, o + 64, p);
}
#endif

#if QK_TILES_X86 || QK_TILES_NEON
QK_UNPACKED_DOT256(tq1_0, qk_unpack_tq1_0, 54, 32)
QK_UNPACKED_DOT256(tq2_0, qk_unpack_tq2_0, 66, 32)
#else
QK_UNPACKED_TYPE256(tq1_0, qk_unpack_tq1_0, 54, 32)
QK_UNPACKED_TYPE256(tq2_0, qk_unpack_tq2_0, 66, 32)
#endif

#endif
