/* Tiled products: a matrix of GGUF blocks times SEVERAL activation rows (prefill), or one
 * (decode), with the same arithmetic for both, so that a token's logits do not depend on the
 * batch it shares.
 *
 * The idea (llamafile's tinyBLAS reuses each unpacked weight block across tokens the same way):
 * eight weight rows at a time are unpacked ONCE into a "panel" - unsigned bytes, interleaved so
 * that one 256-bit vector holds the same four elements of the eight rows, plus the block scales
 * as float vectors - and then every token's activation meets that panel: per block, eight
 * vpdpbusd with the token's 4-byte groups broadcast give the eight rows' exact integer sums in
 * eight lanes (lanes = rows), scaled and accumulated in f32. No horizontal sums, no per-token
 * unpacking; tokens go four at a time to hide latencies.
 *
 * Per (row, token) the float arithmetic is fixed and the same in every path (1 or 4 tokens,
 * whichever rows share the panel), for the 32-element types:
 *     acc = fma(d_w * d_a, (float)isum, acc);  acc = fma(m_w, s_a, acc)     block by block
 * where isum = sum(u * q_a) is exact, x = d_w * u + m_w (Q4_0: m = -8 d, Q5_0: -16 d, Q8_0:
 * -128 d with u = q + 128), and s_a = d_a * sum(q_a) (qk_act_q8_32.s). For the 256-element types,
 * per super-block with integer sub-block scales sc and min coefficients mn:
 *     acc = fma(d_w * d_a, (float)sum(sc * isum_sub), acc);
 *     acc = fma(nd_w * d_a, (float)sum(mn * bsums), acc)                     nd = -dmin
 * The results match the per-row dot products (quants_legacy.h, quants_k.h) to float rounding;
 * tests/test_quants_tiles.py holds them to that and to exact batch invariance.
 *
 * Types: Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, IQ4_NL (Q8_32 activations), Q2_K..Q6_K, IQ4_XS (Q8_256).
 * Float weights have no tile kernel (traits.gemm = NULL): the forward pass uses their dot for
 * every batch. Q8_0's u = q + 128 and IQ4's u = value + 128 pass 127, which AVX2's maddubs cannot
 * take without saturating: the AVX2 build leaves those three to the dot path.
 */
#ifndef QPACK_QUANTS_TILES_H
#define QPACK_QUANTS_TILES_H

#include "quants_common.h"

#define QK_PANEL_ROWS 8

/* Inlined into each caller, so that constant arguments (token count, sub-block size) unroll. */
#if defined(__GNUC__) || defined(__clang__)
#define QK_TILE_INLINE static inline __attribute__((always_inline))
#else
#define QK_TILE_INLINE static __forceinline
#endif

#if defined(__AVX512F__) && defined(__AVX512VL__) && defined(__AVX512VNNI__)
#define QK_TILES_X86 2 /* vpdpbusd */
#elif defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#define QK_TILES_X86 1 /* maddubs + madd */
#else
#define QK_TILES_X86 0
#endif

/* qk_gemm_fn (quants.h): out[t * ldo + r] = W[r] . act[t] for r < nr, t < nt. */

/* One 32-element block of eight rows. */
typedef struct {
    uint8_t q[8][QK_PANEL_ROWS][4]; /* q[j][i]: elements 4j..4j+3 of row i, unsigned */
    float d[QK_PANEL_ROWS];
    float m[QK_PANEL_ROWS];
} qk_panel32;

/* One 256-element super-block of eight rows. */
typedef struct {
    uint8_t q[64][QK_PANEL_ROWS][4];
    int32_t sc[16][QK_PANEL_ROWS]; /* scale of sub-block s (16 elements; 32 for Q4_K/Q5_K) */
    int32_t mn[8][QK_PANEL_ROWS];  /* two int16: coefficients of bsums[2p] and bsums[2p+1] */
    float d[QK_PANEL_ROWS];
    float nd[QK_PANEL_ROWS]; /* -dmin */
} qk_panel256;

static size_t qk_gemm_scratch_bytes(int64_t n) {
    const size_t a = (size_t)(n / 32 + 1) * sizeof(qk_panel32);
    const size_t b = (size_t)(n / 256 + 1) * sizeof(qk_panel256);
    return a > b ? a : b;
}

/* Row pointers of a panel; rows past nr repeat the last one (their lanes are computed and
 * never stored). */
static inline void qk_panel_rows(const uint8_t *w, size_t row_bytes, int nr, const uint8_t *rp[8]) {
    for (int i = 0; i < QK_PANEL_ROWS; i++) rp[i] = w + row_bytes * (size_t)(i < nr ? i : nr - 1);
}

/* ================================================================ unpacking: portable */

/* The portable code keeps each row's unsigned bytes in natural order in the same storage
 * (row i at bytes 32i.. / 256i..): its per-row sums then vectorize with plain SSE2/NEON. The
 * arithmetic, not the layout, is what every path shares. */
static inline void qk_panel_put32(qk_panel32 *p, int i, const uint8_t u[32]) {
    memcpy((uint8_t *)p->q + 32 * i, u, 32);
}

static inline void qk_panel_put256(qk_panel256 *p, int i, const uint8_t u[256]) {
    memcpy((uint8_t *)p->q + 256 * i, u, 256);
}

QK_TILE_INLINE int32_t qk_sum_u8s8(const uint8_t *u, const int8_t *a, int n) {
    int32_t s = 0;
    for (int e = 0; e < n; e++) s += (int32_t)u[e] * a[e];
    return s;
}

/* ---------------------------------------------------------------- legacy types, portable */

/* u[j] = low nibble of qs[j], u[j + 16] = high nibble (+ 16 where bit j / j + 16 of qh is set). */
static inline void qk_u_q4(const uint8_t *qs, uint8_t u[32]) {
    for (int j = 0; j < 16; j++) {
        u[j] = qs[j] & 0x0f;
        u[j + 16] = qs[j] >> 4;
    }
}

