"""The executable's command line: serve the model (default), `-p` one prompt, `--chat`.

The model is the one embedded in the executable (a zip member mapped in place, see
embedded.py) or, with `-m FILE.gguf`, any GGUF file. `.args` inside the executable supplies
default arguments; the command line is merged in after them, so it wins (`run` below).
"""

from __future__ import annotations

import os
import platform
import sys

import click

from . import cpu, embedded
from .errors import EmbeddedModelError, QpackError
from .kv_cache import CACHE_TYPES
from .terminal import printable
from .transport import Limits
from .version import __version__

PROG = "qpack"


# --- options shared by the executable and `qpack run` / `qpack serve` ------------------------


def load_options(f):
    """How the model is loaded: context, threads, kernel variant."""
    for opt in reversed(
        [
            click.option(
                "-c",
                "--ctx-size",
                type=click.IntRange(min=8),
                help="Context size in tokens (default: the model's, at most 4096).",
            ),
            click.option(
                "-t",
                "--threads",
                type=click.IntRange(min=1),
                help="Threads (default: physical cores).",
            ),
            click.option(
                "--cpu",
                "cpu_choice",
                default="auto",
                show_default=True,
                help="Kernel variant: auto, generic (baseline), avx2, avx512 (x86-64); dotprod (arm64).",
            ),
            click.option(
                "--verbose", is_flag=True, help="Report the kernel variant and memory at load."
            ),
        ]
    ):
        f = opt(f)
    return cache_type_options(f)


def cache_type_options(f):
    """--cache-type-k / --cache-type-v: the KV cache's element types."""
    for part, name in (("v", "values"), ("k", "keys")):
        f = click.option(
            f"--cache-type-{part}",
            type=click.Choice(list(CACHE_TYPES)),
            default="f16",
            show_default=True,
            help=f"KV cache type of the {name}: q8_0 takes 53 % of f16's memory (head sizes a "
            "multiple of 32).",
        )(f)
    return f


def sampling_options(f):
    """How tokens are chosen (the server takes the same per request)."""
    for opt in reversed(
        [
            click.option(
                "-n",
                "--max-tokens",
                "max_tokens",
                default=-1,
                show_default=True,
                help="Tokens to generate (-1: until the end or the context is full).",
            ),
            click.option(
                "--temp",
                default=0.8,
                show_default=True,
                type=click.FloatRange(min=0),
                help="Sampling temperature (0: greedy).",
            ),
            click.option(
                "--top-k",
                default=40,
                show_default=True,
                type=click.IntRange(min=0),
                help="Top-k (0: off).",
            ),
            click.option(
                "--top-p",
                default=0.95,
                show_default=True,
                type=click.FloatRange(0, 1),
                help="Top-p (1: off).",
            ),
            click.option(
                "--min-p",
                default=0.05,
                show_default=True,
                type=click.FloatRange(0, 1),
                help="Min-p (0: off).",
            ),
            click.option(
                "--repeat-penalty",
                default=1.0,
                show_default=True,
                type=click.FloatRange(min=0),
                help="Penalty for repeating the last 64 tokens (1: off).",
            ),
            click.option("--seed", type=int, help="Random seed (same seed, same output)."),
            click.option(
                "--stop", multiple=True, help="Stop at this text (repeatable); it is not printed."
            ),
            click.option("--system", help="System message for --chat."),
        ]
    ):
        f = opt(f)
    return f


def server_options(f):
    """Where and how the server listens (the executable's default mode, and `qpack serve`)."""
    for opt in reversed(
        [
            click.option(
                "--host", default="127.0.0.1", show_default=True, help="Address the server binds."
            ),
            click.option(
                "--port",
                default=8080,
                show_default=True,
                type=click.IntRange(0, 65535),
                help="Port the server listens on (0: any free port).",
            ),
            click.option(
                "--api-key",
                envvar="QPACK_API_KEY",
                help="Require this key (Authorization: Bearer KEY or X-Api-Key); /health stays public.",
            ),
            click.option(
                "--no-api-key",
                is_flag=True,
                help="Serve a non-loopback --host without an API key, on purpose (refused otherwise).",
            ),
            click.option(
                "--parallel",
                "-np",
                default=4,
                show_default=True,
                type=click.IntRange(1, 64),
                help="Requests decoded together (each gets a context of --ctx-size).",
            ),
            click.option(
                "--cors-origin", help="Allow browser pages from this origin (or *) to call the API."
            ),
            click.option(
                "--max-body",
                default=1 << 20,
                show_default=True,
                type=click.IntRange(min=1024),
                help="Largest request body in bytes.",
            ),
            click.option(
                "--max-connections",
                default=Limits.max_connections,
                show_default=True,
                type=click.IntRange(min=8),
                help="Open client connections at most; beyond, a new one gets 503.",
            ),
            click.option(
                "--nobrowser", is_flag=True, help="Do not open the chat page in a browser."
            ),
            click.option(
                "--reasoning-format",
                default="auto",
                show_default=True,
                type=click.Choice(["auto", "deepseek", "none"]),
                help="A thinking model's <think> block: split into reasoning_content (auto, "
                "deepseek) or left in the content (none); requests may say otherwise.",
            ),
            click.option(
                "--thinking/--no-thinking",
                default=None,
                help="The chat template's enable_thinking for requests that do not set it "
                "(default: the template's own).",
            ),
        ]
    ):
        f = opt(f)
    return f


