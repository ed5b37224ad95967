"""`fdngx sidecar` end to end: real nginx, simulated replicas (one process each, so one can die), the real CLI.

Assertions read the sidecar's own /metrics (what it applied) and nginx's split (X-Fdngx-Replica headers of
requests sent through nginx). Every wait polls with a generous timeout; every process is stopped by PID.
"""

from __future__ import annotations

import collections
import contextlib
import json
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families

from fdngx.nginx.openresty import lua_modules
from fdngx.sim.process import SimProcess, start_sim
from tests.support import Nginx, fdngx, free_ports, stop_process_group, wait_for, write_inventory

pytestmark = pytest.mark.nginx

SEQS = 8  # small slots: a few long requests make a visible load


class Loop:
    """N simulated replicas, a standalone nginx rendered from their inventory, and a sidecar on it."""

    def __init__(
        self,
        tmp: Path,
        *,
        n: int = 3,
        listed: int | None = None,
        interval: float = 0.5,
        args: tuple[str, ...] = (),
        openresty: bool = False,
        speeds: tuple[float, ...] = (),
    ) -> None:
        ports = free_ports(2 * n + 3)
        self.api, self.met = ports[:n], ports[n : 2 * n]
        self.port, self.metrics_port = ports[2 * n], ports[2 * n + 1]
        flavor = ("--flavor", "openresty", "--admin-listen", f"127.0.0.1:{ports[2 * n + 2]}") if openresty else ()
        self.tmp = tmp
        self.speeds = speeds
        self.interval = interval
        self.sims: list[SimProcess | None] = [None] * n
        self.nginx: Nginx | None = None
        self.sidecar: subprocess.Popen[bytes] | None = None
        self.url = f"http://127.0.0.1:{self.port}"
        self.inv = tmp / "fdngx.json"
        self.conf = tmp / "nginx" / "nginx.conf"
        self.log = tmp / "sidecar.log"
        try:
            for i in range(n):
                self.start_replica(i)
            self.write_inventory(listed if listed is not None else n)
            # What render and the sidecar share: the same inventory, output and flavor.
            common = ["-i", str(self.inv), "--mode", "standalone", "--listen", f"127.0.0.1:{self.port}"]
            common += ["--out", str(self.conf), *flavor]
            fdngx("render", *common, check=True)
            self.nginx = Nginx(tmp / "nginx").start(f"{self.url}/health")
            argv = [
                sys.executable,
                "-m",
                "fdngx",
                "sidecar",
                *common,
                "--interval",
                str(interval),
                "--metrics-listen",
                f"127.0.0.1:{self.metrics_port}",
                "--debounce",
                "0.5",
                *args,
            ]
            with self.log.open("wb") as fh:
                self.sidecar = subprocess.Popen(argv, start_new_session=True, stdout=fh, stderr=subprocess.STDOUT)
            # The first cycle replaces the inventory's static weights with capacity weights: one reload.
            first = "fdngx_pushes_total" if openresty else "fdngx_reloads_total"
            wait_for(lambda: self.metric(first) >= 1, 30, what=f"first apply ({self.tail()})")
        except BaseException:
            self.stop()
            raise

    def name_of(self, port: str) -> str:
        return f"dp{self.api.index(int(port))}"

    def start_replica(self, i: int) -> None:
        self.sims[i] = start_sim(
            [self.api[i]],
            [self.met[i]],
            max_num_seqs=SEQS,
            seed=i,
            speed=self.speeds[i] if self.speeds else 1.0,
            log_path=self.tmp / f"sim{i}.log",
        )

    def kill_replica(self, i: int) -> None:
        sim = self.sims[i]
        assert sim is not None
        sim.stop(grace=2.0)
        self.sims[i] = None

    def write_inventory(self, count: int) -> None:
        write_inventory(
            self.inv,
            [
                {
                    "name": f"dp{i}",
                    "host": "127.0.0.1",
                    "port": self.api[i],
                    "metrics_port": self.met[i],
                    "engine": "sim",
                    "max_num_seqs": SEQS,
                }
                for i in range(count)
            ],
        )

    def tail(self) -> str:
        try:
            return " | ".join(self.log.read_text(errors="replace").strip().splitlines()[-8:])
        except OSError:
            return ""

    def metrics(self) -> dict[tuple[str, str], float]:
        text = requests.get(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=2).text
        out: dict[tuple[str, str], float] = {}
        for fam in text_string_to_metric_families(text):
            for s in fam.samples:
                key = s.labels.get("replica") or s.labels.get("le") or ""
                out[(s.name, key)] = s.value
        return out

    def weights(self) -> dict[str, float]:
        return {f"dp{i}": self.metric("fdngx_replica_weight", f"dp{i}") for i in range(len(self.api))}

    def metric(self, name: str, instance: str = "") -> float:
        try:
            return self.metrics().get((name, instance), float("nan"))
        except requests.RequestException:
            return float("nan")

    def post(self, base: str, session: requests.Session, max_tokens: int = 1, timeout: float = 30) -> requests.Response:
        body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": max_tokens}
        return session.post(f"{base}/v1/chat/completions", json=body, timeout=timeout)

    def split(self, n: int) -> collections.Counter[str]:
        """Replicas that served n sequential tiny requests through nginx (no conns open: the weights decide)."""
        with requests.Session() as s:
            return collections.Counter(
                self.name_of(self.post(self.url, s).headers["X-Fdngx-Replica"]) for _ in range(n)
            )

    def stop(self) -> None:
        if self.sidecar is not None:
            stop_process_group(self.sidecar)
        if self.nginx is not None:
            self.nginx.stop()
        for sim in self.sims:
            if sim is not None:
                sim.stop(grace=2.0)


