/* IQ2_XXS, IQ2_XS, IQ2_S: 2-bit-ish "importance" quants. Each group of 8 elements is one row
 * of a grid of magnitudes {8, 25, 43} (iq_tables.h) with 8 signs; a scale per 32 (XXS) or 16
 * (XS, S) elements: x = d * (0.5 + ls) / 4 * grid * sign (gguf-py's IQ2_* classes, ggml's
 * dequantize_row_iq2_*).
 *
 * Panel form (panel_unpack.h): u = 43 + sign * grid in 0..86, x = d/8 * (2 ls + 1) * (u - 43),
 * so sc = 2 ls + 1 and the bsums coefficient is 43 sc. max(u) = 86: AVX2 group 1.
 */
#ifndef QPACK_TYPES_IQ2_H
#define QPACK_TYPES_IQ2_H

#include "panel_unpack.h"
#include "iq_tables.h"

typedef struct {
    uint8_t d[2];   /* f16 */
    uint8_t qs[64]; /* per 32 elements: 4 grid indices (bytes), then a u32 of 4 x 7 sign bits
                       (ksigns index) and the 4-bit scale in bits 28..31 */
} qk_block_iq2_xxs;
QK_BLOCK_SIZE_IS(qk_block_iq2_xxs, 66);

typedef struct {
    uint8_t d[2];
    uint8_t qs[64];    /* 32 u16: grid index in bits 0..8, ksigns index in 9..15 */
    uint8_t scales[8]; /* 4 bits per 16 elements, low nibble first */
} qk_block_iq2_xs;
QK_BLOCK_SIZE_IS(qk_block_iq2_xs, 74);

typedef struct {
    uint8_t d[2];
    uint8_t qs[32];    /* low 8 bits of the grid index of each group of 8 */
    uint8_t signs[32]; /* one byte per group: bit k = element k negative */
    uint8_t qh[8];     /* 2 high index bits per group, four groups a byte */
    uint8_t scales[8];
} qk_block_iq2_s;
QK_BLOCK_SIZE_IS(qk_block_iq2_s, 82);

#define QK_IQ2_OFF8 0x2b2b2b2b2b2b2b2bull /* 43 in every byte */

/* ---------------------------------------------------------------- dequantization (gguf-py order) */

QK_NO_CONTRACT static void qk_dequant_iq2_xxs(const void *restrict src, float *restrict y, int64_t n) {
    QK_NO_CONTRACT_BODY
    const qk_block_iq2_xxs *x = (const qk_block_iq2_xxs *)src;
    for (int64_t b = 0; b < n / 256; b++, x++) {
        const float d = qk_fp16_to_fp32(qk_load_u16(x->d));
        for (int ib = 0; ib < 8; ib++) {
            const uint8_t *q = x->qs + 8 * ib;
            const uint32_t aux = qk_load_u32(q + 4);
            const float db = d * (0.5f + (float)(aux >> 28)) * 0.25f;
            for (int l = 0; l < 4; l++, y += 8)
                qk_iq_grid8_to_f32(db, qk_iq2xxs_grid[q[l]], qk_ksigns[(aux >> (7 * l)) & 127], y);
        }
    }
}

QK_NO_CONTRACT static void qk_dequant_iq2_xs(const void *restrict src, float *restrict y, int64_t n) {
    QK_NO_CONTRACT_BODY
    const qk_block_iq2_xs *x = (const qk_block_iq2_xs *)src;
    for (int64_t b = 0; b < n / 256; b++, x++) {
        const float d = qk_fp16_to_fp32(qk_load_u16(x->d));
        for (int s = 0; s < 16; s++) {
            const float db = d * (0.5f + (float)((x->scales[s / 2] >> (4 * (s % 2))) & 0xf)) * 0.25f;
            for (int l = 0; l < 2; l++, y += 8) {
                const uint16_t q = qk_load_u16(x->qs + 2 * (2 * s + l));
                qk_iq_grid8_to_f32(db, qk_iq2xs_grid[q & 511], qk_ksigns[q >> 9], y);
            }
        }
    }
}

static inline int qk_iq2_s_index(const qk_block_iq2_s *x, int j) {
    return x->qs[j] | (((x->qh[j / 4] >> (2 * (j % 4))) & 3) << 8);
}

