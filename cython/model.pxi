# The forward pass wrapper: owns the C model struct, its KV cache and scratch, and keeps
# references to the numpy views of the mapping that the struct points into.

from libc.stdlib cimport calloc, free
from libc.string cimport memset

import numpy as np

from qpack.runtime.errors import QpackError, UnsupportedModel

# Sizes arrive as Python ints (exact); anything past these is refused before it reaches C.
INT32_MAX = 2147483647
MAX_STATE_BYTES = 1 << 46  # one allocation of the model state; beyond it, refuse


cdef extern from "forward.h":
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
        uint8_t *k_cache
        uint8_t *v_cache
        int k_type, v_type
        size_t k_row, v_row
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
    size_t qk_cache_row_bytes(int type, int n) noexcept nogil
    void qk_cache_put(int type, const float *x, uint8_t *dst, int n) noexcept nogil
    void qk_cache_get(int type, const uint8_t *src, float *dst, int n) noexcept nogil
    ctypedef struct qk_cache_q8_0:
        uint16_t d
    void qk_quantize_query(const float *x, qk_cache_q8_0 *y, int32_t *sums, int n) noexcept nogil
    void qk_load_keys_q8(uint32_t *kw, const uint8_t *ks, size_t row, int hd, int tn) noexcept nogil
    void qk_att_scores_q8(float *s, const qk_cache_q8_0 *const *q, const int32_t *const *qsum, int nq,
                          const uint32_t *kw, int hd, int tn) noexcept nogil
    void qk_copy_seq(qk_model *m, int src, int dst, int n_pos) noexcept nogil
    int qk_model_init(qk_model *m) noexcept nogil
    int qk_check_hparams(const qk_model *m) noexcept nogil
    int qk_check_weights(const qk_model *m, int *where) noexcept nogil
    const char *qk_check_message(int code) noexcept nogil
    void qk_model_free(qk_model *m) noexcept nogil
    size_t qk_model_runtime_bytes(const qk_model *m) noexcept nogil
    int qk_last_pass_split(const qk_model *m) noexcept nogil


cdef void *_alloc(object n_items, size_t item_size) except NULL:
    """calloc of n_items (an exact Python int) or a QpackError: never a wrapped size."""
    if not 0 <= n_items * item_size <= MAX_STATE_BYTES:
        raise QpackError(f"the model state would need {n_items * item_size} bytes; refused")
    cdef size_t n = n_items
    cdef void *p = calloc(n if n else 1, item_size)
    if p == NULL:
        raise QpackError(
            f"cannot allocate {n_items * item_size} bytes for the model state (try a smaller "
            "--ctx-size)")
    return p


def cache_encode(int cache_type, values) -> bytes:
    """One cache row as the forward pass writes it: values (float32) in a cache type."""
    cdef const float[::1] x = np.ascontiguousarray(values, dtype=np.float32).reshape(-1)
    cdef int n = x.shape[0]
    cdef size_t nbytes = qk_cache_row_bytes(cache_type, n)
    if n == 0 or nbytes == 0:
        raise QpackError(f"no cache row of type {cache_type} holds {n} values")
    out = np.empty(nbytes, dtype=np.uint8)
    cdef uint8_t[::1] o = out
    qk_cache_put(cache_type, &x[0], &o[0], n)
    return out.tobytes()


def cache_decode(int cache_type, data, int n):
    """n float32 values of a cache row, as attention reads them back."""
    cdef const uint8_t[::1] src = np.frombuffer(bytes(data), dtype=np.uint8)
    if n <= 0 or <Py_ssize_t>qk_cache_row_bytes(cache_type, n) != src.shape[0]:
        raise QpackError(f"{src.shape[0]} bytes are not a cache row of {n} values")
    out = np.empty(n, dtype=np.float32)
    cdef float[::1] o = out
    qk_cache_get(cache_type, &src[0], &o[0], n)
    return out


