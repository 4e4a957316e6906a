"""The forward pass's threading and batching (cython/forward.h, cython/workers.h).

The pass cuts every op into chunks that threads take dynamically, and a (row, token) product
or a query's attention is computed the same way whatever chunk, tile or batch holds it. So, on
every CPU variant, logits are BIT-identical:
- whatever the number of threads (including more threads than cores: a thread that is not
  running holds back nobody);
- whether a prompt goes in one batch, in chunks, or token by token, and whoever shares the batch;
- whether a long sequence's attention is split by spans of 256 keys across threads (decode
  steps, small prefill chunks) or walked by one thread: both fold the same span states in the
  same order.
(test_model.py holds the same passes to the float64 reference and to llama.cpp.)
"""

from __future__ import annotations

import numpy as np
import pytest
from qpack.runtime import cpu
from qpack.runtime.errors import QpackError
from qpack.runtime.gguf import open_gguf
from qpack.runtime.model import Model
from reference_forward import ReferenceModel
from tiny_models import tiny_model

VARIANTS = cpu.supported_variants()


def load(path, variant: str, **kw) -> Model:
    kw.setdefault("n_ctx", 96)
    return Model(open_gguf(str(path)), kernels=cpu._import(variant), **kw)


def prompt(n: int, seed: int = 5) -> list[int]:
    return np.random.default_rng(seed).integers(3, 269, n).tolist()


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("arch,weights", [("llama", "Q4_1"), ("gemma3", "Q5_0"), ("qwen2", "Q4_K")])
def test_thread_count_does_not_change_a_bit(tmp_path, variant, arch, weights):
    path = tiny_model(tmp_path / "m.gguf", arch, weights, n_layers=3)
    toks = prompt(40)
    ref = load(path, variant, threads=1).logits(toks, all_rows=True)
    for threads in (2, 3, 8):  # 8 > the cores of most CI machines: oversubscribed on purpose
        got = load(path, variant, threads=threads).logits(toks, all_rows=True)
        assert np.array_equal(got, ref), threads


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("weights", ["Q8_0", "Q6_K", "F16"])
def test_batching_does_not_change_a_bit(tmp_path, variant, weights):
    """One batch, chunks of 7, and token-by-token decode give the same logits; so does a
    batch shared with another sequence."""
    path = tiny_model(tmp_path / "m.gguf", "gemma3", weights, n_layers=2, window=8)
    toks = prompt(70)  # past two 64-key attention tiles and the sliding window
    whole = load(path, variant, n_batch=128, threads=2).logits(toks, all_rows=True)
    chunked = load(path, variant, n_batch=7, threads=2).logits(toks, all_rows=True)
    assert np.array_equal(whole, chunked)
    m = load(path, variant, n_batch=128, threads=2)
    steps = [m.forward([t], [i], [0], [0])[0] for i, t in enumerate(toks)]
    assert np.array_equal(np.stack(steps), whole)
    # the same prompt in slot 1, interleaved with another in slot 0
    other = prompt(30, seed=9)
    m2 = load(path, variant, n_seq=2, n_batch=128, threads=2)
    order = (
        [(1, i) for i in range(40)] + [(0, i) for i in range(30)] + [(1, i) for i in range(40, 70)]
    )
    seqs = {1: toks, 0: other}
    mixed = m2.forward(
        [seqs[s][i] for s, i in order],
        [i for _, i in order],
        [s for s, _ in order],
        list(range(100)),
    )
    ours = np.array([k for k, (s, _) in enumerate(order) if s == 1])
    assert np.array_equal(mixed[ours], whole)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize(
    "arch,weights", [("llama", "Q4_K"), ("gemma2", "Q6_K"), ("qwen3moe", "Q4_K")]
)
def test_output_rows_equal_their_rows_of_a_full_pass(tmp_path, variant, arch, weights):
    """With some rows asked (ascending), the last layer runs past attention on those rows
    only; each one's logits or hidden state is still bit-identical to its row of a pass that
    asks for all. Unordered rows take the full path, repeated ones are refused; none asked
    still fills the cache."""
    path = tiny_model(tmp_path / "m.gguf", arch, weights, n_layers=2)
    toks = prompt(45)
    n = len(toks)
    m = load(path, variant, threads=2)
    every = m.forward(toks, list(range(n)), [0] * n, list(range(n)))
    hidden = m.forward(toks, list(range(n)), [0] * n, list(range(n)), hidden=True)
    for rows in ([n - 1], [0, 3, 17, 44], [5, 6], [30, 2], list(range(1, n))):
        assert np.array_equal(m.forward(toks, list(range(n)), [0] * n, rows), every[rows]), rows
        got = m.forward(toks, list(range(n)), [0] * n, rows, hidden=True)
        assert np.array_equal(got, hidden[rows]), rows
    with pytest.raises(QpackError, match="repeat"):
        m.forward(toks, list(range(n)), [0] * n, [9, 9])
    m.forward(toks[:40], list(range(40)), [0] * 40, [])  # nothing asked: keys and values only
    tail = m.forward(toks[40:], list(range(40, n)), [0] * 5, list(range(5)))
    assert np.array_equal(tail, every[40:])


