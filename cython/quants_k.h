/* K-quants (Q2_K, Q3_K, Q4_K, Q5_K, Q6_K) and the non-linear 4-bit types (IQ4_NL, IQ4_XS):
 * dequantize, and dot products against quantized activations.
 *
 * Conventions: quants_common.h. The K-quants and IQ4_XS work in super-blocks of 256 elements
 * and take Q8_256 activations (qk_act_q8_256, quantized by qk_quantize_q8_256 below); IQ4_NL
 * has 32-element blocks and takes Q8_32 activations.
 *
 * Block layouts follow ggml's ggml-common.h; the element order inside each block is what
 * gguf.quants.dequantize computes (the tests hold us to it bit for bit). Every block struct is
 * made of bytes only, so a block may sit at any address.
 *
 * Dot products: the weight quants are unsigned (or made unsigned with a per-group offset that
 * the activation's bsums cancel; IQ4 moves the value's sign onto the activation), multiplied
 * with the int8 activations by maddubs into int16 pairs, then scaled per 16/32-element group in
 * int16 x int16 -> int32 (madd, or VNNI's dpwssd), and converted to f32 once per super-block.
 * The portable C is the ground truth; AVX2 and AVX-512 paths follow it. No NEON path yet: arm64
 * builds run the portable code (which compilers vectorize reasonably).
 */
#ifndef QPACK_QUANTS_K_H
#define QPACK_QUANTS_K_H

#include "quants_common.h"

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VNNI__)
#define QK_K_AVX512 1
#else
#define QK_K_AVX512 0
#endif
#if !QK_K_AVX512 && defined(__AVX2__) && defined(__FMA__)
#define QK_K_AVX2 1
#else
#define QK_K_AVX2 0
#endif

#define QK_SUPER 256 /* elements per K-quant super-block */

/* ---------------------------------------------------------------- block layouts */

typedef struct {
    uint8_t scales[16]; /* per 16 elements: low nibble scale, high nibble min */
    uint8_t qs[64];     /* 2-bit quants */
    uint8_t d[2];       /* f16 */
    uint8_t dmin[2];    /* f16 */
} qk_block_q2_k;

typedef struct {
    uint8_t hmask[32];  /* high bit of each quant (set: no -4 offset) */
    uint8_t qs[64];     /* low 2 bits */
    uint8_t scales[12]; /* 16 6-bit scales, offset by 32 */
    uint8_t d[2];
} qk_block_q3_k;

typedef struct {
    uint8_t d[2];
    uint8_t dmin[2];
    uint8_t scales[12]; /* 8 6-bit scales and 8 6-bit mins */
    uint8_t qs[128];    /* 4-bit quants */
} qk_block_q4_k;

typedef struct {
    uint8_t d[2];
    uint8_t dmin[2];
    uint8_t scales[12];
    uint8_t qh[32];     /* 5th bit: bit b of qh[l] belongs to element 32*b + l */
    uint8_t qs[128];
} qk_block_q5_k;

typedef struct {
    uint8_t ql[128];    /* low 4 bits */
    uint8_t qh[64];     /* high 2 bits */
    int8_t scales[16];  /* per 16 elements */
    uint8_t d[2];
} qk_block_q6_k;

typedef struct {
    uint8_t d[2];
    uint8_t qs[16];     /* indices into qk_iq4_values */
} qk_block_iq4_nl;

typedef struct {
    uint8_t d[2];
    uint8_t scales_h[2]; /* u16: 2 high bits of each of the 8 sub-block scales */
    uint8_t scales_l[4]; /* 4 low bits of each sub-block scale */
    uint8_t qs[128];
} qk_block_iq4_xs;

_Static_assert(sizeof(qk_block_q2_k) == 84, "Q2_K block");
_Static_assert(sizeof(qk_block_q3_k) == 110, "Q3_K block");
_Static_assert(sizeof(qk_block_q4_k) == 144, "Q4_K block");
_Static_assert(sizeof(qk_block_q5_k) == 176, "Q5_K block");
_Static_assert(sizeof(qk_block_q6_k) == 210, "Q6_K block");
_Static_assert(sizeof(qk_block_iq4_nl) == 18, "IQ4_NL block");
_Static_assert(sizeof(qk_block_iq4_xs) == 136, "IQ4_XS block");
_Static_assert(sizeof(qk_act_q8_256) == 292, "Q8_256 activation block");

/* The 16 non-linear levels of IQ4_NL / IQ4_XS. */
static const int8_t qk_iq4_values[16] = {
    -127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113,
};

static inline float qk_k_half(const uint8_t *p) {
    return qk_fp16_to_fp32(qk_load_u16(p));
}

/* Q4_K/Q5_K: 12 bytes -> 8 6-bit scales and 8 6-bit mins, as two little-endian words each
 * (byte j of the pair = sub-block j). Bytes 0-3 hold scales 0-3 (and the top bits of scales
 * 4-7), bytes 4-7 mins 0-3 (and the top bits of mins 4-7), bytes 8-11 the low nibbles of
 * scales 4-7 and, in their high nibbles, of mins 4-7. */
static inline void qk_k4_scales(const uint8_t *p, uint32_t sc[2], uint32_t mn[2]) {
    const uint32_t a = qk_load_u32(p), b = qk_load_u32(p + 4), c = qk_load_u32(p + 8);
    sc[0] = a & 0x3f3f3f3fu;
    mn[0] = b & 0x3f3f3f3fu;
    sc[1] = (c & 0x0f0f0f0fu) | ((a >> 2) & 0x30303030u);
    mn[1] = ((c >> 4) & 0x0f0f0f0fu) | ((b >> 2) & 0x30303030u);
}

/* Q3_K: 12 bytes -> 16 signed 6-bit scales. Bytes 0-7: low nibbles of scales 0-7, high
 * nibbles of scales 8-15; bytes 8-11: the top two bits, scale i in byte 8 + i%4 at bit
 * 2*(i/4). */
static inline void qk_k3_scales(const uint8_t *p, int8_t out[16]) {
    const uint32_t a0 = qk_load_u32(p), a1 = qk_load_u32(p + 4), a2 = qk_load_u32(p + 8);
    uint32_t w[4];
    w[0] = (a0 & 0x0f0f0f0fu) | ((a2 & 0x03030303u) << 4);
    w[1] = (a1 & 0x0f0f0f0fu) | (((a2 >> 2) & 0x03030303u) << 4);
    w[2] = ((a0 >> 4) & 0x0f0f0f0fu) | (((a2 >> 4) & 0x03030303u) << 4);
    w[3] = ((a1 >> 4) & 0x0f0f0f0fu) | (((a2 >> 6) & 0x03030303u) << 4);
    uint8_t u[16];
    memcpy(u, w, 16);
    for (int i = 0; i < 16; i++) out[i] = (int8_t)(u[i] - 32);
}

/* IQ4_XS: sub-block scale ib (0..7), signed 6-bit. */
static inline int qk_iq4xs_scale(const qk_block_iq4_xs *x, int ib) {
    const int lo = (x->scales_l[ib / 2] >> (4 * (ib % 2))) & 0xf;
    const int hi = (qk_load_u16(x->scales_h) >> (2 * ib)) & 3;
    return (lo | (hi << 4)) - 32;
}

