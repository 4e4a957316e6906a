/* The transformer forward pass: one function for every architecture (runtime/arch.py declares
 * the switches), over a batch of tokens that may belong to different sequences (prefill of one
 * prompt, or one decode step of many requests: continuous batching).
 *
 * Weights are pointers into the GGUF mapping (never copied); activations are quantized once per
 * row to the format each weight type's kernels want (quants.h). Products of quantized weights
 * go through the type's tile kernel (tiles.h: each unpacked weight panel meets every token of
 * the batch), float weights through their per-row dot; either way a token's result does not
 * depend on the rest of the batch.
 *
 * Threads: the pass is a fixed sequence of ops (per layer: norm, QKV, rope, attention, ...) that
 * every thread of a small pool walks (workers.h); each op is cut into chunks taken dynamically,
 * so a thread the OS deschedules holds back nobody. No Python and no allocation per token.
 */
#ifndef QPACK_FORWARD_H
#define QPACK_FORWARD_H

#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#if defined(_WIN32)
#include <malloc.h> /* _aligned_malloc */
#endif

#include "quants.h"
#include "workers.h"

/* KV cache element, an IEEE half: _Float16 where the compiler has it (gcc >= 12 and clang on
 * x86-64 and aarch64), else (MSVC) its bits in a uint16_t, converted by F16C or by exact bit
 * arithmetic (quants_common.h). The cache and the logits are bit-identical either way
 * (-DQK_HAVE_FLOAT16=0 forces the uint16_t path, to test it where _Float16 exists). */
#ifndef QK_HAVE_FLOAT16
#if defined(__FLT16_MAX__) && !defined(_MSC_VER) && (defined(__x86_64__) || defined(__aarch64__))
#define QK_HAVE_FLOAT16 1
#else
#define QK_HAVE_FLOAT16 0
#endif
#endif
#if QK_HAVE_FLOAT16
typedef _Float16 qk_f16;
static inline float qk_f16_to_f32(qk_f16 h) { return (float)h; }
static inline qk_f16 qk_f32_to_f16(float f) { return (qk_f16)f; }
#else
typedef uint16_t qk_f16;
static inline float qk_f16_to_f32(qk_f16 h) {
#if defined(__F16C__)
    return qk_f16c_to_f32(h);
#else /* like F16C and _Float16, a signalling NaN comes out quiet */
    return qk_fp16_to_fp32_portable((uint16_t)(h | (((h & 0x7fff) > 0x7c00) << 9)));
#endif
}
static inline qk_f16 qk_f32_to_f16(float f) { return qk_fp32_to_fp16(f); }
#endif

enum { QK_ACT_FN_SILU = 0, QK_ACT_FN_GELU_TANH = 1 };
enum { QK_N_ACT_FORMATS = 3 };     /* QK_ACT_F32, QK_ACT_Q8_32, QK_ACT_Q8_256 */
enum { QK_MAX_ROPE_BASES = 4 };    /* distinct rope bases with precomputed tables */
#define QK_ATT_KT 64               /* keys per attention tile (absolute positions) */
#define QK_ATT_ROWS 64             /* query rows (tokens x heads of a group) per attention chunk */
/* Keys per span (a multiple of QK_ATT_KT, absolute positions). Every query's attention is the
 * online softmax of each span from an empty state, the spans' states then folded in order with
 * the log-sum-exp rule: so a pass may hand the spans of one long sequence to different threads
 * (flash-decoding) and still give the same bits as one thread walking them. */
#define QK_ATT_SPAN 256
#define QK_SPLIT_TOKENS 4          /* tokens whose spans the split buffer holds (decode-sized) */
#define QK_SPLIT_MAX_FLOATS (8 << 20) /* ... at most (32 MiB): past it, long passes do not split */

/* KV cache element types, numbered as ggml's */
enum { QK_CACHE_F16 = 1, QK_CACHE_Q8_0 = 8 };
typedef struct {
    uint16_t d; /* f16 scale */
    int8_t qs[32];
} qk_cache_q8_0; /* ggml's block_q8_0: 34 bytes */

typedef struct {
    const uint8_t *data; /* rows x row_bytes, in the mapping */
    const qk_traits *tr;
    int64_t rows, cols;  /* output features, input features */
    size_t row_bytes;
} qk_matrix;

typedef struct {
    qk_matrix wq, wk, wv, wo, gate, up, down;
    /* a mixture-of-experts FFN instead of gate/up/down: the router (n_expert rows) and each
     * expert stack as one matrix, expert e's rows after expert e-1's */
    qk_matrix router, gate_exps, up_exps, down_exps;
    const float *attn_norm, *ffn_norm, *post_attn_norm, *post_ffn_norm, *q_norm, *k_norm;
    const float *bq, *bk, *bv; /* optional biases (qwen2) */
    int window;                /* sliding window in positions; 0 = global attention */
    float rope_base;
} qk_layer;

typedef struct qk_runtime qk_runtime;

/* One pass's routes (token i's k-th chosen expert) grouped by expert: the rows of expert e are
 * start[e] .. start[e+1]-1 of the grouped buffers, tokens in batch order. */
typedef struct {
    float *probs;           /* [n_batch][n_expert] router logits, then probabilities */
    int32_t *expert;        /* [n_batch][used] chosen experts, best first */
    float *weight;          /* [n_batch][used] their weights, normalised to sum 1 */
    int32_t *route;         /* [n_batch][used] -> grouped row */
    int32_t *token;         /* [n_batch * used] grouped row -> token */
    int32_t *start;         /* [n_expert + 1] */
    int32_t *active;        /* experts with rows this pass, ascending */
    int32_t *fill;          /* [n_expert] rows handed out so far (grouping) */
    int n_active;
    uint8_t *act[QK_N_ACT_FORMATS]; /* grouped quantized activations */
    size_t act_cap[QK_N_ACT_FORMATS];
    float *gate, *up, *down;  /* [rows][n_ff] (gate then holds act(gate)*up), [rows][n_embd] */
} qk_moe_state;

typedef struct {
    /* hyperparameters */
    int n_layer, n_embd, n_ff, n_head, n_head_kv, head_dim, head_dim_v, n_rot, n_vocab;
    int n_expert, n_expert_used; /* 0: dense FFNs; else n_ff is one expert's width */
    int rope_neox, activation, qk_norm, post_norms;
    float norm_eps, embd_scale, attn_scale;
    float attn_softcap, final_softcap; /* cap * tanh(x / cap) on scores / logits; 0 = none */
    float rope_attn_factor;            /* multiplies rope's cos and sin */
    qk_matrix tok_embd, output;
    const float *output_norm;
    const float *rope_factors;         /* n_rot/2 divisors of the rope angles, or NULL */
    qk_layer *layers;
    /* sizes of the state below */
    int n_ctx, n_seq, n_batch, n_threads;
    /* KV cache, [layer][seq][kv head][pos][row]: a head's keys are contiguous rows of
     * k_row bytes (head_dim values of k_type: QK_CACHE_F16 or QK_CACHE_Q8_0 blocks) */
    uint8_t *k_cache, *v_cache;
    int k_type, v_type;
    size_t k_row, v_row;
    /* scratch for up to n_batch tokens */
    float *x, *xn, *q, *k, *v, *attn_out, *tmp, *ff_a, *ff_b;
    qk_runtime *rt; /* threads and the scratch below: qk_model_init / qk_model_free */
} qk_model;

/* The arguments of one pass (kept in the runtime, not on a stack: a late worker may read them). */
typedef struct {
    int n, n_out;
    const int32_t *tokens, *pos, *seq, *out_idx;
    float *logits, *hidden;
    int n_blocks; /* attention query blocks, below */
    int out_only; /* the last layer's rows past attention: only the output rows (qk_forward) */
    int split;    /* attention spans of a block go to different chunks, then a merge op */
    int64_t n_span_chunks; /* with split: (block, kv head, span) chunks */
} qk_pass;

struct qk_runtime {
    qk_pool *pool;
    qk_pass pass;
    uint8_t *act[QK_N_ACT_FORMATS];  /* quantized activations, per format, n_batch rows */
    size_t act_cap[QK_N_ACT_FORMATS]; /* bytes per row available */
    void **gemm_scratch;              /* per thread */
    float **att_scratch;              /* per thread */
    int32_t *blocks;                  /* attention query blocks: [start, end) batch rows */
    int64_t *span_chunk0;             /* with split: block b's first span chunk [n_batch + 1] */
    int64_t *part_at;                 /* with split: block b's first float in parts [n_batch + 1] */
    float *parts;                     /* with split: per (block, kv head, span) states */
    qk_cache_q8_0 *q8;                /* with a q8_0 K cache: the queries as q8_0 [n_batch][n_head][hd/32] */
    int32_t *q8_sum;                  /* ... and each block's sum of int8 values */
    size_t parts_cap;                 /* floats in parts */
    int n_bases;
    float rope_bases[QK_MAX_ROPE_BASES];
    float *rope_freq;                 /* [base][n_rot / 2] */
    float *rope_cs;                   /* [base][token][n_rot / 2][cos, sin] */
    int *layer_base;                  /* per layer: index into rope_bases, -1 = compute inline */
    qk_moe_state moe;                 /* mixture-of-experts routing and grouped buffers */
    size_t bytes;                     /* what qk_model_init allocated */
};

/* Where position pos of sequence s, layer l, KV head h lives in the cache. */
static inline uint8_t *qk_k_at(const qk_model *m, int l, int s, int h, int pos) {
    return m->k_cache + ((((int64_t)l * m->n_seq + s) * m->n_head_kv + h) * m->n_ctx + pos) * (int64_t)m->k_row;
}

static inline uint8_t *qk_v_at(const qk_model *m, int l, int s, int h, int pos) {
    return m->v_cache + ((((int64_t)l * m->n_seq + s) * m->n_head_kv + h) * m->n_ctx + pos) * (int64_t)m->v_row;
}

/* Bytes of one cached row of n values of a cache type (0: not a cache type, or n not whole
 * blocks). */
static inline size_t qk_cache_row_bytes(int type, int n) {
    if (type == QK_CACHE_F16) return (size_t)n * sizeof(qk_f16);
    if (type == QK_CACHE_Q8_0 && n % 32 == 0) return (size_t)(n / 32) * sizeof(qk_cache_q8_0);
    return 0;
}

/* ---------------------------------------------------------------- small math (vectorizable) */

/* exp for the softmax and the activations: Cody-Waite reduction and a degree-6 polynomial,
 * within 4 ulp of exp over [-87, 88.3] (measured; Cephes' degree-7 term would make it 1.4 ulp,
 * but moved a near-tie in tests/test_model.py's greedy check against llama.cpp, whose own exp
 * differs from both); plain C so that loops over it vectorize (libm's expf does not).
 * exp(x) = 0 below -87.3 (where expf reaches the subnormals) and for x = -inf; it saturates at
 * exp(88.3) above. */
static inline float qk_exp(float x) {
    const float big = 12582912.0f; /* 1.5 * 2^23: adding it rounds to an integer */
    const float xc = x < -87.3f ? -87.3f : x > 88.3f ? 88.3f : x;
    const float n = (xc * 1.44269504088896341f + big) - big;
    const float r = (xc - n * 0.693359375f) - n * -2.12194440e-4f;
    float p = 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * r * r + r + 1.0f;
    union { int32_t i; float f; } s;
    s.i = ((int32_t)n + 127) << 23;
    return x < -87.3f ? 0.0f : p * s.f;
}

static inline float qk_silu(float x) { return x / (1.0f + qk_exp(-x)); }