QK_NO_CONTRACT static void qk_dequant_iq2_s(const void *restrict src, float *restrict y, int64_t n) {
    QK_NO_CONTRACT_BODY
    const qk_block_iq2_s *x = (const qk_block_iq2_s *)src;
    for (int64_t b = 0; b < n / 256; b++, x++) {
        const float d = qk_fp16_to_fp32(qk_load_u16(x->d));
        for (int s = 0; s < 16; s++) {
            const float db = d * (0.5f + (float)((x->scales[s / 2] >> (4 * (s % 2))) & 0xf)) * 0.25f;
            for (int l = 0; l < 2; l++, y += 8) {
                const int j = 2 * s + l;
                qk_iq_grid8_to_f32(db, qk_iq2s_grid[qk_iq2_s_index(x, j)], x->signs[j], y);
            }
        }
    }
}

/* ---------------------------------------------------------------- unpack to the panel */

static inline void qk_iq2_scales16(const uint8_t *scales, qk_panel256 *p, int i) {
    for (int s = 0; s < 16; s++) p->sc[s][i] = 2 * ((scales[s / 2] >> (4 * (s % 2))) & 0xf) + 1;
    for (int q = 0; q < 8; q++) p->mn[q][i] = qk_pair16(43 * p->sc[2 * q][i], 43 * p->sc[2 * q + 1][i]);
}

static inline void qk_iq2_d(const uint8_t *d16, qk_panel256 *p, int i) {
    const float d = qk_fp16_to_fp32(qk_load_u16(d16)) * 0.125f;
    p->d[i] = d;
    p->nd[i] = -d;
}

#if QK_TILES_X86
/* The panel bytes u of 32 elements: chunk ib of IQ2_XXS (its 4 grid indices q, its aux word),
 * chunk c (elements 32 c..) of IQ2_XS and IQ2_S. */
static inline __m256i qk_iq2_xxs_u32(const uint8_t *q, uint32_t aux) {
    return qk_signed32_mask(
        qk_grid4x8(qk_iq2xxs_grid[q[0]], qk_iq2xxs_grid[q[1]], qk_iq2xxs_grid[q[2]], qk_iq2xxs_grid[q[3]]),
        qk_ksigns_mask4(aux), 43);
}

static inline __m256i qk_iq2_xs_u32(const qk_block_iq2_xs *x, int c) {
    uint64_t q; /* the four u16 at once: 16-bit pieces make gcc spill them and stall on reloads */
    memcpy(&q, x->qs + 8 * c, 8);
    const __m256i m = qk_grid4x8(qk_ksigns_mask[(q >> 9) & 127], qk_ksigns_mask[(q >> 25) & 127],
                                 qk_ksigns_mask[(q >> 41) & 127], qk_ksigns_mask[q >> 57]);
    return qk_signed32_mask(qk_grid4x8(qk_iq2xs_grid[q & 511], qk_iq2xs_grid[(q >> 16) & 511],
                                       qk_iq2xs_grid[(q >> 32) & 511], qk_iq2xs_grid[(q >> 48) & 511]),
                            m, 43);
}

static inline __m256i qk_iq2_s_u32(const qk_block_iq2_s *x, int c) {
    const uint8_t *qs = x->qs + 4 * c;
    const uint32_t qh = x->qh[c]; /* the 2 high bits of groups 4c..4c+3 */
    return qk_signed32(qk_grid4x8(qk_iq2s_grid[qs[0] | (qh & 3) << 8], qk_iq2s_grid[qs[1] | (qh & 12) << 6],
                                  qk_iq2s_grid[qs[2] | (qh & 48) << 4], qk_iq2s_grid[qs[3] | (qh & 192) << 2]),
                       qk_load_u32(x->signs + 4 * c), 43);
}

/* Decode (panel_unpack.h): per 32 elements the u of the panel times the token. */
static inline float qk_fused_iq2_xxs(const uint8_t *blk, const qk_act_q8_256 *a, int32_t *tot, int32_t *mins) {
    const qk_block_iq2_xxs *x = (const qk_block_iq2_xxs *)blk;
    qk_fused_sums s = {_mm256_setzero_si256(), {0}};
    for (int ib = 0; ib < 8; ib++) {
        const uint32_t aux = qk_load_u32(x->qs + 8 * ib + 4);
        qk_fused_add32(&s, ib, qk_iq2_xxs_u32(x->qs + 8 * ib, aux), a, 2 * (int)(aux >> 28) + 1);
    }
    qk_fused_end(&s, a, 43, tot, mins);
    return qk_fp16_to_fp32(qk_load_u16(x->d)) * 0.125f;
}

/* IQ2_XS and IQ2_S: the grid indices (and IQ2_XS's sign bytes) of all 32 groups first, in
 * vectors, then chunk by chunk; the 4-bit scales of the 16-element sub-blocks at the same place. */
