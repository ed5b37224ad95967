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
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass, replace
from typing import NamedTuple

from fdngx.domain import Inventory, LoadSample
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


@dataclass(frozen=True)
class Decisions:
    items: tuple[Decision, ...]
    fleet_load: float | None = None
    fail_open: str | None = None  # why the policy fell back to static weights, if it did

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


def _update_speeds(states: dict[str, InstanceState], active: list[str], config: PolicyConfig) -> None:
    """Speed factor of each active replica against the median TPOT of the active ones (2 or more); a
    replica that is stale, down or ramping is neutral (its speed is not known now)."""
    known = sorted(t for n in active if (t := states[n].tpot) is not None and t > 0)
    median = statistics.median(known) if len(known) >= 2 and config.speed_aware else None
    for name, st in states.items():
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


def _external(load: float, nginx_share: float) -> float:
    """Load beyond nginx's share, once it stands out of the noise: a count of in-flight requests wanders by
    about its square root, so less than two of those is not evidence of traffic from elsewhere."""
    excess = load - nginx_share
    return excess if excess >= 2.0 * math.sqrt(nginx_share + 1.0) else 0.0


def _update_corrections(
    states: dict[str, InstanceState],
    active: list[str],
    caps: Mapping[str, float],
    base: Mapping[str, float],
    top_slots: float,
    dt: float,
    config: PolicyConfig,
) -> float | None:
    """Move every replica's load correction toward the load model's estimate; returns the fleet load per
    (speed-adjusted) slot, None without fresh replicas.

    The model: nginx's weighted least_conn keeps its own in-flight requests per unit of weight about
    equal, so the replica with the least load per applied weight carries nginx's traffic only, and
    c = its load / its weight is nginx's in-flight per weight unit (replicas below half the median are
    left out of that minimum: nginx is not sending them their share, and no weight can change that).
    Whatever a replica carries beyond c x its weight came from elsewhere (other frontends, direct clients)
    or is KV pressure:

        external_i = L_i - c * w_i, counted once beyond 2 sqrt(c * w_i + 1) (noise)
                                                   L_i = smoothed requests (running + queued), w_i = applied
        want_i     = max(0, U * b_i - external_i) + soft * b_i
        f_i        = want_i / b_i / (sum(want) / sum(b))      1 when nothing is external

    with b_i = slots x static weight x speed (the effective slots) and U = sum(L) / sum(b).

    One step to the estimate, not an integral: nothing winds up while a weight waits for its reload, and a
    replica whose backlog drains gets its weight back as its load falls."""
    lo, hi = math.log(config.min_factor), math.log(config.max_factor)
    # A replica nginx has no weight for yet has had no traffic from it, and one failing /health may be
    # skipped by nginx's passive check: neither says anything about nginx's share.
    model = [n for n in active if states[n].weight is not None and not states[n].fails]
    if not active:
        for st in states.values():
            st.log_gain *= 0.5 ** (dt / config.stale_half_life)
        return None
    # Effective slots: capacity x static weight x speed (what the base weight and speed factor express).
    slots = {n: base[n] * top_slots / config.scale * states[n].speed for n in active}
    load = {n: (states[n].load or 0.0) * caps[n] for n in active}
    fleet = sum(load[n] for n in active) / sum(caps[n] * states[n].speed for n in active)
    want: dict[str, float] = {}
    if len(model) > 1:
        applied = {n: float(states[n].weight or 1) for n in model}
        ratios = {n: load[n] / applied[n] for n in model}
        # nginx's share per weight unit: the least loaded replica's, ignoring one far below the others
        # (nginx is not sending it its share: passive failure, ...; its weight cannot fix that).
        typical = statistics.median(ratios.values())
        per_weight = min(r for r in ratios.values() if r >= 0.5 * typical)
        share = sum(load[n] for n in model) / sum(slots[n] for n in model)  # requests per effective slot
        want = {n: max(0.0, share * slots[n] - _external(load[n], per_weight * applied[n])) + config.soft * slots[n]
                for n in model}
        mean = sum(want.values()) / sum(slots[n] for n in model)
    for name, st in states.items():
        if name in want:
            target = math.log(want[name] / slots[name] / mean) if want[name] > 0 else lo
            target = 0.0 if abs(target) <= config.tolerance else min(hi, max(lo, target))
            st.log_gain += config.gain * (target - st.log_gain)
        elif name in active:
            st.log_gain = 0.0  # alone, or new: nothing to compare with
        else:
            # Stale or down: fade toward neutral so a replica never keeps a verdict based on old data.
            st.log_gain *= 0.5 ** (dt / config.stale_half_life)
        st.log_gain = min(hi, max(lo, st.log_gain))
    return fleet