static inline float qk_gelu_tanh(float x) {
    const float k = 0.7978845608028654f; /* sqrt(2/pi) */
    const float y = k * (x + 0.044715f * x * x * x);
    const float t = 1.0f - 2.0f / (qk_exp(2.0f * y) + 1.0f); /* tanh(y), as qk_tanh */
    return 0.5f * x * (1.0f + t);
}

static void qk_rmsnorm(float *out, const float *x, const float *restrict w, int n, float eps) {
    float ss = 0.0f;
#pragma omp simd reduction(+ : ss)
    for (int j = 0; j < n; j++) ss += x[j] * x[j];
    const float scale = 1.0f / sqrtf(ss / (float)n + eps);
#pragma omp simd
    for (int j = 0; j < n; j++) out[j] = x[j] * scale * w[j];
}

/* Rotary embedding in place on one head, from a token's (cos, sin) table. NEOX pairs
 * (j, j + n_rot/2); normal pairs (2j, 2j+1). */
static void qk_rope(float *restrict h, int n_rot, int neox, const float *restrict cs) {
    const int half = n_rot / 2;
    for (int j = 0; j < half; j++) {
        const float c = cs[2 * j], s = cs[2 * j + 1];
        const int a = neox ? j : 2 * j, b = neox ? j + half : 2 * j + 1;
        const float x0 = h[a], x1 = h[b];
        h[a] = x0 * c - x1 * s;
        h[b] = x0 * s + x1 * c;
    }
}

static void qk_rope_table(float *restrict cs, const float *restrict freq, int half, int pos, float mscale) {
    for (int j = 0; j < half; j++) {
        const float theta = (float)pos * freq[j];
        cs[2 * j] = cosf(theta) * mscale;
        cs[2 * j + 1] = sinf(theta) * mscale;
    }
}

/* Rope's angle per position for pair j: base^(-2j/n_rot), divided by the model's factor. */
static inline float qk_rope_freq(const qk_model *m, float base, int j) {
    const float f = powf(base, -2.0f * (float)j / (float)m->n_rot);
    return m->rope_factors ? f / m->rope_factors[j] : f;
}

static inline float qk_tanh(float x) { return 1.0f - 2.0f / (qk_exp(2.0f * x) + 1.0f); }


/* ---------------------------------------------------------------- activations for products */

static inline size_t qk_act_stride(const qk_matrix *w) {
    return w->tr->act == QK_ACT_F32 ? (size_t)w->cols * sizeof(float) : qk_act_row_bytes(w->tr->act, w->cols);
}

/* The activation rows w reads: x itself for float weights, else the quantized copy. */
static inline const uint8_t *qk_act_for(qk_model *m, const qk_matrix *w, const float *x) {
    return w->tr->act == QK_ACT_F32 ? (const uint8_t *)x : m->rt->act[w->tr->act];
}

/* Quantize row i of x (cols elements) for every distinct format among the matrices. */
static void qk_prepare_act(qk_model *m, const qk_matrix *const *ws, int nw, const float *xi, int i) {
    int seen = 0;
    for (int k = 0; k < nw; k++) {
        const int f = ws[k]->tr->act;
        if (f == QK_ACT_F32 || (seen >> f) & 1) continue;
        seen |= 1 << f;
        qk_quantize_act(f, xi, m->rt->act[f] + (size_t)i * qk_act_stride(ws[k]), ws[k]->cols);
    }
}

/* ---------------------------------------------------------------- products (an op) */

/* Tokens per chunk: a block of activations stays in L2 while a panel of rows meets it, and
 * the more tokens meet a panel, the less its unpacking costs per token (64 -> 128: +3 %
 * prefill at 1B; an activation-size-based 64-256 measured no better). Experts: 64. */
#define QK_MM_TOKENS 128
#define QK_MOE_TOKENS 64

/* out_k[t][r] = W_k[r] . x[t] for the nw matrices (same input, same cols), t < n. With glu,
 * W_0 = gate and W_1 = up (same rows): out_0 = act_fn(out_0) * out_1, tile by tile. */
static int qk_matmul(qk_ctx *c, qk_model *m, const qk_matrix *const *ws, float *const *outs, int nw,
                     const float *x, int n, int glu) {
    int64_t rows = 0;
    for (int k = 0; k < (glu ? 1 : nw); k++) rows += ws[k]->rows;
    const int64_t tb = QK_MM_TOKENS, n_tb = (n + tb - 1) / tb;
    /* ~8 chunks per thread, row blocks a multiple of 16 rows (two panels) and of at most ~1 MiB of
     * weights: a chunk start is a cold stream from DRAM, so not thousands of them (a 262144-row
     * head), yet enough for a late thread to share the work (1 to 16 MiB measured the same) */
    int64_t rb = rows * n_tb / (8 * (int64_t)m->n_threads);
    const int64_t rb_max = (int64_t)((1u << 20) / ws[0]->row_bytes);
    rb = rb > rb_max ? rb_max : rb;
    rb = rb < 16 ? 16 : rb;
    rb = (rb + 15) / 16 * 16; /* whole pairs of panels (tiles.h) */
    int64_t n_rb[3], total = 0;
    for (int k = 0; k < (glu ? 1 : nw); k++) {
        n_rb[k] = (ws[k]->rows + rb - 1) / rb;
        total += n_rb[k] * n_tb;
    }
    void *scratch = m->rt->gemm_scratch[c->tid];
    QK_CHUNKS(c, ch, total) {
        int k = 0;
        int64_t rem = ch;
        while (rem >= n_rb[k] * n_tb) rem -= n_rb[k++] * n_tb;
        const int64_t r0 = (rem / n_tb) * rb, t0 = (rem % n_tb) * tb;
        const int64_t r1 = r0 + rb < ws[k]->rows ? r0 + rb : ws[k]->rows;
        const int64_t t1 = t0 + tb < n ? t0 + tb : n;
        for (int g = k; g <= (glu ? 1 : k); g++) {
            const qk_matrix *w = ws[g];
            const size_t stride = qk_act_stride(w);
            const uint8_t *a = qk_act_for(m, w, x) + (size_t)t0 * stride;
            float *o = outs[g];
            if (w->tr->gemm) {
                w->tr->gemm(w->cols, w->data + (size_t)r0 * w->row_bytes, w->row_bytes, r1 - r0, a, stride,
                            t1 - t0, o + t0 * w->rows + r0, w->rows, scratch);
            } else {
                for (int64_t t = t0; t < t1; t++, a += stride)
                    for (int64_t r = r0; r < r1; r++)
                        o[t * w->rows + r] = w->tr->dot(w->cols, w->data + (size_t)r * w->row_bytes, a);
            }
        }
        if (glu) {
            const int64_t ld = ws[0]->rows;
            for (int64_t t = t0; t < t1; t++) {
                float *ga = outs[0] + t * ld, *up = outs[1] + t * ld;
                if (m->activation == QK_ACT_FN_GELU_TANH) {
#pragma omp simd
                    for (int64_t r = r0; r < r1; r++) ga[r] = qk_gelu_tanh(ga[r]) * up[r];
                } else {
#pragma omp simd
                    for (int64_t r = r0; r < r1; r++) ga[r] = qk_silu(ga[r]) * up[r];
                }
            }
        }
    }
    return qk_op_end(c, total);
}

/* ---------------------------------------------------------------- attention (an op) */

/* Query blocks: runs of consecutive batch rows of one sequence, at most rows_per_block long
 * (tokens of a block share each converted key/value tile). */
static int qk_plan_blocks(qk_model *m, const qk_pass *p, int32_t *blocks) {
    const int group = m->n_head / m->n_head_kv;
    const int per = QK_ATT_ROWS / group > 0 ? QK_ATT_ROWS / group : 1;
    int nb = 0;
    for (int i = 0; i < p->n;) {
        int j = i + 1;
        while (j < p->n && j - i < per && p->seq[j] == p->seq[i]) j++;
        blocks[2 * nb] = i;
        blocks[2 * nb + 1] = j;
        nb++;
        i = j;
    }
    return nb;
}

/* Floats of one span state of a query row: its running max, its sum, its output. */
static inline int qk_att_state_floats(const qk_model *m) { return m->head_dim_v + 2; }

/* Query rows of the largest block (a group's heads x tokens). */
static inline int qk_att_max_rows(const qk_model *m) {
    const int group = m->n_head / m->n_head_kv;
    return (QK_ATT_ROWS / group > 0 ? QK_ATT_ROWS / group : 1) * group;
}

static size_t qk_att_scratch_floats(const qk_model *m) {
    const size_t rows = (size_t)qk_att_max_rows(m);
    return (size_t)m->head_dim * QK_ATT_KT + (size_t)QK_ATT_KT * m->head_dim_v +
           rows * (QK_ATT_KT + m->head_dim_v + 2) + 2 * rows * (size_t)qk_att_state_floats(m) + 64;
}

/* The split buffer: the span states of QK_SPLIT_TOKENS tokens at the full context. */
static size_t qk_att_parts_floats(const qk_model *m) {
    const int64_t spans = ((int64_t)m->n_ctx + QK_ATT_SPAN - 1) / QK_ATT_SPAN;
    const int64_t tokens = m->n_batch < QK_SPLIT_TOKENS ? m->n_batch : QK_SPLIT_TOKENS;
    const int64_t floats = tokens * m->n_head * spans * qk_att_state_floats(m);
    return (size_t)(floats < QK_SPLIT_MAX_FLOATS ? floats : QK_SPLIT_MAX_FLOATS);
}

/* Whether this pass splits its blocks' spans across chunks: when the (block, kv head) chunks
 * are too few to keep the threads busy (a decode step; Gemma 3 270M has one kv head), some
 * block reaches past one span, and the states fit the buffer. */
static void qk_plan_split(qk_model *m, qk_pass *p) {
    qk_runtime *rt = m->rt;
    const int group = m->n_head / m->n_head_kv;
    const int64_t n_att = (int64_t)p->n_blocks * m->n_head_kv;
    int64_t chunks = 0, floats = 0;
    p->split = 0;
    if (m->n_threads < 2 || n_att >= 2 * (int64_t)m->n_threads) return;
    for (int b = 0; b < p->n_blocks; b++) {
        const int i0 = rt->blocks[2 * b], i1 = rt->blocks[2 * b + 1];
        int hi = 0;
        for (int i = i0; i < i1; i++) hi = p->pos[i] > hi ? p->pos[i] : hi;
        const int64_t n_sp = hi / QK_ATT_SPAN + 1;
        rt->span_chunk0[b] = chunks;
        rt->part_at[b] = floats;
        chunks += m->n_head_kv * n_sp;
        floats += m->n_head_kv * n_sp * (int64_t)(i1 - i0) * group * qk_att_state_floats(m);
    }
    rt->span_chunk0[p->n_blocks] = chunks;
    rt->part_at[p->n_blocks] = floats;
    if (chunks > n_att && (size_t)floats <= rt->parts_cap) {
        p->split = 1;
        p->n_span_chunks = chunks;
    }
}

/* n f16 values to f32 (gcc 12 does not vectorize _Float16 conversions by itself). */
static inline void qk_f16_to_f32_row(const qk_f16 *restrict src, float *restrict dst, int n) {
    int j = 0;
#if defined(__AVX2__) && defined(__F16C__)
    for (; j + 8 <= n; j += 8) _mm256_storeu_ps(dst + j, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(src + j))));
#endif
    for (; j < n; j++) dst[j] = qk_f16_to_f32(src[j]);
}

