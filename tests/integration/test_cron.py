"""Cron mode: `fdngx render --scrape --reload`, one policy cycle per run, state carried in a file."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fdngx.sim.process import start_sim
from tests.support import Nginx, fdngx, free_ports

pytestmark = pytest.mark.nginx


def test_cron_runs_carry_state_and_take_a_dead_replica_out(tmp_path: Path) -> None:
    api = free_ports(3)
    metrics = free_ports(3)
    with start_sim(api, metrics, max_num_seqs=[8, 8, 16]) as sim:
        inv = tmp_path / "fdngx.json"
        inv.write_text(json.dumps({"instances": [
            {"name": f"dp{i}", "host": "127.0.0.1", "port": p, "metrics_port": m, "engine": "sim"}
            for i, (p, m) in enumerate(zip(api, metrics, strict=True))
        ]}))
        conf = tmp_path / "nginx" / "nginx.conf"
        port = free_ports(1)[0]
        args = ["render", "-i", str(inv), "--mode", "standalone", "--listen", str(port), "--out", str(conf)]
        fdngx(*args, check=True)
        nginx = Nginx(conf.parent).start(f"http://127.0.0.1:{port}/health")
        try:
            first = fdngx(*args, "--scrape", "--reload")
            assert first.returncode == 0, first.stderr
            text = conf.read_text()
            # capacity from the replicas' own max_batch_size: dp2 has twice the slots, twice the weight
            assert f"server 127.0.0.1:{api[2]} weight=20 " in text
            assert f"server 127.0.0.1:{api[0]} weight=10 " in text
            state_file = conf.with_name(".nginx.conf.fdngx-state.json")  # a dot-file: no include glob sees it
            saved = json.loads(state_file.read_text())
            assert set(saved["instances"]) == {"dp0", "dp1", "dp2"}
            assert saved["config"]["speed_aware"] is False  # the nginx flavor's default, recorded for status
            # Idle replicas, same capacities: the weights a new scrape gives are the ones nginx has.
            check = fdngx(*args, "--scrape", "--speed-aware", "--check")
            assert check.returncode == 0 and "current" in check.stderr, check.stderr
            assert json.loads(state_file.read_text()) == saved  # --check writes nothing
            fdngx(*args, "--scrape", "--speed-aware", "--reload", check=True)
            assert json.loads(state_file.read_text())["config"]["speed_aware"] is True

            sim.fault(1, unhealthy=True)  # /health 404: the engine answers but is not well (a refused one is
            before = state_file.read_bytes()  # left to nginx's passive check for --refused-grace)
            check = fdngx(*args, "--scrape", "--check")
            # One failed check is not `down` yet (K = 3), so the file is still current; nothing is written.
            assert check.returncode == 0 and state_file.read_bytes() == before, check.stderr
            runs = [fdngx(*args, "--scrape", "--reload") for _ in range(3)]
            assert all(r.returncode == 0 for r in runs), [r.stderr for r in runs]
            assert f"server 127.0.0.1:{api[1]} weight=10 max_fails=3 fail_timeout=1s down;" in conf.read_text()
            assert "dp1: down: /health failed 3x (404)" in runs[-1].stderr
            assert "down" not in runs[0].stderr  # one failed check is not enough (K = 3)
        finally:
            nginx.stop()


def test_cron_with_the_openresty_flavor_never_reloads(tmp_path: Path) -> None:
    """Weights, health and load changes go to the Lua balancer by push: nginx's master and workers stay."""
    from fdngx.nginx.openresty import lua_modules

    if not lua_modules(None):
        pytest.skip("needs libnginx-mod-http-lua (make test installs it)")
    api, metrics = free_ports(3), free_ports(3)
    with start_sim(api, metrics, max_num_seqs=[8, 8, 16]) as sim:
        inv = tmp_path / "fdngx.json"
        inv.write_text(json.dumps({"instances": [
            {"name": f"dp{i}", "host": "127.0.0.1", "port": p, "metrics_port": m, "engine": "sim"}
            for i, (p, m) in enumerate(zip(api, metrics, strict=True))
        ]}))
        conf = tmp_path / "nginx" / "nginx.conf"
        port, admin = free_ports(2)
        args = ["render", "-i", str(inv), "--mode", "standalone", "--flavor", "openresty", "--listen", str(port),
                "--admin-listen", f"127.0.0.1:{admin}", "--out", str(conf)]
        fdngx(*args, check=True)
        nginx = Nginx(conf.parent).start(f"http://127.0.0.1:{port}/health")
        try:
            assert nginx.proc is not None
            master, workers = nginx.proc.pid, nginx.worker_pids()
            first = fdngx(*args, "--scrape", "--reload")
            assert first.returncode == 0 and "unchanged" in first.stderr, first.stderr  # weights are not in it
            sim.fault(1, unhealthy=True)  # health changes (404): down after three runs
            runs = [fdngx(*args, "--scrape", "--reload") for _ in range(3)]
            assert all(r.returncode == 0 for r in runs), [r.stderr for r in runs]
            assert "dp1: down: /health failed 3x" in runs[-1].stderr
            assert all("unchanged" in r.stderr for r in runs), [r.stderr for r in runs]
            assert "pushed weights to 3 peer(s)" in runs[-1].stderr, "the change went out by push, and says so"
            state = json.loads(conf.with_name(".nginx.conf.fdngx-state.json").read_text())
            assert state["instances"]["dp1"]["down"] is True, "the push reached the balancer, so the state says so"
            assert nginx.worker_pids() == workers and nginx.proc.pid == master and nginx.proc.poll() is None
        finally:
            nginx.stop()