/* ---------------------------------------------------------------- scalar building blocks */
/* The portable code unpacks one super-block's quants into int8 q[256] in element order, then
 * works per group with plain loops (which compilers vectorize even for baseline SSE2). */

static inline int32_t qk_k_dot_i8(const int8_t *restrict q, const int8_t *restrict a, int len) {
    int32_t s = 0;
    for (int l = 0; l < len; l++) s += q[l] * a[l];
    return s;
}

static inline void qk_unpack_q2_k(const qk_block_q2_k *x, int8_t q[QK_SUPER]) {
    for (int h = 0; h < 2; h++)
        for (int j = 0; j < 4; j++)
            for (int l = 0; l < 32; l++)
                q[128 * h + 32 * j + l] = (int8_t)((x->qs[32 * h + l] >> (2 * j)) & 3);
}

static inline void qk_unpack_q3_k(const qk_block_q3_k *x, int8_t q[QK_SUPER]) {
    for (int h = 0; h < 2; h++)
        for (int j = 0; j < 4; j++)
            for (int l = 0; l < 32; l++)
                q[128 * h + 32 * j + l] = (int8_t)(((x->qs[32 * h + l] >> (2 * j)) & 3) - 4 +
                                                   4 * ((x->hmask[l] >> (4 * h + j)) & 1));
}

static inline void qk_unpack_q4_k(const qk_block_q4_k *x, int8_t q[QK_SUPER]) {
    for (int c = 0; c < 4; c++)
        for (int l = 0; l < 32; l++) {
            q[64 * c + l] = (int8_t)(x->qs[32 * c + l] & 0xf);
            q[64 * c + 32 + l] = (int8_t)(x->qs[32 * c + l] >> 4);
        }
}

static inline void qk_unpack_q5_k(const qk_block_q5_k *x, int8_t q[QK_SUPER]) {
    for (int c = 0; c < 4; c++)
        for (int l = 0; l < 32; l++) {
            q[64 * c + l] = (int8_t)((x->qs[32 * c + l] & 0xf) | (((x->qh[l] >> (2 * c)) & 1) << 4));
            q[64 * c + 32 + l] = (int8_t)((x->qs[32 * c + l] >> 4) | (((x->qh[l] >> (2 * c + 1)) & 1) << 4));
        }
}

static inline void qk_unpack_q6_k(const qk_block_q6_k *x, int8_t q[QK_SUPER]) {
    for (int h = 0; h < 2; h++) {
        const uint8_t *ql = x->ql + 64 * h, *qh = x->qh + 32 * h;
        int8_t *out = q + 128 * h;
        for (int l = 0; l < 32; l++) {
            out[l] = (int8_t)(((ql[l] & 0xf) | ((qh[l] & 3) << 4)) - 32);
            out[32 + l] = (int8_t)(((ql[32 + l] & 0xf) | (((qh[l] >> 2) & 3) << 4)) - 32);
            out[64 + l] = (int8_t)(((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) - 32);
            out[96 + l] = (int8_t)(((ql[32 + l] >> 4) | (((qh[l] >> 6) & 3) << 4)) - 32);
        }
    }
}

/* 16 bytes of IQ4 indices -> 32 values: low nibbles first, then high nibbles. */
static inline void qk_unpack_iq4(const uint8_t *qs, int8_t q[32]) {
    for (int j = 0; j < 16; j++) {
        q[j] = qk_iq4_values[qs[j] & 0xf];
        q[j + 16] = qk_iq4_values[qs[j] >> 4];
    }
}

/* ---------------------------------------------------------------- SIMD helpers */

#if QK_K_AVX2 || QK_K_AVX512
static inline __m256i qk_k_ld256(const void *p) {
    return _mm256_loadu_si256((const __m256i *)p);
}

/* pshufb control that repeats 16-bit element e of each 128-bit lane across the lane. */
#define QK_K_WORD(e) ((short)(0x0100 + 0x0202 * (e)))

/* 128-bit lane 0 repeats word lo, lane 1 word hi. */
static inline __m256i qk_k_word_pair256(int lo, int hi) {
    return _mm256_set_m128i(_mm_set1_epi16(QK_K_WORD(hi)), _mm_set1_epi16(QK_K_WORD(lo)));
}

/* Q4_K/Q5_K scales and mins as 16 bytes [sc0..sc7, mn0..mn7] (see qk_k4_scales). Reads 16
 * bytes at p: the 12 scale bytes and 4 bytes of the block after them, ignored. */
static inline __m128i qk_k4_scales_sse(const uint8_t *p) {
    const __m128i v = _mm_loadu_si128((const __m128i *)p);
    const __m128i ab = _mm_shuffle_epi32(v, _MM_SHUFFLE(1, 0, 1, 0));
    const __m128i cc = _mm_shuffle_epi32(v, _MM_SHUFFLE(2, 2, 2, 2));
    const __m128i c = _mm_srlv_epi32(cc, _mm_setr_epi32(0, 4, 0, 4)); /* c, c >> 4, c, c >> 4 */
    const __m128i lo = _mm_and_si128(ab, _mm_set1_epi8(0x3f));
    const __m128i hi = _mm_or_si128(_mm_and_si128(c, _mm_set1_epi8(0x0f)),
                                    _mm_and_si128(_mm_srli_epi32(ab, 2), _mm_set1_epi8(0x30)));
    return _mm_unpacklo_epi32(lo, hi); /* sc0-3, sc4-7, mn0-3, mn4-7 */
}

/* Mins from qk_k4_scales_sse as 16 int16, each repeated for the two bsums of its sub-block. */
static inline __m256i qk_k4_mins_paired(__m128i scmn) {
    const __m128i pairs = _mm_setr_epi8(8, 8, 9, 9, 10, 10, 11, 11, 12, 12, 13, 13, 14, 14, 15, 15);
    return _mm256_cvtepu8_epi16(_mm_shuffle_epi8(scmn, pairs));
}

/* Q3_K's 16 scales as signed bytes (offset removed), see qk_k3_scales. */
static inline __m128i qk_k3_scales_sse(const uint8_t *p) {
    const __m128i m0f = _mm_set1_epi8(0x0f);
    const __m128i b = _mm_loadl_epi64((const __m128i *)p);
    const __m128i low = _mm_unpacklo_epi64(_mm_and_si128(b, m0f), _mm_and_si128(_mm_srli_epi16(b, 4), m0f));
    const __m128i hi = _mm_srlv_epi32(_mm_set1_epi32((int)qk_load_u32(p + 8)), _mm_setr_epi32(0, 2, 4, 6));
    const __m128i top = _mm_and_si128(hi, _mm_set1_epi8(3));
    return _mm_sub_epi8(_mm_or_si128(low, _mm_slli_epi16(top, 4)), _mm_set1_epi8(32));
}
#endif

#if QK_K_AVX512
/* Lower 256 bits repeat word lo of each 128-bit lane, upper 256 bits word hi. */
static inline __m512i qk_k_word_pair512(int lo, int hi) {
    return _mm512_inserti64x4(_mm512_castsi256_si512(_mm256_set1_epi16(QK_K_WORD(lo))),
                              _mm256_set1_epi16(QK_K_WORD(hi)), 1);
}

/* 16-bit lane i of the result = 16-bit element first + i/8 (vpermw index). */
static inline __m512i qk_k_group_index(int first) {
    return _mm512_add_epi16(_mm512_set1_epi16((short)first),
                            _mm512_set_epi16(3, 3, 3, 3, 3, 3, 3, 3, 2, 2, 2, 2, 2, 2, 2, 2,
                                             1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0));
}

/* Counts for a per-256-bit-half variable shift of 16-bit lanes. */
static inline __m512i qk_k_half_counts16(int lo, int hi) {
    return _mm512_inserti64x4(_mm512_set1_epi16((short)lo), _mm256_set1_epi16((short)hi), 1);
}

static inline __m512i qk_k_bcast256(const uint8_t *p) {
    return _mm512_broadcast_i64x4(qk_k_ld256(p));
}
#endif

/* ---------------------------------------------------------------- Q8_256 activations */

/* Round to nearest int8 with d = max|x| / 127 (ggml's Q8_K), plus the 16-element sums. Every
 * variant produces the same bytes (one f32 multiply, round half to even), so the variants'
 * dot products differ only by f32 summation order. */
static void qk_quantize_q8_256(const float *restrict x, void *restrict dst, int64_t n) {
    qk_act_q8_256 *y = (qk_act_q8_256 *)dst;
    for (int64_t i = 0; i < n / QK_SUPER; i++, x += QK_SUPER) {
        float amax = 0.0f;
#if QK_K_AVX512
        __m512 vmax = _mm512_setzero_ps();
        for (int j = 0; j < QK_SUPER; j += 16)
            vmax = _mm512_max_ps(vmax, _mm512_abs_ps(_mm512_loadu_ps(x + j)));
        amax = _mm512_reduce_max_ps(vmax);
#else
        for (int j = 0; j < QK_SUPER; j++) amax = fmaxf(amax, fabsf(x[j]));
#endif
        if (!(amax > 0.0f) || !isfinite(amax)) {
            /* all zero (or not finite: nothing sensible to keep) */
            y[i].d = 0.0f;
            memset(y[i].qs, 0, sizeof y[i].qs);
            memset(y[i].bsums, 0, sizeof y[i].bsums);
            continue;
        }
        const float id = 127.0f / amax;
        y[i].d = amax / 127.0f;
#if QK_K_AVX512
        const __m512 vid = _mm512_set1_ps(id);
        for (int j = 0; j < QK_SUPER; j += 16) {
            const __m512i v = _mm512_cvtps_epi32(_mm512_mul_ps(_mm512_loadu_ps(x + j), vid));
            _mm_storeu_si128((__m128i *)(y[i].qs + j), _mm512_cvtsepi32_epi8(v));
            y[i].bsums[j / 16] = (int16_t)_mm512_reduce_add_epi32(v);
        }
#elif QK_K_AVX2
        const __m256 vid = _mm256_set1_ps(id);
        for (int j = 0; j < QK_SUPER; j += 32) {
            __m256i v[4];
            for (int k = 0; k < 4; k++)
                v[k] = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(x + j + 8 * k), vid));
            /* packs work per 128-bit lane: the permute restores element order */
            const __m256i w = _mm256_packs_epi16(_mm256_packs_epi32(v[0], v[1]),
                                                 _mm256_packs_epi32(v[2], v[3]));
            const __m256i q = _mm256_permutevar8x32_epi32(w, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
            _mm256_storeu_si256((__m256i *)(y[i].qs + j), q);
        }
        for (int g = 0; g < 16; g++) {
            int s = 0;
            for (int l = 0; l < 16; l++) s += y[i].qs[16 * g + l];
            y[i].bsums[g] = (int16_t)s;
        }
#else
        for (int j = 0; j < QK_SUPER; j++) {
            long v = lrintf(x[j] * id);
            y[i].qs[j] = (int8_t)(v > 127 ? 127 : v < -127 ? -127 : v);
        }
        for (int g = 0; g < 16; g++) {
            int s = 0;
            for (int l = 0; l < 16; l++) s += y[i].qs[16 * g + l];
            y[i].bsums[g] = (int16_t)s;
        }
#endif
    }
}