static inline void qk_f32_to_f16_row(const float *restrict src, qk_f16 *restrict dst, int n) {
    int j = 0;
#if defined(__AVX2__) && defined(__F16C__)
    for (; j + 8 <= n; j += 8)
        _mm_storeu_si128((__m128i *)(dst + j), _mm256_cvtps_ph(_mm256_loadu_ps(src + j), _MM_FROUND_TO_NEAREST_INT));
#endif
    for (; j < n; j++) dst[j] = qk_f32_to_f16(src[j]);
}

/* n values (whole blocks) to q8_0 as ggml's reference quantizer: d = max|x| / 127 stored as
 * f16, q = x * (1 / d) rounded half away from zero (gguf-py's Q8_0 gives the same bytes). */
static void qk_f32_to_q8_0_row(const float *restrict x, qk_cache_q8_0 *restrict y, int n) {
    for (int i = 0; i < n / 32; i++, x += 32) {
        float amax = 0.0f;
        for (int j = 0; j < 32; j++) amax = fabsf(x[j]) > amax ? fabsf(x[j]) : amax;
        const float d = amax / 127.0f, id = d != 0.0f ? 1.0f / d : 0.0f;
        for (int j = 0; j < 32; j++) y[i].qs[j] = (int8_t)roundf(x[j] * id);
        y[i].d = qk_fp32_to_fp16(d);
    }
}

static void qk_q8_0_to_f32_row(const qk_cache_q8_0 *restrict y, float *restrict dst, int n) {
    for (int i = 0; i < n / 32; i++, dst += 32) {
        const float d = qk_fp16_to_fp32(y[i].d);
        const int8_t *restrict qs = y[i].qs;
#pragma omp simd
        for (int j = 0; j < 32; j++) dst[j] = d * (float)qs[j];
    }
}

/* One row of n values into the cache, in its type. */
static inline void qk_cache_put(int type, const float *x, uint8_t *dst, int n) {
    if (type == QK_CACHE_Q8_0)
        qk_f32_to_q8_0_row(x, (qk_cache_q8_0 *)dst, n);
    else
        qk_f32_to_f16_row(x, (qk_f16 *)dst, n);
}

/* n consecutive cached values (rows of whole blocks are contiguous) to f32. */
static inline void qk_cache_get(int type, const uint8_t *src, float *dst, int n) {
    if (type == QK_CACHE_Q8_0)
        qk_q8_0_to_f32_row((const qk_cache_q8_0 *)src, dst, n);
    else
        qk_f16_to_f32_row((const qk_f16 *)src, dst, n);
}

/* Keys 0..tn-1 of one head (f16 rows of `row` bytes from ks) into kt[j][t] (f32, transposed so
 * that the scores vectorize over keys); columns tn up to the next multiple of 16 zero (the
 * scores stop there). q8_0 keys go through qk_load_keys_q8. */
static void qk_load_keys(float *restrict kt, const uint8_t *ks, size_t row, int hd, int tn) {
    int t = 0;
#if defined(__AVX2__) && defined(__F16C__)
    for (; t + 8 <= tn && hd % 8 == 0; t += 8)
        for (int j = 0; j < hd; j += 8) {
            __m256 r[8], c[8]; /* r[k] = key t+k, dims j..j+7  ->  c[d] = dim j+d, keys t..t+7 */
            for (int k = 0; k < 8; k++)
                r[k] = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(ks + (size_t)(t + k) * row + j * sizeof(qk_f16))));
            qk_transpose8x8(r, c);
            for (int d = 0; d < 8; d++) _mm256_storeu_ps(kt + (j + d) * QK_ATT_KT + t, c[d]);
        }
#endif
    for (; t < tn; t++)
        for (int j = 0; j < hd; j++) kt[j * QK_ATT_KT + t] = qk_f16_to_f32(((const qk_f16 *)(ks + (size_t)t * row))[j]);
    for (int j = 0; j < hd; j++)
        for (int u = tn; u < (tn + 15) / 16 * 16; u++) kt[j * QK_ATT_KT + u] = 0.0f;
}

/* Accumulator width of the score and PV blocks: with AVX-512, 16 floats are one register, and
 * 4 rows x 16 would leave the FMA pipes waiting on their latency: 4 rows x 32 (8 registers). */
#if defined(__AVX512F__)
#define QK_ATT_W 32
#else
#define QK_ATT_W 16
#endif

/* Scores of 4 query rows against keys tb..tb+w-1 (w a constant where inlined). */
QK_TILE_INLINE void qk_att_scores_block(float *restrict s, const float *const qr[4], int nq_here,
                                        const float *restrict kt, int hd, int tb, int w) {
    float acc[4][QK_ATT_W] = {{0}};
    for (int j = 0; j < hd; j++) {
        const float *kj = kt + j * QK_ATT_KT + tb;
        for (int k = 0; k < 4; k++) {
            const float qv = qr[k][j];
#pragma omp simd
            for (int u = 0; u < w; u++) acc[k][u] += qv * kj[u];
        }
    }
    for (int k = 0; k < nq_here; k++) memcpy(s + (size_t)k * QK_ATT_KT + tb, acc[k], sizeof(float) * (size_t)w);
}

/* s[r][t] = q_r . key t for nq rows and the keys t < tn (rounded up to 16): 4 rows x QK_ATT_W
 * (or 16) keys of accumulators, each summing over the dimensions in order (the same arithmetic
 * for any rows, blocks and widths). */
static void qk_att_scores(float *restrict s, const float *const *q, int nq, const float *restrict kt,
                          int hd, int tn) {
    static const float zero_row[1024];
    for (int r0 = 0; r0 < nq; r0 += 4) {
        const float *qr[4];
        for (int k = 0; k < 4; k++) qr[k] = r0 + k < nq ? q[r0 + k] : zero_row;
        const int here = nq - r0 < 4 ? nq - r0 : 4;
        int tb = 0;
        for (; tb + QK_ATT_W <= tn; tb += QK_ATT_W) qk_att_scores_block(s + (size_t)r0 * QK_ATT_KT, qr, here, kt, hd, tb, QK_ATT_W);
        for (; tb < tn; tb += 16) qk_att_scores_block(s + (size_t)r0 * QK_ATT_KT, qr, here, kt, hd, tb, 16);
    }
}

/* ---- q8_0 keys: the scores as integer dots against the query quantized to q8_0 ----
 * With a q8_0 K cache, each query row is quantized to q8_0 blocks too (once per token, as
 * llama.cpp's CPU attention converts Q to the key type's dot type), so that a score is
 * sum over blocks b of (dq_b * dk_b) * (integer dot of the 32 int8 pairs): exact integers,
 * one float multiply-add per block. The tile holds each key's int8 values transposed in
 * 4-byte words, kw[w][t] = key t's values 4w..4w+3, and its scales dk[b][t]. */

/* Query row x (n values) to q8_0 blocks, and (VNNI builds) each block's sum of int8 values. */
static void qk_quantize_query(const float *x, qk_cache_q8_0 *y, int32_t *sums, int n) {
    qk_f32_to_q8_0_row(x, y, n);
#if defined(__AVX512F__) && defined(__AVX512VNNI__) /* only vpdpbusd's scores take them back out */
    for (int b = 0; b < n / 32; b++) {
        int32_t s = 0;
        for (int j = 0; j < 32; j++) s += y[b].qs[j];
        sums[b] = s;
    }
#else
    (void)sums;
#endif
}

/* Keys 0..tn-1 of one head (q8_0 rows of `row` bytes from ks) into the tile: words kw[hd/4][KT]
 * and scales dk[hd/32][KT] (after the words); columns tn up to the next multiple of 16 zero. */
static void qk_load_keys_q8(uint32_t *restrict kw, const uint8_t *ks, size_t row, int hd, int tn) {
    const int nb = hd / 32;
    float *restrict dk = (float *)(kw + (size_t)(hd / 4) * QK_ATT_KT);
    int t = 0;
#if defined(__AVX2__)
    for (; t + 8 <= tn; t += 8)
        for (int b = 0; b < nb; b++) {
            __m256 r[8], c[8];
            for (int k = 0; k < 8; k++)
                r[k] = _mm256_castsi256_ps(_mm256_loadu_si256(
                    (const __m256i *)((const qk_cache_q8_0 *)(ks + (size_t)(t + k) * row) + b)->qs));
            qk_transpose8x8(r, c);
            for (int d = 0; d < 8; d++) _mm256_storeu_ps((float *)kw + (size_t)(b * 8 + d) * QK_ATT_KT + t, c[d]);
        }
#endif
    for (; t < tn; t++)
        for (int w = 0; w < hd / 4; w++)
            memcpy(kw + (size_t)w * QK_ATT_KT + t, ((const qk_cache_q8_0 *)(ks + (size_t)t * row) + w / 8)->qs + 4 * (w % 8), 4);
    for (int u = 0; u < tn; u++)
        for (int b = 0; b < nb; b++) dk[(size_t)b * QK_ATT_KT + u] = qk_fp16_to_fp32(((const qk_cache_q8_0 *)(ks + (size_t)u * row))[b].d);
    for (int u = tn; u < (tn + 15) / 16 * 16; u++) {
        for (int w = 0; w < hd / 4; w++) kw[(size_t)w * QK_ATT_KT + u] = 0;
        for (int b = 0; b < nb; b++) dk[(size_t)b * QK_ATT_KT + u] = 0.0f;
    }
}

/* The dot of 4 packed int8 (a word of the tile) with 4 others. */
static inline int32_t qk_dot4_i8(uint32_t a, uint32_t b) {
    int32_t s = 0;
    for (int e = 0; e < 4; e++) s += (int32_t)(int8_t)(a >> (8 * e)) * (int32_t)(int8_t)(b >> (8 * e));
    return s;
}

/* s[r][t] = query r (q8_0 blocks q[r], block sums qsum[r]) . key t for the keys t < tn (rounded
 * up to 16): per block, exact integer dots, then acc += (float)dot * (dq * dk); 4 rows x 16
 * keys at a time, the same arithmetic for any rows and blocks. */
