/* Implementation of quants.h: the one table of weight types the kernels run, and the dispatch
 * of activation quantization. The kernels themselves live in quants_legacy.h (float and 32-element
 * legacy quants) and quants_k.h (K-quants and IQ4); conventions in quants_common.h. */
#ifndef QPACK_QUANTS_IMPL_H
#define QPACK_QUANTS_IMPL_H

#include "quants_common.h"
#include "quants_legacy.h"
#include "quants_k.h"
#include "quants_tiles.h"
/* One file per type family, each with its block struct, dequantization and unpack-to-panel. */
#include "types/iq1.h"
#include "types/iq2.h"
#include "types/iq3.h"
#include "types/mxfp4.h"
#include "types/tq.h"

/* ggml type ids (gguf-facts.md) of the types registered below. */
enum {
    QK_TYPE_F32 = 0, QK_TYPE_F16 = 1, QK_TYPE_Q4_0 = 2, QK_TYPE_Q4_1 = 3, QK_TYPE_Q5_0 = 6,
    QK_TYPE_Q5_1 = 7, QK_TYPE_Q8_0 = 8, QK_TYPE_Q2_K = 10, QK_TYPE_Q3_K = 11, QK_TYPE_Q4_K = 12,
    QK_TYPE_Q5_K = 13, QK_TYPE_Q6_K = 14, QK_TYPE_IQ4_NL = 20, QK_TYPE_IQ4_XS = 23,
    QK_TYPE_BF16 = 30, QK_TYPE_IQ2_XXS = 16, QK_TYPE_IQ2_XS = 17, QK_TYPE_IQ3_XXS = 18,
    QK_TYPE_IQ1_S = 19, QK_TYPE_IQ3_S = 21, QK_TYPE_IQ2_S = 22, QK_TYPE_IQ1_M = 29,
    QK_TYPE_TQ1_0 = 34, QK_TYPE_TQ2_0 = 35, QK_TYPE_MXFP4 = 39,
};

/* One row per supported weight type (gemm: quants_tiles.h; NULL where a type has none).
 * quants_k.h defines QK_HAVE_<TYPE> once that type's qk_dequant_<type> and qk_dot_<type> exist
 * (and QK_HAVE_Q8_256 with qk_quantize_q8_256), so the tree compiles at every step; the C block sizes are checked against runtime/quants.py by
 * tests/test_quants.py. */
