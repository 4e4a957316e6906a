"""The `qpack` command line. Each subcommand is a thin layer over a module that does the work;
errors are caught here once and printed as one line (`--debug` shows the traceback)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import click
from qpack.runtime import cpu as qpack_cpu
from qpack.runtime import main as runtime_main
from qpack.runtime.errors import QpackError
from qpack.runtime.terminal import printable
from qpack.runtime.version import __version__


class QpackGroup(click.Group):
    """Turns every QpackError (and Ctrl-C) into one clear line and exit code 1."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except QpackError as e:
            if ctx.params.get("debug"):
                raise
            click.echo(f"qpack: error: {printable(str(e))}", err=True)
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
    "--quant",
    "quant",
    help="Quantize an F32/F16/BF16 MODEL to this type first (e.g. Q4_K_M; see `qpack quantize`).",
)
@click.option(
    "--split",
    is_flag=True,
    help="Write the model beside the executable as NAME.gguf (found there at run time): for "
    "models over Windows' 4 GiB limit, or to update the runtime without re-copying the weights.",
)
def build(model, output, name, default_args, target, stub_path, rebuild_stub, quant, split) -> None:  # fmt: skip
    """Write one executable holding the runtime and MODEL (a .gguf, or a .zip holding one;
    default: SmolLM2-135M-Instruct)."""
    import shlex

    from qpack.builder import models, pack, stub
    from qpack.builder.digests import DigestCache

    model = model or models.default_model_path()
    if quant:
        model = _quantize_for_build(model, quant)
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


def _quantize_for_build(model: Path, quant: str) -> Path:
    """The quantized model `build --quant` packs: quantized once into the cache directory,
    reused while the input file is unchanged."""
    import hashlib

    from qpack.builder import stub

    st = model.stat()
    key = f"{model.resolve()}|{st.st_size}|{st.st_mtime_ns}|{quant.upper()}"
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    out = stub.cache_dir() / "quantized" / f"{model.stem}.{quant.upper()}.{digest}.gguf"
    if not out.exists():
        out.parent.mkdir(parents=True, exist_ok=True)
        _run_quantize(model, out, quant)
    name = model.stem
    for suffix in ("-f16", ".f16", "-F16", ".F16", "-f32", ".F32", "-bf16", ".BF16"):
        name = name.removesuffix(suffix)
    final = out.with_name(f"{name}.{quant.upper()}.gguf")
    if final.exists() or final.is_symlink():
        final.unlink()
    os.link(out, final)  # the executable's default name comes from the file name
    return final


def _run_quantize(
    src: Path,
    dst: Path,
    ftype: str,
    imatrix: dict | None = None,
    allow_requantize: bool = False,
    threads: int | None = None,
):
    """Quantize with a progress bar on stderr and a one-line summary."""
    from qpack.builder.quantize import quantize_file, tensor_work_bytes

    total = tensor_work_bytes(src, ftype)
    with click.progressbar(length=total, label=f"quantizing to {ftype.upper()}", file=sys.stderr) as bar:  # fmt: skip
        report = quantize_file(
            src,
            dst,
            ftype,
            imatrix=imatrix,
            allow_requantize=allow_requantize,
            threads=threads,
            progress=bar.update,
            warn=lambda text: click.echo(f"qpack: warning: {text}", err=True),
        )
    mix = ", ".join(f"{t} x{n}" for t, n in sorted(report.types.items()))
    click.echo(
        f"wrote {report.output} ({report.size_out / 2**20:.1f} MiB, was "
        f"{report.size_in / 2**20:.1f} MiB) as {report.ftype}: {mix}; "
        f"{report.n_fallback} tensors used a fallback type; {report.seconds:.1f} s",
        err=True,
    )
    return report