/* ---------------------------------------------------------------- Q2_K */
/* Element 128*h + 32*j + l (h half, j 0..3, l 0..31) = bits 2j..2j+1 of qs[32*h + l];
 * x = d*(sc & 15)*q - dmin*(sc >> 4), sc = scales[(128*h + 32*j + l) / 16]. */

QK_NO_CONTRACT static void qk_dequant_q2_k(const void *restrict src, float *restrict y, int64_t n) {
    QK_NO_CONTRACT_BODY
    const qk_block_q2_k *x = (const qk_block_q2_k *)src;
    int8_t q[QK_SUPER];
    for (int64_t i = 0; i < n / QK_SUPER; i++, y += QK_SUPER) {
        const float d = qk_k_half(x[i].d), dmin = qk_k_half(x[i].dmin);
        qk_unpack_q2_k(&x[i], q);
        for (int g = 0; g < 16; g++) {
            const float dl = d * (float)(x[i].scales[g] & 0xf);
            const float ml = dmin * (float)(x[i].scales[g] >> 4);
            for (int l = 0; l < 16; l++) y[16 * g + l] = dl * (float)q[16 * g + l] - ml;
        }
    }
}

static float qk_dot_q2_k(int64_t n, const void *restrict w, const void *restrict act) {
    const qk_block_q2_k *x = (const qk_block_q2_k *)w;
    const qk_act_q8_256 *y = (const qk_act_q8_256 *)act;
    const int64_t nb = n / QK_SUPER;
#if QK_K_AVX512
    const __m512i m3 = _mm512_set1_epi8(3);
    const __m512i m4 = _mm512_set1_epi8(0xf);
    __m512 acc = _mm512_setzero_ps();
    __m256 acc_min = _mm256_setzero_ps();
    for (int64_t i = 0; i < nb; i++) {
        const float d = y[i].d * qk_k_half(x[i].d), dmin = y[i].d * qk_k_half(x[i].dmin);
        const __m128i sc8 = _mm_loadu_si128((const __m128i *)x[i].scales);
        const __m128i m4x = _mm512_castsi512_si128(m4);
        const __m256i mins = _mm256_cvtepu8_epi16(_mm_and_si128(_mm_srli_epi16(sc8, 4), m4x));
        const __m256i bsums = qk_k_ld256(y[i].bsums);
        acc_min = _mm256_fmadd_ps(_mm256_set1_ps(dmin),
                                  _mm256_cvtepi32_ps(_mm256_madd_epi16(bsums, mins)), acc_min);
        const __m512i sc = _mm512_castsi256_si512(_mm256_cvtepu8_epi16(_mm_and_si128(sc8, m4x)));
        __m512i sumi = _mm512_setzero_si512();
#pragma GCC unroll 4
        for (int c = 0; c < 4; c++) { /* 64 elements: half c/2, bit pairs j = 2*(c%2), +1 */
            const __m512i qb = qk_k_bcast256(x[i].qs + 32 * (c / 2));
            const __m512i q = _mm512_and_si512(
                _mm512_srlv_epi16(qb, qk_k_half_counts16(4 * (c % 2), 4 * (c % 2) + 2)), m3);
            const __m512i p = _mm512_maddubs_epi16(q, _mm512_loadu_si512(y[i].qs + 64 * c));
            sumi = _mm512_dpwssd_epi32(sumi, p, _mm512_permutexvar_epi16(qk_k_group_index(4 * c), sc));
        }
        acc = _mm512_fmadd_ps(_mm512_set1_ps(d), _mm512_cvtepi32_ps(sumi), acc);
    }
    return _mm512_reduce_add_ps(acc) - qk_hsum_ps256(acc_min);
#elif QK_K_AVX2
    const __m256i m3 = _mm256_set1_epi8(3);
    const __m128i m4 = _mm_set1_epi8(0xf);
    __m256 acc = _mm256_setzero_ps();
    __m256 acc_min = _mm256_setzero_ps();
    for (int64_t i = 0; i < nb; i++) {
        const float d = y[i].d * qk_k_half(x[i].d), dmin = y[i].d * qk_k_half(x[i].dmin);
        const __m128i sc8 = _mm_loadu_si128((const __m128i *)x[i].scales);
        const __m256i mins = _mm256_cvtepu8_epi16(_mm_and_si128(_mm_srli_epi16(sc8, 4), m4));
        const __m256i bsums = qk_k_ld256(y[i].bsums);
        acc_min = _mm256_fmadd_ps(_mm256_set1_ps(dmin),
                                  _mm256_cvtepi32_ps(_mm256_madd_epi16(bsums, mins)), acc_min);
        const __m256i sc = _mm256_cvtepu8_epi16(_mm_and_si128(sc8, m4));
        __m256i sumi = _mm256_setzero_si256();
        for (int h = 0; h < 2; h++) {
            const __m256i scb = h ? _mm256_permute2x128_si256(sc, sc, 0x11) : _mm256_permute2x128_si256(sc, sc, 0x00);
            const __m256i qb = qk_k_ld256(x[i].qs + 32 * h);
#pragma GCC unroll 4
            for (int j = 0; j < 4; j++) {
                const __m256i q = _mm256_and_si256(_mm256_srli_epi16(qb, 2 * j), m3);
                const __m256i p = _mm256_maddubs_epi16(
                    q, qk_k_ld256(y[i].qs + 128 * h + 32 * j));
                const __m256i s = _mm256_shuffle_epi8(scb, qk_k_word_pair256(2 * j, 2 * j + 1));
                sumi = _mm256_add_epi32(sumi, _mm256_madd_epi16(p, s));
            }
        }
        acc = _mm256_fmadd_ps(_mm256_set1_ps(d), _mm256_cvtepi32_ps(sumi), acc);
    }
    return qk_hsum_ps256(acc) - qk_hsum_ps256(acc_min);
#else
    float sum = 0.0f;
    int8_t q[QK_SUPER];
    for (int64_t i = 0; i < nb; i++) {
        qk_unpack_q2_k(&x[i], q);
        int32_t sumi = 0, summ = 0;
        for (int g = 0; g < 16; g++) {
            sumi += (x[i].scales[g] & 0xf) * qk_k_dot_i8(q + 16 * g, y[i].qs + 16 * g, 16);
            summ += (x[i].scales[g] >> 4) * y[i].bsums[g];
        }
        sum += y[i].d * qk_k_half(x[i].d) * (float)sumi - y[i].d * qk_k_half(x[i].dmin) * (float)summ;
    }
    return sum;
#endif
}

