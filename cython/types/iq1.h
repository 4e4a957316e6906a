/* IQ1_S and IQ1_M: groups of 8 elements are one row of a grid of {-1, 0, 1} (iq_tables.h,
 * stored as g + 1) shifted by a delta of +-1/8; 3-bit scales.
 *     IQ1_S: per 32 elements a u16 qh: 3 high index bits per group, scale ls in bits 12..14,
 *            delta sign in bit 15;  x = d * (2 ls + 1) * (g + delta)
 *     IQ1_M: the f16 d is spread over the top nibbles of the four scale words; a 3-bit scale
 *            per 16 elements, a delta sign per group of 8 (bit 3 of the group's qh nibble)
 * (gguf-py's IQ1_S / IQ1_M, ggml's dequantize_row_iq1_*).
 *
 * Panel form (panel_unpack.h): 8 (g + delta) = 8 g +- 1 is an integer, so the delta goes into
 * u = 8 (g + 1) + (delta > 0 ? 2 : 0) in 0..18, x = d/8 * (2 ls + 1) * (u - 9): sc = 2 ls + 1,
 * the bsums coefficient 9 sc. max(u) = 18: AVX2 group 4.
 */
#ifndef QPACK_TYPES_IQ1_H
#define QPACK_TYPES_IQ1_H

#include "panel_unpack.h"
#include "iq_tables.h"

typedef struct {
    uint8_t d[2];
    uint8_t qs[32]; /* low 8 bits of the grid index of each group of 8 */
    uint8_t qh[16]; /* 8 u16, one per 32 elements (see above) */
} qk_block_iq1_s;
QK_BLOCK_SIZE_IS(qk_block_iq1_s, 50);

typedef struct {
    uint8_t qs[32];
    uint8_t qh[16];     /* a nibble per group: 3 high index bits, delta sign in bit 3 */
    uint8_t scales[8];  /* 4 u16: four 3-bit scales each (bits 0..11), d's nibbles in 12..15 */
} qk_block_iq1_m;
QK_BLOCK_SIZE_IS(qk_block_iq1_m, 56);

#define QK_IQ1_DELTA 0.125f

/* grid + delta for the 8 elements of grid row idx, then dl * that (gguf-py's two roundings). */
QK_NO_CONTRACT static inline void qk_iq1_group_to_f32(float dl, int idx, int neg_delta, float *y) {
    QK_NO_CONTRACT_BODY
    const uint64_t g = qk_iq1s_grid_p1[idx];
    const float delta = neg_delta ? -QK_IQ1_DELTA : QK_IQ1_DELTA;
    for (int k = 0; k < 8; k++) y[k] = dl * ((float)((int)((g >> (8 * k)) & 0xff) - 1) + delta);
}

/* u for one group: 8 (g + 1) per byte (g + 1 <= 2: the shift stays in the byte), + 2 unless
 * the delta is negative. */
static inline uint64_t qk_iq1_u8(int idx, int neg_delta) {
    return (qk_iq1s_grid_p1[idx] << 3) + (neg_delta ? 0 : 0x0202020202020202ull);
}

static inline float qk_iq1_m_d(const qk_block_iq1_m *x) {
    const uint16_t s0 = qk_load_u16(x->scales), s1 = qk_load_u16(x->scales + 2);
    const uint16_t s2 = qk_load_u16(x->scales + 4), s3 = qk_load_u16(x->scales + 6);
    return qk_fp16_to_fp32((uint16_t)((s0 >> 12) | ((s1 >> 8) & 0x00f0) | ((s2 >> 4) & 0x0f00) | (s3 & 0xf000)));
}

/* 3-bit scale of 16-element sub-block s. */
static inline int qk_iq1_m_scale(const qk_block_iq1_m *x, int s) {
    return (qk_load_u16(x->scales + 2 * (s / 4)) >> (3 * (s % 4))) & 7;
}

/* Grid index and delta sign of group j (0..31) of an IQ1_M block. */
static inline int qk_iq1_m_nibble(const qk_block_iq1_m *x, int j) { return (x->qh[j / 2] >> (4 * (j % 2))) & 0xf; }

