/* Tiled products: a matrix of GGUF blocks times SEVERAL activation rows (prefill), or one
 * (decode), with the same arithmetic for both, so that a token's logits do not depend on the
 * batch it shares. The only product path for quantized weights (forward.h's qk_matmul).
 *
 * The idea (llamafile's tinyBLAS reuses each unpacked weight block across tokens the same way):
 * eight weight rows at a time are unpacked ONCE into a panel (panel.h; each type's qk_pack_*
 * in types/) and then every token's activation meets that panel: per block, the token's 4-byte
 * groups broadcast against the panel's quads give the eight rows' exact integer sums in eight
 * lanes (lanes = rows), scaled and accumulated in f32. No horizontal sums, no per-token
 * unpacking; tokens go four at a time to hide latencies.
 *
 * Per (row, token) the float arithmetic is fixed within a build (1 or 4 tokens, whichever rows
 * share the panel), for the 32-element types:
 *     acc = fma(d_w * d_a, (float)isum, acc);  acc = fma(m_w, s_a, acc)     block by block
 * where isum = sum(u * q_a) is exact and s_a = d_a * sum(q_a) (qk_act_q8_32.s). For the
 * 256-element types, per super-block with integer sub-block scales sc and min coefficients mn:
 *     acc = fma(d_w * d_a, (float)sum(sc * isum_sub), acc);
 *     acc = fma(nd_w * d_a, (float)sum(mn * bsums), acc)                     nd = -dmin
 * The integer sums, by build:
 *   avx512 (QK_TILES_X86 == 2): vpdpbusd, unsigned panel bytes times signed activations;
 *   avx2   (QK_TILES_X86 == 1): maddubs + madd, up to `group` maddubs summed in int16 first;
 *          wide types (group 0, signed panel) through the sign trick;
 *   arm64  (QK_TILES_NEON): sdot with dotprod, smull + sadalp on armv8.0 (signed panel bytes);
 *   portable: plain loops over the natural-order panel.
 * tests/test_quants_tiles.py holds every build to a float64 product of gguf's dequantization,
 * to the reference dot, and to exact batch invariance.
 *
 * The gemm of every type with a panel in quant_types.def is instantiated at the end.
 */
#ifndef QPACK_TILES_H
#define QPACK_TILES_H

#include "gemv.h"
#include "panel.h"

/* qk_gemm_fn (quants.h): out[t * ldo + r] = W[r] . act[t] for r < nr, t < nt. */

/* Two panels side by side (the AVX-512 build multiplies 16 rows at once, see qk_tile*_2x4). */
static size_t qk_gemm_scratch_bytes(int64_t n) {
    const size_t a = (size_t)(n / 32 + 1) * sizeof(qk_panel32);
    const size_t b = (size_t)(n / 256 + 1) * sizeof(qk_panel256);
    return 2 * (a > b ? a : b);
}

/* Row pointers of a panel; rows past nr repeat the last one (their lanes are computed and
 * never stored). */
static inline void qk_panel_rows(const uint8_t *w, size_t row_bytes, int nr, const uint8_t *rp[8]) {
    for (int i = 0; i < QK_PANEL_ROWS; i++) rp[i] = w + row_bytes * (size_t)(i < nr ? i : nr - 1);
}

/* The panel reads eight rows side by side, a pattern the hardware prefetchers do not follow
 * from DRAM (7 GB/s instead of 29 on a 178 MB matrix): fetch the same bytes two panels ahead,
 * into L2 (into L1 they exhaust its miss buffers: no gain). Measured on Zen 4: 1 panel ahead or
 * 4 do slightly worse. Prefetches never fault, so running past the matrix is harmless. */
#ifndef QK_PF_PANELS
#define QK_PF_PANELS 2
#endif
static inline void qk_prefetch_next_panel(const uint8_t *const rp[8], size_t row_bytes, size_t o) {
#if QK_TILES_X86
    for (int i = 0; i < 8; i++) _mm_prefetch((const char *)(rp[i] + QK_PF_PANELS * 8 * row_bytes + o), _MM_HINT_T1);
#elif defined(__GNUC__) || defined(__clang__)
    for (int i = 0; i < 8; i++) __builtin_prefetch(rp[i] + QK_PF_PANELS * 8 * row_bytes + o, 0, 2);
#else
    (void)rp, (void)row_bytes, (void)o;
#endif
}

/* ================================================================ products: portable */

QK_TILE_INLINE int32_t qk_sum_u8s8(const uint8_t *u, const int8_t *a, int n) {
    int32_t s = 0;
    for (int e = 0; e < n; e++) s += (int32_t)u[e] * a[e];
    return s;
}

