/* IQ3_XXS and IQ3_S: groups of 4 elements are one row of a grid of magnitudes (iq_tables.h:
 * 4..62 for XXS, odd 1..15 for S) with a sign each; one scale per 32 elements.
 *     IQ3_XXS: x = d * (0.5 + ls) / 2 * grid * sign   (signs by ksigns index, as IQ2_XXS)
 *     IQ3_S:   x = d * (1 + 2 ls) * grid * sign       (9-bit grid index, raw sign bytes)
 * (gguf-py's IQ3_* classes, ggml's dequantize_row_iq3_*).
 *
 * Panel form (panel_unpack.h), sc = 2 ls + 1 for both:
 *     IQ3_XXS: u = 62 + sign * grid in 0..124, x = d/4 * sc * (u - 62): AVX2 group 1
 *     IQ3_S:   u = 15 + sign * grid in 0..30,  x = d * sc * (u - 15):   AVX2 group 4
 */
#ifndef QPACK_TYPES_IQ3_H
#define QPACK_TYPES_IQ3_H

#include "panel_unpack.h"
#include "iq_tables.h"

typedef struct {
    uint8_t d[2];
    uint8_t qs[64]; /* grid index of each group of 4 */
    uint8_t sas[32]; /* per 32 elements a u32: 4 x 7 sign bits (ksigns index), scale in 28..31 */
} qk_block_iq3_xxs;
QK_BLOCK_SIZE_IS(qk_block_iq3_xxs, 98);

typedef struct {
    uint8_t d[2];
    uint8_t qs[64];    /* low 8 bits of the grid index of each group of 4 */
    uint8_t qh[8];     /* bit 8 of the index: bit k of qh[j] for group 8j + k */
    uint8_t signs[32]; /* bit k of byte j: element 8j + k negative */
    uint8_t scales[4]; /* 4 bits per 32 elements, low nibble first */
} qk_block_iq3_s;
QK_BLOCK_SIZE_IS(qk_block_iq3_s, 110);

/* Grid rows of groups j and j + 1 as eight bytes. */
static inline uint64_t qk_iq3_pair(const uint32_t *grid, int i0, int i1) {
    return (uint64_t)grid[i0] | (uint64_t)grid[i1] << 32;
}

static inline int qk_iq3_s_index(const qk_block_iq3_s *x, int j) {
    return x->qs[j] | (((x->qh[j / 8] >> (j % 8)) & 1) << 8);
}

QK_NO_CONTRACT static void qk_dequant_iq3_xxs(const void *restrict src, float *restrict y, int64_t n) {
    QK_NO_CONTRACT_BODY
    const qk_block_iq3_xxs *x = (const qk_block_iq3_xxs *)src;
    for (int64_t b = 0; b < n / 256; b++, x++) {
        const float d = qk_fp16_to_fp32(qk_load_u16(x->d));
        for (int ib = 0; ib < 8; ib++) {
            const uint32_t aux = qk_load_u32(x->sas + 4 * ib);
            const float db = d * (0.5f + (float)(aux >> 28)) * 0.5f;
            const uint8_t *q = x->qs + 8 * ib;
            for (int l = 0; l < 4; l++, y += 8)
                qk_iq_grid8_to_f32(db, qk_iq3_pair(qk_iq3xxs_grid, q[2 * l], q[2 * l + 1]),
                                   qk_ksigns[(aux >> (7 * l)) & 127], y);
        }
    }
}

QK_NO_CONTRACT static void qk_dequant_iq3_s(const void *restrict src, float *restrict y, int64_t n) {
    QK_NO_CONTRACT_BODY
    const qk_block_iq3_s *x = (const qk_block_iq3_s *)src;
    for (int64_t b = 0; b < n / 256; b++, x++) {
        const float d = qk_fp16_to_fp32(qk_load_u16(x->d));
        for (int ib = 0; ib < 8; ib++) {
            const float db = d * (float)(1 + 2 * ((x->scales[ib / 2] >> (4 * (ib % 2))) & 0xf));
            for (int l = 0; l < 4; l++, y += 8) {
                const int j = 8 * ib + 2 * l;
                qk_iq_grid8_to_f32(db, qk_iq3_pair(qk_iq3s_grid, qk_iq3_s_index(x, j), qk_iq3_s_index(x, j + 1)),
                                   x->signs[4 * ib + l], y);
            }
        }
    }
}