static inline void qk_u_q5(const uint8_t *qh, const uint8_t *qs, uint8_t u[32]) {
    /* bit j of qh by a mask table: vectorizes without variable shifts (SSE2) */
    static const uint32_t bit[32] = {
        1u << 0,  1u << 1,  1u << 2,  1u << 3,  1u << 4,  1u << 5,  1u << 6,  1u << 7,
        1u << 8,  1u << 9,  1u << 10, 1u << 11, 1u << 12, 1u << 13, 1u << 14, 1u << 15,
        1u << 16, 1u << 17, 1u << 18, 1u << 19, 1u << 20, 1u << 21, 1u << 22, 1u << 23,
        1u << 24, 1u << 25, 1u << 26, 1u << 27, 1u << 28, 1u << 29, 1u << 30, 1u << 31};
    const uint32_t bits = qk_load_u32(qh);
    uint8_t h[32];
    for (int j = 0; j < 32; j++) h[j] = (bits & bit[j]) ? 16 : 0;
    qk_u_q4(qs, u);
    for (int j = 0; j < 32; j++) u[j] |= h[j];
}

/* IQ4 values + 128 (unsigned; the -128 goes to the min term). */
static const uint8_t qk_iq4_u[16] = {1, 24, 45, 63, 79, 93, 106, 118, 129, 141, 153, 166, 181, 197, 217, 241};

/* Q3_K's 16 six-bit scales, offset removed (-32..31). */
static inline void qk_q3_k_scales(const uint8_t *p, int sc[16]) {
    for (int i = 0; i < 16; i++) {
        const int lo = i < 8 ? p[i] & 0xf : p[i - 8] >> 4;
        const int hi = (p[8 + i % 4] >> (2 * (i / 4))) & 3;
        sc[i] = (lo | hi << 4) - 32;
    }
}

/* type: 0 Q4_0, 1 Q4_1, 2 Q5_0, 3 Q5_1, 4 Q8_0, 5 IQ4_NL */
static inline void qk_pack32_portable(int type, int bytes, const uint8_t *w, size_t row_bytes,
                                      int nr, int64_t nb, qk_panel32 *p) {
    const uint8_t *rp[8];
    qk_panel_rows(w, row_bytes, nr, rp);
    uint8_t u[32];
    for (int64_t b = 0; b < nb; b++)
        for (int i = 0; i < 8; i++) {
            const uint8_t *x = rp[i] + b * bytes;
            const float d = qk_fp16_to_fp32(qk_load_u16(x));
            float m;
            switch (type) {
            case 0: qk_u_q4(x + 2, u); m = -8.0f * d; break;
            case 1: qk_u_q4(x + 4, u); m = qk_fp16_to_fp32(qk_load_u16(x + 2)); break;
            case 2: qk_u_q5(x + 2, x + 6, u); m = -16.0f * d; break;
            case 3: qk_u_q5(x + 4, x + 8, u); m = qk_fp16_to_fp32(qk_load_u16(x + 2)); break;
            case 4:
                for (int j = 0; j < 32; j++) u[j] = (uint8_t)(x[2 + j] ^ 0x80); /* q + 128 */
                m = -128.0f * d;
                break;
            default:
                qk_u_q4(x + 2, u);
                for (int j = 0; j < 32; j++) u[j] = qk_iq4_u[u[j]];
                m = -128.0f * d;
                break;
            }
            qk_panel_put32(&p[b], i, u);
            p[b].d[i] = d;
            p[b].m[i] = m;
        }
}

/* ---------------------------------------------------------------- K-quants, portable */

/* Q4_K/Q5_K 6-bit scales and mins of the 8 sub-blocks (ggml's get_scale_min_k4). */
static inline void qk_k4_scale_min(const uint8_t *s, uint8_t sc[8], uint8_t mn[8]) {
    for (int j = 0; j < 4; j++) {
        sc[j] = s[j] & 63;
        mn[j] = s[j + 4] & 63;
        sc[j + 4] = (uint8_t)((s[j + 8] & 0x0f) | ((s[j] >> 6) << 4));
        mn[j + 4] = (uint8_t)((s[j + 8] >> 4) | ((s[j + 4] >> 6) << 4));
    }
}

static inline int32_t qk_pair16(int a, int b) {
    return (int32_t)(((uint32_t)(uint16_t)(int16_t)b << 16) | (uint16_t)(int16_t)a);
}

/* Scales of one row of a Q4_K/Q5_K super-block (block bytes 0..15 are d, dmin, scales). */
static inline void qk_k4_panel_scales(qk_panel256 *p, int i, const uint8_t *x) {
    uint8_t sc[8], mn[8];
    qk_k4_scale_min(x + 4, sc, mn);
    for (int s = 0; s < 8; s++) {
        p->sc[s][i] = sc[s];
        p->mn[s][i] = qk_pair16(mn[s], mn[s]); /* a 32-element sub-block covers bsums 2s, 2s+1 */
    }
    p->d[i] = qk_fp16_to_fp32(qk_load_u16(x));
    p->nd[i] = -qk_fp16_to_fp32(qk_load_u16(x + 2));
}

static inline void qk_q6_k_panel_scales(qk_panel256 *p, int i, const uint8_t *x) {
    const int8_t *sc = (const int8_t *)(x + 192);
    for (int s = 0; s < 16; s++) p->sc[s][i] = sc[s];
    for (int q = 0; q < 8; q++) p->mn[q][i] = qk_pair16(32 * sc[2 * q], 32 * sc[2 * q + 1]);
    const float d = qk_fp16_to_fp32(qk_load_u16(x + 208));
    p->d[i] = d;
    p->nd[i] = -d; /* x = d*sc*(q - 32) = d*sc*q - d*(32 sc) */
}

