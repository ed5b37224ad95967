"""A replica whose process lives on while its /health answers an error for ever (FastDeploy's api_server after
its GPU workers died: 404 "Worker Service Not Healthy"): `fdngx launch --unhealthy-after` marks it down and,
with --restart on-failure, restarts it. Over real `fdngx sim` processes (their `unhealthy` fault)."""

from __future__ import annotations

import os
import signal
from typing import Any

import requests

from tests.integration.test_launch import STARTUP, Launcher, health, sim_ports
from tests.support import wait_for


def fault(inst: dict[str, Any], **switches: bool) -> None:
    r = requests.post(f"http://127.0.0.1:{inst['metrics_port']}/sim/fault", json=switches, timeout=10)
    r.raise_for_status()


def test_a_rank_answering_404_for_too_long_restarts_its_group(launcher: Launcher) -> None:
    p = launcher.start("--engine", "sim", "-n", "2", "--restart", "on-failure", "--unhealthy-after", "3",
                       *sim_ports(2))  # fmt: skip
    doc = launcher.wait_ready(p, 2)
    old = doc["instances"][0]["pid"]
    fault(doc["instances"][1], unhealthy=True)  # its process runs on, and dp0 stays healthy

    def restarted() -> list[dict[str, Any]] | None:
        insts = launcher.inventory()["instances"]
        return insts if all(i["pid"] != old and i["status"] == "running" for i in insts) else None

    insts = wait_for(restarted, timeout=STARTUP, interval=0.2, what="the sim group restarted")
    assert all(health(i) for i in insts)  # the new process has no fault: dp1 answers 200 again
    os.kill(p.pid, signal.SIGTERM)
    assert p.wait(60) == 0
    err = p.stderr.read() if p.stderr else ""
    assert f"dp1 of sim (pid {old}) has answered HTTP 404 to /health for " in err, err[-2000:]
    assert "(--unhealthy-after 3)" in err and "lost dp1" in err and "restarting sim (restart #1)" in err
    launcher.assert_all_gone()


def test_without_restart_it_is_marked_down_and_up_again_on_its_first_200(launcher: Launcher) -> None:
    p = launcher.start("--engine", "sim", "-n", "2", "--per-instance", "--unhealthy-after", "2", *sim_ports(2))
    doc = launcher.wait_ready(p, 2)
    sick = doc["instances"][0]
    fault(sick, unhealthy=True)

    def status(i: int) -> str:
        return str(launcher.inventory()["instances"][i]["status"])

    wait_for(lambda: status(0) == "down", timeout=30, interval=0.2, what="dp0 marked down")
    assert status(1) == "running"
    assert launcher.inventory()["instances"][0]["pid"] == sick["pid"]  # --restart no: the same process
    fault(sick, unhealthy=False)
    wait_for(lambda: status(0) == "running", timeout=30, interval=0.2, what="dp0 up again")
    os.kill(p.pid, signal.SIGTERM)
    assert p.wait(60) == 0
    err = p.stderr.read() if p.stderr else ""
    assert "dp0 of dp0" in err and "(--unhealthy-after 2)" in err, err[-2000:]
    assert "dp0 of dp0" in err and "is healthy again (/health answers 200)" in err
    launcher.assert_all_gone()