static void qk_att_scores_q8(float *restrict s, const qk_cache_q8_0 *const *q, const int32_t *const *qsum, int nq,
                             const uint32_t *restrict kw, int hd, int tn) {
    static const qk_cache_q8_0 zero_q[1024 / 32];
    static const int32_t zero_sum[1024 / 32];
    const int nb = hd / 32;
    const float *restrict dk = (const float *)(kw + (size_t)(hd / 4) * QK_ATT_KT);
    for (int r0 = 0; r0 < nq; r0 += 4) {
        const qk_cache_q8_0 *qr[4];
        const int32_t *sr[4]; /* the VNNI path's correction */
        float dq[4][1024 / 32];
        for (int k = 0; k < 4; k++) {
            qr[k] = r0 + k < nq ? q[r0 + k] : zero_q;
            sr[k] = r0 + k < nq ? qsum[r0 + k] : zero_sum;
            for (int b = 0; b < nb; b++) dq[k][b] = qk_fp16_to_fp32(qr[k][b].d);
        }
        (void)sr;
        for (int tb = 0; tb < tn; tb += 16) {
#if defined(__AVX512F__) && defined(__AVX512VNNI__)
            /* keys as unsigned bytes (k + 128) against signed query bytes: vpdpbusd, then
             * 128 x the block's query sum taken back out */
            const __m512i flip = _mm512_set1_epi8((char)0x80);
            __m512 acc[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps()};
            for (int b = 0; b < nb; b++) {
                __m512i ia[4] = {_mm512_setzero_si512(), _mm512_setzero_si512(), _mm512_setzero_si512(),
                                 _mm512_setzero_si512()};
                for (int g = 0; g < 8; g++) {
                    const __m512i kv = _mm512_xor_si512(
                        _mm512_loadu_si512((const void *)(kw + (size_t)(b * 8 + g) * QK_ATT_KT + tb)), flip);
                    for (int k = 0; k < 4; k++) {
                        int32_t qw;
                        memcpy(&qw, qr[k][b].qs + 4 * g, 4);
                        ia[k] = _mm512_dpbusd_epi32(ia[k], kv, _mm512_set1_epi32(qw));
                    }
                }
                const __m512 dkv = _mm512_loadu_ps(dk + (size_t)b * QK_ATT_KT + tb);
                for (int k = 0; k < 4; k++) {
                    const __m512i dot = _mm512_sub_epi32(ia[k], _mm512_set1_epi32(128 * sr[k][b]));
                    acc[k] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), _mm512_mul_ps(_mm512_set1_ps(dq[k][b]), dkv), acc[k]);
                }
            }
            for (int k = 0; k < 4 && r0 + k < nq; k++) _mm512_storeu_ps(s + (size_t)(r0 + k) * QK_ATT_KT + tb, acc[k]);
#elif defined(__AVX2__)
            /* |q| x (k with q's sign): maddubs keeps each pair of products within int16 */
            const __m256i ones = _mm256_set1_epi16(1);
            __m256 acc[4][2];
            for (int k = 0; k < 4; k++) acc[k][0] = acc[k][1] = _mm256_setzero_ps();
            for (int b = 0; b < nb; b++) {
                __m256i ia[4][2];
                for (int k = 0; k < 4; k++) ia[k][0] = ia[k][1] = _mm256_setzero_si256();
                for (int g = 0; g < 8; g++) {
                    const uint32_t *kg = kw + (size_t)(b * 8 + g) * QK_ATT_KT + tb;
                    const __m256i kv0 = _mm256_loadu_si256((const __m256i *)kg);
                    const __m256i kv1 = _mm256_loadu_si256((const __m256i *)(kg + 8));
                    for (int k = 0; k < 4; k++) {
                        int32_t qw;
                        memcpy(&qw, qr[k][b].qs + 4 * g, 4);
                        const __m256i qb = _mm256_set1_epi32(qw), qa = _mm256_abs_epi8(qb);
                        ia[k][0] = _mm256_add_epi32(
                            ia[k][0], _mm256_madd_epi16(_mm256_maddubs_epi16(qa, _mm256_sign_epi8(kv0, qb)), ones));
                        ia[k][1] = _mm256_add_epi32(
                            ia[k][1], _mm256_madd_epi16(_mm256_maddubs_epi16(qa, _mm256_sign_epi8(kv1, qb)), ones));
                    }
                }
                for (int h = 0; h < 2; h++) {
                    const __m256 dkv = _mm256_loadu_ps(dk + (size_t)b * QK_ATT_KT + tb + 8 * h);
                    for (int k = 0; k < 4; k++)
                        acc[k][h] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(ia[k][h]),
                                                    _mm256_mul_ps(_mm256_set1_ps(dq[k][b]), dkv), acc[k][h]);
                }
            }
            for (int k = 0; k < 4 && r0 + k < nq; k++) {
                _mm256_storeu_ps(s + (size_t)(r0 + k) * QK_ATT_KT + tb, acc[k][0]);
                _mm256_storeu_ps(s + (size_t)(r0 + k) * QK_ATT_KT + tb + 8, acc[k][1]);
            }
#else
            float acc[4][16] = {{0}};
            for (int b = 0; b < nb; b++) {
                int32_t ia[4][16] = {{0}};
                for (int g = 0; g < 8; g++) {
                    const uint32_t *kg = kw + (size_t)(b * 8 + g) * QK_ATT_KT + tb;
                    for (int k = 0; k < 4; k++) {
                        uint32_t qw;
                        memcpy(&qw, qr[k][b].qs + 4 * g, 4);
                        for (int u = 0; u < 16; u++) ia[k][u] += qk_dot4_i8(qw, kg[u]);
                    }
                }
                for (int k = 0; k < 4; k++) {
                    const float *dkb = dk + (size_t)b * QK_ATT_KT + tb;
#pragma omp simd
                    for (int u = 0; u < 16; u++) acc[k][u] += (float)ia[k][u] * (dq[k][b] * dkb[u]);
                }
            }
            for (int k = 0; k < 4 && r0 + k < nq; k++) memcpy(s + (size_t)(r0 + k) * QK_ATT_KT + tb, acc[k], sizeof acc[k]);
#endif
        }
    }
}

/* o[:, d0..d0+w-1] of 4 rows += their weights times the values, t in order. */
QK_TILE_INLINE void qk_att_pv_block(float *restrict o, const float *const pr[4], int nq_here,
                                    const float *restrict v, int hdv, int tn, int d0, int w) {
    float acc[4][QK_ATT_W];
    for (int k = 0; k < 4; k++)
        for (int u = 0; u < w; u++) acc[k][u] = k < nq_here ? o[(size_t)k * hdv + d0 + u] : 0.0f;
    for (int t = 0; t < tn; t++) {
        const float *vt = v + (size_t)t * hdv + d0;
        for (int k = 0; k < 4; k++) {
            const float wt = pr[k][t];
#pragma omp simd
            for (int u = 0; u < w; u++) acc[k][u] += wt * vt[u];
        }
    }
    for (int k = 0; k < nq_here; k++) memcpy(o + (size_t)k * hdv + d0, acc[k], sizeof(float) * (size_t)w);
}

/* o[r][:] += sum over t < tn of p[r][t] v[t][:], t in order; 4 rows x QK_ATT_W (or 16) dims at
 * a time. */
static void qk_att_pv(float *restrict o, const float *restrict p, int nq, const float *restrict v,
                      int hdv, int tn) {
    static const float zero_row[QK_ATT_KT];
    for (int r0 = 0; r0 < nq; r0 += 4) {
        const float *pr[4];
        for (int k = 0; k < 4; k++) pr[k] = r0 + k < nq ? p + (size_t)(r0 + k) * QK_ATT_KT : zero_row;
        const int here = nq - r0 < 4 ? nq - r0 : 4;
        float *orow = o + (size_t)r0 * hdv;
        int d0 = 0;
        for (; d0 + QK_ATT_W <= hdv; d0 += QK_ATT_W) qk_att_pv_block(orow, pr, here, v, hdv, tn, d0, QK_ATT_W);
        for (; d0 + 16 <= hdv; d0 += 16) qk_att_pv_block(orow, pr, here, v, hdv, tn, d0, 16);
        for (int k = 0; k < here; k++)
            for (int d = d0; d < hdv; d++)
                for (int t = 0; t < tn; t++) orow[(size_t)k * hdv + d] += pr[k][t] * v[(size_t)t * hdv + d];
    }
}

/* The query rows of block b for kv head kvh (tokens x the group's heads) and the keys [lo, hi]
 * any of them sees in layer l. Returns the row count. */
static int qk_att_rows(const qk_model *m, const qk_layer *L, const qk_pass *p, int b, int kvh,
                       const float **qrow, int *lo, int *hi) {
    const int hd = m->head_dim, group = m->n_head / m->n_head_kv;
    const int i0 = m->rt->blocks[2 * b], i1 = m->rt->blocks[2 * b + 1];
    const int nq = (i1 - i0) * group;
    for (int r = 0; r < nq; r++) {
        const int i = i0 + r / group, h = kvh * group + r % group;
        qrow[r] = m->q + (int64_t)i * m->n_head * hd + (int64_t)h * hd;
    }
    *lo = m->n_ctx;
    *hi = -1;
    for (int i = i0; i < i1; i++) {
        const int t0 = L->window && p->pos[i] >= L->window ? p->pos[i] - L->window + 1 : 0;
        *lo = t0 < *lo ? t0 : *lo;
        *hi = p->pos[i] > *hi ? p->pos[i] : *hi;
    }
    return nq;
}

/* Span sp of block b's attention to kv head kvh: the online softmax over key tiles aligned to
 * absolute positions, from an empty state, into st (per row: max, sum, unnormalized output).
 * Each query sees the same tiles, in the same order, with the same arithmetic, whatever block
 * it is in; keys outside a query's range weigh exactly 0. */
static void qk_att_span(qk_model *m, int l, const qk_pass *p, int b, int kvh, const float *const *qrow,
                        int nq, int lo, int hi, int sp, float *scratch, float *st) {
    const qk_layer *L = &m->layers[l];
    const int hd = m->head_dim, hdv = m->head_dim_v, group = m->n_head / m->n_head_kv;
    const int sf = qk_att_state_floats(m), i0 = m->rt->blocks[2 * b], s = p->seq[i0];
    const uint8_t *ks = qk_k_at(m, l, s, kvh, 0), *vs = qk_v_at(m, l, s, kvh, 0);
    float *kt = scratch;                          /* [hd][KT] keys, transposed */
    float *vt = kt + (size_t)hd * QK_ATT_KT;      /* [KT][hdv] */
    float *sc = vt + (size_t)QK_ATT_KT * hdv;     /* [nq][KT] scores, then weights */
    float *o = sc + (size_t)nq * QK_ATT_KT;       /* [nq][hdv] */
    float *mx = o + (size_t)nq * hdv, *sum = mx + nq;
    const int first = sp * QK_ATT_SPAN > lo / QK_ATT_KT * QK_ATT_KT ? sp * QK_ATT_SPAN : lo / QK_ATT_KT * QK_ATT_KT;
    const int last = (sp + 1) * QK_ATT_SPAN - 1 < hi ? (sp + 1) * QK_ATT_SPAN - 1 : hi;
    for (int r = 0; r < nq; r++) {
        mx[r] = -INFINITY;
        sum[r] = 0.0f;
    }
    memset(o, 0, sizeof(float) * (size_t)nq * hdv);
    const int q8 = m->k_type == QK_CACHE_Q8_0;
    const qk_cache_q8_0 *q8row[256];
    const int32_t *q8sum[256];
    for (int r = 0; q8 && r < nq; r++) { /* query row r's place in m->q is its place in rt->q8 */
        const size_t at = (size_t)(qrow[r] - m->q) / (size_t)hd * (size_t)(hd / 32);
        q8row[r] = m->rt->q8 + at;
        q8sum[r] = m->rt->q8_sum + at;
    }
    for (int ta = first; ta <= last; ta += QK_ATT_KT) {
        const int tn = last + 1 - ta < QK_ATT_KT ? last + 1 - ta : QK_ATT_KT; /* keys present */
        qk_cache_get(m->v_type, vs + (size_t)ta * m->v_row, vt, tn * hdv);
        if (q8) {
            qk_load_keys_q8((uint32_t *)kt, ks + (size_t)ta * m->k_row, m->k_row, hd, tn);
            qk_att_scores_q8(sc, q8row, q8sum, nq, (const uint32_t *)kt, hd, tn);
        } else {
            qk_load_keys(kt, ks + (size_t)ta * m->k_row, m->k_row, hd, tn);
            qk_att_scores(sc, qrow, nq, kt, hd, tn);
        }
        for (int r = 0; r < nq; r++) {
            const int pi = p->pos[i0 + r / group];
            const int t0 = L->window && pi >= L->window ? pi - L->window + 1 : 0;
            const int a = t0 > ta ? t0 - ta : 0, e = pi + 1 - ta < tn ? pi + 1 - ta : tn; /* [a, e) */
            float *w = sc + (size_t)r * QK_ATT_KT;
            if (a >= e) { /* no key of this tile for this query: weights 0, state unchanged */
                memset(w, 0, sizeof(float) * tn);
                continue;
            }
            float tmax = -INFINITY;
            if (m->attn_softcap > 0.0f) {
                const float cap = m->attn_softcap, inv = 1.0f / cap;
                for (int t = a; t < e; t++) w[t] = cap * qk_tanh(w[t] * m->attn_scale * inv);
            } else {
                for (int t = a; t < e; t++) w[t] *= m->attn_scale;
            }
            for (int t = a; t < e; t++) tmax = w[t] > tmax ? w[t] : tmax;
            const float mnew = tmax > mx[r] ? tmax : mx[r];
            const float corr = qk_exp(mx[r] - mnew);
            float tsum = 0.0f;
#pragma omp simd reduction(+ : tsum)
            for (int t = a; t < e; t++) {
                w[t] = qk_exp(w[t] - mnew);
                tsum += w[t];
            }
            for (int t = 0; t < a; t++) w[t] = 0.0f;
            for (int t = e; t < tn; t++) w[t] = 0.0f;
            mx[r] = mnew;
            sum[r] = sum[r] * corr + tsum;
            float *orow = o + (size_t)r * hdv;
#pragma omp simd
            for (int j = 0; j < hdv; j++) orow[j] *= corr;
        }
        qk_att_pv(o, sc, nq, vt, hdv, tn);
    }
    for (int r = 0; r < nq; r++) {
        float *sr = st + (size_t)r * sf;
        sr[0] = mx[r];
        sr[1] = sum[r];
        memcpy(sr + 2, o + (size_t)r * hdv, sizeof(float) * hdv);
    }
}

