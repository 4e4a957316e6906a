/* One-token products (decode) of Q4_K and Q6_K on AVX-512 VNNI, without panels.
 *
 * Decode meets each weight panel once, so the tile path's 8-row transposition (tiles.h) is pure
 * cost there: at one token it ran Q4_K at ~19 GB/s per core in L2, below what a core can
 * stream from DRAM. Here each row is read straight, block after block (one sequential stream
 * per thread), its quants unpacked in natural order into 512-bit registers and met by the
 * token with vpdpbusd. The four vpdpbusd results of a block are packed to int16 and meet the
 * sub-block scales, expanded to int16 lanes, in one vpmaddwd + vpdpwssd (no per-sub-block
 * sums, no vpmulld). The block leaves its scales (Q4_K: d, dmin and the decoded 6-bit mins;
 * Q6_K: the 16 scales and d) in a side entry, and the float step computes eight rows' min
 * terms at once from them (one vpmaddwd per four rows) instead of a lane-sum tree per block:
 * Q4_K 18 -> 24.5 GB/s, Q6_K 25 -> 29.5 per core in cache. No software prefetch: the hardware
 * follows one stream per thread, and prefetching 4 KiB ahead cost 10-20 % from DRAM.
 * (Tried and left out: sixteen rows or sixteen (row, block) items per pass sharing the token's
 * registers and one transpose-add tree ran Q4_K at 26-30 GB/s from L3 but streamed worse from
 * DRAM than one row at a time, and decode got slower.)
 *
 * The arithmetic is the tile path's, bit for bit, so a token's logits still do not depend on
 * the batch it is in (tests/test_quants_tiles.py compares 1 token against many): per (row,
 * super-block) the same exact integers
 *     tot = sum_s sc_s * isum_s,   mins = the min coefficients . bsums
 * (integer sums: their order does not matter), then, eight rows in the lanes of one register
 * as in the tiles, the same two float steps per super-block, in block order:
 *     acc = fma(d * d_a, (float)tot, acc);   acc = fma(nd * d_a, (float)mins, acc).
 * A row's tot come out of a lane-sum tree over eight blocks at a time, parked in the scratch
 * ([row][block]) and transposed eight blocks at a time for the float steps (lanes = rows),
 * which run in slices between the next eight rows' blocks so that the weight stream never
 * pauses for them, and a row's eight blocks are unrolled so that their chains of latencies
 * overlap (kept rolled, each block's result went through the stack). One core from memory,
 * both: Q4_K 20.8 -> 26.3 GB/s, Q6_K 21.8 -> 27.5 (bench/README.md, third pass).
 */
#ifndef QPACK_GEMV_H
#define QPACK_GEMV_H

#include "panel.h"

#if QK_TILES_X86

/* Q4_K's 16 header bytes [d|dmin, a, b, c] with the 6-bit scales and mins decoded as
 * qk_k4_scales does: returns [sc0-3, sc4-7, mn0-3, mn4-7] =
 * [a & 3f, c & 0f | (a >> 2) & 30, b & 3f, (c >> 4) & 0f | (b >> 2) & 30], and leaves the side
 * entry [d|dmin, sc4-7, mn0-3, mn4-7] the min step reads. */
static inline __m128i qk_gemv_side_q4_k(const uint8_t *x, uint8_t *side) {
    const __m128i head = _mm_loadu_si128((const __m128i *)x);
    const __m128i low = _mm_and_si128(_mm_srlv_epi32(_mm_shuffle_epi32(head, _MM_SHUFFLE(3, 2, 3, 1)), _mm_setr_epi32(0, 0, 0, 4)),
                                      _mm_setr_epi32(0x3f3f3f3f, 0x0f0f0f0f, 0x3f3f3f3f, 0x0f0f0f0f));
    const __m128i high = _mm_srli_epi32(_mm_shuffle_epi32(head, _MM_SHUFFLE(2, 2, 1, 1)), 2);
    const __m128i m30 = _mm_setr_epi32(0, 0x30303030, 0, 0x30303030);
#if QK_TILES_X86 == 2
    const __m128i scmn = _mm_ternarylogic_epi32(high, m30, low, 0xEA); /* a & b | c */
#else
    const __m128i scmn = _mm_or_si128(_mm_and_si128(high, m30), low);
#endif
    _mm_storeu_si128((__m128i *)side, _mm_blend_epi32(scmn, head, 0x1));
    return scmn;
}