/* ---------------------------------------------------------------- Q3_K */
/* Element 128*h + 32*j + l: low bits 2j..2j+1 of qs[32*h + l], minus 4 unless bit 4h+j of
 * hmask[l] is set; x = d*(scale-32)*q, scale per 16 elements. */

static void qk_dequant_q3_k(const void *restrict src, float *restrict y, int64_t n) {
    const qk_block_q3_k *x = (const qk_block_q3_k *)src;
    int8_t q[QK_SUPER], sc[16];
    for (int64_t i = 0; i < n / QK_SUPER; i++, y += QK_SUPER) {
        const float d = qk_k_half(x[i].d);
        qk_unpack_q3_k(&x[i], q);
        qk_k3_scales(x[i].scales, sc);
        for (int g = 0; g < 16; g++) {
            const float dl = d * (float)sc[g];
            for (int l = 0; l < 16; l++) y[16 * g + l] = dl * (float)q[16 * g + l];
        }
    }
}

static float qk_dot_q3_k(int64_t n, const void *restrict w, const void *restrict act) {
    const qk_block_q3_k *x = (const qk_block_q3_k *)w;
    const qk_act_q8_256 *y = (const qk_act_q8_256 *)act;
    const int64_t nb = n / QK_SUPER;
    /* With q' = q + 4 in 0..7 (unsigned for maddubs): sum sc*q*a = sum sc*q'*a - 4*sum sc*bsum. */
#if QK_K_AVX512
    const __m512i m3 = _mm512_set1_epi8(3);
    const __m512i four = _mm512_set1_epi8(4);
    __m512 acc = _mm512_setzero_ps();
    for (int64_t i = 0; i < nb; i++) {
        const float d = y[i].d * qk_k_half(x[i].d);
        const __m256i sc16 = _mm256_cvtepi8_epi16(qk_k3_scales_sse(x[i].scales));
        const __m256i off = _mm256_madd_epi16(qk_k_ld256(y[i].bsums), sc16);
        const __m512i sc = _mm512_castsi256_si512(sc16);
        const __m512i hm = qk_k_bcast256(x[i].hmask);
        __m512i sumi = _mm512_setzero_si512();
#pragma GCC unroll 4
        for (int c = 0; c < 4; c++) { /* half h = c/2, bit pairs j = 2*(c%2), +1 */
            const int h = c / 2, j = 2 * (c % 2);
            const __m512i qb = qk_k_bcast256(x[i].qs + 32 * h);
            __m512i q = _mm512_and_si512(_mm512_srlv_epi16(qb, qk_k_half_counts16(2 * j, 2 * j + 2)), m3);
            const __m512i bit = _mm512_inserti64x4(_mm512_set1_epi8((char)(1 << (4 * h + j))),
                                                   _mm256_set1_epi8((char)(1 << (4 * h + j + 1))), 1);
            q = _mm512_mask_add_epi8(q, _mm512_test_epi8_mask(hm, bit), q, four);
            const __m512i p = _mm512_maddubs_epi16(q, _mm512_loadu_si512(y[i].qs + 64 * c));
            sumi = _mm512_dpwssd_epi32(sumi, p, _mm512_permutexvar_epi16(qk_k_group_index(4 * c), sc));
        }
        sumi = _mm512_sub_epi32(sumi, _mm512_zextsi256_si512(_mm256_slli_epi32(off, 2)));
        acc = _mm512_fmadd_ps(_mm512_set1_ps(d), _mm512_cvtepi32_ps(sumi), acc);
    }
    return _mm512_reduce_add_ps(acc);
#elif QK_K_AVX2
    const __m256i m3 = _mm256_set1_epi8(3);
    const __m256i four = _mm256_set1_epi8(4);
    __m256 acc = _mm256_setzero_ps();
    for (int64_t i = 0; i < nb; i++) {
        const float d = y[i].d * qk_k_half(x[i].d);
        const __m256i sc = _mm256_cvtepi8_epi16(qk_k3_scales_sse(x[i].scales));
        const __m256i off = _mm256_madd_epi16(qk_k_ld256(y[i].bsums), sc);
        const __m256i hm = qk_k_ld256(x[i].hmask);
        __m256i sumi = _mm256_setzero_si256();
        for (int h = 0; h < 2; h++) {
            const __m256i scb = h ? _mm256_permute2x128_si256(sc, sc, 0x11) : _mm256_permute2x128_si256(sc, sc, 0x00);
            const __m256i qb = qk_k_ld256(x[i].qs + 32 * h);
#pragma GCC unroll 4
            for (int j = 0; j < 4; j++) {
                const __m256i bit = _mm256_set1_epi8((char)(1 << (4 * h + j)));
                const __m256i hi = _mm256_and_si256(_mm256_cmpeq_epi8(_mm256_and_si256(hm, bit), bit), four);
                const __m256i q = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(qb, 2 * j), m3), hi);
                const __m256i p = _mm256_maddubs_epi16(
                    q, qk_k_ld256(y[i].qs + 128 * h + 32 * j));
                const __m256i s = _mm256_shuffle_epi8(scb, qk_k_word_pair256(2 * j, 2 * j + 1));
                sumi = _mm256_add_epi32(sumi, _mm256_madd_epi16(p, s));
            }
        }
        sumi = _mm256_sub_epi32(sumi, _mm256_slli_epi32(off, 2));
        acc = _mm256_fmadd_ps(_mm256_set1_ps(d), _mm256_cvtepi32_ps(sumi), acc);
    }
    return qk_hsum_ps256(acc);
