/* The tile path for types whose blocks are unpacked one row at a time (the IQ grids, the
 * ternary types, MXFP4): a type's unpack routine writes one block of one row as unsigned bytes
 * u in natural element order, plus that row's scales into lane i of a panel of
 * quants_tiles.h, so that
 *     256-element types:  x = d * sc_s * u - (-nd) * (coefficient of the sub-block's bsums)
 *     32-element types:   x = d * u + m
 * These drivers lay eight unpacked rows into the panel (x86: the interleaved layout, by the
 * same 4x4 transposes the K-quants use; portable: natural order), run qk_panel_mul, and give
 * the per-row dot, which is the reference the tests hold the tiles to: same integer sums, same
 * scales.
 */
#ifndef QPACK_TYPES_PANEL_UNPACK_H
#define QPACK_TYPES_PANEL_UNPACK_H

#include "../quants_tiles.h"
#include "iq_tables.h"

/* One block of one row: elements as u[0..255] (or u[0..31]), scales into lane i of p. */
typedef void (*qk_unpack256_fn)(const uint8_t *x, uint8_t *u, qk_panel256 *p, int i);
typedef void (*qk_unpack32_fn)(const uint8_t *x, uint8_t *u, qk_panel32 *p, int i);

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
/* 32 bytes off + g_k, or off - g_k where bit k of signs is set, stored at u (the x86 form of
 * qk_signed_offset8 for four groups at once). */
static inline void qk_store_signed32(uint8_t *u, __m256i g, uint32_t signs, char off) {
    const __m256i m = qk_bits_to_bytes32(signs);
    const __m256i v = _mm256_sub_epi8(_mm256_xor_si256(g, m), m);
    _mm256_storeu_si256((__m256i *)u, _mm256_add_epi8(v, _mm256_set1_epi8(off)));
}

/* Four 8-byte grid rows as one vector, in order. */
static inline __m256i qk_grid4x8(uint64_t g0, uint64_t g1, uint64_t g2, uint64_t g3) {
    return _mm256_set_epi64x((long long)g3, (long long)g2, (long long)g1, (long long)g0);
}

/* Eight natural-order rows of len bytes (a multiple of 16) into the interleaved q[j][i][4]. */
static inline void qk_lay_panel(const uint8_t *rows[8], int len, uint8_t (*q)[QK_PANEL_ROWS][4]) {
    for (int off = 0; off < len; off += 16) {
        __m256i g[4];
        qk_groups4(rows, (size_t)off, g);
        for (int k = 0; k < 4; k++) qk_store_q(q[off / 4 + k][0], g[k]);
    }
}
#endif

QK_TILE_INLINE void qk_pack256_unpacked(qk_unpack256_fn unpack, int bytes, const uint8_t *w,
                                        size_t row_bytes, int nr, int64_t nb, qk_panel256 *p) {
    const uint8_t *rp[8];
    qk_panel_rows(w, row_bytes, nr, rp);
#if QK_TILES_X86
    uint8_t tmp[8][256];
    const uint8_t *rows[8];
    for (int i = 0; i < 8; i++) rows[i] = tmp[i];
#endif
    for (int64_t b = 0; b < nb; b++) {
        const size_t o = (size_t)b * bytes;
#if QK_TILES_X86
        qk_prefetch_next_panel(rp, row_bytes, o);
        for (int i = 0; i < 8; i++) unpack(rp[i] + o, tmp[i], &p[b], i);
        qk_lay_panel(rows, 256, p[b].q);
#else
        for (int i = 0; i < 8; i++) unpack(rp[i] + o, (uint8_t *)p[b].q + 256 * i, &p[b], i);
#endif
    }
}

QK_TILE_INLINE void qk_pack32_unpacked(qk_unpack32_fn unpack, int bytes, const uint8_t *w,
                                       size_t row_bytes, int nr, int64_t nb, qk_panel32 *p) {
    const uint8_t *rp[8];
    qk_panel_rows(w, row_bytes, nr, rp);
#if QK_TILES_X86
    uint8_t tmp[8][32];
    const uint8_t *rows[8];
    for (int i = 0; i < 8; i++) rows[i] = tmp[i];
#endif
    for (int64_t b = 0; b < nb; b++) {
        const size_t o = (size_t)b * bytes;
#if QK_TILES_X86
        qk_prefetch_next_panel(rp, row_bytes, o);
        for (int i = 0; i < 8; i++) unpack(rp[i] + o, tmp[i], &p[b], i);
        qk_lay_panel(rows, 32, p[b].q);
#else
        for (int i = 0; i < 8; i++) unpack(rp[i] + o, (uint8_t *)p[b].q + 32 * i, &p[b], i);
#endif
    }
}