def q8_0_scores(queries, keys):
    """Attention scores q . k of a q8_0 K cache, as the forward pass computes them: each query
    row quantized to q8_0, the keys (at most one tile of 64) cached as q8_0 rows."""
    cdef const float[:, ::1] q = np.ascontiguousarray(queries, dtype=np.float32)
    cdef const float[:, ::1] k = np.ascontiguousarray(keys, dtype=np.float32)
    cdef int nq = q.shape[0], tn = k.shape[0], hd = q.shape[1], r
    if not (0 < nq <= 256 and 0 < tn <= 64 and k.shape[1] == hd and 0 < hd <= 1024 and hd % 32 == 0):
        raise QpackError("q8_0_scores takes 1..256 queries, 1..64 keys, head sizes of whole blocks")
    cdef size_t row = qk_cache_row_bytes(8, hd)
    cdef uint8_t[::1] cache = np.zeros(tn * row, np.uint8)
    cdef uint8_t[::1] q8 = np.zeros(nq * row, np.uint8)
    cdef int32_t[::1] sums = np.zeros(nq * (hd // 32), np.int32)
    cdef uint32_t[::1] tile = np.zeros(hd * 64, np.uint32)  # words and scales, as the scratch
    out = np.zeros((nq, 64), np.float32)
    cdef float[:, ::1] o = out
    cdef const qk_cache_q8_0 *qrows[256]
    cdef const int32_t *srows[256]
    for r in range(tn):
        qk_cache_put(8, &k[r, 0], &cache[r * row], hd)
    for r in range(nq):
        qk_quantize_query(&q[r, 0], <qk_cache_q8_0 *>&q8[r * row], &sums[r * (hd // 32)], hd)
        qrows[r] = <const qk_cache_q8_0 *>&q8[r * row]
        srows[r] = &sums[r * (hd // 32)]
    qk_load_keys_q8(&tile[0], &cache[0], row, hd, tn)
    qk_att_scores_q8(&o[0, 0], qrows, srows, nq, &tile[0], hd, tn)
    return out[:, :tn]


cdef int _c_int(object value, str what, int low=1) except? -1:
    """A size for an int field of the C struct, refused (not wrapped) outside low..INT32_MAX."""
    if not isinstance(value, int) or not low <= value <= INT32_MAX:
        raise UnsupportedModel(f"{what} = {value!r} is out of range ({low}..{INT32_MAX})")
    return value


cdef class NativeModel:
    """The compiled model: weights as views of the mapping, KV cache for n_seq sequences of
    n_ctx positions (keys and values each f16 or q8_0: ggml type ids k_type, v_type), scratch
    for batches of up to n_batch tokens."""

    cdef qk_model m
    cdef list _keep
    cdef readonly int n_ctx, n_seq, n_batch, n_threads, n_vocab, n_embd
    cdef readonly object kv_bytes, scratch_bytes, buffer_bytes

    def __cinit__(self):
        memset(&self.m, 0, sizeof(qk_model))

    def __init__(self, dict hp, dict globals_, list layers, n_ctx, n_seq, n_batch, n_threads,
                 int k_type=1, int v_type=1):
        cdef qk_model *m = &self.m
        cdef qk_layer *L
        cdef int code, where
        self._keep = []
        self.buffer_bytes = 0
        for value, what in ((n_ctx, "context"), (n_seq, "sequences"), (n_batch, "batch"),
                            (n_threads, "threads")):
            if not isinstance(value, int) or not 1 <= value <= INT32_MAX:
                raise QpackError(f"{what} = {value!r} is out of range (1..{INT32_MAX})")
        m.n_layer = _c_int(hp["n_layer"], "n_layer"); m.n_embd = _c_int(hp["n_embd"], "n_embd")
        m.n_ff = _c_int(hp["n_ff"], "n_ff")
        m.n_head = _c_int(hp["n_head"], "n_head"); m.n_head_kv = _c_int(hp["n_head_kv"], "n_head_kv")
        m.head_dim = _c_int(hp["head_dim"], "head_dim")
        m.head_dim_v = _c_int(hp["head_dim_v"], "head_dim_v")
        m.n_rot = _c_int(hp["n_rot"], "n_rot", 0)
        m.rope_neox = bool(hp["rope_neox"]); m.activation = _c_int(hp["activation"], "activation", 0)
        m.qk_norm = bool(hp["qk_norm"]); m.post_norms = bool(hp["post_norms"])
        m.norm_eps = hp["norm_eps"]; m.embd_scale = hp["embd_scale"]; m.attn_scale = hp["attn_scale"]
        m.n_expert = _c_int(hp.get("n_expert", 0), "n_expert", 0)
        m.n_expert_used = _c_int(hp.get("n_expert_used", 0), "n_expert_used", 0)
        m.attn_softcap = hp.get("attn_softcap", 0.0); m.final_softcap = hp.get("final_softcap", 0.0)
        m.rope_attn_factor = hp.get("rope_attn_factor", 1.0)
        m.n_ctx = n_ctx; m.n_seq = n_seq; m.n_batch = n_batch; m.n_threads = n_threads
        code = qk_check_hparams(m)
        if code:
            raise UnsupportedModel(f"the compiled model refuses these hyperparameters: "
                                   f"{qk_check_message(code).decode()}")
        # exact products (Python ints): C's check above guarantees each fits an int
        E, n_head, n_head_kv = int(m.n_embd), int(m.n_head), int(m.n_head_kv)
        q_dim, att_dim = n_head * m.head_dim, n_head * m.head_dim_v
        kv_dim, kv_dim_v = n_head_kv * m.head_dim, n_head_kv * m.head_dim_v

        self._set_matrix(&m.tok_embd, globals_["tok_embd"], "token_embd.weight", E)
        self._set_matrix(&m.output, globals_["output"], "output.weight", E)
        m.n_vocab = _c_int(m.output.rows, "output.weight rows (vocabulary)")
        if m.tok_embd.rows != m.n_vocab:
            raise UnsupportedModel(f"token_embd has {m.tok_embd.rows} rows but the output head {m.n_vocab}")
        m.output_norm = self._vector(globals_["output_norm"], "output_norm.weight", E)
        m.rope_factors = self._vector(globals_.get("rope_factors"), "rope factors", m.n_rot // 2, False)

        if len(layers) != m.n_layer:
            raise UnsupportedModel(f"expected {m.n_layer} layers, found {len(layers)}")
        m.layers = <qk_layer *>_alloc(m.n_layer, sizeof(qk_layer))
        for l, spec in enumerate(layers):
            L = &m.layers[l]
            p = f"blk.{l}."
            self._set_matrix(&L.wq, spec["wq"], p + "attn_q.weight", E, q_dim)
            self._set_matrix(&L.wk, spec["wk"], p + "attn_k.weight", E, kv_dim)
            self._set_matrix(&L.wv, spec["wv"], p + "attn_v.weight", E, kv_dim_v)
            self._set_matrix(&L.wo, spec["wo"], p + "attn_output.weight", att_dim, E)
            if m.n_expert:
                X = int(m.n_expert)
                self._set_matrix(&L.router, spec["router"], p + "ffn_gate_inp.weight", E, X)
                self._set_matrix(&L.gate_exps, spec["gate_exps"], p + "ffn_gate_exps.weight", E, X * m.n_ff)
                self._set_matrix(&L.up_exps, spec["up_exps"], p + "ffn_up_exps.weight", E, X * m.n_ff)
                self._set_matrix(&L.down_exps, spec["down_exps"], p + "ffn_down_exps.weight", m.n_ff, X * E)
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
            L.window = _c_int(spec["window"], p + "sliding window", 0)
            L.rope_base = spec["rope_base"]

        m.k_type, m.v_type = k_type, v_type
        m.k_row = qk_cache_row_bytes(k_type, m.head_dim)
        m.v_row = qk_cache_row_bytes(v_type, m.head_dim_v)
        if not m.k_row or not m.v_row:
            raise UnsupportedModel(
                f"no KV cache of ggml types {k_type}/{v_type} for head sizes "
                f"{m.head_dim}/{m.head_dim_v}")
        cache_rows = int(m.n_layer) * n_seq * n_ctx * n_head_kv
        m.k_cache = <uint8_t *>_alloc(cache_rows, m.k_row)
        m.v_cache = <uint8_t *>_alloc(cache_rows, m.v_row)
        self.kv_bytes = cache_rows * (m.k_row + m.v_row)
        B = int(n_batch)
        m.x = self._floats(B * E)
        m.xn = self._floats(B * E)
        m.tmp = self._floats(B * E)
        m.q = self._floats(B * q_dim)
        m.k = self._floats(B * kv_dim)
        m.v = self._floats(B * kv_dim_v)
        m.attn_out = self._floats(B * att_dim)
        n_ff_dense = 0 if m.n_expert else m.n_ff  # the experts' buffers are forward.h's
        m.ff_a = self._floats(B * n_ff_dense)
        m.ff_b = self._floats(B * n_ff_dense)
        code = qk_check_weights(m, &where)
        if code:
            raise UnsupportedModel(f"the compiled model refuses its weights"
                                   f"{f' (layer {where})' if where >= 0 else ''}: "
                                   f"{qk_check_message(code).decode()}")
        # threads, quantized activations, per-thread tiles (forward.h)
        if qk_model_init(m) != 0:
            raise QpackError("cannot allocate the model's threads and scratch")
        self.scratch_bytes = self.buffer_bytes + qk_model_runtime_bytes(m)
        self.n_ctx, self.n_seq, self.n_batch, self.n_threads = n_ctx, n_seq, n_batch, n_threads
        self.n_vocab, self.n_embd = m.n_vocab, E

    cdef float *_floats(self, object n) except NULL:
        """An activation buffer of n floats, counted into buffer_bytes."""
        cdef float *p = <float *>_alloc(n, sizeof(float))
        self.buffer_bytes += n * sizeof(float)
        return p

    cdef _set_matrix(self, qk_matrix *mat, spec, str name, object cols, object rows=-1):
        """spec = (ggml_type, rows, cols, uint8 array of the tensor's bytes)."""
        if spec is None:
            raise UnsupportedModel(f"tensor {name} is missing")
        cdef const qk_traits *tr
        ggml_type, n_rows, n_cols, data = spec
        tr = qk_get_traits(ggml_type) if isinstance(ggml_type, int) and 0 <= ggml_type < 1024 else NULL
        if tr == NULL:
            raise UnsupportedModel(f"tensor {name} has ggml type {ggml_type}, which qpack cannot run")
        if n_cols != cols or (rows >= 0 and n_rows != rows):
            raise UnsupportedModel(
                f"tensor {name} has shape [{n_cols}, {n_rows}], expected [{cols}, {rows if rows >= 0 else 'any'}]")
        if not (isinstance(n_rows, int) and isinstance(n_cols, int) and 0 < n_rows <= INT32_MAX):
            raise UnsupportedModel(f"tensor {name} has {n_rows!r} rows; refused")
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

    cdef const float *_vector(self, data, str name, object n, bint required=True) except? NULL:
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
        if n_out > 1 and np.unique(o).shape[0] != n_out:
            raise QpackError("output rows repeat (each row's residual is finished once)")
        out = np.empty((n_out, self.n_embd if hidden else self.n_vocab), dtype=np.float32)
        cdef const int32_t[::1] tv = t, pv = p, sv = s
        cdef const int32_t[::1] ov = o if n_out else np.zeros(1, np.int32)
        cdef float[:, ::1] outv = out if n_out else np.zeros((1, 1), np.float32)
        cdef int cn = n, cn_out = n_out
        with nogil:
            qk_forward(&self.m, cn, &tv[0], &pv[0], &sv[0], cn_out, &ov[0],
                       NULL if hidden else &outv[0, 0], &outv[0, 0] if hidden else NULL)
        return out

    @property
    def last_pass_split(self) -> bool:
        """Whether the last pass handed the spans of its attention to separate chunks."""
        return bool(qk_last_pass_split(&self.m))

    def copy_sequence(self, int src, int dst, int n_pos):
        """Copy the first n_pos cached positions of slot src into slot dst (prefix reuse)."""
        if not (0 <= src < self.n_seq and 0 <= dst < self.n_seq and 0 <= n_pos <= self.n_ctx):
            raise QpackError("bad sequence copy")
        if src != dst and n_pos:
            with nogil:
                qk_copy_seq(&self.m, src, dst, n_pos)
