"""The controller's one cycle (as the sidecar and cron run it) and telemetry, with fake scrapes and a fake
apply (no nginx, no sleep)."""

from __future__ import annotations

import itertools
import json
import logging
import os
import re
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import requests
from prometheus_client import generate_latest

from fdngx.domain import Engine, Flavor, Instance, Inventory, LoadSample, Mode
from fdngx.errors import ApplyError
from fdngx.inventory import load_many, save
from fdngx.nginx import journal
from fdngx.nginx.apply import ApplyResult, ReloadFailed, safe_apply
from fdngx.nginx.render import RenderOptions
from fdngx.nginx.target import Target, TargetSpec, open_target
from fdngx.weights.controller import Controller, CycleResult, _log_scrapes
from fdngx.weights.settings import PolicyConfig
from fdngx.weights.sidecar import Sidecar, SidecarConfig
from fdngx.weights.state import InstanceState, PolicyState
from fdngx.weights.store import StateStore, store_for
from fdngx.weights.telemetry import Telemetry


def inv_of(n: int) -> Inventory:
    return Inventory(
        [Instance(f"dp{i}", "127.0.0.1", 8000 + i, 9000 + i, Engine.SIM, max_num_seqs=64) for i in range(n)]
    )


class FakeTarget(Target):
    """The real render and the real file write; the apply fails on demand (as a failed nginx -t would)."""

    def __init__(self, out: Path, fail: Callable[[], bool], written: list[str]) -> None:
        super().__init__(out, RenderOptions(), None, False, None)
        object.__setattr__(self, "fail", fail)
        object.__setattr__(self, "written", written)

    def apply(self, text: str, guard: object = None) -> ApplyResult:
        assert self.out is not None
        if self.fail():  # type: ignore[attr-defined]
            raise ApplyError(f"{self.out}: nginx -t failed: boom; restored the previous file")
        result = safe_apply(self.out, text, None, reload=False)
        if result.changed:
            self.written.append(self.out.read_text())  # type: ignore[attr-defined]
        return result


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
    scrape, clock = FakeScrape(), Clock()
    target = FakeTarget(tmp / "upstream.conf", fail, written)
    cfg = SidecarConfig((tmp / "fdngx.json",), target, policy=PolicyConfig(**policy), debounce=0.2)
    sc = Sidecar(cfg, scrape=scrape, clock=clock, telemetry=Telemetry())
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
    saved = json.loads((tmp_path / ".upstream.conf.fdngx-state.json").read_text())
    assert saved["instances"]["dp0"]["weight"] < 17


def test_failed_apply_keeps_the_change_pending(tmp_path: Path) -> None:
    failing = {"on": False}
    sc, scrape, clock, _ = make(tmp_path, fail=lambda: failing["on"])
    cycles(sc, clock, 2)
    failing["on"] = True
    scrape.unhealthy.add("dp1")
    cycles(sc, clock, 4)
    assert not sc.state.instances["dp1"].down, "nginx never got `down`: the state must not claim it"
    assert sc.telemetry.apply_failures._value.get() >= 1
    saved = json.loads((tmp_path / ".upstream.conf.fdngx-state.json").read_text())
    assert saved["instances"]["dp1"]["down"] is False, "the saved state claims what nginx never got"
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
    assert 'fdngx_replica_weight{replica="dp0"} 20.0' in text
    assert 'fdngx_replica_up{replica="dp2"} 0.0' in text
    assert 'fdngx_replica_running{replica="dp1"} 10.0' in text
    generation = re.search(r"^fdngx_config_generation ([0-9.e+]+)$", text, re.M)
    assert generation and float(generation.group(1)) > 0, "the generation of the file written, as a number"
    assert 'fdngx_replica_scrape_errors_total{replica="dp0"} 0.0' in text, "counters exist from the start"
    assert "_created" not in text
    save(inv_of(2), tmp_path / "fdngx.json")
    assert sc.reload_inventory()
    sc.run_once()
    text = generate_latest(sc.telemetry.registry).decode()
    assert 'replica="dp2"' not in text


