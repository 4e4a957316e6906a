"""`qpack imatrix`: the numpy forward pass that records activations agrees with the engine, the
file is llama-imatrix's GGUF layout (read back with gguf-py), and quantize uses it."""

from __future__ import annotations

import gguf
import numpy as np
import pytest
from click.testing import CliRunner
from f16_models import tiny_f16
from qpack.builder.cli import main
from qpack.builder.imatrix import ActivationRecorder, read_imatrix, write_imatrix
from qpack.runtime import cpu
from qpack.runtime.gguf import open_gguf
from qpack.runtime.model import Model
from reference_forward import ReferenceModel
from tiny_models import tiny_model


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return tiny_f16(tmp_path_factory.mktemp("m") / "tiny.gguf", n_layers=2, seed=7)


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma3"])
def test_recorder_forward_matches_engine_and_reference(tmp_path, arch):
    """Its logits are the engine's (which quantizes activations: small differences) and the
    float64 reference's; so the activations it records are the model's."""
    path = tiny_model(tmp_path / f"{arch}.gguf", arch=arch, weight_type="F16", seed=3)
    kernels = cpu.load("auto")
    gf = open_gguf(path)
    tokens = list(range(3, 40))
    rec = ActivationRecorder(gf, kernels.dequantize)
    ours = rec.forward(tokens, logits=True)
    ref = ReferenceModel(path).logits(tokens)
    engine = Model(gf, n_ctx=64, n_batch=64, threads=1, kernels=kernels).logits(
        tokens, all_rows=True
    )
    scale = np.abs(ref).max()
    assert np.abs(ours - ref).max() < 1e-3 * scale
    assert np.abs(ours - engine).max() < 0.05 * scale
    n_layer = gf.metadata[f"{arch}.block_count"]
    assert len(rec.sums) == 7 * n_layer  # q, k, v, output, gate, up, down per layer
    assert all(c == len(tokens) for c in rec.counts.values())


def test_sums_are_squared_inputs(tiny):
    """For the first layer's q/k/v the input is the normed embedding: check by hand."""
    kernels = cpu.load("auto")
    gf = open_gguf(tiny)
    rec = ActivationRecorder(gf, kernels.dequantize)
    tokens = [5, 9, 9, 17]
    rec.forward(tokens)
    r = ReferenceModel(tiny)
    x = r.w("token_embd.weight")[tokens]
    xn = r.rms(x, r.w("blk.0.attn_norm.weight"))
    expected = (xn**2).sum(axis=0)
    for name in ("attn_q", "attn_k", "attn_v"):
        np.testing.assert_allclose(rec.sums[f"blk.0.{name}.weight"], expected, rtol=1e-4)


def test_cli_writes_llama_imatrix_format_and_quantize_uses_it(tiny, tmp_path):
    text = tmp_path / "calib.txt"
    text.write_text("the quick brown fox jumps over the lazy dog. " * 200)
    out = tmp_path / "imatrix.gguf"
    r = CliRunner().invoke(main, ["imatrix", str(tiny), "-f", str(text), "-o", str(out), "-c", "64", "--chunks", "3"])  # fmt: skip
    assert r.exit_code == 0, r.output
    reader = gguf.GGUFReader(str(out))
    fields = {f.name: f for f in reader.fields.values()}
    assert fields["general.type"].contents() == "imatrix"
    assert fields["imatrix.chunk_count"].contents() == 3
    assert fields["imatrix.chunk_size"].contents() == 64
    assert fields["imatrix.datasets"].contents() == ["calib.txt"]
    tensors = {t.name: t for t in reader.tensors}
    sums = tensors["blk.1.ffn_down.weight.in_sum2"]
    assert list(sums.shape) == [512, 1] and sums.tensor_type == gguf.GGMLQuantizationType.F32
    counts = np.asarray(tensors["blk.1.ffn_down.weight.counts"].data)
    assert counts.ravel().tolist() == [3 * 64]
    loaded = read_imatrix(out)
    np.testing.assert_allclose(
        loaded["blk.1.ffn_down.weight"], np.asarray(sums.data).ravel() / (3 * 64), rtol=1e-6
    )
    q = tmp_path / "q.gguf"
    r = CliRunner().invoke(main, ["quantize", str(tiny), str(q), "Q4_K_M", "--imatrix", str(out)])
    assert r.exit_code == 0, r.output
    plain = tmp_path / "plain.gguf"
    CliRunner().invoke(main, ["quantize", str(tiny), str(plain), "Q4_K_M"])
    a, b = open_gguf(q), open_gguf(plain)
    name = "blk.0.ffn_gate.weight"
    assert a.tensors[name].type == b.tensors[name].type
    assert bytes(a.tensors[name].data) != bytes(b.tensors[name].data)


def test_imatrix_read_rejects_other_files(tiny, tmp_path):
    from qpack.runtime.errors import QpackError

    with pytest.raises(QpackError, match="not an imatrix"):
        read_imatrix(tiny)
    bad = tmp_path / "nan.gguf"
    write_imatrix(bad, {"blk.0.attn_q.weight": np.array([1.0, np.nan])}, {"blk.0.attn_q.weight": 4}, 1, 8, ["x"])  # fmt: skip
    with pytest.raises(QpackError, match="not finite"):
        read_imatrix(bad)
