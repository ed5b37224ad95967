"""What `fdngx status` shows: one snapshot (scrape every replica once, ask the policy what it would do)
as rows, a rich table whose long reasons wrap, and, for `--watch`, frames with a short history of load
and weight per replica as sparklines.

Read-only: the policy state is read (from a sidecar's or cron's state file) and never written.
"""

from __future__ import annotations

import json
import time
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console, Group, RenderableType
from rich.table import Table
from rich.text import Text

from fdngx import inventory as inv_mod
from fdngx.commands import status_served as served_view
from fdngx.commands.status_served import fresh, state_note
from fdngx.domain import Inventory, LoadSample
from fdngx.launch import standing
from fdngx.nginx import served as served_mod
from fdngx.nginx.control import NginxControl
from fdngx.weights.policy import Decisions, decide
from fdngx.weights.scrape import make_client, scrape_all
from fdngx.weights.settings import config_of_state
from fdngx.weights.state import PolicyState
from fdngx.weights.store import StateStore

SPARK = "▁▂▃▄▅▆▇█"
SPARK_ASCII = "_-=+*#"
NO_DATA = {True: "·", False: "."}  # metrics unreadable this frame
DOWN = {True: "×", False: "x"}  # held out of nginx (weight history)
# A drained replica nginx does not hold out yet: no cycle applied the drain (debounce, a cron job not run
# yet, a failing apply). Said instead of the policy's "draining: ..." (which may say "safe to stop").
NOT_APPLIED = "drain not applied yet: nginx still sends new requests"


@dataclass(frozen=True)
class Snapshot:
    at: float
    rows: list[dict[str, Any]]
    fleet_load: float | None
    fail_open: str | None
    # What the detached launch beside an inventory cannot write now (launch_unwritten): one warning a file.
    launch_unwritten: tuple[str, ...] = ()
    # Launches whose supervisor is gone though its pidfile stays (fdngx.launch.standing): one warning each.
    launch_gone: tuple[standing.Gone, ...] = ()
    # With --out/--state: seconds since a sidecar or cron run last wrote the policy state (None: never), and
    # the warning when that says nothing keeps the weights now (state_note).
    state_age: float | None = None
    state_note: str | None = None
    has_state: bool = False  # --out or --state was given
    # With --out/--state: where WEIGHT comes from ("config": the file at --out, "state", "inventory"); with --out,
    # what is said of that file: missing, not fdngx's, weights that are not the policy state's, an nginx not
    # serving it (fdngx.commands.status_served).
    weights_from: str | None = None
    config_notes: tuple[str, ...] = ()
    footer: str | None = None  # under the one-shot table: where WEIGHT comes from
    has_config: bool = False  # --out was given

    def to_json(self) -> dict[str, Any]:
        """The `--json` document: {fleet_load, fail_open, instances: [one object per replica]}, with --out or
        --state also state_age_s (null: no state written yet), state_note (null: fresh) and weights_from, with
        --out also config_notes: [lines], and launch_unwritten: [warning lines] and launch_supervisor_gone: [one
        object a launch] when there are any."""
        doc: dict[str, Any] = {"fleet_load": self.fleet_load, "fail_open": self.fail_open, "instances": self.rows}
        if self.has_state:
            doc["state_age_s"] = None if self.state_age is None else round(self.state_age, 1)
            doc["state_note"] = self.state_note
            doc["weights_from"] = self.weights_from
        if self.has_config:
            doc["config_notes"] = list(self.config_notes)
        if self.launch_unwritten:
            doc["launch_unwritten"] = list(self.launch_unwritten)
        if self.launch_gone:
            doc["launch_supervisor_gone"] = [g.to_json() for g in self.launch_gone]
        return doc

    @property
    def warnings(self) -> tuple[str, ...]:
        """Lines shown above the table (and on stderr by a one-shot status)."""
        return self.launch_lines + ((self.state_note,) if self.state_note else ()) + self.config_notes

    @property
    def launch_lines(self) -> tuple[str, ...]:
        return self.launch_unwritten + tuple(g.line() for g in self.launch_gone)