def test_telemetry_serves_on_a_port() -> None:
    t = Telemetry()
    host, port = t.serve("127.0.0.1:0")
    try:
        body = requests.get(f"http://{host}:{port}/metrics", timeout=5).text
        assert "fdngx_reloads_total 0.0" in body and "fdngx_build_info{" in body
    finally:
        t.close()


# -- cron mode --------------------------------------------------------------------------------------------


def cron(tmp: Path, scrape: FakeScrape, fail: Callable[[], bool] = lambda: False) -> Controller:
    """What `render --scrape` builds: the same Controller, run once per process."""
    target = FakeTarget(tmp / "upstream.conf", fail, [])
    return Controller(target, PolicyConfig(), scrape=scrape, clock=Clock(), log_outcome=False)


def test_cron_runs_persist_state_between_runs(tmp_path: Path) -> None:
    scrape = FakeScrape()
    store = store_for(tmp_path / "upstream.conf")
    assert store.path.name == ".upstream.conf.fdngx-state.json"
    inv = inv_of(2)
    scrape.unhealthy.add("dp1")
    results = []
    for k in range(3):
        controller = cron(tmp_path, scrape)  # a new process each minute
        controller.clock.t = 1000.0 + 60 * k  # type: ignore[attr-defined]
        results.append(controller.run_once(inv, store))
    # Three separate runs (as cron does) add up to K=3 failed checks: the state carried the count.
    assert [r.decisions.by_name()["dp1"].down for r in results] == [False, False, True]
    assert results[2].changed and "failed 3x (404)" in results[2].decisions.by_name()["dp1"].reason
    assert results[0].decisions.by_name()["dp0"].weight == 20
    assert " down;" in (tmp_path / "upstream.conf").read_text()


def test_cron_failed_apply_leaves_the_applied_weights_in_the_state(tmp_path: Path) -> None:
    scrape = FakeScrape()
    store = store_for(tmp_path / "upstream.conf")
    inv = inv_of(2)
    cron(tmp_path, scrape).run_once(inv, store)
    before = json.loads(store.path.read_text())["instances"]
    scrape.unhealthy.add("dp1")
    for _ in range(3):
        result = cron(tmp_path, scrape, fail=lambda: True).run_once(inv, store)
    assert result.error and result.decisions.by_name()["dp1"].down, "the policy wanted `down`..."
    after = json.loads(store.path.read_text())["instances"]
    assert after["dp1"]["down"] is False and after["dp1"]["weight"] == before["dp1"]["weight"], "...nginx never got it"
    assert after["dp1"]["fails"] == 3, "health counts and smoothing are kept"


