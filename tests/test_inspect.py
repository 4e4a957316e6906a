"""`qpack inspect`: the facts it prints against the file's own metadata and tensor list (read by
gguf.GGUFReader where the test is marked slow, by our reader elsewhere), and its errors."""

from __future__ import annotations

import json
from collections import Counter

import gguf
import numpy as np
import pytest
from click.testing import CliRunner
from gguf import GGUFValueType
from gguf_fixtures import TinyLlamaConfig, tiny_llama, write_gguf
from qpack.builder.cli import main as qpack_cli
from qpack.runtime import inspect as facts
from qpack.runtime.facts import DEFAULT_CTX, read_model_facts
from qpack.runtime.gguf import open_gguf
from tiny_models import tiny_model


def run(*args: str):
    return CliRunner().invoke(qpack_cli, ["inspect", *map(str, args)])


def run_json(*args: str) -> dict:
    result = run(*args, "--json")
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


@pytest.fixture(scope="module")
def smollm2_reader(smollm2_path):
    return gguf.GGUFReader(smollm2_path)


def _reader_scalar(reader, key):
    f = reader.fields[key]
    return f.contents()


# --- the real model ----------------------------------------------------------------------------


@pytest.mark.slow
def test_smollm2_facts_match_the_metadata(smollm2_path, smollm2_reader):
    r = smollm2_reader
    f = run_json(smollm2_path)
    assert f["architecture"] == _reader_scalar(r, "general.architecture") == "llama"
    assert f["name"] == _reader_scalar(r, "general.name")
    assert f["n_layers"] == _reader_scalar(r, "llama.block_count") == 30
    assert f["n_embd"] == _reader_scalar(r, "llama.embedding_length") == 576
    assert f["n_heads"] == _reader_scalar(r, "llama.attention.head_count") == 9
    assert f["n_kv_heads"] == _reader_scalar(r, "llama.attention.head_count_kv") == 3
    assert f["n_ff"] == _reader_scalar(r, "llama.feed_forward_length")
    assert f["context_length"] == _reader_scalar(r, "llama.context_length")
    assert f["vocab_size"] == len(r.fields["tokenizer.ggml.tokens"].data) == 49152
    assert f["n_merges"] == len(r.fields["tokenizer.ggml.merges"].data)
    assert f["tokenizer"] == "gpt2" and f["tokenizer_pre"] == "smollm"
    assert f["key_length"] == f["value_length"] == 576 // 9  # no key_length key: embd / heads
    # parameters from the tensors' element counts
    params = sum(int(t.n_elements) for t in r.tensors)
    assert f["parameters"] == params and abs(params - 134.5e6) < 0.1e6
    # the quant mix
    counts = Counter(t.tensor_type.name for t in r.tensors)
    assert {m["type"]: m["tensors"] for m in f["quant_mix"]} == counts
    assert set(counts) == {"Q4_1", "Q8_0", "F32"}
    for m in f["quant_mix"]:
        ts = [t for t in r.tensors if t.tensor_type.name == m["type"]]
        assert m["bytes"] == sum(int(t.n_bytes) for t in ts)
        assert m["elements"] == sum(int(t.n_elements) for t in ts)
        assert m["bits_per_weight"] == pytest.approx(8 * m["bytes"] / m["elements"], abs=1e-4)
        assert m["supported"]
    assert f["unsupported_types"] == []
    assert f["weight_bytes"] == sum(int(t.n_bytes) for t in r.tensors)
    assert f["file_size"] == smollm2_path.stat().st_size


@pytest.mark.slow
def test_tensor_list_matches_the_reader(smollm2_path, smollm2_reader):
    f = run_json(smollm2_path, "--tensors")
    expected = [
        {
            "name": t.name,
            "type": t.tensor_type.name,
            "shape": [int(d) for d in t.shape],
            "bytes": int(t.n_bytes),
            "offset": int(t.data_offset),
        }
        for t in smollm2_reader.tensors
    ]
    assert f["tensors"] == expected
    text = run(smollm2_path, "--tensors").stdout
    for t in expected[::17]:
        line = next(ln for ln in text.splitlines() if ln.startswith(t["name"] + " "))
        assert line.split() == [
            t["name"], t["type"], "×".join(map(str, t["shape"])), str(t["bytes"]), str(t["offset"])
        ]  # fmt: skip