def rows_of(
    inv: Inventory, samples: dict[str, LoadSample], decisions: Decisions, state: PolicyState,
    served: served_mod.Served | None = None, has_store: bool = False,
) -> list[dict[str, Any]]:
    """One object per replica. The current weight is what the config file at --out gives nginx (`served`,
    the nginx flavor), else the policy state's, else the inventory's (fdngx.commands.status_served)."""
    insts = {i.name: i for i in inv.instances}
    rows = []
    for d in decisions:
        s = samples.get(d.name)
        st = state.instances.get(d.name)
        inst = insts[d.name]
        ok = bool(s and s.ok)
        now = served_view.current(inst, st, served)
        current_down = now.down
        # Drained but not applied yet (debounce, cron not run yet, a failing apply): nginx still sends it new
        # requests, so a quiet moment now says nothing about when it may be stopped.
        reason = NOT_APPLIED if inst.drain and not current_down else d.reason
        capacity = (s.capacity if s and s.capacity else None) or float(inst.max_num_seqs)
        rows.append(
            {
                "name": d.name,
                "healthy": bool(s and s.healthy),
                "up": not d.down,
                # Drained for maintenance (`fdngx drain`): held out on purpose; RUN tells when it is empty.
                "drain": inst.drain,
                "running": s.running if s and ok else None,
                "queued": s.queued if s and ok else None,
                "queued_reliable": s.queued_reliable if s and ok else None,
                "kv_usage": s.kv_usage if s and ok else None,
                "capacity": s.capacity if s and ok else None,
                # requests per slot now (running + a reliable queue, over capacity): 1.0 = every slot busy
                "load": round(s.load / capacity, 3) if s and ok else None,
                "scrape_error": s.error if s else "not scraped",
                "health_error": s.health_error if s else None,
                "latency_ms": round(s.latency * 1000, 1) if s else None,
                "current_weight": now.weight,
                # No state: nginx has the inventory's static render, in which a drained replica is `down`.
                "current_down": current_down,
                # nginx's `backup`: it sends the replica nothing while another one is in rotation.
                "backup": now.backup,
                "proposed_weight": d.weight,
                "proposed_down": d.down,
                "proposed_backup": d.backup,
                "changed": d.changed,
                "reason": reason,
            }
        )
        if has_store:  # what the policy state says nginx got (null: nothing for this replica), and the file
            rows[-1].update({"state_weight": st.weight if st is not None else None,
                             "state_down": st.down if st is not None else None,
                             "state_backup": st.backup if st is not None else None, "in_config": now.in_config})
    _shares(rows)
    return rows


def _shares(rows: list[dict[str, Any]]) -> None:
    """nginx's split of new requests by weight now (least_conn then picks per request among them): over the
    replicas in rotation that are not `backup`; the backups only while no other one is in rotation."""
    live = [r for r in rows if not r["current_down"]]
    primary = [r for r in live if not r["backup"]] or live
    total = sum(r["current_weight"] for r in primary)
    sent = {r["name"] for r in primary}
    for r in rows:
        r["share"] = round(r["current_weight"] / total, 3) if total and r["name"] in sent else 0.0


class Source:
    """Snapshots of one fleet: the inventory re-read each time (it changes), the policy state from `store`
    (a running sidecar's view) or, without one and with `remember`, the policy's memory carried from one
    snapshot to the next (what a sidecar started now would do)."""

    def __init__(self, inventories: list[Path], store: StateStore | None, timeout: float, remember: bool = False,
                 out: Path | None = None, control: NginxControl | None = None):
        self.inventories = inventories
        self.control = control  # the nginx that includes an upstream-mode --out: whether it runs
        self.store = store
        self.out = out  # the config file nginx reads: its weights are the current ones (nginx flavor)
        self.timeout = timeout
        self.remember = remember
        self.memory = PolicyState()
        self.session = make_client()
        self.unwritten: tuple[str, ...] = ()
        self.gone: tuple[standing.Gone, ...] = ()

    @property
    def launch_lines(self) -> tuple[str, ...]:
        """The launch's warnings of the last take(), also when the inventory could not be loaded."""
        return self.unwritten + tuple(g.line() for g in self.gone)

    def take(self) -> Snapshot:
        # Read first: when the inventory cannot be loaded, this may be why (status_cmd says it then too).
        self.unwritten, self.gone = standing.notes(self.inventories)
        inv = inv_mod.load_many(self.inventories)
        pstate = self.store.load() if self.store is not None else self.memory
        samples = scrape_all(inv.instances, session=self.session, timeout=self.timeout,
                             deadline=max(1.5, self.timeout * 1.5))
        now = time.time()
        decisions, new_state = decide(samples, inv, pstate, config_of_state(pstate), now)
        if self.remember and self.store is None:
            self.memory = new_state
        served = served_mod.read(self.out, inv.upstream) if self.out is not None else None
        source = served_view.weights_from(served, pstate, self.store is not None)
        age = note = None
        interval = pstate.config.get("interval")
        interval = interval if isinstance(interval, int | float) else 0.0
        if self.store is not None:
            age = None if pstate.updated_at is None else max(0.0, now - pstate.updated_at)
            note = state_note(self.store.path, age, self.store.path.exists(), interval,
                              served.path if source == "config" and served is not None else None)
        nginx = None
        if served is not None and served.verify_url is not None:
            nginx = served_mod.served_generation(served.verify_url, self.timeout)
        said = served_view.notes(served, inv, pstate, self.store.path if self.store else None,
                                 age is not None and fresh(age, interval), nginx)
        if line := served_view.master_note(served, self.control):
            said = (*said, line)
        return Snapshot(now, rows_of(inv, samples, decisions, pstate, served, self.store is not None),
                        decisions.fleet_load, decisions.fail_open, self.unwritten, self.gone, age, note,
                        self.store is not None, source if self.store is not None else None, said,
                        served_view.footer(served, source), served is not None)

    def close(self) -> None:
        self.session.close()