/* type: 0 Q4_K, 1 Q5_K, 2 Q6_K, 3 Q2_K, 4 Q3_K, 5 IQ4_XS */
static inline void qk_pack256_portable(int type, int bytes, const uint8_t *w, size_t row_bytes,
                                       int nr, int64_t nb, qk_panel256 *p) {
    const uint8_t *rp[8];
    qk_panel_rows(w, row_bytes, nr, rp);
    uint8_t u[256];
    for (int64_t b = 0; b < nb; b++)
        for (int i = 0; i < 8; i++) {
            const uint8_t *x = rp[i] + b * bytes;
            if (type == 2) {
                for (int h = 0; h < 2; h++) {
                    const uint8_t *ql = x + 64 * h, *qh = x + 128 + 32 * h;
                    uint8_t *o = u + 128 * h;
                    for (int l = 0; l < 32; l++) {
                        o[l] = (uint8_t)((ql[l] & 0xf) | ((qh[l] & 3) << 4));
                        o[32 + l] = (uint8_t)((ql[32 + l] & 0xf) | (((qh[l] >> 2) & 3) << 4));
                        o[64 + l] = (uint8_t)((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4));
                        o[96 + l] = (uint8_t)((ql[32 + l] >> 4) | (((qh[l] >> 6) & 3) << 4));
                    }
                }
                qk_q6_k_panel_scales(&p[b], i, x);
            } else if (type == 3 || type == 4) { /* Q2_K: qs at 16; Q3_K: hmask at 0, qs at 32 */
                const uint8_t *qs = x + (type == 3 ? 16 : 32);
                for (int h = 0; h < 2; h++)
                    for (int j = 0; j < 4; j++)
                        for (int l = 0; l < 32; l++) {
                            uint8_t q = (uint8_t)((qs[32 * h + l] >> (2 * j)) & 3);
                            if (type == 4) q |= (uint8_t)(((x[l] >> (4 * h + j)) & 1) << 2); /* q + 4 */
                            u[128 * h + 32 * j + l] = q;
                        }
                qk_panel256 *pb = &p[b];
                if (type == 3) {
                    for (int g = 0; g < 16; g++) pb->sc[g][i] = x[g] & 0xf;
                    for (int q = 0; q < 8; q++) pb->mn[q][i] = qk_pair16(x[2 * q] >> 4, x[2 * q + 1] >> 4);
                    pb->d[i] = qk_fp16_to_fp32(qk_load_u16(x + 80));
                    pb->nd[i] = -qk_fp16_to_fp32(qk_load_u16(x + 82));
                } else {
                    int sc[16];
                    qk_q3_k_scales(x + 96, sc);
                    for (int g = 0; g < 16; g++) pb->sc[g][i] = sc[g];
                    for (int q = 0; q < 8; q++) pb->mn[q][i] = qk_pair16(4 * sc[2 * q], 4 * sc[2 * q + 1]);
                    const float d = qk_fp16_to_fp32(qk_load_u16(x + 108));
                    pb->d[i] = d;
                    pb->nd[i] = -d; /* x = d*sc*(u - 4) */
                }
            } else if (type == 5) { /* IQ4_XS: d, scales_h, scales_l[4], qs[128] */
                const uint16_t sh = qk_load_u16(x + 2);
                for (int ib = 0; ib < 8; ib++) {
                    for (int j = 0; j < 16; j++) {
                        u[32 * ib + j] = qk_iq4_u[x[8 + 16 * ib + j] & 0xf];
                        u[32 * ib + 16 + j] = qk_iq4_u[x[8 + 16 * ib + j] >> 4];
                    }
                    const int ls = (((x[4 + ib / 2] >> (4 * (ib % 2))) & 0xf) | (((sh >> (2 * ib)) & 3) << 4)) - 32;
                    p[b].sc[ib][i] = ls;
                    p[b].mn[ib][i] = qk_pair16(128 * ls, 128 * ls);
                }
                const float d = qk_fp16_to_fp32(qk_load_u16(x));
                p[b].d[i] = d;
                p[b].nd[i] = -d; /* x = d*ls*(u - 128) */
            } else {
                const uint8_t *qs = x + (type == 0 ? 16 : 48), *qh = x + 16;
                for (int c = 0; c < 4; c++)
                    for (int l = 0; l < 32; l++) {
                        uint8_t lo = qs[32 * c + l] & 0xf, hi = qs[32 * c + l] >> 4;
                        if (type == 1) {
                            lo |= (uint8_t)(((qh[l] >> (2 * c)) & 1) << 4);
                            hi |= (uint8_t)(((qh[l] >> (2 * c + 1)) & 1) << 4);
                        }
                        u[64 * c + l] = lo;
                        u[64 * c + 32 + l] = hi;
                    }
                qk_k4_panel_scales(&p[b], i, x);
            }
            qk_panel_put256(&p[b], i, u);
        }
}

/* ================================================================ unpacking: x86 */

#if QK_TILES_X86
/* Bytes p0[0..15] in the low 128-bit lane, p1[0..15] in the high one. */
static inline __m256i qk_load_2x128(const uint8_t *p0, const uint8_t *p1) {
    return _mm256_inserti128_si256(_mm256_castsi128_si256(_mm_loadu_si128((const __m128i *)p0)),
                                   _mm_loadu_si128((const __m128i *)p1), 1);
}

/* From 16 bytes at offset off of each of the 8 rows: g[k] = the 4-byte group k of rows 0..7
 * (a 4x4 transpose of 32-bit words in each 128-bit lane, rows i and i+4 sharing a register). */
