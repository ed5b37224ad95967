"""The weight policy. PURE: samples + previous state + config + now -> decisions and the next state.

nginx's least_conn stays in charge of each request; a weight only tells it how many in-flight requests a
replica should carry relative to the others. So a weight carries what nginx cannot see:

    base_i   = scale * capacity_i * static_i / max_j(capacity_j * static_j)     (slots: max_batch_size)
    u_i      = EWMA((running_i + queued_i) / capacity_i + kv_gain * kv_excess_i)  (normalised load)
    s_i      = median_j(tpot_j) / tpot_i when beyond `speed_tolerance`, else 1   (decode speed factor)
    g_i      = the load model's correction for traffic nginx does not see (see _update_corrections)
    weight_i = round(base_i * s_i * g_i * ramp_i), clamped to 1..max_weight

When nginx is the only source of traffic, least_conn already equalises in-flight per weight, the model
finds nothing external and g stays 1: the weight is the capacity weight and nothing moves. Traffic nginx
does not see (other frontends, direct clients) or KV pressure shows up as load beyond nginx's share, and
g lowers that replica's weight in one step toward where the loads meet. `soft` keeps an idle fleet
(0 vs 1 running) from moving anything. Dead-band, minimum hold and a reload budget keep reloads rare,
because every reload also resets nginx's own balancing state; health changes (down, and back up) are
exempt from the budget: restoring capacity never waits.

Speed (`speed_aware`; see config_for_flavor for when it pays): tpot_i is the EWMA of the replica's mean
time per output token between scrapes, from the engine's TPOT histogram. A replica decoding at half the
fleet's speed takes twice as long per request, so it gets half the weight and half the in-flight
requests; its load target scales the same way, so the correction does not undo it. Off, s_i = 1.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Collection, Iterator, Mapping
from dataclasses import asdict, dataclass, replace
from typing import NamedTuple

from fdngx.domain import FailOpen, Inventory, LoadSample, address_key, canonical_hostport, hostport
from fdngx.weights.model import update_corrections
from fdngx.weights.sample import describe, fold_health, fold_metrics
from fdngx.weights.settings import PolicyConfig
from fdngx.weights.state import InstanceState, PolicyState

_WINDOW = 60.0  # the reload budget is per minute


@dataclass(frozen=True)
class Decision:
    name: str
    weight: int
    down: bool
    reason: str
    changed: bool
    previous: int | None = None  # weight applied before this cycle
    wanted: int | None = None  # what the formula asked for (before dead-band, hold, budget)
    load: float | None = None  # smoothed per-slot load
    speed: float = 1.0  # decode speed factor in the weight
    budget_held: bool = False  # a change the reload budget held back this cycle
    load_signal: bool = True  # this cycle's metrics were read and believed (False: failed or "metrics invalid")
    backup: bool = False  # nginx's `backup`: traffic from elsewhere fills it (see _update_corrections)
    drained: bool = False  # held out by the operator (`fdngx drain`), not for its health: nothing to alert on


@dataclass(frozen=True)
class Decisions:
    items: tuple[Decision, ...]
    fleet_load: float | None = None
    fail_open: FailOpen | None = None  # why the policy fell back to static weights, if it did
    clock_back: str | None = None  # the state held times from the future (a clock stepped back): log it once

    @property
    def changed(self) -> bool:
        return any(d.changed for d in self.items)

    def by_name(self) -> dict[str, Decision]:
        return {d.name: d for d in self.items}

    def __iter__(self) -> Iterator[Decision]:
        return iter(self.items)

    def __len__(self) -> int:
        return len(self.items)


def base_weights(inventory: Inventory, capacities: Mapping[str, float], config: PolicyConfig) -> dict[str, float]:
    """Capacity weights: the biggest replica (slots x static weight) gets `scale`."""
    raw = {i.name: capacities.get(i.name, float(i.max_num_seqs)) * i.weight for i in inventory.instances}
    top = max(raw.values(), default=1.0) or 1.0
    return {name: config.scale * v / top for name, v in raw.items()}


def _quantise(x: float, config: PolicyConfig) -> int:
    if not math.isfinite(x):
        return config.max_weight if x > 0 else 1
    return max(1, min(config.max_weight, round(x)))


def _update_speeds(
    states: dict[str, InstanceState], active: list[str], settling: Collection[str], config: PolicyConfig
) -> None:
    """Speed factor of each active replica against the median TPOT of the active ones (2 or more); a
    replica that is stale, down or ramping is neutral (its speed is not known now). A settling one (metrics
    back after a gap or a restart) keeps its factor and stays out of the median: its first tokens are the
    restart's transient, not its hardware."""
    known = sorted(t for n in active if n not in settling and (t := states[n].tpot) is not None and t > 0)
    median = statistics.median(known) if len(known) >= 2 and config.speed_aware else None
    for name, st in states.items():
        if name in settling and config.speed_aware:
            continue
        if median is None or name not in active or st.tpot is None or st.tpot <= 0:
            st.speed = 1.0
            continue
        ratio = median / st.tpot
        # Hysteresis: a factor in force stays while beyond half the tolerance, so a replica at the edge
        # does not flip between two weights.
        edge = config.speed_tolerance / 2 if st.speed != 1 else config.speed_tolerance
        st.speed = min(config.max_speed, max(config.min_speed, ratio)) if abs(math.log(ratio)) > edge else 1.0


