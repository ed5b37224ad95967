"""The launch supervisor's pieces without processes: its output, its restart clock, its probes."""

from __future__ import annotations

import errno
import io
import os
import signal
import socket
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from fdngx.domain import Engine, Instance, Inventory, Restart
from fdngx.engines.argv import ProcSpec
from fdngx.launch.handshake import Listener, Reporter
from fdngx.launch.pidfile import ChildState
from fdngx.launch.plan import Plan
from fdngx.launch.progress import Progress
from fdngx.launch.supervise import Supervisor
from fdngx.system import procs
from tests.support import wait_for


class Broken(io.StringIO):
    """A stream that fails like a terminal that hung up (EIO), a pipe nobody reads (EPIPE) or a full disk
    (until `err` is set to None)."""

    def __init__(self, err: int | None) -> None:
        super().__init__()
        self.err = err
        self.writes = 0

    def write(self, s: str) -> int:
        self.writes += 1
        if self.err is not None:
            raise OSError(self.err, os.strerror(self.err))
        return super().write(s)


@pytest.mark.parametrize("err", [errno.EIO, errno.EPIPE])
def test_output_to_a_broken_stream_never_raises_and_is_given_up(err: int) -> None:
    out = Broken(err)
    prog = Progress(["dp0"], out)
    prog.say("stopping 1 process group(s) (grace 15s)")  # raised before: the stop never ran
    prog.text("last lines")
    prog.update({"dp0": "starting"})
    assert out.writes == 1  # remembered as broken after the first failure: never written again


@pytest.mark.parametrize("err", [errno.ENOSPC, errno.EDQUOT, errno.EFBIG])
def test_output_with_no_room_is_not_tried_for_every_line_nor_given_up(err: int) -> None:
    out = Broken(err)
    prog = Progress(["dp0"], out)
    prog.say("one")
    prog.say("two")
    prog.update({"dp0": "starting"})
    assert out.writes == 1 and not prog.w.broken  # before: every line tried (and failed) again
    out.err = None  # room again; and HOLD seconds later it is tried again
    prog.w.retry_at = 0.0
    prog.say("three")
    assert out.getvalue() == f"fdngx: up to 3 line(s) of output missing here ({os.strerror(err)}): lost while it " \
        "could not be written\nfdngx: three\n"
    prog.say("four")
    assert out.getvalue().endswith("fdngx: three\nfdngx: four\n") and out.writes == 3


def test_output_to_a_closed_stream_never_raises() -> None:
    out = io.StringIO()
    out.close()
    Progress(["dp0"], out).say("anything")


def plan_of(tmp: Path, n: int = 1, ports: list[int] | None = None, timeout: float = 1000.0) -> Plan:
    ports = ports or list(range(1, n + 1))
    specs = [ProcSpec(f"dp{i}", ["true"], {}, str(tmp / f"dp{i}.log"), [f"dp{i}"]) for i in range(n)]
    inv = Inventory([Instance(f"dp{i}", "127.0.0.1", ports[i], 9000 + i, Engine.SIM) for i in range(n)])
    return Plan(Engine.SIM, specs, inv, str(tmp / "fdngx.json"), str(tmp), ports, timeout, Restart.ON_FAILURE,
                5.0, False)


