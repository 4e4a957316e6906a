/* Tile panels: the unpacked form of eight weight rows that the tiled products (tiles.h) read.
 * Each type's file (types/) fills panels from its GGUF blocks; tiles.h multiplies them.
 *
 * A panel holds, per block, unsigned bytes u (the quants made non-negative) and the scales:
 *   32-element blocks:  x = d * u + m                       (qk_panel32)
 *   256-element blocks: x = d * sc[sub] * u + nd * (mn . bsums coefficients)  (qk_panel256)
 * so that every type's product is "integer dot, then one or two fma" (tiles.h).
 *
 * Layout of q, by build:
 *   - SIMD (QK_TILES_X86, QK_TILES_NEON): interleaved, q[j][i][0..3] = elements 4j..4j+3 of
 *     row i, so one 32-byte load holds the same four elements of the eight rows and a token's
 *     4-byte group, broadcast, meets them in one vpdpbusd / maddubs / two sdot;
 *   - portable: row i's bytes in natural order at 32i (256i), which its plain loops vectorize.
 * Wide types (u up to 255: Q8_0, IQ4; group 0 in quant_types.def) cannot go through AVX2's
 * maddubs or NEON's sdot unsigned: in those builds (QK_WIDE_SIGNED) their panels hold the
 * signed value u - 128 and no -128 min term. The arithmetic per (row, token) is fixed within a
 * build, so results never depend on the batch; across builds they agree to float rounding.
 */
#ifndef QPACK_PANEL_H
#define QPACK_PANEL_H

#include "quants_common.h"

#define QK_PANEL_ROWS 8

#if defined(__AVX512F__) && defined(__AVX512VL__) && defined(__AVX512VNNI__)
#define QK_TILES_X86 2 /* vpdpbusd */
#elif defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#define QK_TILES_X86 1 /* maddubs + madd */
#else
#define QK_TILES_X86 0
#endif
#if !QK_TILES_X86 && defined(__ARM_NEON) && defined(__aarch64__)
#define QK_TILES_NEON 1 /* sdot (armv8.2 dotprod) or smull + sadalp (armv8.0) */
#else
#define QK_TILES_NEON 0
#endif
#define QK_WIDE_SIGNED (QK_TILES_X86 == 1 || QK_TILES_NEON)

/* Inlined into each caller, so that constant arguments (token count, sub-block size) unroll. */
#if defined(__GNUC__) || defined(__clang__)
#define QK_TILE_INLINE static inline __attribute__((always_inline))
#else
#define QK_TILE_INLINE static __forceinline
#endif

/* A loop of eight whose iterations must overlap (gemv.h's blocks of a row: kept rolled, each
 * block's result went through the stack and its long chain of latencies ran alone). */
#if defined(__clang__)
#define QK_UNROLL8 _Pragma("clang loop unroll_count(8)")
#elif defined(__GNUC__)
#define QK_UNROLL8 _Pragma("GCC unroll 8")
#else
#define QK_UNROLL8
#endif

/* One 32-element block of eight rows. */
typedef struct {
    uint8_t q[8][QK_PANEL_ROWS][4];
    float d[QK_PANEL_ROWS];
    float m[QK_PANEL_ROWS];
} qk_panel32;

/* One 256-element super-block of eight rows. */
typedef struct {
    uint8_t q[64][QK_PANEL_ROWS][4];
    int32_t sc[16][QK_PANEL_ROWS]; /* scale of sub-block s (16 elements; 32 for Q4_K/Q5_K) */
    int32_t mn[8][QK_PANEL_ROWS];  /* two int16: coefficients of bsums[2p] and bsums[2p+1]; with
                                      32-element sub-blocks both are sub-block p's (tiles.h's 2x4
                                      tile relies on it to use bsums32) */
    float d[QK_PANEL_ROWS];
    float nd[QK_PANEL_ROWS]; /* -dmin */
} qk_panel256;

static inline int32_t qk_pair16(int a, int b) {
    return (int32_t)(((uint32_t)(uint16_t)(int16_t)b << 16) | (uint16_t)(int16_t)a);
}

/* ---------------------------------------------------------------- row by row (portable, NEON) */

/* Row i's unpacked bytes into the panel, in the build's layout. */
static inline void qk_panel_put(uint8_t (*q)[QK_PANEL_ROWS][4], int i, const uint8_t *u, int n) {
#if QK_TILES_X86 || QK_TILES_NEON
    for (int j = 0; j < n / 4; j++) memcpy(q[j][i], u + 4 * j, 4);
#else
    memcpy((uint8_t *)q + n * i, u, (size_t)n);
#endif
}