def test_smollm2_text_report(smollm2_path):
    result = run(smollm2_path)
    assert result.exit_code == 0, result.output
    lines = {ln.split()[0]: ln.split()[1:] for ln in result.stdout.splitlines()[1:] if ln.strip()}
    with open_gguf(smollm2_path) as gf:
        md = gf.metadata
        n_params = sum(t.n_elements for t in gf.tensors.values())
    assert lines["architecture"] == ["llama"]
    assert lines["layers"] == [str(md["llama.block_count"])]
    assert lines["heads"][:3] == [str(md["llama.attention.head_count"]), "(kv", "3,"]
    assert lines["embedding"] == ["576"]
    assert lines["context"] == [str(md["llama.context_length"])]
    assert lines["vocabulary"][:2] == ["49152", "(gpt2,"]
    assert lines["parameters"] == ["134.5M", f"({n_params:,})"]
    for type_name in ("Q4_1", "Q8_0", "F32"):
        assert type_name in lines or any(type_name in v for v in lines.values())
    assert "RAM" in lines and "4096:" in lines["RAM"]


def test_ram_estimate(smollm2_path):
    f = run_json(smollm2_path)
    ram = f["ram"]
    assert ram["ctx"] == min(f["context_length"], 4096) == 4096
    head_dim = f["n_embd"] // f["n_heads"]
    assert ram["kv_cache"] == 2 * f["n_layers"] * 4096 * f["n_kv_heads"] * head_dim * 2
    assert ram["weights"] == f["weight_bytes"]
    assert ram["total"] == ram["weights"] + ram["kv_cache"] + ram["scratch"]
    assert 0 < ram["scratch"] < ram["total"]
    small = run_json(smollm2_path, "--ctx", "256")["ram"]
    assert small["ctx"] == 256
    assert small["kv_cache"] * 16 == ram["kv_cache"]
    assert small["scratch"] < ram["scratch"]  # batches never hold more than the context


def test_all_metadata_summarizes_long_arrays(smollm2_path):
    f = run_json(smollm2_path, "--all")
    with open_gguf(smollm2_path) as gf:
        tokens = gf.metadata["tokenizer.ggml.tokens"]
        listing = {m["key"]: m for m in f["metadata"]}
        assert list(listing) == list(gf.metadata)
        tok = listing["tokenizer.ggml.tokens"]
        assert tok["type"] == "array[string]"
        assert tok["value"] == {"count": len(tokens), "first": tokens[: facts.ARRAY_PREVIEW]}
        assert listing["tokenizer.ggml.token_type"]["value"]["count"] == len(tokens)
        assert listing["llama.block_count"] == {
            "key": "llama.block_count",
            "type": "u32",
            "value": 30,
        }
        assert listing["tokenizer.chat_template"]["value"]["length"] == len(
            gf.metadata["tokenizer.chat_template"]
        )
    text = run(smollm2_path, "--all").stdout
    assert "tokenizer.ggml.merges (array[string]) = ['Ġ t', 'Ġ a'," in text
    assert "(48900 items)" in text
    assert "general.languages (array[string]) = ['en']" in text


def test_timing(smollm2_path):
    result = run(smollm2_path, "--timing")
    assert result.exit_code == 0 and "parsed in " in result.stdout
    assert run_json(smollm2_path, "--timing")["parse_ms"] > 0


# --- errors ------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["missing", "directory", "truncated", "not_gguf", "bad_tensor"])
def test_bad_file_is_one_line_and_exit_1(tmp_path, smollm2_path, kind):
    path = tmp_path / f"{kind}.gguf"
    if kind == "directory":
        path.mkdir()
    elif kind == "truncated":
        path.write_bytes(smollm2_path.read_bytes()[:200_000])
    elif kind == "not_gguf":
        path.write_text("hello, I am not a model\n")
    elif kind == "bad_tensor":
        raw = bytearray(tiny_llama(tmp_path / "ok.gguf").read_bytes())
        at = raw.index(b"output_norm.weight") + len(b"output_norm.weight")
        raw[at : at + 4] = (7).to_bytes(4, "little")  # n_dims 7
        path.write_bytes(raw)
    result = run(path)
    assert result.exit_code == 1
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and str(path) in lines[0] and lines[0].startswith("qpack: error: ")
    assert "Traceback" not in result.output


# --- small models with other shapes --------------------------------------------------------------


