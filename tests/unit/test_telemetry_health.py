"""fdngx_replica_healthy: what the sidecar's last /health check of each replica saw, apart from what nginx holds.

When every replica in service fails /health the policy fails open: nginx gets them all back in rotation, so
fdngx_replica_up reads 1 everywhere and only the health gauge tells a full outage from a fleet in good
health (the rules' FdngxFleetDown is built on it). A fake scrape and a fake apply, no nginx."""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path

from prometheus_client import generate_latest

from fdngx.domain import Inventory, LoadSample
from fdngx.inventory import save
from fdngx.weights.controller import CycleResult
from fdngx.weights.policy import Decision, Decisions
from fdngx.weights.state import InstanceState, PolicyState
from fdngx.weights.telemetry import Telemetry
from tests.unit.test_loop import cycles, inv_of, make

NAMES = ("dp0", "dp1", "dp2")


def value(t: Telemetry, name: str, replica: str | None = None) -> float | None:
    return t.registry.get_sample_value(name, {"replica": replica} if replica else {})


def healthy(t: Telemetry) -> dict[str, float | None]:
    return {n: value(t, "fdngx_replica_healthy", n) for n in NAMES}


def test_every_replica_failing_health_is_exported_while_the_policy_fails_open(tmp_path: Path) -> None:
    """The reviewer's outage: up 1 and fail_open 1 everywhere (nginx has them all), healthy 0 everywhere."""
    sc, scrape, clock, _ = make(tmp_path)
    cycles(sc, clock, 2)
    assert healthy(sc.telemetry) == {"dp0": 1, "dp1": 1, "dp2": 1}
    scrape.unhealthy.update(NAMES)
    cycles(sc, clock, 1)
    assert healthy(sc.telemetry) == {"dp0": 0, "dp1": 0, "dp2": 0}, "the last check, from the first failure on"
    cycles(sc, clock, sc.policy.fail_threshold + 1)
    assert value(sc.telemetry, "fdngx_fail_open") == 1
    assert {n: value(sc.telemetry, "fdngx_replica_up", n) for n in NAMES} == {"dp0": 1, "dp1": 1, "dp2": 1}
    assert healthy(sc.telemetry) == {"dp0": 0, "dp1": 0, "dp2": 0}
    scrape.unhealthy.clear()
    cycles(sc, clock, 1)
    assert healthy(sc.telemetry) == {"dp0": 1, "dp1": 1, "dp2": 1}


def test_a_replica_held_out_and_a_drained_one_say_how_their_health_checks_go(tmp_path: Path) -> None:
    sc, scrape, clock, _ = make(tmp_path)
    cycles(sc, clock, 2)
    scrape.unhealthy.add("dp1")
    save(Inventory([replace(i, drain=i.name == "dp2") for i in inv_of(3).instances]), tmp_path / "fdngx.json")
    assert sc.reload_inventory()
    cycles(sc, clock, sc.policy.fail_threshold + 1)
    assert value(sc.telemetry, "fdngx_fail_open") == 0
    assert value(sc.telemetry, "fdngx_replica_up", "dp1") == 0 and value(sc.telemetry, "fdngx_replica_up", "dp2") == 0
    # dp1 held out for failing, dp2 drained on purpose and still checked (it passes)
    assert healthy(sc.telemetry) == {"dp0": 1, "dp1": 0, "dp2": 1}


def test_a_replica_not_checked_is_nan_and_one_that_left_has_no_series() -> None:
    t = Telemetry()
    decisions = Decisions(tuple(Decision(n, 20, False, "", False) for n in NAMES))
    state = PolicyState({n: InstanceState(weight=20) for n in NAMES})
    samples = {"dp0": LoadSample("dp0", True, True, 1, 0), "dp1": LoadSample("dp1", False, False, error="refused")}
    t.cycle(CycleResult(decisions, samples, None, None, None), state, 1.0, 0.1)
    got = healthy(t)
    assert got["dp0"] == 1 and got["dp1"] == 0
    assert got["dp2"] is not None and math.isnan(got["dp2"]), "no sample: not checked, not known (NaN)"
    fewer = Decisions(decisions.items[:2])
    t.cycle(CycleResult(fewer, samples, None, None, None), state, 2.0, 0.1)
    assert 'replica="dp2"' not in generate_latest(t.registry).decode()
