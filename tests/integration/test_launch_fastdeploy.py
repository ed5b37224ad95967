"""`fdngx launch --engine fastdeploy` over processes that behave as FastDeploy's do.

tests/fixtures/fastdeploy_stub is on PYTHONPATH: `python -m fastdeploy.entrypoints.openai.multi_api_server`
starts one api_server child per rank and never polls them (upstream's multi_api_server.py, sources in the
stub's README.md); each rank serves as `fdngx sim`. No GPU: CUDA_VISIBLE_DEVICES is only passed along.
"""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path

from fdngx.engines.fastdeploy import CACHE_QUEUE_OFFSET, QUEUE_OFFSET
from tests.integration.test_launch import STARTUP, Launcher, health, ports_free
from tests.support import free_ports, http_ok, wait_for

STUB = Path(__file__).resolve().parents[1] / "fixtures" / "fastdeploy_stub"


def fastdeploy_env(fail_ranks: str = "") -> dict[str, str]:
    path = os.pathsep.join(p for p in (str(STUB), os.environ.get("PYTHONPATH", "")) if p)
    return {**os.environ, "PYTHONPATH": path, "FDNGX_STUB_FAIL_RANKS": fail_ranks}


def csv(xs: range | list[int]) -> str:
    return ",".join(map(str, xs))


def fastdeploy_args(n: int, *more: str) -> tuple[list[int], list[str]]:
    """(API ports, launch arguments) for n ranks on free ports, the engine worker queue ports too (given after
    -- for multi_api_server; with --per-instance fdngx takes API port + 2000 and, for the cache queue, + 3000,
    so those must be free)."""
    for _ in range(20):
        ports = free_ports(3 * n)
        api, metrics, queue = ports[:n], ports[n : 2 * n], ports[2 * n :]
        mine = [p + off for p in api for off in (QUEUE_OFFSET, CACHE_QUEUE_OFFSET)]
        if all(p < 65536 for p in mine) and ports_free(mine):
            break
    tail = [] if "--per-instance" in more else ["--", "--engine-worker-queue-port", csv(queue)]
    return api, ["--engine", "fastdeploy", "-n", str(n), "--gpus", csv(range(n)), "--model", "stub-model",
                 "--ports", csv(api), "--metrics-ports", csv(metrics), *more, *tail]  # fmt: skip


def test_multi_api_server_launch_serves_every_rank_and_stops(launcher: Launcher) -> None:
    api, args = fastdeploy_args(2)
    p = launcher.start(*args, env=fastdeploy_env())
    doc = launcher.wait_ready(p, n=2)
    assert [i["port"] for i in doc["instances"]] == api
    assert all(health(i) for i in doc["instances"])
    os.kill(p.pid, signal.SIGTERM)
    assert p.wait(60) == 0
    wait_for(lambda: not any(http_ok(f"http://127.0.0.1:{port}/health") for port in api), timeout=30,
             what="every rank to stop listening")  # fmt: skip


def test_a_rank_that_dies_at_start_fails_the_launch_at_once(launcher: Launcher) -> None:
    """multi_api_server sleeps on while a rank it started has exited (a zombie): fdngx says so and stops,
    instead of reading the dead rank as a slow model load until --timeout (here 600 s)."""
    api, args = fastdeploy_args(2, "--timeout", "600")
    p = launcher.start(*args, env=fastdeploy_env(fail_ranks="1"))
    launcher.wait_child_started()
    try:
        rc = p.wait(STARTUP)
    except subprocess.TimeoutExpired:
        raise AssertionError("the launch still waits for a rank that has exited") from None
    err = p.stderr.read() if p.stderr else ""
    assert rc == 1, err
    errors = [line for line in err.splitlines() if line.startswith("fdngx: error:")]
    assert len(errors) == 1, err
    assert "multi_api_server (pid" in errors[0] and "lost a rank: its process" in errors[0], errors[0]
    assert "before /health was 200" in errors[0]
    assert "rank 1: the engine failed to load (stub)" in err  # the log's tail, where the rank said why
    assert not launcher.inv.exists()
    launcher.assert_all_gone()
    assert not http_ok(f"http://127.0.0.1:{api[0]}/health")  # the healthy rank was stopped too


def test_per_instance_api_server_exiting_0_is_restarted_on_failure(launcher: Launcher) -> None:
    """FastDeploy's api_server exits 0 on a failure too (SIGINT from its own worker monitor when the GPU
    worker dies: a clean shutdown): --restart on-failure restarts it."""
    _api, args = fastdeploy_args(2, "--per-instance", "--restart", "on-failure")
    p = launcher.start(*args, env=fastdeploy_env())
    doc = launcher.wait_ready(p, n=2)
    old = doc["instances"][0]["pid"]
    os.kill(old, signal.SIGINT)  # what api_server.py's launch_worker_monitor sends itself

    def back() -> bool:
        inst = launcher.inventory()["instances"][0]
        return inst["pid"] not in (None, old) and inst["status"] == "running" and health(inst)

    wait_for(back, timeout=STARTUP, interval=0.2, what="dp0 restarted after it exited 0")
    os.kill(p.pid, signal.SIGTERM)
    assert p.wait(60) == 0
    launcher.assert_all_gone()