QK_NO_CONTRACT static void qk_dequant_iq1_s(const void *restrict src, float *restrict y, int64_t n) {
    QK_NO_CONTRACT_BODY
    const qk_block_iq1_s *x = (const qk_block_iq1_s *)src;
    for (int64_t b = 0; b < n / 256; b++, x++) {
        const float d = qk_fp16_to_fp32(qk_load_u16(x->d));
        for (int ib = 0; ib < 8; ib++) {
            const uint16_t h = qk_load_u16(x->qh + 2 * ib);
            const float dl = d * (float)(2 * ((h >> 12) & 7) + 1);
            for (int l = 0; l < 4; l++, y += 8)
                qk_iq1_group_to_f32(dl, x->qs[4 * ib + l] | (((h >> (3 * l)) & 7) << 8), h >> 15, y);
        }
    }
}

QK_NO_CONTRACT static void qk_dequant_iq1_m(const void *restrict src, float *restrict y, int64_t n) {
    QK_NO_CONTRACT_BODY
    const qk_block_iq1_m *x = (const qk_block_iq1_m *)src;
    for (int64_t b = 0; b < n / 256; b++, x++) {
        const float d = qk_iq1_m_d(x);
        for (int j = 0; j < 32; j++, y += 8) {
            const float dl = d * (float)(2 * qk_iq1_m_scale(x, j / 2) + 1);
            const int nib = qk_iq1_m_nibble(x, j);
            qk_iq1_group_to_f32(dl, x->qs[j] | ((nib & 7) << 8), nib & 8, y);
        }
    }
}

/* 3-bit scales of the 16 sub-blocks of an IQ1_M block, as 2 ls + 1. */
static inline void qk_iq1_m_scales(const qk_block_iq1_m *x, int sc[16]) {
    const uint64_t sc4 = qk_load_u16(x->scales) | (uint64_t)qk_load_u16(x->scales + 2) << 16 |
                         (uint64_t)qk_load_u16(x->scales + 4) << 32 | (uint64_t)qk_load_u16(x->scales + 6) << 48;
    for (int s = 0; s < 16; s++) sc[s] = 2 * (int)((sc4 >> (16 * (s / 4) + 3 * (s % 4))) & 7) + 1;
}

#if QK_TILES_X86
/* The panel bytes u of chunk ib of IQ1_S (its 4 grid index bytes q and qh word h), of chunk c
 * (elements 32 c..) of IQ1_M. */
static inline __m256i qk_iq1_s_u32(const uint8_t *q, uint32_t h) {
    const uint64_t *g = qk_iq1s_grid_p1;
    const __m256i v = qk_grid4x8(g[q[0] | (h & 7) << 8], g[q[1] | (h & 0x38) << 5], g[q[2] | (h & 0x1c0) << 2],
                                 g[q[3] | (h & 0xe00) >> 1]);
    return _mm256_add_epi8(_mm256_slli_epi16(v, 3), _mm256_set1_epi8((char)((~h >> 14) & 2)));
}

/* Row i: 2 in the 8 bytes of group k where bit k of i is set (the positive deltas of 4 groups). */
#define QK_IQ1M_D(i, k) (((i) >> (k) & 1) ? 0x0202020202020202ull : 0ull)
#define QK_IQ1M_ROW(i) {QK_IQ1M_D(i, 0), QK_IQ1M_D(i, 1), QK_IQ1M_D(i, 2), QK_IQ1M_D(i, 3)}
static const uint64_t qk_iq1_m_delta[16][4] = {
    QK_IQ1M_ROW(0),  QK_IQ1M_ROW(1),  QK_IQ1M_ROW(2),  QK_IQ1M_ROW(3),  QK_IQ1M_ROW(4),  QK_IQ1M_ROW(5),
    QK_IQ1M_ROW(6),  QK_IQ1M_ROW(7),  QK_IQ1M_ROW(8),  QK_IQ1M_ROW(9),  QK_IQ1M_ROW(10), QK_IQ1M_ROW(11),
    QK_IQ1M_ROW(12), QK_IQ1M_ROW(13), QK_IQ1M_ROW(14), QK_IQ1M_ROW(15)};

