"""The sidecar loop, cron-mode cycle and telemetry with fake scrapes and a fake apply (no nginx, no sleep)."""

from __future__ import annotations

import json
import re
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import requests
from prometheus_client import generate_latest

from fdngx import cycle
from fdngx.errors import ApplyError
from fdngx.inventory import Instance, Inventory, save
from fdngx.nginx import ApplyResult, safe_apply
from fdngx.policy import PolicyConfig, PolicyState
from fdngx.scrape import LoadSample
from fdngx.sidecar import Sidecar, SidecarConfig
from fdngx.telemetry import Telemetry


def inv_of(n: int) -> Inventory:
    return Inventory([Instance(f"dp{i}", "127.0.0.1", 8000 + i, 9000 + i, "sim", max_num_seqs=64) for i in range(n)])


class FakeScrape:
    """Samples from a table the test edits between cycles."""

    def __init__(self) -> None:
        self.running: dict[str, float] = {}
        self.queued: dict[str, float] = {}
        self.unhealthy: set[str] = set()
        self.calls = 0

    def __call__(self, instances: Any, **kw: Any) -> dict[str, LoadSample]:
        self.calls += 1
        out = {}
        for i in instances:
            bad = i.name in self.unhealthy
            out[i.name] = LoadSample(
                i.name,
                True,
                not bad,
                self.running.get(i.name, 10),
                self.queued.get(i.name, 0),
                0.3,
                64.0,
                health_error="404" if bad else None,
            )
        return out


class Clock:
    def __init__(self) -> None:
        self.t = 1_000_000.0

    def __call__(self) -> float:
        return self.t


def make(
    tmp: Path, n: int = 3, fail: Callable[[], bool] = lambda: False, **policy: Any
) -> tuple[Sidecar, FakeScrape, Clock, list[str]]:
    save(inv_of(n), tmp / "fdngx.json")
    written: list[str] = []

    def apply(path: Path, content_fn: Callable[[], str], control: Any, *, reload: bool) -> ApplyResult:
        if fail():
            raise ApplyError(f"{path}: nginx -t failed: boom; restored the previous file")
        result = safe_apply(path, content_fn, None, reload=False)
        if result.changed:
            written.append(path.read_text())
        return result

    scrape, clock = FakeScrape(), Clock()
    cfg = SidecarConfig((tmp / "fdngx.json",), tmp / "upstream.conf", policy=PolicyConfig(**policy), debounce=0.2)
    sc = Sidecar(cfg, scrape=scrape, apply=apply, clock=clock, telemetry=Telemetry())
    return sc, scrape, clock, written


def cycles(sc: Sidecar, clock: Clock, k: int) -> None:
    for _ in range(k):
        sc.run_once()
        clock.t += sc.policy.interval


def test_first_cycle_writes_then_only_changes_write(tmp_path: Path) -> None:
    sc, scrape, clock, written = make(tmp_path, min_hold=0)
    cycles(sc, clock, 5)
    assert len(written) == 1 and written[0].count("weight=20") == 3
    scrape.running["dp0"], scrape.queued["dp0"] = 64, 30
    cycles(sc, clock, 10)
    weights = {m[2]: int(m[1]) for m in re.finditer(r"weight=(\d+) .*# (dp\d)", written[-1])}
    assert len(written) >= 2 and weights["dp0"] < 17 and weights["dp1"] >= 20 and weights["dp2"] >= 20, weights
    saved = json.loads((tmp_path / "upstream.conf.state.json").read_text())
    assert saved["instances"]["dp0"]["weight"] < 17


def test_failed_apply_keeps_the_change_pending(tmp_path: Path) -> None:
    failing = {"on": False}
    sc, scrape, clock, _ = make(tmp_path, fail=lambda: failing["on"])
    cycles(sc, clock, 2)
    failing["on"] = True
    scrape.unhealthy.add("dp1")
    cycles(sc, clock, 4)
    assert not sc.state.instances["dp1"].down, "nginx never got `down`: the state must not claim it"
    assert sc.telemetry.reload_failures._value.get() >= 1
    failing["on"] = False
    report = sc.run_once()
    assert report.error is None and report.decisions.by_name()["dp1"].down
    assert " down;" in (tmp_path / "upstream.conf").read_text()