/* Q6_K's 16 int8 scales (returned) as its side entry, and its f16 d. */
static inline __m128i qk_gemv_side_q6_k(const uint8_t *x, uint8_t *side, uint16_t *dh) {
    const __m128i sc8 = _mm_loadu_si128((const __m128i *)(x + 192));
    _mm_storeu_si128((__m128i *)side, sc8);
    *dh = qk_load_u16(x + 208);
    return sc8;
}

/* Scratch layout of both builds, twice (the group of eight rows being read and the one whose
 * float steps run meanwhile): per (row of 8, block) tot, the same transposed, then per (block,
 * row of 8) a 16-byte side entry and a u16 (AVX-512 puts the prepared token first). */
typedef struct {
    int32_t *tot;   /* [row of 8][nb8] */
    int32_t *tot_t; /* [nb8][row of 8] */
    uint8_t *side;  /* [block][row of 8][16] */
    uint16_t *dh;   /* [block][row of 8] */
} qk_gemv_parked;

static inline qk_gemv_parked qk_gemv_park(void *at, int64_t nb, void **end) {
    const int64_t nb8 = (nb + 7) / 8 * 8;
    qk_gemv_parked p;
    p.tot = (int32_t *)at;
    p.tot_t = p.tot + 8 * nb8;
    p.side = (uint8_t *)(p.tot_t + 8 * nb8);
    p.dh = (uint16_t *)(p.side + 8 * 16 * nb);
    *end = (void *)(((uintptr_t)(p.dh + 8 * nb) + 63) & ~(uintptr_t)63);
    return p;
}

/* Eight rows' d, nd and min sums of one block, from their side entries (16 bytes per row) and
 * dh, and the token's block x. */
typedef void (*qk_gemv_mins_fn)(const uint8_t *side, const uint16_t *dh, const qk_act_q8_256 *x, __m256 *d,
                                __m256 *nd, __m256i *mins);

/* The tiles' float steps for eight rows (lanes = rows), blocks lo..hi-1 in block order, from
 * their transposed tot and side entries. */
QK_TILE_INLINE __m256 qk_gemv_float_steps(__m256 acc, int64_t lo, int64_t hi, qk_gemv_parked pk,
                                          const qk_act_q8_256 *x, qk_gemv_mins_fn mins_of) {
    for (int64_t b = lo; b < hi; b++) {
        __m256 d, nd;
        __m256i mins;
        mins_of(pk.side + (size_t)b * 8 * 16, pk.dh + 8 * b, x + b, &d, &nd, &mins);
        const __m256 da = _mm256_set1_ps(x[b].d);
        const __m256i tot = _mm256_loadu_si256((const __m256i *)(pk.tot_t + 8 * b));
        acc = _mm256_fmadd_ps(_mm256_mul_ps(d, da), _mm256_cvtepi32_ps(tot), acc);
        acc = _mm256_fmadd_ps(_mm256_mul_ps(nd, da), _mm256_cvtepi32_ps(mins), acc);
    }
    return acc;
}

/* One row's tot for blocks b0..b0+7 (zero past nb) as 8 lanes, leaving its side entries:
 * the build's block loop and lane-sum tree. `tok` is what the build's blocks read of the token. */
typedef __m256i (*qk_gemv_tots8_fn)(const uint8_t *row, int64_t b0, int64_t nb, int bytes, const void *tok,
                                    qk_gemv_parked pk, int i);

/* A build's qk_gemv_tots8_fn `fn`: its `block` product over eight blocks of the row (vectors of
 * type `vec`, `zero` past nb), unrolled so that the blocks' latency chains overlap (rolled, each
 * block's result went through the stack), then its lane-sum `tree`. `tok_t` is what the blocks
 * read of the token, one per block. */
#define QK_GEMV_TOTS8(fn, block, vec, zero, tree, tok_t)                                                            \
    static inline __m256i fn(const uint8_t *row, int64_t b0, int64_t nb, int bytes, const void *tok,                \
                             qk_gemv_parked pk, int i) {                                                            \
        const tok_t *tk = (const tok_t *)tok;                                                                       \
        vec t[8];                                                                                                   \
        QK_UNROLL8                                                                                                  \
        for (int k = 0; k < 8; k++) {                                                                               \
            const int64_t b = b0 + k;                                                                               \
            t[k] = b < nb ? block(row + (size_t)b * bytes, tk + b, pk.side + (size_t)(8 * b + i) * 16, pk.dh + 8 * b + i) \
                          : zero;                                                                                   \
        }                                                                                                           \
        return tree(t);                                                                                             \
    }