def sampling_params(kw: dict):
    from .sampler import SamplingParams

    return SamplingParams(
        temperature=kw["temp"],
        top_k=kw["top_k"],
        top_p=kw["top_p"],
        min_p=kw["min_p"],
        repeat_penalty=kw["repeat_penalty"],
        seed=kw["seed"],
        stop=list(kw["stop"]),
        max_tokens=None if kw["max_tokens"] < 0 else kw["max_tokens"],
    )


def run_model(gguf, kw: dict) -> None:
    """-p, --chat or serve, for the executable and for `qpack run`."""
    from . import session

    if kw.get("prompt") is not None or kw.get("chat"):
        loaded = session.load(
            gguf,
            kw["ctx_size"],
            kw["threads"],
            kw["cpu_choice"],
            verbose=kw["verbose"],
            cache_types=(kw["cache_type_k"], kw["cache_type_v"]),
        )
        params = sampling_params(kw)
        if kw.get("prompt") is not None:
            session.run_prompt(loaded, kw["prompt"], params)
        else:
            session.run_chat(loaded, params, kw.get("system"))
    else:
        serve(gguf, kw)


def serve(gguf, kw: dict) -> None:
    """Default: the OpenAI-compatible server and chat page on host:port. The sampling options
    become the defaults of requests that leave those fields out."""
    from . import server
    from .chat_request import ReasoningDefaults
    from .openai_api import ServerDefaults

    defaults = ServerDefaults(
        sampling=sampling_params(kw),
        system=kw.get("system"),
        reasoning=ReasoningDefaults(kw["reasoning_format"], kw["thinking"]),
    )
    options = server.ServerOptions(
        host=kw["host"],
        port=kw["port"],
        api_key=kw["api_key"] or None,
        no_api_key=kw["no_api_key"],
        cors_origin=kw["cors_origin"],
        max_body=kw["max_body"],
        limits=Limits(max_connections=kw["max_connections"]),
        parallel=kw["parallel"],
        ctx_size=kw["ctx_size"],
        threads=kw["threads"],
        cpu_choice=kw["cpu_choice"],
        cache_types=(kw["cache_type_k"], kw["cache_type_v"]),
        open_browser=not kw["nobrowser"],
        verbose=kw["verbose"],
        defaults=defaults,
    )
    server.run(gguf, options)


# --- the model -------------------------------------------------------------------------------


class ModelLocation:
    """Where the model comes from: `-m FILE`, or the executable's own member (looked up once;
    a broken member is reported only when the embedded model is actually needed)."""

    def __init__(self, model_path: str | None):
        self.model_path = model_path
        self._embedded: embedded.EmbeddedModel | None = None
        self._error: QpackError | None = None
        if model_path is None:
            try:
                self._embedded = embedded.own_model()
            except QpackError as e:
                self._error = e

    def embedded(self) -> embedded.EmbeddedModel:
        if self._error is not None:
            raise self._error
        if self._embedded is None:
            raise QpackError(
                "no model: this is the plain runtime (no model embedded in "
                f"{sys.executable}); pass -m FILE.gguf"
            )
        return self._embedded

    def open(self):
        """The GGUFFile, mapped in place."""
        from .gguf import open_gguf

        if self.model_path is not None:
            return open_gguf(self.model_path)
        member = self.embedded()
        return open_gguf(member.path, member.offset, member.length)