static void qk_att_empty(float *acc, int nq, int sf) {
    for (int r = 0; r < nq; r++) {
        acc[(size_t)r * sf] = -INFINITY;
        acc[(size_t)r * sf + 1] = 0.0f;
    }
}

/* acc = acc (+) st, row by row: the log-sum-exp merge of two softmax states. An empty state
 * (max -inf: no key seen) changes nothing, and folding into an empty one copies: one span
 * folded alone gives exactly its own state. */
static void qk_att_fold(float *restrict acc, const float *restrict st, int nq, int sf) {
    for (int r = 0; r < nq; r++) {
        float *a = acc + (size_t)r * sf;
        const float *s = st + (size_t)r * sf;
        if (s[0] == -INFINITY) continue;
        if (a[0] == -INFINITY) {
            memcpy(a, s, sizeof(float) * sf);
            continue;
        }
        const float mnew = s[0] > a[0] ? s[0] : a[0];
        const float ca = qk_exp(a[0] - mnew), cs = qk_exp(s[0] - mnew);
        a[0] = mnew;
        a[1] = a[1] * ca + s[1] * cs;
#pragma omp simd
        for (int j = 2; j < sf; j++) a[j] = a[j] * ca + s[j] * cs;
    }
}

/* The folded states of block b's rows for kv head kvh, normalized into attn_out. */
static void qk_att_write(qk_model *m, int b, int kvh, const float *acc) {
    const int hdv = m->head_dim_v, group = m->n_head / m->n_head_kv, sf = qk_att_state_floats(m);
    const int i0 = m->rt->blocks[2 * b], nq = (m->rt->blocks[2 * b + 1] - i0) * group;
    for (int r = 0; r < nq; r++) {
        const int i = i0 + r / group, h = kvh * group + r % group;
        const float *a = acc + (size_t)r * sf;
        float *dst = m->attn_out + (int64_t)i * m->n_head * hdv + (int64_t)h * hdv;
        const float inv = a[1] > 0.0f ? 1.0f / a[1] : 0.0f;
        for (int j = 0; j < hdv; j++) dst[j] = a[2 + j] * inv;
    }
}

/* Where the per-thread scratch keeps the fold (after the tiles and one span's state). */
static inline float *qk_att_acc(const qk_model *m, float *scratch) {
    const size_t rows = (size_t)qk_att_max_rows(m);
    return scratch + (size_t)m->head_dim * QK_ATT_KT + (size_t)QK_ATT_KT * m->head_dim_v +
           rows * (QK_ATT_KT + m->head_dim_v + 2);
}

/* One chunk: a query block x one KV head, every span in turn, folded. */
static void qk_attention_chunk(qk_model *m, int l, const qk_pass *p, int b, int kvh, float *scratch) {
    const float *qrow[256]; /* nq <= max(QK_ATT_ROWS, group), group <= 256 */
    int lo, hi;
    const int nq = qk_att_rows(m, &m->layers[l], p, b, kvh, qrow, &lo, &hi), sf = qk_att_state_floats(m);
    float *acc = qk_att_acc(m, scratch), *st = acc + (size_t)qk_att_max_rows(m) * sf;
    qk_att_empty(acc, nq, sf);
    for (int sp = lo / QK_ATT_SPAN; sp <= hi / QK_ATT_SPAN; sp++) {
        qk_att_span(m, l, p, b, kvh, qrow, nq, lo, hi, sp, scratch, st);
        qk_att_fold(acc, st, nq, sf);
    }
    qk_att_write(m, b, kvh, acc);
}

/* Split pass, first op: chunk ch is one (block, kv head, span); its state goes to the parts. */
static void qk_attention_span_chunk(qk_model *m, int l, const qk_pass *p, int64_t ch, float *scratch) {
    const qk_runtime *rt = m->rt;
    int b = 0;
    while (rt->span_chunk0[b + 1] <= ch) b++;
    const int64_t n_sp = (rt->span_chunk0[b + 1] - rt->span_chunk0[b]) / m->n_head_kv;
    const int64_t k = ch - rt->span_chunk0[b];
    const int kvh = (int)(k / n_sp), sp = (int)(k % n_sp);
    const float *qrow[256];
    int lo, hi;
    const int nq = qk_att_rows(m, &m->layers[l], p, b, kvh, qrow, &lo, &hi), sf = qk_att_state_floats(m);
    float *st = rt->parts + rt->part_at[b] + (size_t)k * nq * sf;
    if (sp < lo / QK_ATT_SPAN || sp > hi / QK_ATT_SPAN)
        qk_att_empty(st, nq, sf); /* a span outside the window: nothing to see */
    else
        qk_att_span(m, l, p, b, kvh, qrow, nq, lo, hi, sp, scratch, st);
}

/* Split pass, second op: block b x kv head kvh folds its spans' states in order. */
static void qk_attention_merge(qk_model *m, int b, int kvh, float *scratch) {
    const qk_runtime *rt = m->rt;
    const int group = m->n_head / m->n_head_kv, sf = qk_att_state_floats(m);
    const int nq = (rt->blocks[2 * b + 1] - rt->blocks[2 * b]) * group;
    const int64_t n_sp = (rt->span_chunk0[b + 1] - rt->span_chunk0[b]) / m->n_head_kv;
    float *acc = qk_att_acc(m, scratch);
    qk_att_empty(acc, nq, sf);
    for (int64_t sp = 0; sp < n_sp; sp++)
        qk_att_fold(acc, rt->parts + rt->part_at[b] + (size_t)(kvh * n_sp + sp) * nq * sf, nq, sf);
    qk_att_write(m, b, kvh, acc);
}

/* ---------------------------------------------------------------- mixture of experts (ops) */

/* Token i's routes: softmax over the router's logits, the n_expert_used most probable experts
 * (ties to the lower id), their probabilities renormalised to sum 1 (llama.cpp clamps the sum
 * at the smallest normal half). */
static void qk_moe_route(qk_model *m, int i) {
    qk_moe_state *s = &m->rt->moe;
    const int ne = m->n_expert, k_used = m->n_expert_used;
    float *pr = s->probs + (int64_t)i * ne;
    float mx = -INFINITY, sum = 0.0f;
    for (int e = 0; e < ne; e++) mx = pr[e] > mx ? pr[e] : mx;
    for (int e = 0; e < ne; e++) {
        pr[e] = qk_exp(pr[e] - mx);
        sum += pr[e];
    }
    for (int e = 0; e < ne; e++) pr[e] /= sum;
    int32_t *ex = s->expert + (int64_t)i * k_used;
    float *w = s->weight + (int64_t)i * k_used, wsum = 0.0f;
    for (int k = 0; k < k_used; k++) {
        int best = -1;
        for (int e = 0; e < ne; e++) {
            int taken = 0;
            for (int j = 0; j < k && !taken; j++) taken = ex[j] == e;
            if (!taken && (best < 0 || pr[e] > pr[best])) best = e;
        }
        ex[k] = best;
        w[k] = pr[best];
        wsum += w[k];
    }
    wsum = wsum < 6.103515625e-5f ? 6.103515625e-5f : wsum;
    for (int k = 0; k < k_used; k++) w[k] /= wsum;
}

/* Groups the pass's n x used routes by expert (one thread: a few thousand integers). */
static void qk_moe_group(qk_model *m, int n) {
    qk_moe_state *s = &m->rt->moe;
    const int ne = m->n_expert, k_used = m->n_expert_used;
    memset(s->start, 0, sizeof(int32_t) * (size_t)(ne + 1));
    for (int r = 0; r < n * k_used; r++) s->start[s->expert[r] + 1]++;
    s->n_active = 0;
    for (int e = 0; e < ne; e++) {
        if (s->start[e + 1]) s->active[s->n_active++] = e;
        s->start[e + 1] += s->start[e];
    }
    memset(s->fill, 0, sizeof(int32_t) * (size_t)ne);
    for (int i = 0; i < n; i++) /* in token order: a group's rows are its tokens in batch order */
        for (int k = 0; k < k_used; k++) {
            const int e = s->expert[i * k_used + k];
            const int32_t g = s->start[e] + s->fill[e]++;
            s->token[g] = i;
            s->route[i * k_used + k] = g;
        }
}

/* out_k[g][r] = W_k(expert of g)[r] . act[g] for every grouped row g: threads take chunks of
 * (active expert, row block, block of its rows), so a decode step reads only the chosen experts'
 * weights and a prefill runs each expert's tiles once over all the tokens routed to it. With
 * glu (nw = 2: gate, up), out_0 = act_fn(out_0) * out_1. */
static int qk_moe_matmul(qk_ctx *c, qk_model *m, const qk_matrix *const *ws, float *const *outs, int nw,
                         int64_t per) {
    const qk_moe_state *s = &m->rt->moe;
    const qk_matrix *w0 = ws[0];
    int64_t n_tb = 0;
    for (int a = 0; a < s->n_active; a++) {
        const int e = s->active[a];
        n_tb += (s->start[e + 1] - s->start[e] + QK_MOE_TOKENS - 1) / QK_MOE_TOKENS;
    }
    /* row blocks as in qk_matmul: ~8 chunks per thread, at most ~1 MiB of weights each */
    int64_t rb = per * n_tb / (8 * (int64_t)m->n_threads);
    const int64_t rb_max = (int64_t)((1u << 20) / w0->row_bytes);
    rb = rb > rb_max ? rb_max : rb;
    rb = rb < 16 ? 16 : rb;
    rb = (rb + 7) / 8 * 8;
    const int64_t n_rb = (per + rb - 1) / rb, total = n_rb * n_tb;
    void *scratch = m->rt->gemm_scratch[c->tid];
    QK_CHUNKS(c, ch, total) {
        /* chunk -> (expert, token block, row block): token blocks of all experts in order */
        int64_t tb = ch / n_rb;
        const int64_t r0 = (ch % n_rb) * rb, r1 = r0 + rb < per ? r0 + rb : per;
        int a = 0, e = s->active[0];
        for (;; a++) {
            e = s->active[a];
            const int64_t nb = (s->start[e + 1] - s->start[e] + QK_MOE_TOKENS - 1) / QK_MOE_TOKENS;
            if (tb < nb) break;
            tb -= nb;
        }
        const int64_t g0 = s->start[e] + tb * QK_MOE_TOKENS;
        const int64_t g1 = g0 + QK_MOE_TOKENS < s->start[e + 1] ? g0 + QK_MOE_TOKENS : s->start[e + 1];
        for (int k = 0; k < nw; k++) {
            const qk_matrix *w = ws[k];
            const uint8_t *wd = w->data + ((size_t)e * per + r0) * w->row_bytes;
            const size_t stride = qk_act_stride(w);
            const uint8_t *x = s->act[w->tr->act] + (size_t)g0 * stride;
            float *o = outs[k];
            if (w->tr->gemm) {
                w->tr->gemm(w->cols, wd, w->row_bytes, r1 - r0, x, stride, g1 - g0, o + g0 * per + r0, per, scratch);
            } else {
                for (int64_t g = g0; g < g1; g++, x += stride)
                    for (int64_t r = r0; r < r1; r++)
                        o[g * per + r] = w->tr->dot(w->cols, wd + (size_t)(r - r0) * w->row_bytes, x);
            }
        }
        if (nw == 2)
            for (int64_t g = g0; g < g1; g++) {
                float *ga = outs[0] + g * per, *up = outs[1] + g * per;
                if (m->activation == QK_ACT_FN_GELU_TANH) {
#pragma omp simd
                    for (int64_t r = r0; r < r1; r++) ga[r] = qk_gelu_tanh(ga[r]) * up[r];
                } else {
#pragma omp simd
                    for (int64_t r = r0; r < r1; r++) ga[r] = qk_silu(ga[r]) * up[r];
                }
            }
    }
    return qk_op_end(c, total);
}

