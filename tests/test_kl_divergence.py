"""`qpack perplexity --kl-divergence` and `qpack advise` on tiny models: KL divergence against
an independent float64 computation from the reference forward pass, the CLI reports, and the
advisor's table, cache and recommendation."""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner
from f16_models import tiny_f16
from qpack.builder import advise
from qpack.builder.cli import main
from qpack.builder.quantize import quantize_file
from qpack.runtime.gguf import open_gguf
from qpack.runtime.kl_divergence import kl_divergence
from qpack.runtime.model import Model
from reference_forward import ReferenceModel


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    d = tmp_path_factory.mktemp("kld")
    base = tiny_f16(d / "base-f16.gguf", n_layers=2, seed=11)
    q4 = d / "q4.gguf"
    quantize_file(base, q4, "Q4_0")
    return base, q4


def log_softmax(x):
    x = x.astype(np.float64)
    m = x.max(-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))


def test_kld_matches_reference_forward(models):
    base_path, q_path = models
    tokens = [int(t) for t in np.random.default_rng(0).integers(3, 200, size=64)]
    n_ctx = 32
    m = Model(open_gguf(q_path), n_ctx=n_ctx, n_batch=n_ctx, threads=1)
    b = Model(open_gguf(base_path), n_ctx=n_ctx, n_batch=n_ctx, threads=1)
    *_, stats = kl_divergence(m, b, tokens, n_ctx, bos=1)
    # independent: float64 reference forward of both files, same windows
    rq, rb = ReferenceModel(q_path), ReferenceModel(base_path)
    kld, same = [], []
    for w in range(2):
        window = tokens[w * n_ctx : (w + 1) * n_ctx]
        window[0] = 1
        lq = log_softmax(rq.logits(window))[16:31]
        lb = log_softmax(rb.logits(window))[16:31]
        kld.append((np.exp(lb) * (lb - lq)).sum(-1))
        same.append(lq.argmax(-1) == lb.argmax(-1))
    kld = np.concatenate(kld)
    assert stats.n == 30
    assert stats.kld.mean() == pytest.approx(kld.mean(), rel=0.1)
    assert stats.kld.mean() > 1e-4  # Q4_0 is not the F16
    s = stats.summary()
    assert s["same_top"] == pytest.approx(np.concatenate(same).mean(), abs=0.2)
    assert s["kld_min"] <= s["kld_50"] <= s["kld_99"] <= s["kld_max"]


def test_kld_of_a_model_with_itself_is_zero(models):
    base_path, _ = models
    tokens = list(range(3, 67))
    a = Model(open_gguf(base_path), n_ctx=32, n_batch=32, threads=1)
    b = Model(open_gguf(base_path), n_ctx=32, n_batch=32, threads=1)
    *_, stats = kl_divergence(a, b, tokens, 32, bos=None)
    s = stats.summary()
    assert abs(s["kld_mean"]) < 1e-9 and s["same_top"] == 1.0 and s["dp_rms"] < 1e-9
    assert s["ppl"] == pytest.approx(s["ppl_base"])


def test_perplexity_cli_reports_kld(models, tmp_path):
    base_path, q_path = models
    text = tmp_path / "t.txt"
    text.write_text("a b c d e f g h i j k l m n o p. " * 40)
    r = CliRunner().invoke(
        main,
        [
            "perplexity",
            str(q_path),
            "-f",
            str(text),
            "-c",
            "32",
            "--kl-divergence",
            str(base_path),
        ],  # fmt: skip
    )
    assert r.exit_code == 0, r.output
    for line in ("Mean PPL(base)", "Mean    KLD:", "99.0%   KLD:", "Median  KLD:", "RMS Δp", "Same top p:"):  # fmt: skip
        assert line in r.stdout


