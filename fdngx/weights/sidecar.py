"""The sidecar: the controller's cycle (fdngx.weights.controller) on a timer, an inventory watch and
signals. Nothing about weights or nginx is decided here.

Triggers: the timer; the inventory file(s) changing on disk (fdngx.weights.watch: watchdog events, and a
stat of each file every cycle for what no event announced; debounced, because `launch` and editors write in
bursts; re-read only when a file's identity changed, an early cycle only when the inventory did); SIGHUP
(re-read the inventory now). SIGTERM ends the loop between cycles; a cycle waiting for another run's apply
lock gives up that apply at once (fdngx.nginx.apply.lock_waits_end_on), so a stop never waits for it.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from fdngx import inventory as inv_mod
from fdngx.domain import FailOpen, Inventory, LoadSample
from fdngx.errors import FdngxError, check_number, os_error_line
from fdngx.nginx.apply import lock_waits_end_on
from fdngx.nginx.pushfile import FrontendSpec, read_push_file
from fdngx.nginx.target import Target
from fdngx.system.files import Identity as FileIdentity
from fdngx.system.files import identity as file_identity
from fdngx.weights import owner
from fdngx.weights.controller import Controller, CycleResult
from fdngx.weights.fetch import Client
from fdngx.weights.policy import Decisions
from fdngx.weights.scrape import make_client, scrape_all
from fdngx.weights.settings import MAX_SECONDS, PolicyConfig
from fdngx.weights.store import StateStore, controller_store, store_for
from fdngx.weights.telemetry import Telemetry
from fdngx.weights.watch import Identity, InventoryWatch, identity

log = logging.getLogger("fdngx.sidecar")
STATE_SAVE_EVERY = 10.0


def _members(inv: Inventory) -> dict[tuple[str, str, int], tuple[bool, int]]:
    """The replicas nginx gets, by name and address, with what an admin sets on each (drain, weight)."""
    return {(i.name, i.host, i.port): (i.drain, i.weight) for i in inv.instances}


@dataclass(frozen=True)
class SidecarConfig:
    inventories: tuple[Path, ...]
    target: Target
    policy: PolicyConfig = field(default_factory=PolicyConfig)
    state_path: Path | None = None  # default: a dot-file beside --out (fdngx.weights.store.store_for)
    debounce: float = 1.0  # seconds of quiet after an inventory change before re-reading it
    scrape_deadline: float = 1.5
    # Controller mode: frontends from --push-to, and a push file re-read when it changes (checked each cycle).
    frontends: tuple[FrontendSpec, ...] = ()
    push_file: Path | None = None
    push_token_file: Path | None = None
    # Seconds to wait for the config's sidecar lock (fdngx.weights.owner): 0 for a long-running sidecar (a
    # second one is refused at once), longer for a --once run (overlapping cron runs take turns).
    owner_wait: float = 0.0

    @property
    def store(self) -> StateStore:
        if self.target.out is None:
            # A controller with no nginx of its own keeps its state beside its (first) inventory.
            return StateStore(self.state_path.absolute()) if self.state_path else controller_store(self.inventories[0])
        return store_for(self.target.out, self.state_path)


class Sidecar:
    def __init__(
        self,
        config: SidecarConfig,
        *,
        telemetry: Telemetry | None = None,
        session: Client | None = None,
        clock: Callable[[], float] = time.time,
        scrape: Callable[..., dict[str, LoadSample]] = scrape_all,
    ) -> None:
        self.config = config
        # NaN or inf would never let an inventory change be due (now - changed_at >= nan is False)
        check_number("--debounce", config.debounce, 0.0, MAX_SECONDS)
        self.policy = config.policy.validated()
        self._owner = owner.hold(config.target.out, config.owner_wait)  # one sidecar per config
        try:
            self._start(scrape, clock, telemetry, session)
        except BaseException:
            self._owner.close()
            raise

    def _start(self, scrape: Callable[..., dict[str, LoadSample]], clock: Callable[[], float],
               telemetry: Telemetry | None, session: Client | None) -> None:
        config = self.config
        self.telemetry = telemetry or Telemetry()
        self.session = session or make_client()
        self.controller = Controller(config.target, self.policy, self.session, scrape, clock, config.scrape_deadline)
        self._seen: Identity = identity(config.inventories)  # the files as last read: before the read
        self.inventory: Inventory = inv_mod.load_many(config.inventories)  # a bad one at start is fatal
        config.target.check(self.inventory)  # and one nginx cannot be given (no instance, a name for Lua)
        self._inventory_error: str | None = None  # why the last re-read failed (said once)
        self.store = config.store
        self.state = self.store.load()
        self._render_pending = True  # the first cycle always makes the file match the inventory
        self._held_inventory: Inventory | None = None  # read, not applied yet: membership's pace (_take)
        self._membership_at = -math.inf  # (policy clock) when a membership change was last taken
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._changed_at: float | None = None
        self._first_change_at: float | None = None
        self._forced = False  # SIGHUP: re-read even if the files look the same
        self._watch: InventoryWatch | None = None
        self.cycles = 0
        self._budget_holding = False
        self._fail_open: FailOpen | None = None
        self._seen_healthy = False  # a replica has answered /health since this sidecar started
        self._saved_at = -math.inf
        self._save_failing_since: float | None = None  # (monotonic) saves fail since; said once a minute
        self._save_said_at = -math.inf
        self._push_file_seen: FileIdentity | None = None
        self._push_file_error: str | None = None
        if config.push_file is not None:
            self.refresh_frontends(strict=True)  # a bad push file at start is fatal, like a bad inventory
    # -- triggers (any thread, signal handlers included) ---------------------------------------------

    def inventory_changed(self, immediate: bool = False) -> None:
        now = time.monotonic()
        if immediate:
            self._forced = True
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
        """Watch the inventory files' directories, and those of every symlink on the way to them (files are
        replaced, not edited in place; links are swapped). Without a watch (inotify's limits), a warning:
        the per-cycle look at the files finds changes all the same."""
        self._watch = InventoryWatch(self.config.inventories, self.inventory_changed)
        self._watch.start()

    def _look(self) -> None:
        """Every cycle: follow moved symlinks with the watch, and notice a change no event announced."""
        if self._watch is not None:
            self._watch.refresh()
        if self._changed_at is None and identity(self.config.inventories) != self._seen:
            log.debug("inventory files changed on disk (seen by the per-cycle look)")
            self.inventory_changed()

    def run(self) -> None:
        """Cycle until stop(); never raises for a bad cycle (it is logged and retried next interval)."""
        next_at = time.monotonic()
        try:
            with lock_waits_end_on(self._stop):  # a stop ends a wait for the apply lock: that apply is not made
                while not self._stop.is_set():
                    next_at = self._turn(next_at)
        finally:
            self._close()
            log.info("sidecar stopped after %d cycles", self.cycles)

    def _turn(self, next_at: float) -> float:
        """One turn of the loop: the inventory if due, a cycle if due, then wait; returns the next cycle's time."""
        now = time.monotonic()
        if self._inventory_due(now):
            forced, self._forced = self._forced, False
            self._changed_at = self._first_change_at = None
            if self._watch is not None:
                self._watch.refresh()
            if self.reload_inventory(force=forced):
                next_at = now  # act on the new inventory at once
        if now >= next_at:
            self._look()
            try:
                self.run_once()
            except Exception:  # a bug must not kill the loop that keeps nginx in line
                log.exception("cycle failed")
            next_at = max(next_at + self.policy.interval, time.monotonic())
        waits = [next_at - time.monotonic()]
        if self._changed_at is not None:
            waits.append(min(0.25, self._changed_at + self.config.debounce - time.monotonic()))
        self._wake.wait(max(0.0, min(waits)))
        self._wake.clear()
        return next_at

    def once(self) -> CycleResult:
        """One cycle, then the clean-up run() ends with (consul-template's -once: the same loop, once). Like
        `render --scrape` (Controller.run_once), under the state store's lock with the state read under it:
        overlapping cron runs take turns instead of each saving over the other's reloads and health counts."""
        try:
            with self.store.locked():
                self.state = self.store.load()
                return self.run_once()  # a first cycle saves the state (under the lock)
        finally:
            self._close(save=False)

    def _close(self, save: bool = True) -> None:
        if self.cycles and save:
            self.save()
        self.session.close()
        self.config.target.close()
        if self._watch is not None:
            self._watch.stop()
        self._owner.close()

    def reload_inventory(self, force: bool = False) -> bool:
        """Re-read the inventory if its files changed (identity: dev, inode, size, mtime) or `force` (SIGHUP);
        True when what it lists changed. A bad one keeps the previous inventory, said once until it changes."""
        seen = identity(self.config.inventories)
        if seen == self._seen and not force:
            return False  # read, touched by nobody, or the same bad file as before: nothing to do
        self._seen = seen
        try:
            new = inv_mod.load_many(list(self.config.inventories))
            self.config.target.check(new)
        except FdngxError as exc:
            if str(exc) != self._inventory_error or force:
                log.error("inventory not reloaded, keeping the previous one: %s", exc)
            self._inventory_error = str(exc)
            return False
        if self._inventory_error is not None:
            log.info("inventory read again")
            self._inventory_error = None
        if new.to_dict() == self.inventory.to_dict():
            self._held_inventory = None  # back to what the cycles apply: nothing to hold
            if force:  # `systemctl reload`: say it was done, not only when something changed
                log.info("inventory read again (SIGHUP): unchanged, %d instance(s)", len(new.instances))
            return False
        log.info("inventory changed: %d instance(s) from %s", len(new.instances), ", ".join(new.sources))
        return self._take(new)

    def _take(self, new: Inventory) -> bool:
        """Make `new` the inventory the cycles apply. One in which a replica leaves (and none joins) waits for a
        reload-budget slot where nginx reloads for it (the nginx flavor): under a churn of registrations (a
        replica flapping: every removal and re-add a reload, exempt from the budget) old workers still serving
        long streams piled up, 2 -> 33 workers and 15 -> 253 MB in two minutes (an outside review). Held
        meanwhile, said once; the latest file wins, and a replica back before the hold ends cancels its
        removal. nginx keeps the leaving replica meanwhile (held down by its health checks and max_fails).
        Never held: a replica joining, an edit of a replica that stays (a drain: taken with the removal),
        the last replica leaving (a registry's empty fleet answers 503 at once, not 502 from a replica gone),
        membership pushed (OpenResty), no reload. True: taken."""
        target, now = self.config.target, self.controller.clock()
        gap = 0.0 if target.pushing or not target.reload else 60.0 / self.policy.max_reloads_per_minute
        had, has = _members(self.inventory), _members(new)
        if (not had.keys() - has.keys() or has.keys() - had.keys() or any(has[k] != had[k] for k in has)
                or not has):
            gap = 0.0  # nothing leaves, one joins (capacity), an admin's edit (a drain), the last one leaves
        if self._membership_at <= now < self._membership_at + gap:  # (a clock stepped back: not held)
            if self._held_inventory is None:
                log.info("inventory change held for %.0f s: a replica leaving waits for a reload slot (one per "
                         "%.0f s after the last membership change, --max-reloads-per-minute)",
                         self._membership_at + gap - now, gap)
            self._held_inventory = new
            return False
        if self._held_inventory is not None and new is self._held_inventory:
            log.info("inventory change applied after its hold: %d instance(s)", len(new.instances))
        self.inventory, self._held_inventory = new, None
        self._render_pending = True
        if had.keys() != has.keys():  # the pace counts membership changes only
            self._membership_at = now
        return True

    def refresh_frontends(self, strict: bool = False) -> None:
        """Re-read the push file when it changed (device, inode, size or mtime): a cheap stat per cycle. A bad or
        missing file keeps the frontends in use (said once); `strict` (at start) raises instead."""
        path = self.config.push_file
        if path is None or self.config.target.fanout is None:
            return
        try:
            seen = file_identity(path)
            if seen is not None and seen == self._push_file_seen:
                return
            specs = read_push_file(path, self.config.push_token_file)
            self.config.target.set_frontends([*self.config.frontends, *specs])
        except (OSError, FdngxError) as exc:
            why = str(exc) if isinstance(exc, FdngxError) else f"{path}: {exc.strerror or exc}"
            if strict:
                raise FdngxError(why) from None
            if why != self._push_file_error:
                log.error("push file not re-read, keeping the frontends in use: %s", why)
                self._push_file_error = why
            return
        if self._push_file_error is not None:
            log.info("%s: push file read again", path)
        self._push_file_seen, self._push_file_error = seen, None

    def save(self) -> None:
        """Save the policy state. A failure (a full disk) is said when it starts and once a minute while it
        lasts, not every cycle (52 lines in 100 s: an outside review), and working again is said once."""
        try:
            self.store.save(self.state)
        except OSError as exc:
            now = time.monotonic()
            if self._save_failing_since is None or now - self._save_said_at >= 60:
                log.warning("cannot save the policy state (status and a restarted sidecar read it): %s",
                            os_error_line(exc))
                self._save_said_at = now
            if self._save_failing_since is None:
                self._save_failing_since = now
            return
        self._saved_at = time.monotonic()
        if self._save_failing_since is not None:
            log.info("%s: policy state saved again, after %.0f s", self.store.path,
                     self._saved_at - self._save_failing_since)
            self._save_failing_since = None

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

    def _note_fail_open(self, decisions: Decisions) -> None:
        """Say when the policy starts failing open, why (and when the why changes), and when it stops: it
        changes no weight (every replica is at its static weight already), so no change line says it."""
        now = decisions.fail_open
        if now == self._fail_open:
            return
        if now is not None:
            # Every replica failing /health is an outage (nginx tries each in turn, clients get errors), once
            # one has answered: before that, the fleet is starting (a sidecar started with `launch`). No fresh
            # metrics is blindness (nginx balances by static weights: it still serves).
            outage = now is FailOpen.UNHEALTHY and self._seen_healthy
            log.log(logging.ERROR if outage else logging.WARNING, "failing open: %s%s: nginx gets every replica at "
                    "its static weight", now, "" if outage or now is not FailOpen.UNHEALTHY else " (none has yet)")
        else:
            log.info("no longer failing open (%s): weights follow the load again", self._fail_open)
        self._fail_open = now

    def run_once(self) -> CycleResult:
        """One cycle through the controller; then telemetry, and the state saved on change or every 10 s."""
        started = time.monotonic()
        self.refresh_frontends()
        if self._held_inventory is not None:
            self._take(self._held_inventory)
        result, self.state = self.controller.step(self.inventory, self.state, force_render=self._render_pending)
        if result.error is None:
            self._render_pending = False
        decisions = result.decisions
        assert decisions is not None
        self._note_budget(decisions)
        self._seen_healthy = self._seen_healthy or any(s.healthy for s in result.samples.values())
        self._note_fail_open(decisions)
        # Every change at once (status and a restarted sidecar must see what nginx has); otherwise every
        # 10 s: an fsync'd write per second buys nothing but a few lost seconds of smoothing on a crash.
        if decisions.changed or time.monotonic() - self._saved_at >= STATE_SAVE_EVERY:
            self.save()
        self.telemetry.cycle(result, self.state, self.controller.clock(), time.monotonic() - started)
        self.telemetry.inventory_held.set(0 if self._held_inventory is None else 1)
        self.cycles += 1
        if log.isEnabledFor(logging.DEBUG):
            pushes = result.pushes or ()
            # One structured line per cycle (--log-format json carries the fields): what the fleet benchmark reads.
            log.debug("cycle %d: scrape+policy %.0f ms, push %.0f ms, %d replica(s), %d frontend(s)", self.cycles,
                      1000 * result.scrape_seconds, 1000 * result.push_seconds, len(result.samples),
                      len(pushes), extra={
                          "cycle": self.cycles, "scrape_policy_s": round(result.scrape_seconds, 6),
                          "push_s": round(result.push_seconds, 6), "cycle_s": round(time.monotonic() - started, 6),
                          "pushes": {o.frontend: [o.status, round(o.seconds, 6)] for o in pushes},
                          "generation": max((o.generation or 0 for o in pushes), default=None),
                      })
        return result