#else
    float sum = 0.0f;
    int8_t q[QK_SUPER], sc[16];
    for (int64_t i = 0; i < nb; i++) {
        qk_unpack_q3_k(&x[i], q);
        qk_k3_scales(x[i].scales, sc);
        int32_t sumi = 0;
        for (int g = 0; g < 16; g++) sumi += sc[g] * qk_k_dot_i8(q + 16 * g, y[i].qs + 16 * g, 16);
        sum += y[i].d * qk_k_half(x[i].d) * (float)sumi;
    }
    return sum;
#endif
}

/* ---------------------------------------------------------------- Q4_K */
/* Sub-block b (32 elements) = low nibbles (b even) or high nibbles (b odd) of
 * qs[32*(b/2) .. +31]; x = d*sc[b]*q - dmin*mn[b]. */

QK_NO_CONTRACT static void qk_dequant_q4_k(const void *restrict src, float *restrict y, int64_t n) {
    QK_NO_CONTRACT_BODY
    const qk_block_q4_k *x = (const qk_block_q4_k *)src;
    int8_t q[QK_SUPER];
    uint8_t sc[8], mn[8];
    for (int64_t i = 0; i < n / QK_SUPER; i++, y += QK_SUPER) {
        const float d = qk_k_half(x[i].d), dmin = qk_k_half(x[i].dmin);
        uint32_t scw[2], mnw[2];
        qk_k4_scales(x[i].scales, scw, mnw);
        memcpy(sc, scw, 8);
        memcpy(mn, mnw, 8);
        qk_unpack_q4_k(&x[i], q);
        for (int b = 0; b < 8; b++) {
            const float dl = d * (float)sc[b], ml = dmin * (float)mn[b];
            for (int l = 0; l < 32; l++) y[32 * b + l] = dl * (float)q[32 * b + l] - ml;
        }
    }
}

static float qk_dot_q4_k(int64_t n, const void *restrict w, const void *restrict act) {
    const qk_block_q4_k *x = (const qk_block_q4_k *)w;
    const qk_act_q8_256 *y = (const qk_act_q8_256 *)act;
    const int64_t nb = n / QK_SUPER;
#if QK_K_AVX2 || QK_K_AVX512
    /* 256-bit in the AVX-512 variant too: a 512-bit version (each 32 quant bytes broadcast and
     * shifted per half) measured ~15% slower on Zen 4, its shuffle ports being the limit. */
    const __m256i m4 = _mm256_set1_epi8(0xf);
    __m256 acc = _mm256_setzero_ps();
    __m256 acc_min = _mm256_setzero_ps();
    for (int64_t i = 0; i < nb; i++) {
        const float d = y[i].d * qk_k_half(x[i].d), dmin = y[i].d * qk_k_half(x[i].dmin);
        const __m128i scmn = qk_k4_scales_sse(x[i].scales);
        const __m256i bsums = qk_k_ld256(y[i].bsums);
        const __m256i summ = _mm256_madd_epi16(bsums, qk_k4_mins_paired(scmn));
        acc_min = _mm256_fmadd_ps(_mm256_set1_ps(dmin), _mm256_cvtepi32_ps(summ), acc_min);
        const __m256i scales = _mm256_broadcastsi128_si256(_mm_cvtepu8_epi16(scmn));
        __m256i sumi = _mm256_setzero_si256();
#pragma GCC unroll 4
        for (int c = 0; c < 4; c++) {
            const __m256i qb = qk_k_ld256(x[i].qs + 32 * c);
            const __m256i plo = _mm256_maddubs_epi16(
                _mm256_and_si256(qb, m4), qk_k_ld256(y[i].qs + 64 * c));
            const __m256i phi = _mm256_maddubs_epi16(
                _mm256_and_si256(_mm256_srli_epi16(qb, 4), m4),
                qk_k_ld256(y[i].qs + 64 * c + 32));
            const __m256i slo = _mm256_shuffle_epi8(scales, _mm256_set1_epi16(QK_K_WORD(2 * c)));
            const __m256i shi = _mm256_shuffle_epi8(scales, _mm256_set1_epi16(QK_K_WORD(2 * c + 1)));
            sumi = _mm256_add_epi32(sumi, _mm256_add_epi32(_mm256_madd_epi16(plo, slo),
                                                           _mm256_madd_epi16(phi, shi)));
        }
        acc = _mm256_fmadd_ps(_mm256_set1_ps(d), _mm256_cvtepi32_ps(sumi), acc);
    }
    return qk_hsum_ps256(acc) - qk_hsum_ps256(acc_min);
#else
    float sum = 0.0f;
    int8_t q[QK_SUPER];
    uint8_t sc[8], mn[8];
    for (int64_t i = 0; i < nb; i++) {
        uint32_t scw[2], mnw[2];
        qk_k4_scales(x[i].scales, scw, mnw);
        memcpy(sc, scw, 8);
        memcpy(mn, mnw, 8);
        qk_unpack_q4_k(&x[i], q);
        int32_t sumi = 0, summ = 0;
        for (int b = 0; b < 8; b++) {
            sumi += sc[b] * qk_k_dot_i8(q + 32 * b, y[i].qs + 32 * b, 32);
            summ += mn[b] * (y[i].bsums[2 * b] + y[i].bsums[2 * b + 1]);
        }
        sum += y[i].d * qk_k_half(x[i].d) * (float)sumi - y[i].d * qk_k_half(x[i].dmin) * (float)summ;
    }
    return sum;
#endif
}

/* ---------------------------------------------------------------- Q5_K */
/* Q4_K plus a fifth bit: bit b of qh[l] for element 32*b + l. */

