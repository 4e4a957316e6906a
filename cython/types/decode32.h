/* One-token products (decode) of the 32-element types on x86, without panels: Q4_0, Q4_1,
 * Q5_0, Q5_1, Q8_0, IQ4_NL (each type's file defines its block product and its hook).
 *
 * Decode meets each weight panel once, so the tile path's 8-row transposition (tiles.h) is pure
 * cost there (Q8_0 ran at ~29 GB/s per core in cache through it, below what a core streams from
 * DRAM; here 47-52; MXFP4 stays on its panel: this was no faster for it). Here eight rows are
 * read side by side, block by block, straight from the GGUF: a type's block product gives, per
 * row, eight int32 lanes whose sum is the panel's exact integer
 *     isum = u . a      (u the panel bytes of that block, made the same way, in registers),
 * a lane-sum tree turns the eight rows' vectors into one vector with lanes = rows, and the
 * tile's two float steps follow per block, in block order, with the panel's d and m:
 *     acc = fma(d * d_a, (float)isum, acc);   acc = fma(m, s_a, acc).
 * So a token's result is the same bits alone as in any batch (tests/test_quants_tiles.py holds
 * one token to its row in a batch of five).
 *
 * Rows side by side (not one row after the other, as gemv.h does for 256-element blocks): a
 * 34-byte block has too little work to amortize a per-row pass and a transposition through
 * memory; eight streams that the hardware prefetchers do not follow get a software prefetch
 * one group of rows ahead, at the same offset (QK_D32_PF_GROUPS).
 */
#ifndef QPACK_TYPES_DECODE32_H
#define QPACK_TYPES_DECODE32_H

#include "../panel.h"

#if QK_TILES_X86
/* The f16 at offset off of the eight rows, as floats. Word by word into one register: fewer
 * instructions than dword loads and a transposition, and Zen 4's vpgatherdd is slower still
 * (measured: 52, 49 and 42 GB/s on Q8_0). */
static inline __m256 qk_rows_f16(const uint8_t *const rp[8], size_t off) {
    __m128i h = _mm_cvtsi32_si128(qk_load_u16(rp[0] + off));
    h = _mm_insert_epi16(h, qk_load_u16(rp[1] + off), 1);
    h = _mm_insert_epi16(h, qk_load_u16(rp[2] + off), 2);
    h = _mm_insert_epi16(h, qk_load_u16(rp[3] + off), 3);
    h = _mm_insert_epi16(h, qk_load_u16(rp[4] + off), 4);
    h = _mm_insert_epi16(h, qk_load_u16(rp[5] + off), 5);
    h = _mm_insert_epi16(h, qk_load_u16(rp[6] + off), 6);
    h = _mm_insert_epi16(h, qk_load_u16(rp[7] + off), 7);
    return _mm256_cvtph_ps(h);
}

/* u . a as eight int32 lanes (u unsigned; AVX2: u <= 128 or the int16 pair sums saturate). */
static inline __m256i qk_dot32_u8s8(__m256i u, __m256i a) {
#if QK_TILES_X86 == 2
    return _mm256_dpbusd_epi32(_mm256_setzero_si256(), u, a);
#else
    return _mm256_madd_epi16(_mm256_maddubs_epi16(u, a), _mm256_set1_epi16(1));
#endif
}

/* 16 bytes of nibbles -> the 32 values in element order: low nibbles, then high ones. */
static inline __m256i qk_nibbles32(const uint8_t *qs) {
    const __m256i v = _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)qs));
    return _mm256_and_si256(_mm256_srlv_epi32(v, _mm256_setr_epi32(0, 0, 0, 0, 4, 4, 4, 4)), _mm256_set1_epi8(0x0f));
}

/* u + 16 in byte j where bit j of bits is set (u <= 15: Q5's fifth bit). */
static inline __m256i qk_add16_where(__m256i u, uint32_t bits) {
#if QK_TILES_X86 == 2
    return _mm256_mask_add_epi8(u, (__mmask32)bits, u, _mm256_set1_epi8(16));
#else
    const __m256i spread = _mm256_setr_epi8(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1,
                                            2, 2, 2, 2, 2, 2, 2, 2, 3, 3, 3, 3, 3, 3, 3, 3);
    const __m256i bit = _mm256_set1_epi64x((long long)0x8040201008040201ull);
    const __m256i b = _mm256_and_si256(_mm256_shuffle_epi8(_mm256_set1_epi32((int)bits), spread), bit);
    return _mm256_or_si256(u, _mm256_and_si256(_mm256_cmpeq_epi8(b, bit), _mm256_set1_epi8(16)));
#endif
}