#if QK_TILES_X86
/* The panel bytes u of chunk ib (32 elements): IQ3_XXS from its 8 grid indices q and aux word. */
static inline __m256i qk_iq3_xxs_u32(const uint8_t *q, uint32_t aux) {
    const uint32_t *g = qk_iq3xxs_grid;
    return qk_signed32_mask(_mm256_set_epi32((int)g[q[7]], (int)g[q[6]], (int)g[q[5]], (int)g[q[4]], (int)g[q[3]],
                                        (int)g[q[2]], (int)g[q[1]], (int)g[q[0]]),
                            qk_ksigns_mask4(aux), 62);
}

static inline __m256i qk_iq3_s_u32(const qk_block_iq3_s *x, int ib) {
    const uint32_t *g = qk_iq3s_grid;
    const uint8_t *q = x->qs + 8 * ib;
    const uint32_t h = x->qh[ib]; /* bit k: bit 8 of group 8 ib + k's index */
    return qk_signed32(_mm256_set_epi32((int)g[q[7] | (h & 128) << 1], (int)g[q[6] | (h & 64) << 2],
                                        (int)g[q[5] | (h & 32) << 3], (int)g[q[4] | (h & 16) << 4],
                                        (int)g[q[3] | (h & 8) << 5], (int)g[q[2] | (h & 4) << 6],
                                        (int)g[q[1] | (h & 2) << 7], (int)g[q[0] | (h & 1) << 8]),
                       qk_load_u32(x->signs + 4 * ib), 15);
}

/* Decode (panel_unpack.h). */
static inline float qk_fused_iq3_xxs(const uint8_t *blk, const qk_act_q8_256 *a, int32_t *tot, int32_t *mins) {
    const qk_block_iq3_xxs *x = (const qk_block_iq3_xxs *)blk;
    qk_fused_sums s = {_mm256_setzero_si256(), {0}};
    for (int ib = 0; ib < 8; ib++) {
        const uint32_t aux = qk_load_u32(x->sas + 4 * ib);
        qk_fused_add32(&s, ib, qk_iq3_xxs_u32(x->qs + 8 * ib, aux), a, 2 * (int)(aux >> 28) + 1);
    }
    qk_fused_end(&s, a, 62, tot, mins);
    return qk_fp16_to_fp32(qk_load_u16(x->d)) * 0.25f;
}

static inline float qk_fused_iq3_s(const uint8_t *blk, const qk_act_q8_256 *a, int32_t *tot, int32_t *mins) {
    const qk_block_iq3_s *x = (const qk_block_iq3_s *)blk;
    /* the 64 grid indices first, 16 at a time: qs[j] | bit j % 8 of qh[j / 8] << 8 (the qh byte
     * spread to its groups, shifted by a multiply, masked) */
    const __m128i qh = _mm_loadl_epi64((const __m128i *)x->qh);
    const __m256i mul = _mm256_setr_epi16(256, 128, 64, 32, 16, 8, 4, 2, 256, 128, 64, 32, 16, 8, 4, 2);
    uint16_t gi[64];
    for (int h = 0; h < 4; h++) {
        const __m128i spread = _mm_setr_epi8(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1);
        const __m256i hi = _mm256_cvtepu8_epi16(_mm_shuffle_epi8(qh, _mm_add_epi8(spread, _mm_set1_epi8((char)(2 * h)))));
        const __m256i lo = _mm256_cvtepu8_epi16(_mm_loadu_si128((const __m128i *)(x->qs + 16 * h)));
        _mm256_storeu_si256((__m256i *)(gi + 16 * h),
                            _mm256_or_si256(lo, _mm256_and_si256(_mm256_mullo_epi16(hi, mul), _mm256_set1_epi16(0x100))));
    }
    const uint32_t *g = qk_iq3s_grid;
    qk_fused_sums s = {_mm256_setzero_si256(), {0}};
    for (int ib = 0; ib < 8; ib++) {
        const uint16_t *i = gi + 8 * ib;
        const __m256i v = _mm256_set_epi32((int)g[i[7]], (int)g[i[6]], (int)g[i[5]], (int)g[i[4]], (int)g[i[3]],
                                           (int)g[i[2]], (int)g[i[1]], (int)g[i[0]]);
        qk_fused_add32(&s, ib, qk_signed32(v, qk_load_u32(x->signs + 4 * ib), 15), a,
                       2 * ((x->scales[ib / 2] >> (4 * (ib % 2))) & 0xf) + 1);
    }
    qk_fused_end(&s, a, 15, tot, mins);
    return qk_fp16_to_fp32(qk_load_u16(x->d));
}

