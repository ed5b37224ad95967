"""`fdngx launch` and `fdngx stop`: preflight checks, health probes, the pidfile, detach, stop.

The supervision loop itself (start, wait for health, watch, restart, shut down) is in
fdngx.launch.supervise; a detached launch's hand-over to its supervisor in fdngx.launch.detach; probes in
fdngx.launch.probe; process primitives (sessions, identity by start time, group stop) in fdngx.system.procs;
command lines in fdngx.launch.plan and fdngx.engines.<engine>.
"""

from __future__ import annotations

import signal
import sys
import time
from pathlib import Path
from typing import TextIO

from fdngx import engines
from fdngx.domain import Engine
from fdngx.errors import LaunchError
from fdngx.launch.detach import launch_detached
from fdngx.launch.lock import LaunchLock
from fdngx.launch.output import Out
from fdngx.launch.pidfile import live_supervisor, read_pidfile, remove_pidfile
from fdngx.launch.plan import Plan, pidfile_for
from fdngx.launch.probe import check_ports
from fdngx.launch.supervise import Supervisor
from fdngx.system import procs


def check_engine(engine: Engine) -> None:
    """Fail before starting anything when the engine cannot run here (a child would only die at once)."""
    if not engines.spec(engine).installed():
        raise LaunchError(
            f"--engine {engine}: {engine} is not installed for {sys.executable} (install it in this environment, "
            "or use --engine sim for simulated replicas)"
        )


def fastdeploy_installed() -> bool:
    return engines.spec(Engine.FASTDEPLOY).installed()


# -- launch ----------------------------------------------------------------------------------------------


def preflight(plan: Plan) -> LaunchLock:
    """Checks before anything starts; returns the launch lock, which the supervisor holds for its whole life."""
    inventory = Path(plan.inventory_path)
    if not inventory.parent.is_dir():
        raise LaunchError(f"{plan.inventory_path}: the inventory's directory does not exist")
    if inventory.is_dir():
        # The supervisor could never write it: it would run the replicas and retry forever.
        raise LaunchError(f"{plan.inventory_path}: is a directory; --inventory names the inventory file (e.g. "
                          f"{inventory / 'fdngx.json'}); nothing was started")
    lock = LaunchLock.take(plan.inventory_path, plan.pidfile)
    try:
        running = live_supervisor(plan.pidfile)
        if running:
            raise LaunchError(
                f"{plan.pidfile}: replicas launched with this inventory are still supervised by pid "
                f"{running.supervisor.pid}; run 'fdngx stop --inventory {plan.inventory_path}' first"
            )
        stale = read_pidfile(plan.pidfile)
        left = stale.still_running() if stale is not None else []
        if stale is not None and left:
            raise LaunchError(
                f"{plan.pidfile}: its supervisor (pid {stale.supervisor.pid}) is gone but processes it started "
                f"still run (pid {', '.join(map(str, left))}); run 'fdngx stop --inventory {plan.inventory_path}' "
                "first"
            )
        check_engine(plan.engine)
        check_ports(plan.bind_host, plan.ports)
    except BaseException:
        lock.close()
        raise
    return lock


def launch(plan: Plan, detach: bool = False, out: TextIO | None = None) -> int:
    """Start, wait until every /health is 200, write the inventory; then supervise (foreground) or return."""
    out = out or sys.stderr
    lock = preflight(plan)
    try:
        try:
            Path(plan.log_dir).mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise LaunchError(f"{plan.log_dir}: cannot create the log directory: {exc.strerror}") from None
        if detach:
            return launch_detached(plan, out, lock)
        return Supervisor(plan, out=out, detached=False).run()
    finally:
        lock.close()


# -- stop ------------------------------------------------------------------------------------------------


def stop(inventory_path: str | Path, out: TextIO | None = None, grace: float | None = None) -> list[str]:
    """Stop the supervisor recorded next to the inventory and everything it started; say what stopped.

    Only processes the pidfile recorded, each still the very process (pid and start time): a group only
    while its recorded leader lives; with the leader gone, the recorded members one by one. A stale file
    naming a pid or group id the kernel has since handed to someone else stops nothing of theirs."""
    say = Out(out or sys.stderr).line
    inventory = Path(inventory_path).absolute()
    pidfile = pidfile_for(inventory)
    record = read_pidfile(pidfile)
    if record is None:
        if not inventory.exists():
            raise LaunchError(f"{inventory}: no such inventory and no pidfile {pidfile}: nothing to stop")
        return [f"nothing to stop: no supervisor pidfile {pidfile} (a foreground launch stops with Ctrl-C)"]
    sup = record.supervisor
    if record.from_another_boot():
        # Its pids and start times name processes of another boot: any match now is somebody else.
        remove_pidfile(pidfile, sup.pid, sup.start)
        return [f"{pidfile} was written before the machine restarted: nothing it names can still run; removed it"]
    grace = record.grace if grace is None else grace
    report = []
    children = [c for c in record.children if c.pid is not None]
    # Which ran until now: one that exited before (not restarted: --restart no, a clean exit) was not stopped.
    running = {c.pid for c in children if c.start is not None and procs.group_is_ours(c.pid, c.start)}
    supervised = sup.alive()
    if supervised:
        say(f"fdngx: stopping supervisor pid {sup.pid} (up to {grace + 15:.0f}s)")
        procs.signal_pid(sup.pid, sup.start, signal.SIGTERM)
        deadline = time.monotonic() + grace + 15
        while sup.alive() and time.monotonic() < deadline:
            time.sleep(0.1)
        if procs.signal_pid(sup.pid, sup.start, signal.SIGKILL):
            report.append(f"supervisor pid {sup.pid} did not exit in time: killed")
        else:
            report.append(f"stopped supervisor pid {sup.pid}")
    else:
        report.append(f"supervisor pid {sup.pid} was not running (stale pidfile)")
    groups = [(c.pid, c.start, c.stop_signal) for c in children if c.pid is not None and c.start is not None]
    left = [(pgid, start, sig) for pgid, start, sig in groups if procs.group_is_ours(pgid, start)]
    members = {p: s for c in children for p, s in c.members.items() if procs.same_process(p, s)}
    killed = procs.stop_all(left, [], grace, members) if left or members else []
    left_pids = {g[0] for g in left}
    for c in children:
        assert c.pid is not None
        how = "killed" if c.pid in killed else "stopped" if c.pid in running or c.pid in left_pids else \
            "already gone:"
        report.append(f"{how} {c.name} pid {c.pid} serving {', '.join(c.instances)}")
    if members and not supervised:
        report.append(f"stopped {len(members)} recorded member process(es) of those groups")
    remove_pidfile(pidfile, sup.pid, sup.start)  # only if no new launch has replaced it meanwhile
    return report