def test_inventory_change_is_debounced_and_bad_edits_keep_the_old_one(tmp_path: Path) -> None:
    sc, _, _, written = make(tmp_path, n=2)
    stop = threading.Event()
    sc.watch()
    runner = threading.Thread(target=sc.run, daemon=True)
    runner.start()
    try:
        deadline = time.monotonic() + 10
        while not written and time.monotonic() < deadline:
            time.sleep(0.02)
        save(inv_of(3), tmp_path / "fdngx.json")
        t0 = time.monotonic()
        while len(sc.inventory.instances) != 3 and time.monotonic() < t0 + 10:
            time.sleep(0.02)
        assert len(sc.inventory.instances) == 3
        assert time.monotonic() - t0 >= 0.15, "the debounce waits for the writes to settle"
        while "dp2" not in (written[-1] if written else "") and time.monotonic() < t0 + 10:
            time.sleep(0.02)
        assert "# dp2" in written[-1]
        (tmp_path / "fdngx.json").write_text("{ broken")
        sc.inventory_changed(immediate=True)
        time.sleep(0.5)
        assert len(sc.inventory.instances) == 3
    finally:
        stop.set()
        sc.stop()
        runner.join(timeout=10)
    assert not runner.is_alive()


def test_telemetry_exports_and_forgets_instances(tmp_path: Path) -> None:
    sc, scrape, clock, _ = make(tmp_path)
    scrape.unhealthy.add("dp2")
    cycles(sc, clock, 4)
    text = generate_latest(sc.telemetry.registry).decode()
    assert 'fdngx_instance_weight{instance="dp0"} 20.0' in text
    assert 'fdngx_instance_up{instance="dp2"} 0.0' in text
    assert 'fdngx_instance_running{instance="dp1"} 10.0' in text
    assert "fdngx_config_generation{generation=" in text or "fdngx_reloads_total" in text
    save(inv_of(2), tmp_path / "fdngx.json")
    assert sc.reload_inventory()
    sc.run_once()
    text = generate_latest(sc.telemetry.registry).decode()
    assert 'instance="dp2"' not in text


def test_telemetry_serves_on_a_port() -> None:
    t = Telemetry()
    host, port = t.serve("127.0.0.1:0")
    try:
        body = requests.get(f"http://{host}:{port}/metrics", timeout=5).text
        assert "fdngx_reloads_total" in body
    finally:
        t.close()


# -- cron mode --------------------------------------------------------------------------------------------


def test_run_cycle_persists_state_between_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    scrape = FakeScrape()
    monkeypatch.setattr(cycle, "scrape_all", scrape)
    state_path = cycle.state_path_for(tmp_path / "upstream.conf")
    assert state_path.name == "upstream.conf.state.json"
    inv = inv_of(2)
    scrape.unhealthy.add("dp1")
    results = [cycle.run_cycle(inv, state_path=state_path, now=1000.0 + 60 * k) for k in range(3)]
    # Three separate runs (as cron does) add up to K=3 failed checks: the state carried the count.
    assert [r.states["dp1"].down for r in results] == [False, False, True]
    assert results[2].changed and "failed 3x (404)" in results[2].decisions.by_name()["dp1"].reason
    assert results[0].states["dp0"].weight == 20


def test_corrupt_state_starts_fresh(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    p = tmp_path / "x.state.json"
    p.write_text("{ not json")
    assert cycle.load_state(p) == PolicyState()
    assert "ignoring unreadable policy state" in caplog.text
    assert cycle.load_state(tmp_path / "missing.json") == PolicyState()


def test_run_cycle_without_save_leaves_no_trace(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cycle, "scrape_all", FakeScrape())
    state_path = tmp_path / "u.conf.state.json"
    result = cycle.run_cycle(inv_of(2), state_path=state_path, now=1000.0, save=False)
    assert result.states["dp0"].weight == 20 and not state_path.exists()


def test_a_file_rewritten_non_stop_is_still_picked_up(tmp_path: Path) -> None:
    sc, _, _, _ = make(tmp_path, n=2)  # debounce 0.2 s: picked up at the latest 1 s after the first change
    runner = threading.Thread(target=sc.run, daemon=True)
    runner.start()
    try:
        save(inv_of(3), tmp_path / "fdngx.json")
        t0 = time.monotonic()
        while len(sc.inventory.instances) != 3 and time.monotonic() - t0 < 5:
            sc.inventory_changed()  # events keep coming every 20 ms: the quiet period never arrives
            time.sleep(0.02)
        assert len(sc.inventory.instances) == 3
        assert time.monotonic() - t0 < 3.5  # vs never: the writes go on for 5 s
    finally:
        sc.stop()
        runner.join(timeout=10)
