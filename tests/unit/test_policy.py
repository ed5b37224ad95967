"""The weight policy, driven cycle by cycle with made-up samples and a made-up clock."""

from __future__ import annotations

import copy
import itertools
import json
import random
from collections.abc import Callable
from dataclasses import replace

import pytest

from fdngx.domain import Instance, Inventory, LoadSample
from fdngx.errors import UsageError
from fdngx.weights.policy import Decisions, decide
from fdngx.weights.settings import PolicyConfig, config_for_flavor, config_of_state
from fdngx.weights.state import PolicyState

T0 = 1_000_000.0
CFG = PolicyConfig()


def inventory(*caps: int, weights: tuple[int, ...] | None = None) -> Inventory:
    weights = weights or (1,) * len(caps)
    return Inventory(
        [
            Instance(f"dp{n}", "127.0.0.1", 8000 + n, 9000 + n, max_num_seqs=c, weight=w)
            for n, (c, w) in enumerate(zip(caps, weights, strict=True))
        ]
    )


def sample(
    name: str,
    running: float = 20,
    queued: float = 0,
    kv: float | None = 0.3,
    cap: float | None = None,
    healthy: bool = True,
    ok: bool = True,
    reliable: bool = True,
    health_error: str | None = None,
) -> LoadSample:
    if not ok:
        return LoadSample(name, False, healthy, error="read timeout", health_error=health_error)
    return LoadSample(name, True, healthy, running, queued, kv, cap, reliable, health_error=health_error)


SampleFn = Callable[[int, str], LoadSample]


class LeastConn:
    """A closed loop: nginx's weighted least_conn spreads `total` in-flight requests over the replicas in
    proportion to the weights the policy applied last (20 each before the first), and `external` adds load
    nginx does not see. `make(k, name, running)` builds the sample (default: sample(name, running))."""

    def __init__(self, names: list[str], total: float, external: dict[str, float] | None = None,
                 make: Callable[[int, str, float], LoadSample] | None = None) -> None:
        self.names, self.total, self.external = names, total, external or {}
        self.make = make or (lambda k, name, running: sample(name, running=running))
        self.weights = dict.fromkeys(names, 20)

    def observe(self, d: Decisions) -> None:
        # nginx sends a `backup` server nothing while the others are available.
        self.weights = {x.name: 0 if x.backup else x.weight for x in d}

    def running(self, name: str) -> float:
        return self.total * self.weights[name] / sum(self.weights.values()) + self.external.get(name, 0.0)

    def __call__(self, k: int, name: str) -> LoadSample:
        return self.make(k, name, self.running(name))


def run(
    inv: Inventory,
    fn: SampleFn,
    cycles: int,
    cfg: PolicyConfig = CFG,
    state: PolicyState | None = None,
    start: float = T0,
) -> tuple[list[Decisions], PolicyState, float]:
    """`cycles` policy cycles `cfg.interval` apart; fn(cycle, name) gives each sample."""
    state = state or PolicyState()
    out = []
    t = start
    for k in range(cycles):
        samples = {i.name: fn(k, i.name) for i in inv.instances}
        d, state = decide(samples, inv, state, cfg, t)
        if isinstance(fn, LeastConn):
            fn.observe(d)
        out.append(d)
        t += cfg.interval
    return out, state, t


def weights(d: Decisions) -> dict[str, int]:
    return {x.name: x.weight for x in d}


def even(per_slot: float = 0.5) -> SampleFn:
    return lambda k, name: sample(name, running=per_slot * 64)


# -- capacity -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("caps", "static", "metric_caps", "expected"),
    [
        ((64, 64), (1, 1), (None, None), {"dp0": 20, "dp1": 20}),
        ((64, 32), (1, 1), (None, None), {"dp0": 20, "dp1": 10}),  # inventory max_num_seqs
        ((64, 64), (1, 1), (64.0, 32.0), {"dp0": 20, "dp1": 10}),  # metrics max_batch_size wins
        ((64, 64), (2, 1), (None, None), {"dp0": 20, "dp1": 10}),  # static weight multiplies
        ((128, 64, 64, 32), (1, 1, 1, 1), (None,) * 4, {"dp0": 20, "dp1": 10, "dp2": 10, "dp3": 5}),
    ],
)
def test_capacity_sets_the_neutral_weight(
    caps: tuple[int, ...], static: tuple[int, ...], metric_caps: tuple[float | None, ...], expected: dict[str, int]
) -> None:
    inv = inventory(*caps, weights=static)
    cap_of = {f"dp{n}": c for n, c in enumerate(metric_caps)}
    real = {f"dp{n}": c or caps[n] for n, c in enumerate(metric_caps)}
    share = {f"dp{n}": w / max(static) for n, w in enumerate(static)}

    # What least_conn does with those weights: the replica with twice the slots (or twice the static
    # weight) runs twice the requests.
    def fn(k: int, name: str) -> LoadSample:
        return sample(name, running=0.5 * real[name] * share[name], cap=cap_of[name])

    ds, _, _ = run(inv, fn, 20)
    assert weights(ds[-1]) == expected
    assert all(not d.changed for d in ds[1:]), "balanced load must not move anything after the first cycle"


# -- load -----------------------------------------------------------------------------------------------


def test_queue_build_up_lowers_weight_and_others_take_it() -> None:
    inv = inventory(64, 64, 64, 64)

    def fn(k: int, name: str) -> LoadSample:
        if name == "dp0" and k >= 5:
            return sample(name, running=64, queued=12)  # traffic nginx cannot see
        return sample(name, running=40)

    ds, _, _ = run(inv, fn, 40)
    before, after = weights(ds[4]), weights(ds[-1])
    assert before == {"dp0": 20, "dp1": 20, "dp2": 20, "dp3": 20}
    assert after["dp0"] <= 10, after
    assert all(after[n] >= 20 for n in ("dp1", "dp2", "dp3")), after
    dp0 = [d.by_name()["dp0"] for d in ds]
    moves = [x for x in dp0 if x.changed and x.weight < 20]
    assert moves and "queue 12" in moves[0].reason and "->" in moves[0].reason
    # Monotone: a persistent overload never bounces back up while it lasts.
    series = [x.weight for x in dp0]
    assert all(b <= a for a, b in itertools.pairwise(series[5:]))


def test_unreliable_queue_is_ignored() -> None:
    inv = inventory(64, 64)

    def fn(k: int, name: str) -> LoadSample:
        # An old FastDeploy reports a made-up backlog on dp0: only running counts there.
        return sample(name, running=30, queued=50 if name == "dp0" else 0, reliable=False)

    ds, _, _ = run(inv, fn, 30)
    assert weights(ds[-1]) == {"dp0": 20, "dp1": 20}
    assert "queue unknown" in ds[-1].by_name()["dp0"].reason