/* out[r] = W[r] . x for r < nr. Rows are read one after the other (one stream per thread: this
 * machine's DRAM streams two interleaved rows at half speed); per row, eight blocks' tot come
 * out of one lane-sum tree. The float steps of a group of eight rows run in eight slices while
 * the next group's rows are read: run as a phase of their own (a chain of dependent fmas) they
 * left the weight stream idle, and cost 15 % of Q4_K's speed from DRAM. */
QK_TILE_INLINE void qk_gemv_rows(int64_t nb, const uint8_t *w, size_t row_bytes, int64_t nr, const qk_act_q8_256 *x,
                                 const void *tok, float *out, void *scratch, int bytes, qk_gemv_tots8_fn tots8,
                                 qk_gemv_mins_fn mins_of) {
    const int64_t nb8 = (nb + 7) / 8 * 8, slice = (nb + 7) / 8;
    void *next;
    qk_gemv_parked pk[2];
    pk[0] = qk_gemv_park(scratch, nb, &next);
    pk[1] = qk_gemv_park(next, nb, &next);
    int prev_rows = 0; /* rows of the group whose float steps are pending (0: none) */
    __m256 acc = _mm256_setzero_ps();
    for (int64_t r = 0, g = 0;; r += 8, g ^= 1) {
        const int rows = r >= nr ? 0 : nr - r < 8 ? (int)(nr - r) : 8;
        const qk_gemv_parked cur = pk[g], prev = pk[g ^ 1];
        for (int i = 0; i < 8; i++) {
            if (rows) {
                const uint8_t *row = w + (size_t)(r + (i < rows ? i : rows - 1)) * row_bytes;
                for (int64_t b0 = 0; b0 < nb; b0 += 8)
                    _mm256_storeu_si256((__m256i *)(cur.tot + i * nb8 + b0), tots8(row, b0, nb, bytes, tok, cur, i));
            }
            if (prev_rows) {
                const int64_t lo = i * slice < nb ? i * slice : nb, hi = lo + slice < nb ? lo + slice : nb;
                acc = qk_gemv_float_steps(acc, lo, hi, prev, x, mins_of);
            }
        }
        if (prev_rows) {
            float res[8];
            _mm256_storeu_ps(res, acc);
            for (int i = 0; i < prev_rows; i++) out[r - 8 + i] = res[i];
            acc = _mm256_setzero_ps();
        }
        if (!rows) return;
        for (int64_t b0 = 0; b0 < nb; b0 += 8) { /* int32 bits moved as floats: row i's blocks -> block k's rows */
            __m256 t[8], v[8];
            for (int i = 0; i < 8; i++) t[i] = _mm256_loadu_ps((const float *)(cur.tot + i * nb8 + b0));
            qk_transpose8x8(t, v);
            for (int k = 0; k < 8; k++) _mm256_storeu_ps((float *)(cur.tot_t + 8 * (b0 + k)), v[k]);
        }
        prev_rows = rows;
    }
}

#endif /* QK_TILES_X86 */

#if QK_TILES_X86 == 2 && defined(__AVX512BW__)

/* Eight vectors of 16 int32 -> one of 8: lane i = the sum of v[i]'s lanes. */
static inline __m256i qk_lane_sums8(const __m512i v[8]) {
    const __m512i p0 = _mm512_add_epi32(_mm512_unpacklo_epi32(v[0], v[1]), _mm512_unpackhi_epi32(v[0], v[1]));
    const __m512i p1 = _mm512_add_epi32(_mm512_unpacklo_epi32(v[2], v[3]), _mm512_unpackhi_epi32(v[2], v[3]));
    const __m512i p2 = _mm512_add_epi32(_mm512_unpacklo_epi32(v[4], v[5]), _mm512_unpackhi_epi32(v[4], v[5]));
    const __m512i p3 = _mm512_add_epi32(_mm512_unpacklo_epi32(v[6], v[7]), _mm512_unpackhi_epi32(v[6], v[7]));
    /* per 128-bit lane: partial sums of v0..v3 (q0) and v4..v7 (q1) */
    const __m512i q0 = _mm512_add_epi32(_mm512_unpacklo_epi64(p0, p1), _mm512_unpackhi_epi64(p0, p1));
    const __m512i q1 = _mm512_add_epi32(_mm512_unpacklo_epi64(p2, p3), _mm512_unpackhi_epi64(p2, p3));
    const __m512i u = _mm512_add_epi32(_mm512_shuffle_i32x4(q0, q1, 0x88), _mm512_shuffle_i32x4(q0, q1, 0xDD));
    const __m512i w = _mm512_add_epi32(_mm512_shuffle_i32x4(u, u, 0x08), _mm512_shuffle_i32x4(u, u, 0x0D));
    return _mm512_castsi512_si256(w);
}

