/* What the grid, ternary and MXFP4 files (iq1.h, iq2.h, iq3.h, tq.h, mxfp4.h) share.
 *
 * Their blocks are unpacked one row at a time by a row unpacker of panel.h's signature
 * (qk_row256_fn / qk_row32_fn): one block of one row as unsigned bytes u in natural element
 * order, plus that row's scales, so that
 *     256-element types:  x = d * sc_s * u + nd * (coefficient of the sub-block's bsums)
 *     32-element types:   x = d * u + m
 * All their u stay below 128 (narrow types: unsigned for vpdpbusd and maddubs, and valid as the
 * signed bytes NEON's sdot reads). The x86 and NEON packs unpack eight rows into a buffer (the
 * row unpackers' SIMD branches) and lay it into the interleaved panel with the 4x4 transposes of
 * panel.h; the portable build writes the rows through qk_pack256_rows / qk_pack32_rows. The
 * per-row dot (the traits' reference) runs the tile's arithmetic on one unpacked row. On x86,
 * one token (decode) skips the panel (qk_decode256 below).
 */
#ifndef QPACK_TYPES_PANEL_UNPACK_H
#define QPACK_TYPES_PANEL_UNPACK_H

#include "../panel.h"
#include "iq_tables.h"

/* Byte k = 0xff where bit k of bits is set, else 0. */
static inline uint64_t qk_bits_to_mask8(uint32_t bits) {
    uint64_t x = ((uint64_t)(bits & 0xff) * 0x0101010101010101ull) & 0x8040201008040201ull;
    x = ((x + 0x7f7f7f7f7f7f7f7full) | x) & 0x8080808080808080ull; /* top bit where nonzero */
    return (x >> 7) * 0xff;
}

/* Eight bytes off + g_k, or off - g_k where bit k of signs is set (g_k <= off, off + g_k < 256:
 * no carry or borrow crosses a byte). */
static inline uint64_t qk_signed_offset8(uint64_t g, uint32_t signs, uint64_t off8) {
    const uint64_t m = qk_bits_to_mask8(signs);
    return ((off8 + g) & ~m) | ((off8 - g) & m);
}

/* (grid types) qk_ksigns[i] as a byte mask: byte k is 0xff where bit k of i is set, byte 7
 * where i has odd parity. */
#define QK_KS_BIT(i, k) ((((i) >> (k)) & 1) ? 0xffull << (8 * (k)) : 0ull)
#define QK_KS_PAR(i) ((((i) ^ (i) >> 1 ^ (i) >> 2 ^ (i) >> 3 ^ (i) >> 4 ^ (i) >> 5 ^ (i) >> 6) & 1) ? 0xffull << 56 : 0ull)
#define QK_KS(i) (QK_KS_BIT(i, 0) | QK_KS_BIT(i, 1) | QK_KS_BIT(i, 2) | QK_KS_BIT(i, 3) | QK_KS_BIT(i, 4) | \
                  QK_KS_BIT(i, 5) | QK_KS_BIT(i, 6) | QK_KS_PAR(i))
#define QK_KS4(i) QK_KS(i), QK_KS((i) + 1), QK_KS((i) + 2), QK_KS((i) + 3)
#define QK_KS16(i) QK_KS4(i), QK_KS4((i) + 4), QK_KS4((i) + 8), QK_KS4((i) + 12)
static const uint64_t qk_ksigns_mask[128] = {QK_KS16(0),  QK_KS16(16), QK_KS16(32), QK_KS16(48),
                                             QK_KS16(64), QK_KS16(80), QK_KS16(96), QK_KS16(112)};

/* (grid types) The four ksigns bytes of the 7-bit indices in bits 0..27 of aux, as one u32:
 * ksigns[i] is i with bit 7 = the parity of i, computed here without the table (fewer
 * instructions than four lookups; the tests hold both to gguf). */
