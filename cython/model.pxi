# The forward pass wrapper: owns the C model struct, its KV cache and scratch, and keeps
# references to the numpy views of the mapping that the struct points into.

from libc.stdlib cimport calloc, free
from libc.string cimport memset

import numpy as np

from qpack.runtime.errors import QpackError, UnsupportedModel


cdef extern from "forward.h":
    ctypedef unsigned short qk_f16  # only its size is used here
    ctypedef struct qk_matrix:
        const uint8_t *data
        const qk_traits *tr
        int64_t rows
        int64_t cols
        size_t row_bytes
    ctypedef struct qk_layer:
        qk_matrix wq, wk, wv, wo, gate, up, down
        qk_matrix router, gate_exps, up_exps, down_exps
        const float *attn_norm
        const float *ffn_norm
        const float *post_attn_norm
        const float *post_ffn_norm
        const float *q_norm
        const float *k_norm
        const float *bq
        const float *bk
        const float *bv
        int window
        float rope_base
    ctypedef struct qk_model:
        int n_layer, n_embd, n_ff, n_head, n_head_kv, head_dim, head_dim_v, n_rot, n_vocab
        int n_expert, n_expert_used
        int rope_neox, activation, qk_norm, post_norms
        float norm_eps, embd_scale, attn_scale
        float attn_softcap, final_softcap, rope_attn_factor
        qk_matrix tok_embd, output
        const float *output_norm
        const float *rope_factors
        qk_layer *layers
        int n_ctx, n_seq, n_batch, n_threads
        qk_f16 *k_cache
        qk_f16 *v_cache
        float *x
        float *xn
        float *q
        float *k
        float *v
        float *attn_out
        float *tmp
        float *ff_a
        float *ff_b
    void qk_forward(qk_model *m, int n, const int32_t *tokens, const int32_t *pos,
                    const int32_t *seq, int n_out, const int32_t *out_idx, float *logits,
                    float *hidden) noexcept nogil
    void qk_copy_seq(qk_model *m, int src, int dst, int n_pos) noexcept nogil
    int qk_model_init(qk_model *m) noexcept nogil
    void qk_model_free(qk_model *m) noexcept nogil
    size_t qk_model_runtime_bytes(const qk_model *m) noexcept nogil


cdef void *_alloc(size_t n_items, size_t item_size) except NULL:
    cdef void *p = calloc(n_items if n_items else 1, item_size)
    if p == NULL:
        raise MemoryError(f"cannot allocate {n_items * item_size} bytes for the model state")
    return p