@pytest.mark.parametrize("variant", VARIANTS)
def test_many_small_passes_on_many_threads(tmp_path, variant):
    """Decode-sized passes in a row on an oversubscribed pool: no hang, no drift."""
    path = tiny_model(tmp_path / "m.gguf", "llama", "Q4_0", n_layers=2)
    m1, m8 = load(path, variant, threads=1), load(path, variant, threads=8)
    for i, t in enumerate(prompt(60)):
        a = m1.forward([t], [i], [0], [0])
        b = m8.forward([t], [i], [0], [0])
        assert np.array_equal(a, b), i


@pytest.mark.parametrize("variant", VARIANTS)
def test_copied_sequence_continues_like_the_original(tmp_path, variant):
    """copy_sequence (a shared prompt prefix): slot 1 continues exactly as slot 0 would."""
    path = tiny_model(tmp_path / "m.gguf", "qwen2", "Q8_0", n_layers=2, n_kv_heads=2)
    toks = prompt(20)
    m = load(path, variant, n_seq=3, threads=2)
    m.forward(toks, list(range(20)), [0] * 20, [])
    m.native.copy_sequence(0, 1, 20)
    a = m.forward([7], [20], [0], [0])
    b = m.forward([7], [20], [1], [0])
    c = m.forward([7], [20], [2], [0])  # slot 2 holds nothing: must differ
    assert np.array_equal(a, b)
    assert not np.allclose(a, c)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_long_context_attention_split_across_threads(tmp_path, variant, arch):
    """Past one span, a decode step (and a small prefill chunk) hands the spans of its few
    (block, kv head) pairs to different threads and merges them: the same bits as one thread
    over one big batch, and the float64 reference's logits. gemma3: one kv head, a window of
    300 that starts mid-span, and a global layer."""
    n, n_kv = 600, 1 if arch == "gemma3" else 2
    path = tiny_model(
        tmp_path / "m.gguf", arch, "F32", n_layers=7 if arch == "gemma3" else 2,
        n_kv_heads=n_kv, window=300,
    )  # fmt: skip
    toks = prompt(n)
    one = load(path, variant, n_ctx=640, n_batch=640, threads=1)
    whole = one.logits(toks, all_rows=True)
    assert not one.native.last_pass_split
    ref = ReferenceModel(path).logits(toks)
    assert np.abs(whole - ref).max() < 2e-3 * max(1.0, np.abs(ref).max())
    for threads in (2, 3):
        m = load(path, variant, n_ctx=640, n_batch=640, threads=threads)
        m.forward(toks[:300], np.arange(300), np.zeros(300), [])
        for i in range(300, n):
            step = m.forward([toks[i]], [i], [0], [0])[0]
            assert m.native.last_pass_split
            assert np.array_equal(step, whole[i]), (threads, i)
    chunked = load(path, variant, n_ctx=640, n_batch=3, threads=2)
    assert np.array_equal(chunked.logits(toks, all_rows=True), whole)
    assert chunked.native.last_pass_split