static inline uint32_t qk_ksigns4(uint32_t aux) {
    const uint32_t x = (aux & 0x7f) | (aux & 0x3f80) << 1 | (aux & 0x1fc000) << 2 | (aux & 0xfe00000) << 3;
    uint32_t p = x ^ (x >> 4); /* bit 0 of each byte ends as the parity of that byte */
    p ^= p >> 2;
    p ^= p >> 1;
    return x | (p & 0x01010101u) << 7;
}

static inline void qk_store_u64(uint8_t *p, uint64_t v) { memcpy(p, &v, 8); }

/* Dequantization of the grid types: eight values db * grid_k, negated where bit k of signs is
 * set (gguf-py multiplies by the sign after the scale: -(db * g) exactly). */
QK_NO_CONTRACT static inline void qk_iq_grid8_to_f32(float db, uint64_t g, uint32_t signs, float *y) {
    QK_NO_CONTRACT_BODY
    for (int k = 0; k < 8; k++) {
        const float v = db * (float)((g >> (8 * k)) & 0xff);
        y[k] = (signs >> k) & 1 ? -v : v;
    }
}

#if QK_TILES_X86
/* 0x80 in each byte of x (values < 128) with an odd number of bits set, else 0. */
static inline __m256i qk_parity7_bytes(__m256i x) {
    const __m256i odd = _mm256_setr_epi8(0, -128, -128, 0, -128, 0, 0, -128, -128, 0, 0, -128, 0, -128, -128, 0,
                                         0, -128, -128, 0, -128, 0, 0, -128, -128, 0, 0, -128, 0, -128, -128, 0);
    const __m256i lo4 = _mm256_set1_epi8(0x0f);
    return _mm256_xor_si256(_mm256_shuffle_epi8(odd, _mm256_and_si256(x, lo4)),
                            _mm256_shuffle_epi8(odd, _mm256_and_si256(_mm256_srli_epi16(x, 4), lo4)));
}

/* 32 bits -> 32 bytes, byte j = 0xff where bit j is set. */
static inline __m256i qk_bits_to_bytes32(uint32_t bits) {
#if defined(__AVX512BW__) && defined(__AVX512VL__)
    return _mm256_movm_epi8((__mmask32)bits);
#else
    const __m256i shuf = _mm256_setr_epi8(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1,
                                          2, 2, 2, 2, 2, 2, 2, 2, 3, 3, 3, 3, 3, 3, 3, 3);
    const __m256i b = _mm256_shuffle_epi8(_mm256_set1_epi32((int)bits), shuf);
    const __m256i bitmask = _mm256_set1_epi64x((long long)0x8040201008040201ull);
    return _mm256_cmpeq_epi8(_mm256_and_si256(b, bitmask), bitmask);
#endif
}

/* 32 bytes off + g_k, or off - g_k where byte k of m is 0xff (the x86 form of
 * qk_signed_offset8 for four groups at once), from a byte mask or from bits. */
static inline __m256i qk_signed32_mask(__m256i g, __m256i m, char off) {
    return _mm256_add_epi8(_mm256_sub_epi8(_mm256_xor_si256(g, m), m), _mm256_set1_epi8(off));
}

static inline __m256i qk_signed32(__m256i g, uint32_t signs, char off) {
    return qk_signed32_mask(g, qk_bits_to_bytes32(signs), off);
}

static inline void qk_store_signed32(uint8_t *u, __m256i g, uint32_t signs, char off) {
    _mm256_storeu_si256((__m256i *)u, qk_signed32(g, signs, off));
}

/* Four 8-byte grid rows as one vector, in order. */
static inline __m256i qk_grid4x8(uint64_t g0, uint64_t g1, uint64_t g2, uint64_t g3) {
    return _mm256_set_epi64x((long long)g3, (long long)g2, (long long)g1, (long long)g0);
}

/* The sign bytes of the 7-bit ksigns indices in bits 0..27 of aux as a byte mask: four table
 * rows (qk_ksigns_mask) cost fewer instructions than the parity of qk_ksigns4 and a bit
 * expansion. */