static inline void qk_groups4(const uint8_t *rp[8], size_t off, __m256i g[4]) {
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

/* The 4 bytes at offset off of each row, as the 8 lanes. */
static inline __m256i qk_gather_u32(const uint8_t *rp[8], size_t off) {
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

/* Bits k..k+3 of each lane's qh -> bit 4 of bytes 0..3 (the Q5 fifth bit of four elements). */
static inline __m256i qk_qh_quad(__m256i qh, int k) {
    const __m256i v = _mm256_and_si256(_mm256_srli_epi32(qh, k), _mm256_set1_epi32(0xf));
    /* bit b of v goes to bit 8b + 4: the four shifted copies do not overlap */
    return _mm256_and_si256(_mm256_mullo_epi32(v, _mm256_set1_epi32(0x02040810)),
                            _mm256_set1_epi32(0x10101010));
}

static inline void qk_store_q(uint8_t *dst, __m256i v) { _mm256_store_si256((__m256i *)dst, v); }

/* The panel reads eight rows side by side, a pattern the hardware prefetchers do not follow
 * from DRAM (7 GB/s instead of 29 on a 178 MB matrix): fetch the same bytes two panels ahead,
 * into L2 (into L1 they exhaust its miss buffers: no gain). Measured on Zen 4: 1 panel ahead or
 * 4 do slightly worse. Prefetches never fault, so running past the matrix is harmless. */
#ifndef QK_PF_PANELS
#define QK_PF_PANELS 2
#endif
#ifndef QK_PF_HINT
#define QK_PF_HINT _MM_HINT_T1
#endif
static inline void qk_prefetch_next_panel(const uint8_t *rp[8], size_t row_bytes, size_t o) {
    for (int i = 0; i < 8; i++) _mm_prefetch((const char *)(rp[i] + QK_PF_PANELS * 8 * row_bytes + o), QK_PF_HINT);
}

static inline void qk_pack32_x86(int type, int bytes, const uint8_t *w, size_t row_bytes, int nr,
                                 int64_t nb, qk_panel32 *p) {
    const uint8_t *rp[8];
    qk_panel_rows(w, row_bytes, nr, rp);
    const __m256i lo4 = _mm256_set1_epi8(0x0f);
    const size_t qs_off = type == 1 ? 4 : type == 2 ? 6 : type == 3 ? 8 : 2; /* Q4_0, Q8_0, IQ4_NL: 2 */
    for (int64_t b = 0; b < nb; b++, p++) {
        const size_t o = (size_t)b * bytes;
        qk_prefetch_next_panel(rp, row_bytes, o);
        __m256 d, m;
        qk_split_f16x2(qk_gather_u32(rp, o), &d, &m); /* m is garbage for the types without one */
        __m256i g[4];
        if (type == 4) { /* Q8_0: 32 signed bytes -> q + 128 */
            const __m256i flip = _mm256_set1_epi8((char)0x80);
            qk_groups4(rp, o + 2, g);
            for (int k = 0; k < 4; k++) qk_store_q(p->q[k][0], _mm256_xor_si256(g[k], flip));
            qk_groups4(rp, o + 18, g);
            for (int k = 0; k < 4; k++) qk_store_q(p->q[k + 4][0], _mm256_xor_si256(g[k], flip));
            _mm256_store_ps(p->d, d);
            _mm256_store_ps(p->m, _mm256_mul_ps(d, _mm256_set1_ps(-128.0f)));
            continue;
        }
        qk_groups4(rp, o + qs_off, g);
        __m256i q[8];
        for (int k = 0; k < 4; k++) {
            q[k] = _mm256_and_si256(g[k], lo4);
            q[k + 4] = _mm256_and_si256(_mm256_srli_epi16(g[k], 4), lo4);
        }
        if (type == 5) { /* IQ4_NL: values + 128 by table */
            const __m256i lut = _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)qk_iq4_u));
            for (int k = 0; k < 8; k++) qk_store_q(p->q[k][0], _mm256_shuffle_epi8(lut, q[k]));
            _mm256_store_ps(p->d, d);
            _mm256_store_ps(p->m, _mm256_mul_ps(d, _mm256_set1_ps(-128.0f)));
            continue;
        }
        if (type == 2 || type == 3) {
            const __m256i qh = qk_gather_u32(rp, o + qs_off - 4);
#if QK_TILES_X86 == 2
            /* AVX-512BW: byte k/2 of each lane's qh to its four bytes, test one bit each, set 16 */
            const __m256i sixteen = _mm256_set1_epi8(0x10);
            for (int k = 0; k < 8; k++) {
                const char c = (char)(k / 2), bl = (char)(1 << (4 * (k % 2)));
                const __m256i ctrl = _mm256_setr_epi8(c, c, c, c, c + 4, c + 4, c + 4, c + 4, c + 8, c + 8, c + 8, c + 8,
                                                      c + 12, c + 12, c + 12, c + 12, c, c, c, c, c + 4, c + 4, c + 4,
                                                      c + 4, c + 8, c + 8, c + 8, c + 8, c + 12, c + 12, c + 12, c + 12);
                const __m256i bits = _mm256_set1_epi32((int)((uint32_t)(uint8_t)bl | (uint32_t)(uint8_t)(bl << 1) << 8 |
                                                             (uint32_t)(uint8_t)(bl << 2) << 16 |
                                                             (uint32_t)(uint8_t)(bl << 3) << 24));
                const __mmask32 set = _mm256_test_epi8_mask(_mm256_shuffle_epi8(qh, ctrl), bits);
                q[k] = _mm256_mask_add_epi8(q[k], set, q[k], sixteen); /* q <= 15: + 16 = | 16 */
            }
#else
            for (int k = 0; k < 8; k++) q[k] = _mm256_or_si256(q[k], qk_qh_quad(qh, 4 * k));
#endif
        }
        for (int k = 0; k < 8; k++) qk_store_q(p->q[k][0], q[k]);
        _mm256_store_ps(p->d, d);
        if (type == 1 || type == 3)
            _mm256_store_ps(p->m, m);
        else
            _mm256_store_ps(p->m, _mm256_mul_ps(d, _mm256_set1_ps(type == 0 ? -8.0f : -16.0f)));
    }
}

/* Eight 4-byte groups of 32 bytes at offset off of each row: g[k] holds group k of rows 0..7. */
static inline void qk_groups8(const uint8_t *rp[8], size_t off, __m256i g[8]) {
    qk_groups4(rp, off, g);
    qk_groups4(rp, off + 16, g + 4);
}

/* Q4_K/Q5_K block bytes 0..15 (d, dmin, 12 bytes of 6-bit scales and mins) of the 8 rows. */
static inline void qk_k4_scales_x86(const uint8_t *rp[8], size_t o, qk_panel256 *p) {
    __m256i g[4];
    qk_groups4(rp, o, g);
    __m256 d, dmin;
    qk_split_f16x2(g[0], &d, &dmin);
    _mm256_store_ps(p->d, d);
    _mm256_store_ps(p->nd, _mm256_sub_ps(_mm256_setzero_ps(), dmin));
    const __m256i m6 = _mm256_set1_epi8(0x3f), m4 = _mm256_set1_epi8(0x0f), m2 = _mm256_set1_epi8(0x30);
    const __m256i a = g[1], b = g[2], c = g[3];
    const __m256i sc[2] = {_mm256_and_si256(a, m6),
                           _mm256_or_si256(_mm256_and_si256(c, m4), _mm256_and_si256(_mm256_srli_epi32(a, 2), m2))};
    const __m256i mn[2] = {_mm256_and_si256(b, m6),
                           _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi32(c, 4), m4),
                                           _mm256_and_si256(_mm256_srli_epi32(b, 2), m2))};
    const __m256i byte = _mm256_set1_epi32(0xff);
    for (int s = 0; s < 8; s++) {
        const __m256i scale = _mm256_and_si256(_mm256_srli_epi32(sc[s / 4], 8 * (s % 4)), byte);
        const __m256i min = _mm256_and_si256(_mm256_srli_epi32(mn[s / 4], 8 * (s % 4)), byte);
        _mm256_store_si256((__m256i *)p->sc[s], scale);
        _mm256_store_si256((__m256i *)p->mn[s], _mm256_or_si256(min, _mm256_slli_epi32(min, 16)));
    }
}