/* Bits 3 and 7 of a qh byte (the delta signs of its two groups) as bits 0 and 1. */
#define QK_DS(b) (((b) >> 3 & 1) | ((b) >> 6 & 2))
#define QK_DS4(b) QK_DS(b), QK_DS((b) + 1), QK_DS((b) + 2), QK_DS((b) + 3)
#define QK_DS16(b) QK_DS4(b), QK_DS4((b) + 4), QK_DS4((b) + 8), QK_DS4((b) + 12)
#define QK_DS64(b) QK_DS16(b), QK_DS16((b) + 16), QK_DS16((b) + 32), QK_DS16((b) + 48)
static const uint8_t qk_iq1_m_dsign[256] = {QK_DS64(0), QK_DS64(64), QK_DS64(128), QK_DS64(192)};

static inline __m256i qk_iq1_m_u32(const qk_block_iq1_m *x, int c) {
    const uint64_t *g = qk_iq1s_grid_p1;
    const uint8_t *qs = x->qs + 4 * c;
    const uint32_t h0 = x->qh[2 * c], h1 = x->qh[2 * c + 1]; /* nibbles of groups 4c..4c+3 */
    const __m256i v = qk_grid4x8(g[qs[0] | (h0 & 7) << 8], g[qs[1] | (h0 & 0x70) << 4], g[qs[2] | (h1 & 7) << 8],
                                 g[qs[3] | (h1 & 0x70) << 4]);
    const uint32_t pos = ~((h0 >> 3 & 1) | (h0 >> 6 & 2) | (h1 >> 1 & 4) | (h1 >> 4 & 8)) & 15; /* delta sign bits 3, 7 */
    return _mm256_add_epi8(_mm256_slli_epi16(v, 3), _mm256_loadu_si256((const __m256i *)qk_iq1_m_delta[pos]));
}

/* Decode (panel_unpack.h). */
static inline float qk_fused_iq1_s(const uint8_t *blk, const qk_act_q8_256 *a, int32_t *tot, int32_t *mins) {
    const qk_block_iq1_s *x = (const qk_block_iq1_s *)blk;
    /* the 32 grid indices first, 16 at a time: qs[j] | bits 3 (j % 4).. of qh word j / 4 << 8
     * (the qh word spread to its four groups, shifted by a multiply or, for the fourth, right) */
    const __m256i qh = _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)x->qh));
    const __m256i mul = _mm256_setr_epi16(256, 32, 4, 0, 256, 32, 4, 0, 256, 32, 4, 0, 256, 32, 4, 0);
    const __m256i fourth = _mm256_setr_epi16(0, 0, 0, -1, 0, 0, 0, -1, 0, 0, 0, -1, 0, 0, 0, -1);
    uint16_t gi[32];
    for (int h = 0; h < 2; h++) {
        const __m256i spread = _mm256_add_epi8(_mm256_setr_epi8(0, 1, 0, 1, 0, 1, 0, 1, 2, 3, 2, 3, 2, 3, 2, 3,
                                                                4, 5, 4, 5, 4, 5, 4, 5, 6, 7, 6, 7, 6, 7, 6, 7),
                                               _mm256_set1_epi8((char)(8 * h)));
        const __m256i w = _mm256_shuffle_epi8(qh, spread);
        const __m256i hi = _mm256_or_si256(_mm256_mullo_epi16(w, mul), _mm256_and_si256(_mm256_srli_epi16(w, 1), fourth));
        const __m256i lo = _mm256_cvtepu8_epi16(_mm_loadu_si128((const __m128i *)(x->qs + 16 * h)));
        _mm256_storeu_si256((__m256i *)(gi + 16 * h), _mm256_or_si256(lo, _mm256_and_si256(hi, _mm256_set1_epi16(0x700))));
    }
    const uint64_t *g = qk_iq1s_grid_p1;
    qk_fused_sums s = {_mm256_setzero_si256(), {0}};
    for (int ib = 0; ib < 8; ib++) {
        const uint32_t h = qk_load_u16(x->qh + 2 * ib);
        const uint16_t *i = gi + 4 * ib;
        const __m256i u = _mm256_add_epi8(_mm256_slli_epi16(qk_grid4x8(g[i[0]], g[i[1]], g[i[2]], g[i[3]]), 3),
                                          _mm256_set1_epi8((char)((~h >> 14) & 2)));
        qk_fused_add32(&s, ib, u, a, 2 * (int)((h >> 12) & 7) + 1);
    }
    qk_fused_end(&s, a, 9, tot, mins);
    return qk_fp16_to_fp32(qk_load_u16(x->d)) * 0.125f;
}