def test_explicit_head_dims_and_per_layer_kv_heads(tmp_path):
    """Gemma-style key/value lengths, a per-layer head_count_kv array, no vocabulary."""
    U32 = GGUFValueType.UINT32
    md = {
        "test.block_count": (U32, 3),
        "test.embedding_length": (U32, 64),
        "test.feed_forward_length": (U32, 96),
        "test.attention.head_count": (U32, 4),
        "test.attention.head_count_kv": (GGUFValueType.ARRAY, (GGUFValueType.INT32, [2, 1, 2])),
        "test.attention.key_length": (U32, 32),
        "test.attention.value_length": (U32, 16),
        "test.context_length": (U32, 1000),
    }
    w = np.ones((8, 64), np.float32)
    path = write_gguf(tmp_path / "t.gguf", md, {"w": (w, "Q8_0")}, arch="test")
    f = run_json(path, "--all")
    assert f["n_kv_heads"] == [2, 1, 2]
    assert f["key_length"] == 32 and f["value_length"] == 16
    # qpack does not run it: described from its metadata, with the reason and no RAM figures
    assert not f["runs"] and "architecture 'test' is not supported" in f["problem"]
    assert f["ram"]["kv_cache"] is None and f["ram"]["total"] is None
    assert f["vocab_size"] is None and f["tokenizer"] is None
    text = run(path).stdout
    assert "1-2 (per layer)" in text and "head dim 32/16" in text


def test_missing_hyperparameters_and_unsupported_types(tmp_path):
    blocks = np.zeros((2, 4 * 36), np.uint8)  # NVFP4: 64 elements in 36 bytes
    path = write_gguf(tmp_path / "odd.gguf", {}, {"w": (blocks, "NVFP4")}, arch="odd")
    assert open_gguf(path).tensor("w").nbytes == blocks.nbytes
    f = run_json(path)
    assert f["n_layers"] is None and f["ram"]["kv_cache"] is None and f["ram"]["total"] is None
    assert f["unsupported_types"] == ["NVFP4"]
    assert f["ram"]["ctx"] == DEFAULT_CTX
    text = run(path).stdout
    assert "not supported by qpack" in text and "layers        ?" in text


def test_tiny_llama_facts(tmp_path):
    cfg = TinyLlamaConfig(n_layers=3, n_embd=64, n_ff=96, n_heads=4, n_kv_heads=1, ctx=128)
    path = tiny_llama(tmp_path / "tiny.gguf", cfg)
    f = run_json(path)
    with open_gguf(path) as gf:
        assert f["parameters"] == sum(t.n_elements for t in gf.tensors.values())
        assert f["vocab_size"] == len(gf.metadata["tokenizer.ggml.tokens"])
    assert (f["n_layers"], f["n_embd"], f["n_heads"], f["n_kv_heads"]) == (3, 64, 4, 1)
    assert f["ram"]["ctx"] == 128  # the model's own context is below 4096
    assert f["ram"]["kv_cache"] == 2 * 3 * 128 * 1 * 16 * 2
    assert f["tokenizer"] == "llama" and f["n_merges"] is None


def test_inspect_a_built_executable(tmp_path):
    """The model inside an executable: the same facts, plus where it sits."""
    from qpack.builder import pack

    model = tiny_llama(tmp_path / "tiny-llama-Q8_0.gguf")
    stub = tmp_path / "stub.sh"  # not ELF/PE: the packer appends (fast, no PyInstaller)
    stub.write_bytes(b"#!/bin/sh\nexit 0\n" + b"MEI\014\013\012\013\016" + bytes(80))
    out = tmp_path / "tiny.bin"
    pack.build_executable(model, out, stub, name="tiny", target="linux-x86_64", show_progress=False)
    f_exe, f_gguf = run_json(out, "--tensors"), run_json(model, "--tensors")
    assert "embedded at byte" in f_exe["embedded"]
    for key in ("parameters", "n_layers", "quant_mix", "tensors", "vocab_size", "ram"):
        assert f_exe[key] == f_gguf[key], key
    assert f_exe["file_size"] == model.stat().st_size
    assert "model.gguf embedded at byte" in run(out).stdout


def test_ram_estimate_matches_what_the_engine_allocates(smollm2_path):
    """inspect's KV and scratch figures against the engine's own allocation at the same ctx."""
    from qpack.runtime.inspect import model_facts
    from qpack.runtime.model import Model, physical_cores

    with open_gguf(str(smollm2_path)) as gf:
        facts = model_facts(gf, 1024)
        model = Model(gf, n_ctx=1024, threads=physical_cores())
        ram = facts["ram"]
        assert ram["kv_cache"] == model.native.kv_bytes
        assert abs(ram["scratch"] / model.native.scratch_bytes - 1) < 0.2