class History:
    """The last `size` loads and applied weights of each replica (None: no metrics / held out)."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.load: dict[str, deque[float | None]] = {}
        self.weight: dict[str, deque[int | None]] = {}

    def add(self, snap: Snapshot) -> None:
        for r in snap.rows:
            self.load.setdefault(r["name"], deque(maxlen=self.size)).append(r["load"])
            weight = None if r["current_down"] else r["current_weight"]
            self.weight.setdefault(r["name"], deque(maxlen=self.size)).append(weight)

    def top_weight(self) -> float:
        return float(max((w for ws in self.weight.values() for w in ws if w is not None), default=1) or 1)


def sparkline(values: Iterable[float | None], top: float, *, unicode: bool = True, none: str | None = None) -> str:
    """One character per value, scaled to 0..top; None as `none` (default: the no-data mark)."""
    ramp = SPARK if unicode else SPARK_ASCII
    missing = NO_DATA[unicode] if none is None else none
    out = []
    for v in values:
        if v is None:
            out.append(missing)
            continue
        frac = 0.0 if top <= 0 else min(1.0, max(0.0, v / top))
        out.append(ramp[min(len(ramp) - 1, int(frac * (len(ramp) - 1) + 0.5))])
    return "".join(out)


def _num(v: float | None, fmt: str = "{:.0f}") -> str:
    return "-" if v is None else fmt.format(v)


def _weight(weight: int, down: bool, drain: bool = False, backup: bool = False) -> str:
    """A WEIGHT or NEXT cell, one word (scripts split rows on blanks): `backup:W` for nginx's `backup`."""
    if down:
        return "draining" if drain else "down"
    return f"backup:{weight}" if backup else str(weight)


def _cell(r: dict[str, Any], column: str) -> Text:
    if column == "UP":
        return Text("yes", style="green") if r["healthy"] else Text("NO", style="bold red")
    if column == "RUN":
        return Text(_num(r["running"]))
    if column == "QUEUE":
        return Text(_num(r["queued"]) + ("?" if r["queued_reliable"] is False else ""))
    if column == "KV":
        return Text("-" if r["kv_usage"] is None else f"{r['kv_usage'] * 100:.0f}%")
    if column == "WEIGHT":
        style = "yellow" if r["current_down"] and r["drain"] else "red" if r["current_down"] else ""
        return Text(_weight(r["current_weight"], r["current_down"], r["drain"], r["backup"]), style=style)
    if column == "NEXT":
        return Text(_weight(r["proposed_weight"], r["proposed_down"], r["drain"], r["proposed_backup"]),
                    style="bold" if r["changed"] else "")
    if column == "SHARE":
        return Text(f"{r['share'] * 100:.0f}%")
    if column == "LOAD":
        return Text(_num(r["load"], "{:.2f}"))
    reason = r["reason"]
    if not r["healthy"] and r["health_error"] and r["health_error"] not in reason:
        reason += f" [/health: {r['health_error']}]"
    return Text(reason)