static inline float qk_fused_iq1_m(const uint8_t *blk, const qk_act_q8_256 *a, int32_t *tot, int32_t *mins) {
    const qk_block_iq1_m *x = (const qk_block_iq1_m *)blk;
    /* the 16 scales 2 ls + 1: field k of scale word w moved to bits 9..11 by a multiply */
    int16_t sc[16];
    const __m256i w = _mm256_broadcastq_epi64(_mm_loadl_epi64((const __m128i *)x->scales));
    const __m256i w4 = _mm256_shuffle_epi8(w, _mm256_setr_epi8(0, 1, 0, 1, 0, 1, 0, 1, 2, 3, 2, 3, 2, 3, 2, 3, 4, 5, 4,
                                                                5, 4, 5, 4, 5, 6, 7, 6, 7, 6, 7, 6, 7)); /* word s / 4 */
    const __m256i ls = _mm256_and_si256(_mm256_srli_epi16(_mm256_mullo_epi16(w4, _mm256_setr_epi16(512, 64, 8, 1, 512, 64, 8, 1, 512, 64, 8, 1, 512, 64, 8, 1)), 9),
                                        _mm256_set1_epi16(7));
    _mm256_storeu_si256((__m256i *)sc, _mm256_add_epi16(_mm256_add_epi16(ls, ls), _mm256_set1_epi16(1)));
    /* the 32 grid indices first, 16 at a time: qs[j] | the low 3 bits of group j's qh nibble << 8
     * (the qh byte spread to its two groups, shifted by a multiply, masked) */
    const __m128i qh = _mm_loadu_si128((const __m128i *)x->qh);
    const __m256i mul = _mm256_setr_epi16(256, 16, 256, 16, 256, 16, 256, 16, 256, 16, 256, 16, 256, 16, 256, 16);
    uint16_t gi[32];
    for (int h = 0; h < 2; h++) {
        const __m128i spread = _mm_setr_epi8(0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5, 6, 6, 7, 7);
        const __m256i hi = _mm256_cvtepu8_epi16(_mm_shuffle_epi8(qh, _mm_add_epi8(spread, _mm_set1_epi8((char)(8 * h)))));
        const __m256i lo = _mm256_cvtepu8_epi16(_mm_loadu_si128((const __m128i *)(x->qs + 16 * h)));
        _mm256_storeu_si256((__m256i *)(gi + 16 * h),
                            _mm256_or_si256(lo, _mm256_and_si256(_mm256_mullo_epi16(hi, mul), _mm256_set1_epi16(0x700))));
    }
    const uint64_t *g = qk_iq1s_grid_p1;
    qk_fused_sums s = {_mm256_setzero_si256(), {0}};
    for (int c = 0; c < 8; c++) {
        const uint16_t *i = gi + 4 * c;
        const uint32_t pos = ~(qk_iq1_m_dsign[x->qh[2 * c]] | qk_iq1_m_dsign[x->qh[2 * c + 1]] << 2) & 15;
        const __m256i u = _mm256_add_epi8(_mm256_slli_epi16(qk_grid4x8(g[i[0]], g[i[1]], g[i[2]], g[i[3]]), 3),
                                          _mm256_loadu_si256((const __m256i *)qk_iq1_m_delta[pos]));
        qk_fused_add16(&s, c, u, a, sc[2 * c], sc[2 * c + 1]);
    }
    qk_fused_end(&s, a, 9, tot, mins);
    return qk_iq1_m_d(x) * 0.125f;
}

