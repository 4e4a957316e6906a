/* The transformer forward pass: one function for every architecture (runtime/arch.py declares
 * the switches), over a batch of tokens that may belong to different sequences (prefill of one
 * prompt, or one decode step of many requests: continuous batching).
 *
 * Weights are pointers into the GGUF mapping (never copied); activations are quantized once per
 * row to the format each weight type's dot product wants (quants.h). All threads run the whole
 * pass inside ONE OpenMP parallel region and split each op with orphaned `omp for` loops, whose
 * implicit barriers order the ops: no thread start-up per op, no Python per op.
 */
#ifndef QPACK_FORWARD_H
#define QPACK_FORWARD_H

#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif

#include "quants.h"

typedef _Float16 qk_f16; /* KV cache element: F16C/NEON conversions where the ISA has them */

enum { QK_ACT_FN_SILU = 0, QK_ACT_FN_GELU_TANH = 1 };

typedef struct {
    const uint8_t *data; /* rows x row_bytes, in the mapping */
    const qk_traits *tr;
    int64_t rows, cols;  /* output features, input features */
    size_t row_bytes;
} qk_matrix;

typedef struct {
    qk_matrix wq, wk, wv, wo, gate, up, down;
    const float *attn_norm, *ffn_norm, *post_attn_norm, *post_ffn_norm, *q_norm, *k_norm;
    const float *bq, *bk, *bv; /* optional biases (qwen2) */
    int window;                /* sliding window in positions; 0 = global attention */
    float rope_base;
} qk_layer;

typedef struct {
    /* hyperparameters */
    int n_layer, n_embd, n_ff, n_head, n_head_kv, head_dim, head_dim_v, n_rot, n_vocab;
    int rope_neox, activation, qk_norm, post_norms;
    float norm_eps, embd_scale, attn_scale;
    qk_matrix tok_embd, output;
    const float *output_norm;
    qk_layer *layers;
    /* sizes of the state below */
    int n_ctx, n_seq, n_batch, n_threads;
    /* KV cache, [layer][seq][pos][n_head_kv * head_dim(_v)] */
    qk_f16 *k_cache, *v_cache;
    /* scratch for up to n_batch tokens */
    float *x, *xn, *q, *k, *v, *attn_out, *tmp, *ff_a, *ff_b, *scores;
    uint8_t *act;
} qk_model;

/* ---------------------------------------------------------------- small ops (per row) */

static void qk_rmsnorm(float *out, const float *x, const float *restrict w,
                       int n, float eps) {
    float ss = 0.0f;
#pragma omp simd reduction(+ : ss)
    for (int j = 0; j < n; j++) ss += x[j] * x[j];
    const float scale = 1.0f / sqrtf(ss / (float)n + eps);
#pragma omp simd
    for (int j = 0; j < n; j++) out[j] = x[j] * scale * w[j];
}

/* Rotary embedding in place on one head. NEOX pairs (j, j + n_rot/2); normal pairs (2j, 2j+1). */
static void qk_rope(float *restrict h, int n_rot, int neox, int pos, float base) {
    const int half = n_rot / 2;
    for (int j = 0; j < half; j++) {
        const float theta = (float)pos * powf(base, -2.0f * (float)j / (float)n_rot);
        const float c = cosf(theta), s = sinf(theta);
        const int a = neox ? j : 2 * j, b = neox ? j + half : 2 * j + 1;
        const float x0 = h[a], x1 = h[b];
        h[a] = x0 * c - x1 * s;
        h[b] = x0 * s + x1 * c;
    }
}

static inline float qk_gelu_tanh(float x) {
    const float k = 0.7978845608028654f; /* sqrt(2/pi) */
    return 0.5f * x * (1.0f + tanhf(k * (x + 0.044715f * x * x * x)));
}

static inline float qk_silu(float x) { return x / (1.0f + expf(-x)); }

/* ---------------------------------------------------------------- matmul (all threads) */

/* out[i][r] = W[r] . x[i] for n tokens. Called by every thread of the parallel region. */
static void qk_matmul(qk_model *m, const qk_matrix *w, const float *x, int n, float *out) {
    const int act = w->tr->act;
    const size_t arb = qk_act_row_bytes(act, w->cols);
#pragma omp for schedule(static)
    for (int i = 0; i < n; i++) qk_quantize_act(act, x + (int64_t)i * w->cols, m->act + arb * i, w->cols);
    /* Chunks of rows: a chunk of weight rows stays in L1 while every token's activation meets it. */
    const int64_t chunk = 16;
    const int64_t n_chunks = (w->rows + chunk - 1) / chunk;
#pragma omp for schedule(static)
    for (int64_t c = 0; c < n_chunks; c++) {
        const int64_t r0 = c * chunk, r1 = r0 + chunk < w->rows ? r0 + chunk : w->rows;
        for (int i = 0; i < n; i++) {
            const uint8_t *a = m->act + arb * i;
            float *o = out + (int64_t)i * w->rows;
            for (int64_t r = r0; r < r1; r++) o[r] = w->tr->dot(w->cols, w->data + w->row_bytes * r, a);
        }
    }
}