/* The per-row product with the tile's arithmetic (quants_tiles.h), lane 0 of a one-row panel. */
QK_TILE_INLINE float qk_dot_unpacked256(qk_unpack256_fn unpack, int bytes, int sub, int64_t n,
                                        const uint8_t *w, const qk_act_q8_256 *a) {
    qk_panel256 p;
    uint8_t u[256];
    float acc = 0.0f;
    for (int64_t b = 0; b < n / 256; b++) {
        unpack(w + b * bytes, u, &p, 0);
        int32_t tot = 0, mins = 0;
        for (int s = 0; s < 256 / sub; s++)
            tot += (sub == 32 ? qk_sum_u8s8(u + 32 * s, a[b].qs + 32 * s, 32)
                              : qk_sum_u8s8(u + 16 * s, a[b].qs + 16 * s, 16)) * p.sc[s][0];
        for (int q = 0; q < 8; q++) {
            const int32_t c = p.mn[q][0];
            mins += (int16_t)(c & 0xffff) * a[b].bsums[2 * q] + (int16_t)(c >> 16) * a[b].bsums[2 * q + 1];
        }
        acc = acc + (p.d[0] * a[b].d) * (float)tot;
        acc = acc + (p.nd[0] * a[b].d) * (float)mins;
    }
    return acc;
}

QK_TILE_INLINE float qk_dot_unpacked32(qk_unpack32_fn unpack, int bytes, int64_t n,
                                       const uint8_t *w, const qk_act_q8_32 *a) {
    qk_panel32 p;
    uint8_t u[32];
    float acc = 0.0f;
    for (int64_t b = 0; b < n / 32; b++) {
        unpack(w + b * bytes, u, &p, 0);
        acc = acc + (p.d[0] * a[b].d) * (float)qk_sum_u8s8(u, a[b].qs, 32);
        acc = acc + p.m[0] * a[b].s;
    }
    return acc;
}

/* gemm and dot of a type from its unpack routine. sub: sub-block of one integer scale (16 or
 * 32); group: AVX2's int16 grouping of maddubs results (group * 2 * max(u) * 127 < 32768). */
#define QK_UNPACKED_KERNELS256(name, unpack, BYTES, sub, group)                                       \
    QK_TILE_INLINE void qk_pack_##name(const uint8_t *w, size_t row_bytes, int nr, int64_t nb, qk_panel256 *p) { \
        qk_pack256_unpacked(unpack, BYTES, w, row_bytes, nr, nb, p);                                  \
    }                                                                                                \
    QK_PACKED_KERNELS256(name, unpack, qk_pack_##name, BYTES, sub, group)

/* The same with the type's own pack (eight rows straight from the blocks into the panel). */
#define QK_PACKED_KERNELS256(name, unpack, pack, BYTES, sub, group)                                  \
    static void qk_gemm_##name(int64_t n, const uint8_t *w, size_t row_bytes, int64_t nr,            \
                               const uint8_t *act, size_t act_stride, int64_t nt, float *out,        \
                               int64_t ldo, void *scratch) {                                         \
        qk_panel256 *p = (qk_panel256 *)scratch;                                                     \
        for (int64_t r = 0; r < nr; r += QK_PANEL_ROWS) {                                            \
            const int rows = nr - r < QK_PANEL_ROWS ? (int)(nr - r) : QK_PANEL_ROWS;                \
            pack(w + (size_t)r * row_bytes, row_bytes, rows, n / 256, p);                            \
            qk_panel_mul(p, 256, sub, group, n / 256, rows, act, act_stride, nt, out + r, ldo);      \
        }                                                                                            \
    }                                                                                                \
    static float qk_dot_##name(int64_t n, const void *restrict w, const void *restrict act) {       \
        return qk_dot_unpacked256(unpack, BYTES, sub, n, (const uint8_t *)w, (const qk_act_q8_256 *)act); \
    }

#define QK_UNPACKED_KERNELS32(name, unpack, pack, BYTES, group)                                        \
    static void qk_gemm_##name(int64_t n, const uint8_t *w, size_t row_bytes, int64_t nr,            \
                               const uint8_t *act, size_t act_stride, int64_t nt, float *out,        \
                               int64_t ldo, void *scratch) {                                         \
        qk_panel32 *p = (qk_panel32 *)scratch;                                                       \
        for (int64_t r = 0; r < nr; r += QK_PANEL_ROWS) {                                            \
            const int rows = nr - r < QK_PANEL_ROWS ? (int)(nr - r) : QK_PANEL_ROWS;                \
            pack(w + (size_t)r * row_bytes, row_bytes, rows, n / 32, p);                             \
            qk_panel_mul(p, 32, 32, group, n / 32, rows, act, act_stride, nt, out + r, ldo);         \
        }                                                                                            \
    }                                                                                                \
    static float qk_dot_##name(int64_t n, const void *restrict w, const void *restrict act) {       \
        return qk_dot_unpacked32(unpack, BYTES, n, (const uint8_t *)w, (const qk_act_q8_32 *)act); \
    }

/* Compile-time check of a block struct's size (C99: a negative array size fails). */
#define QK_BLOCK_SIZE_IS(type, bytes) typedef char qk_size_check_##type[sizeof(type) == (bytes) ? 1 : -1]

#endif
