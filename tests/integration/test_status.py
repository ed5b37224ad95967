"""`fdngx status` against real simulated replicas (127.0.0.1 only): the table (one line per replica on a
pipe, wrapped reasons on a terminal), the --json document, and --watch: frames with history, a killed
replica shown down, --count, Ctrl-C exiting 0, and the live view on a pseudo-terminal."""

from __future__ import annotations

import fcntl
import json
import os
import pty
import re
import select
import signal
import struct
import subprocess
import sys
import termios
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from fdngx.sim.process import SimProcess, free_ports, start_sim
from fdngx.weights.state import InstanceState, PolicyState
from tests.support import wait_for, write_inventory

ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


@dataclass
class Fleet:
    inv: Path
    sims: list[SimProcess]


@pytest.fixture
def fleet(tmp_path: Path) -> Iterator[Fleet]:
    """dp0 and dp1, each its own `fdngx sim` process, so one can be killed while the other runs."""
    ports = free_ports(4)
    sims: list[SimProcess] = []
    try:
        for i in range(2):
            sims.append(start_sim([ports[i]], [ports[2 + i]], max_num_seqs=8))
        inv = tmp_path / "fdngx.json"
        inv.write_text(json.dumps({"version": 1, "upstream": "fastdeploy", "instances": [
            {"name": f"dp{i}", "host": "127.0.0.1", "port": ports[i], "metrics_port": ports[2 + i],
             "engine": "fastdeploy", "max_num_seqs": 8} for i in range(2)
        ]}))
        yield Fleet(inv, sims)
    finally:
        for sim in sims:
            sim.stop()


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FDNGX_") and k not in ("COLUMNS", "LINES")}
    return {**env, **extra}


def status(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "fdngx", "status", *args], capture_output=True, text=True,
                          timeout=60, env=_env())


class Lines:
    """A child's stdout read line by line on a thread, so a test can wait for output with a timeout."""

    def __init__(self, args: list[str]) -> None:
        self.proc = subprocess.Popen([sys.executable, "-m", "fdngx", *args], stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True, env=_env(), start_new_session=True)
        self.lines: list[str] = []
        assert self.proc.stdout is not None
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line.rstrip("\n"))

    def frames(self) -> list[list[str]]:
        """Each frame: its header line, then the table lines up to the blank line."""
        out: list[list[str]] = []
        for line in list(self.lines):
            if line.startswith("fdngx status "):
                out.append([line])
            elif out and line:
                out[-1].append(line)
        return out

    def finish(self, timeout: float = 60) -> tuple[int, str]:
        try:
            code = self.proc.wait(timeout=timeout)
        finally:
            self.stop()
        self._thread.join(timeout=5)
        return code, self.proc.stderr.read() if self.proc.stderr else ""

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)


def row(frame: list[str], name: str) -> list[str]:
    line = next(line for line in frame if line.startswith(name + " "))
    return line.split()


def test_status_table_is_one_line_per_replica_on_a_pipe(fleet: Fleet) -> None:
    proc = status("-i", str(fleet.inv))
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0].split() == ["INSTANCE", "UP", "RUN", "QUEUE", "KV", "WEIGHT", "NEXT", "SHARE", "LOAD", "REASON"]
    for name in ("dp0", "dp1"):
        cells = row(lines, name)
        assert cells[1] == "yes" and cells[5] == "1" and cells[7] == "50%", cells  # static weights, even split
        assert "initial: load 0.00/slot" in " ".join(cells[9:]), cells  # the whole reason on the row's line
    assert lines[-1] == "fleet load 0.00 per slot"
    assert all(line == line.rstrip() for line in lines)


def test_status_json_is_the_documented_document(fleet: Fleet) -> None:
    proc = status("-i", str(fleet.inv), "--json")
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    assert set(doc) == {"fleet_load", "fail_open", "instances"}
    assert doc["fail_open"] is None and doc["fleet_load"] == 0.0
    assert [i["name"] for i in doc["instances"]] == ["dp0", "dp1"]
    for inst in doc["instances"]:
        assert inst["healthy"] is True and inst["load"] == 0.0 and inst["share"] == 0.5
        assert {"current_weight", "proposed_weight", "reason", "kv_usage", "running", "queued"} <= set(inst)