/* ---------------------------------------------------------------- attention */

static void qk_attention(qk_model *m, int l, int n, const int32_t *pos, const int32_t *seq) {
    const qk_layer *L = &m->layers[l];
    const int hd = m->head_dim, hdv = m->head_dim_v;
    const int kv_dim = m->n_head_kv * hd, kv_dim_v = m->n_head_kv * hdv;
    const int group = m->n_head / m->n_head_kv;
    const int64_t seq_k = (int64_t)m->n_ctx * kv_dim, seq_v = (int64_t)m->n_ctx * kv_dim_v;
    const qk_f16 *kc = m->k_cache + (int64_t)l * m->n_seq * seq_k;
    const qk_f16 *vc = m->v_cache + (int64_t)l * m->n_seq * seq_v;
#pragma omp for schedule(dynamic, 1)
    for (int ih = 0; ih < n * m->n_head; ih++) {
        const int i = ih / m->n_head, h = ih % m->n_head, kvh = h / group;
#ifdef _OPENMP
        float *sc = m->scores + (int64_t)omp_get_thread_num() * m->n_ctx;
#else
        float *sc = m->scores;
#endif
        const float *q = m->q + (int64_t)i * m->n_head * hd + (int64_t)h * hd;
        const int p = pos[i];
        const int t0 = L->window && p >= L->window ? p - L->window + 1 : 0;
        const qk_f16 *ks = kc + seq[i] * seq_k + kvh * hd;
        const qk_f16 *vs = vc + seq[i] * seq_v + kvh * hdv;
        float mx = -INFINITY;
        for (int t = t0; t <= p; t++) {
            const qk_f16 *kt = ks + (int64_t)t * kv_dim;
            float s = 0.0f;
#pragma omp simd reduction(+ : s)
            for (int j = 0; j < hd; j++) s += q[j] * (float)kt[j];
            s *= m->attn_scale;
            sc[t] = s;
            mx = s > mx ? s : mx;
        }
        float sum = 0.0f;
        for (int t = t0; t <= p; t++) {
            sc[t] = expf(sc[t] - mx);
            sum += sc[t];
        }
        float *o = m->attn_out + (int64_t)i * m->n_head * hdv + (int64_t)h * hdv;
        for (int j = 0; j < hdv; j++) o[j] = 0.0f;
        const float inv = 1.0f / sum;
        for (int t = t0; t <= p; t++) {
            const qk_f16 *vt = vs + (int64_t)t * kv_dim_v;
            const float wgt = sc[t] * inv;
#pragma omp simd
            for (int j = 0; j < hdv; j++) o[j] += wgt * (float)vt[j];
        }
    }
}

/* ---------------------------------------------------------------- the pass */

/* Runs n tokens (token ids, positions, sequence slots). Writes logits (n_out x n_vocab) for the
 * batch rows listed in out_idx, or, when hidden is non-NULL, their final normed hidden states
 * (n_out x n_embd) instead. The caller has validated every id, position and slot. */
