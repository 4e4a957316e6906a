/* Quantized kernels: dequantize, quantize activations, dot products.
 *
 * Header-only on purpose: every CPU variant module (_native_generic, _native_avx2, ...) compiles
 * this file into its own translation unit with its own ISA flags, so the same source becomes
 * several machine-code versions picked at run time (runtime/cpu.py).
 *
 * The contract the forward pass (forward.h) relies on:
 *   - weights stay in their GGUF blocks; a weight row of n elements is n/block_elems blocks;
 *   - an activation row is quantized ONCE per row into the format `act` of the weight's traits
 *     (f32 for float weights, 32-element int8 blocks for the legacy quants, 256-element int8
 *     blocks for the K-quants) and reused for every weight row it meets;
 *   - gemm (tiles.h), for every quantized type, multiplies many rows by one or many tokens
 *     with arithmetic that does not depend on how rows and tokens are grouped: the product
 *     path of decode and prefill alike;
 *   - dot(n, weight_row, act_row) returns one row's f32 dot product: SIMD for float weights
 *     (which have no gemm), the scalar reference for the quantized ones (tests hold gemm to it).
 * The types, their ids and traits: quant_types.def.
 */
#ifndef QPACK_QUANTS_H
#define QPACK_QUANTS_H

#include <stdint.h>
#include <stddef.h>

/* Activation formats (what qk_quantize_act writes). */
enum { QK_ACT_F32 = 0, QK_ACT_Q8_32 = 1, QK_ACT_Q8_256 = 2 };

typedef void (*qk_dequant_fn)(const void *restrict src, float *restrict dst, int64_t n);
typedef float (*qk_dot_fn)(int64_t n, const void *restrict w, const void *restrict act);
/* out[t * ldo + r] = W[r] . act[t] for rows r < nr and tokens t < nt: the tiled product of
 * tiles.h (act rows act_stride bytes apart; scratch of qk_gemm_scratch_bytes(n) bytes,
 * 32-byte aligned, private to the calling thread). */
typedef void (*qk_gemm_fn)(int64_t n, const uint8_t *w, size_t row_bytes, int64_t nr,
                           const uint8_t *act, size_t act_stride, int64_t nt, float *out,
                           int64_t ldo, void *scratch);

typedef struct {
    int type;           /* ggml type id (gguf-facts.md) */
    const char *name;   /* "Q4_K" ... */
    int block_elems;    /* elements per block */
    int block_bytes;    /* bytes per block */
    int act;            /* QK_ACT_*: the activation format `dot` expects */
    qk_dequant_fn dequant;
    qk_dot_fn dot;
    qk_gemm_fn gemm;    /* NULL for float weights: dot runs for every batch */
} qk_traits;

/* NULL when the type is not supported (the caller names it in a clear error). */
static const qk_traits *qk_get_traits(int ggml_type);
/* The i-th supported type (quant_types.def order), NULL past the last. */
static const qk_traits *qk_traits_at(int i);
/* Bytes of one activation row of n elements in format act (n a multiple of its block). */
static size_t qk_act_row_bytes(int act, int64_t n);
/* Quantize one f32 row of n elements into format act. */
static void qk_quantize_act(int act, const float *restrict x, void *restrict dst, int64_t n);
/* Scratch bytes a gemm over rows of n elements needs. */
static size_t qk_gemm_scratch_bytes(int64_t n);

#include "quants_impl.h"

#endif
