"""The `qpack` command line. Each subcommand is a thin layer over a module that does the work;
errors are caught here once and printed as one line (`--debug` shows the traceback)."""

from __future__ import annotations

import sys

import click

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
    qpack inspect model.gguf      show what is inside a GGUF or a built executable
    """

