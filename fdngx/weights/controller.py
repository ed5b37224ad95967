"""ONE control cycle, for cron and the sidecar alike (consul-template's runner; its `-once` is cron):

    scrape every replica -> decide (pure policy) -> render -> safe apply (nginx flavor: the weights are in
    the config) and/or push (openresty flavor: the config carries no weights) -> keep the state, with
    the weights and down flags nginx really got

`fdngx render --scrape` runs `run_once` (state from and to the store, under the store's lock); the
sidecar calls `step` on its timer, inventory watch and SIGHUP with the state it keeps in memory. Scrape
and policy run outside the nginx lock; safe_apply takes it for write, test, reload and confirm only.
A failed apply or push leaves the applied weights in the state as they were, so the next cycle still
sees the change as pending and `fdngx status` never shows weights nginx does not have.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace

from fdngx.domain import Inventory, LoadSample, ServerState
from fdngx.errors import FdngxError
from fdngx.nginx import generation
from fdngx.nginx.admin import PushResult
from fdngx.nginx.apply import ApplyResult, ApplyStopped, InputsChanged, ReloadFailed
from fdngx.nginx.fanout import NO_FRONTENDS, PushOutcome
from fdngx.nginx.generation import PushState, say_change
from fdngx.nginx.generation import superseded as why_superseded
from fdngx.nginx.guards import fdngx_wrote
from fdngx.nginx.target import Target
from fdngx.system.files import Identity, identity, read_bytes_or_none, real_target
from fdngx.weights.fetch import Client
from fdngx.weights.policy import Decisions, decide
from fdngx.weights.scrape import scrape_all
from fdngx.weights.settings import PolicyConfig
from fdngx.weights.state import PolicyState
from fdngx.weights.store import StateStore

log = logging.getLogger("fdngx.controller")
Scrape = Callable[..., dict[str, LoadSample]]
# The last generation pushed, kept in the state (beside the policy settings, which ignore it) so that the next
# process counts on from it (fdngx.nginx.generation.seed): the sidecar saves it every 10 s and when it stops.
GENERATION_KEY = "last_generation"
# A config whose reload failed (nginx refused it, or took it and was put back: two reloads a try) is not tried
# again for this long, doubling up to HOLD_MAX; another config, or the file changed by someone else, at once.
HOLD_FIRST, HOLD_MAX = 10.0, 60.0


@dataclass(frozen=True)
class CycleResult:
    decisions: Decisions | None  # None: a static render (no scrape, inventory weights)
    samples: dict[str, LoadSample]
    applied: ApplyResult | None  # None: nothing was written (identical, or push only)
    pushed: int | None  # openresty: peers the balancer took; None: no push this cycle
    error: str | None  # why the apply or push failed (nginx keeps what it had)
    text: str = ""  # the rendered config
    # Whether the nginx fdngx reloads runs, checked every cycle (None: fdngx does not reload, so it cannot say).
    nginx_running: bool | None = None
    # Controller mode: what each frontend did with this cycle's snapshot (fdngx.nginx.fanout). None: no
    # controller-mode push this cycle (another mode, or the cycle failed before it); (): the push file lists none.
    pushes: tuple[PushOutcome, ...] | None = None
    # Seconds spent scraping + deciding, and pushing (for logs, telemetry and the fleet benchmark).
    scrape_seconds: float = 0.0
    push_seconds: float = 0.0
    # This cycle's push was refused everywhere as older than the snapshot in force: why, for people (one line).
    # The policy's (decisions not None): another controller, or a clock ahead; normal beside a second
    # controller, an error for `render` (its weights were applied nowhere). A static one (the peers file
    # re-sent under its own generation): a sidecar's newer snapshot is in force, as it should be.
    superseded: str | None = None
    # The inventory changed after this cycle read it (Controller.inputs_changed): nothing written or pushed.
    stale_inputs: bool = False
    # The sidecar was told to stop while this cycle waited for the apply lock: nothing written (not a failure).
    stopped: bool = False

    @property
    def changed(self) -> bool:
        return bool(self.decisions and self.decisions.changed) or bool(self.applied and self.applied.changed)


def server_states(decisions: Decisions) -> dict[str, ServerState]:
    return {d.name: ServerState(d.weight, d.down, d.backup) for d in decisions}


def unapplied(new: PolicyState, old: PolicyState) -> PolicyState:
    """`new` with the applied weights/down of `old`: what to keep when writing the config failed, so
    the next cycle sees the change as still pending instead of done (health counts and smoothing stay)."""
    instances = {}
    for name, st in new.instances.items():
        prev = old.instances.get(name)
        instances[name] = replace(
            st,
            weight=prev.weight if prev else None,
            down=prev.down if prev else False,
            backup=prev.backup if prev else False,
            drained=prev.drained if prev else False,
            last_change_at=prev.last_change_at if prev else None,
        )
    reloads = [t for t in new.reloads if t in old.reloads]
    return PolicyState(instances, reloads, new.updated_at, new.config)


def _log_scrapes(old: PolicyState, new: PolicyState) -> None:
    """A replica's metrics failing, and working again: one line each, not one per cycle (from the state, so
    cron runs a minute apart say it once too). Failing is a WARNING, but not for a drained replica (stopping
    it is what a drain is for); working again is news, INFO."""
    for name, st in new.instances.items():
        was = old.instances[name].last_error if name in old.instances else None
        if st.last_error is not None and was is None:
            level = logging.INFO if st.drained else logging.WARNING
            log.log(level, "%s: metrics scrape failing%s: %s", name, " (drained)" if st.drained else "",
                    st.last_error)
        elif st.last_error is None and was is not None:
            log.info("%s: metrics scrape works again", name)


def fleet_outcome(pushes: tuple[PushOutcome, ...] | None) -> tuple[int | None, str | None]:
    """(peers the frontends took, or 0 when every one holds another controller's newer snapshot; the cycle's
    error, only when no frontend answered at all: then none has the change and it stays pending; a push to no
    frontend at all is no success either)."""
    if pushes is None:
        return None, None
    if not pushes:
        return None, NO_FRONTENDS
    taken = [o.peers for o in pushes if o.accepted]
    if taken:
        return max(taken), None
    if any(o.status == "stale" for o in pushes):
        return 0, None
    why = "; ".join(f"{o.frontend}: {o.error or o.status}" for o in pushes[:3])
    more = f" (and {len(pushes) - 3} more)" if len(pushes) > 3 else ""
    return None, f"no frontend took the push: {why}{more}"


@dataclass
class Controller:
    target: Target
    policy: PolicyConfig | None  # None: no scrape, the inventory's static weights
    session: Client | None = None
    scrape: Scrape = scrape_all
    clock: Callable[[], float] = time.time
    scrape_deadline: float = 1.5
    # The sidecar logs what each apply did; a command (cron) prints its one result itself.
    log_outcome: bool = True
    # Why the inventory this cycle read is out of date (None: it is not), asked under the apply lock and before
    # the push: `render` then writes and pushes nothing, and runs again (fdngx.commands.render).
    inputs_changed: Callable[[], str | None] | None = None
    # While an apply keeps failing the same way, say so once a minute, not every cycle.
    _last_error: str | None = field(default=None, repr=False)
    _last_error_at: float = field(default=0.0, repr=False)
    _said_down: bool = field(default=False, repr=False)  # "nginx is not running" said since it last ran
    _said_push: PushState | None = field(default=None, repr=False)  # the policy push's state last said
    _out_seen: Identity | None = field(default=None, repr=False)  # the config file as this controller left it
    # The config whose reload last failed: (text, not before (monotonic), hold seconds, its error).
    _held: tuple[str, float, float, str] | None = field(default=None, repr=False)
    _said_out_at: float = field(default=-60.0, repr=False)

    def step(
        self, inv: Inventory, state: PolicyState, *, force_render: bool = False
    ) -> tuple[CycleResult, PolicyState]:
        """One cycle: scrape, decide, render, apply and/or push. Never raises for a failed apply (it is in
        the result); the returned state records only what nginx got."""
        decisions = None
        samples: dict[str, LoadSample] = {}
        new_state = state
        started = time.monotonic()
        if self.policy is not None:
            samples = self.scrape(inv.instances, session=self.session, deadline=self.scrape_deadline)
            now = self.clock()
            decisions, new_state = decide(samples, inv, state, self.policy, now)
            state = state.clamped(now)[0]  # what a failed apply keeps reads the same clock (after a step back)
            _log_scrapes(state, new_state)
        scraped = time.monotonic()
        states = server_states(decisions) if decisions is not None else None
        applied: ApplyResult | None = None
        pushed: int | None = None
        superseded: str | None = None
        pushes: tuple[PushOutcome, ...] | None = None
        apply_error = push_error = None
        stale = stopped = False
        text = ""
        push_started = push_ended = scraped
        if self.target.pushing:
            # Here, not at start: cron's run_once and the sidecar both come through, each with its state (a
            # no-op after the first: the last generation given out only grows).
            generation.seed(state.config.get(GENERATION_KEY))
        try:
            if self.target.renders:
                text = self.target.render(inv, states)
            # nginx flavor: a weight change is a config change. openresty: the text follows the inventory
            # only; the apply is cheap when identical (one read, one compare) and still reports nginx down.
            # Either: a file someone else wrote is put right at once, not at the next change.
            rewritten = self._out_changed()
            if self.target.out is not None and (rewritten or force_render or decisions is None
                                                or decisions.changed or self.target.pushing):
                apply_error = None if rewritten else self._held_back(text)
                why = self.inputs_changed() if self.inputs_changed is not None and apply_error is None else None
                if why:  # before the peers file too (openresty): it would carry the replicas this run read
                    raise InputsChanged(f"{self.target.out}: not applied: {why}")
                if apply_error is None:
                    self.target.write_peers(inv)
                    applied = self.target.apply(text, self.inputs_changed)
                    self._out_seen = identity(self.target.out)
                    self._held = None
        except ReloadFailed as exc:
            apply_error = str(exc)
            self._hold(text, apply_error)
        except InputsChanged as exc:
            apply_error, stale = str(exc), True
        except ApplyStopped as exc:
            apply_error, stopped = str(exc), True
        except FdngxError as exc:
            apply_error = str(exc)
        if not stale and self.target.pushing and self.inputs_changed is not None:
            why = self.inputs_changed()
            apply_error, stale = (f"not pushed: {why}", True) if why else (apply_error, False)
        # openresty: the balancer takes the snapshot without the config or the peers file (a full disk), so
        # health and weights still reach it; the apply's failure is still the cycle's error.
        if not stale and (apply_error is None or self.target.pushing):
            push_started = time.monotonic()
            try:
                pushed, pushes, superseded, push_error = self._push(inv, states, samples)
            except FdngxError as exc:
                push_error = str(exc)
            push_ended = time.monotonic()
        error = "; ".join(e for e in (apply_error, push_error) if e) or None
        # What nginx really got: the push's for the openresty flavor (its weights are pushed), else the apply's.
        if decisions is not None and (stale or (push_error if self.target.pushing else apply_error) is not None):
            new_state = unapplied(new_state, state)
        if self.target.pushing and generation.last_generation():
            new_state = replace(new_state, config={**new_state.config, GENERATION_KEY: generation.last_generation()})
        result = CycleResult(decisions, samples, applied, pushed, error, text, self._nginx_running(applied), pushes,
                             scraped - started, push_ended - push_started, superseded, stale, stopped)
        self._log(result)
        return result, new_state

    def _push(self, inv: Inventory, states: dict[str, ServerState] | None, samples: dict[str, LoadSample]
              ) -> tuple[int | None, tuple[PushOutcome, ...] | None, str | None, str | None]:
        """This cycle's push: (peers taken, controller mode's outcomes, why it was refused as older, error)."""
        if self.target.fanout is not None:
            # Controller mode: the same snapshot to every frontend at once; one that fails is its own
            # problem (logged and counted per frontend), the cycle fails only if none took it.
            pushes = self.target.push_all(inv, states, samples)
            pushed, error = fleet_outcome(pushes)
            superseded = None
            if pushed == 0:
                superseded = "; ".join(why_superseded(o.url or o.frontend, o.generation, o.current,
                                                      peers_file=states is None)
                                       for o in pushes if o.status == "stale")
            return pushed, pushes, superseded, error
        if not self.target.pushing:
            return None, None, None, None
        # Every cycle, not only on change: the balancer fades scraped load that is not refreshed. A static
        # render (no policy) pushes the peers file, so a replica added or removed needs no reload either.
        got = self.target.push(inv, states, samples)
        pushed = None if got is None else got.peers if got.accepted else 0
        where = self.target.admin.url if self.target.admin is not None else "the balancer"
        superseded = None
        if got is not None and got.status == "stale":
            superseded = why_superseded(where, got.generation, got.current, peers_file=states is None)
        if got is not None and states is not None and self.log_outcome:
            self._note_refusal(where, got)
        return pushed, None, superseded, None

    def _held_back(self, text: str) -> str | None:
        """The error of this same config's failed reload while it is held back (None: try it)."""
        held = self._held
        return held[3] if held is not None and held[0] == text and time.monotonic() < held[1] else None

    def _hold(self, text: str, error: str) -> None:
        held = self._held
        delay = min(held[2] * 2, HOLD_MAX) if held is not None and held[0] == text else HOLD_FIRST
        self._held = (text, time.monotonic() + delay, delay, error)
        if self.log_outcome:
            log.warning("the reload failed: this config is tried again in %.0f s, not every cycle (another config, or "
                        "the file changed by someone else, at once)", delay)

    def _out_changed(self) -> bool:
        """Whether the config file is not what this controller last applied: another writer (an operator's
        `fdngx render --reload`, a config tool, a restore) changed it. Said at WARNING (once a minute at most)."""
        out = self.target.out
        if out is None or self._out_seen is None or identity(out) == self._out_seen:
            return False
        if time.monotonic() - self._said_out_at >= 60:
            if fdngx_wrote(read_bytes_or_none(real_target(out))) or self.target.force:
                log.warning("%s was changed by another writer since this controller applied it: rewriting it with "
                            "this controller's weights and options (to change them, restart the sidecar with new "
                            "options)", out)
            else:  # safe_apply refuses it (guards.check_replaceable): say so, not "rewriting"
                log.warning("%s was replaced by a file fdngx did not write: it is left as it is and nothing is applied "
                            "(move it away, or restart the sidecar with --force to replace it)", out)
            self._said_out_at = time.monotonic()
        return True

    def _note_refusal(self, where: str, got: PushResult) -> None:
        """The sidecar's policy push refused as older, said once per change (it pushes every cycle)
        (fdngx.nginx.generation.say_change; controller mode says it per frontend: fdngx.nginx.fanout)."""
        state = PushState.of(got.status, got.current)
        say_change(log, where, self._said_push, state, got.generation, got.current)
        self._said_push = state

    def _nginx_running(self, applied: ApplyResult | None) -> bool | None:
        """What the apply found, else a look at the master (a pid file and /proc: cheap every cycle), so a
        stopped nginx shows at once even while no weight changes."""
        if applied is not None and applied.nginx_running is not None:
            return applied.nginx_running
        control = self.target.control
        return control.running() if control is not None and self.target.reload else None

    def run_once(self, inv: Inventory, store: StateStore | None, *, save: bool = True,
                 save_stale: bool = True) -> CycleResult:
        """Cron: one step with the state from `store`, saved back under its lock. `save=False` (--diff,
        --check) reads the state and changes nothing; no store: a fresh state in memory. `save_stale=False`:
        a cycle whose inventory changed under it saves nothing either, as the run that follows scrapes again
        (its health checks would count twice toward fail_threshold and rise_threshold in one cron run)."""
        if store is None or not save:
            return self.step(inv, store.load() if store else PolicyState(), force_render=True)[0]
        with store.locked():
            result, new_state = self.step(inv, store.load(), force_render=True)
            if self.policy is not None and (save_stale or not result.stale_inputs):
                store.save(new_state)
        return result

    def _log(self, result: CycleResult) -> None:
        """One line per change, always; the apply's outcome only with log_outcome (the sidecar)."""
        error = result.error
        quiet = error is not None and error == self._last_error and time.monotonic() - self._last_error_at < 60
        if result.decisions is not None and not quiet:
            for d in result.decisions:
                if d.changed:
                    # A replica taken out, or a change nginx did not get, is what an operator must see.
                    # A drain is the operator's own doing: INFO, like a weight change; so is a change a stop
                    # the operator asked for kept from nginx (the next start applies it).
                    failed = error is not None and not result.stopped
                    level = logging.WARNING if failed or (d.down and not d.drained) else logging.INFO
                    log.log(level, "%s%s: %s", "NOT APPLIED " if error else "", d.name, d.reason)
            if result.decisions.fail_open and result.decisions.changed:
                log.warning("failing open: %s", result.decisions.fail_open)
        if result.decisions is not None and result.decisions.clock_back:
            log.warning("%s", result.decisions.clock_back)  # once: the state kept holds no such time
        if not self.log_outcome:
            return
        if error is not None and result.stopped:
            log.info("not applied: %s", error)  # a stop, asked for: the next start applies it
        elif error is not None:
            if not quiet:
                log.error("apply failed: %s", error)
                self._last_error, self._last_error_at = error, time.monotonic()
        elif self._last_error is not None:
            log.info("apply works again")
            self._last_error = None
        if result.applied is not None:
            if result.applied.recovered:
                log.warning("%s", result.applied.recovered)
            if result.applied.reloaded:  # the recovery, if any, was said just above
                log.info("%s", replace(result.applied, recovered="").summary)
            elif result.applied.nginx_running is False and not self._said_down:
                # Once until nginx runs again: the openresty flavor applies (compares) every cycle.
                log.warning("%s: nginx is not running: changes wait in the file until it starts",
                            result.applied.path)
            elif result.applied.nginx_running and self._said_down:
                log.info("%s: nginx is running again", result.applied.path)
            self._said_down = result.applied.nginx_running is False