# One-shot: the first six columns keep their order (scripts and the demo read them). --watch: fewer
# numbers (the reason carries running, queue and KV) to leave room for the history.
COLUMNS = ("INSTANCE", "UP", "RUN", "QUEUE", "KV", "WEIGHT", "NEXT", "SHARE", "LOAD")
WATCH_COLUMNS = ("INSTANCE", "UP", "LOAD", "WEIGHT", "NEXT", "SHARE")


def table(snap: Snapshot, history: History | None = None, *, unicode: bool = True, spark: int = 0) -> Table:
    """The status table; with `history`, the --watch one with `spark` characters of load and weight history.
    Only REASON wraps (on a terminal; a pipe gets one line per replica)."""
    t = Table(box=None, pad_edge=False, show_edge=False, header_style="bold", expand=False)
    columns = WATCH_COLUMNS if history is not None else COLUMNS
    for name in columns:
        t.add_column(name, no_wrap=True)
    if history is not None:
        t.add_column("LOAD TREND", no_wrap=True, min_width=spark)
        t.add_column("WEIGHT TREND", no_wrap=True, min_width=spark)
    t.add_column("REASON", overflow="fold", min_width=20, ratio=1)
    top_w = history.top_weight() if history is not None else 1.0
    for r in snap.rows:
        cells = [Text(r["name"]), *(_cell(r, c) for c in columns[1:])]
        if history is not None:
            loads = list(history.load.get(r["name"], ()))[-spark:]
            top_l = max([1.0, *(v for v in loads if v is not None)])
            cells.append(Text(sparkline(loads, top_l, unicode=unicode), style="cyan"))
            weights = list(history.weight.get(r["name"], ()))[-spark:]
            cells.append(Text(sparkline(weights, top_w, unicode=unicode, none=DOWN[unicode]), style="magenta"))
        cells.append(_cell(r, "REASON"))
        t.add_row(*cells)
    return t


def summary(snap: Snapshot) -> str:
    if not snap.rows:
        return "no instance yet (an empty inventory: registrations add them, or `fdngx launch` writes it)"
    if snap.fail_open:
        return f"fail open: {snap.fail_open}"
    if snap.fleet_load is not None:
        return f"fleet load {snap.fleet_load:.2f} per slot"
    return ""


def spark_width(console: Console, size: int) -> int:
    """History characters per trend column: all of it when the console is wide enough, else what fits
    beside the other columns and a readable REASON (at least 6)."""
    if not console.is_terminal:
        return size
    return max(6, min(size, (console.width - 72) // 2))


def frame(snap: Snapshot, history: History, *, interval: float, number: int, unicode: bool = True,
          hint: str = "", spark: int = 30) -> RenderableType:
    """One --watch frame: a header line (time, fleet load or fail-open), the table with history."""
    when = time.strftime("%H:%M:%S", time.localtime(snap.at))
    head = Text(f"fdngx status  {when}  frame {number}  every {interval:g}s  ", style="bold")
    head.append(summary(snap), style="red" if snap.fail_open else "")
    parts: list[RenderableType] = [head, *(Text(line, style="yellow") for line in snap.warnings),
                                   table(snap, history, unicode=unicode, spark=spark)]
    if hint:
        parts.append(Text(hint, style="dim"))
    return Group(*parts)


def console_for(stream: Any) -> Console:
    """A terminal: its width, so REASON wraps. A pipe or file: wide enough that each replica is one line
    (scripts grep rows), no colours."""
    probe = Console(file=stream)
    if probe.is_terminal:
        return probe
    return Console(file=stream, width=1000, no_color=True, highlight=False)


def unicode_ok(console: Console) -> bool:
    return (console.encoding or "").lower().replace("-", "").startswith("utf")


def show(console: Console, renderable: RenderableType) -> None:
    """Print; on a pipe without the cell padding rich leaves at the end of each line."""
    if console.is_terminal:
        console.print(renderable)
        return
    with console.capture() as cap:
        console.print(renderable)
    text = "\n".join(line.rstrip() for line in cap.get().splitlines())
    console.file.write(text + "\n")


def json_line(snap: Snapshot) -> str:
    return json.dumps({"ts": round(snap.at, 3), **snap.to_json()}, separators=(",", ":"))