def test_corrupt_or_mistyped_state_starts_fresh(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    p = tmp_path / ".x.fdngx-state.json"
    p.write_text("{ not json")
    p.chmod(0o600)
    assert StateStore(p).load() == PolicyState()
    assert "ignoring unusable policy state" in caplog.text
    p.write_text('{"version":1,"instances":{"dp0":{"weight":"abc"}}}')
    assert StateStore(p).load() == PolicyState()
    assert "'weight'" in caplog.text
    assert StateStore(tmp_path / "missing.json").load() == PolicyState()


def test_a_state_save_removes_the_temps_killed_saves_left(tmp_path: Path) -> None:
    """A controller's state lies beside its inventory, where no apply's recovery looks: a sidecar killed
    between a save's write and its rename left the temp for good. The next save removes ours once old."""
    path = tmp_path / "..inventory.json.fdngx-controller-state.json"
    store = StateStore(path)
    old = tmp_path / f".{path.name}.ab12cd34.fdngx-tmp"
    fresh = tmp_path / f".{path.name}.zz99yy88.fdngx-tmp"  # a save in progress (another process)
    other = tmp_path / ".other.json.ab12cd34.fdngx-tmp"
    for f in (old, fresh, other):
        f.write_text("{}")
    long_ago = time.time() - 2 * journal.STALE_TEMP_AFTER
    for f in (old, other):
        os.utime(f, (long_ago, long_ago))
    store.save(PolicyState())
    assert not old.exists()
    assert fresh.exists() and other.exists()
    assert store.load() == PolicyState()


def test_dry_run_leaves_no_trace(tmp_path: Path) -> None:
    store = store_for(tmp_path / "upstream.conf")
    result = cron(tmp_path, FakeScrape()).run_once(inv_of(2), store, save=False)
    assert result.decisions.by_name()["dp0"].weight == 20 and not store.path.exists()


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


class FakeControl:
    """An nginx that runs, or not (fdngx only asks)."""

    def __init__(self) -> None:
        self.up = True

    def running(self) -> bool:
        return self.up


def test_nginx_up_is_checked_every_cycle_even_when_nothing_changes(tmp_path: Path) -> None:
    sc, _, clock, _ = make(tmp_path)
    control = FakeControl()
    object.__setattr__(sc.config.target, "control", control)
    object.__setattr__(sc.config.target, "reload", True)
    cycles(sc, clock, 3)

    def up() -> str:
        return re.search(r"^fdngx_nginx_up (\S+)$", generate_latest(sc.telemetry.registry).decode(), re.M).group(1)

    assert up() == "1.0"
    control.up = False  # nginx stopped; weights steady: no apply runs, the look at the master says so
    result = sc.run_once()
    assert result.applied is None and result.nginx_running is False and up() == "0.0"
    text = generate_latest(sc.telemetry.registry).decode()
    assert 'fdngx_replica_slots{replica="dp0"} 64.0' in text and 'fdngx_replica_load_ratio{replica="dp0"}' in text


def test_nginx_up_is_unknown_when_fdngx_does_not_reload(tmp_path: Path) -> None:
    sc, _, clock, _ = make(tmp_path)
    cycles(sc, clock, 2)
    assert re.search(r"^fdngx_nginx_up NaN$", generate_latest(sc.telemetry.registry).decode(), re.M)


def test_a_config_whose_reload_failed_is_held_back_not_reloaded_every_cycle(tmp_path: Path) -> None:
    """A --listen that a default_server answers: each try reloads nginx twice (the reload, then back). The same
    config is not tried again for a while; another config is, at once; an nginx -t failure is never held."""
    tries: list[str] = []

    class ReloadFails(FakeTarget):
        def apply(self, text: str, guard: object = None) -> ApplyResult:
            tries.append(text)
            raise ReloadFailed(f"{self.out}: nginx reloaded, but the new config does not answer; restored")

    save(inv_of(2), tmp_path / "fdngx.json")
    target = ReloadFails(tmp_path / "upstream.conf", lambda: True, [])
    controller = Controller(target, None)
    inv = load_many([tmp_path / "fdngx.json"])
    for _ in range(4):
        result, _state = controller.step(inv, PolicyState(), force_render=True)
        assert result.error is not None and "does not answer" in result.error
    assert len(tries) == 1, "the same config, tried again every cycle"
    controller.step(inv_of(3), PolicyState(), force_render=True)
    assert len(tries) == 2, "another config is tried at once"


def test_failing_open_is_said_when_it_starts_changes_and_ends(tmp_path: Path,
                                                              caplog: pytest.LogCaptureFixture) -> None:
    """A full outage changes no weight (every replica is at its static weight already), so no change line
    said it: only the first cycle's, or never (an incident review: three scrape warnings, nothing at ERROR)."""
    sc, scrape, clock, _ = make(tmp_path, min_hold=0)
    cycles(sc, clock, 2)
    caplog.set_level(logging.INFO, "fdngx")
    scrape.unhealthy.update({"dp0", "dp1", "dp2"})
    cycles(sc, clock, 8)
    said = [(r.levelno, r.getMessage()) for r in caplog.records if "failing open" in r.getMessage()]
    assert said == [(logging.ERROR, "failing open: all replicas fail /health: nginx gets every replica at its "
                                    "static weight")], said
    scrape.unhealthy.clear()
    cycles(sc, clock, 6)
    ended = [r for r in caplog.records if "no longer failing open" in r.getMessage()]
    assert len(ended) == 1 and ended[0].levelno == logging.INFO, [r.getMessage() for r in caplog.records]


def test_a_fleet_that_has_not_answered_yet_is_starting_not_an_outage(tmp_path: Path,
                                                                     caplog: pytest.LogCaptureFixture) -> None:
    # A sidecar started with the fleet (replicas still loading): WARNING, not an ERROR at every start.
    sc, scrape, clock, _ = make(tmp_path, min_hold=0)
    scrape.unhealthy.update({"dp0", "dp1", "dp2"})
    caplog.set_level(logging.INFO, "fdngx")
    cycles(sc, clock, 6)
    said = [(r.levelno, r.getMessage()) for r in caplog.records if "failing open" in r.getMessage()]
    assert said == [(logging.WARNING, "failing open: all replicas fail /health (none has yet): nginx gets every "
                                      "replica at its static weight")], said


class _Control:
    """nginx's master as a test sets it: running or not (the reload is never asked: nothing changes)."""

    def __init__(self) -> None:
        self.up = True

    def running(self) -> bool:
        return self.up


def test_a_stopped_nginx_is_said_while_no_weight_changes(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """The plain flavor applies only on a change: judged from the apply's answer, a stop with steady weights
    (and the start after it) went unsaid. Asked every cycle."""
    sc, _, clock, _ = make(tmp_path, min_hold=0)
    control = _Control()
    object.__setattr__(sc.controller.target, "control", control)
    object.__setattr__(sc.controller.target, "reload", True)
    cycles(sc, clock, 2)
    caplog.set_level(logging.INFO, "fdngx")
    control.up = False
    cycles(sc, clock, 3)
    control.up = True
    cycles(sc, clock, 2)
    said = [m for r in caplog.records if "nginx is" in (m := r.getMessage())]
    out = tmp_path / "upstream.conf"
    assert said == [f"{out}: nginx is not running: changes wait in the file until it starts",
                    f"{out}: nginx is running again"], said


def test_a_scrape_failing_another_way_is_said_once_per_kind(caplog: pytest.LogCaptureFixture) -> None:
    """A replica whose /metrics went from hanging to garbage kept only 'scrape deadline exceeded' in the log,
    while status said 'bad metrics'. A new kind is said once (INFO); a detail or number that moves is not (an
    HTTP status is the kind itself)."""
    def state(error: str | None) -> PolicyState:
        return PolicyState({"dp0": InstanceState(last_error=error)})

    caplog.set_level(logging.INFO, "fdngx.controller")
    steps = [None, "no answer before the scrape deadline", "no answer before the scrape deadline",
             "bad metrics: could not convert 'x' at line 3", "bad metrics: could not convert 'y' at line 9",
             "HTTP 500", "HTTP 503", None]
    for old, new in itertools.pairwise(steps):
        _log_scrapes(state(old), state(new))
    said = [r.getMessage() for r in caplog.records]
    assert said == ["dp0: metrics scrape failing: no answer before the scrape deadline",
                    "dp0: metrics scrape still failing, now: bad metrics: could not convert 'x' at line 3",
                    "dp0: metrics scrape still failing, now: HTTP 500",
                    "dp0: metrics scrape still failing, now: HTTP 503",
                    "dp0: metrics scrape works again"], said


@pytest.mark.parametrize("controller", [False, True])
def test_a_stopped_openresty_nginx_is_said_as_the_peers_file_waiting(tmp_path: Path, controller: bool,
                                                                     caplog: pytest.LogCaptureFixture) -> None:
    """Controller mode with a local OpenResty (--push-to ... --out --reload) has no admin client of its own: the
    line said 'changes wait in the file', though the balancer takes its weights from the peers file."""
    out = tmp_path / "nginx.conf"
    spec = TargetSpec(RenderOptions(mode=Mode.STANDALONE, flavor=Flavor.OPENRESTY), out=out, reload=True,
                      pid_file=tmp_path / "nginx.pid", controller=controller)
    caplog.set_level(logging.INFO, "fdngx.controller")
    Controller(open_target(spec), PolicyConfig())._log(CycleResult(None, {}, None, None, None, nginx_running=False))
    said = [r.getMessage() for r in caplog.records]
    assert said == [f"{out}: nginx is not running: the balancer reads the peers file when it starts"], said