QK_NO_CONTRACT static void qk_dequant_q5_k(const void *restrict src, float *restrict y, int64_t n) {
    QK_NO_CONTRACT_BODY
    const qk_block_q5_k *x = (const qk_block_q5_k *)src;
    int8_t q[QK_SUPER];
    uint8_t sc[8], mn[8];
    for (int64_t i = 0; i < n / QK_SUPER; i++, y += QK_SUPER) {
        const float d = qk_k_half(x[i].d), dmin = qk_k_half(x[i].dmin);
        uint32_t scw[2], mnw[2];
        qk_k4_scales(x[i].scales, scw, mnw);
        memcpy(sc, scw, 8);
        memcpy(mn, mnw, 8);
        qk_unpack_q5_k(&x[i], q);
        for (int b = 0; b < 8; b++) {
            const float dl = d * (float)sc[b], ml = dmin * (float)mn[b];
            for (int l = 0; l < 32; l++) y[32 * b + l] = dl * (float)q[32 * b + l] - ml;
        }
    }
}

static float qk_dot_q5_k(int64_t n, const void *restrict w, const void *restrict act) {
    const qk_block_q5_k *x = (const qk_block_q5_k *)w;
    const qk_act_q8_256 *y = (const qk_act_q8_256 *)act;
    const int64_t nb = n / QK_SUPER;
#if QK_K_AVX2 || QK_K_AVX512
    /* 256-bit in the AVX-512 variant too: a 512-bit version (each 32 quant bytes broadcast and
     * shifted per half) measured ~15% slower on Zen 4, its shuffle ports being the limit. */
    const __m256i m4 = _mm256_set1_epi8(0xf);
    const __m256i bit4 = _mm256_set1_epi8(16);
    __m256 acc = _mm256_setzero_ps();
    __m256 acc_min = _mm256_setzero_ps();
    for (int64_t i = 0; i < nb; i++) {
        const float d = y[i].d * qk_k_half(x[i].d), dmin = y[i].d * qk_k_half(x[i].dmin);
        const __m128i scmn = qk_k4_scales_sse(x[i].scales);
        const __m256i bsums = qk_k_ld256(y[i].bsums);
        const __m256i summ = _mm256_madd_epi16(bsums, qk_k4_mins_paired(scmn));
        acc_min = _mm256_fmadd_ps(_mm256_set1_ps(dmin), _mm256_cvtepi32_ps(summ), acc_min);
        const __m256i scales = _mm256_broadcastsi128_si256(_mm_cvtepu8_epi16(scmn));
        __m256i qh = qk_k_ld256(x[i].qh);
        __m256i sumi = _mm256_setzero_si256();
#pragma GCC unroll 4
        for (int c = 0; c < 4; c++) {
            /* qh has been shifted right by 2c: bit 0 -> sub-block 2c, bit 1 -> 2c+1; the
             * 16-bit shifts only move bits within each byte before the mask */
            const __m256i qb = qk_k_ld256(x[i].qs + 32 * c);
            const __m256i qlo = _mm256_or_si256(_mm256_and_si256(qb, m4),
                                                _mm256_and_si256(_mm256_slli_epi16(qh, 4), bit4));
            const __m256i qhi = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(qb, 4), m4),
                                                _mm256_and_si256(_mm256_slli_epi16(qh, 3), bit4));
            qh = _mm256_srli_epi16(qh, 2);
            const __m256i plo = _mm256_maddubs_epi16(qlo, qk_k_ld256(y[i].qs + 64 * c));
            const __m256i phi = _mm256_maddubs_epi16(qhi, qk_k_ld256(y[i].qs + 64 * c + 32));
            const __m256i slo = _mm256_shuffle_epi8(scales, _mm256_set1_epi16(QK_K_WORD(2 * c)));
            const __m256i shi = _mm256_shuffle_epi8(scales, _mm256_set1_epi16(QK_K_WORD(2 * c + 1)));
            sumi = _mm256_add_epi32(sumi, _mm256_add_epi32(_mm256_madd_epi16(plo, slo),
                                                           _mm256_madd_epi16(phi, shi)));
        }
        acc = _mm256_fmadd_ps(_mm256_set1_ps(d), _mm256_cvtepi32_ps(sumi), acc);
    }
    return qk_hsum_ps256(acc) - qk_hsum_ps256(acc_min);
#else
    float sum = 0.0f;
    int8_t q[QK_SUPER];
    uint8_t sc[8], mn[8];
    for (int64_t i = 0; i < nb; i++) {
        uint32_t scw[2], mnw[2];
        qk_k4_scales(x[i].scales, scw, mnw);
        memcpy(sc, scw, 8);
        memcpy(mn, mnw, 8);
        qk_unpack_q5_k(&x[i], q);
        int32_t sumi = 0, summ = 0;
        for (int b = 0; b < 8; b++) {
            sumi += sc[b] * qk_k_dot_i8(q + 32 * b, y[i].qs + 32 * b, 32);
            summ += mn[b] * (y[i].bsums[2 * b] + y[i].bsums[2 * b + 1]);
        }
        sum += y[i].d * qk_k_half(x[i].d) * (float)sumi - y[i].d * qk_k_half(x[i].dmin) * (float)summ;
    }
    return sum;
#endif
}

/* ---------------------------------------------------------------- Q6_K */
/* Element 128*h + 32*k + l (k 0..3, l 0..31): low 4 bits = nibble k/2 of ql[64*h + 32*(k%2) + l],
 * high 2 bits = bits 2k..2k+1 of qh[32*h + l]; x = d*scales[e/16]*(q - 32). */

static void qk_dequant_q6_k(const void *restrict src, float *restrict y, int64_t n) {
    const qk_block_q6_k *x = (const qk_block_q6_k *)src;
    int8_t q[QK_SUPER];
    for (int64_t i = 0; i < n / QK_SUPER; i++, y += QK_SUPER) {
        const float d = qk_k_half(x[i].d);
        qk_unpack_q6_k(&x[i], q);
        for (int g = 0; g < 16; g++) {
            const float dl = d * (float)x[i].scales[g];
            for (int l = 0; l < 16; l++) y[16 * g + l] = dl * (float)q[16 * g + l];
        }
    }
}

static float qk_dot_q6_k(int64_t n, const void *restrict w, const void *restrict act) {
    const qk_block_q6_k *x = (const qk_block_q6_k *)w;
    const qk_act_q8_256 *y = (const qk_act_q8_256 *)act;
    const int64_t nb = n / QK_SUPER;
    /* The 6-bit q (0..63) is unsigned for maddubs; the -32 comes back as
     * -32 * sum(scale * bsum), one madd per super-block. */
#if QK_K_AVX512
    const __m512i m4 = _mm512_set1_epi8(0xf);
    const __m512i m30 = _mm512_set1_epi8(0x30);
    const __m512i shl_a = qk_k_half_counts16(4, 2); /* k = 0, 1: bits 0-1 / 2-3 to 4-5 */
    const __m512i shr_b = qk_k_half_counts16(0, 2); /* k = 2, 3: bits 4-5 / 6-7 to 4-5 */
    __m512 acc = _mm512_setzero_ps();
    for (int64_t i = 0; i < nb; i++) {
        const float d = y[i].d * qk_k_half(x[i].d);
        const __m256i sc16 = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)x[i].scales));
        const __m256i off = _mm256_madd_epi16(qk_k_ld256(y[i].bsums), sc16);
        const __m512i sc = _mm512_castsi256_si512(sc16);
        __m512i sumi = _mm512_setzero_si512();