def test_watch_frames_show_a_killed_replica_down(fleet: Fleet) -> None:
    watch = Lines(["status", "-i", str(fleet.inv), "--watch", "--count", "9", "--interval", "0.4"])
    try:
        wait_for(lambda: len(watch.frames()) >= 3, 30, what="three frames")
        fleet.sims[1].stop()  # dp1's process is gone: nothing listens on its ports
        code, err = watch.finish()
    finally:
        watch.stop()
    assert code == 0, err
    frames = watch.frames()
    assert len(frames) == 9, watch.lines
    assert [re.search(r"frame (\d+)", f[0]).group(1) for f in frames] == [str(i) for i in range(1, 10)]  # type: ignore[union-attr]
    assert frames[0][1].split()[:9] == ["INSTANCE", "UP", "LOAD", "WEIGHT", "NEXT", "SHARE", "LOAD", "TREND",
                                        "WEIGHT"]
    assert row(frames[0], "dp1")[1] == "yes"
    last = frames[-1]
    dp0, dp1 = row(last, "dp0"), row(last, "dp1")
    assert dp0[1] == "yes" and dp0[2] == "0.00"
    assert dp1[1] == "NO" and dp1[2] == "-", last  # down, no load reading
    assert "connection refused" in " ".join(dp1), last
    # history: dp0's load trend is one mark per frame; dp1's ends in no-data marks since the kill
    assert dp0[6] == "▁" * 9, dp0
    assert dp1[6].startswith("▁") and dp1[6].endswith("··") and len(dp1[6]) == 9, dp1
    # the watch carries the policy's memory: the failures count up frame by frame
    fails = [int(m.group(1)) for f in frames if (m := re.search(r"/health failed (\d+)/", " ".join(row(f, "dp1"))))]
    assert fails and fails == list(range(1, len(fails) + 1)), fails


def test_watch_json_prints_one_document_per_frame(fleet: Fleet) -> None:
    proc = status("-i", str(fleet.inv), "--json", "--count", "3", "--interval", "0.3")
    assert proc.returncode == 0, proc.stderr
    docs = [json.loads(line) for line in proc.stdout.splitlines()]
    assert len(docs) == 3
    assert all(set(d) == {"ts", "fleet_load", "fail_open", "instances"} for d in docs)
    assert docs[0]["ts"] < docs[1]["ts"] < docs[2]["ts"]


def test_ctrl_c_ends_a_watch_with_exit_0(fleet: Fleet) -> None:
    watch = Lines(["status", "-i", str(fleet.inv), "--watch", "--interval", "0.3"])
    try:
        wait_for(lambda: len(watch.frames()) >= 2, 30, what="two frames")
        watch.proc.send_signal(signal.SIGINT)
        code, err = watch.finish(timeout=15)
    finally:
        watch.stop()
    assert code == 0 and "Traceback" not in err, err


def test_a_bad_inventory_fails_the_watch_at_once(tmp_path: Path) -> None:
    proc = status("-i", str(tmp_path / "missing.json"), "--watch", "--count", "2")
    assert proc.returncode == 1 and f"{tmp_path / 'missing.json'}: inventory file not found" in proc.stderr


# -- on a terminal ----------------------------------------------------------------------------------------