/* The FFN of a mixture-of-experts layer, from the normed rows m->xn (already quantized for the
 * router and the experts' gate/up) into m->tmp. */
static int qk_moe_ffn(qk_ctx *c, qk_model *m, const qk_layer *L, int n) {
    qk_moe_state *s = &m->rt->moe;
    const int k_used = m->n_expert_used, E = m->n_embd, F = m->n_ff;
    const int64_t n_routes = (int64_t)n * k_used;
    const qk_matrix *router[1] = {&L->router};
    float *probs[1] = {s->probs};
    if (!qk_matmul(c, m, router, probs, 1, m->xn, n, 0)) return 0;
    QK_CHUNKS(c, i, n) qk_moe_route(m, (int)i);
    if (!qk_op_end(c, n)) return 0;
    QK_CHUNKS(c, ch, 1) qk_moe_group(m, n);
    if (!qk_op_end(c, 1)) return 0;
    /* gather each route's quantized input row into its expert's group */
    const qk_matrix *gu[2] = {&L->gate_exps, &L->up_exps};
    QK_CHUNKS(c, g, n_routes) {
        int seen = 0;
        for (int k = 0; k < 2; k++) {
            const int f = gu[k]->tr->act;
            if ((seen >> f) & 1) continue;
            seen |= 1 << f;
            const size_t stride = qk_act_stride(gu[k]);
            const uint8_t *src = f == QK_ACT_F32 ? (const uint8_t *)(m->xn + (int64_t)s->token[g] * E)
                                                 : m->rt->act[f] + (size_t)s->token[g] * stride;
            memcpy(s->act[f] + (size_t)g * stride, src, stride);
        }
    }
    if (!qk_op_end(c, n_routes)) return 0;
    float *gu_out[2] = {s->gate, s->up};
    if (!qk_moe_matmul(c, m, gu, gu_out, 2, F)) return 0;
    const qk_matrix *down[1] = {&L->down_exps};
    const int fd = L->down_exps.tr->act;
    QK_CHUNKS(c, g, n_routes) {
        const float *h = s->gate + g * F;
        if (fd == QK_ACT_F32)
            memcpy(s->act[fd] + (size_t)g * F * sizeof(float), h, (size_t)F * sizeof(float));
        else
            qk_quantize_act(fd, h, s->act[fd] + (size_t)g * qk_act_stride(down[0]), F);
    }
    if (!qk_op_end(c, n_routes)) return 0;
    float *down_out[1] = {s->down};
    if (!qk_moe_matmul(c, m, down, down_out, 1, E)) return 0;
    /* each token: its experts' outputs, weighted, summed in route order */
    QK_CHUNKS(c, i, n) {
        float *out = m->tmp + i * E;
        for (int k = 0; k < k_used; k++) {
            const float w = s->weight[i * k_used + k];
            const float *d = s->down + (int64_t)s->route[i * k_used + k] * E;
            if (k == 0) {
#pragma omp simd
                for (int j = 0; j < E; j++) out[j] = w * d[j];
            } else {
#pragma omp simd
                for (int j = 0; j < E; j++) out[j] += w * d[j];
            }
        }
    }
    return qk_op_end(c, n);
}

/* ---------------------------------------------------------------- the pass */

static const float *qk_rope_cs(qk_model *m, int l, int i, float *tmp, int pos) {
    const qk_runtime *rt = m->rt;
    const int half = m->n_rot / 2, b = rt->layer_base[l];
    if (b >= 0) return rt->rope_cs + ((size_t)b * m->n_batch + i) * (size_t)m->n_rot;
    /* a layer with a rare rope base: compute its table here */
    float freq[512];
    for (int j = 0; j < half && j < 512; j++) freq[j] = qk_rope_freq(m, m->layers[l].rope_base, j);
    qk_rope_table(tmp, freq, half, pos, m->rope_attn_factor);
    return tmp;
}

/* Per token: q/k biases, q/k norms, rope; k and v into the cache. */
static void qk_qkv_post(qk_model *m, int l, const qk_pass *p, int i) {
    const qk_layer *L = &m->layers[l];
    const int hd = m->head_dim, hdv = m->head_dim_v;
    const int q_dim = m->n_head * hd, kv_dim = m->n_head_kv * hd, kv_dim_v = m->n_head_kv * hdv;
    float *q = m->q + (int64_t)i * q_dim, *k = m->k + (int64_t)i * kv_dim, *v = m->v + (int64_t)i * kv_dim_v;
    float tmp[1024];
    const float *cs = qk_rope_cs(m, l, i, tmp, p->pos[i]);
    if (L->bq) for (int j = 0; j < q_dim; j++) q[j] += L->bq[j];
    if (L->bk) for (int j = 0; j < kv_dim; j++) k[j] += L->bk[j];
    if (L->bv) for (int j = 0; j < kv_dim_v; j++) v[j] += L->bv[j];
    for (int h = 0; h < m->n_head; h++) {
        if (m->qk_norm) qk_rmsnorm(q + h * hd, q + h * hd, L->q_norm, hd, m->norm_eps);
        qk_rope(q + h * hd, m->n_rot, m->rope_neox, cs);
    }
    if (m->k_type == QK_CACHE_Q8_0)
        for (int h = 0; h < m->n_head; h++) {
            const size_t at = ((size_t)i * m->n_head + h) * (size_t)(hd / 32);
            qk_quantize_query(q + h * hd, m->rt->q8 + at, m->rt->q8_sum + at, hd);
        }
    for (int h = 0; h < m->n_head_kv; h++) {
        if (m->qk_norm) qk_rmsnorm(k + h * hd, k + h * hd, L->k_norm, hd, m->norm_eps);
        qk_rope(k + h * hd, m->n_rot, m->rope_neox, cs);
    }
    for (int h = 0; h < m->n_head_kv; h++) {
        qk_cache_put(m->k_type, k + h * hd, qk_k_at(m, l, p->seq[i], h, p->pos[i]), hd);
        qk_cache_put(m->v_type, v + h * hdv, qk_v_at(m, l, p->seq[i], h, p->pos[i]), hdv);
    }
}

/* Adds a block's output t (post-normed where the architecture says so) into the residual x. */
static inline void qk_residual(qk_model *m, float *xi, float *t, const float *post_norm) {
    const int E = m->n_embd;
    if (m->post_norms) qk_rmsnorm(t, t, post_norm, E, m->norm_eps);
#pragma omp simd
    for (int j = 0; j < E; j++) xi[j] += t[j];
}

static void qk_forward_job(void *arg, int tid, uint32_t gen) {
    qk_model *m = (qk_model *)arg;
    const qk_pass *p = &m->rt->pass;
    qk_ctx ctx = qk_ctx_start(m->rt->pool, tid, gen), *c = &ctx;
    const int n = p->n, E = m->n_embd, hdv = m->head_dim_v;
    const int q_dim = m->n_head * m->head_dim, kv_dim = m->n_head_kv * m->head_dim;
    const int att_dim = m->n_head * hdv;

    for (int l = 0; l < m->n_layer; l++) {
        const qk_layer *L = &m->layers[l];
        const qk_matrix *qkv[3] = {&L->wq, &L->wk, &L->wv};
        /* residual of the previous layer's FFN (or the embedding), attention norm, quantize */
        QK_CHUNKS(c, i, n) {
            float *xi = m->x + (int64_t)i * E;
            if (l == 0) {
                m->tok_embd.tr->dequant(m->tok_embd.data + m->tok_embd.row_bytes * p->tokens[i], xi, E);
                if (m->embd_scale != 1.0f)
                    for (int j = 0; j < E; j++) xi[j] *= m->embd_scale;
                const int half = m->n_rot / 2;
                for (int b = 0; b < m->rt->n_bases; b++)
                    qk_rope_table(m->rt->rope_cs + ((size_t)b * m->n_batch + i) * (size_t)m->n_rot,
                                  m->rt->rope_freq + (size_t)b * half, half, p->pos[i], m->rope_attn_factor);
            } else {
                qk_residual(m, xi, m->tmp + (int64_t)i * E, m->layers[l - 1].post_ffn_norm);
            }
            float *xn = m->xn + (int64_t)i * E;
            qk_rmsnorm(xn, xi, L->attn_norm, E, m->norm_eps);
            qk_prepare_act(m, qkv, 3, xn, (int)i);
        }
        if (!qk_op_end(c, n)) return;
        float *qkv_out[3] = {m->q, m->k, m->v};
        if (!qk_matmul(c, m, qkv, qkv_out, 3, m->xn, n, 0)) return;
        QK_CHUNKS(c, i, n) qk_qkv_post(m, l, p, (int)i);
        if (!qk_op_end(c, n)) return;
        const int64_t n_att = (int64_t)p->n_blocks * m->n_head_kv;
        float *att_scratch = m->rt->att_scratch[c->tid];
        if (p->split) {
            QK_CHUNKS(c, ch, p->n_span_chunks) qk_attention_span_chunk(m, l, p, ch, att_scratch);
            if (!qk_op_end(c, p->n_span_chunks)) return;
            QK_CHUNKS(c, ch, n_att)
                qk_attention_merge(m, (int)(ch / m->n_head_kv), (int)(ch % m->n_head_kv), att_scratch);
        } else {
            QK_CHUNKS(c, ch, n_att)
                qk_attention_chunk(m, l, p, (int)(ch / m->n_head_kv), (int)(ch % m->n_head_kv), att_scratch);
        }
        if (!qk_op_end(c, n_att)) return;
        /* In the last layer, past attention, only the output rows matter (the others' keys and
         * values are in the cache already): their attention rows move to the front, row k
         * standing for batch row out_idx[k] (ascending, so moving in order is safe), and the
         * rest of the layer runs on n_out rows. Every row's numbers are its own either way. */
        const int compact = p->out_only && l == m->n_layer - 1, nl = compact ? p->n_out : n;
        if (compact) {
            QK_CHUNKS(c, ch, 1)
                for (int k = 0; k < nl; k++)
                    if (p->out_idx[k] != k)
                        memcpy(m->attn_out + (int64_t)k * att_dim, m->attn_out + (int64_t)p->out_idx[k] * att_dim,
                               sizeof(float) * (size_t)att_dim);
            if (!qk_op_end(c, 1)) return;
        }
        const qk_matrix *wo[1] = {&L->wo};
        QK_CHUNKS(c, i, nl) qk_prepare_act(m, wo, 1, m->attn_out + (int64_t)i * att_dim, (int)i);
        if (!qk_op_end(c, nl)) return;
        float *wo_out[1] = {m->tmp};
        if (!qk_matmul(c, m, wo, wo_out, 1, m->attn_out, nl, 0)) return;
        const qk_matrix *ffn[3] = {&L->gate, &L->up, NULL};
        if (m->n_expert) ffn[0] = &L->router, ffn[1] = &L->gate_exps, ffn[2] = &L->up_exps;
        QK_CHUNKS(c, i, nl) {
            float *xi = m->x + (int64_t)(compact ? p->out_idx[i] : i) * E, *xn = m->xn + (int64_t)i * E;
            qk_residual(m, xi, m->tmp + (int64_t)i * E, L->post_attn_norm);
            qk_rmsnorm(xn, xi, L->ffn_norm, E, m->norm_eps);
            qk_prepare_act(m, ffn, m->n_expert ? 3 : 2, xn, (int)i);
        }
        if (!qk_op_end(c, nl)) return;
        if (m->n_expert) {
            if (!qk_moe_ffn(c, m, L, nl)) return;
            continue;
        }
        float *ffn_out[2] = {m->ff_a, m->ff_b};
        if (!qk_matmul(c, m, ffn, ffn_out, 2, m->xn, nl, 1)) return;
        const qk_matrix *down[1] = {&L->down};
        QK_CHUNKS(c, i, nl) qk_prepare_act(m, down, 1, m->ff_a + (int64_t)i * m->n_ff, (int)i);
        if (!qk_op_end(c, nl)) return;
        float *down_out[1] = {m->tmp};
        if (!qk_matmul(c, m, down, down_out, 1, m->ff_a, nl, 0)) return;
    }
    /* Only the rows that need an answer: last residual, final norm, output head. */
    float *dst = p->hidden ? p->hidden : m->xn;
    const qk_matrix *head[1] = {&m->output};
    QK_CHUNKS(c, k, p->n_out) {
        const int i = p->out_idx[k];
        float *xi = m->x + (int64_t)i * E;
        qk_residual(m, xi, m->tmp + (int64_t)(p->out_only ? k : i) * E, m->layers[m->n_layer - 1].post_ffn_norm);
        qk_rmsnorm(dst + (int64_t)k * E, xi, m->output_norm, E, m->norm_eps);
        if (!p->hidden) qk_prepare_act(m, head, 1, dst + (int64_t)k * E, (int)k);
    }
    if (!qk_op_end(c, p->n_out)) return;
    if (!p->hidden) {
        float *logits[1] = {p->logits};
        if (!qk_matmul(c, m, head, logits, 1, m->xn, p->n_out, 0)) return;
        if (m->final_softcap > 0.0f) {
            const float cap = m->final_softcap, inv = 1.0f / cap;
            QK_CHUNKS(c, k, p->n_out) {
                float *row = p->logits + k * (int64_t)m->n_vocab;
                for (int j = 0; j < m->n_vocab; j++) row[j] = cap * qk_tanh(row[j] * inv);
            }
            qk_op_end(c, p->n_out);
        }
    }
    (void)q_dim;
    (void)kv_dim;
}

