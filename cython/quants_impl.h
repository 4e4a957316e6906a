/* Implementation of quants.h: the traits of every type in quant_types.def, and the dispatch of
 * activation quantization. The kernels live in types/ (one file per type family), the tiled
 * products in tiles.h, the activation formats in activations.h; conventions in quants_common.h. */
#ifndef QPACK_QUANTS_IMPL_H
#define QPACK_QUANTS_IMPL_H

#include "quants_common.h"
#include "activations.h"
#include "panel.h"

#define QK_TYPE_FILES
#include "quant_types.def"
#undef QK_TYPE_FILES

#include "tiles.h"

/* ggml type ids of the supported types: QK_TYPE_Q4_K = 12, ... */
#define QK_TYPE(NAME, name, id, elems, bytes, act, panel, sub, group) QK_TYPE_##NAME = id,
enum {
#include "quant_types.def"
};
#undef QK_TYPE

#define QK_GEMM_PTR_0(name) NULL
#define QK_GEMM_PTR_32(name) qk_gemm_##name
#define QK_GEMM_PTR_256(name) qk_gemm_##name
#define QK_TYPE(NAME, name, id, elems, bytes, act, panel, sub, group) \
    {id, #NAME, elems, bytes, QK_ACT_##act, qk_dequant_##name, qk_dot_##name, QK_GEMM_PTR_##panel(name)},
static const qk_traits qk_traits_table[] = {
#include "quant_types.def"
};
#undef QK_TYPE

#define QK_N_TYPES ((int)(sizeof(qk_traits_table) / sizeof(qk_traits_table[0])))

static const qk_traits *qk_get_traits(int ggml_type) {
    for (int i = 0; i < QK_N_TYPES; i++)
        if (qk_traits_table[i].type == ggml_type) return &qk_traits_table[i];
    return NULL;
}

static const qk_traits *qk_traits_at(int i) { return i >= 0 && i < QK_N_TYPES ? &qk_traits_table[i] : NULL; }

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
    case QK_ACT_Q8_256: qk_quantize_q8_256(x, dst, n); break;
    default: break;
    }
}

#endif
