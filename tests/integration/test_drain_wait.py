"""`fdngx drain NAME --wait SECONDS`, end to end: the real CLI watching a simulated replica's metrics.

- it returns 0 only after the request running on the replica has ended, saying what was left on the way;
- out of time it exits 1 with one line naming what still runs, and the replica stays drained;
- a replica nothing listens at any more is done at once; --wait does not go with --undo.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from fdngx.sim.process import SimProcess, start_sim
from tests.support import Nginx, fdngx, free_ports, wait_for, write_inventory

CHAT = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "stream": True}


@pytest.fixture
def replicas(tmp_path: Path) -> Iterator[tuple[SimProcess, Path, int]]:
    """Two simulated replicas, and in the inventory a third address nothing listens at."""
    api0, api1, met0, met1, idle, idle_met = free_ports(6)
    sim = start_sim([api0, api1], [met0, met1], max_num_seqs=8, log_path=tmp_path / "sim.log")
    try:
        inv = write_inventory(tmp_path / "fdngx.json", [
            {"name": f"dp{i}", "host": "127.0.0.1", "port": p, "metrics_port": m, "engine": "sim", "max_num_seqs": 8}
            for i, (p, m) in enumerate([(api0, met0), (api1, met1), (idle, idle_met)])
        ])
        yield sim, inv, idle
    finally:
        sim.stop(grace=2.0)


class Stream(threading.Thread):
    """One streaming request straight to a replica, read to its end on a thread; `ended` = when."""

    def __init__(self, port: int, tokens: int) -> None:
        super().__init__(daemon=True)
        self.response = requests.post(f"http://127.0.0.1:{port}/v1/chat/completions",
                                      json={**CHAT, "max_tokens": tokens}, stream=True, timeout=60)
        assert self.response.status_code == 200
        self.lines = self.response.iter_lines()
        assert next(line for line in self.lines if line).startswith(b"data: {")  # running on the replica now
        self.ended: float | None = None
        self.start()

    def run(self) -> None:
        last = b""
        try:
            with self.response:
                for line in self.lines:
                    last = line or last
        except (requests.RequestException, OSError, AttributeError):  # the test closed it under the reader
            return
        self.ended = time.monotonic() if last == b"data: [DONE]" else None


def test_wait_returns_once_the_request_on_it_has_ended(replicas: tuple[SimProcess, Path, int]) -> None:
    sim, inv, _idle = replicas
    stream = Stream(sim.ports[0], tokens=90)  # about 3 s at the simulator's 30 tokens/s
    proc = fdngx("drain", "dp0", "--wait", "60", "-i", str(inv), timeout=90)
    returned = time.monotonic()
    assert proc.returncode == 0, proc.stdout + proc.stderr
    stream.join(timeout=10)
    assert stream.ended is not None and stream.ended < returned, "returned while the request still ran"
    out = proc.stdout
    assert "dp0: drained in" in out
    assert "fdngx: dp0: 1 request(s) in flight (running 1, queued 0); waiting (0 s of 60)" in out, out
    assert out.rstrip().endswith("fdngx: dp0: nothing in flight: safe to stop"), out
    assert json.loads(inv.read_text())["instances"][0]["drain"] is True


def test_out_of_time_it_says_what_still_runs_and_the_drain_stays(replicas: tuple[SimProcess, Path, int]) -> None:
    sim, inv, _idle = replicas
    stream = Stream(sim.ports[1], tokens=600)  # about 20 s
    try:
        started = time.monotonic()
        proc = fdngx("drain", "dp1", "--wait", "2", "-i", str(inv), timeout=60)
        assert time.monotonic() - started < 15, "the wait did not stop at its time"
        assert proc.returncode == 1, proc.stdout + proc.stderr
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1, proc.stderr
        assert lines[0].startswith("fdngx: error: dp1: 1 request(s) in flight (running 1, queued 0) after 2 s; "
                                   "it stays drained. Is the drain applied?"), lines[0]
        assert "Traceback" not in proc.stderr
        assert json.loads(inv.read_text())["instances"][1]["drain"] is True
    finally:
        stream.response.close()
        stream.join(timeout=10)


def test_a_replica_nothing_listens_at_is_done_at_once(replicas: tuple[SimProcess, Path, int]) -> None:
    _sim, inv, idle = replicas
    started = time.monotonic()
    proc = fdngx("drain", "dp2", "--wait", "60", "-i", str(inv), timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert time.monotonic() - started < 20
    assert f"fdngx: dp2: nothing listens at 127.0.0.1:{idle} any more: nothing in flight there" in proc.stdout


def test_wait_with_undo_is_a_usage_error_and_changes_nothing(replicas: tuple[SimProcess, Path, int]) -> None:
    _sim, inv, _idle = replicas
    before = inv.read_bytes()
    proc = fdngx("drain", "dp0", "--undo", "--wait", "5", "-i", str(inv))
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "--wait" in proc.stderr and "--undo" in proc.stderr
    assert inv.read_bytes() == before


class Lines(threading.Thread):
    """A process's stdout lines as they come."""

    def __init__(self, proc: subprocess.Popen[str]) -> None:
        super().__init__(daemon=True)
        self.proc, self.lines = proc, []
        self.start()

    def run(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line.rstrip("\n"))

    def count(self, text: str) -> int:
        return sum(text in line for line in list(self.lines))


@pytest.mark.nginx
def test_with_out_a_quiet_replica_counts_only_once_the_drain_is_applied(
    tmp_path: Path, replicas: tuple[SimProcess, Path, int],
) -> None:
    """Nothing in flight on dp0 from the start, but until a render has put it `down` in the file nginx reads
    (--out), the wait goes on. A plain `render --reload` applies a drain too: the wait read only the policy
    state, which such a render does not write, and waited out its whole time (exit 1) on a replica nginx had
    long held out."""
    sim, inv, _idle = replicas
    conf = tmp_path / "nginx" / "nginx.conf"
    port = free_ports(1)[0]
    args = ["render", "-i", str(inv), "--mode", "standalone", "--listen", str(port), "--out", str(conf)]
    fdngx(*args, check=True)
    nginx = Nginx(conf.parent).start(f"http://127.0.0.1:{port}/health")
    proc = subprocess.Popen([sys.executable, "-m", "fdngx", "drain", "dp0", "--wait", "60", "--out", str(conf),
                             "-i", str(inv)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        out = Lines(proc)
        pending = f"fdngx: dp0: the drain is not applied yet ({conf} does not hold it out); waiting"
        # Said at once, and again 5 s on: five quiet reads went by without counting.
        wait_for(lambda: out.count(pending) >= 2, 20, what="the wait saying twice that the drain is not applied")
        assert proc.poll() is None, "it stopped waiting before the drain was applied"
        fdngx(*args, "--reload", check=True)  # no --scrape: no policy state
        assert proc.wait(timeout=30) == 0, proc.stderr.read() if proc.stderr else ""
        out.join(timeout=5)
        assert out.lines[-1] == "fdngx: dp0: nothing in flight: safe to stop", out.lines
        assert not conf.with_name(".nginx.conf.fdngx-state.json").exists()
        assert re.search(rf"server 127\.0\.0\.1:{sim.ports[0]} [^\n]* down;", conf.read_text())
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
        nginx.stop()
