"""The wall clock stepped back (NTP, an operator): the state's times from the future must not freeze the
policy's timers (hold, reload budget, refused grace, ramp, freshness) for as long as the step."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from dataclasses import fields, replace
from pathlib import Path

from fdngx.domain import Engine, Instance, Inventory, LoadSample
from fdngx.inventory import save
from fdngx.sim.process import free_ports, start_sim
from fdngx.weights.policy import decide
from fdngx.weights.settings import PolicyConfig
from fdngx.weights.state import TIMES, InstanceState, PolicyState
from tests.unit.test_policy import CFG, RAMP, T0, inventory, run, sample

STEP = 3600.0  # the clock ran an hour ahead when the state was written
AHEAD = T0 + STEP
NEGATIVE = re.compile(r"-\d+s (ago|old)")  # "hold: changed -3594s ago", "stale metrics (-3600s old"
STATIC = PolicyConfig(gain=0.0)  # no load correction: only the static weights move a weight


def refused(name: str) -> LoadSample:
    return LoadSample(name, False, False, error="connection refused", health_error="connection refused", refused=True)


def test_every_timer_of_the_state_is_clamped() -> None:
    """A field that holds a clock time must be in TIMES, or a new timer would freeze after a step back."""
    timers = {f.name for f in fields(InstanceState) if f.name.endswith(("_at", "_since"))}
    assert timers == set(TIMES)
    st = InstanceState(weight=20, **dict.fromkeys(TIMES, AHEAD))
    state = PolicyState({"dp0": st, "dp1": replace(st)}, [AHEAD - 1, AHEAD], AHEAD)
    _, new = decide({n: sample(n) for n in ("dp0", "dp1")}, inventory(64, 64), state, CFG, T0)
    assert new.updated_at == T0 and max(new.reloads) <= T0
    assert all(getattr(s, n) is None or getattr(s, n) <= T0 for s in new.instances.values() for n in TIMES)
    assert state.instances["dp0"].last_change_at == AHEAD, "decide must not mutate its input"


def test_a_step_back_is_said_once() -> None:
    inv = inventory(64, 64)
    _, state, _ = run(inv, lambda k, n: sample(n), 3, start=AHEAD)
    d1, state = decide({n: sample(n) for n in ("dp0", "dp1")}, inv, state, CFG, T0)
    d2, state = decide({n: sample(n) for n in ("dp0", "dp1")}, inv, state, CFG, T0 + 2)
    assert d1.clock_back is not None and "the clock went back" in d1.clock_back and "3604s" in d1.clock_back
    assert d2.clock_back is None, "the state saved after the first cycle holds no time from the future"
    # A tiny step (below a second) is clamped all the same, but not worth a WARNING.
    _, state, t = run(inv, lambda k, n: sample(n), 3)
    d3, _ = decide({n: sample(n) for n in ("dp0", "dp1")}, inv, state, CFG, t - CFG.interval - 0.5)
    assert d3.clock_back is None


def test_min_hold_counts_from_now_after_a_step_back() -> None:
    """A weight changed "in the future" waits one min-hold, not until the clock catches up (the repro: "hold:
    changed -3594s ago")."""
    even = lambda k, n: sample(n, running=20)  # noqa: E731
    _, state, t = run(inventory(64, 64), even, 2, cfg=STATIC, start=AHEAD)
    _, state, _ = run(inventory(64, 64, weights=(3, 1)), even, 1, cfg=STATIC, state=state, start=t)  # dp1 20 -> 7
    assert state.instances["dp1"].weight == 7 and state.instances["dp1"].last_change_at == t
    ds, _, _ = run(inventory(64, 64), even, 12, cfg=STATIC, state=state, start=T0)  # back to 20, after the step
    dp1 = [d.by_name()["dp1"] for d in ds]
    assert not any(NEGATIVE.search(x.reason) for x in dp1), [x.reason for x in dp1]
    changed = [k for k, x in enumerate(dp1) if x.changed]
    assert changed and changed[0] * CFG.interval == CFG.min_hold and dp1[changed[0]].weight == 20, dp1


def test_reload_budget_entries_from_the_future_expire_after_one_window() -> None:
    """Reloads stamped "in the future" count as made just now: the budget holds at most one window (60 s),
    not the whole step (the repro: "exhausted (4/min)" for an hour)."""
    even = lambda k, n: sample(n, running=20)  # noqa: E731
    _, state, _ = run(inventory(64, 64), even, 2, cfg=STATIC, start=T0 - 600)
    state = replace(state, reloads=[AHEAD - 4, AHEAD - 3, AHEAD - 2, AHEAD - 1])
    ds, _, _ = run(inventory(64, 64, weights=(3, 1)), even, 40, cfg=STATIC, state=state, start=T0)
    dp1 = [d.by_name()["dp1"] for d in ds]
    assert dp1[0].budget_held, "the budget's entries count as reloads just now, not as expired"
    changed = [k for k, x in enumerate(dp1) if x.changed]
    assert changed and changed[0] * CFG.interval == 60.0 and dp1[changed[0]].weight == 7, [x.reason for x in dp1]


def test_refused_grace_counts_from_now_after_a_step_back() -> None:
    """A run of refused checks that began "in the future" gets one refused-grace, not the whole step."""
    inv = inventory(64, 64)
    fn = lambda k, n: refused(n) if n == "dp1" else sample(n)  # noqa: E731
    _, state, _ = run(inv, fn, 3, start=AHEAD)
    ds, _, _ = run(inv, fn, 25, state=state, start=T0)
    downs = [k for k, d in enumerate(ds) if d.by_name()["dp1"].down]
    assert downs and downs[0] * CFG.interval == CFG.refused_grace, downs


def test_a_ramp_from_the_future_starts_over_and_completes() -> None:
    """A ramp that began "in the future" neither jumps to full weight nor sits at step 1 for the whole step."""
    cfg = replace(RAMP, max_reloads_per_minute=100)
    inv = inventory(64, 64)
    fn = lambda k, n: sample(n, running=20, healthy=not (n == "dp1" and 1 <= k < 6),  # noqa: E731
                             health_error="connection refused" if n == "dp1" and 1 <= k < 6 else None)
    ds, state, _ = run(inv, fn, 8, cfg=cfg, start=AHEAD)
    assert "ramp 1/4" in ds[7].by_name()["dp1"].reason, ds[7].by_name()["dp1"].reason
    ds, _, _ = run(inv, lambda k, n: sample(n, running=20), 10, cfg=cfg, state=state, start=T0)
    ramp = [d.by_name()["dp1"].weight for d in ds]
    assert ramp[0] == 5 and ramp == sorted(ramp) and ramp[-1] == 20, ramp


def test_metrics_read_in_the_future_go_stale() -> None:
    """Metrics last read "in the future" must not count as fresh for the whole step when scrapes fail."""
    inv = inventory(64, 64)
    _, state, _ = run(inv, lambda k, n: sample(n), 3, start=AHEAD)
    ds, _, _ = run(inv, lambda k, n: sample(n, ok=n != "dp1"), 8, state=state, start=T0)
    stale = [k for k, d in enumerate(ds) if "stale metrics" in d.by_name()["dp1"].reason]
    assert stale and stale[0] * CFG.interval > CFG.stale_after
    assert not any(NEGATIVE.search(d.by_name()["dp1"].reason) for d in ds)


def test_a_cron_run_through_the_cli_saves_no_time_from_the_future(tmp_path: Path) -> None:
    """The repro: `fdngx render --scrape` against `fdngx sim`, its state edited as written by a clock an hour
    ahead. The run after the step must store times of now, so later runs do not inherit the freeze."""
    api, met = free_ports(2), free_ports(2)
    sim = start_sim(api, met, max_num_seqs=8, log_path=tmp_path / "sim.log")
    try:
        inv = tmp_path / "fdngx.json"
        insts = [Instance(f"dp{i}", "127.0.0.1", api[i], met[i], Engine.SIM, max_num_seqs=8) for i in range(2)]
        save(Inventory(insts), inv)
        out = tmp_path / "nginx.conf"
        argv = [sys.executable, "-m", "fdngx", "render", "-i", str(inv), "--out", str(out), "--scrape"]
        first = subprocess.run(argv, capture_output=True, text=True, timeout=60)
        assert first.returncode == 0, first.stderr
        path = tmp_path / ".nginx.conf.fdngx-state.json"
        doc = json.loads(path.read_text())
        ahead = time.time() + STEP
        doc["reloads"], doc["updated_at"] = [ahead - 4, ahead - 3], ahead
        for st in doc["instances"].values():
            st["last_change_at"] = st["last_ok_at"] = ahead
        path.write_text(json.dumps(doc))
        path.chmod(0o600)
        save(Inventory([replace(insts[0], weight=3), insts[1]]), inv)  # dp1's wanted weight moves
        second = subprocess.run(argv, capture_output=True, text=True, timeout=60)
        assert second.returncode == 0, second.stderr
        assert not NEGATIVE.search(second.stdout + second.stderr), second.stdout + second.stderr
        now = time.time()
        doc = json.loads(path.read_text())
        times = [doc["updated_at"], *doc["reloads"],
                 *(t for st in doc["instances"].values() for n in TIMES if (t := st.get(n)) is not None)]
        assert times and max(times) <= now, doc
    finally:
        sim.stop(grace=2.0)
