"""The `fdngx` command line. It only wires: parse options, call one core function, print its result.

Errors: core functions raise FdngxError; `main()` prints its one-line message and exits 1 (2 for usage).
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import typer

from fdngx.errors import FdngxError

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

log = logging.getLogger("fdngx")

DEFAULT_INVENTORY = Path("fdngx.json")
InventoryOpt = typer.Option(
    None,
    "--inventory",
    "-i",
    help="Inventory file (repeat to merge several, e.g. one per node). Default: ./fdngx.json.",
)


def inventory_paths(paths: list[Path] | None) -> list[Path]:
    return list(paths) if paths else [DEFAULT_INVENTORY]


def setup_logging(verbose: bool = False) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s fdngx %(levelname)s %(message)s",
        datefmt="%Y-%m-%dT%H:%M:%S",
        stream=sys.stderr,
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


# -- commands: each module registers its own on `app`; one import line per command module -----------
from fdngx.commands import demo as _demo  # noqa: E402,F401
from fdngx.commands import launch as _launch  # noqa: E402,F401
from fdngx.commands import render as _render  # noqa: E402,F401
from fdngx.commands import sidecar as _sidecar  # noqa: E402,F401
from fdngx.commands import sim as _sim  # noqa: E402,F401
from fdngx.commands import status as _status  # noqa: E402,F401


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
    # `python -m fdngx.cli`: go through the real module so the command imports register on its app.
    from fdngx.cli import main as _main

    _main()