/* Runs n tokens (token ids, positions, sequence slots). Writes logits (n_out x n_vocab) for the
 * batch rows listed in out_idx, or, when hidden is non-NULL, their final normed hidden states
 * (n_out x n_embd) instead. The caller has validated every id, position and slot. */
static void qk_forward(qk_model *m, int n, const int32_t *tokens, const int32_t *pos,
                       const int32_t *seq, int n_out, const int32_t *out_idx, float *logits,
                       float *hidden) {
    qk_pass *p = &m->rt->pass;
    p->n = n;
    p->n_out = n_out;
    p->tokens = tokens;
    p->pos = pos;
    p->seq = seq;
    p->out_idx = out_idx;
    p->logits = logits;
    p->hidden = hidden;
    p->n_blocks = qk_plan_blocks(m, p, m->rt->blocks);
    p->out_only = n_out < n;
    for (int k = 1; k < n_out && p->out_only; k++) p->out_only = out_idx[k] > out_idx[k - 1];
    qk_plan_split(m, p);
    qk_pool_run(m->rt->pool, qk_forward_job, m);
}

/* ---------------------------------------------------------------- set-up */

/* Ops of one pass, at most: per layer 7 for attention, 1 + 3 (dense) or 1 + 8 (experts) for the
 * FFN; then the last layer's compaction of the output rows, the final norm, the head and the
 * soft cap. */
#define QK_OPS_PER_LAYER 16
static int qk_ops_per_pass(const qk_model *m) { return m->n_layer * QK_OPS_PER_LAYER + 6; }

static void qk_free_aligned(void *p) {
#if defined(_WIN32)
    _aligned_free(p);
#else
    free(p);
#endif
}

static void qk_model_free(qk_model *m) {
    qk_runtime *rt = m->rt;
    if (!rt) return;
    qk_pool_free(rt->pool);
    for (int k = 0; k < QK_N_ACT_FORMATS; k++) qk_free_aligned(rt->act[k]);
    if (rt->gemm_scratch)
        for (int t = 0; t < m->n_threads; t++) qk_free_aligned(rt->gemm_scratch[t]);
    if (rt->att_scratch)
        for (int t = 0; t < m->n_threads; t++) qk_free_aligned(rt->att_scratch[t]);
    free(rt->gemm_scratch);
    free(rt->att_scratch);
    qk_free_aligned(rt->blocks);
    qk_free_aligned(rt->span_chunk0);
    qk_free_aligned(rt->part_at);
    qk_free_aligned(rt->parts);
    qk_free_aligned(rt->q8);
    qk_free_aligned(rt->q8_sum);
    qk_free_aligned(rt->rope_freq);
    qk_free_aligned(rt->rope_cs);
    free(rt->layer_base);
    qk_moe_state *s = &rt->moe;
    void *moe_bufs[] = {s->probs, s->expert, s->weight, s->route, s->token, s->start,
                        s->active, s->fill, s->gate, s->up, s->down};
    for (size_t k = 0; k < sizeof moe_bufs / sizeof moe_bufs[0]; k++) qk_free_aligned(moe_bufs[k]);
    for (int k = 0; k < QK_N_ACT_FORMATS; k++) qk_free_aligned(s->act[k]);
    free(rt);
    m->rt = NULL;
}

/* 64-byte aligned (the tile panels use aligned loads); counted into *total. */
static void *qk_alloc_aligned(size_t bytes, size_t *total) {
    void *p = NULL;
#if defined(_WIN32)
    p = _aligned_malloc(bytes ? bytes : 1, 64);
#else
    if (posix_memalign(&p, 64, bytes ? bytes : 1) != 0) p = NULL;
#endif
    if (p) *total += bytes;
    return p;
}

/* Load-time invariants: everything the pass indexes with, re-checked here whoever filled m in
 * (runtime/facts.py checks the file first; this is the C side's own guard). The hyperparameter
 * half runs before any allocation sized by them; the weights half once every field is set.
 * Both return QK_OK or a code that qk_check_message names; *where gets the layer (or -1). */
enum {
    QK_OK = 0,
    QK_BAD_SIZES,     /* a size or count below 1 */
    QK_BAD_HEADS,     /* kv heads do not divide the heads, or a group larger than 256 */
    QK_BAD_HEAD_DIM,  /* head size above 1024 */
    QK_BAD_ROPE,      /* rope dimension odd, negative or above the head size */
    QK_BAD_PRODUCT,   /* a product of sizes does not fit an int */
    QK_BAD_SCALAR,    /* eps, scales or a rope base not finite or out of range */
    QK_BAD_MATRIX,    /* a matrix missing, of another shape, or not whole blocks */
    QK_BAD_VECTOR,    /* a required norm missing */
    QK_BAD_WINDOW,    /* a negative sliding window */
    QK_BAD_STATE,     /* KV cache or scratch missing */
    QK_BAD_EXPERTS,   /* experts used not within 1..n_expert, or more than 4096 experts */
};

static const char *qk_check_message(int code) {
    switch (code) {
    case QK_OK: return "ok";
    case QK_BAD_SIZES: return "a size or count is below 1";
    case QK_BAD_HEADS: return "the kv heads do not divide the heads into groups of at most 256";
    case QK_BAD_HEAD_DIM: return "a head size is above 1024";
    case QK_BAD_ROPE: return "the rope dimension is odd, negative or above the head size";
    case QK_BAD_PRODUCT: return "a product of sizes does not fit a 32-bit int";
    case QK_BAD_SCALAR: return "eps, a scale or a rope base is not finite or out of range";
    case QK_BAD_MATRIX: return "a weight matrix is missing, has another shape or is not whole blocks";
    case QK_BAD_VECTOR: return "a required norm vector is missing";
    case QK_BAD_WINDOW: return "a sliding window is negative";
    case QK_BAD_STATE: return "the KV cache or scratch is missing";
    case QK_BAD_EXPERTS: return "the experts used are not within 1..expert count (at most 4096)";
    default: return "unknown problem";
    }
}

static int qk_check_hparams(const qk_model *m) {
    if (m->n_layer < 1 || m->n_embd < 1 || m->n_ff < 1 || m->n_head < 1 || m->n_head_kv < 1 ||
        m->head_dim < 1 || m->head_dim_v < 1 || m->n_ctx < 1 || m->n_seq < 1 || m->n_batch < 1 ||
        m->n_threads < 1 || m->n_layer > (INT32_MAX - 6) / QK_OPS_PER_LAYER)
        return QK_BAD_SIZES;
    if (m->n_head % m->n_head_kv || m->n_head / m->n_head_kv > 256) return QK_BAD_HEADS;
    if (m->head_dim > 1024 || m->head_dim_v > 1024) return QK_BAD_HEAD_DIM;
    if (m->n_rot < 0 || m->n_rot % 2 || m->n_rot > m->head_dim) return QK_BAD_ROPE;
    const int64_t products[4] = {(int64_t)m->n_head * m->head_dim, (int64_t)m->n_head_kv * m->head_dim,
                                 (int64_t)m->n_head_kv * m->head_dim_v, (int64_t)m->n_head * m->head_dim_v};
    for (int k = 0; k < 4; k++)
        if (products[k] > INT32_MAX) return QK_BAD_PRODUCT;
    if (m->n_expert < 0 || m->n_expert > 4096 ||
        (m->n_expert && (m->n_expert_used < 1 || m->n_expert_used > m->n_expert)))
        return QK_BAD_EXPERTS;
    if (!(isfinite(m->norm_eps) && m->norm_eps >= 0.0f) || !isfinite(m->embd_scale) ||
        !isfinite(m->attn_scale) || (m->activation != QK_ACT_FN_SILU && m->activation != QK_ACT_FN_GELU_TANH))
        return QK_BAD_SCALAR;
    if (!(isfinite(m->attn_softcap) && m->attn_softcap >= 0.0f) ||
        !(isfinite(m->final_softcap) && m->final_softcap >= 0.0f) ||
        !(isfinite(m->rope_attn_factor) && m->rope_attn_factor > 0.0f))
        return QK_BAD_SCALAR;
    return QK_OK;
}