/* A 32-element type's row unpacker: block x -> u[32], d, m (see qk_panel32). */
typedef void (*qk_row32_fn)(const uint8_t *x, uint8_t u[32], float *d, float *m);
/* A 256-element type's row unpacker: block x -> u[256], and row i's scales in p. */
typedef void (*qk_row256_fn)(const uint8_t *x, uint8_t u[256], qk_panel256 *p, int i);

QK_TILE_INLINE void qk_pack32_rows(const uint8_t *const rp[8], size_t o, qk_panel32 *p, qk_row32_fn row) {
    uint8_t u[32];
    for (int i = 0; i < QK_PANEL_ROWS; i++) {
        row(rp[i] + o, u, &p->d[i], &p->m[i]);
        qk_panel_put(p->q, i, u, 32);
    }
}

QK_TILE_INLINE void qk_pack256_rows(const uint8_t *const rp[8], size_t o, qk_panel256 *p, qk_row256_fn row) {
    uint8_t u[256];
    for (int i = 0; i < QK_PANEL_ROWS; i++) {
        row(rp[i] + o, u, p, i);
        qk_panel_put(p->q, i, u, 256);
    }
}

#if defined(__AVX2__)
/* 8x8 transpose of 32-bit lanes: r[k] = row k  ->  c[d] = lane d of rows 0..7 (forward.h's key
 * tiles, gemv.h's parked sums). */
static inline void qk_transpose8x8(const __m256 *r, __m256 *c) {
    const __m256 t0 = _mm256_unpacklo_ps(r[0], r[1]), t1 = _mm256_unpackhi_ps(r[0], r[1]);
    const __m256 t2 = _mm256_unpacklo_ps(r[2], r[3]), t3 = _mm256_unpackhi_ps(r[2], r[3]);
    const __m256 t4 = _mm256_unpacklo_ps(r[4], r[5]), t5 = _mm256_unpackhi_ps(r[4], r[5]);
    const __m256 t6 = _mm256_unpacklo_ps(r[6], r[7]), t7 = _mm256_unpackhi_ps(r[6], r[7]);
    const __m256 s0 = _mm256_shuffle_ps(t0, t2, 0x44), s1 = _mm256_shuffle_ps(t0, t2, 0xEE);
    const __m256 s2 = _mm256_shuffle_ps(t1, t3, 0x44), s3 = _mm256_shuffle_ps(t1, t3, 0xEE);
    const __m256 s4 = _mm256_shuffle_ps(t4, t6, 0x44), s5 = _mm256_shuffle_ps(t4, t6, 0xEE);
    const __m256 s6 = _mm256_shuffle_ps(t5, t7, 0x44), s7 = _mm256_shuffle_ps(t5, t7, 0xEE);
    c[0] = _mm256_permute2f128_ps(s0, s4, 0x20);
    c[1] = _mm256_permute2f128_ps(s1, s5, 0x20);
    c[2] = _mm256_permute2f128_ps(s2, s6, 0x20);
    c[3] = _mm256_permute2f128_ps(s3, s7, 0x20);
    c[4] = _mm256_permute2f128_ps(s0, s4, 0x31);
    c[5] = _mm256_permute2f128_ps(s1, s5, 0x31);
    c[6] = _mm256_permute2f128_ps(s2, s6, 0x31);
    c[7] = _mm256_permute2f128_ps(s3, s7, 0x31);
}
#endif

/* ---------------------------------------------------------------- x86: eight rows at once */

#if QK_TILES_X86
/* Bytes p0[0..15] in the low 128-bit lane, p1[0..15] in the high one. */
static inline __m256i qk_load_2x128(const uint8_t *p0, const uint8_t *p1) {
    return _mm256_inserti128_si256(_mm256_castsi128_si256(_mm_loadu_si128((const __m128i *)p0)),
                                   _mm_loadu_si128((const __m128i *)p1), 1);
}

/* From 16 bytes at offset off of each of the 8 rows: g[k] = the 4-byte group k of rows 0..7
 * (a 4x4 transpose of 32-bit words in each 128-bit lane, rows i and i+4 sharing a register). */
