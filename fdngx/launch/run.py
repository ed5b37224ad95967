"""`fdngx launch` and `fdngx stop`: preflight checks, health probes, the pidfile, detach, stop.

The supervision loop itself (start, wait for health, watch, restart, shut down) is in
fdngx.launch.supervise; a detached launch's hand-over to its supervisor in fdngx.launch.detach; `fdngx stop`
in fdngx.launch.stop; probes in fdngx.launch.probe; process primitives (sessions, identity by start time,
group stop) in fdngx.system.procs; command lines in fdngx.launch.plan and fdngx.engines.<engine>.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TextIO

from fdngx import engines
from fdngx.domain import Engine
from fdngx.errors import LaunchError
from fdngx.launch import standing
from fdngx.launch.detach import launch_detached
from fdngx.launch.lock import LaunchLock
from fdngx.launch.output import Out
from fdngx.launch.pidfile import read_pidfile, remove_pidfile
from fdngx.launch.plan import Plan
from fdngx.launch.probe import check_ports
from fdngx.launch.stop import stop
from fdngx.launch.supervise import Supervisor

__all__ = ["check_engine", "fastdeploy_installed", "launch", "preflight", "stop"]


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


def preflight(plan: Plan, out: TextIO | None = None) -> LaunchLock:
    """Checks before anything starts; returns the launch lock, which the supervisor holds for its whole life.
    A pidfile whose supervisor is gone, with nothing it started still running, is replaced: how that launch
    ended is said on `out` (nobody may have seen it: a detached start that failed with its `fdngx launch` gone)."""
    inventory = Path(plan.inventory_path)
    if not inventory.parent.is_dir():
        raise LaunchError(f"{plan.inventory_path}: the inventory's directory does not exist")
    if inventory.is_dir():
        # The supervisor could never write it: it would run the replicas and retry forever.
        raise LaunchError(f"{plan.inventory_path}: is a directory; --inventory names the inventory file (e.g. "
                          f"{inventory / 'fdngx.json'}); nothing was started")
    lock = LaunchLock.take(plan.inventory_path, plan.pidfile)
    try:
        found = [standing.Found(plan.pidfile, r) for r in [read_pidfile(plan.pidfile)] if r is not None]
        old = standing.legacy_pidfile(plan.inventory_path)
        if old is not None and old != plan.pidfile:
            # An older fdngx's launch through this symlink: its lock was beside the link, not ours to hold.
            found += [standing.Found(old, r, legacy=True) for r in [read_pidfile(old)] if r is not None]
        for f in found:
            _refuse_running(plan, f)
        check_engine(plan.engine)
        check_ports(plan.bind_host, plan.ports)
        for f in found:
            if (line := standing.replaced_line(f)) is not None:
                Out(out or sys.stderr).line(f"fdngx: {line}")
            if f.legacy:  # ours goes beside the file the link points to: the old one would outlive it
                remove_pidfile(f.path, f.record.supervisor.pid, f.record.supervisor.start)
    except BaseException:
        lock.close()
        raise
    return lock


def _refuse_running(plan: Plan, found: standing.Found) -> None:
    """A LaunchError when the launch that pidfile names still runs: its supervisor, or processes it started."""
    record, whose = found.record, " (an older fdngx's pidfile, beside the symlink's name)" if found.legacy else ""
    if not record.from_another_boot() and record.supervisor.alive():
        raise LaunchError(
            f"{found.path}: replicas launched with this inventory are still supervised by pid "
            f"{record.supervisor.pid}{whose}; run 'fdngx stop --inventory {plan.inventory_path}' first"
        )
    left = record.still_running()
    if left:
        raise LaunchError(
            f"{found.path}: its supervisor (pid {record.supervisor.pid}) is gone but processes it started "
            f"still run (pid {', '.join(map(str, left))}){whose}; run 'fdngx stop --inventory "
            f"{plan.inventory_path}' first"
        )


def launch(plan: Plan, detach: bool = False, out: TextIO | None = None) -> int:
    """Start, wait until every /health is 200, write the inventory; then supervise (foreground) or return."""
    out = out or sys.stderr
    lock = preflight(plan, out)
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
