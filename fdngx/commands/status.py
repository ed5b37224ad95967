"""`fdngx status`: one scrape, one line per instance: health, load, current and proposed weight, why."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import typer

from fdngx import inventory as inv_mod
from fdngx.commands.options import InventoryOpt, inventory_paths
from fdngx.domain import LoadSample
from fdngx.weights.policy import Decisions, decide
from fdngx.weights.scrape import scrape_all
from fdngx.weights.settings import config_of_state
from fdngx.weights.state import PolicyState
from fdngx.weights.store import store_for

EPILOG = (
    "Current weight: from the policy state of a running sidecar or cron job (--out or --state), else the "
    "inventory's static weight. Proposed: what the next cycle would apply, with the reason, under the "
    "policy settings that state was written with (defaults without one). Read-only: "
    "the state file is not written.\n\nExit codes: 0 shown, 1 error (e.g. bad inventory), 2 usage."
)


def _rows(
    samples: dict[str, LoadSample], decisions: Decisions, state: PolicyState, static: dict[str, int]
) -> list[dict[str, Any]]:
    rows = []
    for d in decisions:
        s = samples.get(d.name)
        st = state.instances.get(d.name)
        current = st.weight if st is not None and st.weight is not None else static[d.name]
        rows.append(
            {
                "name": d.name,
                "healthy": bool(s and s.healthy),
                "up": not d.down,
                "running": s.running if s and s.ok else None,
                "queued": s.queued if s and s.ok else None,
                "queued_reliable": s.queued_reliable if s and s.ok else None,
                "kv_usage": s.kv_usage if s and s.ok else None,
                "capacity": s.capacity if s and s.ok else None,
                "scrape_error": s.error if s else "not scraped",
                "health_error": s.health_error if s else None,
                "latency_ms": round(s.latency * 1000, 1) if s else None,
                "current_weight": current,
                "current_down": bool(st.down) if st is not None else False,
                "proposed_weight": d.weight,
                "proposed_down": d.down,
                "changed": d.changed,
                "reason": d.reason,
            }
        )
    return rows


def _num(v: float | None, fmt: str = "{:.0f}") -> str:
    return "-" if v is None else fmt.format(v)


def _table(rows: list[dict[str, Any]]) -> str:
    head = ["INSTANCE", "UP", "RUNNING", "QUEUED", "KV", "WEIGHT", "PROPOSED", "REASON"]
    lines = [head]
    for r in rows:
        up = "yes" if r["healthy"] else "NO"
        queued = _num(r["queued"]) + ("?" if r["queued_reliable"] is False else "")
        kv = _num(r["kv_usage"] * 100 if r["kv_usage"] is not None else None) + (
            "%" if r["kv_usage"] is not None else ""
        )
        cur = "down" if r["current_down"] else str(r["current_weight"])
        new = "down" if r["proposed_down"] else str(r["proposed_weight"])
        lines.append([r["name"], up, _num(r["running"]), queued, kv, cur, new, r["reason"]])
    widths = [max(len(row[i]) for row in lines) for i in range(len(head) - 1)]
    return "\n".join(
        "  ".join(cell.ljust(w) for cell, w in zip(row[:-1], widths, strict=True)) + "  " + row[-1] for row in lines
    )


def status_cmd(
    inventory: list[Path] | None = InventoryOpt,
    as_json: bool = typer.Option(False, "--json", help="Print JSON (one object per instance) instead of a table."),
    out: Path | None = typer.Option(
        None,
        "--out",
        "-o",
        help="The config file a sidecar/cron job writes: the policy state beside it gives the "
        "current weights and the policy's memory.",
    ),
    state: Path | None = typer.Option(None, help="Policy state file to read (overrides --out's)."),
    timeout: float = typer.Option(1.0, help="Per-request read timeout in seconds for the scrape."),
) -> None:
    """Scrape every instance once and show health, load, current and proposed weight, and the reason."""
    inv = inv_mod.load_many(list(inventory_paths(inventory)))
    pstate = store_for(out or Path("."), state).load() if (out or state) else PolicyState()
    samples = scrape_all(inv.instances, timeout=timeout, deadline=max(1.5, timeout * 1.5))
    decisions, _ = decide(samples, inv, pstate, config_of_state(pstate), time.time())
    rows = _rows(samples, decisions, pstate, {i.name: i.weight for i in inv.instances})
    if as_json:
        doc = {"fleet_load": decisions.fleet_load, "fail_open": decisions.fail_open, "instances": rows}
        typer.echo(json.dumps(doc, indent=2))
        return
    typer.echo(_table(rows))
    if decisions.fail_open:
        typer.echo(f"\nfail open: {decisions.fail_open}")
    elif decisions.fleet_load is not None:
        typer.echo(f"\nfleet load {decisions.fleet_load:.2f} per slot")


def register(app: typer.Typer) -> None:
    app.command("status", epilog=EPILOG)(status_cmd)
