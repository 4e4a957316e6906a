"""`qpack run` and `qpack perplexity` as a user runs them (a subprocess, real model)."""

from __future__ import annotations

import subprocess
import sys

import pytest

QPACK = [sys.executable, "-m", "qpack.builder.cli"]


def qpack(
    *args: str, stdin: str | None = None, timeout: float = 300
) -> subprocess.CompletedProcess:
    return subprocess.run(
        [*QPACK, *args], input=stdin, capture_output=True, text=True, timeout=timeout
    )


@pytest.mark.slow
def test_run_prompt_streams_paris_and_a_summary(smollm2_path):
    r = qpack(
        "run",
        str(smollm2_path),
        "-p",
        "The capital of France is",
        "--temp",
        "0",
        "-n",
        "6",
        "-t",
        "1",
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("The capital of France is Paris")
    assert "prompt: 5 tokens" in r.stderr and "generated: 6 tokens" in r.stderr
    assert "tok/s" in r.stderr


@pytest.mark.slow
def test_run_stop_string_is_not_printed(smollm2_path):
    r = qpack(
        "run",
        str(smollm2_path),
        "-p",
        "The capital of France is",
        "--temp",
        "0",
        "-n",
        "30",
        "--stop",
        "\n",
        "-t",
        "1",
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout == "The capital of France is Paris.\n"


@pytest.mark.slow
def test_chat_keeps_the_conversation_and_exits(smollm2_path):
    r = qpack(
        "run",
        str(smollm2_path),
        "--chat",
        "--temp",
        "0",
        "-n",
        "24",
        "-t",
        "1",
        stdin="What is the capital of France? Answer in one sentence.\n"
        "And the capital of Italy? Answer in one sentence.\n/clear\n/exit\n",
    )
    assert r.returncode == 0, r.stderr
    assert "Paris" in r.stdout
    assert "Rome" in r.stdout
    assert r.stderr.count("generated:") == 2


def test_run_needs_a_mode_and_reports_bad_files(tmp_path):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF" + b"\xff" * 20)
    r = qpack("run", str(bad), "-p", "hi")
    assert r.returncode == 1
    assert r.stderr.count("\n") == 1 and str(bad) in r.stderr and "Traceback" not in r.stderr
    r = qpack("run", str(bad))
    assert r.returncode == 2 and "-p PROMPT or --chat" in r.stderr


def test_every_command_has_help():
    for cmd in ("build", "run", "perplexity", "inspect"):
        r = qpack(cmd, "--help")
        assert r.returncode == 0 and "Usage:" in r.stdout, cmd


@pytest.mark.slow
def test_perplexity_prints_running_estimates(smollm2_path, tmp_path):
    text = tmp_path / "t.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 40)
    r = qpack("perplexity", str(smollm2_path), "-f", str(text), "-c", "64", "-t", "1")
    assert r.returncode == 0, r.stderr
    assert "[1]" in r.stdout and "PPL = " in r.stdout
    ppl = float(r.stdout.split("PPL = ")[1].split()[0])
    assert 1.0 < ppl < 3.0  # a repeated sentence is easy to predict