@pytest.mark.parametrize(
    "arch", ["llama", "qwen2", "gemma3", "qwen3", "qwen3moe", "phi3", "gemma2"]
)
def test_one_source_of_memory_facts(tmp_path, arch):
    """The KV cache and activation buffers model.pxi allocates are exactly ModelFacts' figures
    (they had drifted apart: 3 x n_embd allocated, 4 x n_embd reported)."""
    from qpack.runtime import cpu
    from qpack.runtime.model import Model

    path = tiny_model(tmp_path / "m.gguf", arch, "Q8_0", n_heads=4, n_kv_heads=2, head_dim=48)
    with open_gguf(str(path)) as gf:
        mf = read_model_facts(gf)
        model = Model(gf, n_ctx=96, n_seq=3, n_batch=40, threads=2, kernels=cpu._import("generic"))
        assert model.facts == mf
        assert model.native.kv_bytes == mf.kv_bytes(96, 3)
        assert model.native.buffer_bytes == mf.buffer_bytes(40)
        runtime = model.native.scratch_bytes - model.native.buffer_bytes
        assert 0 < runtime <= mf.runtime_bytes_estimate(40, 2, 96)
        report = facts.model_facts(gf, 96)
        assert report["runs"] and report["ram"]["kv_cache"] == mf.kv_bytes(96)
        assert (
            (report["n_heads"], report["key_length"]) == (mf.hp.n_head, mf.hp.head_dim) == (4, 48)
        )


def test_runtime_estimate_counts_q8_0_queries(tmp_path):
    """A q8_0 K cache quantizes the queries too: the estimate holds with it."""
    from qpack.runtime import cpu
    from qpack.runtime.model import Model

    path = tiny_model(tmp_path / "m.gguf", "llama", "Q8_0", n_heads=8, n_kv_heads=2, head_dim=64)
    with open_gguf(str(path)) as gf:
        mf = read_model_facts(gf)
        kw = dict(n_ctx=96, n_batch=64, threads=2, kernels=cpu._import("generic"))
        f16 = Model(gf, **kw)
        q8 = Model(gf, cache_type_k="q8_0", **kw)
        extra = q8.native.scratch_bytes - f16.native.scratch_bytes
        assert extra >= 64 * 8 * 2 * 38  # the query blocks and sums, allocated
        runtime = q8.native.scratch_bytes - q8.native.buffer_bytes
        assert runtime <= mf.runtime_bytes_estimate(64, 2, 96, cache_type_k="q8_0")
        assert (
            mf.runtime_bytes_estimate(64, 2, 96, "q8_0") - mf.runtime_bytes_estimate(64, 2, 96)
            == 64 * 8 * 2 * 38
        )


# --- hostile strings ---------------------------------------------------------------------------


def test_metadata_reaches_the_terminal_escaped(tmp_path):
    """A name, a metadata value and a tensor name carrying terminal escape sequences (retitle
    the window, clear the screen) and a bidi override are printed as visible escapes."""
    from qpack.runtime.terminal import printable

    evil = "x\x1b]0;pwned\x07\x1b[2J\u202eevil\x9b"
    path = write_gguf(
        tmp_path / "evil.gguf",
        {"general.name": evil, "evil.key": evil},
        {f"w{evil}": (np.ones((2, 32), np.float32), "F32")},
        arch="odd",
    )
    for args in ((), ("--all",), ("--tensors",)):
        out = run(path, *args).stdout
        assert evil not in out and printable(evil) in out
        assert not any(ch in out for ch in "\x1b\x07\u202e\x9b")
    assert printable(evil) == "x\\x1b]0;pwned\\x07\\x1b[2J\\u202eevil\\x9b"
    assert printable("a\tb\nc", keep="\n") == "a\\x09b\nc"


def test_error_lines_are_escaped(tmp_path):
    """An error naming a tensor from the file (an unsupported type) is one escaped line."""
    data = np.zeros((4, 4 * 36), np.uint8)  # NVFP4 blocks, a type qpack refuses
    path = write_gguf(tmp_path / "t.gguf", {}, {"tok\x1b[31mred": (data, "NVFP4")})
    result = CliRunner().invoke(qpack_cli, ["run", str(path), "-p", "hi"])
    assert result.exit_code == 1
    assert "tok\\x1b[31mred has type NVFP4" in result.output and "\x1b" not in result.output
