"""The control loop: every interval scrape -> policy -> (only when something changed) safe apply, or,
for the openresty flavor, a push of weights and load to the Lua balancer every cycle (no reloads).

Triggers: the timer; the inventory file(s) changing on disk (watchdog, debounced, because `launch` and
editors write in bursts); SIGHUP (reload the inventory now). SIGTERM ends the loop between cycles.
Every config write goes through `nginx.safe_apply`, the same path as `fdngx render --reload`.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from watchdog.events import FileSystemEvent, FileSystemEventHandler
from watchdog.observers import Observer

from fdngx import inventory as inv_mod
from fdngx.cycle import load_state, save_state, server_states, state_path_for, unapplied
from fdngx.errors import FdngxError
from fdngx.fetch import Client
from fdngx.inventory import Inventory
from fdngx.nginx import ApplyResult, NginxControl, safe_apply
from fdngx.openresty import Admin
from fdngx.policy import Decisions, PolicyConfig, decide
from fdngx.render import RenderOptions, ServerState, render
from fdngx.scrape import LoadSample, loads_of, make_client, scrape_all
from fdngx.telemetry import Telemetry

log = logging.getLogger("fdngx.sidecar")
STATE_SAVE_EVERY = 10.0


@dataclass(frozen=True)
class SidecarConfig:
    inventories: tuple[Path, ...]
    out: Path
    render_opts: RenderOptions = field(default_factory=RenderOptions)
    control: NginxControl | None = None  # None: write the file only (someone else reloads)
    admin: Admin | None = None  # openresty flavor: push weights and load here instead of reloading
    reload: bool = True
    policy: PolicyConfig = field(default_factory=PolicyConfig)
    state_path: Path | None = None  # default: <out>.state.json
    debounce: float = 1.0  # seconds of quiet after an inventory change before re-reading it
    scrape_deadline: float = 1.5

    @property
    def state_file(self) -> Path:
        return self.state_path or state_path_for(self.out)


@dataclass(frozen=True)
class CycleReport:
    decisions: Decisions
    samples: dict[str, LoadSample]
    applied: ApplyResult | None  # None: nothing needed writing
    error: str | None  # why the apply failed (the old config stays)


class _InventoryWatch(FileSystemEventHandler):
    def __init__(self, paths: set[Path], changed: Callable[[], None]) -> None:
        self.paths = paths
        self.changed = changed

    def on_any_event(self, event: FileSystemEvent) -> None:
        # Atomic writes arrive as "created temp file, moved over target": the target shows up as dest_path.
        for raw in (event.src_path, getattr(event, "dest_path", "")):
            if raw and Path(str(raw)).resolve() in self.paths:
                self.changed()
                return


class Sidecar:
    def __init__(
        self,
        config: SidecarConfig,
        *,
        telemetry: Telemetry | None = None,
        session: Client | None = None,
        clock: Callable[[], float] = time.time,
        scrape: Callable[..., dict[str, LoadSample]] = scrape_all,
        apply: Callable[..., ApplyResult] = safe_apply,
    ) -> None:
        self.config = config
        self.policy = config.policy.validated()
        config.render_opts.validated()
        self.telemetry = telemetry or Telemetry()
        self.session = session or make_client()
        self.clock = clock
        self.scrape = scrape
        self.apply = apply
        self.inventory: Inventory = inv_mod.load_many(list(config.inventories))  # a bad one at start is fatal
        self.state = load_state(config.state_file)
        self._render_pending = True  # the first cycle always makes the file match the inventory
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._changed_at: float | None = None
        self._first_change_at: float | None = None
        self._observer: Any = None
        self.cycles = 0
        self._last_error: str | None = None
        self._budget_holding = False
        self._last_error_at = 0.0
        self._saved_at = -math.inf

    # -- triggers (any thread, signal handlers included) ---------------------------------------------

    def inventory_changed(self, immediate: bool = False) -> None:
        now = time.monotonic()
        self._changed_at = now - (self.config.debounce if immediate else 0.0)
        if self._first_change_at is None:
            self._first_change_at = now
        self._wake.set()

    def _inventory_due(self, now: float) -> bool:
        """After `debounce` s of quiet, or at the latest 5 debounces after the first change (like
        consul-template's wait min:max), so a file rewritten non-stop is still picked up."""
        if self._changed_at is None or self._first_change_at is None:
            return False
        longest = max(5 * self.config.debounce, 1.0)
        return now - self._changed_at >= self.config.debounce or now - self._first_change_at >= longest

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()

    # -- the loop --------------------------------------------------------------------------------------

    def watch(self) -> None:
        """Start watching the inventory files' directories (files are replaced, not edited in place)."""
        paths = {p.resolve() for p in self.config.inventories}
        observer = Observer()
        handler = _InventoryWatch(paths, self.inventory_changed)
        for directory in sorted({p.parent for p in paths}):
            observer.schedule(handler, str(directory), recursive=False)
        observer.daemon = True
        observer.start()
        self._observer = observer

    def run(self) -> None:
        """Cycle until stop(); never raises for a bad cycle (it is logged and retried next interval)."""
        interval = self.policy.interval
        next_at = time.monotonic()
        try:
            while not self._stop.is_set():
                now = time.monotonic()
                if self._inventory_due(now):
                    self._changed_at = self._first_change_at = None
                    if self.reload_inventory():
                        next_at = now  # act on the new inventory at once
                if now >= next_at:
                    try:
                        self.run_once()
                    except Exception:  # a bug must not kill the loop that keeps nginx in line
                        log.exception("cycle failed")
                    next_at = max(next_at + interval, time.monotonic())
                waits = [next_at - time.monotonic()]
                if self._changed_at is not None:
                    waits.append(min(0.25, self._changed_at + self.config.debounce - time.monotonic()))
                self._wake.wait(max(0.0, min(waits)))
                self._wake.clear()
        finally:
            if self.cycles:
                self.save()
            self.session.close()
            if self._observer is not None:
                self._observer.stop()
                self._observer.join(timeout=5)
            log.info("sidecar stopped after %d cycles", self.cycles)

    def reload_inventory(self) -> bool:
        try:
            new = inv_mod.load_many(list(self.config.inventories))
        except FdngxError as exc:
            log.error("inventory not reloaded, keeping the previous one: %s", exc)
            return False
        if new.to_dict() != self.inventory.to_dict():
            log.info("inventory changed: %d instance(s) from %s", len(new.instances), ", ".join(new.sources))
            self.inventory = new
            self._render_pending = True
        return True

    def save(self) -> None:
        try:
            save_state(self.config.state_file, self.state)
            self._saved_at = time.monotonic()
        except OSError as exc:
            log.warning("%s: cannot save policy state: %s", self.config.state_file, exc)

    def _push(self, states: dict[str, ServerState], samples: dict[str, LoadSample]) -> str | None:
        """Every cycle, not only on change: the balancer fades scraped load that is not refreshed."""
        assert self.config.admin is not None
        t0 = time.monotonic()
        try:
            self.config.admin.push(states, loads_of(samples))
        except FdngxError as exc:
            return str(exc)
        self.telemetry.pushes.inc()
        self.telemetry.apply_seconds.observe(time.monotonic() - t0)
        return None

    def _note_budget(self, decisions: Decisions) -> None:
        """Say once when the reload budget starts holding changes back, and once when it lets go."""
        held = [d for d in decisions if d.budget_held]
        if held and not self._budget_holding:
            wants = ", ".join(f"{d.name} {d.previous}->{d.wanted}" for d in held)
            log.info(
                "reload budget exhausted (%d/min): holding %s until a reload slot frees (--max-reloads-per-minute)",
                self.policy.max_reloads_per_minute,
                wants,
            )
        elif not held and self._budget_holding:
            log.info("reload budget available again")
        self._budget_holding = bool(held)

    def run_once(self) -> CycleReport:
        """One cycle: scrape, decide, apply if anything changed, keep the state."""
        started = time.monotonic()
        inv = self.inventory
        samples = self.scrape(inv.instances, session=self.session, deadline=self.config.scrape_deadline)
        now = self.clock()
        decisions, new_state = decide(samples, inv, self.state, self.policy, now)
        applied: ApplyResult | None = None
        error: str | None = None
        states = server_states(decisions)
        pushing = self.config.admin is not None
        # nginx flavor: weights live in the config, so a change is a write + reload. openresty flavor: the
        # config follows the inventory only (static weights) and weights go to the Lua balancer by push.
        if self._render_pending or (decisions.changed and not pushing):
            t0 = time.monotonic()
            rendered = None if pushing else states
            try:
                applied = self.apply(
                    self.config.out,
                    lambda: render(inv, self.config.render_opts, rendered),
                    self.config.control,
                    reload=self.config.reload and self.config.control is not None,
                )
                self._render_pending = False
                if applied.note:
                    log.warning("%s", applied.summary)
                self.telemetry.applied(applied.generation, time.monotonic() - t0, applied.reloaded)
            except FdngxError as exc:
                error = str(exc)
        if pushing and error is None:
            error = self._push(states, samples)
        if error is not None:
            self.telemetry.reload_failures.inc()
            new_state = unapplied(new_state, self.state)
        # While an apply keeps failing the same way, say so once a minute, not every cycle: a stopped
        # nginx must not flood the log (the same changes stay pending and are retried each cycle).
        quiet = error is not None and error == self._last_error and time.monotonic() - self._last_error_at < 60
        if not quiet:
            for d in decisions:
                if d.changed:
                    log.info("%s%s: %s", "NOT APPLIED " if error else "", d.name, d.reason)
        if error and not quiet:
            log.error("apply failed: %s", error)
            self._last_error, self._last_error_at = error, time.monotonic()
        elif not error and self._last_error is not None:
            log.info("apply works again")
            self._last_error = None
        self._note_budget(decisions)
        if decisions.fail_open and (decisions.changed or self.cycles == 0):
            log.warning("failing open: %s", decisions.fail_open)
        self.state = new_state
        # Every change at once (status and a restarted sidecar must see what nginx has); otherwise every
        # 10 s: an fsync'd write per second buys nothing but a few lost seconds of smoothing on a crash.
        if decisions.changed or time.monotonic() - self._saved_at >= STATE_SAVE_EVERY:
            self.save()
        self.telemetry.observe(samples, decisions, new_state, now)
        self.telemetry.cycle_seconds.observe(time.monotonic() - started)
        self.cycles += 1
        return CycleReport(decisions, samples, applied, error)