static inline void qk_iq2_fused_chunks(const uint64_t *grid, const uint16_t gi[32], const uint32_t signs[8],
                                       const uint8_t *scales, const qk_act_q8_256 *a, qk_fused_sums *s) {
    for (int c = 0; c < 8; c++) {
        const uint16_t *i = gi + 4 * c;
        const __m256i g = qk_grid4x8(grid[i[0]], grid[i[1]], grid[i[2]], grid[i[3]]);
        qk_fused_add16(s, c, qk_signed32(g, signs[c], 43), a, 2 * (scales[c] & 0xf) + 1, 2 * (scales[c] >> 4) + 1);
    }
}

static inline float qk_fused_iq2_xs(const uint8_t *blk, const qk_act_q8_256 *a, int32_t *tot, int32_t *mins) {
    const qk_block_iq2_xs *x = (const qk_block_iq2_xs *)blk;
    const __m256i q0 = _mm256_loadu_si256((const __m256i *)x->qs), q1 = _mm256_loadu_si256((const __m256i *)(x->qs + 32));
    uint16_t gi[32];
    uint32_t signs[8];
    _mm256_storeu_si256((__m256i *)gi, _mm256_and_si256(q0, _mm256_set1_epi16(511)));
    _mm256_storeu_si256((__m256i *)(gi + 16), _mm256_and_si256(q1, _mm256_set1_epi16(511)));
    /* the 7-bit ksigns indices as bytes in group order (packus works per 128-bit lane) */
    const __m256i s7 = _mm256_permute4x64_epi64(_mm256_packus_epi16(_mm256_srli_epi16(q0, 9), _mm256_srli_epi16(q1, 9)),
                                                _MM_SHUFFLE(3, 1, 2, 0));
    _mm256_storeu_si256((__m256i *)signs, _mm256_or_si256(s7, qk_parity7_bytes(s7)));
    qk_fused_sums s = {_mm256_setzero_si256(), {0}};
    qk_iq2_fused_chunks(qk_iq2xs_grid, gi, signs, x->scales, a, &s);
    qk_fused_end(&s, a, 43, tot, mins);
    return qk_fp16_to_fp32(qk_load_u16(x->d)) * 0.125f;
}

static inline float qk_fused_iq2_s(const uint8_t *blk, const qk_act_q8_256 *a, int32_t *tot, int32_t *mins) {
    const qk_block_iq2_s *x = (const qk_block_iq2_s *)blk;
    /* index of group j = qs[j] | bits 2 (j % 4).. of qh[j / 4] << 8: the qh byte spread to its
     * groups, shifted by a multiply, masked */
    const __m128i qh = _mm_loadl_epi64((const __m128i *)x->qh);
    const __m256i shift = _mm256_setr_epi16(256, 64, 16, 4, 256, 64, 16, 4, 256, 64, 16, 4, 256, 64, 16, 4);
    uint16_t gi[32];
    for (int h = 0; h < 2; h++) {
        const __m128i spread = _mm_setr_epi8(0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3);
        const __m256i hi = _mm256_cvtepu8_epi16(_mm_shuffle_epi8(qh, _mm_add_epi8(spread, _mm_set1_epi8((char)(4 * h)))));
        const __m256i lo = _mm256_cvtepu8_epi16(_mm_loadu_si128((const __m128i *)(x->qs + 16 * h)));
        const __m256i idx = _mm256_or_si256(lo, _mm256_and_si256(_mm256_mullo_epi16(hi, shift), _mm256_set1_epi16(0x300)));
        _mm256_storeu_si256((__m256i *)(gi + 16 * h), idx);
    }
    uint32_t signs[8];
    memcpy(signs, x->signs, 32);
    qk_fused_sums s = {_mm256_setzero_si256(), {0}};
    qk_iq2_fused_chunks(qk_iq2s_grid, gi, signs, x->scales, a, &s);
    qk_fused_end(&s, a, 43, tot, mins);
    return qk_fp16_to_fp32(qk_load_u16(x->d)) * 0.125f;
}

QK_DECODE256(iq2_xxs, qk_fused_iq2_xxs, 66)
QK_DECODE256(iq2_xs, qk_fused_iq2_xs, 74)
QK_DECODE256(iq2_s, qk_fused_iq2_s, 82)
#define QK_HAS_DECODE_iq2_xxs 1
#define QK_HAS_DECODE_iq2_xs 1
#define QK_HAS_DECODE_iq2_s 1
#endif