/* Rows of the panel times one token; adds into acc[8] with the fixed per-lane arithmetic. */
QK_TILE_INLINE void qk_tile32_token_portable(const qk_panel32 *p, int64_t nb, const qk_act_q8_32 *a, float acc[8]) {
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

/* sub: 32 (8 sub-blocks) or 16 (16 sub-blocks). */
QK_TILE_INLINE void qk_tile256_token_portable(const qk_panel256 *p, int64_t nb, int sub, const qk_act_q8_256 *a,
                                             float acc[8]) {
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
/* Sum over the quads j < nq of the panel times the token's bytes, per row lane. AVX2 sums up to
 * `group` maddubs results in int16 before widening (group * 2 * umax * 127 < 32768); group 0:
 * signed panel bytes (wide types), |q| moved onto the activation's sign. */
QK_TILE_INLINE __m256i qk_quads_dot(const uint8_t (*q)[QK_PANEL_ROWS][4], const int8_t *aq, int nq, int group) {
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
    if (group == 0) {
        for (int j = 0; j < nq; j++) {
            const __m256i a = _mm256_set1_epi32((int)qk_load_u32((const uint8_t *)aq + 4 * j));
            s = _mm256_add_epi32(s, qk_dot32_wide(_mm256_load_si256((const __m256i *)q[j]), a));
        }
        return s;
    }
    for (int j0 = 0; j0 < nq; j0 += group) {
        __m256i h = _mm256_setzero_si256();
        for (int j = j0; j < j0 + group && j < nq; j++)
            h = _mm256_add_epi16(h, _mm256_maddubs_epi16(_mm256_load_si256((const __m256i *)q[j]),
                                                         _mm256_set1_epi32((int)qk_load_u32((const uint8_t *)aq + 4 * j))));
        s = _mm256_add_epi32(s, _mm256_madd_epi16(h, ones));
    }
    return s;
#endif
}

/* T tokens (a[t] = their activation rows) times the panel: acc[t] lanes = rows. */
QK_TILE_INLINE void qk_tile32_x86(const qk_panel32 *p, int64_t nb, const uint8_t *const *a, int T, int group,
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

QK_TILE_INLINE void qk_tile256_x86(const qk_panel256 *p, int64_t nb, int sub, const uint8_t *const *a, int T,
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
                mins = _mm256_add_epi32(mins, _mm256_madd_epi16(_mm256_load_si256((const __m256i *)p[b].mn[q]),
                                                                _mm256_set1_epi32((int)qk_load_u32((const uint8_t *)&x->bsums[2 * q]))));
            const __m256 da = _mm256_set1_ps(x->d);
            acc[t] = _mm256_fmadd_ps(_mm256_mul_ps(_mm256_load_ps(p[b].d), da), _mm256_cvtepi32_ps(tot[t]), acc[t]);
            acc[t] = _mm256_fmadd_ps(_mm256_mul_ps(_mm256_load_ps(p[b].nd), da), _mm256_cvtepi32_ps(mins), acc[t]);
        }
    }
}

#if QK_TILES_X86 == 2
/* Prefill's register tile: two panels (16 rows) times four tokens. Each panel quad loaded once
 * meets the four tokens' broadcast groups, each broadcast meets both panels: 6 loads for 8
 * vpdpbusd where the 8-row loop needs 2 per vpdpbusd (loads, not the multiplier, bound that
 * loop on Zen 4), and 8 independent sums in flight to cover vpdpbusd's latency. The integer
 * sums are exact and the float steps per (row, token) are qk_tile*_x86's: results stay
 * bit-identical to the 1-token path. Sums and accumulators: [t] rows of p0, [4 + t] of p1. */

/* r[t] += quads j < nq (even) of panel q0 times token t's groups, r[4 + t] the same for q1.
 * Named sums, not an array indexed in the loop: the compiler then keeps them in registers;
 * even and odd quads in separate sums: 16 chains in flight, where 8 leave vpdpbusd's
 * latency (~5 cycles at 2 per cycle) exposed (short sub-blocks excepted). Integer sums:
 * their order changes nothing. */
#define QK_DP2(e, j)                                                                               \
    do {                                                                                              \
        const __m256i w0 = _mm256_load_si256((const __m256i *)q0[j]);                                 \
        const __m256i w1 = _mm256_load_si256((const __m256i *)q1[j]);                                 \
        __m256i g = _mm256_set1_epi32((int)qk_load_u32((const uint8_t *)x[0] + 4 * (j)));             \
        e##0 = _mm256_dpbusd_epi32(e##0, w0, g);                                                      \
        e##4 = _mm256_dpbusd_epi32(e##4, w1, g);                                                      \
        g = _mm256_set1_epi32((int)qk_load_u32((const uint8_t *)x[1] + 4 * (j)));                     \
        e##1 = _mm256_dpbusd_epi32(e##1, w0, g);                                                      \
        e##5 = _mm256_dpbusd_epi32(e##5, w1, g);                                                      \
        g = _mm256_set1_epi32((int)qk_load_u32((const uint8_t *)x[2] + 4 * (j)));                     \
        e##2 = _mm256_dpbusd_epi32(e##2, w0, g);                                                      \
        e##6 = _mm256_dpbusd_epi32(e##6, w1, g);                                                      \
        g = _mm256_set1_epi32((int)qk_load_u32((const uint8_t *)x[3] + 4 * (j)));                     \
        e##3 = _mm256_dpbusd_epi32(e##3, w0, g);                                                      \
        e##7 = _mm256_dpbusd_epi32(e##7, w1, g);                                                      \
    } while (0)
QK_TILE_INLINE void qk_quads_2x4(const uint8_t (*q0)[QK_PANEL_ROWS][4], const uint8_t (*q1)[QK_PANEL_ROWS][4],
                                 const int8_t *const x[4], int nq, __m256i r[8]) {
    __m256i s0 = r[0], s1 = r[1], s2 = r[2], s3 = r[3], s4 = r[4], s5 = r[5], s6 = r[6], s7 = r[7];
    __m256i u0 = _mm256_setzero_si256(), u1 = u0, u2 = u0, u3 = u0, u4 = u0, u5 = u0, u6 = u0, u7 = u0;
    if (nq < 8) { /* Q6_K's 16-element sub-blocks: 4 quads, the split would cost more adds */
        for (int j = 0; j < nq; j++) QK_DP2(s, j);
    } else {
        for (int j = 0; j < nq; j += 2) {
            QK_DP2(s, j);
            QK_DP2(u, j + 1);
        }
    }
    r[0] = _mm256_add_epi32(s0, u0), r[1] = _mm256_add_epi32(s1, u1);
    r[2] = _mm256_add_epi32(s2, u2), r[3] = _mm256_add_epi32(s3, u3);
    r[4] = _mm256_add_epi32(s4, u4), r[5] = _mm256_add_epi32(s5, u5);
    r[6] = _mm256_add_epi32(s6, u6), r[7] = _mm256_add_epi32(s7, u7);
}
#undef QK_DP2

QK_TILE_INLINE void qk_tile32_2x4(const qk_panel32 *p0, const qk_panel32 *p1, int64_t nb,
                                  const uint8_t *const *a, __m256 *acc) {
    for (int64_t b = 0; b < nb; b++) {
        const qk_act_q8_32 *x[4];
        const int8_t *xq[4];
        __m256i s[8];
        for (int t = 0; t < 4; t++) x[t] = (const qk_act_q8_32 *)a[t] + b, xq[t] = x[t]->qs;
        for (int k = 0; k < 8; k++) s[k] = _mm256_setzero_si256();
        qk_quads_2x4(p0[b].q, p1[b].q, xq, 8, s);
        for (int h = 0; h < 2; h++) {
            const qk_panel32 *p = h ? &p1[b] : &p0[b];
            const __m256 d = _mm256_load_ps(p->d), m = _mm256_load_ps(p->m);
            for (int t = 0; t < 4; t++) {
                __m256 *o = &acc[4 * h + t];
                *o = _mm256_fmadd_ps(_mm256_mul_ps(d, _mm256_set1_ps(x[t]->d)), _mm256_cvtepi32_ps(s[4 * h + t]), *o);
                *o = _mm256_fmadd_ps(m, _mm256_set1_ps(x[t]->s), *o);
            }
        }
    }
}

/* The 256-element tile holds the two panels' 16 rows in one 512-bit register: half the
 * instructions of two 256-bit halves for the same work (Zen 4 runs each 512-bit operation as
 * two 256-bit halves, so the multiplier's throughput is the same), which leaves the core more
 * room to hide the loads: +3 % (Q4_K) over the 256-bit pair. What bounds it is the multiplier:
 * per super-block, token and 8 rows, 64 vpdpbusd, then the sub-block scales (8 vpmulld for
 * Q4_K, 16 for Q6_K), the min term (4 vpdpwssd against bsums32 for 32-element sub-blocks, 8
 * against bsums otherwise) and the float steps (2 mul, 2 fma) all take the same two pipes. */
static inline __m512i qk_load_2x256(const void *lo, const void *hi) {
    return _mm512_inserti64x4(_mm512_castsi256_si512(_mm256_load_si256((const __m256i *)lo)),
                              _mm256_load_si256((const __m256i *)hi), 1);
}
static inline __m512 qk_load_2x256_ps(const float *lo, const float *hi) {
    return _mm512_insertf32x8(_mm512_castps256_ps512(_mm256_load_ps(lo)), _mm256_load_ps(hi), 1);
}

/* e_t += quad j of both panels (16 rows) times token t's group j, t < 4. */
#define QK_DP16(e, j)                                                                                    \
    do {                                                                                                 \
        const __m512i w = qk_load_2x256(q0[j], q1[j]);                                                   \
        e##0 = _mm512_dpbusd_epi32(e##0, w, _mm512_set1_epi32((int)qk_load_u32((const uint8_t *)xq[0] + 4 * (j)))); \
        e##1 = _mm512_dpbusd_epi32(e##1, w, _mm512_set1_epi32((int)qk_load_u32((const uint8_t *)xq[1] + 4 * (j)))); \
        e##2 = _mm512_dpbusd_epi32(e##2, w, _mm512_set1_epi32((int)qk_load_u32((const uint8_t *)xq[2] + 4 * (j)))); \
        e##3 = _mm512_dpbusd_epi32(e##3, w, _mm512_set1_epi32((int)qk_load_u32((const uint8_t *)xq[3] + 4 * (j)))); \
    } while (0)

QK_TILE_INLINE void qk_tile256_2x4(const qk_panel256 *p0, const qk_panel256 *p1, int64_t nb, int sub,
                                   const uint8_t *const *a, __m256 *acc) {
    const int quads = sub / 4, nsub = 256 / sub;
    __m512 o[4]; /* token t: rows of p0 in the low half, of p1 in the high half */
    for (int t = 0; t < 4; t++) o[t] = _mm512_insertf32x8(_mm512_castps256_ps512(acc[t]), acc[4 + t], 1);
    for (int64_t b = 0; b < nb; b++) {
        const qk_act_q8_256 *x[4];
        __m512i tot[4], mins[4];
        for (int t = 0; t < 4; t++) {
            x[t] = (const qk_act_q8_256 *)a[t] + b;
            tot[t] = mins[t] = _mm512_setzero_si512();
        }
        for (int s = 0; s < nsub; s++) {
            const uint8_t(*q0)[QK_PANEL_ROWS][4] = p0[b].q + s * quads, (*q1)[QK_PANEL_ROWS][4] = p1[b].q + s * quads;
            const int8_t *xq[4];
            for (int t = 0; t < 4; t++) xq[t] = x[t]->qs + 4 * s * quads;
            /* even and odd quads in separate sums: 8 chains in flight for vpdpbusd's latency */
            __m512i s0 = _mm512_setzero_si512(), s1 = s0, s2 = s0, s3 = s0, u0 = s0, u1 = s0, u2 = s0, u3 = s0;
            for (int j = 0; j < quads; j += 2) {
                QK_DP16(s, j);
                QK_DP16(u, j + 1);
            }
            const __m512i sc = qk_load_2x256(p0[b].sc[s], p1[b].sc[s]);
            tot[0] = _mm512_add_epi32(tot[0], _mm512_mullo_epi32(_mm512_add_epi32(s0, u0), sc));
            tot[1] = _mm512_add_epi32(tot[1], _mm512_mullo_epi32(_mm512_add_epi32(s1, u1), sc));
            tot[2] = _mm512_add_epi32(tot[2], _mm512_mullo_epi32(_mm512_add_epi32(s2, u2), sc));
            tot[3] = _mm512_add_epi32(tot[3], _mm512_mullo_epi32(_mm512_add_epi32(s3, u3), sc));
        }
        if (sub == 32) {
            /* 32-element sub-blocks: the coefficient of sub-block s is both halves of mn[s]
             * (panel.h); pairs (c_2q, c_2q+1) meet the 32-element sums, half the vpdpwssd */
            for (int q = 0; q < 4; q++) {
                const __m512i mn = _mm512_mask_blend_epi16(0xAAAAAAAAu, qk_load_2x256(p0[b].mn[2 * q], p1[b].mn[2 * q]),
                                                           qk_load_2x256(p0[b].mn[2 * q + 1], p1[b].mn[2 * q + 1]));
                for (int t = 0; t < 4; t++)
                    mins[t] = _mm512_dpwssd_epi32(mins[t], mn,
                                                  _mm512_set1_epi32((int)qk_load_u32((const uint8_t *)&x[t]->bsums32[2 * q])));
            }
        } else {
            for (int q = 0; q < 8; q++) {
                const __m512i mn = qk_load_2x256(p0[b].mn[q], p1[b].mn[q]);
                for (int t = 0; t < 4; t++) /* dpwssd = add(madd(mn, g)): exact */
                    mins[t] = _mm512_dpwssd_epi32(mins[t], mn,
                                                  _mm512_set1_epi32((int)qk_load_u32((const uint8_t *)&x[t]->bsums[2 * q])));
            }
        }
        const __m512 d = qk_load_2x256_ps(p0[b].d, p1[b].d), nd = qk_load_2x256_ps(p0[b].nd, p1[b].nd);
        for (int t = 0; t < 4; t++) {
            const __m512 da = _mm512_set1_ps(x[t]->d);
            o[t] = _mm512_fmadd_ps(_mm512_mul_ps(d, da), _mm512_cvtepi32_ps(tot[t]), o[t]);
            o[t] = _mm512_fmadd_ps(_mm512_mul_ps(nd, da), _mm512_cvtepi32_ps(mins[t]), o[t]);
        }
    }
    for (int t = 0; t < 4; t++) {
        acc[t] = _mm512_castps512_ps256(o[t]);
        acc[4 + t] = _mm512_extractf32x8_ps(o[t], 1);
    }
}
#undef QK_DP16
#endif
#endif

/* ================================================================ products: NEON */

#if QK_TILES_NEON
/* Eight rows as two int32x4 (rows 0-3, 4-7). */
typedef struct {
    int32x4_t lo, hi;
} qk_i32x8;
typedef struct {
    float32x4_t lo, hi;
} qk_f32x8;

/* Sum over the quads j < nq of the (signed) panel times the token's bytes, per row lane. */
QK_TILE_INLINE qk_i32x8 qk_quads_dot_neon(const uint8_t (*q)[QK_PANEL_ROWS][4], const int8_t *aq, int nq) {
    qk_i32x8 r;
#if defined(__ARM_FEATURE_DOTPROD)
    int32x4_t l0 = vdupq_n_s32(0), h0 = l0, l1 = l0, h1 = l0;
    for (int j = 0; j < nq; j += 2) {
        const int8x16_t a0 = vreinterpretq_s8_u32(vdupq_n_u32(qk_load_u32((const uint8_t *)aq + 4 * j)));
        const int8x16_t a1 = vreinterpretq_s8_u32(vdupq_n_u32(qk_load_u32((const uint8_t *)aq + 4 * j + 4)));
        l0 = vdotq_s32(l0, vld1q_s8((const int8_t *)q[j][0]), a0);
        h0 = vdotq_s32(h0, vld1q_s8((const int8_t *)q[j][4]), a0);
        l1 = vdotq_s32(l1, vld1q_s8((const int8_t *)q[j + 1][0]), a1);
        h1 = vdotq_s32(h1, vld1q_s8((const int8_t *)q[j + 1][4]), a1);
    }
    r.lo = vaddq_s32(l0, l1);
    r.hi = vaddq_s32(h0, h1);
#else
    /* armv8.0: 8x8 -> 16-bit products (|q|, |a| <= 128, 127 fit), pairs widened and summed into
     * two lanes per row, the pairs added at the end */
    int32x4_t s01 = vdupq_n_s32(0), s23 = s01, s45 = s01, s67 = s01;
    for (int j = 0; j < nq; j++) {
        const int8x16_t a = vreinterpretq_s8_u32(vdupq_n_u32(qk_load_u32((const uint8_t *)aq + 4 * j)));
        const int8x16_t w0 = vld1q_s8((const int8_t *)q[j][0]), w1 = vld1q_s8((const int8_t *)q[j][4]);
        s01 = vpadalq_s16(s01, vmull_s8(vget_low_s8(w0), vget_low_s8(a)));
        s23 = vpadalq_s16(s23, vmull_high_s8(w0, a));
        s45 = vpadalq_s16(s45, vmull_s8(vget_low_s8(w1), vget_low_s8(a)));
        s67 = vpadalq_s16(s67, vmull_high_s8(w1, a));
    }
    r.lo = vpaddq_s32(s01, s23);
    r.hi = vpaddq_s32(s45, s67);
#endif
    return r;
}

QK_TILE_INLINE void qk_tile32_neon(const qk_panel32 *p, int64_t nb, const uint8_t *const *a, int T, qk_f32x8 *acc) {
    for (int64_t b = 0; b < nb; b++) {
        const float32x4_t dl = vld1q_f32(p[b].d), dh = vld1q_f32(p[b].d + 4);
        const float32x4_t ml = vld1q_f32(p[b].m), mh = vld1q_f32(p[b].m + 4);
        for (int t = 0; t < T; t++) {
            const qk_act_q8_32 *x = (const qk_act_q8_32 *)a[t] + b;
            const qk_i32x8 isum = qk_quads_dot_neon(p[b].q, x->qs, 8);
            acc[t].lo = vfmaq_f32(acc[t].lo, vmulq_n_f32(dl, x->d), vcvtq_f32_s32(isum.lo));
            acc[t].hi = vfmaq_f32(acc[t].hi, vmulq_n_f32(dh, x->d), vcvtq_f32_s32(isum.hi));
            acc[t].lo = vfmaq_n_f32(acc[t].lo, ml, x->s);
            acc[t].hi = vfmaq_n_f32(acc[t].hi, mh, x->s);
        }
    }
}

/* Lane i: (int16)(mn >> 0) * b0 + (int16)(mn >> 16) * b1. */
static inline int32x4_t qk_mins_neon(int32x4_t acc, int32x4_t mn, int16_t b0, int16_t b1) {
    acc = vmlaq_n_s32(acc, vshrq_n_s32(vshlq_n_s32(mn, 16), 16), b0);
    return vmlaq_n_s32(acc, vshrq_n_s32(mn, 16), b1);
}

QK_TILE_INLINE void qk_tile256_neon(const qk_panel256 *p, int64_t nb, int sub, const uint8_t *const *a, int T,
                                   qk_f32x8 *acc) {
    const int quads = sub / 4, nsub = 256 / sub;
    for (int64_t b = 0; b < nb; b++) {
        qk_i32x8 tot[4];
        for (int t = 0; t < T; t++) tot[t].lo = tot[t].hi = vdupq_n_s32(0);
        for (int s = 0; s < nsub; s++) {
            const int32x4_t sl = vld1q_s32(p[b].sc[s]), sh = vld1q_s32(p[b].sc[s] + 4);
            for (int t = 0; t < T; t++) {
                const qk_act_q8_256 *x = (const qk_act_q8_256 *)a[t] + b;
                const qk_i32x8 isum = qk_quads_dot_neon(p[b].q + s * quads, x->qs + 4 * s * quads, quads);
                tot[t].lo = vmlaq_s32(tot[t].lo, isum.lo, sl);
                tot[t].hi = vmlaq_s32(tot[t].hi, isum.hi, sh);
            }
        }
        const float32x4_t dl = vld1q_f32(p[b].d), dh = vld1q_f32(p[b].d + 4);
        const float32x4_t nl = vld1q_f32(p[b].nd), nh = vld1q_f32(p[b].nd + 4);
        for (int t = 0; t < T; t++) {
            const qk_act_q8_256 *x = (const qk_act_q8_256 *)a[t] + b;
            int32x4_t ml = vdupq_n_s32(0), mh = ml;
            for (int q = 0; q < 8; q++) {
                ml = qk_mins_neon(ml, vld1q_s32(p[b].mn[q]), x->bsums[2 * q], x->bsums[2 * q + 1]);
                mh = qk_mins_neon(mh, vld1q_s32(p[b].mn[q] + 4), x->bsums[2 * q], x->bsums[2 * q + 1]);
            }
            acc[t].lo = vfmaq_f32(acc[t].lo, vmulq_n_f32(dl, x->d), vcvtq_f32_s32(tot[t].lo));
            acc[t].hi = vfmaq_f32(acc[t].hi, vmulq_n_f32(dh, x->d), vcvtq_f32_s32(tot[t].hi));
            acc[t].lo = vfmaq_f32(acc[t].lo, vmulq_n_f32(nl, x->d), vcvtq_f32_s32(ml));
            acc[t].hi = vfmaq_f32(acc[t].hi, vmulq_n_f32(nh, x->d), vcvtq_f32_s32(mh));
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
QK_TILE_INLINE void qk_panel_mul(const void *panel, int fam, int sub, int group, int64_t nb, int nr,
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
#elif QK_TILES_NEON
    (void)group;
    enum { T = 4 };
    for (; t < nt; t += T) {
        const int n = nt - t < T ? (int)(nt - t) : T;
        const uint8_t *a[T];
        qk_f32x8 acc[T];
        for (int k = 0; k < T; k++) {
            a[k] = act + (size_t)(t + (k < n ? k : 0)) * act_stride;
            acc[k].lo = acc[k].hi = vdupq_n_f32(0.0f);
        }
        /* 4 tokens, or 1 at a time at the end (T stays a constant: the loops unroll) */
        if (n == T) {
            if (fam == 32)
                qk_tile32_neon((const qk_panel32 *)panel, nb, a, T, acc);
            else
                qk_tile256_neon((const qk_panel256 *)panel, nb, sub, a, T, acc);
        } else {
            for (int k = 0; k < n; k++) {
                a[0] = act + (size_t)(t + k) * act_stride;
                if (fam == 32)
                    qk_tile32_neon((const qk_panel32 *)panel, nb, a, 1, acc + k);
                else
                    qk_tile256_neon((const qk_panel256 *)panel, nb, sub, a, 1, acc + k);
            }
        }
        for (int k = 0; k < n; k++) {
            float v[8];
            vst1q_f32(v, acc[k].lo);
            vst1q_f32(v + 4, acc[k].hi);
            qk_tile_store(out, ldo, t + k, nr, v);
        }
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

#if QK_TILES_X86 == 2
/* Rows r..r+15 of two panels (p1 holds rows 8..8+nr1-1, nr1 >= 1) times nt tokens: four at a
 * time through the 2x4 tile, the rest one by one through each panel's 1-token loop. With 16
 * full rows the blocks go in spans whose two panels stay in L1 (a panel of an 8192-wide Q4_K
 * matrix is 92 KB) while every group of four tokens meets them; between spans the sums wait
 * in a small parking buffer, tokens in groups of QK_PARK_TOKENS (exact: the float steps per
 * (row, token) keep their order), and reach out once, after the last span. Parking them in
 * out itself cost ~4 % when the output row length is a multiple of 1 KiB floats (gate and up:
 * 8192): the 128 tokens' lines all fall in a few cache sets. */
#ifndef QK_L1_PANELS
#define QK_L1_PANELS (20 << 10)
#endif
#define QK_PARK_TOKENS 128
QK_TILE_INLINE void qk_panel_mul2(const void *p0, const void *p1, int fam, int sub, int64_t nb, int nr1,
                                  const uint8_t *act, size_t act_stride, int64_t nt, float *out, int64_t ldo) {
    const size_t pb = fam == 32 ? sizeof(qk_panel32) : sizeof(qk_panel256);
    const size_t ab = fam == 32 ? sizeof(qk_act_q8_32) : sizeof(qk_act_q8_256);
    int64_t span = nr1 == 8 ? (int64_t)(QK_L1_PANELS / (2 * pb)) : nb;
    span = span < 1 ? 1 : span;
    const int64_t nt4 = nt / 4 * 4;
    float park[QK_PARK_TOKENS][16];
    for (int64_t g0 = 0; g0 < nt4; g0 += QK_PARK_TOKENS) {
        const int64_t g1 = nt4 - g0 < QK_PARK_TOKENS ? nt4 : g0 + QK_PARK_TOKENS;
        for (int64_t b0 = 0; b0 < nb; b0 += span) {
            const int64_t n = nb - b0 < span ? nb - b0 : span;
            const int last = b0 + n == nb;
            const void *q0 = (const uint8_t *)p0 + (size_t)b0 * pb, *q1 = (const uint8_t *)p1 + (size_t)b0 * pb;
            for (int64_t t = g0; t < g1; t += 4) {
                float(*pk)[16] = park + (t - g0);
                const uint8_t *a[4];
                __m256 acc[8];
                for (int k = 0; k < 4; k++) {
                    a[k] = act + (size_t)(t + k) * act_stride + (size_t)b0 * ab;
                    acc[k] = b0 ? _mm256_loadu_ps(pk[k]) : _mm256_setzero_ps();
                    acc[4 + k] = b0 ? _mm256_loadu_ps(pk[k] + 8) : _mm256_setzero_ps();
                }
                if (fam == 32)
                    qk_tile32_2x4((const qk_panel32 *)q0, (const qk_panel32 *)q1, n, a, acc);
                else
                    qk_tile256_2x4((const qk_panel256 *)q0, (const qk_panel256 *)q1, n, sub, a, acc);
                for (int k = 0; k < 4; k++) {
                    if (!last) {
                        _mm256_storeu_ps(pk[k], acc[k]);
                        _mm256_storeu_ps(pk[k] + 8, acc[4 + k]);
                    } else if (nr1 == 8) {
                        _mm256_storeu_ps(out + (t + k) * ldo, acc[k]);
                        _mm256_storeu_ps(out + (t + k) * ldo + 8, acc[4 + k]);
                    } else {
                        float v[8];
                        _mm256_storeu_ps(out + (t + k) * ldo, acc[k]);
                        _mm256_storeu_ps(v, acc[4 + k]);
                        qk_tile_store(out + 8, ldo, t + k, nr1, v);
                    }
                }
            }
        }
    }
    if (nt4 < nt) {
        const uint8_t *a = act + (size_t)nt4 * act_stride;
        qk_panel_mul(p0, fam, sub, 0, nb, 8, a, act_stride, nt - nt4, out + nt4 * ldo, ldo);
        qk_panel_mul(p1, fam, sub, 0, nb, nr1, a, act_stride, nt - nt4, out + nt4 * ldo + 8, ldo);
    }
}
#define QK_PANEL_PAIRS 1
#else
#define QK_PANEL_PAIRS 0
#endif

/* ================================================================ one gemm per type */

/* One panel (rows <= 8) or two (8 < rows <= 16, QK_PANEL_PAIRS builds) times the tokens. */
#if QK_PANEL_PAIRS
#define QK_PANEL_MUL(p0, p1, fam, sub, group, nb, rows, act, stride, nt, out, ldo)                    \
    do {                                                                                              \
        if ((rows) > QK_PANEL_ROWS)                                                                   \
            qk_panel_mul2(p0, p1, fam, sub, nb, (rows) - QK_PANEL_ROWS, act, stride, nt, out, ldo);   \
        else                                                                                          \
            qk_panel_mul(p0, fam, sub, group, nb, rows, act, stride, nt, out, ldo);                   \
    } while (0)
#else
#define QK_PANEL_MUL(p0, p1, fam, sub, group, nb, rows, act, stride, nt, out, ldo)                    \
    qk_panel_mul(p0, fam, sub, group, nb, rows, act, stride, nt, out, ldo)
#endif

/* QK_IF_SET(M, code): the code where the macro M is defined as 1, nothing otherwise (a probe:
 * QK_PROBE_1 adds an argument). Needs a conforming preprocessor (MSVC: /std:c17 has it). */
#define QK_PROBE_1 ~, 1
#define QK_SECOND_(a, b, ...) b
#define QK_SECOND(...) QK_SECOND_(__VA_ARGS__)
#define QK_IS_SET_(v) QK_SECOND(QK_PROBE_##v, 0, ~)
#define QK_IS_SET(m) QK_IS_SET_(m)
#define QK_CAT_(a, b) a##b
#define QK_CAT(a, b) QK_CAT_(a, b)
#define QK_IF_0(...)
#define QK_IF_1(...) __VA_ARGS__
#define QK_IF_SET(m, ...) QK_CAT(QK_IF_, QK_IS_SET(m))(__VA_ARGS__)

/* Panels of 8 rows, each unpacked once by the type's qk_pack_<name> and met by every token.
 * One token (decode) goes through the type's qk_decode_<name> where it has one (panel_unpack.h,
 * gemv.h: the same numbers without the panel; scratch as the gemm's). */
#define QK_GEMM_PANELS(name, BYTES, fam, sub, group)                                                  \
    static void qk_gemm_##name(int64_t n, const uint8_t *w, size_t row_bytes, int64_t nr, const uint8_t *act, \
                               size_t act_stride, int64_t nt, float *out, int64_t ldo, void *scratch) {      \
        QK_IF_SET(QK_HAS_DECODE_##name, if (nt == 1) {                                                \
            qk_decode_##name(n, w, row_bytes, nr, act, out, scratch);                                 \
            return;                                                                                   \
        })                                                                                            \
        qk_panel##fam *p = (qk_panel##fam *)scratch;                                                  \
        const int64_t nb = n / (fam);                                                                 \
        const int pairs = QK_PANEL_PAIRS && nt >= 4; /* prefill: 16 rows at a time */                 \
        for (int64_t r = 0; r < nr;) {                                                                \
            int done = 0;                                                                             \
            for (int h = 0; h <= pairs && r + done < nr; h++) {                                       \
                const int rows = nr - r - done < QK_PANEL_ROWS ? (int)(nr - r - done) : QK_PANEL_ROWS; \
                const uint8_t *rp[8];                                                                 \
                qk_panel_rows(w + (size_t)(r + done) * row_bytes, row_bytes, rows, rp);              \
                for (int64_t b = 0; b < nb; b++) {                                                    \
                    for (size_t k = 0; k < (size_t)(BYTES); k += 64)                                  \
                        qk_prefetch_next_panel(rp, row_bytes, (size_t)b * (BYTES) + k);               \
                    qk_pack_##name(rp, (size_t)b * (BYTES), &p[h * (nb + 1) + b]);                     \
                }                                                                                     \
                done += rows;                                                                         \
            }                                                                                         \
            QK_PANEL_MUL(p, p + nb + 1, fam, sub, group, nb, done, act, act_stride, nt, out + r, ldo); \
            r += done;                                                                                \
        }                                                                                             \
    }
#define QK_GEMM_32(name, BYTES, sub, group) QK_GEMM_PANELS(name, BYTES, 32, sub, group)
#define QK_GEMM_256(name, BYTES, sub, group) QK_GEMM_PANELS(name, BYTES, 256, sub, group)

#define QK_GEMM_0(name, BYTES, sub, group) /* float weights: no panel, their dot runs */

#define QK_TYPE(NAME, name, id, elems, bytes, act, panel, sub, group) QK_GEMM_##panel(name, bytes, sub, group)
#include "quant_types.def"
#undef QK_TYPE

#endif