cdef class NativeModel:
    """The compiled model: weights as views of the mapping, KV cache for n_seq sequences of
    n_ctx positions (f16), scratch for batches of up to n_batch tokens."""

    cdef qk_model m
    cdef list _keep
    cdef readonly int n_ctx, n_seq, n_batch, n_threads, n_vocab, n_embd
    cdef readonly size_t kv_bytes, scratch_bytes

    def __cinit__(self):
        memset(&self.m, 0, sizeof(qk_model))

    def __init__(self, dict hp, dict globals_, list layers, int n_ctx, int n_seq, int n_batch,
                 int n_threads):
        cdef qk_model *m = &self.m
        cdef qk_layer *L
        self._keep = []
        if n_ctx < 1 or n_seq < 1 or n_batch < 1 or n_threads < 1:
            raise QpackError("context, sequences, batch and threads must all be at least 1")
        m.n_layer = hp["n_layer"]; m.n_embd = hp["n_embd"]; m.n_ff = hp["n_ff"]
        m.n_head = hp["n_head"]; m.n_head_kv = hp["n_head_kv"]
        m.head_dim = hp["head_dim"]; m.head_dim_v = hp["head_dim_v"]; m.n_rot = hp["n_rot"]
        m.rope_neox = hp["rope_neox"]; m.activation = hp["activation"]
        m.qk_norm = hp["qk_norm"]; m.post_norms = hp["post_norms"]
        m.norm_eps = hp["norm_eps"]; m.embd_scale = hp["embd_scale"]; m.attn_scale = hp["attn_scale"]
        m.n_expert = hp.get("n_expert", 0); m.n_expert_used = hp.get("n_expert_used", 0)
        m.attn_softcap = hp.get("attn_softcap", 0.0); m.final_softcap = hp.get("final_softcap", 0.0)
        m.rope_attn_factor = hp.get("rope_attn_factor", 1.0)
        if m.n_expert < 0 or not (m.n_expert == 0 or 0 < m.n_expert_used <= m.n_expert):
            raise UnsupportedModel(f"{m.n_expert_used} of {m.n_expert} experts is not a mixture qpack runs")
        m.n_ctx = n_ctx; m.n_seq = n_seq; m.n_batch = n_batch; m.n_threads = n_threads
        E, q_dim = m.n_embd, m.n_head * m.head_dim
        kv_dim, kv_dim_v = m.n_head_kv * m.head_dim, m.n_head_kv * m.head_dim_v

        self._set_matrix(&m.tok_embd, globals_["tok_embd"], "token_embd.weight", E)
        self._set_matrix(&m.output, globals_["output"], "output.weight", E)
        m.n_vocab = <int>m.output.rows
        if m.tok_embd.rows != m.n_vocab:
            raise UnsupportedModel(f"token_embd has {m.tok_embd.rows} rows but the output head {m.n_vocab}")
        m.output_norm = self._vector(globals_["output_norm"], "output_norm.weight", E)
        m.rope_factors = self._vector(globals_.get("rope_factors"), "rope factors", m.n_rot // 2, False)

        m.layers = <qk_layer *>_alloc(m.n_layer, sizeof(qk_layer))
        if len(layers) != m.n_layer:
            raise UnsupportedModel(f"expected {m.n_layer} layers, found {len(layers)}")
        for l, spec in enumerate(layers):
            L = &m.layers[l]
            p = f"blk.{l}."
            self._set_matrix(&L.wq, spec["wq"], p + "attn_q.weight", E, q_dim)
            self._set_matrix(&L.wk, spec["wk"], p + "attn_k.weight", E, kv_dim)
            self._set_matrix(&L.wv, spec["wv"], p + "attn_v.weight", E, kv_dim_v)
            self._set_matrix(&L.wo, spec["wo"], p + "attn_output.weight", m.n_head * m.head_dim_v, E)
            if m.n_expert:
                self._set_matrix(&L.router, spec["router"], p + "ffn_gate_inp.weight", E, m.n_expert)
                self._set_matrix(&L.gate_exps, spec["gate_exps"], p + "ffn_gate_exps.weight", E, m.n_expert * m.n_ff)
                self._set_matrix(&L.up_exps, spec["up_exps"], p + "ffn_up_exps.weight", E, m.n_expert * m.n_ff)
                self._set_matrix(&L.down_exps, spec["down_exps"], p + "ffn_down_exps.weight", m.n_ff, m.n_expert * E)
            else:
                self._set_matrix(&L.gate, spec["gate"], p + "ffn_gate.weight", E, m.n_ff)
                self._set_matrix(&L.up, spec["up"], p + "ffn_up.weight", E, m.n_ff)
                self._set_matrix(&L.down, spec["down"], p + "ffn_down.weight", m.n_ff, E)
            L.attn_norm = self._vector(spec["attn_norm"], p + "attn_norm.weight", E)
            L.ffn_norm = self._vector(spec["ffn_norm"], p + "ffn_norm.weight", E)
            L.post_attn_norm = self._vector(spec.get("post_attn_norm"), p + "post_attention_norm.weight", E, m.post_norms)
            L.post_ffn_norm = self._vector(spec.get("post_ffn_norm"), p + "post_ffw_norm.weight", E, m.post_norms)
            L.q_norm = self._vector(spec.get("q_norm"), p + "attn_q_norm.weight", m.head_dim, m.qk_norm)
            L.k_norm = self._vector(spec.get("k_norm"), p + "attn_k_norm.weight", m.head_dim, m.qk_norm)
            L.bq = self._vector(spec.get("bq"), p + "attn_q.bias", q_dim, False)
            L.bk = self._vector(spec.get("bk"), p + "attn_k.bias", kv_dim, False)
            L.bv = self._vector(spec.get("bv"), p + "attn_v.bias", kv_dim_v, False)
            L.window = spec["window"]
            L.rope_base = spec["rope_base"]

        cache_items = <size_t>m.n_layer * n_seq * n_ctx
        m.k_cache = <qk_f16 *>_alloc(cache_items * kv_dim, sizeof(qk_f16))
        m.v_cache = <qk_f16 *>_alloc(cache_items * kv_dim_v, sizeof(qk_f16))
        self.kv_bytes = cache_items * (kv_dim + kv_dim_v) * sizeof(qk_f16)
        B = <size_t>n_batch
        m.x = <float *>_alloc(B * E, sizeof(float))
        m.xn = <float *>_alloc(B * E, sizeof(float))
        m.q = <float *>_alloc(B * q_dim, sizeof(float))
        m.k = <float *>_alloc(B * kv_dim, sizeof(float))
        m.v = <float *>_alloc(B * kv_dim_v, sizeof(float))
        m.attn_out = <float *>_alloc(B * m.n_head * m.head_dim_v, sizeof(float))
        m.tmp = <float *>_alloc(B * E, sizeof(float))
        n_ff_dense = 0 if m.n_expert else m.n_ff  # the experts' buffers are forward.h's
        m.ff_a = <float *>_alloc(B * n_ff_dense, sizeof(float))
        m.ff_b = <float *>_alloc(B * n_ff_dense, sizeof(float))
        # threads, quantized activations, per-thread tiles (forward.h)
        if qk_model_init(m) != 0:
            raise MemoryError("cannot allocate the model's threads and scratch")
        self.scratch_bytes = sizeof(float) * (
            B * (4 * E + q_dim + kv_dim + kv_dim_v + m.n_head * m.head_dim_v + 2 * n_ff_dense)
        ) + qk_model_runtime_bytes(m)
        self.n_ctx, self.n_seq, self.n_batch, self.n_threads = n_ctx, n_seq, n_batch, n_threads
        self.n_vocab, self.n_embd = m.n_vocab, E

    cdef _set_matrix(self, qk_matrix *mat, spec, str name, int64_t cols, int64_t rows=-1):
        """spec = (ggml_type, rows, cols, uint8 array of the tensor's bytes)."""
        if spec is None:
            raise UnsupportedModel(f"tensor {name} is missing")
        cdef const qk_traits *tr
        ggml_type, n_rows, n_cols, data = spec
        tr = qk_get_traits(ggml_type)
        if tr == NULL:
            raise UnsupportedModel(f"tensor {name} has ggml type {ggml_type}, which qpack cannot run")
        if n_cols != cols or (rows >= 0 and n_rows != rows):
            raise UnsupportedModel(
                f"tensor {name} has shape [{n_cols}, {n_rows}], expected [{cols}, {rows if rows >= 0 else 'any'}]")
        if n_cols % tr.block_elems:
            raise UnsupportedModel(f"tensor {name}: {n_cols} columns are not whole {tr.block_elems}-element blocks")
        cdef const uint8_t[::1] buf = np.ascontiguousarray(data, dtype=np.uint8).reshape(-1)
        row_bytes = n_cols // tr.block_elems * tr.block_bytes
        if buf.shape[0] != n_rows * row_bytes:
            raise UnsupportedModel(f"tensor {name} holds {buf.shape[0]} bytes, expected {n_rows * row_bytes}")
        self._keep.append(buf)
        mat.data = &buf[0]
        mat.tr = tr
        mat.rows = n_rows
        mat.cols = n_cols
        mat.row_bytes = row_bytes

    cdef const float *_vector(self, data, str name, int64_t n, bint required=True) except? NULL:
        if data is None:
            if required:
                raise UnsupportedModel(f"tensor {name} is missing")
            return NULL
        cdef const float[::1] v = np.ascontiguousarray(data, dtype=np.float32).reshape(-1)
        if v.shape[0] != n:
            raise UnsupportedModel(f"tensor {name} has {v.shape[0]} elements, expected {n}")
        self._keep.append(v)
        return &v[0]

    def __dealloc__(self):
        qk_model_free(&self.m)  # first: stops the worker threads
        free(self.m.layers)
        free(self.m.k_cache); free(self.m.v_cache)
        free(self.m.x); free(self.m.xn); free(self.m.q); free(self.m.k); free(self.m.v)
        free(self.m.attn_out); free(self.m.tmp); free(self.m.ff_a); free(self.m.ff_b)

    def forward(self, tokens, pos, seq, out_idx, bint hidden=False):
        """Run a batch; return logits (or final hidden states) for the rows in out_idx.

        Token i is at position pos[i] of sequence slot seq[i]; every earlier position of that
        slot must already be in the cache or earlier in this batch."""
        t = np.ascontiguousarray(tokens, dtype=np.int32).reshape(-1)
        p = np.ascontiguousarray(pos, dtype=np.int32).reshape(-1)
        s = np.ascontiguousarray(seq, dtype=np.int32).reshape(-1)
        o = np.ascontiguousarray(out_idx, dtype=np.int32).reshape(-1)
        n, n_out = t.shape[0], o.shape[0]
        if not 0 < n <= self.n_batch or p.shape[0] != n or s.shape[0] != n or n_out > n:
            raise QpackError(f"bad batch: {n} tokens (at most {self.n_batch}), {n_out} outputs")
        if n and (t.min() < 0 or t.max() >= self.n_vocab):
            raise QpackError(f"token id out of range 0..{self.n_vocab - 1}")
        if n and (p.min() < 0 or p.max() >= self.n_ctx):
            raise QpackError(f"position out of the context 0..{self.n_ctx - 1}")
        if n and (s.min() < 0 or s.max() >= self.n_seq):
            raise QpackError(f"sequence slot out of range 0..{self.n_seq - 1}")
        if n_out and (o.min() < 0 or o.max() >= n):
            raise QpackError("output row out of the batch")
        out = np.empty((n_out, self.n_embd if hidden else self.n_vocab), dtype=np.float32)
        cdef const int32_t[::1] tv = t, pv = p, sv = s
        cdef const int32_t[::1] ov = o if n_out else np.zeros(1, np.int32)
        cdef float[:, ::1] outv = out if n_out else np.zeros((1, 1), np.float32)
        cdef int cn = n, cn_out = n_out
        with nogil:
            qk_forward(&self.m, cn, &tv[0], &pv[0], &sv[0], cn_out, &ov[0],
                       NULL if hidden else &outv[0, 0], &outv[0, 0] if hidden else NULL)
        return out

    def copy_sequence(self, int src, int dst, int n_pos):
        """Copy the first n_pos cached positions of slot src into slot dst (prefix reuse)."""
        if not (0 <= src < self.n_seq and 0 <= dst < self.n_seq and 0 <= n_pos <= self.n_ctx):
            raise QpackError("bad sequence copy")
        if src != dst and n_pos:
            with nogil:
                qk_copy_seq(&self.m, src, dst, n_pos)
