"""`fdngx drain NAME`: planned maintenance of one replica. Sets `"drain": true` on it in the inventory (under
the inventory lock, atomically); `--undo` clears it. The core is fdngx.inventory.set_drain; what nginx does
with it (`down`, or left out of the Lua balancer's snapshot) is the next render's or sidecar cycle's job."""

from __future__ import annotations

import functools
from pathlib import Path

import typer

from fdngx.commands.helptext import examples
from fdngx.commands.options import InventoryOpt, inventory_paths
from fdngx.errors import UsageError, check_number
from fdngx.inventory import DrainResult, load, set_drain
from fdngx.nginx import served as served_mod
from fdngx.nginx.served import Kind
from fdngx.weights.idle import wait_idle
from fdngx.weights.store import StateStore, store_for

EPILOG = (
    examples(
        ("dp3 gets no new requests; those in flight finish", "fdngx drain dp3 -i /etc/fdngx/fdngx.json"),
        ("and wait until nothing runs there",
         "fdngx drain dp3 -i /etc/fdngx/fdngx.json --wait 600 \n--out /etc/nginx/fdngx/upstream.conf"),
        ("back in rotation", "fdngx drain dp3 -i /etc/fdngx/fdngx.json --undo"),
    ) +
    "A drained replica gets no new requests; those in flight on it finish (nginx: `down` in the upstream, so the "
    "old workers' streams end normally through the graceful reload; OpenResty: left out of the balancer's peers) "
    "once the next sidecar cycle, or without a sidecar `fdngx render --reload` (with --scrape where a cron job "
    "keeps the weights), applies it. It is still scraped: `fdngx status --out FILE` shows it as draining "
    "(WEIGHT) once nginx holds it out, with RUN and QUEUE = what is still there (until then the reason says "
    "\"drain not applied yet\": nginx still sends it new requests); stop or restart it once its reason says "
    "\"nothing in flight: safe to stop\", then `fdngx drain NAME --undo`. The flag survives `fdngx launch` "
    "rewriting the inventory and the registry's heartbeats.\n\n"
    "With --wait SECONDS the command then watches the replica (its metrics, as the sidecar reads them) until "
    "nothing is in flight on it, saying how many requests are left every 5 s: a script can stop the replica as "
    "soon as it returns 0. It returns at once when nothing listens there any more. Give it --out, the file nginx "
    "reads (the one your sidecar, cron job or render writes): quiet moments then count only once nginx holds the "
    "replica out: its server line there is `down` (nginx flavor), or the policy state beside it says so "
    "(OpenResty: the sidecar pushes it). Without --out a quiet moment between two requests could pass for the "
    "end before the drain is applied.\n\n"
    "Exit codes: 0 done (or already so; with --wait: and nothing in flight), 1 error (unknown name, the last "
    "replica in rotation, bad inventory; with --wait: still busy when the time ran out, the drain stays), 2 "
    "usage."
)

MAX_WAIT = 86400.0  # --wait: a day; a stream that runs longer is not one a drain should wait for

_NEXT = ("A running sidecar applies this within its --debounce seconds; without one, run `fdngx render "
         "--reload` with your usual options (with --scrape where a cron job keeps the weights).")


def message(r: DrainResult) -> str:
    """What happened and what happens next, for people."""
    if r.drain and r.changed:
        return (f"{r.name}: drained in {r.path}: it gets no new requests; those in flight finish.\n{_NEXT}\n"
                f"Until then nginx still sends it new requests: `fdngx status --out FILE` (the file your sidecar or "
                f"cron job writes) shows {r.name} as draining once nginx holds it out, with what still runs there; "
                f"stop it once its reason says \"nothing in flight: safe to stop\" (or let `fdngx drain {r.name} "
                f"--wait SECONDS "
                f"--out FILE` tell you); `fdngx drain {r.name} --undo` puts it back.")
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
    wait: float = typer.Option(
        0.0, "--wait", metavar="SECONDS",
        help="Then wait up to SECONDS (at most 86400, a day) until nothing is in flight on it (exit 1 if something "
        "still is)."),
    out: Path | None = typer.Option(
        None, "--out", "-o", help="--wait: the config file nginx reads (the sidecar, cron job or render writes "
        "it): its server line (nginx flavor), or the policy state beside it (OpenResty), says when nginx holds the "
        "replica out, and only then does a quiet moment count."),
    state: Path | None = typer.Option(None, help="--wait: the policy state file to read (overrides --out's)."),
) -> None:
    """Take one replica out for maintenance: no new requests, those in flight finish (--undo: back in)."""
    check_number("--wait", wait, 0.0, MAX_WAIT)  # before the inventory is written
    if undo and wait:
        raise UsageError("--wait waits for a drained replica to finish its requests; it does not go with --undo")
    if (out or state) and not wait:
        raise UsageError("--out and --state tell --wait where the policy state is; they go with --wait")
    result = set_drain(inventory_paths(inventory), name, not undo)
    typer.echo(message(result))
    if wait:
        store = store_for(out or Path("."), state) if (out or state) else None
        applied = None
        if store is not None:
            applied = functools.partial(not_held_out, out if state is None else None, store, result.name,
                                        load(result.path).upstream)
        wait_idle(result.instance, wait, lambda line: typer.echo(f"fdngx: {line}"), applied=applied)


def not_held_out(out: Path | None, store: StateStore, name: str, upstream: str) -> str | None:
    """None once nginx holds `name` out for its drain, else what says it does not. The config file at `out`
    when it gives nginx weights (nginx flavor: its server line is `down`, or gone; a plain `render --reload`
    applies a drain too and records no policy state), else the policy state (OpenResty: the drain is pushed;
    what fdngx applied, not only decided)."""
    if out is not None:
        served = served_mod.read(out, upstream)
        if served.kind is Kind.WEIGHTS:
            line = served.servers.get(name)
            return None if line is None or line.down else f"{served.path} does not hold it out"
    held = store.load().instances.get(name)
    return None if held is not None and held.drained and held.down else "the policy state does not hold it out"


def register(app: typer.Typer) -> None:
    app.command("drain", epilog=EPILOG,
                short_help="Take one replica out for maintenance (--undo: back in).")(drain_cmd)