def test_advise_table_cache_and_recommendation(models, tmp_path, monkeypatch):
    base_path, _ = models
    text = "one two three four five six seven eight nine ten. " * 120
    calls = []
    real = advise.quantize_file
    monkeypatch.setattr(advise, "quantize_file", lambda *a, **k: calls.append(a[2]) or real(*a, **k))  # fmt: skip
    kw = dict(types=("Q8_0", "Q4_0"), ctx=256, eval_ctx=64, eval_windows=4, threads=1)
    results = advise.advise(base_path, text, tmp_path, **kw)
    assert [m.type for m in results] == ["F16", "Q8_0", "Q4_0"]
    f16, q8, q4 = results
    assert f16.kld == pytest.approx(0, abs=1e-9) and q8.kld < q4.kld
    assert f16.file_bytes > q8.file_bytes > q4.file_bytes
    assert all(m.ram_bytes > m.file_bytes and m.decode_tps > 0 and m.prefill_tps > 0 for m in results)  # fmt: skip
    assert calls == ["Q8_0", "Q4_0"]
    again = advise.advise(base_path, text, tmp_path, **kw)  # cached: nothing re-run
    assert calls == ["Q8_0", "Q4_0"] and [json.dumps(m.__dict__) for m in again] == [json.dumps(m.__dict__) for m in results]  # fmt: skip
    assert advise.recommend(results, f16.ram_bytes) is f16
    assert advise.recommend(results, q8.ram_bytes) is q8
    assert advise.recommend(results, q4.ram_bytes) is q4
    assert advise.recommend(results, q4.ram_bytes - 1) is None
    table = advise.format_table(results, q8.ram_bytes, 256)
    assert "Q8_0" in table.splitlines()[3] and "recommended" in table.splitlines()[3]
    assert "(over budget)" in table.splitlines()[2]


def test_advise_plot_png(models, tmp_path):
    from qpack.builder.plot import _plot_png

    results = [
        advise.Measurement("F16", 100, 200, 10.0, 5.0, 3.0, 0.0, 1.0),
        advise.Measurement("Q8_0", 50, 150, 20.0, 9.0, 3.01, 0.001, 0.99),
        advise.Measurement("Q4_0", 30, 130, 25.0, 12.0, 3.2, 0.05, 0.9),
    ]
    out = tmp_path / "p.png"
    _plot_png(results, out, results[1])
    raw = out.read_bytes()
    assert raw[:8] == b"\x89PNG\r\n\x1a\n" and raw[12:16] == b"IHDR"
    import struct
    import zlib

    w, h = struct.unpack(">II", raw[16:24])
    idat = raw[raw.index(b"IDAT") + 4 : raw.index(b"IEND") - 8]
    pixels = np.frombuffer(zlib.decompress(idat), np.uint8).reshape(h, 1 + 3 * w)[:, 1:]
    assert (pixels.reshape(h, w, 3) == [220, 30, 30]).all(
        -1
    ).sum() == 2 * 49  # the 7x7 best point in both panels


def test_advise_refuses_a_quantized_model(models, tmp_path):
    from qpack.runtime.errors import QpackError

    with pytest.raises(QpackError, match="unquantized"):
        advise.advise(models[1], "x " * 300, tmp_path, types=("Q4_0",), eval_ctx=32)


def test_parse_size():
    assert advise.parse_size("8G") == 8 << 30
    assert advise.parse_size("512MiB") == 512 << 20
    assert advise.parse_size("1.5g") == 3 << 29
    with pytest.raises(Exception, match="cannot read"):
        advise.parse_size("lots")


def test_advise_with_an_imatrix_measures_the_iq_types(models, tmp_path, monkeypatch):
    """--iq: an importance matrix computed on the text (cached), every candidate quantized with
    it, the IQ types among them."""
    base_path, _ = models
    text = "one two three four five six seven eight nine ten. " * 300
    imatrix = advise.imatrix_from_text(base_path, text, tmp_path, kernels=_kernels(), chunks=2)
    assert advise.imatrix_from_text(base_path, text, tmp_path, _kernels(), chunks=2) == imatrix
    seen = []
    real = advise.quantize_file
    monkeypatch.setattr(advise, "quantize_file", lambda *a, **k: seen.append((a[2], k["imatrix"] is not None)) or real(*a, **k))  # fmt: skip
    kw = dict(types=("IQ2_XXS", "Q4_0"), ctx=256, eval_ctx=64, eval_windows=4, threads=1)
    results = advise.advise(base_path, text, tmp_path, imatrix=imatrix, **kw)
    assert [m.type for m in results] == ["F16", "IQ2_XXS", "Q4_0"]
    assert seen == [("IQ2_XXS", True), ("Q4_0", True)]
    assert results[2].kld < results[1].kld and results[1].file_bytes < results[2].file_bytes
    assert "IQ2_XXS" in advise.IQ_CANDIDATES


def _kernels():
    from qpack.runtime import cpu

    return cpu.current()