/* A type's block product: eight int32 lanes summing to the block's u . a (a: the token's 32
 * quants of the block). */
typedef __m256i (*qk_isum32_fn)(const uint8_t *blk, __m256i a);

/* Prefetch into L2 the next group of eight rows at the offset being read (one group ahead:
 * 2 did no better, into L1 or along the row far worse: 15-17 GB/s from DRAM instead of 32). */
#ifndef QK_D32_PF_GROUPS
#define QK_D32_PF_GROUPS 1
#endif

/* A type's scales: the panel's d and m of eight rows' blocks at offset o. */
typedef void (*qk_scales32_fn)(const uint8_t *const rp[8], size_t o, __m256 *d, __m256 *m);

/* The f16 d at byte 0 and m = k * d (Q4_0, Q5_0, Q8_0, IQ4_NL; k = 0: m = 0, as their panels). */
#define QK_SCALES_D(name, k)                                                                          \
    static inline void qk_scales_##name(const uint8_t *const rp[8], size_t o, __m256 *d, __m256 *m) { \
        *d = qk_rows_f16(rp, o);                                                                      \
        *m = (k) != 0.0f ? _mm256_mul_ps(*d, _mm256_set1_ps(k)) : _mm256_setzero_ps();                \
    }

/* The f16 d at byte 0 and m at byte 2 (Q4_1, Q5_1): dword loads beat two word chains here. */
static inline void qk_scales_dm(const uint8_t *const rp[8], size_t o, __m256 *d, __m256 *m) {
    qk_split_f16x2(qk_gather_u32(rp, o), d, m);
}

/* out[r] = W[r] . act for r < nr. */
QK_TILE_INLINE void qk_decode32(int64_t n, const uint8_t *w, size_t row_bytes, int64_t nr, const qk_act_q8_32 *a,
                                float *out, int bytes, qk_isum32_fn isum, qk_scales32_fn scales) {
    const int64_t nb = n / 32;
    const size_t pf = (size_t)QK_D32_PF_GROUPS * 8 * row_bytes;
    for (int64_t r = 0; r < nr; r += 8) {
        const int rows = nr - r < 8 ? (int)(nr - r) : 8;
        const uint8_t *rp[8];
        for (int i = 0; i < 8; i++) rp[i] = w + (size_t)(r + (i < rows ? i : rows - 1)) * row_bytes;
        __m256 acc = _mm256_setzero_ps();
        for (int64_t b = 0; b < nb; b++) {
            const size_t o = (size_t)b * (size_t)bytes;
            const __m256i av = _mm256_loadu_si256((const __m256i *)a[b].qs);
            __m256i v[8];
            for (int i = 0; i < 8; i++) {
                _mm_prefetch((const char *)(rp[i] + pf + o), _MM_HINT_T1);
                v[i] = isum(rp[i] + o, av);
            }
            __m256 d, m;
            scales(rp, o, &d, &m);
            acc = _mm256_fmadd_ps(_mm256_mul_ps(d, _mm256_set1_ps(a[b].d)), _mm256_cvtepi32_ps(qk_rows_sum8(v)), acc);
            acc = _mm256_fmadd_ps(m, _mm256_set1_ps(a[b].s), acc);
        }
        float res[8];
        _mm256_storeu_ps(res, acc);
        for (int i = 0; i < rows; i++) out[r + i] = res[i];
    }
}

/* The decode entry tiles.h's gemm calls for one token (the type's file also defines
 * QK_HAS_DECODE_<name> as 1). */
#define QK_DECODE32(name, BYTES, isum, scales)                                                        \
    static void qk_decode_##name(int64_t n, const uint8_t *w, size_t row_bytes, int64_t nr, const uint8_t *act, \
                                 float *out, void *scratch) {                                         \
        (void)scratch;                                                                                \
        qk_decode32(n, w, row_bytes, nr, (const qk_act_q8_32 *)act, out, BYTES, isum, scales);       \
    }
#endif

#endif