QK_DECODE256(iq1_s, qk_fused_iq1_s, 50)
QK_DECODE256(iq1_m, qk_fused_iq1_m, 56)
#define QK_HAS_DECODE_iq1_s 1
#define QK_HAS_DECODE_iq1_m 1
#endif

static inline void qk_unpack_iq1_s(const uint8_t *blk, uint8_t *u, qk_panel256 *p, int i) {
    const qk_block_iq1_s *x = (const qk_block_iq1_s *)blk;
    for (int ib = 0; ib < 8; ib++) {
        const uint16_t h = qk_load_u16(x->qh + 2 * ib);
        const uint8_t *q = x->qs + 4 * ib;
#if QK_TILES_X86
        _mm256_storeu_si256((__m256i *)(u + 32 * ib), qk_iq1_s_u32(q, h));
#elif QK_TILES_NEON
        const uint64_t *g = qk_iq1s_grid_p1;
        const uint8x16_t delta = vdupq_n_u8((uint8_t)((~h >> 14) & 2));
        const uint8x16_t v0 = qk_grid2x8_neon(g[q[0] | (h & 7) << 8], g[q[1] | (h & 0x38) << 5]);
        const uint8x16_t v1 = qk_grid2x8_neon(g[q[2] | (h & 0x1c0) << 2], g[q[3] | (h & 0xe00) >> 1]);
        vst1q_u8(u + 32 * ib, vaddq_u8(vshlq_n_u8(v0, 3), delta));
        vst1q_u8(u + 32 * ib + 16, vaddq_u8(vshlq_n_u8(v1, 3), delta));
#else
        for (int l = 0; l < 4; l++) qk_store_u64(u + 32 * ib + 8 * l, qk_iq1_u8(q[l] | (((h >> (3 * l)) & 7) << 8), h >> 15));
#endif
        const int sc = 2 * ((h >> 12) & 7) + 1;
        p->sc[ib][i] = sc;
        p->mn[ib][i] = qk_pair16(9 * sc, 9 * sc);
    }
    const float d = qk_fp16_to_fp32(qk_load_u16(x->d)) * 0.125f;
    p->d[i] = d;
    p->nd[i] = -d;
}

static inline void qk_unpack_iq1_m(const uint8_t *blk, uint8_t *u, qk_panel256 *p, int i) {
    const qk_block_iq1_m *x = (const qk_block_iq1_m *)blk;
#if QK_TILES_X86
    for (int c = 0; c < 8; c++) _mm256_storeu_si256((__m256i *)(u + 32 * c), qk_iq1_m_u32(x, c));
#elif QK_TILES_NEON
    const uint64_t *g = qk_iq1s_grid_p1;
    for (int j = 0; j < 32; j += 2) {
        const uint32_t h = x->qh[j / 2]; /* nibbles of groups j, j+1 */
        const uint8x16_t v = qk_grid2x8_neon(g[x->qs[j] | (h & 7) << 8], g[x->qs[j + 1] | (h & 0x70) << 4]);
        const uint8x16_t delta = vcombine_u8(vdup_n_u8((uint8_t)((~h >> 2) & 2)), vdup_n_u8((uint8_t)((~h >> 6) & 2)));
        vst1q_u8(u + 8 * j, vaddq_u8(vshlq_n_u8(v, 3), delta));
    }
#else
    for (int j = 0; j < 32; j++) {
        const int nib = qk_iq1_m_nibble(x, j);
        qk_store_u64(u + 8 * j, qk_iq1_u8(x->qs[j] | ((nib & 7) << 8), nib & 8));
    }
#endif
    int sc[16];
    qk_iq1_m_scales(x, sc);
    for (int s = 0; s < 16; s++) p->sc[s][i] = sc[s];
    for (int q = 0; q < 8; q++) p->mn[q][i] = qk_pair16(9 * p->sc[2 * q][i], 9 * p->sc[2 * q + 1][i]);
    const float d = qk_iq1_m_d(x) * 0.125f;
    p->d[i] = d;
    p->nd[i] = -d;
}

QK_UNPACKED_TYPE256(iq1_s, qk_unpack_iq1_s, 50, 32)
QK_UNPACKED_TYPE256(iq1_m, qk_unpack_iq1_m, 56, 16)

#endif
