"""`fdngx status`: one scrape, one row per replica: health, load, current and proposed weight, why; with
--watch, a live view of the same with a short history of load and weight per replica."""

from __future__ import annotations

import contextlib
import json
import logging
import signal
import sys
import time
from pathlib import Path
from types import FrameType

import typer

from fdngx.commands import status_view as view
from fdngx.commands.helptext import examples
from fdngx.commands.options import InventoryOpt, NginxBinOpt, inventory_paths
from fdngx.errors import ApplyError, FdngxError, UsageError, check_number
from fdngx.logs import say
from fdngx.nginx.build import find_nginx
from fdngx.nginx.control import NginxControl
from fdngx.weights.settings import MAX_SECONDS
from fdngx.weights.store import StateStore, controller_store, store_for

MIN_INTERVAL = 0.2  # --watch --interval: the floor it always had (every frame scrapes every replica)
MAX_TIMEOUT = 600.0  # --timeout: per read; the scrape's deadline is 1.5 times it
MAX_HISTORY = 10_000  # --history: frames kept per replica (wider than any terminal)

EPILOG = (
    examples(
        ("WEIGHT: what that file gives nginx",
         "fdngx status -i /etc/fdngx/fdngx.json \n--out /etc/nginx/fdngx/upstream.conf"),
        ("live view, Ctrl-C to quit",
         "fdngx status -i /etc/fdngx/fdngx.json \n--out /etc/nginx/fdngx/upstream.conf --watch"),
        ("one JSON document", "fdngx status -i /etc/fdngx/node-a.json -i /etc/fdngx/node-b.json --json"),
    ) +
    "Current weight: with --out, what that config file gives nginx (its server lines: a plain `render` "
    "writes the inventory's static weights there, cron's `render --scrape` and the sidecar the policy's); the "
    "OpenResty flavor's file holds none (they are pushed to its balancer): then, as without --out, the policy "
    "state of a running sidecar or cron job (--out or --state), else the inventory's static weight. When the "
    "file's weights are not the ones the policy state says fdngx applied, when it is missing or not fdngx's, or "
    "when nginx (site/standalone: GET /fdngx/generation) does not serve it, a line above the table says so. "
    "Proposed: what the next cycle would apply, with the reason, under the "
    "policy settings that state was written with (defaults without one). WEIGHT: the current weight, NEXT: "
    "the proposed one (draining: held out by `fdngx drain`; RUN and QUEUE then show what is still there and the "
    "reason counts it, --watch: the reason only; until nginx holds it out the reason says \"drain not applied "
    "yet\"); backup:W: nginx's `backup` (it gets no new "
    "requests while another replica is in rotation); SHARE: the current weight's share of the replicas nginx "
    "sends new requests to; LOAD: requests "
    "per slot now (1.00 = every slot busy); UP: this scrape's /health. Read-only: "
    "the state file is not written. With --out/--state, a state no sidecar or cron run wrote in the last 2.5 "
    "minutes (or none at all) is said above the table: nothing is keeping the weights.\n\n"
    "--json: one document {fleet_load, fail_open, instances: [{name, healthy, up, drain, running, queued, kv_usage, "
    "load, current_weight, current_down, backup, share, proposed_weight, proposed_down, proposed_backup, changed, "
    "reason, ...}]} (healthy: this scrape's /health, the table's UP; up: not proposed_down, in rotation after this "
    "decision); with --out/--state also state_age_s (seconds since the state was written, null: never) "
    "and state_note (the warning above, null: fresh), weights_from (config, state or inventory: where WEIGHT "
    "comes from) and per replica state_weight, state_down, state_backup (the policy state's, null: none) and "
    "in_config (false: no server line in the file, null: not read); with --out config_notes: [lines said of the "
    "config file, as above]; plus launch_unwritten: [warning lines] when a "
    "detached `fdngx launch` beside an inventory (its pidfile, INVENTORY.pid) cannot write a file now (the "
    "inventory then shows an older state, or none), and launch_supervisor_gone: [{inventory, pidfile, "
    "legacy_pidfile, supervisor_pid, state, error, still_running, note}] when the supervisor that pidfile names "
    "(of any launch, foreground or detached) is not running any more (killed, a detached start that failed after "
    "its terminal closed, a reboot): nothing supervises the replicas and the inventory's status fields are "
    "stale; note says what to do. Both are also said on stderr (--watch: above each frame's table instead), "
    "the exit code unchanged; with --watch, one such document per line (plus ts).\n\n"
    "--watch: redraws every --interval on a terminal (Ctrl-C, SIGTERM or SIGHUP quits, exit 0); with load and "
    "weight history "
    "per replica (x: held out, dot: no metrics). Without --out/--state the view carries the policy's memory "
    "from frame to frame, so WEIGHT/NEXT show what a sidecar started now would do. Not a terminal: one "
    "frame after another (--count N: N frames, then exit 0).\n\n"
    "Exit codes: 0 shown, 1 error (e.g. bad inventory), 2 usage."
)