def on_pty(args: list[str], *, cols: int, until: str, then_sigint: bool = False, then: int | None = None,
           timeout: float = 30, escapes: bool = False) -> tuple[int, str]:
    """Run the CLI on a pseudo-terminal of `cols` columns; read until `until` shows up (and the process ends,
    or send it SIGINT, or the signal `then`). Returns the exit code and everything written, escape sequences
    removed (kept with `escapes`)."""
    then = signal.SIGINT if then_sigint else then
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, cols, 0, 0))
    proc = subprocess.Popen([sys.executable, "-m", "fdngx", *args], stdin=slave, stdout=slave, stderr=slave,
                            env=_env(TERM="xterm-256color"), start_new_session=True)
    os.close(slave)
    buf = b""
    try:
        deadline = time.monotonic() + timeout
        signalled = False
        while time.monotonic() < deadline:
            ready, _, _ = select.select([master], [], [], 0.1)
            if ready:
                try:
                    chunk = os.read(master, 65536)
                except OSError:  # the child closed the terminal
                    break
                if not chunk:
                    break
                buf += chunk
            text = buf.decode(errors="replace")
            if then is not None and not signalled and until in text:
                proc.send_signal(then)
                signalled = True
            if proc.poll() is not None and not ready:
                break
        code = proc.wait(timeout=15)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
        os.close(master)
    text = ANSI.sub("", buf.decode(errors="replace")).replace("\r", "")
    assert until in text, text[-3000:]
    return code, buf.decode(errors="replace") if escapes else text


def test_on_a_terminal_long_reasons_wrap_within_the_width(fleet: Fleet) -> None:
    fleet.sims[1].stop()  # dp1's reason gets long: "/health failed 1/3 (connection refused); ..."
    code, text = on_pty(["status", "-i", str(fleet.inv)], cols=80, until="fleet load")
    assert code == 0, text
    lines = [line for line in text.splitlines() if line.strip()]
    assert all(len(line) <= 80 for line in lines), [len(line) for line in lines]
    assert any(line.startswith("dp1 ") and " NO " in line for line in lines), text
    joined = " ".join(line.strip() for line in lines)
    # the reason's last words made it: wrapped onto more lines, not cut
    assert "connection refused" in joined and re.search(r"weight \d+ fleet load", joined), text
    assert len(lines) > 5  # header, two rows, summary: more lines than that means the reason wrapped


def test_live_view_on_a_terminal_and_ctrl_c(fleet: Fleet) -> None:
    code, text = on_pty(["status", "-i", str(fleet.inv), "--watch", "--interval", "0.3"], cols=100,
                        until="frame 3", then_sigint=True)
    assert code == 0 and "Traceback" not in text, text[-3000:]
    assert "Ctrl-C to quit" in text and "LOAD TREND" in text and "WEIGHT TREND" in text
    assert re.search(r"^dp0 +yes", text, re.M) and re.search(r"^dp1 +yes", text, re.M), text[-3000:]


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP])
def test_sigterm_or_sighup_end_the_live_view_with_the_cursor_shown(tmp_path: Path, sig: int) -> None:
    """`timeout 60 fdngx status --watch`, a session manager, a closed terminal: the watch ends as with Ctrl-C
    (exit 0), and the cursor rich's live view hid is shown again. Nothing listens at the replicas' ports:
    the frames come at once."""
    port = free_ports(1)[0]
    inv = tmp_path / "fdngx.json"
    inv.write_text(json.dumps({"version": 1, "instances": [
        {"name": "dp0", "host": "127.0.0.1", "port": port, "metrics_port": port, "max_num_seqs": 8}]}))
    code, raw = on_pty(["status", "-i", str(inv), "--watch", "--interval", "0.3"], cols=100, until="frame 2",
                       then=sig, escapes=True)
    assert code == 0 and "Traceback" not in raw, raw[-3000:]
    hidden, shown = raw.rfind("\x1b[?25l"), raw.rfind("\x1b[?25h")
    assert hidden >= 0 and shown > hidden, "the cursor stays hidden"


def with_state(fleet: Fleet, tmp_path: Path, drain: str | None = None, **applied: InstanceState) -> Path:
    """The fleet's inventory with `drain` drained, and a policy state saying what nginx has (`applied`)."""
    doc = json.loads(fleet.inv.read_text())
    for inst in doc["instances"]:
        if inst["name"] == drain:
            inst["drain"] = True
    fleet.inv.write_text(json.dumps(doc))
    state = tmp_path / "state.json"
    state.write_text(json.dumps(PolicyState(dict(applied), updated_at=time.time()).to_dict()))
    return state


