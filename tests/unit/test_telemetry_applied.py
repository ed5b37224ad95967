"""The sidecar's per-replica metrics say what nginx has, not what the policy decided: a failed apply (nginx -t
refusing every candidate, a render refusing an inventory with every replica drained) leaves up, drained,
backup and weight as nginx got them last; and a replica without a usable scrape exports its running, queued
and KV usage as NaN (not known), not its last reading frozen. A fake scrape and a fake apply, no nginx."""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path

from fdngx.domain import Inventory, LoadSample
from fdngx.inventory import save
from fdngx.weights.controller import CycleResult
from fdngx.weights.policy import Decision, Decisions
from fdngx.weights.sidecar import Sidecar
from fdngx.weights.state import InstanceState, PolicyState
from fdngx.weights.telemetry import Telemetry
from tests.unit.test_loop import cycles, inv_of, make


def value(t: Telemetry, name: str, replica: str) -> float | None:
    return t.registry.get_sample_value(name, {"replica": replica})


def replica(t: Telemetry, name: str) -> dict[str, float | None]:
    return {m: value(t, f"fdngx_replica_{m}", name) for m in ("up", "drained", "backup", "weight")}


def drain(sc: Sidecar, tmp: Path, inv: Inventory, *names: str, taken: bool = True) -> None:
    save(Inventory([replace(i, drain=i.name in names) for i in inv.instances]), tmp / "fdngx.json")
    assert sc.reload_inventory() is taken


def test_a_drain_nginx_refused_is_not_exported_until_an_apply_succeeds(tmp_path: Path) -> None:
    failing = {"on": False}
    sc, _, clock, _ = make(tmp_path, fail=lambda: failing["on"])
    cycles(sc, clock, 2)
    assert replica(sc.telemetry, "dp2") == {"up": 1, "drained": 0, "backup": 0, "weight": 20}
    failing["on"] = True  # nginx -t refuses every candidate from now on
    drain(sc, tmp_path, inv_of(3), "dp2")
    cycles(sc, clock, 3)
    assert sc.telemetry.apply_failures._value.get() >= 1
    # nginx still has dp2 in rotation at weight 20: so do the metrics
    assert replica(sc.telemetry, "dp2") == {"up": 1, "drained": 0, "backup": 0, "weight": 20}
    failing["on"] = False
    cycles(sc, clock, 1)
    assert replica(sc.telemetry, "dp2")["up"] == 0 and replica(sc.telemetry, "dp2")["drained"] == 1


def test_every_replica_drained_leaves_them_up_as_nginx_has_them(tmp_path: Path) -> None:
    sc, _, clock, _ = make(tmp_path)
    cycles(sc, clock, 2)
    # Refused as it is read (render would refuse it): the inventory in force stays, nginx keeps what it has
    drain(sc, tmp_path, inv_of(3), "dp0", "dp1", "dp2", taken=False)
    cycles(sc, clock, 2)
    for name in ("dp0", "dp1", "dp2"):
        assert replica(sc.telemetry, name) == {"up": 1, "drained": 0, "backup": 0, "weight": 20}, name


def test_a_replica_nginx_never_got_from_fdngx_has_no_applied_series(tmp_path: Path) -> None:
    """Before the first successful apply the state holds no weight (None): what nginx has is not known, so
    none of up/drained/backup/weight is exported (not the decision); the scrape's series are."""
    sc, _, clock, _ = make(tmp_path, fail=lambda: True)
    cycles(sc, clock, 2)
    assert sc.state.instances["dp0"].weight is None
    assert replica(sc.telemetry, "dp0") == {"up": None, "drained": None, "backup": None, "weight": None}
    assert value(sc.telemetry, "fdngx_replica_load_signal", "dp0") == 1
    assert value(sc.telemetry, "fdngx_replica_running", "dp0") == 10


def test_backup_comes_from_what_nginx_has() -> None:
    t = Telemetry()
    decisions = Decisions((Decision("y0", 13, False, "backup", True, backup=True),))
    applied = PolicyState({"y0": InstanceState(weight=20)})
    t.cycle(CycleResult(decisions, {}, None, None, "nginx -t failed"), applied, 1.0, 0.1)
    assert replica(t, "y0") == {"up": 1, "drained": 0, "backup": 0, "weight": 20}
    applied = PolicyState({"y0": InstanceState(weight=13, backup=True)})
    t.cycle(CycleResult(decisions, {}, None, None, None), applied, 2.0, 0.1)
    assert replica(t, "y0") == {"up": 1, "drained": 0, "backup": 1, "weight": 13}


def test_a_replica_without_a_load_signal_exports_nan_not_its_last_reading(tmp_path: Path) -> None:
    sc, scrape, clock, _ = make(tmp_path)
    scrape.running["dp1"] = 6
    cycles(sc, clock, 2)
    assert value(sc.telemetry, "fdngx_replica_running", "dp1") == 6
    assert value(sc.telemetry, "fdngx_replica_kv_usage_ratio", "dp1") == 0.3
    real = sc.controller.scrape

    def dead(instances: object, **kw: object) -> dict[str, LoadSample]:
        out = real(instances, **kw)
        out["dp1"] = LoadSample("dp1", False, False, error="connection refused", health_error="connection refused")
        return out

    sc.controller.scrape = dead
    cycles(sc, clock, 1)
    assert value(sc.telemetry, "fdngx_replica_load_signal", "dp1") == 0
    for name in ("running", "queued", "kv_usage_ratio"):
        got = value(sc.telemetry, f"fdngx_replica_{name}", "dp1")
        assert got is not None and math.isnan(got), (name, got)
    assert value(sc.telemetry, "fdngx_replica_running", "dp0") == 10  # the others keep their readings
