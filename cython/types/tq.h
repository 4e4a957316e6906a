/* TQ1_0 and TQ2_0: ternary weights x = d * (q - 1), q in {0, 1, 2} (TQ2_0 may also store 3),
 * one f16 d per 256 elements (gguf-py's TQ1_0 / TQ2_0, ggml's dequantize_row_tq*).
 *     TQ1_0: five trits per byte in base 3, scaled so that trit n of byte v is
 *            ((uint8_t)(v * 3^n) * 3) >> 8; bytes 0..31 give elements 32 n + m, bytes 32..47
 *            elements 160 + 16 n + m, the 4 qh bytes (four trits each) elements 240 + 4 n + m
 *     TQ2_0: 2 bits each; bit pair l of byte 32 j + m is element 128 j + 32 l + m
 * Panel form (panel_unpack.h): u = q, sc = 1, x = d * (u - 1): the bsums coefficient is 1.
 * max(u) = 3: AVX2 group 8.
 */
#ifndef QPACK_TYPES_TQ_H
#define QPACK_TYPES_TQ_H

#include "panel_unpack.h"

typedef struct {
    uint8_t qs[48];
    uint8_t qh[4];
    uint8_t d[2];
} qk_block_tq1_0;
QK_BLOCK_SIZE_IS(qk_block_tq1_0, 54);

typedef struct {
    uint8_t qs[64];
    uint8_t d[2];
} qk_block_tq2_0;
QK_BLOCK_SIZE_IS(qk_block_tq2_0, 66);

static inline void qk_tq1_0_trits(const qk_block_tq1_0 *x, uint8_t q[256]) {
    static const uint8_t pow3[5] = {1, 3, 9, 27, 81};
    for (int n = 0; n < 5; n++) {
        for (int m = 0; m < 32; m++) q[32 * n + m] = (uint8_t)(((uint8_t)(x->qs[m] * pow3[n]) * 3) >> 8);
        for (int m = 0; m < 16; m++) q[160 + 16 * n + m] = (uint8_t)(((uint8_t)(x->qs[32 + m] * pow3[n]) * 3) >> 8);
    }
    for (int n = 0; n < 4; n++)
        for (int m = 0; m < 4; m++) q[240 + 4 * n + m] = (uint8_t)(((uint8_t)(x->qh[m] * pow3[n]) * 3) >> 8);
}

static inline void qk_tq2_0_quants(const qk_block_tq2_0 *x, uint8_t q[256]) {
    for (int j = 0; j < 2; j++)
        for (int l = 0; l < 4; l++)
            for (int m = 0; m < 32; m++) q[128 * j + 32 * l + m] = (x->qs[32 * j + m] >> (2 * l)) & 3;
}

QK_NO_CONTRACT static void qk_dequant_tq1_0(const void *restrict src, float *restrict y, int64_t n) {
    QK_NO_CONTRACT_BODY
    const qk_block_tq1_0 *x = (const qk_block_tq1_0 *)src;
    uint8_t q[256];
    for (int64_t b = 0; b < n / 256; b++, x++, y += 256) {
        const float d = qk_fp16_to_fp32(qk_load_u16(x->d));
        qk_tq1_0_trits(x, q);
        for (int k = 0; k < 256; k++) y[k] = d * (float)((int)q[k] - 1);
    }
}

QK_NO_CONTRACT static void qk_dequant_tq2_0(const void *restrict src, float *restrict y, int64_t n) {
    QK_NO_CONTRACT_BODY
    const qk_block_tq2_0 *x = (const qk_block_tq2_0 *)src;
    uint8_t q[256];
    for (int64_t b = 0; b < n / 256; b++, x++, y += 256) {
        const float d = qk_fp16_to_fp32(qk_load_u16(x->d));
        qk_tq2_0_quants(x, q);
        for (int k = 0; k < 256; k++) y[k] = d * (float)((int)q[k] - 1);
    }
}

static inline void qk_tq_panel_scales(const uint8_t *d16, qk_panel256 *p, int i) {
    for (int s = 0; s < 8; s++) {
        p->sc[s][i] = 1;
        p->mn[s][i] = qk_pair16(1, 1);
    }
    const float d = qk_fp16_to_fp32(qk_load_u16(d16));
    p->d[i] = d;
    p->nd[i] = -d;
}

static inline void qk_unpack_tq1_0(const uint8_t *blk, uint8_t *u, qk_panel256 *p, int i) {
    const qk_block_tq1_0 *x = (const qk_block_tq1_0 *)blk;
    qk_tq1_0_trits(x, u);
    qk_tq_panel_scales(x->d, p, i);
}

static inline void qk_unpack_tq2_0(const uint8_t *blk, uint8_t *u, qk_panel256 *p, int i) {
    const qk_block_tq2_0 *x = (const qk_block_tq2_0 *)blk;
    qk_tq2_0_quants(x, u);
    qk_tq_panel_scales(x->d, p, i);
}

QK_UNPACKED_KERNELS256(tq1_0, qk_unpack_tq1_0, 54, 32, 8)
QK_UNPACKED_KERNELS256(tq2_0, qk_unpack_tq2_0, 66, 32, 8)

#endif