/* Q6_K: 16 int8 scales at 192..207, f16 d at 208. */
static inline void qk_q6_k_scales_x86(const uint8_t *rp[8], size_t o, qk_panel256 *p) {
    __m256i g[4];
    qk_groups4(rp, o + 192, g);
    __m256 junk, d;
    qk_split_f16x2(qk_gather_u32(rp, o + 206), &junk, &d);
    _mm256_store_ps(p->d, d);
    _mm256_store_ps(p->nd, _mm256_sub_ps(_mm256_setzero_ps(), d));
    for (int k = 0; k < 4; k++) {
        for (int j = 0; j < 4; j++)
            _mm256_store_si256((__m256i *)p->sc[4 * k + j],
                               _mm256_srai_epi32(_mm256_slli_epi32(g[k], 24 - 8 * j), 24));
        const __m256i e = _mm256_srai_epi16(_mm256_slli_epi16(g[k], 8), 8); /* bytes 0, 2 */
        const __m256i od = _mm256_srai_epi16(g[k], 8);                       /* bytes 1, 3 */
        const __m256i p0 = _mm256_blend_epi16(e, _mm256_slli_epi32(od, 16), 0xAA);
        const __m256i p1 = _mm256_blend_epi16(_mm256_srli_epi32(e, 16), od, 0xAA);
        _mm256_store_si256((__m256i *)p->mn[2 * k], _mm256_slli_epi16(p0, 5)); /* 32 * sc */
        _mm256_store_si256((__m256i *)p->mn[2 * k + 1], _mm256_slli_epi16(p1, 5));
    }
}

/* Q2_K: 16 bytes of scales at 0 (low nibble scale, high nibble min), f16 d, dmin at 80. */
static inline void qk_q2_k_scales_x86(const uint8_t *rp[8], size_t o, qk_panel256 *p) {
    __m256i g[4];
    qk_groups4(rp, o, g);
    const __m256i m4 = _mm256_set1_epi32(0xf);
    for (int k = 0; k < 4; k++) {
        __m256i mins[4];
        for (int b = 0; b < 4; b++) {
            _mm256_store_si256((__m256i *)p->sc[4 * k + b], _mm256_and_si256(_mm256_srli_epi32(g[k], 8 * b), m4));
            mins[b] = _mm256_and_si256(_mm256_srli_epi32(g[k], 8 * b + 4), m4);
        }
        _mm256_store_si256((__m256i *)p->mn[2 * k], _mm256_or_si256(mins[0], _mm256_slli_epi32(mins[1], 16)));
        _mm256_store_si256((__m256i *)p->mn[2 * k + 1], _mm256_or_si256(mins[2], _mm256_slli_epi32(mins[3], 16)));
    }
    __m256 d, dmin;
    qk_split_f16x2(qk_gather_u32(rp, o + 80), &d, &dmin);
    _mm256_store_ps(p->d, d);
    _mm256_store_ps(p->nd, _mm256_sub_ps(_mm256_setzero_ps(), dmin));
}

/* Q3_K: 12 bytes of 6-bit scales at 96 (see qk_q3_k_scales), f16 d at 108. */
static inline void qk_q3_k_scales_x86(const uint8_t *rp[8], size_t o, qk_panel256 *p) {
    const __m256i a0 = qk_gather_u32(rp, o + 96), a1 = qk_gather_u32(rp, o + 100), a2 = qk_gather_u32(rp, o + 104);
    const __m256i m4 = _mm256_set1_epi8(0x0f), m2 = _mm256_set1_epi8(0x03);
    const __m256i w[4] = {
        _mm256_or_si256(_mm256_and_si256(a0, m4), _mm256_slli_epi32(_mm256_and_si256(a2, m2), 4)),
        _mm256_or_si256(_mm256_and_si256(a1, m4), _mm256_slli_epi32(_mm256_and_si256(_mm256_srli_epi32(a2, 2), m2), 4)),
        _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi32(a0, 4), m4),
                        _mm256_slli_epi32(_mm256_and_si256(_mm256_srli_epi32(a2, 4), m2), 4)),
        _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi32(a1, 4), m4),
                        _mm256_slli_epi32(_mm256_and_si256(_mm256_srli_epi32(a2, 6), m2), 4))};
    const __m256i byte = _mm256_set1_epi32(0xff), off = _mm256_set1_epi32(32), lo16 = _mm256_set1_epi32(0xffff);
    for (int k = 0; k < 4; k++) {
        __m256i sc[4];
        for (int b = 0; b < 4; b++) {
            sc[b] = _mm256_sub_epi32(_mm256_and_si256(_mm256_srli_epi32(w[k], 8 * b), byte), off);
            _mm256_store_si256((__m256i *)p->sc[4 * k + b], sc[b]);
        }
        for (int q = 0; q < 2; q++) { /* pair 2k + q: 4 * scales 4k + 2q, 4k + 2q + 1 */
            const __m256i lo = _mm256_and_si256(_mm256_slli_epi32(sc[2 * q], 2), lo16);
            _mm256_store_si256((__m256i *)p->mn[2 * k + q], _mm256_or_si256(lo, _mm256_slli_epi32(sc[2 * q + 1], 18)));
        }
    }
    __m256 junk, d;
    qk_split_f16x2(qk_gather_u32(rp, o + 106), &junk, &d);
    _mm256_store_ps(p->d, d);
    _mm256_store_ps(p->nd, _mm256_sub_ps(_mm256_setzero_ps(), d));
}

/* IQ4_XS: f16 d at 0, u16 scales_h at 2, scales_l[4] at 4. */
static inline void qk_iq4_xs_scales_x86(const uint8_t *rp[8], size_t o, qk_panel256 *p) {
    const __m256i dh = qk_gather_u32(rp, o), sl = qk_gather_u32(rp, o + 4);
    const __m256i sh = _mm256_srli_epi32(dh, 16), off = _mm256_set1_epi32(32);
    for (int ib = 0; ib < 8; ib++) {
        const __m256i lo = _mm256_and_si256(_mm256_srli_epi32(sl, 4 * ib), _mm256_set1_epi32(0xf));
        const __m256i hi = _mm256_and_si256(_mm256_srli_epi32(sh, 2 * ib), _mm256_set1_epi32(3));
        const __m256i ls = _mm256_sub_epi32(_mm256_or_si256(lo, _mm256_slli_epi32(hi, 4)), off);
        const __m256i m = _mm256_and_si256(_mm256_slli_epi32(ls, 7), _mm256_set1_epi32(0xffff)); /* 128 ls */
        _mm256_store_si256((__m256i *)p->sc[ib], ls);
        _mm256_store_si256((__m256i *)p->mn[ib], _mm256_or_si256(m, _mm256_slli_epi32(m, 16)));
    }
    __m256 d, junk;
    qk_split_f16x2(dh, &d, &junk);
    _mm256_store_ps(p->d, d);
    _mm256_store_ps(p->nd, _mm256_sub_ps(_mm256_setzero_ps(), d));
}