/* What a row's block needs of the token, prepared once per call: the activation quants in the
 * order the row's registers hold the weights. */
typedef struct {
    __m512i a[4];
} qk_gemv_act;

/* A row's block (qk_gemv_block_<type>) returns the 16-lane vector whose lane sum is tot, and
 * leaves in `side` (16 bytes) and `dh` what the min step needs of it. */

/* The four vpdpbusd results (|lane| <= 4 * 63 * 127 < 2^15) packed to int16 meet the scales as
 * int16 in one vpmaddwd + vpdpwssd: pack(R0, R1) holds per 128-bit lane j four int16 of R0's
 * lane j then four of R1's, so sc01 (sc23) gives each its sub-block's scale. */
static inline __m512i qk_gemv_scaled(__m512i r0, __m512i r1, __m512i r2, __m512i r3, __m512i sc01, __m512i sc23) {
    return _mm512_dpwssd_epi32(_mm512_madd_epi16(_mm512_packs_epi32(r0, r1), sc01), _mm512_packs_epi32(r2, r3), sc23);
}

/* vpshufb controls: int16 lane w of 128-bit lane j takes byte ctl(j, w), high byte zero. */
#define QK_W16(b) (char)0x80, (b) /* set_epi8 lists bytes high to low */
#define QK_W16X4(b) QK_W16(b), QK_W16(b), QK_W16(b), QK_W16(b)

/* ---------------------------------------------------------------- Q4_K */

/* Registers: R0 = low nibbles of qs[0..63] = sub-blocks 0 and 2 (lanes 0-7, 8-15), R1 = high
 * nibbles = 1 and 3, R2 = low of qs[64..127] = 4 and 6, R3 = 5 and 7; the token's quants in the
 * same order. */
static inline void qk_gemv_act_q4_k(const qk_act_q8_256 *x, qk_gemv_act *g) {
    static const int sub[4][2] = {{0, 2}, {1, 3}, {4, 6}, {5, 7}};
    for (int k = 0; k < 4; k++)
        g->a[k] = _mm512_inserti64x4(_mm512_castsi256_si512(_mm256_loadu_si256((const __m256i *)(x->qs + 32 * sub[k][0]))),
                                     _mm256_loadu_si256((const __m256i *)(x->qs + 32 * sub[k][1])), 1);
}

static inline __m512i qk_gemv_block_q4_k(const uint8_t *x, const qk_gemv_act *a, uint8_t *side, uint16_t *dh) {
    (void)dh;
    const __m512i m4 = _mm512_set1_epi8(0x0f), zero = _mm512_setzero_si512();
    const __m512i w0 = _mm512_loadu_si512((const void *)(x + 16)), w1 = _mm512_loadu_si512((const void *)(x + 80));
    const __m512i r0 = _mm512_dpbusd_epi32(zero, _mm512_and_si512(w0, m4), a->a[0]);
    const __m512i r1 = _mm512_dpbusd_epi32(zero, _mm512_and_si512(_mm512_srli_epi16(w0, 4), m4), a->a[1]);
    const __m512i r2 = _mm512_dpbusd_epi32(zero, _mm512_and_si512(w1, m4), a->a[2]);
    const __m512i r3 = _mm512_dpbusd_epi32(zero, _mm512_and_si512(_mm512_srli_epi16(w1, 4), m4), a->a[3]);
    const __m128i scmn = qk_gemv_side_q4_k(x, side);
    /* R0 = sub-blocks 0 (lanes 0-1) and 2 (2-3), R1 = 1 and 3, R2 = 4 and 6, R3 = 5 and 7 */
    const __m512i sc01 = _mm512_set_epi8(QK_W16X4(3), QK_W16X4(2), QK_W16X4(3), QK_W16X4(2),
                                         QK_W16X4(1), QK_W16X4(0), QK_W16X4(1), QK_W16X4(0));
    const __m512i s = _mm512_broadcast_i32x4(scmn);
    return qk_gemv_scaled(r0, r1, r2, r3, _mm512_shuffle_epi8(s, sc01),
                          _mm512_shuffle_epi8(s, _mm512_add_epi8(sc01, _mm512_set1_epi16(4))));
}