@pytest.mark.parametrize(("kv", "lowered"), [(0.99, True), (0.8, False)])
def test_kv_pressure(kv: float, lowered: bool) -> None:
    inv = inventory(64, 64, 64)

    def fn(k: int, name: str) -> LoadSample:
        return sample(name, running=30, kv=kv if name == "dp0" else 0.4)

    ds, _, _ = run(inv, fn, 40)
    w = weights(ds[-1])
    assert (w["dp0"] < 16) is lowered, w
    assert w["dp1"] == w["dp2"] >= 20


def test_idle_fleet_noise_moves_nothing() -> None:
    inv = inventory(64, 64)
    ds, _, _ = run(inv, lambda k, n: sample(n, running=1 if n == "dp0" else 0, kv=0.01), 60)
    assert weights(ds[-1]) == {"dp0": 20, "dp1": 20}


# -- stability ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_noisy_steady_load_reloads_at_most_once_a_minute(seed: int) -> None:
    rng = random.Random(seed)
    inv = inventory(64, 64, 64, 64)

    def fn(k: int, name: str) -> LoadSample:
        running = min(64.0, max(0.0, rng.gauss(45, 8)))
        return sample(name, running=running, queued=max(0.0, rng.gauss(0, 2)), kv=rng.uniform(0.3, 0.7))

    ds, _, _ = run(inv, fn, 300)  # 10 minutes at 2 s
    reloads = sum(d.changed for d in ds[1:])
    assert reloads <= 10, [x.reason for d in ds if d.changed for x in d if x.changed]


def _one(inv: Inventory, state: PolicyState, t: float, cfg: PolicyConfig = CFG, **over: float) -> Decisions:
    samples = {i.name: sample(i.name, **over) if i.name == "dp0" else sample(i.name) for i in inv.instances}
    d, _ = decide(samples, inv, state, cfg, t)
    return d


def test_dead_band_and_hold_reasons() -> None:
    inv = inventory(64, 64)
    _, state, t = run(inv, even(20 / 64), 3)
    st0 = state.instances["dp0"]
    # Pretend the correction already wants dp0 a little lower: 20 -> 18 is inside the 20% dead-band.
    st0.log_gain = -0.1
    d = _one(inv, state, t).by_name()["dp0"]
    assert not d.changed and d.weight == 20 and "dead-band" in d.reason
    # A big move right after a change is held until min_hold has passed.
    st0.log_gain, st0.last_change_at = -1.0, t - 4
    d = _one(inv, state, t).by_name()["dp0"]
    assert not d.changed and d.weight == 20 and "hold: changed 4s ago" in d.reason
    st0.last_change_at = t - CFG.min_hold - 1
    d = _one(inv, state, t).by_name()["dp0"]
    assert d.changed and d.weight < 16 and "20->" in d.reason