def test_a_drain_nginx_does_not_hold_out_yet_is_not_called_safe_to_stop(fleet: Fleet, tmp_path: Path) -> None:
    """Drained in the inventory, but no cycle applied it yet (debounce, cron, a failing apply): nginx still
    sends dp0 new requests, so "nothing in flight: safe to stop" would be a lie; once the state says nginx
    holds it out, it is the reason again."""
    state = with_state(fleet, tmp_path, "dp0", dp0=InstanceState(weight=20), dp1=InstanceState(weight=20))
    proc = status("-i", str(fleet.inv), "--state", str(state))
    assert proc.returncode == 0, proc.stderr
    dp0 = row(proc.stdout.splitlines(), "dp0")
    assert dp0[5:8] == ["20", "draining", "50%"], dp0  # WEIGHT (nginx's), NEXT, SHARE
    assert " ".join(dp0[9:]) == "drain not applied yet: nginx still sends new requests", dp0
    doc = json.loads(status("-i", str(fleet.inv), "--state", str(state), "--json").stdout)
    assert "safe to stop" not in doc["instances"][0]["reason"] and not doc["instances"][0]["current_down"]

    state = with_state(fleet, tmp_path, "dp0", dp0=InstanceState(weight=20, down=True, drained=True),
                       dp1=InstanceState(weight=20))
    dp0 = row(status("-i", str(fleet.inv), "--state", str(state)).stdout.splitlines(), "dp0")
    assert dp0[5:8] == ["draining", "draining", "0%"], dp0
    assert " ".join(dp0[9:]) == "draining: nothing in flight: safe to stop", dp0


def test_a_backup_replica_gets_no_share_of_new_requests(fleet: Fleet, tmp_path: Path) -> None:
    """nginx sends a `backup` server nothing while another one is in rotation: SHARE 0 % for it, the rest for
    the others; the WEIGHT cell says backup (one word: scripts split rows on blanks), --json has `backup`."""
    state = with_state(fleet, tmp_path, dp0=InstanceState(weight=20), dp1=InstanceState(weight=13, backup=True))
    proc = status("-i", str(fleet.inv), "--state", str(state))
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert row(lines, "dp0")[5] == "20" and row(lines, "dp0")[7] == "100%", lines
    assert row(lines, "dp1")[5] == "backup:13" and row(lines, "dp1")[7] == "0%", lines
    doc = json.loads(status("-i", str(fleet.inv), "--state", str(state), "--json").stdout)
    got = {i["name"]: (i["backup"], i["share"], i["current_weight"]) for i in doc["instances"]}
    assert got == {"dp0": (False, 1.0, 20), "dp1": (True, 0.0, 13)}, got


def test_drain_says_to_stop_only_once_nginx_holds_the_replica_out(tmp_path: Path) -> None:
    """`fdngx drain`'s own advice: not "stop it once RUN is 0" alone (RUN can be 0 between two requests while
    nginx still sends it new ones), but once status shows it draining, i.e. held out by nginx."""
    inv = tmp_path / "fdngx.json"
    inv.write_text(json.dumps({"version": 1, "instances": [
        {"name": f"dp{i}", "host": "127.0.0.1", "port": 8000 + i, "metrics_port": 9000 + i} for i in range(2)]}))
    proc = subprocess.run([sys.executable, "-m", "fdngx", "drain", "dp0", "-i", str(inv)], capture_output=True,
                          text=True, timeout=60, env=_env())
    assert proc.returncode == 0, proc.stderr
    said = " ".join(proc.stdout.split())
    assert "stop it once RUN is 0" not in said, said
    assert "Until then nginx still sends it new requests" in said, said
    # The reason status gives only once nginx holds it out (before: "drain not applied yet"), and only when
    # nothing runs or waits there (RUN alone left out the queue).
    assert 'stop it once its reason says "nothing in flight: safe to stop"' in said, said