#pragma GCC unroll 2
        for (int h = 0; h < 2; h++) {
            const __m512i ql = _mm512_loadu_si512(x[i].ql + 64 * h);
            const __m512i qh = qk_k_bcast256(x[i].qh + 32 * h);
            const __m512i q0 = _mm512_or_si512(_mm512_and_si512(ql, m4),
                                               _mm512_and_si512(_mm512_sllv_epi16(qh, shl_a), m30));
            const __m512i q1 = _mm512_or_si512(_mm512_and_si512(_mm512_srli_epi16(ql, 4), m4),
                                               _mm512_and_si512(_mm512_srlv_epi16(qh, shr_b), m30));
            const __m512i p0 = _mm512_maddubs_epi16(q0, _mm512_loadu_si512(y[i].qs + 128 * h));
            const __m512i p1 = _mm512_maddubs_epi16(q1, _mm512_loadu_si512(y[i].qs + 128 * h + 64));
            sumi = _mm512_dpwssd_epi32(sumi, p0, _mm512_permutexvar_epi16(qk_k_group_index(8 * h), sc));
            sumi = _mm512_dpwssd_epi32(sumi, p1, _mm512_permutexvar_epi16(qk_k_group_index(8 * h + 4), sc));
        }
        sumi = _mm512_sub_epi32(sumi, _mm512_zextsi256_si512(_mm256_slli_epi32(off, 5)));
        acc = _mm512_fmadd_ps(_mm512_set1_ps(d), _mm512_cvtepi32_ps(sumi), acc);
    }
    return _mm512_reduce_add_ps(acc);
#elif QK_K_AVX2
    const __m256i m4 = _mm256_set1_epi8(0xf);
    const __m256i m30 = _mm256_set1_epi8(0x30);
    __m256 acc = _mm256_setzero_ps();
    for (int64_t i = 0; i < nb; i++) {
        const float d = y[i].d * qk_k_half(x[i].d);
        const __m256i sc = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)x[i].scales));
        const __m256i off = _mm256_madd_epi16(qk_k_ld256(y[i].bsums), sc);
        __m256i sumi = _mm256_setzero_si256();
#pragma GCC unroll 2
        for (int h = 0; h < 2; h++) {
            const __m256i scb = h ? _mm256_permute2x128_si256(sc, sc, 0x11) : _mm256_permute2x128_si256(sc, sc, 0x00);
            const __m256i ql0 = qk_k_ld256(x[i].ql + 64 * h);
            const __m256i ql1 = qk_k_ld256(x[i].ql + 64 * h + 32);
            const __m256i qh = qk_k_ld256(x[i].qh + 32 * h);
            __m256i q[4];
            q[0] = _mm256_or_si256(_mm256_and_si256(ql0, m4), _mm256_and_si256(_mm256_slli_epi16(qh, 4), m30));
            q[1] = _mm256_or_si256(_mm256_and_si256(ql1, m4), _mm256_and_si256(_mm256_slli_epi16(qh, 2), m30));
            q[2] = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(ql0, 4), m4), _mm256_and_si256(qh, m30));
            q[3] = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(ql1, 4), m4),
                                   _mm256_and_si256(_mm256_srli_epi16(qh, 2), m30));
#pragma GCC unroll 4
            for (int k = 0; k < 4; k++) {
                const __m256i p = _mm256_maddubs_epi16(
                    q[k], qk_k_ld256(y[i].qs + 128 * h + 32 * k));
                const __m256i s = _mm256_shuffle_epi8(scb, qk_k_word_pair256(2 * k, 2 * k + 1));
                sumi = _mm256_add_epi32(sumi, _mm256_madd_epi16(p, s));
            }
        }
        sumi = _mm256_sub_epi32(sumi, _mm256_slli_epi32(off, 5));
        acc = _mm256_fmadd_ps(_mm256_set1_ps(d), _mm256_cvtepi32_ps(sumi), acc);
    }
    return qk_hsum_ps256(acc);
#else
    float sum = 0.0f;
    int8_t q[QK_SUPER];
    for (int64_t i = 0; i < nb; i++) {
        qk_unpack_q6_k(&x[i], q);
        int32_t sumi = 0;
        for (int g = 0; g < 16; g++) sumi += x[i].scales[g] * qk_k_dot_i8(q + 16 * g, y[i].qs + 16 * g, 16);
        sum += y[i].d * qk_k_half(x[i].d) * (float)sumi;
    }
    return sum;
#endif
}

/* ---------------------------------------------------------------- IQ4_NL */
/* 32-element blocks: element j < 16 = low nibble of qs[j], j >= 16 = high nibble of qs[j-16],
 * each an index into qk_iq4_values; x = d*value. */

static void qk_dequant_iq4_nl(const void *restrict src, float *restrict y, int64_t n) {
    const qk_block_iq4_nl *x = (const qk_block_iq4_nl *)src;
    int8_t q[32];
    for (int64_t i = 0; i < n / 32; i++, y += 32) {
        const float d = qk_k_half(x[i].d);
        qk_unpack_iq4(x[i].qs, q);
        for (int j = 0; j < 32; j++) y[j] = d * (float)q[j];
    }
}

static float qk_dot_iq4_nl(int64_t n, const void *restrict w, const void *restrict act) {
    const qk_block_iq4_nl *x = (const qk_block_iq4_nl *)w;
    const qk_act_q8_32 *y = (const qk_act_q8_32 *)act;
    const int64_t nb = n / 32;
#if QK_K_AVX2 || QK_K_AVX512
    /* 256-bit in both x86 variants (the AVX-512 one gets VNNI through the common helpers):
     * blocks are only 32 elements, so two blocks per step for independent work */
    const __m256i table = _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)qk_iq4_values));
    __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
    int64_t i = 0;
    for (; i + 1 < nb; i += 2) {
        const __m256i w0 = _mm256_shuffle_epi8(table, qk_nibbles_to_bytes32(x[i].qs));
        const __m256i w1 = _mm256_shuffle_epi8(table, qk_nibbles_to_bytes32(x[i + 1].qs));
        const __m256i s0 = qk_dot_s8s8_epi32(w0, qk_k_ld256(y[i].qs));
        const __m256i s1 = qk_dot_s8s8_epi32(w1, _mm256_loadu_si256((const __m256i *)y[i + 1].qs));
        acc0 = _mm256_fmadd_ps(_mm256_set1_ps(y[i].d * qk_k_half(x[i].d)), _mm256_cvtepi32_ps(s0), acc0);
        const float d1 = y[i + 1].d * qk_k_half(x[i + 1].d);
        acc1 = _mm256_fmadd_ps(_mm256_set1_ps(d1), _mm256_cvtepi32_ps(s1), acc1);
    }
    for (; i < nb; i++) {
        const __m256i w0 = _mm256_shuffle_epi8(table, qk_nibbles_to_bytes32(x[i].qs));
        const __m256i s0 = qk_dot_s8s8_epi32(w0, qk_k_ld256(y[i].qs));
        acc0 = _mm256_fmadd_ps(_mm256_set1_ps(y[i].d * qk_k_half(x[i].d)), _mm256_cvtepi32_ps(s0), acc0);
    }
    return qk_hsum_ps256(_mm256_add_ps(acc0, acc1));