def test_reload_budget_caps_changes_per_minute() -> None:
    cfg = PolicyConfig(max_reloads_per_minute=2, min_hold=0, deadband_abs=0, deadband_rel=0.0, gain=2.0)
    inv = inventory(64, 64)

    def fn(k: int, name: str) -> LoadSample:
        hot = "dp0" if (k // 2) % 2 else "dp1"  # load flips every 2 cycles: wants a change almost every cycle
        return sample(name, running=64 if name == hot else 10, queued=20 if name == hot else 0)

    ds, _, _ = run(inv, fn, 60, cfg)
    times = [T0 + k * cfg.interval for k, d in enumerate(ds) if d.changed and k > 0]
    for t in times:
        assert sum(1 for u in times if t - 60 < u <= t) <= 2
    assert any("reload budget exhausted (2/min)" in x.reason for d in ds for x in d)
    # The flag the sidecar logs from marks exactly those decisions, none of which changed anything.
    held = [x for d in ds for x in d if x.budget_held]
    assert held and all(not x.changed and "reload budget exhausted" in x.reason for x in held)
    assert all(x.budget_held for d in ds for x in d if "reload budget exhausted" in x.reason)


# -- health ---------------------------------------------------------------------------------------------


def test_down_after_k_failed_health_checks() -> None:
    inv = inventory(64, 64)

    def fn(k: int, name: str) -> LoadSample:
        bad = name == "dp1" and k >= 2
        return sample(name, healthy=not bad, health_error="404" if bad else None)

    ds, _, _ = run(inv, fn, 6)
    dp1 = [d.by_name()["dp1"] for d in ds]
    assert [x.down for x in dp1] == [False, False, False, False, True, True]
    assert dp1[4].changed and dp1[4].reason == "down: /health failed 3x (404)"
    assert not dp1[5].changed
    assert not any(d.by_name()["dp0"].down for d in ds)


def test_a_name_at_another_address_starts_as_a_new_replica() -> None:
    # dp1 is down; the inventory now names dp1 at another port (its replacement): the old server's failures,
    # correction and speed are not the new one's. The same address again keeps its history.
    inv = inventory(64, 64)

    def fn(k: int, name: str) -> LoadSample:
        return sample(name, healthy=name != "dp1", health_error="refused" if name == "dp1" else None)

    ds, state, t = run(inv, fn, 5, replace(CFG, refused_grace=0.0))
    assert ds[-1].by_name()["dp1"].down and state.instances["dp1"].fails >= 3
    assert state.instances["dp1"].address == "127.0.0.1:8001"
    moved = Inventory([inv.instances[0], replace(inv.instances[1], port=8101)])
    d, after = decide({"dp0": sample("dp0"), "dp1": sample("dp1")}, moved, state, CFG, t)
    assert not d.by_name()["dp1"].down
    assert after.instances["dp1"].fails == 0 and after.instances["dp1"].address == "127.0.0.1:8101"
    # An older state file knows no address: its history is kept (and the address recorded).
    old = PolicyState({**state.instances, "dp1": replace(state.instances["dp1"], address=None)}, state.reloads,
                      state.updated_at, state.config)
    d, kept = decide({"dp0": sample("dp0"), "dp1": sample("dp1")}, moved, old, CFG, t)
    assert d.by_name()["dp1"].down and kept.instances["dp1"].address == "127.0.0.1:8101"
    assert PolicyState.from_dict(json.loads(json.dumps(after.to_dict()))).instances["dp1"].address == "127.0.0.1:8101"
    # Another spelling of the same address is the same server (as nginx and the Lua balancer read it).
    same = Inventory([inv.instances[0], replace(inv.instances[1], host="::ffff:127.0.0.1")])
    d, kept = decide({"dp0": sample("dp0"), "dp1": sample("dp1")}, same, state, CFG, t)
    assert d.by_name()["dp1"].down and kept.instances["dp1"].address == "127.0.0.1:8001"
    # A state written before a spelling became canonical (`localhost` is 127.0.0.1 since 2026-12-06) is still
    # of the same server: an upgrade does not start the replica over.
    spelled = PolicyState({**state.instances, "dp1": replace(state.instances["dp1"], address="localhost:8001")},
                          state.reloads, state.updated_at, state.config)
    d, kept = decide({"dp0": sample("dp0"), "dp1": sample("dp1")}, inv, spelled, CFG, t)
    assert d.by_name()["dp1"].down and kept.instances["dp1"].address == "127.0.0.1:8001"


def test_a_refused_replica_in_its_grace_says_when_it_goes_down() -> None:
    # Nothing listens: the replica stays in the config for --refused-grace (nginx's passive check keeps requests
    # off it); its reason said only "/health failed 16/3" with weight 20, and never when it would go down.
    inv = inventory(64, 64)

    def fn(k: int, name: str) -> LoadSample:
        if name == "dp1" and k >= 1:
            return LoadSample(name, False, False, error="connection refused", health_error="connection refused",
                              refused=True)
        return sample(name)

    ds, _, _ = run(inv, fn, 6, replace(CFG, refused_grace=30.0))
    reasons = [d.by_name()["dp1"].reason for d in ds]
    last = ds[-1].by_name()["dp1"]
    assert not last.down and "/health failed 5/3 (connection refused; down in " in last.reason, last.reason
    assert "s unless it listens again, --refused-grace)" in last.reason, last.reason
    # Below the threshold, the threshold decides (no countdown); with the grace off, no countdown either.
    assert "/health failed 2/3 (connection refused);" in reasons[2], reasons
    ds, _, _ = run(inv, fn, 3, replace(CFG, refused_grace=0.0))
    assert not any("down in" in d.by_name()["dp1"].reason for d in ds), [d.by_name()["dp1"].reason for d in ds]


def test_health_304_counts_as_failure_and_a_blip_resets() -> None:
    inv = inventory(64, 64)
    pattern = [False, False, True, False, False, True]  # never 3 in a row

    def fn(k: int, name: str) -> LoadSample:
        ok = name == "dp0" or pattern[k]
        return sample(name, healthy=ok, health_error=None if ok else "304")

    ds, _, _ = run(inv, fn, len(pattern))
    assert not any(x.down for d in ds for x in d)


# The ramp alone (no load correction): ramp steps, their budget and their early end.
RAMP = PolicyConfig(ramp_duration=10.0, gain=0.0)


def test_recovery_ramps_back() -> None:
    inv = inventory(64, 64)

    def fn(k: int, name: str) -> LoadSample:
        bad = name == "dp1" and 1 <= k < 6
        return sample(name, running=20, healthy=not bad, health_error="connection refused" if bad else None)

    ds, _, _ = run(inv, fn, 45, cfg=RAMP)
    dp1 = [d.by_name()["dp1"] for d in ds]
    assert dp1[3].down and dp1[6].down, "one good check is not enough (recover threshold 2)"
    up = dp1[7]
    assert not up.down and up.changed and up.weight == 5 and "ramp 1/4" in up.reason
    ramp = [x.weight for x in dp1[7:]]
    assert ramp == sorted(ramp) and ramp[-1] == 20
    assert any("ramp 2/4" in x.reason for x in dp1)
    # Initial weights, down, up and ramp 2/4 spent the 4 reloads of the minute: later steps wait for the
    # budget instead of buying extra reloads, and the ramp completes once the minute has passed.
    assert 5 < dp1[7 + 16].weight < 20 and "reload budget exhausted" in dp1[7 + 16].reason
    assert dp1[7 + 32].weight == 20


def test_recovery_skips_the_ramp_while_the_others_queue() -> None:
    inv = inventory(64, 64, 64)

    def fn(k: int, name: str) -> LoadSample:
        if name == "dp1":
            bad = 1 <= k < 6
            return sample(name, running=0, healthy=not bad, health_error="connection refused" if bad else None)
        return sample(name, running=64, queued=16)  # slots full and a queue: 1.25/slot

    ds, _, _ = run(inv, fn, 12, cfg=RAMP)
    dp1 = [d.by_name()["dp1"] for d in ds]
    up = dp1[7]
    assert not up.down and up.changed and up.weight == 20, up
    assert "ramp ended: the others queue (1.25/slot)" in up.reason


def test_a_ramp_in_progress_ends_when_the_others_start_to_queue() -> None:
    inv = inventory(64, 64)
    busy = {"queued": 0.0}

    def fn(k: int, name: str) -> LoadSample:
        if name == "dp1":
            bad = 1 <= k < 6
            return sample(name, running=0, healthy=not bad, health_error="connection refused" if bad else None)
        return sample(name, running=32, queued=busy["queued"])

    ds, state, t = run(inv, fn, 9, cfg=RAMP)  # recovered at cycle 7, ramp 1/4 at 0.5/slot
    assert ds[7].by_name()["dp1"].weight == 5
    busy["queued"] = 64.0  # the other replica now queues a full set of slots: 1.5/slot
    ds, _, _ = run(inv, lambda k, n: fn(k + 9, n), 4, cfg=RAMP, state=state, start=t)
    later = [d.by_name()["dp1"] for d in ds]
    ended = next(x for x in later if "ramp ended" in x.reason)  # as soon as the smoothed load reaches 1/slot
    assert ended.weight == 20 and ended.changed, later


def test_stale_metrics_fade_to_neutral() -> None:
    inv = inventory(64, 64, 64)

    def fn(k: int, name: str) -> LoadSample:
        if name != "dp0":
            return sample(name, running=30)
        if k < 30:
            return sample(name, running=64, queued=30)
        return sample(name, ok=False)  # metrics broken, /health fine

    ds, _, _ = run(inv, fn, 80)
    low = ds[29].by_name()["dp0"].weight
    assert low <= 10
    assert not ds[32].by_name()["dp0"].changed, "a short gap keeps the last verdict"
    assert ds[-1].by_name()["dp0"].weight >= 17
    assert not ds[-1].by_name()["dp0"].down
    assert any("stale metrics" in d.by_name()["dp0"].reason for d in ds[40:])


def test_all_stale_fails_open_to_static_weights() -> None:
    inv = inventory(64, 32)
    ds, state, _ = run(inv, LeastConn(["dp0", "dp1"], total=60, external={"dp0": 40}), 30)
    assert ds[-1].by_name()["dp0"].weight < 20
    ds, _, _ = run(inv, lambda k, n: sample(n, ok=False), 10, state=state, start=T0 + 60)
    last = ds[-1]
    assert last.fail_open == "no replica has fresh metrics"
    assert weights(last) == {"dp0": 20, "dp1": 10} and not any(x.down for x in last)
    assert all(x.reason.startswith("fail open") for x in last)


def test_all_down_fails_open() -> None:
    inv = inventory(64, 64, 64)
    ds, _, _ = run(inv, lambda k, n: sample(n, healthy=False, health_error="connection refused"), 6)
    assert all(not x.down for d in ds for x in d)
    assert ds[-1].fail_open == "all replicas fail /health"


def test_partial_outage_is_not_fail_open() -> None:
    inv = inventory(64, 64, 64)
    ds, _, _ = run(inv, lambda k, n: sample(n, healthy=n == "dp0", health_error=None if n == "dp0" else "404"), 6)
    assert ds[-1].fail_open is None
    assert [x.down for x in ds[-1]] == [False, True, True]


# -- state ----------------------------------------------------------------------------------------------


def test_state_round_trips_through_json_and_continues_identically() -> None:
    inv = inventory(64, 64, 32)

    def fn(k: int, name: str) -> LoadSample:
        return sample(name, running=60 if name == "dp0" else 20, queued=k % 5, healthy=not (name == "dp2" and k > 8))

    _, state, t = run(inv, fn, 12)
    restored = PolicyState.from_dict(json.loads(json.dumps(state.to_dict())))
    assert restored == state
    a, _, _ = run(inv, fn, 10, state=state, start=t)
    b, _, _ = run(inv, fn, 10, state=restored, start=t)
    assert a == b


@pytest.mark.parametrize("raw", [None, [], {"version": 99}, {"version": 1, "instances": []}])
def test_bad_state_is_rejected(raw: object) -> None:
    with pytest.raises(ValueError):
        PolicyState.from_dict(raw)


def test_decide_is_pure() -> None:
    inv = inventory(64, 64)
    _, state, t = run(inv, even(), 3)
    frozen = copy.deepcopy(state)
    samples = {"dp0": sample("dp0", running=64, queued=9), "dp1": sample("dp1", healthy=False)}
    d1, _ = decide(samples, inv, state, CFG, t)
    d2, _ = decide(samples, inv, state, CFG, t)
    assert state == frozen and d1 == d2


def test_inventory_changes_add_and_drop_instances() -> None:
    _, state, t = run(inventory(64, 64), even(), 3)
    bigger = inventory(64, 64, 64)
    d, state = decide({n: sample(n) for n in ("dp0", "dp1", "dp2")}, bigger, state, CFG, t)
    new = d.by_name()["dp2"]
    assert new.changed and new.weight == 20 and new.reason.startswith("initial")
    d, state = decide({"dp0": sample("dp0")}, inventory(64), state, CFG, t + 2)
    assert set(state.instances) == {"dp0"} and len(d) == 1


def test_missing_sample_counts_as_a_failed_check() -> None:
    inv = inventory(64, 64)
    state = PolicyState()
    for k in range(3):
        ds_k, state = decide({"dp0": sample("dp0")}, inv, state, CFG, T0 + 2 * k)
    assert ds_k.by_name()["dp1"].down and "not scraped" in ds_k.by_name()["dp1"].reason


@pytest.mark.parametrize("bad", [{"alpha": 0}, {"fail_threshold": 0}, {"scale": 500}, {"min_factor": 2.0}])
def test_bad_config_is_a_usage_error(bad: dict[str, float]) -> None:
    with pytest.raises(UsageError):
        PolicyConfig(**bad).validated()  # type: ignore[arg-type]


def test_ramp_does_not_wind_up_the_correction() -> None:
    # While it ramps, the recovered replica is under-loaded on purpose; that must not pile up a bonus
    # that overshoots its weight once the ramp ends.
    cfg = PolicyConfig(max_reloads_per_minute=100, ramp_duration=30.0)  # 15 cycles of ramp to watch
    inv = inventory(64, 64, 64)

    def fn(k: int, name: str) -> LoadSample:
        bad = name == "dp1" and 1 <= k < 6
        running = 2 if name == "dp1" else 50
        return sample(name, running=running, healthy=not bad, health_error="404" if bad else None)

    ds, _, _ = run(inv, fn, 7 + 15 + 2, cfg)
    ramp = [d.by_name()["dp1"].weight for d in ds[7:22]]
    assert sorted(set(ramp)) == [5, 10, 15, 20], ramp  # exact quarters of the capacity weight
    assert ds[-1].by_name()["dp1"].weight == 20


# -- decode speed ---------------------------------------------------------------------------------------


SPEED = PolicyConfig(speed_aware=True)


def with_tpot(
    tpots: dict[str, float], per_cycle: float = 50, running: dict[str, float] | None = None
) -> SampleFn:
    """Each replica observes `per_cycle` output tokens per cycle at its own time per token (seconds);
    `running` per replica (default 32 of 64 slots each)."""

    def fn(k: int, name: str) -> LoadSample:
        count = (k + 1) * per_cycle
        busy = (running or {}).get(name, 32)
        return LoadSample(name, True, True, busy, 0, 0.3, None, True, tpots[name] * count, count)

    return fn


def test_a_half_speed_replica_gets_half_the_weight_and_the_reason_says_why() -> None:
    inv = inventory(64, 64, 64, 64)
    tpots = {"dp0": 0.02, "dp1": 0.02, "dp2": 0.021, "dp3": 0.04}
    tokens = with_tpot(tpots)
    # nginx spreads 128 in-flight requests by weight: once dp3's weight halves, it carries half as many.
    loop = LeastConn(["dp0", "dp1", "dp2", "dp3"], 128,
                     make=lambda k, name, running: replace(tokens(k, name), running=running))
    ds, state, _ = run(inv, loop, 30, cfg=SPEED)
    w = weights(ds[-1])
    # Half of 20, give or take the dead-band; dp2's 5 % is within the tolerance.
    assert abs(w["dp3"] - 10) <= 1 and w["dp0"] == w["dp1"] == w["dp2"] == 20, w
    d3 = ds[-1].by_name()["dp3"]
    assert d3.speed == pytest.approx(0.0205 / 0.04)  # against the median TPOT
    assert "decodes at 0.51x the fleet's speed (TPOT 40 ms)" in d3.reason
    assert abs(state.instances["dp3"].log_gain) < 0.1, "the load correction does not undo the speed factor"


def test_equal_replicas_with_noisy_tpot_keep_their_weights() -> None:
    rng = random.Random(7)
    inv = inventory(64, 64, 64)
    totals = {n: [0.0, 0.0] for n in ("dp0", "dp1", "dp2")}

    def fn(k: int, name: str) -> LoadSample:
        n = rng.randint(10, 60)
        totals[name][0] += n * 0.02 * rng.uniform(0.85, 1.15)  # +-15 % per interval
        totals[name][1] += n
        return LoadSample(name, True, True, 32, 0, 0.3, None, True, *totals[name])

    ds, _, _ = run(inv, fn, 200, cfg=SPEED)
    assert sum(d.changed for d in ds[1:]) == 0
    assert all(d.speed == 1.0 for d in ds[-1])


def test_few_observations_accumulate_until_there_are_enough() -> None:
    inv = inventory(64, 64)
    _, state, _ = run(inv, with_tpot({"dp0": 0.02, "dp1": 0.05}, per_cycle=3), 2, cfg=SPEED)
    assert state.instances["dp1"].tpot is None  # 3 then 6 observations: below speed_min_tokens (8)
    _, state, _ = run(inv, with_tpot({"dp0": 0.02, "dp1": 0.05}, per_cycle=3), 4, cfg=SPEED)
    assert state.instances["dp1"].tpot == pytest.approx(0.05)


def test_a_counter_reset_rebaselines_instead_of_producing_a_speed() -> None:
    inv = inventory(64, 64)
    fn = with_tpot({"dp0": 0.02, "dp1": 0.02})
    _, state, t = run(inv, fn, 5, cfg=SPEED)
    before = state.instances["dp1"].tpot

    def restarted(k: int, name: str) -> LoadSample:
        if name == "dp1":  # the engine restarted: its counters start again from zero
            return LoadSample(name, True, True, 32, 0, 0.3, None, True, 0.5, 5.0)
        return fn(k + 5, name)

    _, state, _ = run(inv, restarted, 1, cfg=SPEED, state=state, start=t)
    assert state.instances["dp1"].tpot == before and state.instances["dp1"].tpot_count == 5.0


def test_without_tpot_series_the_speed_stays_neutral() -> None:
    inv = inventory(64, 64)
    ds, _, _ = run(inv, even(), 10, cfg=SPEED)
    assert all(d.speed == 1.0 for d in ds[-1]) and weights(ds[-1]) == {"dp0": 20, "dp1": 20}


def test_speed_factor_has_hysteresis_at_the_edge() -> None:
    inv = inventory(64, 64, 64)
    # dp2 25 % slower: log(1/1.25) = -0.22, beyond the 0.2 tolerance
    _, state, t = run(inv, with_tpot({"dp0": 0.02, "dp1": 0.02, "dp2": 0.025}), 30, cfg=SPEED)
    assert state.instances["dp2"].speed == pytest.approx(0.8)
    # now 15 % slower (log -0.14): inside the tolerance, beyond half of it: the factor stays
    fn = with_tpot({"dp0": 0.02, "dp1": 0.02, "dp2": 0.023}, per_cycle=50)
    _, state, t = run(inv, lambda k, n: fn(k + 30, n), 40, cfg=SPEED, state=state, start=t)
    assert state.instances["dp2"].speed == pytest.approx(0.02 / 0.023, rel=0.02)
    # 5 % slower: back to neutral
    fn = with_tpot({"dp0": 0.02, "dp1": 0.02, "dp2": 0.021}, per_cycle=50)
    _, state, _ = run(inv, lambda k, n: fn(k + 70, n), 40, cfg=SPEED, state=state, start=t)
    assert state.instances["dp2"].speed == 1.0


def test_speed_is_on_by_default_for_openresty_only_and_can_be_overridden() -> None:
    assert config_for_flavor("openresty").speed_aware is True
    assert config_for_flavor("nginx").speed_aware is False
    assert config_for_flavor("nginx", speed_aware=True).speed_aware is True
    assert config_for_flavor("openresty", speed_aware=False).speed_aware is False
    assert config_for_flavor("nginx", speed_aware=None).speed_aware is False  # the CLI's "not given"


def test_speed_unaware_policy_ignores_tpot() -> None:
    inv = inventory(64, 64)
    ds, state, _ = run(inv, with_tpot({"dp0": 0.02, "dp1": 0.04}), 20)
    assert weights(ds[-1]) == {"dp0": 20, "dp1": 20} and state.instances["dp1"].speed == 1.0
    assert state.instances["dp1"].tpot == pytest.approx(0.04), "still measured: status and a later switch use it"


def test_the_state_remembers_the_settings_that_wrote_it() -> None:

    cfg = PolicyConfig(speed_aware=True, min_hold=3.0, max_reloads_per_minute=9)
    _, state, _ = run(inventory(64, 64), even(), 2, cfg)
    back = PolicyState.from_dict(json.loads(json.dumps(state.to_dict())))
    assert config_of_state(back) == cfg
    assert config_of_state(PolicyState()) == PolicyConfig()
    assert config_of_state(PolicyState(config={"alpha": 7.0, "unknown": 1})) == PolicyConfig()  # invalid: defaults


# -- the load model (nginx flavor), in a closed loop with least_conn ---------------------------------------


def per_slot_loads(loop: LeastConn) -> dict[str, float]:
    return {n: loop.running(n) / 64 for n in loop.names}


def test_external_load_is_estimated_and_balanced_in_a_few_reloads() -> None:
    """25 % of the traffic goes straight to dp0: the model finds it and nginx's share moves to the others."""
    names = ["dp0", "dp1", "dp2", "dp3"]
    loop = LeastConn(names, total=120, external={"dp0": 40})
    ds, _, _ = run(inventory(64, 64, 64, 64), loop, 30)
    loads = per_slot_loads(loop)
    assert max(loads.values()) / min(loads.values()) < 1.15, (loads, weights(ds[-1]))
    w = weights(ds[-1])
    assert w["dp0"] < w["dp1"] == w["dp2"] == w["dp3"], w
    assert ds[-1].by_name()["dp0"].backup, "its own traffic fills it: nginx sends it none (nginx `backup`)"
    changes = sum(1 for d in ds if d.changed)
    assert changes <= 4, f"{changes} reloads for one external source"
    moved = next(d.by_name()["dp0"] for d in ds if d.by_name()["dp0"].changed and d.by_name()["dp0"].previous)
    assert "weight 20->" in moved.reason


def test_the_first_load_correction_does_not_wait_for_a_hold_after_the_initial_weights() -> None:
    names = ["dp0", "dp1", "dp2", "dp3"]
    ds, _, _ = run(inventory(64, 64, 64, 64), LeastConn(names, total=120, external={"dp0": 40}), 4)
    dp0 = [d.by_name()["dp0"] for d in ds]
    assert dp0[0].changed and "initial" in dp0[0].reason
    assert any(x.changed and x.weight < 20 for x in dp0[1:4]), [x.reason for x in dp0]


def test_symmetric_frontends_see_no_external_load() -> None:
    """Two frontends with the same weights: each sees the other's traffic spread by the same weights."""
    names = ["dp0", "dp1", "dp2"]
    ds, _, _ = run(inventory(64, 64, 64), LeastConn(names, total=150), 20)
    assert all(not d.changed for d in ds[1:]) and weights(ds[-1]) == dict.fromkeys(names, 20)


def test_a_replica_nginx_skips_does_not_collapse_the_others() -> None:
    """dp3 reads 0 in flight although it has weight (nginx's passive check skips it): no weight can fix
    that, and the others must not all look external."""
    names = ["dp0", "dp1", "dp2", "dp3"]
    loop = LeastConn(names, total=120, make=lambda k, name, running: sample(name, running=0 if name == "dp3"
                                                                            else running))
    ds, _, _ = run(inventory(64, 64, 64, 64), loop, 20)
    w = weights(ds[-1])
    assert w["dp0"] == w["dp1"] == w["dp2"] == 20, w


def test_recovery_is_exempt_from_the_reload_budget() -> None:
    """Restoring capacity never waits for a reload slot (DESIGN.md: the 3.3x lesson)."""
    inv = inventory(64, 64, 64)
    cfg = PolicyConfig(max_reloads_per_minute=1)

    def fn(k: int, name: str) -> LoadSample:
        bad = name == "dp2" and 1 <= k < 5
        return sample(name, healthy=not bad, health_error="404" if bad else None)

    ds, _, _ = run(inv, fn, 8, cfg=cfg)
    dp2 = [d.by_name()["dp2"] for d in ds]
    up = next(k for k, x in enumerate(dp2) if k > 3 and not x.down)
    assert dp2[up].changed and dp2[up].weight == 20 and not dp2[up].budget_held, dp2[up]
    assert up == 6, "two good checks after the last failure (recover threshold 2), no wait for the budget"


def test_refused_health_is_left_to_nginx_for_the_grace_period() -> None:
    """Nothing listens: nginx's passive check covers it without a reload; `down` only after the grace."""
    inv = inventory(64, 64)

    def fn(k: int, name: str) -> LoadSample:
        if name == "dp1":
            return LoadSample(name, False, False, error="connection refused", health_error="connection refused",
                              refused=True)
        return sample(name)

    ds, _, _ = run(inv, fn, 20)  # 2 s apart: 38 s
    downs = [k for k, d in enumerate(ds) if d.by_name()["dp1"].down]
    assert downs and downs[0] * CFG.interval >= CFG.refused_grace, downs
    assert "/health failed" in ds[3].by_name()["dp1"].reason and not ds[3].by_name()["dp1"].down


def test_an_http_health_failure_still_goes_down_after_k_checks() -> None:
    inv = inventory(64, 64)

    def fn(k: int, name: str) -> LoadSample:
        return sample(name, healthy=name != "dp1", health_error="404" if name == "dp1" else None)

    ds, _, _ = run(inv, fn, 4)
    assert [d.by_name()["dp1"].down for d in ds] == [False, False, True, True]


def test_no_ramp_by_default_full_weight_at_once() -> None:
    inv = inventory(64, 64)

    def fn(k: int, name: str) -> LoadSample:
        bad = name == "dp1" and 1 <= k < 5
        return sample(name, healthy=not bad, health_error="404" if bad else None)

    ds, _, _ = run(inv, fn, 8)
    back = [d.by_name()["dp1"] for d in ds if not d.by_name()["dp1"].down][1:]
    assert back and back[0].weight == 20 and "ramp" not in back[0].reason


def test_once_a_reload_is_paid_for_every_pending_weight_rides_along() -> None:
    """One replica's change passes the dead-band; the others' smaller pending moves go in the same reload."""
    inv = inventory(64, 64, 64, 64)
    loop = LeastConn(["dp0", "dp1", "dp2", "dp3"], total=120, external={"dp0": 40})
    ds, _, _ = run(inv, loop, 6)
    reloads = [d for d in ds[1:] if d.changed]
    assert reloads, "the external load moves something"
    first = reloads[0]
    moved = {x.name for x in first if x.changed}
    assert len(moved) > 1, [x.reason for x in first]
    riders = [x for x in first if x.changed and "with this reload" in x.reason]
    assert all(x.reason.startswith("load ") for x in riders), [x.reason for x in riders]


def test_a_few_requests_of_noise_move_nothing() -> None:
    """3 requests in flight over 24 slots, unevenly (2, 1, 0): noise, not traffic from elsewhere."""
    inv = inventory(8, 8, 8)
    uneven = {"dp0": 1.0, "dp1": 0.0, "dp2": 2.0}
    ds, _, _ = run(inv, lambda k, n: sample(n, running=uneven[n]), 20)
    assert all(not d.changed for d in ds[1:]), [x.reason for d in ds for x in d if x.changed]


def _in_backup(total: float) -> tuple[LeastConn, Inventory, PolicyState, float]:
    def make(k: int, name: str, r: float) -> LoadSample:
        return sample(name, running=min(r, 64.0), queued=max(0.0, r - 64.0))
    loop = LeastConn(["dp0", "dp1", "dp2", "dp3"], total=total, external={"dp0": 0.9 * total}, make=make)
    inv = inventory(64, 64, 64, 64)
    ds, state, t = run(inv, loop, 30)
    assert ds[-1].by_name()["dp0"].backup
    return loop, inv, state, t


def test_a_lull_shorter_than_the_hold_does_not_bring_a_replica_back_from_backup() -> None:
    """The other client pauses for 12 s (its requests drain, dp0 looks free from the 10th) and comes back:
    dp0 stays `backup` throughout, instead of being flooded by nginx until it is seen full again."""
    loop, inv, state, t = _in_backup(total=120.0)
    external = loop.external
    loop.external = {}
    ds, state, t = run(inv, loop, 6, state=state, start=t)
    loop.external = external
    later, _, _ = run(inv, loop, 6, state=state, start=t)
    reasons = [d.by_name()["dp0"].reason for d in ds + later]
    assert all(d.by_name()["dp0"].backup for d in ds + later), reasons
    assert any("looks free" in r for r in reasons), reasons


def test_a_replica_leaves_backup_without_the_hold_when_the_others_queue() -> None:
    """The others hold more requests than slots: dp0's capacity is needed the moment it looks free."""
    loop, inv, state, t = _in_backup(total=300.0)
    loop.external = {}
    ds, _, _ = run(inv, loop, 12, state=state, start=t)
    first_free = next(k for k, d in enumerate(ds) if d.by_name()["dp0"].load < 0.7 * ds[k].by_name()["dp1"].load)
    back = next(k for k, d in enumerate(ds) if not d.by_name()["dp0"].backup)
    assert "back from backup" in ds[back].by_name()["dp0"].reason
    assert (back - first_free) * CFG.interval < CFG.min_hold, [d.by_name()["dp0"].reason for d in ds]


def test_a_replica_leaves_backup_when_the_traffic_from_elsewhere_stops() -> None:
    names = ["dp0", "dp1", "dp2", "dp3"]
    loop = LeastConn(names, total=120, external={"dp0": 40})
    inv = inventory(64, 64, 64, 64)
    ds, state, t = run(inv, loop, 30)
    assert ds[-1].by_name()["dp0"].backup
    state.reloads = [t - 1.0]  # the budget (1/min below) is spent: leaving backup must not wait for it
    loop.external = {}  # the other client went away: dp0 idles while nginx sends it nothing
    ds, _, _ = run(inv, loop, 8, cfg=PolicyConfig(max_reloads_per_minute=1), state=state, start=t)
    back = next(d.by_name()["dp0"] for d in ds if not d.by_name()["dp0"].backup)
    assert back.changed and "back from backup" in back.reason and not back.budget_held, back
    assert back.weight >= 18, "its room is a whole share again: (about) full weight, not its backup weight"


def _after_a_lull(external_after: float, total: float) -> list[Decisions]:
    """dp0 in backup (traffic from elsewhere fills it), then a lull brings it back; the traffic from
    elsewhere returns (`external_after`) within the hold. The decisions of the 4 cycles after its return."""
    def make(k: int, name: str, r: float) -> LoadSample:
        return sample(name, running=min(r, 64.0), queued=max(0.0, r - 64.0))
    names = ["dp0", "dp1", "dp2", "dp3"]
    inv = inventory(64, 64, 64, 64)
    loop = LeastConn(names, total=total, external={"dp0": 0.9 * total}, make=make)
    ds, state, t = run(inv, loop, 30)
    assert ds[-1].by_name()["dp0"].backup
    loop.external = {}
    for _ in range(30):  # one cycle at a time, until the lull brings it back
        ds, state, t = run(inv, loop, 1, state=state, start=t)
        if not ds[-1].by_name()["dp0"].backup:
            break
    assert "back from backup" in ds[-1].by_name()["dp0"].reason, ds[-1].by_name()["dp0"].reason
    loop.external = {"dp0": external_after}
    ds, _, _ = run(inv, loop, 4, state=state, start=t)
    return ds


def test_a_replica_that_queues_goes_back_to_backup_without_waiting_for_the_hold() -> None:
    """nginx feeds dp0 its full share again; with the other client back it holds more requests than
    slots: waiting out the hold would queue nginx's requests behind it (protective, like `down`)."""
    ds = _after_a_lull(external_after=90.0, total=120.0)
    dp0 = [d.by_name()["dp0"] for d in ds]
    assert any(x.backup for x in dp0[:3]), [x.reason for x in dp0]
    assert CFG.interval * 3 < CFG.min_hold, "the test's window lies inside the hold"


def test_a_replica_filled_but_not_queueing_waits_for_the_hold_before_backup() -> None:
    """The same return, but dp0 keeps fewer requests than slots: the hold (against reload churn) stands."""
    ds = _after_a_lull(external_after=40.0, total=60.0)
    dp0 = [d.by_name()["dp0"] for d in ds]
    assert not any(x.backup for x in dp0), [x.reason for x in dp0]
    assert any("hold" in x.reason for x in dp0) or any(x.changed for x in dp0), [x.reason for x in dp0]


def test_never_every_replica_is_backup() -> None:
    """Two frontends' worth of traffic nginx cannot see on both replicas: someone must take nginx's own."""
    loop = LeastConn(["dp0", "dp1"], total=20, external={"dp0": 60, "dp1": 60})
    ds, _, _ = run(inventory(64, 64), loop, 20)
    assert not any(x.backup for d in ds for x in d)


def test_a_full_replica_whose_queue_is_not_reported_counts_as_queueing() -> None:
    """Legacy FastDeploy: `waiting` reads 0 under a backlog. All 64 slots busy: the backlog is unknown, not
    zero, so the replica counts as carrying as many again (and the balancer stops feeding it)."""
    full = sample("dp0", running=64, queued=0, reliable=False)
    half = sample("dp1", running=32, queued=0, reliable=False)
    assert full.requests(64) == 128 and half.requests(64) == 32
    assert full.load == 64, "without a reported capacity nothing is assumed"
    assert replace(full, capacity=64.0).load == 128


def test_a_replica_that_only_looks_fast_is_not_given_more_than_its_capacity() -> None:
    """Fewer slots, smaller batches, lower TPOT: that is load, not hardware. The speed factor never rises
    above 1, so its weight stays its capacity weight."""
    inv = inventory(64, 64, 64, 32)
    tpots = {"dp0": 0.039, "dp1": 0.039, "dp2": 0.040, "dp3": 0.025}
    ds, _, _ = run(inv, with_tpot(tpots), 20, cfg=config_for_flavor("openresty"))  # speed-aware, no load model
    d3 = ds[-1].by_name()["dp3"]
    assert d3.speed == 1.0 and d3.weight == 10, d3


# -- a restart's transient ------------------------------------------------------------------------------


def _restart(gap: bool) -> SampleFn:
    """dp3 restarts at cycle 6: with `gap`, two refused scrapes first (nginx's passive check covers them) and
    counters that go on (each signal is tested alone); without, its counters simply start again. It comes
    back empty while the others queue (as in bench.lb: three replicas carried the whole load meanwhile)."""

    def fn(k: int, name: str) -> LoadSample:
        restarted = name == "dp3" and k >= 6
        if name == "dp3" and gap and k in (6, 7):
            return LoadSample(name, False, False, error="connection refused", health_error="connection refused",
                              refused=True)
        running, queued = ((0 if k < 8 else 40), 0) if restarted else (64, 30 if k >= 6 else 0)
        count = (k - 5) * 10.0 if restarted and not gap else 100.0 + k * 10
        return LoadSample(name, True, True, running, queued, 0.3, None, True, tpot_sum=count * 0.02,
                          tpot_count=count)

    return fn


@pytest.mark.parametrize("gap", [True, False])
def test_a_restarted_replica_keeps_its_weight_through_the_transient(gap: bool) -> None:
    """Empty for a moment after a restart, it would look under-loaded and get a higher weight (and a lower
    one a hold later): two reloads in the middle of the drain (bench.lb kill-restart)."""
    inv = inventory(64, 64, 64, 64)
    ds, _, _ = run(inv, _restart(gap), 16)
    back = 8 if gap else 6
    hold = [d.by_name()["dp3"] for d in ds[back:back + int(CFG.min_hold / CFG.interval)]]
    assert all(x.weight == 20 and not x.changed for x in hold), [x.reason for x in hold]
    assert not any(d.changed for d in ds[back:back + 3]), "no reload for the transient"


def test_a_restarted_replica_keeps_a_corrected_weight_through_the_kill_and_the_transient() -> None:
    """Lowered for load from elsewhere, then killed and restarted: while /health fails and while its metrics
    settle, its correction waits (neither reading says anything about nginx's share). Reset to neutral, the
    weight would go up at the first failed check (a reload) and down again once it is read (another)."""
    inv = inventory(64, 64, 64, 64)

    def fn(k: int, name: str) -> LoadSample:
        if name == "dp3" and k in (12, 13):
            return LoadSample(name, False, False, error="connection refused", health_error="connection refused",
                              refused=True)
        if name == "dp3":
            running, queued = (64, 40) if k < 12 else (40, 0)  # load from elsewhere, then back and filling
        else:
            running, queued = (64, 0) if k < 12 else (64, 26)
        return LoadSample(name, True, True, running, queued, 0.3, None, True)

    ds, _, _ = run(inv, fn, 20)
    before = ds[11].by_name()["dp3"]
    assert before.weight < 20 and not before.changed, before.reason
    through = [d.by_name()["dp3"] for d in ds[12:14 + int(CFG.min_hold / CFG.interval)]]
    assert all(x.weight == before.weight and not x.changed for x in through), [x.reason for x in through]


def test_settling_is_what_keeps_the_weight() -> None:
    """The same restart seen as an ordinary sample (no gap, counters that keep growing) moves the weight."""
    inv = inventory(64, 64, 64, 64)

    def fn(k: int, name: str) -> LoadSample:
        s = _restart(False)(k, name)
        return replace(s, tpot_sum=(100.0 + k * 10) * 0.02, tpot_count=100.0 + k * 10)

    ds, _, _ = run(inv, fn, 10)
    assert any(d.by_name()["dp3"].changed and d.by_name()["dp3"].weight > 20 for d in ds[6:]), \
        [d.by_name()["dp3"].reason for d in ds[6:]]


def test_a_replica_restarted_with_fewer_slots_gets_its_new_weight_at_once() -> None:
    """A restart that changes max_num_seqs is a new configuration, not a transient: its capacity weight
    follows at the first reading (before, held for min_hold at the old one, nginx kept sending it twice its
    share of a now smaller batch)."""
    inv = inventory(64, 64, 64, 64)

    def fn(k: int, name: str) -> LoadSample:
        s = _restart(False)(k, name)
        return replace(s, capacity=32.0 if name == "dp3" and k >= 6 else 64.0)

    ds, _, _ = run(inv, fn, 10)
    assert ds[5].by_name()["dp3"].weight == 20
    first = ds[6].by_name()["dp3"]
    assert first.weight == 10 and first.changed, first.reason
    assert first.reason.startswith("settling: metrics back 0s ago"), first.reason
    assert all(weights(d)["dp3"] == 10 for d in ds[6:]), [d.by_name()["dp3"].reason for d in ds[6:]]


def test_a_restarted_replicas_first_tokens_do_not_move_its_speed() -> None:
    """Speed-aware with reloads (`--speed-aware` on the nginx flavor): a replica whose first tokens after a
    restart run slow (cold caches, graphs being captured) keeps its speed factor while it settles; its speed
    would otherwise be set by the warm-up (weight 20 -> 15 -> ... at each cycle's reload) and set back later."""
    inv = inventory(64, 64, 64, 64)
    cfg = replace(CFG, speed_aware=True)
    assert cfg.min_hold > 2 * cfg.interval
    steady = with_tpot(dict.fromkeys(("dp0", "dp1", "dp2", "dp3"), 0.04))

    def fn(k: int, name: str) -> LoadSample:
        if name != "dp3" or k < 6:
            return steady(k, name)
        count = (k - 5) * 50.0  # counters start again, every token at twice the time
        return replace(steady(k, name), tpot_sum=0.08 * count, tpot_count=count)

    ds, _, _ = run(inv, fn, 6 + int(cfg.min_hold / cfg.interval), cfg=cfg)
    through = [d.by_name()["dp3"] for d in ds[6:]]
    assert all(x.weight == 20 and x.speed == 1.0 for x in through), [x.reason for x in through]


def test_a_restarted_replica_does_not_make_the_others_look_loaded_from_elsewhere() -> None:
    """Back from a restart, nginx's passive check sends the replica only a trickle for a moment, and its
    smoothed load still holds readings from before the kill: not far enough below the others to be left out
    of nginx's share per weight, it set that share, and the three that carried the fleet meanwhile looked
    loaded from elsewhere: all three lowered in one reload and raised again in another (bench.lb
    kill-restart-legacy, the sidecar's log: "load 1.42/slot vs fleet 1.23; weight 20->16"). Its reading is a
    transient for the load model as for its own weight."""
    inv = inventory(64, 64, 64, 64)

    def fn(k: int, name: str) -> LoadSample:
        if name == "dp3" and k in (6, 7):  # killed: refused, nginx's passive check covers it
            return LoadSample(name, False, False, error="connection refused", health_error="connection refused",
                              refused=True)
        if name == "dp3":
            running, queued = (48, 0) if k < 6 else (40, 0)  # back at k 8, filling
        else:
            running, queued = (48, 0) if k < 6 else (64, 26)  # the others carry its share meanwhile
        return LoadSample(name, True, True, running, queued, 0.3, None, True)

    ds, _, _ = run(inv, fn, 14)
    after = ds[8:8 + int(CFG.min_hold / CFG.interval)]
    for d in after:
        for x in d:
            assert not x.changed, (x.name, x.reason)