static inline __m256i qk_ksigns_mask4(uint32_t aux) {
    return qk_grid4x8(qk_ksigns_mask[aux & 127], qk_ksigns_mask[(aux >> 7) & 127], qk_ksigns_mask[(aux >> 14) & 127],
                      qk_ksigns_mask[(aux >> 21) & 127]);
}

/* Eight natural-order rows of len bytes (a multiple of 16) into the interleaved q[j][i][4]. */
static inline void qk_lay_panel(const uint8_t *const rows[8], int len, uint8_t (*q)[QK_PANEL_ROWS][4]) {
    for (int off = 0; off < len; off += 16) {
        __m256i g[4];
        qk_groups4(rows, (size_t)off, g);
        for (int k = 0; k < 4; k++) qk_store_q(q[off / 4 + k][0], g[k]);
    }
}
#endif

#if QK_TILES_NEON
/* 16 bits -> 16 bytes, byte k = 0xff where bit k is set. */
static inline uint8x16_t qk_bits_to_bytes16_neon(uint32_t bits) {
    const uint8x16_t b = vcombine_u8(vdup_n_u8((uint8_t)bits), vdup_n_u8((uint8_t)(bits >> 8)));
    return vtstq_u8(b, vreinterpretq_u8_u64(vdupq_n_u64(0x8040201008040201ull)));
}

/* Two 8-byte grid rows as one vector, in order. */
static inline uint8x16_t qk_grid2x8_neon(uint64_t g0, uint64_t g1) { return vcombine_u8(vcreate_u8(g0), vcreate_u8(g1)); }

/* 16 bytes off + g_k, or off - g_k where bit k of signs is set, stored at u (the NEON form of
 * qk_signed_offset8 for two groups at once). */
static inline void qk_store_signed16_neon(uint8_t *u, uint8x16_t g, uint32_t signs, uint8_t off) {
    const uint8x16_t m = qk_bits_to_bytes16_neon(signs);
    vst1q_u8(u, vaddq_u8(vsubq_u8(veorq_u8(g, m), m), vdupq_n_u8(off)));
}

/* Eight natural-order rows of len bytes (a multiple of 16) into the interleaved q[j][i][4]. */
static inline void qk_lay_panel_neon(const uint8_t *const rows[8], int len, uint8_t (*q)[QK_PANEL_ROWS][4]) {
    for (int off = 0; off < len; off += 16) {
        uint8x16_t g[4], h[4];
        qk_groups4_neon(rows, (size_t)off, g, h);
        for (int k = 0; k < 4; k++) qk_store_q_neon(q[off / 4 + k], g[k], h[k]);
    }
}
#endif

#if QK_TILES_X86
/* ---------------------------------------------------------------- x86 decode without a panel
 *
 * Decode (one token) meets each panel once, so building it costs more than it saves: there the
 * types below skip it. A type's block product qk_fused_<name>(blk, a, &tot, &mins) returns the
 * panel's d of its row and the two exact integers the panel path computes for that block,
 *     tot = sum_s sc_s * (u_s . a_s),   mins = sum_q mn_q . bsums
 * (u the panel bytes, made the same way as for the panel, in registers), and qk_decode256 does
 * the tile's two fma per block (tiles.h): a (row, token) result is the same bits in decode as in
 * any batch (tests/test_quants_iq.py holds them to it). */
typedef float (*qk_fused256_fn)(const uint8_t *blk, const qk_act_q8_256 *a, int32_t *tot, int32_t *mins);

static inline int32_t qk_hsum_epi32(__m256i v) {
    __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
    s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4e));
    s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0xb1));
    return _mm_cvtsi128_si32(s);
}

/* A block's sums in the making: sc . (u . a) per lane, and the sub-block scales as int16 (16
 * elements each) for the bsums term at the end. */
typedef struct {
    __m256i dot;
    uint32_t sc[8];
} qk_fused_sums;

/* Chunk c (elements 32 c..) of the block: its u . a times the scale sc (u < 128 and |a| <= 127:
 * maddubs' pair sums stay below 32768). */