def _fresh(st: InstanceState, now: float, config: PolicyConfig) -> bool:
    return st.last_ok_at is not None and now - st.last_ok_at <= config.stale_after


def _resumed_for(st: InstanceState, now: float) -> float:
    """Seconds since the replica's metrics came back after a gap or a restart (inf: not lately)."""
    return now - st.resumed_at if st.resumed_at is not None else math.inf


def _ramp_step(st: InstanceState, now: float, config: PolicyConfig) -> int | None:
    """Step 1..ramp_steps of the ramp after recovery, None when not ramping."""
    if st.recovered_at is None or config.ramp_duration <= 0:
        return None
    step = int((now - st.recovered_at) / config.ramp_duration * config.ramp_steps) + 1
    return max(1, step) if step <= config.ramp_steps else None


def _ramp(st: InstanceState, now: float, config: PolicyConfig) -> tuple[float, int | None]:
    """Fraction of the weight during the ramp and its step; clears the ramp once it is over."""
    step = _ramp_step(st, now, config)
    if step is None:
        st.recovered_at = None
        return 1.0, None
    return step / config.ramp_steps, step


def _carried(st: InstanceState | None, address: str) -> InstanceState:
    """A replica's state this cycle: its last one, unless it has none or that was of another address (a
    replacement on a new port or host is another server: it starts as a new replica)."""
    if st is None or (st.address not in (None, address) and canonical_hostport(st.address) != address):
        return InstanceState(address=address)
    return replace(st, address=address)