def describe_cpu(choice: str) -> str:
    module = cpu.load(choice)
    name = module.__name__.rsplit("_native_", 1)[-1]
    return f"kernels {name} (this CPU runs: {', '.join(cpu.supported_variants())})"


def print_info(location: ModelLocation) -> None:
    import json

    if location.model_path is not None:
        raise QpackError("--info describes the embedded model; for a GGUF file use `qpack inspect`")
    member = location.embedded()
    manifest = member.manifest()
    click.echo(json.dumps(manifest, indent=2, sort_keys=True))
    click.echo(
        f"# {embedded.MODEL_MEMBER}: {member.length} bytes at offset {member.offset} "
        f"of {member.path}; default arguments: {member.args() or 'none'}"
    )


def verify_model(location: ModelLocation) -> None:
    if location.model_path is not None:
        raise QpackError("--verify checks the embedded model; it does not apply with -m")
    member = location.embedded()
    with click.progressbar(
        length=member.length, label="verifying", file=sys.stderr, show_pos=False
    ) as bar:
        report = embedded.verify(member, bar.update)
    click.echo(
        f"ok: {embedded.MODEL_MEMBER} {report.size} bytes, crc32 {report.crc32:08x}, "
        f"sha256 {report.sha256}"
    )


# --- the command -----------------------------------------------------------------------------


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "-m",
    "--model",
    "model_path",
    metavar="FILE.gguf",
    help="Run this GGUF file instead of the embedded model.",
)
@click.option("-p", "--prompt", help="Continue this text, print it and exit (no chat template).")
@click.option(
    "--chat", is_flag=True, help="Chat in the terminal, through the model's chat template."
)
@server_options
@load_options
@sampling_options
@click.option(
    "--verify",
    is_flag=True,
    help="Check the embedded model against its CRC-32 and SHA-256, then exit.",
)
@click.option(
    "--info", is_flag=True, help="Print the build manifest of the embedded model, then exit."
)
@click.option(
    "--version", is_flag=True, help="Print the version and the kernel variant in use, then exit."
)
@click.option("--debug", is_flag=True, help="Show the full traceback on errors.")
def cli(model_path, verify, info, version, debug, **kw) -> None:
    """Run a language model: the chat page and an OpenAI-compatible API (default), one
    prompt (-p) or a terminal chat (--chat)."""
    if version:
        click.echo(
            f"{PROG} {__version__} (Python {platform.python_version()}, {platform.machine()})"
        )
        click.echo(describe_cpu(kw["cpu_choice"]))
        return
    location = ModelLocation(model_path)
    if info:
        print_info(location)
        return
    if verify:
        verify_model(location)
        return
    cpu.load(kw["cpu_choice"])
    run_model(location.open(), kw)


def run(argv: list[str] | None = None) -> int:
    """Entry point of the executable and of `python -m qpack.runtime`: `.args` defaults, then
    the command line; every QpackError becomes one line on stderr and exit status 1."""
    argv = sys.argv[1:] if argv is None else list(argv)
    defaults: list[str] = []
    # `.args` belong to the embedded model: `-m other.gguf` on the command line drops them.
    if (
        "-m" not in argv
        and "--model" not in argv
        and not any(a.startswith("--model=") for a in argv)
    ):
        try:
            member = embedded.own_model()
            defaults = member.args() if member is not None else []
        except EmbeddedModelError:
            defaults = []  # reported when the model is needed (--version still works)
    args = embedded.merge_args(defaults, argv)
    debug = "--debug" in args or os.environ.get("QPACK_DEBUG") == "1"
    try:
        cli.main(args=args, prog_name=_prog_name(), standalone_mode=False)
    except QpackError as e:
        if debug:
            raise
        click.echo(f"{PROG}: error: {printable(str(e))}", err=True)
        return 1
    except click.exceptions.Abort:
        click.echo(f"{PROG}: interrupted", err=True)
        return 130
    except KeyboardInterrupt:
        click.echo(f"{PROG}: interrupted", err=True)
        return 130
    except click.ClickException as e:
        e.show()
        return e.exit_code
    except click.exceptions.Exit as e:
        return e.exit_code
    except Exception as e:  # a bug, or a broken build: still one line unless --debug
        if debug:
            raise
        click.echo(
            f"{PROG}: internal error: {type(e).__name__}: {e} (run with --debug for details)",
            err=True,
        )
        return 1
    return 0


def _prog_name() -> str:
    if getattr(sys, "frozen", False):
        return os.path.basename(sys.executable)
    return "python -m qpack.runtime"