static inline void qk_fused_add32(qk_fused_sums *s, int c, __m256i u, const qk_act_q8_256 *a, int sc) {
    const __m256i p = _mm256_maddubs_epi16(u, _mm256_loadu_si256((const __m256i *)(a->qs + 32 * c)));
    s->dot = _mm256_add_epi32(s->dot, _mm256_madd_epi16(p, _mm256_set1_epi16((short)sc)));
    s->sc[c] = (uint32_t)sc * 0x10001u;
}

/* The same with elements 0-15 of the chunk times sc0, 16-31 times sc1. */
static inline void qk_fused_add16(qk_fused_sums *s, int c, __m256i u, const qk_act_q8_256 *a, int sc0, int sc1) {
    const uint32_t pair = (uint32_t)sc0 | (uint32_t)sc1 << 16;
    const __m256i spread = _mm256_setr_epi8(0, 1, 0, 1, 0, 1, 0, 1, 0, 1, 0, 1, 0, 1, 0, 1,
                                            2, 3, 2, 3, 2, 3, 2, 3, 2, 3, 2, 3, 2, 3, 2, 3);
    const __m256i p = _mm256_maddubs_epi16(u, _mm256_loadu_si256((const __m256i *)(a->qs + 32 * c)));
    const __m256i scv = _mm256_shuffle_epi8(_mm256_set1_epi32((int)pair), spread);
    s->dot = _mm256_add_epi32(s->dot, _mm256_madd_epi16(p, scv));
    s->sc[c] = pair;
}

/* tot, and mins = off * (scales . bsums): the panel's bsums coefficients are off * sc. */
static inline void qk_fused_end(const qk_fused_sums *s, const qk_act_q8_256 *a, int off, int32_t *tot,
                                int32_t *mins) {
    const __m256i sb = _mm256_madd_epi16(_mm256_loadu_si256((const __m256i *)s->sc),
                                         _mm256_loadu_si256((const __m256i *)a->bsums));
    *tot = qk_hsum_epi32(s->dot);
    *mins = off * qk_hsum_epi32(sb);
}

/* out[r] = W[r] . a for r < nr, one block product per super-block, the tile's arithmetic. */
QK_TILE_INLINE void qk_decode256(qk_fused256_fn fused, int bytes, int64_t n, const uint8_t *w, size_t row_bytes,
                                 int64_t nr, const qk_act_q8_256 *a, float *out) {
    for (int64_t r = 0; r < nr; r++) {
        const uint8_t *x = w + (size_t)r * row_bytes;
        float acc = 0.0f;
        for (int64_t b = 0; b < n / 256; b++) {
            int32_t tot, mins;
            const float d = fused(x + b * bytes, a + b, &tot, &mins), nd = -d;
            acc = fmaf(d * a[b].d, (float)tot, acc);
            acc = fmaf(nd * a[b].d, (float)mins, acc);
        }
        out[r] = acc;
    }
}

/* The decode entry tiles.h's gemm calls for one token; the type's file also defines
 * QK_HAS_DECODE_<name> as 1. Not inlined into the gemm: there gcc runs out of registers and
 * parks the grid indices in vector registers (a quarter more instructions per chunk). */
#if defined(_MSC_VER) && !defined(__clang__)
#define QK_NOINLINE __declspec(noinline)
#else
#define QK_NOINLINE __attribute__((noinline))
#endif
#define QK_DECODE256(name, fused, BYTES)                                                              \
    QK_NOINLINE static void qk_decode_##name(int64_t n, const uint8_t *w, size_t row_bytes, int64_t nr, const uint8_t *act, \
                                 float *out, void *scratch) {                                         \
        (void)scratch;                                                                                \
        qk_decode256(fused, BYTES, n, w, row_bytes, nr, (const qk_act_q8_256 *)act, out);           \
    }
#endif

/* One block of eight rows into the panel, through the type's row unpacker: SIMD builds unpack
 * the eight rows side by side, then transpose them into the panel 16 bytes at a time. */
