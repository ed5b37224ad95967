"""`fdngx status` says what the detached `fdngx launch` beside an inventory cannot write (its pidfile's
`unwritten`), and a launch whose supervisor is gone though its pidfile stays: a warning on stderr,
`launch_unwritten` / `launch_supervisor_gone` in --json, a line in each --watch frame; the exit code
unchanged. No pidfile, or one that cannot be read: nothing said, never an error. The replicas are
ports nobody listens on (127.0.0.1): status shows them down and exits 0."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from fdngx.domain import Engine
from fdngx.launch.pidfile import LaunchState, Pidfile, ProcessRecord, write_pidfile
from fdngx.launch.plan import pidfile_for
from fdngx.sim.process import free_ports
from fdngx.system import procs
from tests.integration.test_status import status
from tests.support import write_inventory

WHY = "No space left on device"


def fleet(tmp: Path) -> Path:
    port, metrics = free_ports(2)
    return write_inventory(tmp / "fdngx.json", [{"name": "dp0", "host": "127.0.0.1", "port": port,
                                                 "metrics_port": metrics, "engine": "sim", "max_num_seqs": 8}])


def launch_record(inv: Path, unwritten: dict[str, str]) -> Path:
    """The pidfile a detached launch beside `inv` writes, its supervisor this (live) test process."""
    me = os.getpid()
    record = Pidfile(supervisor=ProcessRecord(me, procs.starttime(me)), state=LaunchState.READY, detached=True,
                     engine=Engine.SIM, inventory=str(inv), grace=15.0, children=[], instances={},
                     boot=procs.boot_id(), unwritten=unwritten)
    path = Path(pidfile_for(inv))
    write_pidfile(path, record)
    return path


def warning(inv: Path) -> str:
    """How the warning starts (pidfile.unwritten_lines words the rest)."""
    return f"fdngx: warning: {inv}: the launch's supervisor (pid {os.getpid()}) cannot write it ({WHY})"


def test_status_says_what_the_launch_cannot_write_and_still_exits_0(tmp_path: Path) -> None:
    inv = fleet(tmp_path)
    launch_record(inv, {str(inv): WHY})
    shown = status("-i", str(inv))
    assert shown.returncode == 0, shown.stderr
    assert warning(inv) in shown.stderr  # before: nothing
    assert shown.stdout.splitlines()[0].startswith("INSTANCE") and "dp0" in shown.stdout
    as_json = status("-i", str(inv), "--json")
    assert as_json.returncode == 0, as_json.stderr
    [line] = json.loads(as_json.stdout)["launch_unwritten"]
    assert f"fdngx: {line}".startswith(warning(inv)) and f"fdngx: {line}\n" in as_json.stderr


def test_watch_frames_and_lines_carry_it(tmp_path: Path) -> None:
    inv = fleet(tmp_path)
    launch_record(inv, {str(inv): WHY})
    frames = status("-i", str(inv), "--watch", "--count", "1")
    assert frames.returncode == 0, frames.stderr
    assert warning(inv).removeprefix("fdngx: ") in frames.stdout
    lines = status("-i", str(inv), "--watch", "--count", "1", "--json")
    assert lines.returncode == 0, lines.stderr
    [line] = json.loads(lines.stdout)["launch_unwritten"]
    assert f"fdngx: {line}".startswith(warning(inv))


def test_an_inventory_status_cannot_read_comes_with_the_launchs_reason(tmp_path: Path) -> None:
    inv = tmp_path / "fdngx.json"
    inv.mkdir()  # what the launch could not replace
    launch_record(inv, {str(inv): WHY})
    shown = status("-i", str(inv))
    assert shown.returncode == 1
    assert warning(inv) in shown.stderr


@pytest.mark.parametrize("pidfile", ["written", "none", "garbage", "a directory"])
def test_nothing_is_said_without_an_unwritten_record(tmp_path: Path, pidfile: str) -> None:
    inv = fleet(tmp_path)
    if pidfile == "written":
        launch_record(inv, {})
    elif pidfile == "garbage":
        Path(pidfile_for(inv)).write_text("{not json")
    elif pidfile == "a directory":
        Path(pidfile_for(inv)).mkdir()
    for args in ([], ["--json"]):
        shown = status("-i", str(inv), *args)
        assert shown.returncode == 0, shown.stderr
        assert "warning" not in shown.stderr and "launch_unwritten" not in shown.stdout


@pytest.mark.parametrize("ended", ["killed", "failed", "another boot"])
def test_a_supervisor_that_is_gone_is_said_with_how_it_ended_and_what_to_do(tmp_path: Path, ended: str) -> None:
    """Its pidfile stays (kill -9; a detached start that failed with nobody left to say it; a reboot): nothing
    supervises the replicas and the inventory's status fields are stale. Exit 0, as for the other warnings."""
    inv = fleet(tmp_path)
    path = launch_record(inv, {})
    doc = json.loads(path.read_text())
    doc["supervisor"]["start"] += 7  # this pid, another start time: not the process recorded
    error = "timed out after 8s waiting for /health on dp0 (HTTP 404); stopped every replica; full log: x.log"
    if ended == "failed":
        doc.update(state="failed", error=error, log_tail="", log_file="x.log")
    elif ended == "another boot":
        doc["boot"] = "0b5e1e7e-0000-4000-8000-000000000000"
    path.write_text(json.dumps(doc))
    how = {"killed": f"it ended without removing {path}: killed (kill -9, the OOM killer",
           "failed": f"the launch failed: {error}; nothing it started runs any more",
           "another boot": f"{path} was written before the machine restarted"}[ended]
    said = f"fdngx: warning: {inv}: the launch's supervisor (pid {os.getpid()}) is not running any more: {how}"
    shown = status("-i", str(inv))
    assert shown.returncode == 0, shown.stderr
    assert said in shown.stderr, shown.stderr  # before: nothing
    as_json = status("-i", str(inv), "--json")
    [entry] = json.loads(as_json.stdout)["launch_supervisor_gone"]
    assert entry["supervisor_pid"] == os.getpid() and entry["still_running"] == [] and entry["pidfile"] == str(path)
    assert entry["state"] == ("failed" if ended == "failed" else "ready")
    assert entry["error"] == (error if ended == "failed" else None)
    assert f"fdngx: warning: {entry['note']}" in as_json.stderr
    frames = status("-i", str(inv), "--watch", "--count", "1")
    assert frames.returncode == 0 and said.removeprefix("fdngx: ") in frames.stdout, frames.stdout