static inline void qk_pack256_x86(int type, int bytes, const uint8_t *w, size_t row_bytes, int nr,
                                  int64_t nb, qk_panel256 *p) {
    const uint8_t *rp[8];
    qk_panel_rows(w, row_bytes, nr, rp);
    const __m256i lo4 = _mm256_set1_epi8(0x0f);
    for (int64_t b = 0; b < nb; b++, p++) {
        const size_t o = (size_t)b * bytes;
        for (size_t k = 0; k < (size_t)bytes; k += 64) qk_prefetch_next_panel(rp, row_bytes, o + k);
        __m256i x[8], h[8];
        if (type == 2) { /* Q6_K: ql 0..127, qh 128..191 */
            const __m256i m2 = _mm256_set1_epi8(0x03);
            for (int half = 0; half < 2; half++) {
                __m256i y[8];
                qk_groups8(rp, o + 64 * half, x);
                qk_groups8(rp, o + 64 * half + 32, y);
                qk_groups8(rp, o + 128 + 32 * half, h);
                for (int k = 0; k < 8; k++) {
                    const __m256i xl = _mm256_and_si256(x[k], lo4), yl = _mm256_and_si256(y[k], lo4);
                    const __m256i xh = _mm256_and_si256(_mm256_srli_epi16(x[k], 4), lo4);
                    const __m256i yh = _mm256_and_si256(_mm256_srli_epi16(y[k], 4), lo4);
                    const __m256i h0 = _mm256_slli_epi16(_mm256_and_si256(h[k], m2), 4);
                    const __m256i h1 = _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(h[k], 2), m2), 4);
                    const __m256i h2 = _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(h[k], 4), m2), 4);
                    const __m256i h3 = _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(h[k], 6), m2), 4);
                    qk_store_q(p->q[32 * half + k][0], _mm256_or_si256(xl, h0));
                    qk_store_q(p->q[32 * half + 8 + k][0], _mm256_or_si256(yl, h1));
                    qk_store_q(p->q[32 * half + 16 + k][0], _mm256_or_si256(xh, h2));
                    qk_store_q(p->q[32 * half + 24 + k][0], _mm256_or_si256(yh, h3));
                }
            }
            qk_q6_k_scales_x86(rp, o, p);
            continue;
        }
        if (type == 3 || type == 4) { /* Q2_K / Q3_K: 2-bit quants (+ Q3_K's high bit: q + 4) */
            const __m256i m3 = _mm256_set1_epi8(3), one = _mm256_set1_epi8(1);
            if (type == 4) qk_groups8(rp, o, h);
            for (int half = 0; half < 2; half++) {
                qk_groups8(rp, o + (type == 3 ? 16 : 32) + 32 * half, x);
                for (int j = 0; j < 4; j++)
                    for (int k = 0; k < 8; k++) {
                        __m256i q = _mm256_and_si256(_mm256_srli_epi16(x[k], 2 * j), m3);
                        if (type == 4)
                            q = _mm256_or_si256(q, _mm256_slli_epi16(
                                                       _mm256_and_si256(_mm256_srli_epi16(h[k], 4 * half + j), one), 2));
                        qk_store_q(p->q[32 * half + 8 * j + k][0], q);
                    }
            }
            if (type == 3)
                qk_q2_k_scales_x86(rp, o, p);
            else
                qk_q3_k_scales_x86(rp, o, p);
            continue;
        }
        if (type == 5) { /* IQ4_XS */
            const __m256i lut = _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)qk_iq4_u));
            for (int ib = 0; ib < 8; ib++) {
                __m256i g[4];
                qk_groups4(rp, o + 8 + 16 * ib, g);
                for (int k = 0; k < 4; k++) {
                    qk_store_q(p->q[8 * ib + k][0], _mm256_shuffle_epi8(lut, _mm256_and_si256(g[k], lo4)));
                    qk_store_q(p->q[8 * ib + 4 + k][0],
                               _mm256_shuffle_epi8(lut, _mm256_and_si256(_mm256_srli_epi16(g[k], 4), lo4)));
                }
            }
            qk_iq4_xs_scales_x86(rp, o, p);
            continue;
        }
        const size_t qs_off = type == 0 ? 16 : 48;
        if (type == 1) qk_groups8(rp, o + 16, h);
        for (int c = 0; c < 4; c++) {
            qk_groups8(rp, o + qs_off + 32 * c, x);
            for (int k = 0; k < 8; k++) {
                __m256i lo = _mm256_and_si256(x[k], lo4);
                __m256i hi = _mm256_and_si256(_mm256_srli_epi16(x[k], 4), lo4);
                if (type == 1) { /* Q5_K: bit 2c (low nibbles) and 2c+1 (high) of qh[l] */
                    const __m256i one = _mm256_set1_epi8(1);
                    const __m256i b0 = _mm256_and_si256(_mm256_srli_epi16(h[k], 2 * c), one);
                    const __m256i b1 = _mm256_and_si256(_mm256_srli_epi16(h[k], 2 * c + 1), one);
                    lo = _mm256_or_si256(lo, _mm256_slli_epi16(b0, 4));
                    hi = _mm256_or_si256(hi, _mm256_slli_epi16(b1, 4));
                }
                qk_store_q(p->q[16 * c + k][0], lo);
                qk_store_q(p->q[16 * c + 8 + k][0], hi);
            }
        }
        qk_k4_scales_x86(rp, o, p);
    }
}
#endif /* QK_TILES_X86 */

/* ================================================================ products: portable */

/* Rows of the panel times one token; adds into acc[8] with the fixed per-lane arithmetic. */
QK_TILE_INLINE void qk_tile32_token_portable(const qk_panel32 *p, int64_t nb,
                                            const qk_act_q8_32 *a, float acc[8]) {
    for (int64_t b = 0; b < nb; b++) {
        int32_t isum[8];
        for (int i = 0; i < 8; i++) isum[i] = qk_sum_u8s8((const uint8_t *)p[b].q + 32 * i, a[b].qs, 32);
        const float da = a[b].d, sa = a[b].s;
        for (int i = 0; i < 8; i++) {
            const float prod = p[b].d[i] * da;
            acc[i] = acc[i] + prod * (float)isum[i];
            acc[i] = acc[i] + p[b].m[i] * sa;
        }
    }
}

