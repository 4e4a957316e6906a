"""What the command lines do with a model: load it, generate from a prompt, chat in a terminal.

Shared by the executable (`./model.bin -p`, `--chat`) and `qpack run`: both parse the same
options (runtime/main.py) and land here with an open GGUF file.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from typing import Any, TextIO

import click

from . import cpu, hugepages
from .chat import ChatTemplate
from .engine import Engine, Request
from .model import Model
from .sampler import SamplingParams
from .terminal import printable
from .tokenizer import Tokenizer


@dataclass
class Loaded:
    """Everything built from one GGUF file, ready to generate."""

    model: Model
    tokenizer: Tokenizer
    template: ChatTemplate
    engine: Engine


PAGES = {
    "huge": "2 MiB",
    "evicted": "re-read into 2 MiB once",
    "small": "4 KiB (no large folios for this file)",
    "unsupported": "default",
}


def load(
    gguf: Any,
    ctx_size: int | None = None,
    threads: int | None = None,
    cpu_choice: str = "auto",
    n_parallel: int = 1,
    n_batch: int = 512,
    verbose: bool = False,
    log: TextIO | None = None,
    cache_types: tuple[str, str] = ("f16", "f16"),
) -> Loaded:
    kernels = cpu.load(cpu_choice)
    pages = hugepages.prefer_huge_pages_for(gguf)
    model = Model(
        gguf,
        n_ctx=ctx_size,
        n_seq=n_parallel,
        n_batch=n_batch,
        threads=threads,
        kernels=kernels,
        cache_type_k=cache_types[0],
        cache_type_v=cache_types[1],
    )
    tokenizer = Tokenizer.from_gguf(gguf)
    template = ChatTemplate.from_metadata(gguf.metadata, tokenizer)
    # The memory report always goes out (a user sizing --ctx-size needs it); the why of the
    # kernel choice only with --verbose.
    line = f"qpack: {model.report.describe()}"
    if verbose:
        why = (
            "forced by --cpu"
            if cpu_choice not in ("auto", None)
            else ("the best this CPU supports: " + ", ".join(cpu.supported_variants()))
        )
        line += f" ({kernels.VARIANT}: {why}; weights' pages: {PAGES[pages]})"
    click.echo(line, err=True, file=log)
    return Loaded(model, tokenizer, template, Engine(model, tokenizer, n_parallel))


def stream(loaded: Loaded, req: Request, out: TextIO) -> str:
    """Pump the engine on this thread, writing text as it comes; Ctrl-C cancels the request
    (not the program). Returns the finish reason."""
    engine = loaded.engine
    reason = None
    # token pieces come from the model file: on a terminal, their control characters are shown
    tty = hasattr(out, "isatty") and out.isatty()
    try:
        while reason is None:
            engine.pump()
            for ev in req.poll():
                if ev.text:
                    out.write(printable(ev.text, keep="\n\t") if tty else ev.text)
                    out.flush()
                if ev.finish_reason is not None:
                    reason = ev.finish_reason
    except KeyboardInterrupt:
        req.cancel()
        engine.run_until_done(req)
        reason = "cancelled"
    return reason


def summary(req: Request) -> str:
    u = req.usage
    pp = u.prompt_tokens - u.cached_tokens
    pp_rate = pp / u.prompt_seconds if u.prompt_seconds > 0 else 0.0
    gen_after_first = max(u.completion_tokens - 1, 0)
    tg_rate = gen_after_first / u.generation_seconds if u.generation_seconds > 0 else 0.0
    return (
        f"prompt: {u.prompt_tokens} tokens ({pp_rate:.1f} tok/s), "
        f"generated: {u.completion_tokens} tokens ({tg_rate:.1f} tok/s)"
    )


def run_prompt(
    loaded: Loaded, prompt: str, params: SamplingParams, out: TextIO = sys.stdout
) -> None:
    """Continue `prompt` (raw text, no chat template), streaming to out; summary on stderr."""
    tokens = loaded.tokenizer.encode(prompt)
    req = loaded.engine.submit(tokens, params)
    out.write(prompt)
    out.flush()
    stream(loaded, req, out)
    out.write("\n")
    click.echo(summary(req), err=True)


def run_chat(loaded: Loaded, params: SamplingParams, system: str | None = None) -> None:
    """A terminal conversation through the model's chat template. /clear starts over, /exit
    (or Ctrl-D) leaves; Ctrl-C stops the current answer."""
    messages: list[dict[str, str]] = [{"role": "system", "content": system}] if system else []
    click.echo("qpack chat: /clear starts over, /exit quits, Ctrl-C stops an answer.", err=True)
    while True:
        try:
            line = input("> ")
        except (EOFError, KeyboardInterrupt):
            click.echo("", err=True)
            return
        text = line.strip()
        if not text:
            continue
        if text in ("/exit", "/quit"):
            return
        if text == "/clear":
            messages = messages[:1] if system else []
            continue
        messages.append({"role": "user", "content": line})
        tokens = loaded.template.encode(messages)
        started = time.perf_counter()
        req = loaded.engine.submit(tokens, params)
        answer = _Tee(sys.stdout)
        reason = stream(loaded, req, answer)
        sys.stdout.write("\n")
        messages.append({"role": "assistant", "content": "".join(answer.chunks)})
        if reason == "cancelled":
            click.echo("[stopped]", err=True)
        click.echo(f"[{summary(req)}; {time.perf_counter() - started:.1f} s]", err=True)


class _Tee:
    """Writes through to a stream and keeps what it wrote (the assistant's turn)."""

    def __init__(self, out: TextIO):
        self.out = out
        self.chunks: list[str] = []

    def write(self, s: str) -> None:
        self.chunks.append(s)
        self.out.write(s)

    def flush(self) -> None:
        self.out.flush()