def decide(
    samples: Mapping[str, LoadSample],
    inventory: Inventory,
    state: PolicyState,
    config: PolicyConfig,
    now: float,
) -> tuple[Decisions, PolicyState]:
    """One policy cycle. Does not mutate `state`; returns the decisions and the state to keep."""
    insts = sorted(inventory.instances, key=lambda i: i.name)
    # A weight stored by a run with a bigger --scale is brought into this run's bounds before anything uses it.
    prev = {n: replace(st, weight=None if st.weight is None else max(1, min(config.max_weight, st.weight)))
            for n, st in state.instances.items()}
    states = {i.name: replace(prev[i.name]) if i.name in prev else InstanceState() for i in insts}
    dt = config.interval if state.updated_at is None else max(0.0, now - state.updated_at)
    for inst in insts:
        fold_health(states[inst.name], samples.get(inst.name), now)
        fold_metrics(states[inst.name], samples.get(inst.name), inst, now, config)

    caps = {i.name: states[i.name].capacity or float(i.max_num_seqs) for i in insts}
    base = base_weights(inventory, caps, config)
    want_down = {}
    for inst in insts:
        st = states[inst.name]
        # Once down, a replica needs `recover_threshold` good checks in a row; up, `fail_threshold` bad (and,
        # when nothing listens, `refused_grace` seconds: nginx's passive check covers that without a reload).
        if st.down:
            want_down[inst.name] = st.oks < config.recover_threshold
        else:
            graced = st.refused and st.failing_since is not None and now - st.failing_since < config.refused_grace
            want_down[inst.name] = st.fails >= config.fail_threshold and not graced
    for inst in insts:
        st = states[inst.name]
        if st.down and not want_down[inst.name] and st.weight is not None:
            # Back from down: the ramp starts now, from neutral (its old correction and speed say nothing now).
            st.recovered_at, st.log_gain, st.tpot, st.speed = now, 0.0, None, 1.0
    fresh = {i.name for i in insts if _fresh(states[i.name], now, config)}
    # A ramping replica is under-loaded on purpose: letting its load steer the correction would wind the
    # integral up and overshoot once the ramp ends. It rejoins at neutral.
    ramping = {i.name for i in insts if _ramp_step(states[i.name], now, config) is not None}
    active = [i.name for i in insts if i.name in fresh and not want_down[i.name] and i.name not in ramping]
    _update_speeds(states, active, config)
    top_slots = max((caps[i.name] * i.weight for i in insts), default=1.0)
    fleet = _update_corrections(states, active, caps, base, top_slots, dt, config)

    fail_open = None
    if insts and all(want_down.values()):
        fail_open = "all replicas fail /health"
    elif insts and not fresh:
        fail_open = "no replica has fresh metrics"

    recent = [t for t in state.reloads if now - t < _WINDOW]
    plans = {
        i.name: _plan(
            states[i.name],
            prev.get(i.name),
            samples.get(i.name),
            base[i.name],
            want_down[i.name],
            i.name in fresh,
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
        weight, down, reason, change, exempt, wanted, what, initial = plans[inst.name]
        st, old = states[inst.name], prev.get(inst.name)
        old_w = old.weight if old else None
        if reloading and not change and not down and old_w is not None and wanted != old_w and not fail_open:
            weight, change = wanted, True
            reason = f"{what}; weight {old_w}->{wanted} (with this reload)"
        held = change and not exempt and not budget_ok
        if held:
            weight, down, change = old_w or weight, old.down if old else down, False
            budget = f"hold: reload budget exhausted ({config.max_reloads_per_minute}/min)"
            reason = f"{budget}; {what}; wanted {old_w}->{wanted}"
        if change and not initial:
            st.last_change_at = now
        st.weight, st.down = weight, down
        sample = samples.get(inst.name)
        signal = sample is not None and sample.ok and st.last_error is None
        items.append(Decision(inst.name, weight, down, reason, change, old_w, wanted, st.load, st.speed, held, signal))
    decisions = Decisions(tuple(items), fleet, fail_open)
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


def _plan(
    st: InstanceState,
    old: InstanceState | None,
    s: LoadSample | None,
    base: float,
    want_down: bool,
    fresh: bool,
    fleet: float | None,
    fail_open: str | None,
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
        what = f"/health failed {st.fails}/{config.fail_threshold} ({st.health_error}); {what}"
    if old_w is None:
        return _Plan(wanted, False, f"initial: {what}; weight {wanted}", True, True, wanted, initial=True)
    if wanted == old_w:
        return _Plan(old_w, False, f"{ramp}{what}; weight {old_w}", False, False, wanted, f"{ramp}{what}")
    if step is None and not skipped:  # a ramp step, or its early end, is not held back
        if abs(wanted - old_w) < max(config.deadband_abs, config.deadband_rel * old_w):
            reason = f"{what}; weight {old_w} (wanted {wanted}: within dead-band)"
            return _Plan(old_w, False, reason, False, False, wanted, what)
        since = now - old.last_change_at if old and old.last_change_at is not None else math.inf
        if since < config.min_hold:
            reason = f"hold: changed {since:.0f}s ago (min {config.min_hold:.0f}s); {what}; wanted {old_w}->{wanted}"
            return _Plan(old_w, False, reason, False, False, wanted, what)
    # An early end of the ramp is exempt from the reload budget: the fleet is queueing now (at most one
    # such reload per recovery, and the recovery itself is not exempt).
    exempt = bool(skipped)
    return _Plan(wanted, False, f"{ramp}{what}; weight {old_w}->{wanted}", True, exempt, wanted, f"{ramp}{what}")