/* sub: 32 (Q4_K, Q5_K: 8 sub-blocks) or 16 (Q6_K: 16 sub-blocks). */
QK_TILE_INLINE void qk_tile256_token_portable(const qk_panel256 *p, int64_t nb, int sub,
                                             const qk_act_q8_256 *a, float acc[8]) {
    const int nsub = 256 / sub;
    for (int64_t b = 0; b < nb; b++) {
        int32_t tot[8] = {0}, mins[8] = {0};
        for (int i = 0; i < 8; i++) {
            const uint8_t *u = (const uint8_t *)p[b].q + 256 * i;
            for (int s = 0; s < nsub; s++) /* constant lengths, so that the sums vectorize */
                tot[i] += (sub == 32 ? qk_sum_u8s8(u + 32 * s, a[b].qs + 32 * s, 32)
                                     : qk_sum_u8s8(u + 16 * s, a[b].qs + 16 * s, 16)) * p[b].sc[s][i];
        }
        for (int q = 0; q < 8; q++)
            for (int i = 0; i < 8; i++) {
                const int32_t c = p[b].mn[q][i];
                mins[i] += (int16_t)(c & 0xffff) * a[b].bsums[2 * q] + (int16_t)(c >> 16) * a[b].bsums[2 * q + 1];
            }
        const float da = a[b].d;
        for (int i = 0; i < 8; i++) {
            const float p1 = p[b].d[i] * da, p2 = p[b].nd[i] * da;
            acc[i] = acc[i] + p1 * (float)tot[i];
            acc[i] = acc[i] + p2 * (float)mins[i];
        }
    }
}

/* ================================================================ products: x86 */

#if QK_TILES_X86
/* Sum over the 4-byte groups j0..j0+nq-1 of u (panel) times the token's bytes, per row lane.
 * AVX2 sums up to `group` maddubs results in int16 before widening (group * 2 * umax * 127 must
 * stay below 32768). */
QK_TILE_INLINE __m256i
qk_quads_dot(const uint8_t (*q)[QK_PANEL_ROWS][4], const int8_t *aq, int nq, int group) {
#if QK_TILES_X86 == 2
    (void)group;
    __m256i s0 = _mm256_setzero_si256(), s1 = _mm256_setzero_si256();
    for (int j = 0; j < nq; j += 2) {
        s0 = _mm256_dpbusd_epi32(s0, _mm256_load_si256((const __m256i *)q[j]),
                                 _mm256_set1_epi32((int)qk_load_u32((const uint8_t *)aq + 4 * j)));
        s1 = _mm256_dpbusd_epi32(s1, _mm256_load_si256((const __m256i *)q[j + 1]),
                                 _mm256_set1_epi32((int)qk_load_u32((const uint8_t *)aq + 4 * j + 4)));
    }
    return _mm256_add_epi32(s0, s1);
#else
    const __m256i ones = _mm256_set1_epi16(1);
    __m256i s = _mm256_setzero_si256();
    for (int j0 = 0; j0 < nq; j0 += group) {
        __m256i h = _mm256_setzero_si256();
        for (int j = j0; j < j0 + group && j < nq; j++)
            h = _mm256_add_epi16(h, _mm256_maddubs_epi16(
                                        _mm256_load_si256((const __m256i *)q[j]),
                                        _mm256_set1_epi32((int)qk_load_u32((const uint8_t *)aq + 4 * j))));
        s = _mm256_add_epi32(s, _mm256_madd_epi16(h, ones));
    }
    return s;
#endif
}

/* T tokens (a[t] = their activation rows) times the panel: acc[t] lanes = rows. */
QK_TILE_INLINE void
qk_tile32_x86(const qk_panel32 *p, int64_t nb, const uint8_t *const *a, int T, int group,
              __m256 *acc) {
    for (int64_t b = 0; b < nb; b++) {
        const __m256 d = _mm256_load_ps(p[b].d), m = _mm256_load_ps(p[b].m);
        for (int t = 0; t < T; t++) {
            const qk_act_q8_32 *x = (const qk_act_q8_32 *)a[t] + b;
            const __m256i isum = qk_quads_dot(p[b].q, x->qs, 8, group);
            acc[t] = _mm256_fmadd_ps(_mm256_mul_ps(d, _mm256_set1_ps(x->d)), _mm256_cvtepi32_ps(isum), acc[t]);
            acc[t] = _mm256_fmadd_ps(m, _mm256_set1_ps(x->s), acc[t]);
        }
    }
}

QK_TILE_INLINE void
qk_tile256_x86(const qk_panel256 *p, int64_t nb, int sub, const uint8_t *const *a, int T,
               int group, __m256 *acc) {
    const int quads = sub / 4, nsub = 256 / sub;
    for (int64_t b = 0; b < nb; b++) {
        /* sub-block by sub-block, each sub-block's weights meeting all T tokens (integer sums:
         * the order does not change them) */
        __m256i tot[4];
        for (int t = 0; t < T; t++) tot[t] = _mm256_setzero_si256();
        for (int s = 0; s < nsub; s++) {
            const __m256i sc = _mm256_load_si256((const __m256i *)p[b].sc[s]);
            for (int t = 0; t < T; t++) {
                const qk_act_q8_256 *x = (const qk_act_q8_256 *)a[t] + b;
                const __m256i isum = qk_quads_dot(p[b].q + s * quads, x->qs + 4 * s * quads, quads, group);
                tot[t] = _mm256_add_epi32(tot[t], _mm256_mullo_epi32(isum, sc));
            }
        }
        for (int t = 0; t < T; t++) {
            const qk_act_q8_256 *x = (const qk_act_q8_256 *)a[t] + b;
            __m256i mins = _mm256_setzero_si256();
            for (int q = 0; q < 8; q++)
                mins = _mm256_add_epi32(mins, _mm256_madd_epi16(
                                                  _mm256_load_si256((const __m256i *)p[b].mn[q]),
                                                  _mm256_set1_epi32((int)qk_load_u32((const uint8_t *)&x->bsums[2 * q]))));
            const __m256 da = _mm256_set1_ps(x->d);
            acc[t] = _mm256_fmadd_ps(_mm256_mul_ps(_mm256_load_ps(p[b].d), da), _mm256_cvtepi32_ps(tot[t]), acc[t]);
            acc[t] = _mm256_fmadd_ps(_mm256_mul_ps(_mm256_load_ps(p[b].nd), da), _mm256_cvtepi32_ps(mins), acc[t]);
        }
    }
}
#endif