static inline void qk_gemv_mins_q4_k(const uint8_t *side, const uint16_t *dh, const qk_act_q8_256 *x, __m256 *d,
                                     __m256 *nd, __m256i *mins) {
    (void)dh;
    const __m512i bs = _mm512_broadcast_i32x4(_mm_loadu_si128((const __m128i *)x->bsums32));
    const __m512i h0 = _mm512_loadu_si512((const void *)side), h1 = _mm512_loadu_si512((const void *)(side + 64));
    const __m256i dm = _mm512_castsi512_si256(_mm512_permutex2var_epi32(
        h0, _mm512_setr_epi32(0, 4, 8, 12, 16, 20, 24, 28, 0, 0, 0, 0, 0, 0, 0, 0), h1));
    __m256 dmin;
    qk_split_f16x2(dm, d, &dmin);
    *nd = _mm256_sub_ps(_mm256_setzero_ps(), dmin);
    /* per 128-bit lane (a row): mn0-7 zero-extended to int16 times bsums32, in 4 int32 */
    const __m512i z = _mm512_broadcast_i32x4(_mm_setr_epi8(8, -1, 9, -1, 10, -1, 11, -1, 12, -1, 13, -1, 14, -1, 15, -1));
    const __m512i p0 = _mm512_madd_epi16(_mm512_shuffle_epi8(h0, z), bs); /* rows 0-3 */
    const __m512i p1 = _mm512_madd_epi16(_mm512_shuffle_epi8(h1, z), bs); /* rows 4-7 */
    /* 128-bit lane j: row j's sum in int32 0, row 4 + j's in 1 */
    const __m512i q = _mm512_add_epi32(_mm512_unpacklo_epi32(p0, p1), _mm512_unpackhi_epi32(p0, p1));
    const __m512i t = _mm512_add_epi32(q, _mm512_shuffle_epi32(q, _MM_PERM_BADC));
    *mins = _mm512_castsi512_si256(_mm512_permutexvar_epi32(_mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 0, 0, 0, 0, 0, 0, 0, 0), t));
}

/* ---------------------------------------------------------------- Q6_K */

/* Registers in natural order: R_k = elements 64k..64k+63, 128-bit lane j = sub-block 4k + j:
 * pack(R0, R1) holds per lane j sub-blocks j and 4 + j, pack(R2, R3) 8 + j and 12 + j. */
static inline void qk_gemv_act_q6_k(const qk_act_q8_256 *x, qk_gemv_act *g) {
    for (int k = 0; k < 4; k++) g->a[k] = _mm512_loadu_si512((const void *)(x->qs + 64 * k));
}

static inline __m512i qk_gemv_block_q6_k(const uint8_t *x, const qk_gemv_act *a, uint8_t *side, uint16_t *dh) {
    const __m512i m4 = _mm512_set1_epi8(0x0f), m30 = _mm512_set1_epi8(0x30), zero = _mm512_setzero_si512();
    /* the high bits to bits 4-5: qh bits 0-1 (first 32 bytes) / 2-3 (next 32) for the low
     * nibbles, bits 4-5 / 6-7 for the high ones (16-bit shifts: what crosses bytes is masked) */
    const __m512i sh_lo = _mm512_inserti64x4(_mm512_set1_epi16(4), _mm256_set1_epi16(2), 1);
    const __m512i sh_hi = _mm512_inserti64x4(_mm512_setzero_si512(), _mm256_set1_epi16(2), 1);
    __m512i r[4];
    for (int h = 0; h < 2; h++) {
        const __m512i ql = _mm512_loadu_si512((const void *)(x + 64 * h));
        const __m512i qh = _mm512_broadcast_i64x4(_mm256_loadu_si256((const __m256i *)(x + 128 + 32 * h)));
        const __m512i hl = _mm512_and_si512(_mm512_sllv_epi16(qh, sh_lo), m30);
        const __m512i hh = _mm512_and_si512(_mm512_srlv_epi16(qh, sh_hi), m30);
        const __m512i lo = _mm512_ternarylogic_epi32(ql, hl, m4, 0xEC);                        /* ql & 15 | hl */
        const __m512i hi = _mm512_ternarylogic_epi32(_mm512_srli_epi16(ql, 4), hh, m4, 0xEC); /* ql >> 4 | hh */
        r[2 * h] = _mm512_dpbusd_epi32(zero, lo, a->a[2 * h]);
        r[2 * h + 1] = _mm512_dpbusd_epi32(zero, hi, a->a[2 * h + 1]);
    }
    /* int16 lane w of 128-bit lane j: scale j (w < 4) or 4 + j, of scales 0-7 (lo) or 8-15 (hi) */
    const __m512i sel = _mm512_set_epi8(15, 14, 15, 14, 15, 14, 15, 14, 7, 6, 7, 6, 7, 6, 7, 6,
                                        13, 12, 13, 12, 13, 12, 13, 12, 5, 4, 5, 4, 5, 4, 5, 4,
                                        11, 10, 11, 10, 11, 10, 11, 10, 3, 2, 3, 2, 3, 2, 3, 2,
                                        9, 8, 9, 8, 9, 8, 9, 8, 1, 0, 1, 0, 1, 0, 1, 0);
    const __m256i sc = _mm256_cvtepi8_epi16(qk_gemv_side_q6_k(x, side, dh));
    return qk_gemv_scaled(r[0], r[1], r[2], r[3], _mm512_shuffle_epi8(_mm512_broadcast_i32x4(_mm256_castsi256_si128(sc)), sel),
                          _mm512_shuffle_epi8(_mm512_broadcast_i32x4(_mm256_extracti128_si256(sc, 1)), sel));
}