def status_cmd(
    inventory: list[Path] | None = InventoryOpt,
    as_json: bool = typer.Option(
        False, "--json", help="Print {fleet_load, fail_open, instances: [one object per replica]} instead of a "
        "table (--watch: one such document per line)."
    ),
    out: Path | None = typer.Option(
        None,
        "--out",
        "-o",
        help="The config file nginx reads (a sidecar/cron job writes it): its server lines give the current "
        "weights (nginx flavor), the policy state beside it the policy's memory. Without --out and --state: a "
        "controller's state beside the inventory, when there is one (controller mode has no --out).",
    ),
    state: Path | None = typer.Option(None, help="Policy state file to read (overrides --out's)."),
    timeout: float = typer.Option(1.0, help="Per-request read timeout in seconds for the scrape (0.05 to 600)."),
    watch: bool = typer.Option(
        False, "--watch", "-w", help="Live view: a new scrape every --interval, with load and weight history."
    ),
    interval: float = typer.Option(2.0, "--interval", "-n", help="--watch: seconds between frames (0.2 to 3600)."),
    count: int | None = typer.Option(
        None, "--count", help="--watch: stop after this many frames (default: until Ctrl-C). Implies --watch."
    ),
    history: int = typer.Option(
        30, "--history", help="--watch: frames of load and weight history to show (1 to 10000)."
    ),
    nginx_conf: Path | None = typer.Option(
        None, help="--out in upstream mode: the main nginx.conf of the nginx that includes it, whose pid file says "
        "whether it runs (default: nginx's own). site/standalone configs are asked over HTTP instead."
    ),
    nginx_bin: str | None = NginxBinOpt,
    pid_file: Path | None = typer.Option(
        None, "--pid-file", help="--out in upstream mode: that nginx master's pid file (default: the `pid` in its "
        "main nginx.conf, else the build's)."
    ),
) -> None:
    """Scrape every instance once and show health, load, current and proposed weight, and the reason."""
    check_number("--interval", interval, MIN_INTERVAL, MAX_SECONDS)
    check_number("--timeout", timeout, 0.05, MAX_TIMEOUT)
    check_number("--history", history, 1, MAX_HISTORY, "frames")
    if count is not None and count < 1:
        raise UsageError(f"--count {count}: want a whole number of frames, 1 or more")
    paths = inventory_paths(inventory)
    store = store_for(out or Path("."), state) if (out or state) else _controller_beside(paths[0])
    watching = watch or count is not None
    control = _nginx(nginx_bin, nginx_conf, pid_file) if out is not None else None
    source = view.Source(paths, store, timeout, remember=watching, out=out, control=control)
    try:
        if watching:
            _watch(source, as_json=as_json, interval=interval, count=count, size=history)
            return
        snap = source.take()
    except FdngxError:
        _warn(source.launch_lines)  # an inventory that could not be loaded: this may be why
        raise
    finally:
        source.close()
    _warn(snap.warnings)
    if as_json:
        typer.echo(json.dumps(snap.to_json(), indent=2))
        return
    console = view.console_for(sys.stdout)
    view.show(console, view.table(snap))
    if line := view.summary(snap):
        typer.echo(f"\n{line}")
    if snap.footer:
        typer.echo(snap.footer)


