"""`fdngx drain NAME`: planned maintenance of one replica. Sets `"drain": true` on it in the inventory (under
the inventory lock, atomically); `--undo` clears it. The core is fdngx.inventory.set_drain; what nginx does
with it (`down`, or left out of the Lua balancer's snapshot) is the next render's or sidecar cycle's job."""

from __future__ import annotations

from pathlib import Path

import typer

from fdngx.commands.options import InventoryOpt, inventory_paths
from fdngx.inventory import DrainResult, set_drain

EPILOG = (
    "A drained replica gets no new requests; those in flight on it finish (nginx: `down` in the upstream, so "
    "the old workers' streams end normally through the graceful reload; OpenResty: left out of the balancer's "
    "peers). It is still scraped: `fdngx status` shows it as draining, with RUN = what still runs there; stop "
    "or restart it once that is 0, then `fdngx drain NAME --undo`. The flag survives `fdngx launch` rewriting "
    "the inventory and the registry's heartbeats.\n\n"
    "Exit codes: 0 done (or already so), 1 error (unknown name, the last replica in rotation, bad inventory), "
    "2 usage."
)

_NEXT = ("A running sidecar applies this within its --debounce seconds; without one, run `fdngx render "
         "--reload` with your usual options.")


def message(r: DrainResult) -> str:
    """What happened and what happens next, for people."""
    if r.drain and r.changed:
        return (f"{r.name}: drained in {r.path}: it gets no new requests; those in flight finish.\n{_NEXT}\n"
                f"`fdngx status` shows {r.name} as draining with what still runs there: stop it once RUN is 0; "
                f"`fdngx drain {r.name} --undo` puts it back.")
    if r.drain:
        return (f"{r.name}: already drained in {r.path}: nothing changed. `fdngx status` shows what still runs "
                f"there; `fdngx drain {r.name} --undo` puts it back.")
    if r.changed:
        return f"{r.name}: back in rotation in {r.path} (drain cleared): it takes new requests again.\n{_NEXT}"
    return f"{r.name}: not drained in {r.path}: nothing changed."


def drain_cmd(
    name: str = typer.Argument(..., help="The instance's name in the inventory (`fdngx status` lists them)."),
    inventory: list[Path] | None = InventoryOpt,
    undo: bool = typer.Option(False, "--undo", help="Clear the drain: the instance takes new requests again."),
) -> None:
    """Take one replica out for maintenance: no new requests, those in flight finish (--undo: back in)."""
    typer.echo(message(set_drain(inventory_paths(inventory), name, not undo)))


def register(app: typer.Typer) -> None:
    app.command("drain", epilog=EPILOG)(drain_cmd)