/* mins = sum_s (32 sc_s) bsums_s (the -32 offset of the quants), nd = -d */
static inline void qk_gemv_mins_q6_k(const uint8_t *side, const uint16_t *dh, const qk_act_q8_256 *x, __m256 *d,
                                     __m256 *nd, __m256i *mins) {
    const __m512i bs = _mm512_broadcast_i64x4(_mm256_loadu_si256((const __m256i *)x->bsums));
    *d = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)dh));
    *nd = _mm256_sub_ps(_mm256_setzero_ps(), *d);
    /* 256-bit half h of p[k]: row 2k + h's scales times the bsums, in 8 int32 */
    __m512i p[4];
    for (int k = 0; k < 4; k++)
        p[k] = _mm512_madd_epi16(_mm512_cvtepi8_epi16(_mm256_loadu_si256((const __m256i *)(side + 32 * k))), bs);
    /* 128-bit lane j of r: [p0, p1, p2, p3]'s lane j sums (a row's 2 lanes: j = 2h, 2h + 1) */
    const __m512i q0 = _mm512_add_epi32(_mm512_unpacklo_epi32(p[0], p[1]), _mm512_unpackhi_epi32(p[0], p[1]));
    const __m512i q1 = _mm512_add_epi32(_mm512_unpacklo_epi32(p[2], p[3]), _mm512_unpackhi_epi32(p[2], p[3]));
    const __m512i r = _mm512_add_epi32(_mm512_unpacklo_epi64(q0, q1), _mm512_unpackhi_epi64(q0, q1));
    /* lanes 0 and 2: [rows 0, 2, 4, 6] and [rows 1, 3, 5, 7] */
    const __m512i t = _mm512_add_epi32(r, _mm512_shuffle_i32x4(r, r, _MM_SHUFFLE(2, 3, 0, 1)));
    /* 32 sc bsums fits int32; 32 sc would not leave room in int16 for the bsums */
    *mins = _mm256_slli_epi32(
        _mm512_castsi512_si256(_mm512_permutexvar_epi32(_mm512_setr_epi32(0, 8, 1, 9, 2, 10, 3, 11, 0, 0, 0, 0, 0, 0, 0, 0), t)), 5);
}

/* ---------------------------------------------------------------- the product */

/* Scratch: per block the prepared token (4 registers, 256 bytes), then two qk_gemv_parked (per
 * block 8 x (4 + 4 + 16 + 2) bytes each): well within qk_gemm_scratch_bytes (two qk_panel256
 * per block). */

/* The AVX-512 blocks of one row (tok: the prepared token, qk_gemv_act per block). */
QK_GEMV_TOTS8(qk_gemv_tots8_q4_k, qk_gemv_block_q4_k, __m512i, _mm512_setzero_si512(), qk_lane_sums8, qk_gemv_act)
QK_GEMV_TOTS8(qk_gemv_tots8_q6_k, qk_gemv_block_q6_k, __m512i, _mm512_setzero_si512(), qk_lane_sums8, qk_gemv_act)

/* out[r] = W[r] . act for r < nr: the token prepared once, then qk_gemv_rows. */
QK_TILE_INLINE void qk_gemv256(int64_t n, const uint8_t *w, size_t row_bytes, int64_t nr, const uint8_t *act,
                               float *out, void *scratch, int bytes, void (*prep)(const qk_act_q8_256 *, qk_gemv_act *),
                               qk_gemv_tots8_fn tots8, qk_gemv_mins_fn mins_of) {
    const int64_t nb = n / 256;
    const qk_act_q8_256 *x = (const qk_act_q8_256 *)act;
    qk_gemv_act *ga = (qk_gemv_act *)scratch;
    for (int64_t b = 0; b < nb; b++) prep(x + b, ga + b);
    qk_gemv_rows(nb, w, row_bytes, nr, x, ga, out, ga + nb, bytes, tots8, mins_of);
}

