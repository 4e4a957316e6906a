/* MXFP4 (OCP microscaling FP4, gpt-oss): 32 elements, an E8M0 exponent byte and 16 bytes of
 * E2M1 codes (element j in the low nibble of byte j, element j + 16 in the high one).
 * x = e8m0_half(e) * kvalues[code], kvalues the doubled E2M1 values (gguf-py's MXFP4,
 * ggml's kvalues_mxfp4 and ggml_e8m0_to_fp32_half).
 * Panel form (qk_panel32 of panel.h): u = kvalue + 12 in 0..24, m = -12 d. AVX2 group 4.
 */
#ifndef QPACK_TYPES_MXFP4_H
#define QPACK_TYPES_MXFP4_H

#include "panel_unpack.h"
#include "q4.h"

typedef struct {
    uint8_t e;
    uint8_t qs[16];
} qk_block_mxfp4;
QK_BLOCK_SIZE_IS(qk_block_mxfp4, 17);

static const int8_t qk_kvalues_mxfp4[16] = {0, 1, 2, 3, 4, 6, 8, 12, 0, -1, -2, -3, -4, -6, -8, -12};
/* kvalues + 12, the panel's unsigned bytes */
static const uint8_t qk_mxfp4_u[16] = {12, 13, 14, 15, 16, 18, 20, 24, 12, 11, 10, 9, 8, 6, 4, 0};

/* 2^(e - 128) as ggml builds it: e < 2 are subnormal floats. */
static inline float qk_e8m0_to_fp32_half(uint8_t e) {
    const uint32_t bits = e < 2 ? 0x00200000u << e : (uint32_t)(e - 1) << 23;
    float f;
    memcpy(&f, &bits, 4);
    return f;
}

QK_NO_CONTRACT static void qk_dequant_mxfp4(const void *restrict src, float *restrict y, int64_t n) {
    QK_NO_CONTRACT_BODY
    const qk_block_mxfp4 *x = (const qk_block_mxfp4 *)src;
    for (int64_t b = 0; b < n / 32; b++, x++, y += 32) {
        const float d = qk_e8m0_to_fp32_half(x->e);
        for (int j = 0; j < 16; j++) {
            y[j] = d * (float)qk_kvalues_mxfp4[x->qs[j] & 0xf];
            y[j + 16] = d * (float)qk_kvalues_mxfp4[x->qs[j] >> 4];
        }
    }
}

static inline void qk_row_mxfp4(const uint8_t *blk, uint8_t u[32], float *d, float *m) {
    const qk_block_mxfp4 *x = (const qk_block_mxfp4 *)blk;
    for (int j = 0; j < 16; j++) {
        u[j] = qk_mxfp4_u[x->qs[j] & 0xf];
        u[j + 16] = qk_mxfp4_u[x->qs[j] >> 4];
    }
    *d = qk_e8m0_to_fp32_half(x->e);
    *m = -12.0f * *d;
}

static float qk_dot_mxfp4(int64_t n, const void *restrict w, const void *restrict act) {
    return qk_dot_unpacked32(qk_row_mxfp4, 17, n, (const uint8_t *)w, (const qk_act_q8_32 *)act);
}

/* Eight rows into the panel: the nibble quads of q4.h, then kvalue + 12 by a byte table. */
static inline void qk_pack_mxfp4(const uint8_t *const rp[8], size_t o, qk_panel32 *p) {
#if QK_TILES_X86
    const __m256i lut = _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)qk_mxfp4_u));
    __m256i q[8];
    qk_nibble_quads_x86(rp, o + 1, q);
    for (int k = 0; k < 8; k++) qk_store_q(p->q[k][0], _mm256_shuffle_epi8(lut, q[k]));
    /* the eight exponents at once, as qk_e8m0_to_fp32_half: (e - 1) << 23, or 0x00200000 << e
     * for the subnormal e < 2 */
    const __m256i e = _mm256_and_si256(qk_gather_u32(rp, o), _mm256_set1_epi32(0xff));
    const __m256i normal = _mm256_slli_epi32(_mm256_sub_epi32(e, _mm256_set1_epi32(1)), 23);
    const __m256i tiny = _mm256_sllv_epi32(_mm256_set1_epi32(0x00200000), e);
    const __m256 d = _mm256_castsi256_ps(_mm256_blendv_epi8(normal, tiny, _mm256_cmpgt_epi32(_mm256_set1_epi32(2), e)));
    _mm256_store_ps(p->d, d);
    _mm256_store_ps(p->m, _mm256_mul_ps(_mm256_set1_ps(-12.0f), d));
#elif QK_TILES_NEON
    const uint8x16_t lut = vld1q_u8(qk_mxfp4_u);
    qk_nibble_quads_neon(rp, o + 1, p->q);
    for (int k = 0; k < 16; k++) { /* the table byte by byte, whatever the layout */
        uint8_t *q = (uint8_t *)p->q + 16 * k;
        vst1q_u8(q, vqtbl1q_u8(lut, vld1q_u8(q)));
    }
#else
    qk_pack32_rows(rp, o, p, qk_row_mxfp4);
    return;
#endif
#if QK_TILES_NEON
    for (int i = 0; i < 8; i++) {
        p->d[i] = qk_e8m0_to_fp32_half(rp[i][o]);
        p->m[i] = -12.0f * p->d[i];
    }
#endif
}

#endif