def decide(
    samples: Mapping[str, LoadSample],
    inventory: Inventory,
    state: PolicyState,
    config: PolicyConfig,
    now: float,
) -> tuple[Decisions, PolicyState]:
    """One policy cycle. Does not mutate `state`; returns the decisions and the state to keep."""
    insts = sorted(inventory.instances, key=lambda i: i.name)
    state, ahead = state.clamped(now)  # a clock stepped back: every stored time reads as `now` at most
    # A weight stored by a run with a bigger --scale is brought into this run's bounds before anything uses it.
    prev = {n: replace(st, weight=None if st.weight is None else max(1, min(config.max_weight, st.weight)))
            for n, st in state.instances.items()}
    states = {i.name: _carried(prev.get(i.name), hostport(*address_key(i.host, i.port))) for i in insts}
    dt = config.interval if state.updated_at is None else max(0.0, now - state.updated_at)
    for inst in insts:
        fold_health(states[inst.name], samples.get(inst.name), now)
        fold_metrics(states[inst.name], samples.get(inst.name), inst, now, config)

    # Drained (planned maintenance): held out, still scraped (its in-flight count tells when it may stop), but
    # neither failing nor part of the fleet's load, speed or fail-open verdicts.
    drained = {i.name for i in insts if i.drain}
    caps = {i.name: states[i.name].capacity or float(i.max_num_seqs) for i in insts}
    base = base_weights(inventory, caps, config)
    want_down = {}
    for inst in insts:
        st = states[inst.name]
        # Once down, a replica needs `recover_threshold` good checks in a row; up, `fail_threshold` bad (and,
        # when nothing listens, `refused_grace` seconds: nginx's passive check covers that without a reload).
        if st.down and not st.drained:
            want_down[inst.name] = st.oks < config.recover_threshold
        else:
            graced = st.refused and st.failing_since is not None and now - st.failing_since < config.refused_grace
            want_down[inst.name] = st.fails >= config.fail_threshold and not graced
    for inst in insts:
        st = states[inst.name]
        if st.down and not st.drained and not want_down[inst.name] and st.weight is not None:
            # Back from down: the ramp starts now, from neutral (its old correction and speed say nothing now).
            st.recovered_at, st.log_gain, st.tpot, st.speed = now, 0.0, None, 1.0
    fresh = {i.name for i in insts if _fresh(states[i.name], now, config)}
    # A ramping replica is under-loaded on purpose: letting its load steer the correction would wind the
    # integral up and overshoot once the ramp ends. It rejoins at neutral.
    ramping = {i.name for i in insts if _ramp_step(states[i.name], now, config) is not None}
    active = [i.name for i in insts
              if i.name in fresh and not want_down[i.name] and i.name not in ramping and i.name not in drained]
    # Back from a gap or a restart, a replica's reading is a transient (nginx's passive check lets it fill
    # again; its smoothed load still holds the old readings, its first tokens run in an empty batch): it says
    # nothing of nginx's share per weight, nor of its speed. Its correction and speed factor wait, so its
    # weight moves only for what the restart did change: its capacity (a new max_num_seqs).
    settling = {n for n in active if _resumed_for(states[n], now) < config.min_hold}
    _update_speeds(states, active, settling, config)
    top_slots = max((caps[i.name] * i.weight for i in insts), default=1.0)
    fleet = update_corrections(states, active, caps, base, top_slots, dt, config, settling)

    serving = [i.name for i in insts if i.name not in drained]
    fail_open = (FailOpen.UNHEALTHY if serving and all(want_down[n] for n in serving)
                 else FailOpen.STALE if serving and not fresh.intersection(serving) else None)

    recent = [t for t in state.reloads if now - t < _WINDOW]
    plans = {
        i.name: _drained(states[i.name], prev.get(i.name), samples.get(i.name), base[i.name], config)
        if i.name in drained else _plan(
            states[i.name],
            prev.get(i.name),
            samples.get(i.name),
            base[i.name],
            want_down[i.name],
            i.name in fresh,
            i.name in settling,
            fleet,
            fail_open,
            now,
            config,
        )
        for i in insts
    }

    # One cycle = at most one reload. An exempt change (health, fail-open, first weights) pays for the
    # reload anyway; otherwise the budget decides. Once a reload is paid for, every other replica whose
    # wanted weight differs rides along (dead-band and hold only exist to save reloads), so one reload
    # carries the whole current estimate instead of spending the budget one replica at a time.
    exempt_change = any(p.changed and p.exempt for p in plans.values())
    budget_ok = exempt_change or len(recent) < config.max_reloads_per_minute
    reloading = any(p.changed and (p.exempt or budget_ok) for p in plans.values())
    items = []
    for inst in insts:
        weight, down, reason, change, exempt, wanted, what, initial, backup = plans[inst.name]
        st, old = states[inst.name], prev.get(inst.name)
        old_w, old_backup = (old.weight, old.backup) if old else (None, False)
        if reloading and not change and not down and old_w is not None and wanted != old_w and not fail_open:
            weight, change = wanted, True
            reason = f"{what}; weight {old_w}->{wanted} (with this reload)"
        held = change and not exempt and not budget_ok
        if held:
            weight, down, change, backup = old_w or weight, old.down if old else down, False, old_backup
            budget = f"hold: reload budget exhausted ({config.max_reloads_per_minute}/min)"
            reason = f"{budget}; {what}; wanted {old_w}->{wanted}"
        if change and not initial:
            st.last_change_at = now
        st.weight, st.down, st.backup, st.drained = weight, down, backup, inst.name in drained
        sample = samples.get(inst.name)
        signal = sample is not None and sample.ok and st.last_error is None
        items.append(Decision(inst.name, weight, down, reason, change, old_w, wanted, st.load, st.speed, held, signal,
                              backup, inst.name in drained))
    decisions = Decisions(tuple(items), fleet, fail_open, PolicyState.clock_note(ahead))
    reloads = [*recent, now] if decisions.changed else recent
    return decisions, PolicyState(states, reloads, now, asdict(config))