/* The decode entries tiles.h's gemm calls for one token (the same hook as panel_unpack.h's). */
#define QK_HAS_DECODE_q4_k 1
static void qk_decode_q4_k(int64_t n, const uint8_t *w, size_t row_bytes, int64_t nr, const uint8_t *act,
                           float *out, void *scratch) {
    qk_gemv256(n, w, row_bytes, nr, act, out, scratch, 144, qk_gemv_act_q4_k, qk_gemv_tots8_q4_k, qk_gemv_mins_q4_k);
}
#define QK_HAS_DECODE_q6_k 1
static void qk_decode_q6_k(int64_t n, const uint8_t *w, size_t row_bytes, int64_t nr, const uint8_t *act,
                           float *out, void *scratch) {
    qk_gemv256(n, w, row_bytes, nr, act, out, scratch, 210, qk_gemv_act_q6_k, qk_gemv_tots8_q6_k, qk_gemv_mins_q6_k);
}
#elif QK_TILES_X86 == 1

/* ---------------------------------------------------------------- AVX2: the same numbers
 * The token's quants are read in natural order straight from its block (32 per register); per
 * register of 32 weights, maddubs gives int16 pair sums (|pair| <= 2 * 63 * 127 < 2^15) and
 * vpmaddwd meets them with the sub-block scale(s) broadcast to int16 lanes. */

/* vpshufb controls: every int16 lane takes int16 v of its 128-bit half (QK_I16_BCAST), or v in
 * the low half and u in the high one (QK_I16_BCAST2). */
#define QK_I16_PAIR(v) ((short)((2 * (v) + 1) << 8 | (2 * (v))))
#define QK_I16_BCAST(v) _mm256_set1_epi16(QK_I16_PAIR(v))
#define QK_I16_BCAST2(v, u) _mm256_set_m128i(_mm_set1_epi16(QK_I16_PAIR(u)), _mm_set1_epi16(QK_I16_PAIR(v)))

static inline __m256i qk_gemv2_block_q4_k(const uint8_t *x, const qk_act_q8_256 *a, uint8_t *side, uint16_t *dh) {
    (void)dh;
    const __m256i m4 = _mm256_set1_epi8(0x0f);
    const __m256i sc = _mm256_broadcastsi128_si256(_mm_cvtepu8_epi16(qk_gemv_side_q4_k(x, side))); /* sc0-7 as int16 */
    __m256i tot = _mm256_setzero_si256();
    for (int j = 0; j < 4; j++) { /* qs[32j..32j+31]: low nibbles sub-block 2j, high 2j + 1 */
        const __m256i q = _mm256_loadu_si256((const __m256i *)(x + 16 + 32 * j));
        const __m256i lo = _mm256_maddubs_epi16(_mm256_and_si256(q, m4), _mm256_loadu_si256((const __m256i *)(a->qs + 64 * j)));
        const __m256i hi = _mm256_maddubs_epi16(_mm256_and_si256(_mm256_srli_epi16(q, 4), m4),
                                                _mm256_loadu_si256((const __m256i *)(a->qs + 64 * j + 32)));
        tot = _mm256_add_epi32(tot, _mm256_madd_epi16(lo, _mm256_shuffle_epi8(sc, QK_I16_BCAST(2 * j))));
        tot = _mm256_add_epi32(tot, _mm256_madd_epi16(hi, _mm256_shuffle_epi8(sc, QK_I16_BCAST(2 * j + 1))));
    }
    return tot;
}

static inline void qk_gemv2_mins_q4_k(const uint8_t *side, const uint16_t *dh, const qk_act_q8_256 *x, __m256 *d,
                                      __m256 *nd, __m256i *mins) {
    (void)dh;
    const __m128i bs = _mm_loadu_si128((const __m128i *)x->bsums32);
    const __m128i zext = _mm_setr_epi8(8, -1, 9, -1, 10, -1, 11, -1, 12, -1, 13, -1, 14, -1, 15, -1);
    __m128i e[8], p[8];
    for (int i = 0; i < 8; i++) {
        e[i] = _mm_loadu_si128((const __m128i *)(side + 16 * i));
        p[i] = _mm_madd_epi16(_mm_shuffle_epi8(e[i], zext), bs); /* row i: 4 partial sums */
    }
    const __m128i m03 = _mm_hadd_epi32(_mm_hadd_epi32(p[0], p[1]), _mm_hadd_epi32(p[2], p[3]));
    const __m128i m47 = _mm_hadd_epi32(_mm_hadd_epi32(p[4], p[5]), _mm_hadd_epi32(p[6], p[7]));
    *mins = _mm256_inserti128_si256(_mm256_castsi128_si256(m03), m47, 1);
    /* the rows' first dwords, d | dmin << 16 */
    const __m128i d03 = _mm_unpacklo_epi64(_mm_unpacklo_epi32(e[0], e[1]), _mm_unpacklo_epi32(e[2], e[3]));
    const __m128i d47 = _mm_unpacklo_epi64(_mm_unpacklo_epi32(e[4], e[5]), _mm_unpacklo_epi32(e[6], e[7]));
    __m256 dmin;
    qk_split_f16x2(_mm256_inserti128_si256(_mm256_castsi128_si256(d03), d47, 1), d, &dmin);
    *nd = _mm256_sub_ps(_mm256_setzero_ps(), dmin);
}