#else
    float sum = 0.0f;
    int8_t q[32];
    for (int64_t i = 0; i < nb; i++) {
        qk_unpack_iq4(x[i].qs, q);
        sum += y[i].d * qk_k_half(x[i].d) * (float)qk_k_dot_i8(q, y[i].qs, 32);
    }
    return sum;
#endif
}

/* ---------------------------------------------------------------- IQ4_XS */
/* 8 sub-blocks of 32, each laid out as an IQ4_NL block's quants (16 bytes), with a signed 6-bit
 * scale: x = d*(scale)*value. */

static void qk_dequant_iq4_xs(const void *restrict src, float *restrict y, int64_t n) {
    const qk_block_iq4_xs *x = (const qk_block_iq4_xs *)src;
    int8_t q[32];
    for (int64_t i = 0; i < n / QK_SUPER; i++) {
        const float d = qk_k_half(x[i].d);
        for (int ib = 0; ib < 8; ib++, y += 32) {
            const float dl = d * (float)qk_iq4xs_scale(&x[i], ib);
            qk_unpack_iq4(x[i].qs + 16 * ib, q);
            for (int j = 0; j < 32; j++) y[j] = dl * (float)q[j];
        }
    }
}

static float qk_dot_iq4_xs(int64_t n, const void *restrict w, const void *restrict act) {
    const qk_block_iq4_xs *x = (const qk_block_iq4_xs *)w;
    const qk_act_q8_256 *y = (const qk_act_q8_256 *)act;
    const int64_t nb = n / QK_SUPER;
    /* Values are signed: maddubs gets |value| and the activation with value's sign. */
#if QK_K_AVX512
    const __m512i m4 = _mm512_set1_epi8(0xf);
    const __m512i table = _mm512_broadcast_i32x4(_mm_loadu_si128((const __m128i *)qk_iq4_values));
    const __m512i nibble_shift = _mm512_set_epi64(4, 4, 0, 0, 4, 4, 0, 0);
    __m512 acc = _mm512_setzero_ps();
    for (int64_t i = 0; i < nb; i++) {
        const float d = y[i].d * qk_k_half(x[i].d);
        int16_t ls[8];
        for (int ib = 0; ib < 8; ib++) ls[ib] = (int16_t)qk_iq4xs_scale(&x[i], ib);
        const __m512i scales = _mm512_broadcast_i32x4(_mm_loadu_si128((const __m128i *)ls));
        __m512i sumi = _mm512_setzero_si512();
#pragma GCC unroll 4
        for (int c = 0; c < 4; c++) {
            /* 128-bit lanes: bytes 0-15, 0-15, 16-31, 16-31 -> nibbles lo, hi, lo, hi =
             * sub-blocks 2c and 2c+1 in element order */
            const __m512i qb = _mm512_castsi256_si512(qk_k_ld256(x[i].qs + 32 * c));
            const __m512i idx = _mm512_and_si512(
                _mm512_srlv_epi64(_mm512_shuffle_i64x2(qb, qb, _MM_SHUFFLE(1, 1, 0, 0)), nibble_shift), m4);
            const __m512i v = _mm512_shuffle_epi8(table, idx);
            const __m512i a = _mm512_loadu_si512(y[i].qs + 64 * c);
            const __m512i sa = _mm512_mask_sub_epi8(a, _mm512_movepi8_mask(v), _mm512_setzero_si512(), a);
            const __m512i p = _mm512_maddubs_epi16(_mm512_abs_epi8(v), sa);
            const __m512i s = _mm512_shuffle_epi8(scales, qk_k_word_pair512(2 * c, 2 * c + 1));
            sumi = _mm512_dpwssd_epi32(sumi, p, s);
        }
        acc = _mm512_fmadd_ps(_mm512_set1_ps(d), _mm512_cvtepi32_ps(sumi), acc);
    }
    return _mm512_reduce_add_ps(acc);
#elif QK_K_AVX2
    const __m256i m4 = _mm256_set1_epi8(0xf);
    const __m256i table = _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)qk_iq4_values));
    __m256 acc = _mm256_setzero_ps();
    for (int64_t i = 0; i < nb; i++) {
        const float d = y[i].d * qk_k_half(x[i].d);
        int16_t ls[8];
        for (int ib = 0; ib < 8; ib++) ls[ib] = (int16_t)qk_iq4xs_scale(&x[i], ib);
        const __m256i scales = _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)ls));
        __m256i sumi = _mm256_setzero_si256();
#pragma GCC unroll 4
        for (int c = 0; c < 4; c++) {
            const __m256i qb = qk_k_ld256(x[i].qs + 32 * c);
            const __m256i lo = _mm256_shuffle_epi8(table, _mm256_and_si256(qb, m4));
            const __m256i hi = _mm256_shuffle_epi8(table, _mm256_and_si256(_mm256_srli_epi16(qb, 4), m4));
            const __m256i v0 = _mm256_permute2x128_si256(lo, hi, 0x20); /* sub-block 2c */
            const __m256i v1 = _mm256_permute2x128_si256(lo, hi, 0x31); /* sub-block 2c+1 */
            const __m256i a0 = qk_k_ld256(y[i].qs + 64 * c);
            const __m256i a1 = qk_k_ld256(y[i].qs + 64 * c + 32);
            const __m256i p0 = _mm256_maddubs_epi16(_mm256_sign_epi8(v0, v0), _mm256_sign_epi8(a0, v0));
            const __m256i p1 = _mm256_maddubs_epi16(_mm256_sign_epi8(v1, v1), _mm256_sign_epi8(a1, v1));
            const __m256i s0 = _mm256_shuffle_epi8(scales, _mm256_set1_epi16(QK_K_WORD(2 * c)));
            const __m256i s1 = _mm256_shuffle_epi8(scales, _mm256_set1_epi16(QK_K_WORD(2 * c + 1)));
            sumi = _mm256_add_epi32(sumi, _mm256_add_epi32(_mm256_madd_epi16(p0, s0),
                                                           _mm256_madd_epi16(p1, s1)));
        }
        acc = _mm256_fmadd_ps(_mm256_set1_ps(d), _mm256_cvtepi32_ps(sumi), acc);
    }
    return qk_hsum_ps256(acc);
#else
    float sum = 0.0f;
    int8_t q[32];
    for (int64_t i = 0; i < nb; i++) {
        int32_t sumi = 0;
        for (int ib = 0; ib < 8; ib++) {
            qk_unpack_iq4(x[i].qs + 16 * ib, q);
            sumi += qk_iq4xs_scale(&x[i], ib) * qk_k_dot_i8(q, y[i].qs + 32 * ib, 32);
        }
        sum += y[i].d * qk_k_half(x[i].d) * (float)sumi;
    }
    return sum;
#endif
}

/* Registers every type above in quants_impl.h's table. */
#define QK_HAVE_Q8_256 1
#define QK_HAVE_Q2_K 1
#define QK_HAVE_Q3_K 1
#define QK_HAVE_Q4_K 1
#define QK_HAVE_Q5_K 1
#define QK_HAVE_Q6_K 1
#define QK_HAVE_IQ4_NL 1
#define QK_HAVE_IQ4_XS 1

#endif
