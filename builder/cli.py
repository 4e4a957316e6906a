"""The `qpack` command line. Each subcommand is a thin layer over a module that does the work;
errors are caught here once and printed as one line (`--debug` shows the traceback)."""

from __future__ import annotations

import sys
from pathlib import Path

import click
from qpack.runtime import cpu as qpack_cpu
from qpack.runtime import main as runtime_main
from qpack.runtime.errors import QpackError
from qpack.runtime.version import __version__


class QpackGroup(click.Group):
    """Turns every QpackError (and Ctrl-C) into one clear line and exit code 1."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except QpackError as e:
            if ctx.params.get("debug"):
                raise
            click.echo(f"qpack: error: {e}", err=True)
            sys.exit(1)
        except KeyboardInterrupt:
            click.echo("qpack: interrupted", err=True)
            sys.exit(130)


@click.group(cls=QpackGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="qpack")
@click.option("--debug", is_flag=True, help="Show the full traceback on errors.")
def main(debug: bool) -> None:
    """Ship a quantized language model as one executable file.

    \b
    qpack build model.gguf        write model.bin (runtime + model in one file)
    qpack run model.gguf -p TEXT  generate from a prompt with the same runtime
    qpack serve model.gguf        chat page and OpenAI-compatible API on localhost:8080
    qpack inspect model.gguf      show what is inside a GGUF or a built executable
    """


@main.command()
@click.argument("model", required=False, type=click.Path(dir_okay=False, path_type=Path))
@click.option(
    "-o",
    "--output",
    type=click.Path(path_type=Path),
    help="Output file or directory (default: NAME.bin here).",
)
@click.option(
    "--name", help="Name of the executable (default: the model file's name minus its quant suffix)."
)
@click.option(
    "--args",
    "default_args",
    default="",
    help='Default arguments baked into the executable, e.g. --args "-c 2048 --port 9000".',
)
@click.option(
    "--target",
    help="Platform of the executable: linux-x86_64, linux-arm64, macos-arm64, macos-x86_64, "
    "windows-x86_64 (default: this one). Another platform's stub comes from the cache "
    "or --stub.",
)
@click.option(
    "--stub",
    "stub_path",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Use this runtime stub instead of the cached one.",
)
@click.option("--rebuild-stub", is_flag=True, help="Rebuild the cached runtime stub first.")
@click.option(
    "--split",
    is_flag=True,
    help="Write the model beside the executable as NAME.gguf (found there at run time): for "
    "models over Windows' 4 GiB limit, or to update the runtime without re-copying the weights.",
)
def build(model, output, name, default_args, target, stub_path, rebuild_stub, split) -> None:  # fmt: skip
    """Write one executable holding the runtime and MODEL (a .gguf, or a .zip holding one;
    default: SmolLM2-135M-Instruct)."""
    import shlex

    from qpack.builder import models, pack, stub
    from qpack.builder.digests import DigestCache

    model = model or models.default_model_path()
    source = pack.open_model_source(model)
    name = name or pack.default_name(source.file_name)
    target = target or stub.current_platform()
    if stub_path is None:
        stub_path = stub.get_stub(target, rebuild=rebuild_stub)
    if output is None:
        output = Path(pack.output_name(name, target))
    elif output.is_dir():
        output = output / pack.output_name(name, target)
    try:
        args = shlex.split(default_args)
    except ValueError as e:
        raise QpackError(f"--args {default_args!r}: {e}") from None
    report = pack.build_executable(
        model,
        output,
        stub_path,
        name=name,
        target=target,
        args=args,
        show_progress=True,
        digest_cache=DigestCache(stub.cache_dir()),
        split=split,
    )
    mix = ", ".join(f"{t} x{v['tensors']}" for t, v in report.model.quant_mix.items())
    where = (
        f"model beside it: {output.parent / pack.sibling_model_name(name)}"
        if split
        else f"model data at byte {report.data_offset}"
    )
    click.echo(
        f"wrote {report.output} ({report.size / 2**20:.1f} MiB): {report.model.architecture}, "
        f"{mix}; {where} ({report.layout} layout)"
    )


@main.command("inspect")
@click.argument("file", type=click.Path(path_type=Path))
@click.option(
    "--ctx",
    type=click.IntRange(min=1),
    help="Context size for the RAM estimate (default: min(model context, 4096)).",
)
@click.option(
    "--tensors",
    "show_tensors",
    is_flag=True,
    help="List every tensor: name, type, shape, bytes, offset.",
)
@click.option(
    "--all", "show_all", is_flag=True, help="List all metadata (long arrays and strings shortened)."
)
@click.option("--json", "as_json", is_flag=True, help="Print the same facts as JSON.")
@click.option("--timing", is_flag=True, help="Print how long parsing the file took.")
def inspect_command(file, ctx, show_tensors, show_all, as_json, timing) -> None:  # fmt: skip
    """Show what is inside FILE: a GGUF model, or an executable built by `qpack build`."""
    import json
    import time

    from qpack.runtime import inspect as facts

    start = time.perf_counter()
    gf, note = facts.open_model(file)
    parse_ms = (time.perf_counter() - start) * 1e3
    with gf:
        report = facts.model_facts(gf, ctx)
        if note:
            report["embedded"] = note
        if show_tensors:
            report["tensors"] = facts.tensor_table(gf)
        if show_all:
            report["metadata"] = facts.metadata_listing(gf)
    if timing:
        report["parse_ms"] = round(parse_ms, 3)
    if as_json:
        click.echo(json.dumps(report, indent=2, ensure_ascii=False))
        return
    click.echo(facts.format_facts(report, note))
    if show_all:
        click.echo("\nmetadata:\n" + facts.format_metadata(report["metadata"]))
    if show_tensors:
        click.echo("\ntensors:\n" + facts.format_tensors(report["tensors"]))
    if timing:
        click.echo(f"\nparsed in {parse_ms:.1f} ms")


def _open_model(path: Path):
    from qpack.runtime.gguf import open_gguf

    return open_gguf(str(path))


@main.command("run")
@click.argument("model", type=click.Path(path_type=Path))
@click.option("-p", "--prompt", help="Continue this text, print it and exit (no chat template).")
@click.option(
    "--chat", is_flag=True, help="Chat in the terminal, through the model's chat template."
)
@runtime_main.load_options
@runtime_main.sampling_options
def run_command(model, **kw) -> None:
    """Generate with MODEL (a GGUF file): -p PROMPT streams the continuation, --chat talks."""
    if kw["prompt"] is None and not kw["chat"]:
        raise click.UsageError("give -p PROMPT or --chat (`qpack serve` starts the server)")
    qpack_cpu.load(kw["cpu_choice"])
    runtime_main.run_model(_open_model(model), kw)


@main.command("serve")
@click.argument("model", type=click.Path(path_type=Path))
@runtime_main.server_options
@runtime_main.load_options
@runtime_main.sampling_options
def serve_command(model, **kw) -> None:
    """Serve MODEL (a GGUF file): the chat page and an OpenAI-compatible API on --host:--port,
    as a built executable does. The sampling options are the defaults of each request."""
    qpack_cpu.load(kw["cpu_choice"])
    runtime_main.serve(_open_model(model), kw)


@main.command("perplexity")
@click.argument("model", type=click.Path(path_type=Path))
@click.option(
    "-f",
    "--file",
    "text_file",
    required=True,
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="Text to score (UTF-8).",
)
@click.option(
    "-c",
    "--ctx-size",
    default=512,
    show_default=True,
    type=click.IntRange(min=4),
    help="Window size: each window is scored on its second half.",
)
@click.option(
    "-t", "--threads", type=click.IntRange(min=1), help="Threads (default: physical cores)."
)
@click.option("--cpu", "cpu_choice", default="auto", show_default=True, help="Kernel variant.")
def perplexity_command(model, text_file, ctx_size, threads, cpu_choice) -> None:
    """Perplexity of MODEL on a text, as llama-perplexity computes it: how much did
    quantization cost? Prints running estimates, then PPL ± its standard error."""
    from qpack.runtime.model import Model
    from qpack.runtime.perplexity import perplexity
    from qpack.runtime.tokenizer import Tokenizer

    gf = _open_model(model)
    kernels = qpack_cpu.load(cpu_choice)
    m = Model(gf, n_ctx=ctx_size, n_batch=ctx_size, threads=threads, kernels=kernels)
    tok = Tokenizer.from_gguf(gf)
    try:
        text = text_file.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise QpackError(f"{text_file}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    tokens = tok.encode(text, add_bos=False)
    bos = tok.bos_id if tok.add_bos else None
    n_windows = len(tokens) // ctx_size
    click.echo(f"{len(tokens)} tokens, {n_windows} windows of {ctx_size}", err=True)
    last = None
    for est in perplexity(m, tokens, ctx_size, bos):
        click.echo(f"[{est.windows}]{est.ppl:.4f}", nl=False)
        click.echo("," if est.windows < n_windows else "\n", nl=False)
        last = est
    click.echo(f"PPL = {last.ppl:.4f} +/- {last.error:.4f} ({last.tokens} tokens scored)")


if __name__ == "__main__":
    main()