class _Plan(NamedTuple):
    weight: int
    down: bool
    reason: str
    changed: bool
    exempt: bool  # from the reload budget (health, fail-open, first weights)
    wanted: int
    what: str = ""  # what the replica looks like, for a reason that replaces this one
    initial: bool = False  # first weights: they start no hold time (the first load correction may follow)
    backup: bool = False  # nginx's `backup` (the load model's overflow verdict)


def in_flight(s: LoadSample | None) -> tuple[float | None, str]:
    """What still runs on a replica (None: not known) and how to say it: the drain's progress."""
    if s is not None and s.ok:
        left = s.running + s.queued
        return left, (f"{left:.0f} request(s) in flight (running {s.running:.0f}, queued {s.queued:.0f})" if left
                      else "nothing in flight: safe to stop")
    return None, f"in-flight count unknown ({'not scraped' if s is None else s.error})"


def _drained(st: InstanceState, old: InstanceState | None, s: LoadSample | None, base: float,
             config: PolicyConfig) -> _Plan:
    """A drained replica: `down`, its weight kept for its return; the reason says what is still in flight."""
    w = old.weight if old is not None and old.weight is not None else _quantise(base, config)
    what = in_flight(s)[1]
    # Exempt from the budget like any hold-out; a change only if nginx does not hold it out already.
    return _Plan(w, True, f"draining: {what}", not (old is not None and old.down), True, w, f"draining: {what}")