def test_the_restart_backoff_counts_from_the_end_of_the_stop(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A stop that took the whole grace (a worker ignoring SIGTERM) must not eat the backoff: the restart
    comes 1 s after the stop, not at once."""
    sup = Supervisor(plan_of(tmp_path), out=io.StringIO())
    clock = [100.0]
    sup.clock = lambda: clock[0]
    c = sup.children[0]
    c.state, c.healthy_at = ChildState.RUNNING, 99.0

    def slow_stop(*args: Any) -> None:
        clock[0] += 15.0  # the grace

    monkeypatch.setattr(sys.modules[Supervisor._died.__module__], "stop_child", slow_stop)
    sup._died(c, 1, 100.0)
    assert c.state is ChildState.WAITING_RESTART and c.restart_at == 116.0


def test_a_restart_still_waiting_says_so_every_30s(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Restarting replicas get the launch's progress lines too: a change, and 'still waiting' every 30 s."""
    monkeypatch.setattr(procs, "reap", lambda popens: None)  # pytest's own children are not ours to reap
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nothing listens there: "not listening yet"
    out = io.StringIO()
    sup = Supervisor(plan_of(tmp_path, ports=[port]), out=out)
    t = [0.0]
    sup.progress = Progress(["dp0"], out, timeout=1000, clock=lambda: t[0])
    c = sup.children[0]
    c.state, c.started_at = ChildState.STARTING, time.monotonic()
    loops = [0]

    def sleep(seconds: float) -> None:
        t[0] += 31.0
        loops[0] += 1
        if loops[0] == 2:
            sup.stop_signal = signal.SIGTERM

    sup._sleep = sleep  # type: ignore[method-assign]
    assert sup._watch() == 0
    assert "fdngx: dp0: not listening yet" in out.getvalue()
    assert "fdngx: still waiting after 31s of 1000s: 0/1 healthy; dp0: not listening yet" in out.getvalue()


def test_running_replicas_are_probed_at_once_not_one_after_another(tmp_path: Path) -> None:
    """Eight hung replicas (they accept, never answer) cost one probe timeout per round, not eight."""
    silent = []
    for _ in range(8):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        s.listen()
        silent.append(s)
    try:
        sup = Supervisor(plan_of(tmp_path, 8, [s.getsockname()[1] for s in silent]), out=io.StringIO())
        for c in sup.children:
            c.state = ChildState.RUNNING
        began = time.monotonic()
        sup._check_ranks(time.monotonic())
        took = time.monotonic() - began
    finally:
        for s in silent:
            s.close()
    assert all(sup.status[n] == "no answer in 2s" for n in sup.status)
    assert took < 8.0, took  # one after another: 8 x 2 s


def test_the_report_pipe_never_blocks_the_supervisor_and_keeps_the_newest() -> None:
    """A detached parent that stops reading (Ctrl-Z) fills the pipe: sends return at once, the message being
    written and the newest are kept, and the parent reads whole messages once it reads again."""
    r, w = os.pipe()
    reporter, listener = Reporter(w), Listener(r)
    try:
        big = "x" * 10000
        for n in range(100):  # ~1 MB: far past a pipe's 64 KiB
            reporter.send({"n": n, "pad": big})
        assert len(reporter.queue) <= 2
        reporter.send({"n": "last"}, last=True)
        reporter.send({"n": "after the last"})  # nothing follows the last message
        got: list[Any] = []
        while reporter.fd >= 0:
            got += [m["n"] for m in listener.poll()]
            reporter.drain()
        got += [m["n"] for m in listener.poll()]
        assert listener.eof and got[-1] == "last" and "after the last" not in got
        assert got[:-1] == sorted(got[:-1]) and len(got) < 100
    finally:
        reporter.close()
        listener.close()


def test_the_report_pipe_of_a_parent_that_has_gone_is_closed_quietly() -> None:
    r, w = os.pipe()
    reporter = Reporter(w)
    os.close(r)  # the parent returned (ready) or died
    reporter.send({"n": 1})  # EPIPE (SIGPIPE is ignored in Python): closed, never raised
    assert reporter.fd == -1
    reporter.send({"n": 2})


def test_a_rank_exited_under_a_launcher_that_never_waits_is_seen_as_lost(tmp_path: Path) -> None:
    """multi_api_server's ranks are children it never waits for: a dead one is a zombie under a live leader."""
    from fdngx.launch.children import Child

    # The leader starts two ranks with Popen and sleeps; rank 1 exits at once (never reaped), rank 0 lives.
    leader_code = ("import subprocess, sys, time; subprocess.Popen([sys.executable, '-c', 'import time; "
                   "time.sleep(60)']); r = subprocess.Popen([sys.executable, '-c', 'pass']); print(r.pid, "
                   "flush=True); time.sleep(60)")  # fmt: skip
    spec = ProcSpec("multi_api_server", [sys.executable, "-c", leader_code], {}, str(tmp_path / "l.log"),
                    ["dp0", "dp1"], stop_signal="SIGINT", unreaped_ranks=True)  # fmt: skip
    leader = procs.start(spec.argv, {}, Path(spec.log), "test")
    try:
        child = Child(spec, popen=leader)
        def pids() -> list[int]:
            return [int(ln) for ln in Path(spec.log).read_text().splitlines() if ln.strip().isdigit()]

        rank1 = wait_for(pids, timeout=30, what="the leader to print rank 1's pid")[0]
        wait_for(child.ended, timeout=30, what="rank 1 seen as lost")
        assert child.ended() == (f"lost a rank: its process {rank1} exited and multi_api_server goes on without "
                                 "it (it never checks its ranks)")  # fmt: skip
        assert procs.unreaped_children(leader.pid) == [rank1]
        # The same process tree from a launcher that reaps its ranks (unreaped_ranks unset): nothing said.
        assert Child(ProcSpec("x", [], {}, "", ["dp0"]), popen=leader).ended() is None
    finally:
        for pid in procs.descendants(leader.pid):
            os.kill(pid, signal.SIGKILL)
        os.killpg(leader.pid, signal.SIGKILL)
        leader.wait(10)
    assert Child(spec, popen=leader).ended() == "was killed by SIGKILL"