@main.command("quantize")
@click.argument("src", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.argument("dst", type=click.Path(dir_okay=False, path_type=Path))
@click.argument("ftype")
@click.option(
    "--imatrix",
    "imatrix_file",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="Importance matrix from `qpack imatrix` (or llama-imatrix's GGUF).",
)
@click.option(
    "--allow-requantize", is_flag=True, help="Accept an already quantized input (worse quality)."
)
@click.option("-t", "--threads", type=click.IntRange(min=1), help="Threads (default: all cores).")
def quantize_command(src, dst, ftype, imatrix_file, allow_requantize, threads) -> None:
    """Quantize SRC (an F32/F16/BF16 GGUF) into DST as FTYPE, with llama.cpp's per-tensor
    mixes: Q4_0 Q4_1 Q5_0 Q5_1 Q8_0 Q2_K Q3_K_S Q3_K_M Q3_K_L Q4_K_S Q4_K_M Q5_K_S Q5_K_M Q6_K
    IQ4_NL IQ4_XS IQ3_S IQ3_M, and with --imatrix also IQ1_S IQ1_M IQ2_XXS IQ2_XS IQ2_S IQ2_M
    IQ3_XXS IQ3_XS."""
    imatrix = None
    if imatrix_file:
        from qpack.builder.imatrix import read_imatrix

        imatrix = read_imatrix(imatrix_file)
    if src.resolve() == dst.resolve():
        raise QpackError(f"{dst}: the output would overwrite the input")
    _run_quantize(src, dst, ftype, imatrix, allow_requantize, threads)


def text_file_option(help: str):
    """-f/--file TEXT: the UTF-8 text that imatrix, advise and perplexity read."""
    return click.option(
        "-f",
        "--file",
        "text_file",
        required=True,
        type=click.Path(exists=True, dir_okay=False, path_type=Path),
        help=help,
    )


@main.command("imatrix")
@click.argument("model", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@text_file_option("Calibration text (UTF-8).")
@click.option(
    "-o",
    "--output",
    type=click.Path(dir_okay=False, path_type=Path),
    default=Path("imatrix.gguf"),
    show_default=True,
)
@click.option("-c", "--ctx-size", default=512, show_default=True, type=click.IntRange(min=8),
              help="Tokens per chunk.")  # fmt: skip
@click.option("--chunks", type=click.IntRange(min=1), help="Use at most this many chunks.")
@click.option("--cpu", "cpu_choice", default="auto", show_default=True, help="Kernel variant.")
def imatrix_command(model, text_file, output, ctx_size, chunks, cpu_choice) -> None:
    """Importance matrix of MODEL on a text, in llama-imatrix's GGUF format: for each layer
    matrix, the sum of squared input activations per column and the token count."""
    from qpack.builder.imatrix import compute_imatrix, write_imatrix
    from qpack.runtime.tokenizer import Tokenizer

    kernels = qpack_cpu.load(cpu_choice)
    gf = _open_model(model)
    tok = Tokenizer.from_gguf(gf)
    tokens = tok.encode(_read_text(text_file), add_bos=False)
    n = len(tokens) // ctx_size
    if chunks:
        n = min(n, chunks)
        tokens = tokens[: n * ctx_size]
    bos = tok.bos_id if tok.add_bos else None
    with click.progressbar(length=n, label=f"{n} chunks of {ctx_size}", file=sys.stderr) as bar:
        sums, counts, n_chunks = compute_imatrix(
            model, tokens, ctx_size, bos, kernels.dequantize, bar.update
        )
    write_imatrix(output, sums, counts, n_chunks, ctx_size, [text_file.name])
    click.echo(f"wrote {output}: {len(sums)} matrices, {n_chunks} chunks of {ctx_size}", err=True)


@main.command("advise")
@click.argument("model", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@text_file_option(
    "Text for perplexity and KL divergence (UTF-8; a few thousand tokens are enough)."
)
@click.option("--ram", default=None, help="RAM budget, e.g. 8G (default: this machine's RAM).")
@click.option("--ctx", default=4096, show_default=True, type=click.IntRange(min=8),
              help="Context size the RAM figure is for.")  # fmt: skip
@click.option(
    "--types",
    help="Candidate types, comma-separated (default: Q8_0,Q6_K,Q5_K_M,Q4_K_M,Q4_K_S,IQ4_XS,"
    "Q4_0,Q3_K_M,Q2_K).",
)
@click.option("--plot", type=click.Path(dir_okay=False, path_type=Path),
              help="Also draw KL divergence against size and decode speed into this PNG.")  # fmt: skip
@click.option(
    "--imatrix",
    "imatrix_file",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="Importance matrix: quantize with it, and add the IQ1/IQ2/IQ3 types to the candidates.",
)
@click.option(
    "--iq", is_flag=True, help="Add the IQ types, with an importance matrix computed on the text."
)
@click.option("-t", "--threads", type=click.IntRange(min=1), help="Threads (default: physical cores).")  # fmt: skip
@click.option("--cpu", "cpu_choice", default="auto", show_default=True, help="Kernel variant.")
def advise_command(
    model, text_file, ram, ctx, types, plot, imatrix_file, iq, threads, cpu_choice
) -> None:
    """Quantize MODEL (F16/BF16/F32) to candidate types, measure each here -- file size, RAM
    at --ctx, prefill and decode speed, perplexity and KL divergence against MODEL -- and
    recommend the most faithful one that fits the RAM budget. Results are cached."""
    from qpack.builder import advise, stub

    kernels = qpack_cpu.load(cpu_choice)
    budget = advise.parse_size(ram) if ram else advise.physical_ram()
    text = _read_text(text_file)
    if iq and not imatrix_file:
        click.echo("  computing an importance matrix on the text", err=True)
        imatrix_file = advise.imatrix_from_text(model, text, stub.cache_dir(), kernels)
    candidates = advise.CANDIDATES + (advise.IQ_CANDIDATES if imatrix_file else ())
    results = advise.advise(
        model,
        text,
        stub.cache_dir(),
        types=tuple(t.strip() for t in types.split(",") if t.strip()) if types else candidates,
        ctx=ctx,
        threads=threads,
        kernels=kernels,
        note=lambda s: click.echo(f"  {s}", err=True),
        imatrix=imatrix_file,
    )
    click.echo(advise.format_table(results, budget, ctx))
    if plot:
        from qpack.builder.plot import plot_advice

        how = plot_advice(results, plot, advise.recommend(results, budget))
        click.echo(f"wrote {plot} ({how})", err=True)


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise QpackError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None


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
@text_file_option("Text to score (UTF-8).")
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
@click.option(
    "--kl-divergence",
    "kld_base",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="Also compare MODEL's distributions with this base model's (e.g. the F16): KL "
    "divergence, Δp and top-token agreement, as llama-perplexity --kl-divergence reports them.",
)
@runtime_main.cache_type_options
def perplexity_command(
    model, text_file, ctx_size, threads, cpu_choice, kld_base, cache_type_k, cache_type_v
) -> None:
    """Perplexity of MODEL on a text, as llama-perplexity computes it: how much did
    quantization cost? Prints running estimates, then PPL ± its standard error."""
    from qpack.runtime.model import Model
    from qpack.runtime.perplexity import perplexity, scoring_stream
    from qpack.runtime.tokenizer import Tokenizer

    gf = _open_model(model)
    kernels = qpack_cpu.load(cpu_choice)
    m = Model(gf, n_ctx=ctx_size, n_batch=ctx_size, threads=threads, kernels=kernels,
              cache_type_k=cache_type_k, cache_type_v=cache_type_v)  # fmt: skip
    tok = Tokenizer.from_gguf(gf)
    try:
        text = text_file.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise QpackError(f"{text_file}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    tokens, bos = scoring_stream(tok, text)
    n_windows = len(tokens) // ctx_size
    click.echo(f"{len(tokens)} tokens, {n_windows} windows of {ctx_size}", err=True)
    last = None
    for est in perplexity(m, tokens, ctx_size, bos):
        click.echo(f"[{est.windows}]{est.ppl:.4f}", nl=False)
        click.echo("," if est.windows < n_windows else "\n", nl=False)
        last = est
    click.echo(f"PPL = {last.ppl:.4f} +/- {last.error:.4f} ({last.tokens} tokens scored)")
    if kld_base is not None:
        from qpack.runtime.kl_divergence import format_summary, kl_divergence

        base = Model(
            _open_model(kld_base), n_ctx=ctx_size, n_batch=ctx_size, threads=threads,
            kernels=kernels,
        )  # fmt: skip
        n_windows = len(tokens) // ctx_size
        with click.progressbar(length=n_windows, label="KL divergence", file=sys.stderr) as bar:
            for stats in kl_divergence(m, base, tokens, ctx_size, bos):
                bar.update(1)
                final = stats
        click.echo(format_summary(final.summary()))


if __name__ == "__main__":
    main()
