"""`fdngx stop`: the supervisor recorded beside an inventory, and everything it started.

With the supervisor running, `--grace N` is the grace: it is left for the supervisor (fdngx.launch.handshake)
before the SIGTERM, and `fdngx stop` itself SIGKILLs what the pidfile recorded that is still there N seconds
after the supervisor took the request; the supervisor would kill only STOP_MARGIN seconds later. So it can say
truthfully which replicas stopped and which were killed, and the supervisor, done well inside its own
wait, still writes the inventory's "stopped" before it exits. With the supervisor gone (killed), what it
started and left running is stopped here, and its inventory's "stopped" (or "exited") written here too; so
too when it must be killed here (hung: it did not exit in time).

The pidfile is found by fdngx.launch.standing: beside the inventory's file, else where an older fdngx wrote
it (beside a symlink's own name), which is said.
"""

from __future__ import annotations

import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TextIO

from fdngx.errors import LaunchError
from fdngx.launch import standing
from fdngx.launch.handshake import STOP_MARGIN, ask_grace, request_path, withdraw
from fdngx.launch.output import Out
from fdngx.launch.pidfile import Pidfile, remove_pidfile
from fdngx.launch.plan import pidfile_for
from fdngx.system import procs

ACK_WAIT = 10.0  # seconds for the supervisor to take the request (it notices a signal within a loop)
EXIT_WAIT = 15.0  # seconds for it to exit once its replicas are gone (the inventory written under its lock)


def stop(inventory_path: str | Path, out: TextIO | None = None, grace: float | None = None) -> list[str]:
    """Stop the supervisor recorded next to the inventory and everything it started; say what stopped.

    Only processes the pidfile recorded, each still the very process (pid and start time): a group only
    while its recorded leader lives; with the leader gone, the recorded members one by one. A stale file
    naming a pid or group id the kernel has since handed to someone else stops nothing of theirs."""
    say = Out(out or sys.stderr).line
    inventory = Path(inventory_path).absolute()
    found = standing.find(inventory)
    if found is None:
        old = standing.legacy_pidfile(inventory)
        where = pidfile_for(inventory) + (f" (nor {old}, where an older fdngx kept it)" if old else "")
        if not inventory.exists():
            raise LaunchError(f"{inventory}: no such inventory and no pidfile {where}: nothing to stop")
        return [f"nothing to stop: no supervisor pidfile {where} (a foreground launch stops with Ctrl-C)"]
    pidfile, record = found.path, found.record
    report = [standing.legacy_line(inventory, found) + ": stopping the launch it names"] if found.legacy else []
    sup = record.supervisor
    if record.from_another_boot():
        # Its pids and start times name processes of another boot: any match now is somebody else.
        remove_pidfile(pidfile, sup.pid, sup.start)
        gone = f"{pidfile} was written before the machine restarted: nothing it names can still run; removed it"
        return [*report, gone + _marked(inventory, record, set())]
    grace = record.grace if grace is None else grace
    children = [c for c in record.children if c.pid is not None]
    # Which ran until now: one that exited before (not restarted: --restart no, a clean exit) was not stopped.
    running = {c.pid for c in children if c.start is not None and procs.group_is_ours(c.pid, c.start)}
    groups = [(c.pid, c.start, c.stop_signal) for c in children if c.pid is not None and c.start is not None]
    killed: list[int] = []
    supervised = sup.alive()
    marks = not supervised  # a supervisor that exits writes its inventory's "stopped"; a killed one cannot
    if supervised:
        line, killed, marks = _stop_supervised(record, pidfile, grace, say)
        report.append(line)
    else:
        report.append(f"supervisor pid {sup.pid} was not running (stale pidfile)"
                      + (f"; the launch had failed: {record.error}" if standing.failed_start(record) else ""))
    left = [(pgid, start, sig) for pgid, start, sig in groups if procs.group_is_ours(pgid, start)]
    members = {p: s for c in children for p, s in c.members.items() if procs.same_process(p, s)}
    if left or members:
        killed += procs.stop_all(left, [], grace, members)
    left_pids = {g[0] for g in left}
    for c in children:
        assert c.pid is not None
        was_killed = c.pid in killed or not set(c.members).isdisjoint(killed)
        how = "killed" if was_killed else "stopped" if c.pid in running or c.pid in left_pids else "already gone:"
        report.append(f"{how} {c.name} pid {c.pid} serving {', '.join(c.instances)}")
    if members and not supervised:
        report.append(f"stopped {len(members)} recorded member process(es) of those groups")
    remove_pidfile(pidfile, sup.pid, sup.start)  # only if no new launch has replaced it meanwhile
    if marks and (marked := _marked(inventory, record, running | left_pids)):
        report.append(marked.removeprefix("; "))
    return report


def _marked(inventory: Path, record: Pidfile, stopped: set[int]) -> str:
    """A gone supervisor cannot write its inventory's "stopped": done here; the words to add ("" for none)."""
    if not inventory.exists():
        return ""
    why = standing.mark_stopped(inventory, record, stopped)
    return "" if why is None else f"; could not mark its replicas stopped in {inventory} ({why})"


def _stop_supervised(record: Pidfile, pidfile: str, grace: float,
                     say: Callable[[str], bool]) -> tuple[str, list[int], bool]:
    """SIGTERM to a live supervisor with `grace` for its replicas; SIGKILL to those of them that outlive it.
    Returns the line for the supervisor, the pids killed, and whether it was killed too (then it did not
    write its inventory's "stopped": the caller does)."""
    sup = record.supervisor
    ident = (sup.pid, sup.start)
    why_not = ask_grace(pidfile, ident, grace)
    if why_not is not None:
        # Its own grace then: kill no later than it would, so that what is said to be killed is what was.
        if grace != record.grace:
            say(f"fdngx: cannot pass --grace {grace:g} to supervisor pid {sup.pid} ({why_not}): its own grace "
                f"applies, {min(grace, record.grace):g}s")
        grace = min(grace, record.grace)
    say(f"fdngx: stopping supervisor pid {sup.pid} (grace {grace:g}s)")
    procs.signal_pid(sup.pid, sup.start, signal.SIGTERM)
    if why_not is None:
        end = time.monotonic() + ACK_WAIT
        while request_path(pidfile).exists() and sup.alive() and time.monotonic() < end:
            time.sleep(0.05)
    children = [c for c in record.children if c.pid is not None and c.start is not None]
    groups = [(c.pid, c.start, c.stop_signal) for c in children if procs.group_is_ours(c.pid, c.start)]
    members = {p: s for c in children for p, s in c.members.items() if procs.same_process(p, s)}
    killed = procs.kill_after(groups, [], grace, members) if groups or members else []
    end = time.monotonic() + STOP_MARGIN + EXIT_WAIT
    while sup.alive() and time.monotonic() < end:
        time.sleep(0.1)
    withdraw(pidfile, ident)
    if procs.signal_pid(sup.pid, sup.start, signal.SIGKILL):
        return f"supervisor pid {sup.pid} did not exit in time: killed", killed, True
    return f"stopped supervisor pid {sup.pid}", killed, False