static void qk_forward(qk_model *m, int n, const int32_t *tokens, const int32_t *pos,
                       const int32_t *seq, int n_out, const int32_t *out_idx, float *logits,
                       float *hidden) {
    const int E = m->n_embd, hd = m->head_dim, hdv = m->head_dim_v;
    const int q_dim = m->n_head * hd, kv_dim = m->n_head_kv * hd, kv_dim_v = m->n_head_kv * hdv;
#pragma omp parallel num_threads(m->n_threads)
    {
#pragma omp for schedule(static)
        for (int i = 0; i < n; i++) {
            float *xi = m->x + (int64_t)i * E;
            m->tok_embd.tr->dequant(m->tok_embd.data + m->tok_embd.row_bytes * tokens[i], xi, E);
            if (m->embd_scale != 1.0f)
                for (int j = 0; j < E; j++) xi[j] *= m->embd_scale;
        }
        for (int l = 0; l < m->n_layer; l++) {
            const qk_layer *L = &m->layers[l];
#pragma omp for schedule(static)
            for (int i = 0; i < n; i++)
                qk_rmsnorm(m->xn + (int64_t)i * E, m->x + (int64_t)i * E, L->attn_norm, E, m->norm_eps);
            qk_matmul(m, &L->wq, m->xn, n, m->q);
            qk_matmul(m, &L->wk, m->xn, n, m->k);
            qk_matmul(m, &L->wv, m->xn, n, m->v);
#pragma omp for schedule(static)
            for (int i = 0; i < n; i++) {
                float *q = m->q + (int64_t)i * q_dim, *k = m->k + (int64_t)i * kv_dim;
                float *v = m->v + (int64_t)i * kv_dim_v;
                if (L->bq) for (int j = 0; j < q_dim; j++) q[j] += L->bq[j];
                if (L->bk) for (int j = 0; j < kv_dim; j++) k[j] += L->bk[j];
                if (L->bv) for (int j = 0; j < kv_dim_v; j++) v[j] += L->bv[j];
                for (int h = 0; h < m->n_head; h++) {
                    if (m->qk_norm) qk_rmsnorm(q + h * hd, q + h * hd, L->q_norm, hd, m->norm_eps);
                    qk_rope(q + h * hd, m->n_rot, m->rope_neox, pos[i], L->rope_base);
                }
                for (int h = 0; h < m->n_head_kv; h++) {
                    if (m->qk_norm) qk_rmsnorm(k + h * hd, k + h * hd, L->k_norm, hd, m->norm_eps);
                    qk_rope(k + h * hd, m->n_rot, m->rope_neox, pos[i], L->rope_base);
                }
                const int64_t layer_k = (int64_t)l * m->n_seq * m->n_ctx * kv_dim;
                const int64_t layer_v = (int64_t)l * m->n_seq * m->n_ctx * kv_dim_v;
                qk_f16 *kd = m->k_cache + layer_k + ((int64_t)seq[i] * m->n_ctx + pos[i]) * kv_dim;
                qk_f16 *vd = m->v_cache + layer_v + ((int64_t)seq[i] * m->n_ctx + pos[i]) * kv_dim_v;
                for (int j = 0; j < kv_dim; j++) kd[j] = (qk_f16)k[j];
                for (int j = 0; j < kv_dim_v; j++) vd[j] = (qk_f16)v[j];
            }
            qk_attention(m, l, n, pos, seq);
            qk_matmul(m, &L->wo, m->attn_out, n, m->tmp);
#pragma omp for schedule(static)
            for (int i = 0; i < n; i++) {
                float *t = m->tmp + (int64_t)i * E, *xi = m->x + (int64_t)i * E;
                if (m->post_norms) qk_rmsnorm(t, t, L->post_attn_norm, E, m->norm_eps);
                for (int j = 0; j < E; j++) xi[j] += t[j];
                qk_rmsnorm(m->xn + (int64_t)i * E, xi, L->ffn_norm, E, m->norm_eps);
            }
            qk_matmul(m, &L->gate, m->xn, n, m->ff_a);
            qk_matmul(m, &L->up, m->xn, n, m->ff_b);
#pragma omp for schedule(static)
            for (int i = 0; i < n; i++) {
                float *a = m->ff_a + (int64_t)i * m->n_ff, *b = m->ff_b + (int64_t)i * m->n_ff;
                if (m->activation == QK_ACT_FN_GELU_TANH)
                    for (int j = 0; j < m->n_ff; j++) a[j] = qk_gelu_tanh(a[j]) * b[j];
                else
                    for (int j = 0; j < m->n_ff; j++) a[j] = qk_silu(a[j]) * b[j];
            }
            qk_matmul(m, &L->down, m->ff_a, n, m->tmp);
#pragma omp for schedule(static)
            for (int i = 0; i < n; i++) {
                float *t = m->tmp + (int64_t)i * E, *xi = m->x + (int64_t)i * E;
                if (m->post_norms) qk_rmsnorm(t, t, L->post_ffn_norm, E, m->norm_eps);
                for (int j = 0; j < E; j++) xi[j] += t[j];
            }
        }
        /* Only the rows that need an answer go through the final norm and the output head. */
        float *dst = hidden ? hidden : m->xn;
#pragma omp for schedule(static)
        for (int k = 0; k < n_out; k++)
            qk_rmsnorm(dst + (int64_t)k * E, m->x + (int64_t)out_idx[k] * E, m->output_norm, E, m->norm_eps);
        if (!hidden) qk_matmul(m, &m->output, m->xn, n_out, logits);
    }
}

/* Copies the first n_pos cached positions of sequence src to dst (a shared prompt prefix). */
static void qk_copy_seq(qk_model *m, int src, int dst, int n_pos) {
    const int64_t kv_dim = (int64_t)m->n_head_kv * m->head_dim, kv_dim_v = (int64_t)m->n_head_kv * m->head_dim_v;
    for (int l = 0; l < m->n_layer; l++) {
        qk_f16 *kl = m->k_cache + (int64_t)l * m->n_seq * m->n_ctx * kv_dim;
        qk_f16 *vl = m->v_cache + (int64_t)l * m->n_seq * m->n_ctx * kv_dim_v;
        memcpy(kl + dst * m->n_ctx * kv_dim, kl + src * m->n_ctx * kv_dim, sizeof(qk_f16) * n_pos * kv_dim);
        memcpy(vl + dst * m->n_ctx * kv_dim_v, vl + src * m->n_ctx * kv_dim_v, sizeof(qk_f16) * n_pos * kv_dim_v);
    }
}

#endif