def _plan(
    st: InstanceState,
    old: InstanceState | None,
    s: LoadSample | None,
    base: float,
    want_down: bool,
    fresh: bool,
    settling: bool,
    fleet: float | None,
    fail_open: FailOpen | None,
    now: float,
    config: PolicyConfig,
) -> _Plan:
    """What one replica should get this cycle, before the fleet-wide reload budget."""
    old_w, old_down = (old.weight, old.down) if old else (None, False)
    if fail_open:
        w = _quantise(base, config)
        st.recovered_at = None
        change = old_w != w or old_down
        return _Plan(w, False, f"fail open: {fail_open}; static weight {w}", change, True, w)
    if want_down:
        w = old_w or _quantise(base, config)
        if old_down:
            why = (
                f"down: /health failing ({st.health_error})"
                if st.fails
                else (f"down: /health ok {st.oks}/{config.recover_threshold} toward recovery")
            )
            return _Plan(w, True, why, False, True, w)
        return _Plan(w, True, f"down: /health failed {st.fails}x ({st.health_error})", True, True, w)
    if old is not None and old.drained:
        # Back from a drain: at full weight, no ramp (it was held out by choice, not for failing), from neutral.
        st.log_gain, st.tpot, st.speed, st.recovered_at = 0.0, None, 1.0, None
        w = _quantise(base, config)
        return _Plan(w, False, f"back in rotation after a drain; weight {w}", old_down or old_w != w, True, w)
    recovering = old_down and old_w is not None
    frac, step = _ramp(st, now, config)
    skipped = ""
    if step is not None and fleet is not None and fleet >= config.ramp_until_load:
        st.recovered_at = None
        frac, step = 1.0, None
        skipped = f"ramp ended: the others queue ({fleet:.2f}/slot); "
    g = math.exp(st.log_gain)
    wanted = _quantise(base * st.speed * g * frac, config)
    ramp = f"ramp {step}/{config.ramp_steps} after recovery; " if step is not None else skipped
    if recovering:
        # Exempt from the budget: restoring capacity must never wait for a reload slot (a flapping replica
        # still needs fail_threshold bad and recover_threshold good checks per round trip).
        up = f"up: /health ok {st.oks}x; {ramp}"
        return _Plan(wanted, False, f"{up}weight {wanted}", True, True, wanted, up.removesuffix("; "))
    if fresh:
        what = describe(s, st, fleet)
    else:
        age = "never read" if st.last_ok_at is None else f"{now - st.last_ok_at:.0f}s old"
        what = f"stale metrics ({age}: {st.last_error}); fading to neutral"
    if st.fails:
        left = 0.0 if not st.refused or st.failing_since is None else config.refused_grace - (now - st.failing_since)
        grace = (f"; down in {left:.0f}s unless it listens again, --refused-grace"  # the grace alone keeps it up
                 if left > 0 and st.fails >= config.fail_threshold else "")
        what = f"/health failed {st.fails}/{config.fail_threshold} ({st.health_error}{grace}); {what}"
    elif settling:
        what = (f"settling: metrics back {_resumed_for(st, now):.0f}s ago after a gap or a restart "
                f"(min {config.min_hold:.0f}s), correction and speed wait; {what}")
    if old_w is None:
        return _Plan(wanted, False, f"initial: {what}; weight {wanted}", True, True, wanted, initial=True)
    old_backup = bool(old and old.backup)
    if st.overflow or not old_backup:
        st.calm_since = None
    elif st.calm_since is None:
        st.calm_since = now
    if old_backup and not st.overflow and (fleet is None or fleet < 1.0) and now - st.calm_since < config.min_hold:
        # Not yet: a lull (the other clients pause, a burst ends) also empties it, and nginx would then
        # flood it at full weight until the traffic from elsewhere is back (bench.lb: p99 TTFT 1.0-1.4 s).
        # The verdict must hold for min_hold first, unless the others queue (then the capacity is needed).
        st.overflow = True
        why = (f"{what}; backup: looks free for {now - st.calm_since:.0f}s of {config.min_hold:.0f}s "
               "(or until the others queue)")
        return _Plan(old_w, False, why, False, False, old_w, what, backup=True)
    if st.overflow != old_backup:
        if not st.overflow:
            # Exempt: giving nginx a replica back is restoring capacity, which never waits for the budget. At the
            # weight its room calls for: in backup its whole load is from elsewhere, and the correction follows
            # it all the way (fdngx.weights.model), so traffic that has gone leaves it neutral.
            why = f"{what}; back from backup, weight {old_w}->{wanted}"
            return _Plan(wanted, False, why, True, True, wanted, what)
        since = now - old.last_change_at if old and old.last_change_at is not None else math.inf
        # Protective, like `down`: a replica already holding more requests than it has slots queues nginx's
        # share behind the traffic from elsewhere for as long as the hold lasts (bench.lb, after a lull had
        # brought it back: 11 s at 2.3 requests per slot, p99 TTFT 1.4 s). The reload budget still applies.
        queueing = (st.load or 0.0) > 1.0
        if since >= config.min_hold or queueing:
            why = (f"{what}; backup (traffic from elsewhere fills it: nginx sends it none while the others are "
                   f"up); weight {old_w}->{wanted}")
            return _Plan(wanted, False, why, True, False, wanted, what, backup=True)
    if wanted == old_w or old_backup:
        # Still backup: nginx sends it nothing while the others are up, whatever its weight; worth no reload.
        say = f"{'backup, ' if old_backup else ''}weight {old_w}{f' (wanted {wanted})' if wanted != old_w else ''}"
        return _Plan(old_w, False, f"{ramp}{what}; {say}", False, False, wanted, f"{ramp}{what}", backup=old_backup)
    if step is None and not skipped:  # a ramp step, or its early end, is not held back
        if abs(wanted - old_w) < max(config.deadband_abs, config.deadband_rel * old_w):
            reason = f"{what}; weight {old_w} (wanted {wanted}: within dead-band)"
            return _Plan(old_w, False, reason, False, False, wanted, what, backup=old_backup)
        since = now - old.last_change_at if old and old.last_change_at is not None else math.inf
        if since < config.min_hold:
            reason = f"hold: changed {since:.0f}s ago (min {config.min_hold:.0f}s); {what}; wanted {old_w}->{wanted}"
            return _Plan(old_w, False, reason, False, False, wanted, what, backup=old_backup)
    # An early end of the ramp is exempt from the reload budget: the fleet is queueing now (at most one
    # such reload per recovery).
    exempt = bool(skipped)
    return _Plan(wanted, False, f"{ramp}{what}; weight {old_w}->{wanted}", True, exempt, wanted, f"{ramp}{what}",
                 backup=old_backup)