def test_a_state_nothing_keeps_current_is_said(fleet: Fleet, tmp_path: Path) -> None:
    """A sidecar that died hours ago (or a cron job removed) leaves its last weights in the state, and status
    showed them as current. It saves at least every 10 s, cron every run: older than 5 minutes, status says
    nothing keeps the weights now (stderr and --json); a fresh one says nothing; none at all is said too."""
    state = with_state(fleet, tmp_path, dp0=InstanceState(weight=20), dp1=InstanceState(weight=20))
    fresh = status("-i", str(fleet.inv), "--state", str(state), "--json")
    assert fresh.returncode == 0 and "no sidecar" not in fresh.stderr, fresh.stderr
    doc = json.loads(fresh.stdout)
    assert doc["state_note"] is None and 0 <= doc["state_age_s"] < 60, doc

    old = PolicyState.from_dict(json.loads(state.read_text()))
    state.write_text(json.dumps(PolicyState(old.instances, updated_at=time.time() - 3 * 3600).to_dict()))
    stale = status("-i", str(fleet.inv), "--state", str(state))
    assert stale.returncode == 0, stale.stderr
    assert f"{state}: last written 3 h ago: no sidecar or cron run is keeping the weights now" in stale.stderr, \
        stale.stderr
    doc = json.loads(status("-i", str(fleet.inv), "--state", str(state), "--json").stdout)
    assert doc["state_age_s"] > 3 * 3600 - 60 and "no sidecar or cron run" in doc["state_note"], doc

    none = status("-i", str(fleet.inv), "--out", str(tmp_path / "never-written.conf"))
    assert none.returncode == 0 and "no policy state" in none.stderr, none.stderr
    # A state an upgrade (or a disk) made unusable is not "no sidecar has run": the store says why, and this.
    state.write_text(json.dumps({"version": 99}))
    bad = status("-i", str(fleet.inv), "--state", str(state))
    assert bad.returncode == 0 and "ignoring unusable policy state" in bad.stderr, bad.stderr
    assert "the policy state cannot be used" in bad.stderr and "no sidecar" not in bad.stderr, bad.stderr
    # Without --out/--state there is no state to speak of: nothing said, no keys.
    bare = status("-i", str(fleet.inv), "--json")
    assert "no policy state" not in bare.stderr and "state_age_s" not in json.loads(bare.stdout)


def test_an_empty_fleet_says_so_under_the_header(tmp_path: Path) -> None:
    """A registry's fleet before its first registration: the header alone read as a broken status (an ops
    review); a line says there is no instance yet, and the status still exits 0."""
    inv = write_inventory(tmp_path / "fdngx.json", [])
    proc = status("-i", str(inv))
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0].split()[0] == "INSTANCE" and lines[-1].startswith("no instance yet"), lines


def test_on_a_controller_host_status_reads_the_controllers_state_beside_the_inventory(fleet: Fleet,
                                                                                     tmp_path: Path) -> None:
    """A controller has no --out: its state lives beside its inventory, and status without --state showed the
    inventory's static weights there (an outside review). It reads that state when there is one."""
    from fdngx.weights.store import controller_store

    inv = tmp_path / "fdngx.json"
    inv.write_text(fleet.inv.read_text())
    bare = json.loads(status("-i", str(inv), "--json").stdout)
    assert "state_age_s" not in bare, "no controller state yet: nothing to read"
    state = controller_store(inv).path
    state.write_text(json.dumps(PolicyState({"dp0": InstanceState(weight=7), "dp1": InstanceState(weight=13)},
                                            updated_at=time.time()).to_dict()))
    doc = json.loads(status("-i", str(inv), "--json").stdout)
    assert {i["name"]: i["current_weight"] for i in doc["instances"]} == {"dp0": 7, "dp1": 13}, doc
    assert 0 <= doc["state_age_s"] < 60, doc