def _nginx(binary: str | None, conf: Path | None, pid_file: Path | None) -> NginxControl | None:
    """The nginx whose master status looks for (an upstream-mode --out); None: no nginx on this host (a
    controller's, a laptop's), nothing to ask. A --nginx-bin that names nothing is a usage error."""
    try:
        return NginxControl(find_nginx(binary), conf, pid_file=pid_file)
    except ApplyError:
        return None


def _controller_beside(inventory: Path) -> StateStore | None:
    """With neither --out nor --state: a controller's state beside the inventory (a controller has no --out),
    when there is one, so WEIGHT on a controller host is what it pushed, not the inventory's static weights."""
    store = controller_store(inventory)
    return store if store.path.is_file() else None


def _warn(lines: tuple[str, ...]) -> None:
    """The launch's word on files it cannot write and on its supervisor being gone (fdngx.launch.standing),
    a stale policy state (status_served.state_note) and what the config file at --out says against it
    (status_served.notes), on stderr: one line each."""
    for line in lines:
        say(f"fdngx: {line}", logging.WARNING)


def _watch(source: view.Source, *, as_json: bool, interval: float, count: int | None, size: int) -> None:
    """Frames until --count or Ctrl-C (exit 0 either way). A failure after the first frame (the inventory
    being rewritten, say) is shown and the watch goes on; on the first one it is the command's error."""
    console = view.console_for(sys.stdout)
    unicode = view.unicode_ok(console)
    live_view = console.is_terminal and not as_json
    hist = view.History(size)
    number = 0
    live = None
    # Ctrl-C ends a watch even when started with SIGINT ignored (a background job of a script, nohup); SIGTERM
    # (`timeout`, a session manager) and SIGHUP (the terminal closed) end it the same way, so the live view
    # stops and shows the cursor again.
    previous = {sig: signal.signal(sig, _interrupt) for sig in ENDS}
    try:
        while count is None or number < count:
            started = time.monotonic()
            try:
                snap = source.take()
            except FdngxError as exc:
                if number == 0:
                    raise
                say(f"fdngx: status: {exc}", logging.WARNING)
            else:
                number += 1
                hist.add(snap)
                if as_json:
                    typer.echo(view.json_line(snap))
                else:
                    hint = "Ctrl-C to quit" if live_view else ""
                    shown = view.frame(snap, hist, interval=interval, number=number, unicode=unicode, hint=hint,
                                       spark=view.spark_width(console, size))
                    if live_view:
                        if live is None:
                            from rich.live import Live

                            live = Live(shown, console=console, auto_refresh=False, transient=False)
                            live.start(refresh=True)
                        else:
                            live.update(shown, refresh=True)
                    else:
                        view.show(console, shown)
                        typer.echo()
                sys.stdout.flush()
            if count is not None and number >= count:
                break
            time.sleep(max(0.0, interval - (time.monotonic() - started)))
    except KeyboardInterrupt:
        pass  # Ctrl-C is how a watch ends: exit 0
    finally:
        if live is not None:
            with contextlib.suppress(OSError):  # SIGHUP: the terminal may be gone
                live.stop()
        for sig, handler in previous.items():
            if handler is not None:  # None: not set from Python, cannot be put back
                signal.signal(sig, handler)


ENDS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


def _interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


def register(app: typer.Typer) -> None:
    app.command("status", epilog=EPILOG,
                short_help="Scrape every replica once: health, load, weight and why.")(status_cmd)