class Traffic:
    """Client threads sending requests in a loop; records (start, end, ok, detail) for every request.
    `load`: streamed requests that only keep slots busy; stop() drops the ones in flight at once instead of
    waiting for them (400 tokens take ~14 s from the simulator) and they are not recorded."""

    def __init__(self, loop: Loop, base: str, threads: int, max_tokens: int, load: bool = False) -> None:
        self.loop, self.base, self.max_tokens, self.load = loop, base, max_tokens, load
        self.results: list[tuple[float, float, bool, str]] = []
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, daemon=True) for _ in range(threads)]
        for t in self._threads:
            t.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            start = time.monotonic()
            # A fresh connection per request: an idle keep-alive connection that a reload's old worker
            # closes just as the client reuses it is reset (HTTP's own race, see the README), which is
            # not what these tests measure.
            try:
                with requests.Session() as s:
                    if self.load:
                        if not self._stream(s):
                            return
                        continue
                    r = self.loop.post(self.base, s, self.max_tokens)
                ok, detail = r.status_code == 200, f"{r.status_code} {r.headers.get('X-Fdngx-Replica', '')}"
            except requests.RequestException as exc:
                ok, detail = False, type(exc).__name__
            self.results.append((start, time.monotonic(), ok, detail))

    def _stream(self, session: requests.Session) -> bool:
        """One streamed request to its end, or until stop(): then its connection is closed (False)."""
        body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": self.max_tokens,
                "stream": True}
        with session.post(f"{self.base}/v1/chat/completions", json=body, timeout=30, stream=True) as r:
            for _ in r.iter_lines():
                if self._stop.is_set():
                    return False
        return True

    def stop(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(timeout=60)


@contextlib.contextmanager
def loop_of(tmp: Path, *args: str, **kw: Any) -> Iterator[Loop]:
    lp = Loop(tmp, args=args, **kw)
    try:
        yield lp
    finally:
        lp.stop()


def test_loaded_replica_loses_weight_and_nginx_split_follows(tmp_path: Path) -> None:
    # A budget that does not bind: the correction takes a few reloads (dp0 down, the others up).
    with loop_of(tmp_path, "--min-hold", "1", "--max-reloads-per-minute", "30") as lp:
        before = lp.split(30)
        assert min(before.values()) >= 6, before  # equal weights: about a third each
        # Traffic nginx cannot see: 6 long requests straight to dp0 (6 of its 8 slots busy, no queue).
        direct = Traffic(lp, f"http://127.0.0.1:{lp.api[0]}", threads=6, max_tokens=400, load=True)

        def halved() -> dict[str, float] | None:
            # Only relative weights matter (the policy centres its corrections on the fleet).
            w = lp.weights()
            return w if w["dp0"] <= 0.5 * min(w["dp1"], w["dp2"]) else None

        try:
            t0 = time.monotonic()
            w = wait_for(halved, 30, what=f"dp0 weight at most half the others' ({lp.tail()})")
            took = time.monotonic() - t0
            after = lp.split(40)
        finally:
            direct.stop()
        share = w["dp0"] / sum(w.values())  # <= 0.2; the correction only deepens while the load stays
        assert after["dp0"] <= 40 * share + 2, (w, before, after)
        assert after["dp1"] >= 12 and after["dp2"] >= 12, (w, after)
        print(f"dp0 at half weight after {took:.1f}s: {w}; split before {dict(before)} after {dict(after)}")
        assert "dp0: load" in lp.log.read_text(), "the change is logged with its reason"


def test_half_speed_replica_gets_a_lower_weight_with_the_reason(tmp_path: Path) -> None:
    args = ("--min-hold", "1", "--max-reloads-per-minute", "30", "--speed-aware")
    with loop_of(tmp_path, *args, speeds=(1.0, 1.0, 0.5)) as lp:
        traffic = Traffic(lp, lp.url, threads=6, max_tokens=30)

        def slowed() -> dict[str, float] | None:
            w = lp.weights()
            return w if w["dp2"] <= 0.7 * min(w["dp0"], w["dp1"]) else None

        try:
            w = wait_for(slowed, 40, what=f"dp2's weight below the others' ({lp.tail()})")
            speed = {f"dp{i}": lp.metric("fdngx_replica_speed_ratio", f"dp{i}") for i in range(3)}
        finally:
            traffic.stop()
        assert speed["dp0"] == speed["dp1"] == 1.0 and 0.35 < speed["dp2"] < 0.7, (speed, w)
        assert re.search(r"dp2: .*decodes at 0\.\d\dx the fleet's speed", lp.log.read_text()), lp.tail()
        assert all(r[2] for r in traffic.results)
        status = fdngx("status", "-i", str(lp.inv), "--json", "--out", str(lp.conf), check=True)
        rows = {r["name"]: r for r in json.loads(status.stdout)["instances"]}
        assert "decodes at" in rows["dp2"]["reason"] and "decodes at" not in rows["dp0"]["reason"], rows


def test_reload_budget_holds_changes_and_says_so(tmp_path: Path) -> None:
    # Budget 1/min: the first weights spend it, so the correction for dp0's load must wait, and the log
    # says why instead of staying silent.
    with loop_of(tmp_path, "--min-hold", "1", "--max-reloads-per-minute", "1") as lp:
        direct = Traffic(lp, f"http://127.0.0.1:{lp.api[0]}", threads=6, max_tokens=400, load=True)
        try:
            wait_for(lambda: "reload budget" in lp.log.read_text(), 30, what=f"budget hold logged ({lp.tail()})")
            assert lp.metric("fdngx_replica_weight", "dp0") == 20, "held: nginx keeps the applied weight"
            assert lp.metric("fdngx_reloads_total") == 1
        finally:
            direct.stop()


def test_killed_replica_is_left_to_nginx_and_serves_again_with_no_reload(tmp_path: Path) -> None:
    """Default settings: nothing listens on dp1 for a few seconds. nginx retries its requests elsewhere and
    takes it back once it listens; the sidecar does not reload (each reload blinds least_conn)."""
    with loop_of(tmp_path) as lp:
        traffic = Traffic(lp, lp.url, threads=3, max_tokens=3)
        try:
            wait_for(lambda: len(traffic.results) > 20, 30, what="traffic")
            reloads = lp.metric("fdngx_reloads_total")
            errors = lp.metric("fdngx_replica_scrape_errors_total", "dp1")
            lp.kill_replica(1)
            killed = time.monotonic()
            # More failed checks than the threshold (3), and dp1 is still in rotation: inside the grace.
            wait_for(lambda: lp.metric("fdngx_replica_scrape_errors_total", "dp1") >= errors + 4, 20,
                     what=f"failed checks on dp1 ({lp.tail()})")
            assert lp.metric("fdngx_replica_up", "dp1") == 1
            lp.start_replica(1)
            restarted = time.monotonic()
            wait_for(lambda: any(r[0] > restarted and r[2] and r[3].split()[-1] == str(lp.api[1])
                                 for r in list(traffic.results)), 20, what="the restarted replica serves again")
        finally:
            traffic.stop()
        assert lp.metric("fdngx_reloads_total") == reloads, "no reload for an outage nginx handles itself"
        assert lp.metric("fdngx_replica_up", "dp1") == 1
        late = [r for r in traffic.results if r[0] > killed + 0.2]
        assert late and all(r[2] for r in late), [r for r in late if not r[2]][:5]


def test_killed_replica_goes_down_after_the_grace_and_ramps_back(tmp_path: Path) -> None:
    with loop_of(tmp_path, "--refused-grace", "1", "--ramp", "3", "--max-reloads-per-minute", "20",
                 "--min-hold", "1") as lp:
        traffic = Traffic(lp, lp.url, threads=3, max_tokens=3)
        try:
            wait_for(lambda: len(traffic.results) > 20, 30, what="traffic")
            lp.kill_replica(1)
            killed = time.monotonic()
            wait_for(lambda: lp.metric("fdngx_replica_up", "dp1") == 0, 20, what=f"dp1 down ({lp.tail()})")
            assert " down;" in lp.conf.read_text() or " down;  # dp1" in lp.conf.read_text()
            lp.start_replica(1)
            weights: list[float] = []

            def back() -> bool:
                weights.append(
                    lp.metric("fdngx_replica_weight", "dp1") if lp.metric("fdngx_replica_up", "dp1") == 1 else 0.0
                )
                return weights[-1] >= 20

            wait_for(back, 30, interval=0.05, what=f"dp1 back at full weight ({lp.tail()})")
            restarted_ok = time.monotonic()
            time.sleep(1.0)
        finally:
            traffic.stop()
        ramp = sorted({w for w in weights if 0 < w < 20})
        assert ramp and ramp[0] == 5, f"ramped through {ramp}"
        # Requests started after the kill (the replica gone, not cut mid-stream) all succeed: nginx
        # retries connection failures and the sidecar marks the replica down.
        late = [r for r in traffic.results if r[0] > killed + 0.2]
        bad = [r for r in late if not r[2]]
        assert late and not bad, bad[:5]
        served_after = {r[3].split()[-1] for r in traffic.results if r[0] > restarted_ok and r[2]}
        assert str(lp.api[1]) in served_after, "the restarted replica serves again"


def test_garbage_and_slow_metrics_from_one_replica_leave_the_others_alone(tmp_path: Path) -> None:
    with loop_of(tmp_path) as lp:
        assert lp.sims[0] is not None and lp.sims[1] is not None
        lp.sims[0].fault(0, garbage_metrics=True)
        lp.sims[1].fault(0, metrics_delay=5.0)
        wait_for(
            lambda: (
                lp.metric("fdngx_replica_scrape_errors_total", "dp0") >= 4
                and lp.metric("fdngx_replica_scrape_errors_total", "dp1") >= 4
            ),
            30,
            what="scrape errors counted",
        )
        m = lp.metrics()
        assert m.get(("fdngx_replica_scrape_errors_total", "dp2"), 0.0) == 0.0
        assert all(m[("fdngx_replica_up", f"dp{i}")] == 1 for i in range(3))
        assert m[("fdngx_replica_scrape_age_seconds", "dp2")] < 2.0
        # A slow replica cannot stretch a cycle past the scrape deadline (0.375 s at a 0.5 s interval).
        count = m[("fdngx_cycle_duration_seconds_count", "")]
        assert m[("fdngx_cycle_duration_seconds_bucket", "1.0")] == count
        assert lp.sidecar is not None and lp.sidecar.poll() is None
        status = fdngx("status", "-i", str(lp.inv), "--json", "--out", str(lp.conf), check=True)
        rows = {r["name"]: r for r in json.loads(status.stdout)["instances"]}
        assert "bad metrics" in rows["dp0"]["scrape_error"] and rows["dp2"]["scrape_error"] is None
        assert rows["dp2"]["running"] is not None and rows["dp2"]["current_weight"] == 20


def test_steady_load_reloads_at_most_once_a_minute(tmp_path: Path) -> None:
    # Default hold (10 s), dead-band and budget; a 0.25 s interval: ~90 cycles in 22 s, where a flapping policy
    # would make 2 or 3 reloads (one per hold).
    with loop_of(tmp_path, interval=0.25) as lp:
        traffic = Traffic(lp, lp.url, threads=9, max_tokens=20)  # ~3 busy slots of 8 per replica, noisy
        try:
            time.sleep(3)
            r0 = lp.metric("fdngx_reloads_total")
            time.sleep(22)
            r1 = lp.metric("fdngx_reloads_total")
        finally:
            traffic.stop()
        assert r1 - r0 <= 1, f"{r1 - r0} reloads in 22 s of steady load: {lp.tail()}"
        assert all(r[2] for r in traffic.results)


def test_inventory_edit_is_picked_up_and_sigterm_exits_cleanly(tmp_path: Path) -> None:
    with loop_of(tmp_path, n=3, listed=2) as lp:
        assert set(lp.split(10)) == {"dp0", "dp1"}
        lp.write_inventory(3)
        t0 = time.monotonic()
        wait_for(lambda: "dp2" in lp.split(6), 15, what=f"dp2 served after the edit ({lp.tail()})")
        took = time.monotonic() - t0
        assert took < 10, f"picked up after {took:.1f}s"  # debounce 0.5 + 2 cycles + a reload, on a noisy machine
        # A broken edit is logged and the previous inventory kept.
        lp.inv.write_text("{ not json")
        wait_for(lambda: "inventory not reloaded" in lp.log.read_text(), 10, what="bad inventory logged")
        assert set(lp.split(9)) == {"dp0", "dp1", "dp2"}
        assert lp.sidecar is not None
        lp.sidecar.send_signal(signal.SIGTERM)
        assert lp.sidecar.wait(timeout=10) == 0


@pytest.mark.skipif(not lua_modules(None), reason="needs libnginx-mod-http-lua")
def test_openresty_flavor_follows_load_without_reloads(tmp_path: Path) -> None:
    with loop_of(tmp_path, openresty=True) as lp:
        assert lp.nginx is not None
        workers = lp.nginx.worker_pids()
        # Idle, equal weights: ties go round (smooth weighted round robin), so 60 sequential requests give each
        # about 20; a scrape that caught one of them in flight may hold a replica out for a pick or two.
        before = lp.split(60)
        assert min(before.values()) >= 8, before
        direct = Traffic(lp, f"http://127.0.0.1:{lp.api[0]}", threads=6, max_tokens=400, load=True)
        try:
            # The pushed load makes dp0 the worst choice while its direct traffic lasts.
            wait_for(lambda: lp.metric("fdngx_replica_running", "dp0") >= 5, 30, what="dp0 loaded")
            wait_for(lambda: lp.split(12)["dp0"] == 0, 20, interval=0.3, what=f"dp0 avoided ({lp.tail()})")
        finally:
            direct.stop()
        assert lp.metric("fdngx_reloads_total") == 0
        assert lp.nginx.worker_pids() == workers, "no reload: the same nginx workers served throughout"
        assert lp.metric("fdngx_replica_weight", "dp0") == 20, "weights carry capacity only in this flavor"


@pytest.mark.parametrize("openresty", [
    False, pytest.param(True, marks=pytest.mark.skipif(not lua_modules(None), reason="needs libnginx-mod-http-lua"))])
def test_once_writes_the_config_a_new_nginx_starts_with(tmp_path: Path, openresty: bool) -> None:
    """`sidecar --once` (docker/gateway.sh, before nginx starts): one cycle with the sidecar's options, exit 0,
    a tested config that a fresh nginx serves from; nginx not running is said, the push (openresty) waits."""
    api, met, port, admin = free_ports(4)
    prefix = tmp_path / "nginx"
    conf = prefix / "nginx.conf"
    inv = write_inventory(tmp_path / "fdngx.json", [
        {"name": "dp0", "host": "127.0.0.1", "port": api, "metrics_port": met, "engine": "sim"}])
    flavor = ("--flavor", "openresty", "--admin-listen", f"127.0.0.1:{admin}") if openresty else ()
    with start_sim([api], [met], max_num_seqs=SEQS) as sim:
        proc = fdngx("sidecar", "-i", str(inv), "--mode", "standalone", "--listen", f"127.0.0.1:{port}",
                     "--out", str(conf), "--interval", "0.5", *flavor, "--once", timeout=60)
        assert proc.returncode == 0, proc.stderr
        assert proc.stderr.count("nginx is not running") == 1 and "apply failed" not in proc.stderr, proc.stderr
        assert "dp0: initial" in proc.stderr and "sidecar:" not in proc.stderr  # one cycle, no loop started
        nginx = Nginx(prefix, conf).start(f"http://127.0.0.1:{port}/health")
        try:
            r = requests.post(f"http://127.0.0.1:{port}/v1/chat/completions", timeout=20, json={
                "model": "m", "max_tokens": 2, "messages": [{"role": "user", "content": "hi"}]})
            assert r.status_code == 200 and sim.proc.poll() is None, r.text
        finally:
            nginx.stop()


def test_once_exits_1_when_the_apply_fails(tmp_path: Path) -> None:
    """Nothing to render (an empty inventory): one line saying so, exit 1, no config written."""
    inv = write_inventory(tmp_path / "fdngx.json", [])
    out = tmp_path / "nginx" / "nginx.conf"
    proc = fdngx("sidecar", "-i", str(inv), "--mode", "standalone", "--listen", "127.0.0.1:9", "--out", str(out),
                 "--once", timeout=60)
    assert proc.returncode == 1 and "no instances to render" in proc.stderr and not out.exists(), proc.stderr


def test_a_stopped_openresty_nginx_is_said_once_and_fails_no_cycle(tmp_path: Path) -> None:
    """openresty flavor, nginx not started: every cycle compares the config and would push; the push waits
    (nginx reads the peers file when it starts) and the warning comes once, not once a cycle."""
    if not lua_modules(None):
        pytest.skip("needs libnginx-mod-http-lua")
    api, met, port, admin = free_ports(4)
    inv = write_inventory(tmp_path / "fdngx.json", [
        {"name": "dp0", "host": "127.0.0.1", "port": api, "metrics_port": met, "engine": "sim"}])
    err = tmp_path / "sidecar.err"
    with start_sim([api], [met], max_num_seqs=SEQS), err.open("wb") as fh:
        proc = subprocess.Popen(
            [sys.executable, "-m", "fdngx", "-v", "sidecar", "-i", str(inv), "--mode", "standalone", "--listen",
             f"127.0.0.1:{port}", "--out", str(tmp_path / "nginx" / "nginx.conf"), "--flavor", "openresty",
             "--admin-listen", f"127.0.0.1:{admin}", "--interval", "0.2", "--metrics-listen", "off"],
            stdout=subprocess.DEVNULL, stderr=fh, start_new_session=True)
        try:
            wait_for(lambda: len(re.findall(r"cycle \d+:", err.read_text())) >= 5, 30, what="5 sidecar cycles")
        finally:
            stop_process_group(proc)
    text = err.read_text()
    assert text.count("nginx is not running: the balancer reads the peers file when it starts") == 1, text
    assert "apply failed" not in text and "no push" in text, text