QK_DECODE256(iq3_xxs, qk_fused_iq3_xxs, 98)
QK_DECODE256(iq3_s, qk_fused_iq3_s, 110)
#define QK_HAS_DECODE_iq3_xxs 1
#define QK_HAS_DECODE_iq3_s 1
#endif

static inline void qk_unpack_iq3_xxs(const uint8_t *blk, uint8_t *u, qk_panel256 *p, int i) {
    const qk_block_iq3_xxs *x = (const qk_block_iq3_xxs *)blk;
    for (int ib = 0; ib < 8; ib++) {
        const uint32_t aux = qk_load_u32(x->sas + 4 * ib);
        const uint8_t *q = x->qs + 8 * ib;
#if QK_TILES_X86
        _mm256_storeu_si256((__m256i *)(u + 32 * ib), qk_iq3_xxs_u32(q, aux));
#elif QK_TILES_NEON
        const uint32_t *g = qk_iq3xxs_grid, signs = qk_ksigns4(aux);
        qk_store_signed16_neon(u + 32 * ib, qk_grid2x8_neon(qk_iq3_pair(g, q[0], q[1]), qk_iq3_pair(g, q[2], q[3])),
                               signs, 62);
        qk_store_signed16_neon(u + 32 * ib + 16, qk_grid2x8_neon(qk_iq3_pair(g, q[4], q[5]), qk_iq3_pair(g, q[6], q[7])),
                               signs >> 16, 62);
#else
        for (int l = 0; l < 4; l++)
            qk_store_u64(u + 32 * ib + 8 * l,
                         qk_signed_offset8(qk_iq3_pair(qk_iq3xxs_grid, q[2 * l], q[2 * l + 1]),
                                           qk_ksigns[(aux >> (7 * l)) & 127], 0x3e3e3e3e3e3e3e3eull));
#endif
        const int sc = 2 * (int)(aux >> 28) + 1;
        p->sc[ib][i] = sc;
        p->mn[ib][i] = qk_pair16(62 * sc, 62 * sc);
    }
    const float d = qk_fp16_to_fp32(qk_load_u16(x->d)) * 0.25f;
    p->d[i] = d;
    p->nd[i] = -d;
}

static inline void qk_unpack_iq3_s(const uint8_t *blk, uint8_t *u, qk_panel256 *p, int i) {
    const qk_block_iq3_s *x = (const qk_block_iq3_s *)blk;
#if QK_TILES_X86
    for (int ib = 0; ib < 8; ib++) _mm256_storeu_si256((__m256i *)(u + 32 * ib), qk_iq3_s_u32(x, ib));
#elif QK_TILES_NEON
    for (int j = 0; j < 64; j += 4)
        qk_store_signed16_neon(u + 4 * j,
                               qk_grid2x8_neon(qk_iq3_pair(qk_iq3s_grid, qk_iq3_s_index(x, j), qk_iq3_s_index(x, j + 1)),
                                               qk_iq3_pair(qk_iq3s_grid, qk_iq3_s_index(x, j + 2), qk_iq3_s_index(x, j + 3))),
                               qk_load_u16(x->signs + j / 2), 15);
#else
    for (int j = 0; j < 64; j += 2)
        qk_store_u64(u + 4 * j,
                     qk_signed_offset8(qk_iq3_pair(qk_iq3s_grid, qk_iq3_s_index(x, j), qk_iq3_s_index(x, j + 1)),
                                       x->signs[j / 2], 0x0f0f0f0f0f0f0f0full));
#endif
    for (int ib = 0; ib < 8; ib++) {
        const int sc = 2 * ((x->scales[ib / 2] >> (4 * (ib % 2))) & 0xf) + 1;
        p->sc[ib][i] = sc;
        p->mn[ib][i] = qk_pair16(15 * sc, 15 * sc);
    }
    const float d = qk_fp16_to_fp32(qk_load_u16(x->d));
    p->d[i] = d;
    p->nd[i] = -d;
}

QK_UNPACKED_TYPE256(iq3_xxs, qk_unpack_iq3_xxs, 98, 32)
QK_UNPACKED_TYPE256(iq3_s, qk_unpack_iq3_s, 110, 32)

#endif