static inline void qk_groups4(const uint8_t *const rp[8], size_t off, __m256i g[4]) {
    const __m256i r0 = qk_load_2x128(rp[0] + off, rp[4] + off);
    const __m256i r1 = qk_load_2x128(rp[1] + off, rp[5] + off);
    const __m256i r2 = qk_load_2x128(rp[2] + off, rp[6] + off);
    const __m256i r3 = qk_load_2x128(rp[3] + off, rp[7] + off);
    const __m256i t0 = _mm256_unpacklo_epi32(r0, r1), t1 = _mm256_unpackhi_epi32(r0, r1);
    const __m256i t2 = _mm256_unpacklo_epi32(r2, r3), t3 = _mm256_unpackhi_epi32(r2, r3);
    g[0] = _mm256_unpacklo_epi64(t0, t2);
    g[1] = _mm256_unpackhi_epi64(t0, t2);
    g[2] = _mm256_unpacklo_epi64(t1, t3);
    g[3] = _mm256_unpackhi_epi64(t1, t3);
}

/* Eight 4-byte groups of 32 bytes at offset off of each row: g[k] holds group k of rows 0..7. */
static inline void qk_groups8(const uint8_t *const rp[8], size_t off, __m256i g[8]) {
    qk_groups4(rp, off, g);
    qk_groups4(rp, off + 16, g + 4);
}

/* The 4 bytes at offset off of each row, as the 8 lanes. */
static inline __m256i qk_gather_u32(const uint8_t *const rp[8], size_t off) {
    __m128i v[8];
    for (int i = 0; i < 8; i++) v[i] = _mm_cvtsi32_si128((int)qk_load_u32(rp[i] + off));
    const __m128i a = _mm_unpacklo_epi64(_mm_unpacklo_epi32(v[0], v[1]), _mm_unpacklo_epi32(v[2], v[3]));
    const __m128i b = _mm_unpacklo_epi64(_mm_unpacklo_epi32(v[4], v[5]), _mm_unpacklo_epi32(v[6], v[7]));
    return _mm256_set_m128i(b, a);
}

/* Lanes holding two f16 (lo, hi) -> the 8 low halves and the 8 high halves as floats. */
static inline void qk_split_f16x2(__m256i v, __m256 *lo, __m256 *hi) {
    const __m256i order = _mm256_setr_epi8(0, 1, 4, 5, 8, 9, 12, 13, 2, 3, 6, 7, 10, 11, 14, 15,
                                           0, 1, 4, 5, 8, 9, 12, 13, 2, 3, 6, 7, 10, 11, 14, 15);
    const __m256i h = _mm256_permute4x64_epi64(_mm256_shuffle_epi8(v, order), _MM_SHUFFLE(3, 1, 2, 0));
    *lo = _mm256_cvtph_ps(_mm256_castsi256_si128(h));
    *hi = _mm256_cvtph_ps(_mm256_extracti128_si256(h, 1));
}

/* w . a as eight int32 lanes, for a wide type's panel bytes (quant_types.def group 0): unsigned
 * on AVX-512; signed on AVX2 (QK_WIDE_SIGNED), |w| moved onto a's sign (|w| <= 128, |a| <= 127:
 * a pair of products stays below 32767). */
static inline __m256i qk_dot32_wide(__m256i w, __m256i a) {
#if QK_TILES_X86 == 2
    return _mm256_dpbusd_epi32(_mm256_setzero_si256(), w, a);
#else
    const __m256i p = _mm256_maddubs_epi16(_mm256_sign_epi8(w, w), _mm256_sign_epi8(a, w));
    return _mm256_madd_epi16(p, _mm256_set1_epi16(1));
#endif
}

static inline void qk_store_q(uint8_t *dst, __m256i v) { _mm256_store_si256((__m256i *)dst, v); }

/* ggml's 4 + 2-bit layout (Q6_K's ql/qh, Q3_K's scales) to four registers of 6-bit values:
 * q[0], q[1] = the low nibbles of lo0, lo1 and q[2], q[3] their high nibbles, each byte j with
 * bits 0-1, 2-3, 4-5, 6-7 (in that order) of hi's byte j as its bits 4-5. */
static inline void qk_nibbles_2bits(__m256i lo0, __m256i lo1, __m256i hi, __m256i q[4]) {
    const __m256i m4 = _mm256_set1_epi8(0x0f), m3 = _mm256_set1_epi8(0x03);
    q[0] = _mm256_or_si256(_mm256_and_si256(lo0, m4), _mm256_slli_epi16(_mm256_and_si256(hi, m3), 4));
    q[1] = _mm256_or_si256(_mm256_and_si256(lo1, m4), _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(hi, 2), m3), 4));
    q[2] = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(lo0, 4), m4),
                           _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(hi, 4), m3), 4));
    q[3] = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(lo1, 4), m4),
                           _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(hi, 6), m3), 4));
}

