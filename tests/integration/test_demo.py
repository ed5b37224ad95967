"""`fdngx demo` (what `make demo` runs) end to end, bounded by --duration; it must leave nothing behind."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from fdngx.system.procs import alive
from tests.support import fdngx, free_ports

pytestmark = pytest.mark.nginx


def test_demo_runs_the_loop_and_cleans_up(tmp_path: Path) -> None:
    work = tmp_path / "demo"
    port = free_ports(1)[0]
    proc = fdngx("demo", "--dir", str(work), "--port", str(port), "--duration", "24", "--interval", "1",
                 timeout=240)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-3000:]
    assert f"http://127.0.0.1:{port}/v1" in out
    # every replica served traffic through nginx, and status printed a row per replica
    shares = re.findall(r"share by replica port: (.*)", out)
    assert shares, out[-3000:]
    assert len(re.findall(r"\d+: \d+%", shares[-1])) == 4, shares[-1]
    assert all(re.search(rf"^dp{i}\s+yes\s", out, re.M) for i in range(4)), out[-3000:]
    # over the whole run nginx sent less to the replica that also gets direct traffic (a lower weight, or
    # nginx's backup while that traffic fills it: which of the two at the last status depends on the instant)
    inv = json.loads((work / "fdngx.json").read_text())
    port = {inst["name"]: str(inst["port"]) for inst in inv["instances"]}
    whole = re.findall(r"-- whole run through nginx: (\d+) requests, share by replica port: (.*)", out)
    assert whole and int(whole[-1][0]) > 0, out[-3000:]
    share = {k: int(v) for k, v in re.findall(r"(\d+): (\d+)%", whole[-1][1])}
    assert share[port["dp2"]] < min(share[port["dp0"]], share[port["dp1"]]), whole[-1]
    last = out[out.rfind("INSTANCE"):]
    weights = {m[0]: int(m[1]) for m in re.findall(r"^(dp\d)\s+yes\s+\S+\s+\S+\s+\S+\s+(\d+)", last, re.M)}
    # the half-speed replica is measured as such, says so, and carries a lower weight
    assert re.search(r"^dp3 .*decodes at 0\.[3-6]\dx the fleet's speed", last, re.M), last
    assert weights["dp3"] < min(weights["dp0"], weights["dp1"]), last
    # nothing left running: every pid the launch recorded is gone
    pids = [inst["pid"] for inst in inv["instances"] if inst.get("pid")]
    assert pids and not any(alive(pid) for pid in pids)
    assert not (work / "fdngx.json.pid").exists()
    nginx_pid = work / "nginx" / "logs" / "nginx.pid"
    assert not nginx_pid.exists() or not alive(int(nginx_pid.read_text()))