static const qk_traits qk_traits_table[] = {
    {QK_TYPE_F32, "F32", 1, 4, QK_ACT_F32, qk_dequant_f32, qk_dot_f32},
    {QK_TYPE_F16, "F16", 1, 2, QK_ACT_F32, qk_dequant_f16, qk_dot_f16},
    {QK_TYPE_BF16, "BF16", 1, 2, QK_ACT_F32, qk_dequant_bf16, qk_dot_bf16},
    {QK_TYPE_Q4_0, "Q4_0", 32, QK_Q4_0_BYTES, QK_ACT_Q8_32, qk_dequant_q4_0, qk_dot_q4_0, qk_gemm_q4_0},
    {QK_TYPE_Q4_1, "Q4_1", 32, QK_Q4_1_BYTES, QK_ACT_Q8_32, qk_dequant_q4_1, qk_dot_q4_1, qk_gemm_q4_1},
    {QK_TYPE_Q5_0, "Q5_0", 32, QK_Q5_0_BYTES, QK_ACT_Q8_32, qk_dequant_q5_0, qk_dot_q5_0, qk_gemm_q5_0},
    {QK_TYPE_Q5_1, "Q5_1", 32, QK_Q5_1_BYTES, QK_ACT_Q8_32, qk_dequant_q5_1, qk_dot_q5_1, qk_gemm_q5_1},
    {QK_TYPE_Q8_0, "Q8_0", 32, QK_Q8_0_BYTES, QK_ACT_Q8_32, qk_dequant_q8_0, qk_dot_q8_0, QK_GEMM_Q8_0},
#if defined(QK_HAVE_Q2_K) && defined(QK_HAVE_Q8_256)
    {QK_TYPE_Q2_K, "Q2_K", 256, 84, QK_ACT_Q8_256, qk_dequant_q2_k, qk_dot_q2_k, qk_gemm_q2_k},
#endif
#if defined(QK_HAVE_Q3_K) && defined(QK_HAVE_Q8_256)
    {QK_TYPE_Q3_K, "Q3_K", 256, 110, QK_ACT_Q8_256, qk_dequant_q3_k, qk_dot_q3_k, qk_gemm_q3_k},
#endif
#if defined(QK_HAVE_Q4_K) && defined(QK_HAVE_Q8_256)
    {QK_TYPE_Q4_K, "Q4_K", 256, 144, QK_ACT_Q8_256, qk_dequant_q4_k, qk_dot_q4_k, qk_gemm_q4_k},
#endif
#if defined(QK_HAVE_Q5_K) && defined(QK_HAVE_Q8_256)
    {QK_TYPE_Q5_K, "Q5_K", 256, 176, QK_ACT_Q8_256, qk_dequant_q5_k, qk_dot_q5_k, qk_gemm_q5_k},
#endif
#if defined(QK_HAVE_Q6_K) && defined(QK_HAVE_Q8_256)
    {QK_TYPE_Q6_K, "Q6_K", 256, 210, QK_ACT_Q8_256, qk_dequant_q6_k, qk_dot_q6_k, qk_gemm_q6_k},
#endif
#if defined(QK_HAVE_IQ4_NL)
    {QK_TYPE_IQ4_NL, "IQ4_NL", 32, 18, QK_ACT_Q8_32, qk_dequant_iq4_nl, qk_dot_iq4_nl, QK_GEMM_IQ4_NL},
#endif
#if defined(QK_HAVE_IQ4_XS) && defined(QK_HAVE_Q8_256)
    {QK_TYPE_IQ4_XS, "IQ4_XS", 256, 136, QK_ACT_Q8_256, qk_dequant_iq4_xs, qk_dot_iq4_xs, QK_GEMM_IQ4_XS},
#endif
#if defined(QK_HAVE_Q8_256)
    {QK_TYPE_IQ1_S, "IQ1_S", 256, 50, QK_ACT_Q8_256, qk_dequant_iq1_s, qk_dot_iq1_s, qk_gemm_iq1_s},
    {QK_TYPE_IQ1_M, "IQ1_M", 256, 56, QK_ACT_Q8_256, qk_dequant_iq1_m, qk_dot_iq1_m, qk_gemm_iq1_m},
    {QK_TYPE_IQ2_XXS, "IQ2_XXS", 256, 66, QK_ACT_Q8_256, qk_dequant_iq2_xxs, qk_dot_iq2_xxs, qk_gemm_iq2_xxs},
    {QK_TYPE_IQ2_XS, "IQ2_XS", 256, 74, QK_ACT_Q8_256, qk_dequant_iq2_xs, qk_dot_iq2_xs, qk_gemm_iq2_xs},
    {QK_TYPE_IQ2_S, "IQ2_S", 256, 82, QK_ACT_Q8_256, qk_dequant_iq2_s, qk_dot_iq2_s, qk_gemm_iq2_s},
    {QK_TYPE_IQ3_XXS, "IQ3_XXS", 256, 98, QK_ACT_Q8_256, qk_dequant_iq3_xxs, qk_dot_iq3_xxs, qk_gemm_iq3_xxs},
    {QK_TYPE_IQ3_S, "IQ3_S", 256, 110, QK_ACT_Q8_256, qk_dequant_iq3_s, qk_dot_iq3_s, qk_gemm_iq3_s},
    {QK_TYPE_TQ1_0, "TQ1_0", 256, 54, QK_ACT_Q8_256, qk_dequant_tq1_0, qk_dot_tq1_0, qk_gemm_tq1_0},
    {QK_TYPE_TQ2_0, "TQ2_0", 256, 66, QK_ACT_Q8_256, qk_dequant_tq2_0, qk_dot_tq2_0, qk_gemm_tq2_0},
#endif
    {QK_TYPE_MXFP4, "MXFP4", 32, 17, QK_ACT_Q8_32, qk_dequant_mxfp4, qk_dot_mxfp4, qk_gemm_mxfp4},
};

static const qk_traits *qk_get_traits(int ggml_type) {
    for (size_t i = 0; i < sizeof(qk_traits_table) / sizeof(qk_traits_table[0]); i++)
        if (qk_traits_table[i].type == ggml_type) return &qk_traits_table[i];
    return NULL;
}

static size_t qk_act_row_bytes(int act, int64_t n) {
    switch (act) {
    case QK_ACT_F32: return (size_t)n * sizeof(float);
    case QK_ACT_Q8_32: return (size_t)(n / 32) * sizeof(qk_act_q8_32);
    case QK_ACT_Q8_256: return (size_t)(n / 256) * sizeof(qk_act_q8_256);
    default: return 0;
    }
}

static void qk_quantize_act(int act, const float *restrict x, void *restrict dst, int64_t n) {
    switch (act) {
    case QK_ACT_F32: memcpy(dst, x, (size_t)n * sizeof(float)); break;
    case QK_ACT_Q8_32: qk_quantize_q8_32(x, dst, n); break;
#if defined(QK_HAVE_Q8_256)
    case QK_ACT_Q8_256: qk_quantize_q8_256(x, dst, n); break;
#endif
    default: break;
    }
}

#endif