static inline void qk_unpack_iq2_xxs(const uint8_t *blk, uint8_t *u, qk_panel256 *p, int i) {
    const qk_block_iq2_xxs *x = (const qk_block_iq2_xxs *)blk;
    for (int ib = 0; ib < 8; ib++) {
        const uint8_t *q = x->qs + 8 * ib;
        const uint32_t aux = qk_load_u32(q + 4);
#if QK_TILES_X86
        _mm256_storeu_si256((__m256i *)(u + 32 * ib), qk_iq2_xxs_u32(q, aux));
#elif QK_TILES_NEON
        const uint32_t signs = qk_ksigns4(aux);
        qk_store_signed16_neon(u + 32 * ib, qk_grid2x8_neon(qk_iq2xxs_grid[q[0]], qk_iq2xxs_grid[q[1]]), signs, 43);
        qk_store_signed16_neon(u + 32 * ib + 16, qk_grid2x8_neon(qk_iq2xxs_grid[q[2]], qk_iq2xxs_grid[q[3]]),
                               signs >> 16, 43);
#else
        for (int l = 0; l < 4; l++)
            qk_store_u64(u + 32 * ib + 8 * l,
                         qk_signed_offset8(qk_iq2xxs_grid[q[l]], qk_ksigns[(aux >> (7 * l)) & 127], QK_IQ2_OFF8));
#endif
        const int sc = 2 * (int)(aux >> 28) + 1;
        p->sc[ib][i] = sc;
        p->mn[ib][i] = qk_pair16(43 * sc, 43 * sc);
    }
    qk_iq2_d(x->d, p, i);
}

static inline void qk_unpack_iq2_xs(const uint8_t *blk, uint8_t *u, qk_panel256 *p, int i) {
    const qk_block_iq2_xs *x = (const qk_block_iq2_xs *)blk;
#if QK_TILES_X86
    for (int c = 0; c < 8; c++) _mm256_storeu_si256((__m256i *)(u + 32 * c), qk_iq2_xs_u32(x, c));
#elif QK_TILES_NEON
    for (int j = 0; j < 32; j += 2) {
        const uint16_t q0 = qk_load_u16(x->qs + 2 * j), q1 = qk_load_u16(x->qs + 2 * j + 2);
        qk_store_signed16_neon(u + 8 * j, qk_grid2x8_neon(qk_iq2xs_grid[q0 & 511], qk_iq2xs_grid[q1 & 511]),
                               (uint32_t)qk_ksigns[q0 >> 9] | (uint32_t)qk_ksigns[q1 >> 9] << 8, 43);
    }
#else
    for (int j = 0; j < 32; j++) {
        const uint16_t q = qk_load_u16(x->qs + 2 * j);
        qk_store_u64(u + 8 * j, qk_signed_offset8(qk_iq2xs_grid[q & 511], qk_ksigns[q >> 9], QK_IQ2_OFF8));
    }
#endif
    qk_iq2_scales16(x->scales, p, i);
    qk_iq2_d(x->d, p, i);
}

static inline void qk_unpack_iq2_s(const uint8_t *blk, uint8_t *u, qk_panel256 *p, int i) {
    const qk_block_iq2_s *x = (const qk_block_iq2_s *)blk;
#if QK_TILES_X86
    for (int c = 0; c < 8; c++) _mm256_storeu_si256((__m256i *)(u + 32 * c), qk_iq2_s_u32(x, c));
#elif QK_TILES_NEON
    for (int j = 0; j < 32; j += 4) {
        const uint32_t qh = x->qh[j / 4];
        qk_store_signed16_neon(u + 8 * j,
                               qk_grid2x8_neon(qk_iq2s_grid[x->qs[j] | (qh & 3) << 8], qk_iq2s_grid[x->qs[j + 1] | (qh & 12) << 6]),
                               qk_load_u16(x->signs + j), 43);
        qk_store_signed16_neon(u + 8 * j + 16,
                               qk_grid2x8_neon(qk_iq2s_grid[x->qs[j + 2] | (qh & 48) << 4],
                                               qk_iq2s_grid[x->qs[j + 3] | (qh & 192) << 2]),
                               qk_load_u16(x->signs + j + 2), 43);
    }
#else
    for (int j = 0; j < 32; j++)
        qk_store_u64(u + 8 * j, qk_signed_offset8(qk_iq2s_grid[qk_iq2_s_index(x, j)], x->signs[j], QK_IQ2_OFF8));
#endif
    qk_iq2_scales16(x->scales, p, i);
    qk_iq2_d(x->d, p, i);
}

QK_UNPACKED_TYPE256(iq2_xxs, qk_unpack_iq2_xxs, 66, 32)
QK_UNPACKED_TYPE256(iq2_xs, qk_unpack_iq2_xs, 74, 16)
QK_UNPACKED_TYPE256(iq2_s, qk_unpack_iq2_s, 82, 16)

#endif