/* ================================================================ the panel loop */

static inline void qk_tile_store(float *out, int64_t ldo, int64_t t, int nr, const float v[8]) {
    float *o = out + t * ldo;
    for (int i = 0; i < nr; i++) o[i] = v[i];
}

/* fam: 32 or 256 (panel kind); sub: sub-block size for 256; group: AVX2 int16 grouping. */
QK_TILE_INLINE void
qk_panel_mul(const void *panel, int fam, int sub, int group, int64_t nb, int nr,
             const uint8_t *act, size_t act_stride, int64_t nt, float *out, int64_t ldo) {
    int64_t t = 0;
#if QK_TILES_X86
    enum { T = 4 };
    for (; t + T <= nt; t += T) {
        const uint8_t *a[T];
        __m256 acc[T];
        for (int k = 0; k < T; k++) {
            a[k] = act + (size_t)(t + k) * act_stride;
            acc[k] = _mm256_setzero_ps();
        }
        if (fam == 32)
            qk_tile32_x86((const qk_panel32 *)panel, nb, a, T, group, acc);
        else
            qk_tile256_x86((const qk_panel256 *)panel, nb, sub, a, T, group, acc);
        for (int k = 0; k < T; k++) {
            if (nr == 8) {
                _mm256_storeu_ps(out + (t + k) * ldo, acc[k]);
            } else {
                float v[8];
                _mm256_storeu_ps(v, acc[k]);
                qk_tile_store(out, ldo, t + k, nr, v);
            }
        }
    }
    for (; t < nt; t++) {
        const uint8_t *a[1] = {act + (size_t)t * act_stride};
        __m256 acc[1] = {_mm256_setzero_ps()};
        if (fam == 32)
            qk_tile32_x86((const qk_panel32 *)panel, nb, a, 1, group, acc);
        else
            qk_tile256_x86((const qk_panel256 *)panel, nb, sub, a, 1, group, acc);
        float v[8];
        _mm256_storeu_ps(v, acc[0]);
        qk_tile_store(out, ldo, t, nr, v);
    }
#else
    (void)group;
    for (; t < nt; t++) {
        float v[8] = {0};
        const uint8_t *a = act + (size_t)t * act_stride;
        if (fam == 32)
            qk_tile32_token_portable((const qk_panel32 *)panel, nb, (const qk_act_q8_32 *)a, v);
        else
            qk_tile256_token_portable((const qk_panel256 *)panel, nb, sub, (const qk_act_q8_256 *)a, v);
        qk_tile_store(out, ldo, t, nr, v);
    }
#endif
}

#if QK_TILES_X86
#define QK_PACK32 qk_pack32_x86
#define QK_PACK256 qk_pack256_x86
#else
#define QK_PACK32 qk_pack32_portable
#define QK_PACK256 qk_pack256_portable
#endif

/* One gemm per type: panels of 8 rows, each unpacked once and met by every token. */
#define QK_GEMM32(name, type_id, BYTES, group)                                                   \
    static void qk_gemm_##name(int64_t n, const uint8_t *w, size_t row_bytes, int64_t nr,       \
                               const uint8_t *act, size_t act_stride, int64_t nt, float *out,   \
                               int64_t ldo, void *scratch) {                                    \
        qk_panel32 *p = (qk_panel32 *)scratch;                                                  \
        for (int64_t r = 0; r < nr; r += QK_PANEL_ROWS) {                                       \
            const int rows = nr - r < QK_PANEL_ROWS ? (int)(nr - r) : QK_PANEL_ROWS;           \
            QK_PACK32(type_id, BYTES, w + (size_t)r * row_bytes, row_bytes, rows, n / 32, p);    \
            qk_panel_mul(p, 32, 32, group, n / 32, rows, act, act_stride, nt, out + r, ldo);    \
        }                                                                                       \
    }

#define QK_GEMM256(name, type_id, BYTES, sub, group)                                             \
    static void qk_gemm_##name(int64_t n, const uint8_t *w, size_t row_bytes, int64_t nr,       \
                               const uint8_t *act, size_t act_stride, int64_t nt, float *out,   \
                               int64_t ldo, void *scratch) {                                    \
        qk_panel256 *p = (qk_panel256 *)scratch;                                                \
        for (int64_t r = 0; r < nr; r += QK_PANEL_ROWS) {                                       \
            const int rows = nr - r < QK_PANEL_ROWS ? (int)(nr - r) : QK_PANEL_ROWS;           \
            QK_PACK256(type_id, BYTES, w + (size_t)r * row_bytes, row_bytes, rows, n / 256, p); \
            qk_panel_mul(p, 256, sub, group, n / 256, rows, act, act_stride, nt, out + r, ldo); \
        }                                                                                       \
    }

/* AVX2 int16 grouping: Q4 u <= 15 -> 8 maddubs, Q5 u <= 31 -> 4, Q6 u <= 63 -> 2. */
QK_GEMM32(q4_0, 0, 18, 8)
QK_GEMM32(q4_1, 1, 20, 8)
QK_GEMM32(q5_0, 2, 22, 4)
QK_GEMM32(q5_1, 3, 24, 4)
#if QK_TILES_X86 != 1
QK_GEMM32(q8_0, 4, 34, 1)
#define QK_GEMM_Q8_0 qk_gemm_q8_0
#else
#define QK_GEMM_Q8_0 NULL
#endif
QK_GEMM256(q4_k, 0, 144, 32, 8)
QK_GEMM256(q5_k, 1, 176, 32, 4)
QK_GEMM256(q6_k, 2, 210, 16, 2)
QK_GEMM256(q2_k, 3, 84, 16, 4)
QK_GEMM256(q3_k, 4, 110, 16, 4)
/* IQ4's u = value + 128 reaches 241: like Q8_0, not for AVX2's maddubs. */
#if QK_TILES_X86 != 1
QK_GEMM32(iq4_nl, 5, 18, 1)
QK_GEMM256(iq4_xs, 5, 136, 32, 1)
#define QK_GEMM_IQ4_NL qk_gemm_iq4_nl
#define QK_GEMM_IQ4_XS qk_gemm_iq4_xs
#else
#define QK_GEMM_IQ4_NL NULL
#define QK_GEMM_IQ4_XS NULL
#endif

#endif
