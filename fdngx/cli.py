"""The `fdngx` command line. It only wires: each module in fdngx.commands parses its options, calls one
core function and prints its result; this module registers them on one typer app.

Errors: core functions raise FdngxError; `main()` prints its one-line message and exits 1 (2 for usage).
Nothing imports this module back.
"""

from __future__ import annotations

import sys

import typer

from fdngx.commands import demo, launch, render, sidecar, sim, status
from fdngx.errors import FdngxError
from fdngx.logs import setup_logging

app = typer.Typer(
    name="fdngx",
    help=(
        "nginx in front of data-parallel LLM servers (FastDeploy, vLLM, SGLang), weighted by real load.\n\n"
        "Typical use: `fdngx launch` (start replicas, write fdngx.json), then `fdngx render` (write and "
        "safely apply the nginx upstream), then `fdngx sidecar` or a cron line to keep weights current."
    ),
    no_args_is_help=True,
    add_completion=False,
    context_settings={"help_option_names": ["-h", "--help"]},
    pretty_exceptions_enable=False,
)


def _print_version(value: bool) -> None:
    if value:
        from fdngx import __version__

        typer.echo(f"fdngx {__version__}")
        raise typer.Exit(0)


@app.callback()
def _root(
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Debug logging on stderr."),
    version: bool = typer.Option(
        False, "--version", help="Print the version and exit.", is_eager=True, callback=_print_version
    ),
) -> None:
    setup_logging(verbose)


for _module in (launch, render, sidecar, status, sim, demo):
    _module.register(app)


def main() -> None:
    # standalone mode: typer/click print usage errors and exit 2 themselves; our errors surface here.
    try:
        app()
    except FdngxError as exc:
        typer.secho(f"fdngx: error: {exc}", err=True, fg=typer.colors.RED)
        sys.exit(exc.exit_code)
    except OSError as exc:
        # A file or socket the user pointed us at: one line naming it, not a traceback.
        where = f"{exc.filename}: " if exc.filename else ""
        typer.secho(f"fdngx: error: {where}{exc.strerror or exc}", err=True, fg=typer.colors.RED)
        sys.exit(1)


if __name__ == "__main__":
    main()