static inline __m256i qk_gemv2_block_q6_k(const uint8_t *x, const qk_act_q8_256 *a, uint8_t *side, uint16_t *dh) {
    const __m256i sc16 = _mm256_cvtepi8_epi16(qk_gemv_side_q6_k(x, side, dh));
    __m256i tot = _mm256_setzero_si256();
    for (int h = 0; h < 2; h++) { /* elements 128h + 32k + l (k < 4): ql, qh as ggml lays them */
        const __m256i ql0 = _mm256_loadu_si256((const __m256i *)(x + 64 * h));
        const __m256i ql1 = _mm256_loadu_si256((const __m256i *)(x + 64 * h + 32));
        const __m256i qh = _mm256_loadu_si256((const __m256i *)(x + 128 + 32 * h));
        __m256i q[4];
        qk_nibbles_2bits(ql0, ql1, qh, q);
        /* scales 8h..8h + 7 in both halves: register k's lanes 0-7 are sub-block 8h + 2k, 8-15 the next */
        const __m256i s = h == 0 ? _mm256_permute2x128_si256(sc16, sc16, 0x00) : _mm256_permute2x128_si256(sc16, sc16, 0x11);
        for (int k = 0; k < 4; k++) {
            const __m256i p = _mm256_maddubs_epi16(q[k], _mm256_loadu_si256((const __m256i *)(a->qs + 128 * h + 32 * k)));
            const __m256i sk = _mm256_shuffle_epi8(s, QK_I16_BCAST2(2 * k, 2 * k + 1));
            tot = _mm256_add_epi32(tot, _mm256_madd_epi16(p, sk));
        }
    }
    return tot;
}

static inline void qk_gemv2_mins_q6_k(const uint8_t *side, const uint16_t *dh, const qk_act_q8_256 *x, __m256 *d,
                                      __m256 *nd, __m256i *mins) {
    const __m256i bs = _mm256_loadu_si256((const __m256i *)x->bsums);
    __m256i p[8];
    for (int i = 0; i < 8; i++)
        p[i] = _mm256_madd_epi16(_mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)(side + 16 * i))), bs);
    *mins = _mm256_slli_epi32(qk_rows_sum8(p), 5); /* 32 sc bsums, as the AVX-512 build */
    *d = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)dh));
    *nd = _mm256_sub_ps(_mm256_setzero_ps(), *d);
}

/* The AVX2 blocks of one row (tok: the token's blocks themselves). */
QK_GEMV_TOTS8(qk_gemv2_tots8_q4_k, qk_gemv2_block_q4_k, __m256i, _mm256_setzero_si256(), qk_rows_sum8, qk_act_q8_256)
QK_GEMV_TOTS8(qk_gemv2_tots8_q6_k, qk_gemv2_block_q6_k, __m256i, _mm256_setzero_si256(), qk_rows_sum8, qk_act_q8_256)

#define QK_HAS_DECODE_q4_k 1
static void qk_decode_q4_k(int64_t n, const uint8_t *w, size_t row_bytes, int64_t nr, const uint8_t *act,
                           float *out, void *scratch) {
    qk_gemv_rows(n / 256, w, row_bytes, nr, (const qk_act_q8_256 *)act, act, out, scratch, 144,
                 qk_gemv2_tots8_q4_k, qk_gemv2_mins_q4_k);
}
#define QK_HAS_DECODE_q6_k 1
static void qk_decode_q6_k(int64_t n, const uint8_t *w, size_t row_bytes, int64_t nr, const uint8_t *act,
                           float *out, void *scratch) {
    qk_gemv_rows(n / 256, w, row_bytes, nr, (const qk_act_q8_256 *)act, act, out, scratch, 210,
                 qk_gemv2_tots8_q6_k, qk_gemv2_mins_q6_k);
}
#endif

#endif