static int qk_matrix_ok(const qk_matrix *w, int64_t cols, int64_t rows) {
    return w->data && w->tr && w->cols == cols && w->rows == rows && w->tr->block_elems > 0 &&
           cols % w->tr->block_elems == 0 &&
           w->row_bytes == (size_t)(cols / w->tr->block_elems) * (size_t)w->tr->block_bytes;
}

static int qk_check_weights(const qk_model *m, int *where) {
    *where = -1;
    const int E = m->n_embd, hd = m->head_dim, hdv = m->head_dim_v;
    const int64_t q_dim = (int64_t)m->n_head * hd, kv_dim = (int64_t)m->n_head_kv * hd;
    const int64_t kv_dim_v = (int64_t)m->n_head_kv * hdv, att_dim = (int64_t)m->n_head * hdv;
    if (m->n_vocab < 1 || !qk_matrix_ok(&m->tok_embd, E, m->n_vocab) || !qk_matrix_ok(&m->output, E, m->n_vocab))
        return QK_BAD_MATRIX;
    if (!m->output_norm || !m->layers) return QK_BAD_VECTOR;
    for (int l = 0; l < m->n_layer; l++) {
        const qk_layer *L = &m->layers[l];
        *where = l;
        if (!qk_matrix_ok(&L->wq, E, q_dim) || !qk_matrix_ok(&L->wk, E, kv_dim) ||
            !qk_matrix_ok(&L->wv, E, kv_dim_v) || !qk_matrix_ok(&L->wo, att_dim, E))
            return QK_BAD_MATRIX;
        const int64_t X = m->n_expert, F = m->n_ff;
        if (X ? !qk_matrix_ok(&L->router, E, X) || !qk_matrix_ok(&L->gate_exps, E, X * F) ||
                    !qk_matrix_ok(&L->up_exps, E, X * F) || !qk_matrix_ok(&L->down_exps, F, X * E)
              : !qk_matrix_ok(&L->gate, E, F) || !qk_matrix_ok(&L->up, E, F) || !qk_matrix_ok(&L->down, F, E))
            return QK_BAD_MATRIX;
        if (!L->attn_norm || !L->ffn_norm || (m->post_norms && (!L->post_attn_norm || !L->post_ffn_norm)) ||
            (m->qk_norm && (!L->q_norm || !L->k_norm)))
            return QK_BAD_VECTOR;
        if (L->window < 0) return QK_BAD_WINDOW;
        if (!(isfinite(L->rope_base) && L->rope_base > 0.0f)) return QK_BAD_SCALAR;
    }
    *where = -1;
    if (!m->k_cache || !m->v_cache || m->k_row != qk_cache_row_bytes(m->k_type, m->head_dim) ||
        m->v_row != qk_cache_row_bytes(m->v_type, m->head_dim_v) || !m->k_row || !m->v_row || !m->x || !m->xn || !m->q || !m->k || !m->v || !m->attn_out ||
        !m->tmp || !m->ff_a || !m->ff_b)
        return QK_BAD_STATE;
    return QK_OK;
}

/* The routing arrays and grouped buffers for n_batch tokens x n_expert_used routes. */
static int qk_moe_init(qk_model *m, size_t *total) {
    qk_moe_state *s = &m->rt->moe;
    const size_t B = (size_t)m->n_batch, R = B * (size_t)m->n_expert_used, ne = (size_t)m->n_expert;
    if (m->n_expert_used < 1 || m->n_expert_used > m->n_expert) return -1;
    for (int l = 0; l < m->n_layer; l++) {
        const qk_layer *L = &m->layers[l];
        const qk_matrix *ws[3] = {&L->gate_exps, &L->up_exps, &L->down_exps};
        if (!L->router.tr) return -1;
        for (int k = 0; k < 3; k++) {
            if (!ws[k]->tr) return -1;
            const int f = ws[k]->tr->act;
            if (f < 0 || f >= QK_N_ACT_FORMATS) return -1;
            const size_t st = qk_act_stride(ws[k]);
            if (st > s->act_cap[f]) s->act_cap[f] = st;
        }
    }
    if (!(s->probs = (float *)qk_alloc_aligned(sizeof(float) * B * ne, total)) ||
        !(s->expert = (int32_t *)qk_alloc_aligned(sizeof(int32_t) * R, total)) ||
        !(s->weight = (float *)qk_alloc_aligned(sizeof(float) * R, total)) ||
        !(s->route = (int32_t *)qk_alloc_aligned(sizeof(int32_t) * R, total)) ||
        !(s->token = (int32_t *)qk_alloc_aligned(sizeof(int32_t) * R, total)) ||
        !(s->start = (int32_t *)qk_alloc_aligned(sizeof(int32_t) * (ne + 1), total)) ||
        !(s->active = (int32_t *)qk_alloc_aligned(sizeof(int32_t) * ne, total)) ||
        !(s->fill = (int32_t *)qk_alloc_aligned(sizeof(int32_t) * ne, total)) ||
        !(s->gate = (float *)qk_alloc_aligned(sizeof(float) * R * (size_t)m->n_ff, total)) ||
        !(s->up = (float *)qk_alloc_aligned(sizeof(float) * R * (size_t)m->n_ff, total)) ||
        !(s->down = (float *)qk_alloc_aligned(sizeof(float) * R * (size_t)m->n_embd, total)))
        return -1;
    for (int k = 0; k < QK_N_ACT_FORMATS; k++)
        if (s->act_cap[k] && !(s->act[k] = (uint8_t *)qk_alloc_aligned(R * s->act_cap[k], total))) return -1;
    return 0;
}

/* Threads and scratch, after every other field of m is set. Returns 0, or -1 when out of
 * memory (m is then left for qk_model_free). */
static int qk_model_init(qk_model *m) {
    int where;
    if (qk_check_hparams(m) != QK_OK || qk_check_weights(m, &where) != QK_OK)
        return -1; /* model.pxi ran both checks first and named the problem */
    qk_runtime *rt = (qk_runtime *)calloc(1, sizeof(qk_runtime));
    if (!rt) return -1;
    m->rt = rt;
    size_t total = sizeof(qk_runtime);
    const size_t B = (size_t)m->n_batch;
    /* activation buffers: the widest row each format is asked for */
    int64_t max_cols = m->n_embd;
    for (int l = 0; l < m->n_layer; l++) {
        const qk_layer *L = &m->layers[l];
        const qk_matrix *ws[11] = {&L->wq,     &L->wk,        &L->wv,      &L->wo,
                                   &L->gate,   &L->up,        &L->down,    &L->router,
                                   &L->gate_exps, &L->up_exps, &L->down_exps};
        for (int k = 0; k < 11; k++) {
            if (!ws[k]->tr) continue; /* the FFN a layer does not have (dense or experts) */
            const int f = ws[k]->tr->act;
            if (f < 0 || f >= QK_N_ACT_FORMATS) return -1;
            const size_t s = qk_act_stride(ws[k]);
            if (s > rt->act_cap[f]) rt->act_cap[f] = s;
            if (ws[k]->cols > max_cols) max_cols = ws[k]->cols;
        }
    }
    const int fo = m->output.tr->act;
    if (fo < 0 || fo >= QK_N_ACT_FORMATS) return -1;
    if (qk_act_stride(&m->output) > rt->act_cap[fo]) rt->act_cap[fo] = qk_act_stride(&m->output);
    for (int k = 0; k < QK_N_ACT_FORMATS; k++)
        if (k != QK_ACT_F32 && rt->act_cap[k] && !(rt->act[k] = (uint8_t *)qk_alloc_aligned(B * rt->act_cap[k], &total)))
            return -1;
    rt->gemm_scratch = (void **)calloc((size_t)m->n_threads, sizeof(void *));
    rt->att_scratch = (float **)calloc((size_t)m->n_threads, sizeof(float *));
    if (!rt->gemm_scratch || !rt->att_scratch) return -1;
    for (int t = 0; t < m->n_threads; t++) {
        if (!(rt->gemm_scratch[t] = qk_alloc_aligned(qk_gemm_scratch_bytes(max_cols), &total))) return -1;
        if (!(rt->att_scratch[t] = (float *)qk_alloc_aligned(sizeof(float) * qk_att_scratch_floats(m), &total)))
            return -1;
    }
    if (!(rt->blocks = (int32_t *)qk_alloc_aligned(sizeof(int32_t) * 2 * B, &total))) return -1;
    rt->parts_cap = qk_att_parts_floats(m);
    if (!(rt->span_chunk0 = (int64_t *)qk_alloc_aligned(sizeof(int64_t) * (B + 1), &total)) ||
        !(rt->part_at = (int64_t *)qk_alloc_aligned(sizeof(int64_t) * (B + 1), &total)) ||
        !(rt->parts = (float *)qk_alloc_aligned(sizeof(float) * rt->parts_cap, &total)))
        return -1;
    if (m->k_type == QK_CACHE_Q8_0) {
        const size_t q_blocks = B * (size_t)m->n_head * (size_t)(m->head_dim / 32);
        if (!(rt->q8 = (qk_cache_q8_0 *)qk_alloc_aligned(sizeof(qk_cache_q8_0) * q_blocks, &total)) ||
            !(rt->q8_sum = (int32_t *)qk_alloc_aligned(sizeof(int32_t) * q_blocks, &total)))
            return -1;
    }
    /* rope tables for the distinct bases */
    const int half = m->n_rot / 2;
    if (!(rt->layer_base = (int *)calloc((size_t)m->n_layer, sizeof(int)))) return -1;
    for (int l = 0; l < m->n_layer; l++) {
        int b = 0;
        while (b < rt->n_bases && rt->rope_bases[b] != m->layers[l].rope_base) b++;
        if (b == rt->n_bases && b < QK_MAX_ROPE_BASES) rt->rope_bases[rt->n_bases++] = m->layers[l].rope_base;
        rt->layer_base[l] = b < rt->n_bases ? b : -1;
    }
    const size_t nb = (size_t)(rt->n_bases ? rt->n_bases : 1);
    if (!(rt->rope_freq = (float *)qk_alloc_aligned(sizeof(float) * nb * (half ? half : 1), &total))) return -1;
    if (!(rt->rope_cs = (float *)qk_alloc_aligned(sizeof(float) * nb * B * (m->n_rot ? m->n_rot : 1), &total)))
        return -1;
    for (int b = 0; b < rt->n_bases; b++)
        for (int j = 0; j < half; j++)
            rt->rope_freq[b * half + j] = qk_rope_freq(m, rt->rope_bases[b], j);
    if (m->n_expert && qk_moe_init(m, &total) != 0) return -1;
    if (!(rt->pool = qk_pool_new(m->n_threads, qk_ops_per_pass(m)))) return -1;
    total += (size_t)qk_ops_per_pass(m) * sizeof(qk_op_counter);
    rt->bytes = total;
    return 0;
}

static size_t qk_model_runtime_bytes(const qk_model *m) { return m->rt ? m->rt->bytes : 0; }

/* Whether the last pass split its attention by spans (for tests). */
static int qk_last_pass_split(const qk_model *m) { return m->rt ? m->rt->pass.split : 0; }

/* Copies the first n_pos cached positions of sequence src to dst (a shared prompt prefix). */
static void qk_copy_seq(qk_model *m, int src, int dst, int n_pos) {
    for (int l = 0; l < m->n_layer; l++)
        for (int h = 0; h < m->n_head_kv; h++) {
            memcpy(qk_k_at(m, l, dst, h, 0), qk_k_at(m, l, src, h, 0), m->k_row * (size_t)n_pos);
            memcpy(qk_v_at(m, l, dst, h, 0), qk_v_at(m, l, src, h, 0), m->v_row * (size_t)n_pos);
        }
}

#endif