/* Eight vectors of 8 int32 -> one: lane i = the sum of v[i]'s lanes. */
static inline __m256i qk_rows_sum8(const __m256i v[8]) {
    const __m256i p0 = _mm256_add_epi32(_mm256_unpacklo_epi32(v[0], v[1]), _mm256_unpackhi_epi32(v[0], v[1]));
    const __m256i p1 = _mm256_add_epi32(_mm256_unpacklo_epi32(v[2], v[3]), _mm256_unpackhi_epi32(v[2], v[3]));
    const __m256i p2 = _mm256_add_epi32(_mm256_unpacklo_epi32(v[4], v[5]), _mm256_unpackhi_epi32(v[4], v[5]));
    const __m256i p3 = _mm256_add_epi32(_mm256_unpacklo_epi32(v[6], v[7]), _mm256_unpackhi_epi32(v[6], v[7]));
    /* per 128-bit half: partial sums of v0..v3 (q0) and v4..v7 (q1) */
    const __m256i q0 = _mm256_add_epi32(_mm256_unpacklo_epi64(p0, p1), _mm256_unpackhi_epi64(p0, p1));
    const __m256i q1 = _mm256_add_epi32(_mm256_unpacklo_epi64(p2, p3), _mm256_unpackhi_epi64(p2, p3));
    return _mm256_add_epi32(_mm256_permute2x128_si256(q0, q1, 0x20), _mm256_permute2x128_si256(q0, q1, 0x31));
}

#endif /* QK_TILES_X86 */

/* ---------------------------------------------------------------- NEON: eight rows at once */

#if QK_TILES_NEON
/* From 16 bytes at offset off of each row: g[k] holds the 4-byte group k of rows 0..3, h[k]
 * that of rows 4..7 (a 4x4 transpose of 32-bit words): the two halves of panel quad k. */
static inline void qk_groups4_neon(const uint8_t *const rp[8], size_t off, uint8x16_t g[4], uint8x16_t h[4]) {
    for (int half = 0; half < 2; half++) {
        const uint8_t *const *r = rp + 4 * half;
        const uint32x4_t r0 = vreinterpretq_u32_u8(vld1q_u8(r[0] + off)), r1 = vreinterpretq_u32_u8(vld1q_u8(r[1] + off));
        const uint32x4_t r2 = vreinterpretq_u32_u8(vld1q_u8(r[2] + off)), r3 = vreinterpretq_u32_u8(vld1q_u8(r[3] + off));
        const uint64x2_t t0 = vreinterpretq_u64_u32(vtrn1q_u32(r0, r1)), t1 = vreinterpretq_u64_u32(vtrn2q_u32(r0, r1));
        const uint64x2_t t2 = vreinterpretq_u64_u32(vtrn1q_u32(r2, r3)), t3 = vreinterpretq_u64_u32(vtrn2q_u32(r2, r3));
        uint8x16_t *o = half ? h : g;
        o[0] = vreinterpretq_u8_u64(vtrn1q_u64(t0, t2));
        o[1] = vreinterpretq_u8_u64(vtrn1q_u64(t1, t3));
        o[2] = vreinterpretq_u8_u64(vtrn2q_u64(t0, t2));
        o[3] = vreinterpretq_u8_u64(vtrn2q_u64(t1, t3));
    }
}

/* Eight groups of 32 bytes at offset off of each row. */
static inline void qk_groups8_neon(const uint8_t *const rp[8], size_t off, uint8x16_t g[8], uint8x16_t h[8]) {
    qk_groups4_neon(rp, off, g, h);
    qk_groups4_neon(rp, off + 16, g + 4, h + 4);
}

/* Panel quad q (32 bytes): rows 0-3, rows 4-7. */
static inline void qk_store_q_neon(uint8_t (*q)[4], uint8x16_t lo, uint8x16_t hi) {
    vst1q_u8(q[0], lo);
    vst1q_u8(q[4], hi);
}

/* v >> n (or << n for negative n) in each byte, n known only at run time. */
static inline uint8x16_t qk_shr_u8(uint8x16_t v, int n) { return vshlq_u8(v, vdupq_n_s8((int8_t)-n)); }
#endif

#endif