QK_TILE_INLINE void qk_pack256_unpacked(const uint8_t *const rp[8], size_t o, qk_panel256 *p, qk_row256_fn unpack) {
#if QK_TILES_X86 || QK_TILES_NEON
    uint8_t tmp[8][256];
    const uint8_t *const rows[8] = {tmp[0], tmp[1], tmp[2], tmp[3], tmp[4], tmp[5], tmp[6], tmp[7]};
    for (int i = 0; i < 8; i++) unpack(rp[i] + o, tmp[i], p, i);
#if QK_TILES_X86
    qk_lay_panel(rows, 256, p->q);
#else
    qk_lay_panel_neon(rows, 256, p->q);
#endif
#else
    qk_pack256_rows(rp, o, p, unpack);
#endif
}

static inline int32_t qk_unpacked_dot(const uint8_t *u, const int8_t *a, int n) {
    int32_t s = 0;
    for (int e = 0; e < n; e++) s += (int32_t)u[e] * a[e];
    return s;
}

/* The per-row product with the tile's arithmetic (tiles.h), lane 0 of a one-row panel. */
QK_TILE_INLINE float qk_dot_unpacked256(qk_row256_fn unpack, int bytes, int sub, int64_t n, const uint8_t *w,
                                        const qk_act_q8_256 *a) {
    qk_panel256 p;
    uint8_t u[256];
    float acc = 0.0f;
    for (int64_t b = 0; b < n / 256; b++) {
        unpack(w + b * bytes, u, &p, 0);
        int32_t tot = 0, mins = 0;
        for (int s = 0; s < 256 / sub; s++) /* constant lengths, so that the sums vectorize */
            tot += (sub == 32 ? qk_unpacked_dot(u + 32 * s, a[b].qs + 32 * s, 32)
                              : qk_unpacked_dot(u + 16 * s, a[b].qs + 16 * s, 16)) * p.sc[s][0];
        for (int q = 0; q < 8; q++) {
            const int32_t c = p.mn[q][0];
            mins += (int16_t)(c & 0xffff) * a[b].bsums[2 * q] + (int16_t)(c >> 16) * a[b].bsums[2 * q + 1];
        }
        acc = acc + (p.d[0] * a[b].d) * (float)tot;
        acc = acc + (p.nd[0] * a[b].d) * (float)mins;
    }
    return acc;
}

QK_TILE_INLINE float qk_dot_unpacked32(qk_row32_fn unpack, int bytes, int64_t n, const uint8_t *w,
                                       const qk_act_q8_32 *a) {
    uint8_t u[32];
    float acc = 0.0f, d, m;
    for (int64_t b = 0; b < n / 32; b++) {
        unpack(w + b * bytes, u, &d, &m);
        acc = acc + (d * a[b].d) * (float)qk_unpacked_dot(u, a[b].qs, 32);
        acc = acc + m * a[b].s;
    }
    return acc;
}

/* The reference dot of a 256-element type from its row unpacker (sub: 16 or 32 elements per
 * integer scale), and its pack when that goes through the unpacker too. */
#define QK_UNPACKED_DOT256(name, unpack, BYTES, sub)                                                  \
    static float qk_dot_##name(int64_t n, const void *restrict w, const void *restrict act) {       \
        return qk_dot_unpacked256(unpack, BYTES, sub, n, (const uint8_t *)w, (const qk_act_q8_256 *)act); \
    }
#define QK_UNPACKED_TYPE256(name, unpack, BYTES, sub)                                                 \
    QK_UNPACKED_DOT256(name, unpack, BYTES, sub)                                                      \
    static inline void qk_pack_##name(const uint8_t *const rp[8], size_t o, qk_panel256 *p) {        \
        qk_pack256_unpacked(rp, o, p, unpack);                                                        \
    }

/* Compile-time check of a block struct's size (C99: a negative array size fails). */
#define QK_BLOCK_SIZE_IS(type, bytes) typedef char qk_size_check_##type[sizeof(type) == (bytes) ? 1 : -1]

#endif
