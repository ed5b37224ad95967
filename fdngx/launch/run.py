"""`fdngx launch` and `fdngx stop`: preflight checks, health probes, the pidfile, detach, stop.

The supervision loop itself (start, wait for health, watch, restart, shut down) is in
fdngx.launch.supervise; probes in fdngx.launch.probe; process primitives (sessions, identity by start time,
group stop) in fdngx.system.procs; command lines in fdngx.launch.plan and fdngx.engines.<engine>.
"""

from __future__ import annotations

import contextlib
import json
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, TextIO

from fdngx import engines
from fdngx.domain import Engine
from fdngx.errors import LaunchError
from fdngx.launch.pidfile import live_supervisor, read_pidfile, remove_pidfile
from fdngx.launch.plan import Plan, pidfile_for
from fdngx.launch.probe import check_ports
from fdngx.launch.progress import Progress
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


def preflight(plan: Plan) -> None:
    if not Path(plan.inventory_path).parent.is_dir():
        raise LaunchError(f"{plan.inventory_path}: the inventory's directory does not exist")
    running = live_supervisor(plan.pidfile)
    if running:
        raise LaunchError(
            f"{plan.pidfile}: replicas launched with this inventory are still supervised by pid "
            f"{running['supervisor']['pid']}; run 'fdngx stop --inventory {plan.inventory_path}' first"
        )
    check_engine(plan.engine)
    check_ports(plan.inventory.instances[0].host, plan.ports)


def launch(plan: Plan, detach: bool = False, out: TextIO | None = None) -> int:
    """Start, wait until every /health is 200, write the inventory; then supervise (foreground) or return."""
    out = out or sys.stderr
    preflight(plan)
    try:
        Path(plan.log_dir).mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise LaunchError(f"{plan.log_dir}: cannot create the log directory: {exc.strerror}") from None
    if detach:
        return _launch_detached(plan, out)
    return Supervisor(plan, out=out, detached=False).run()


def _launch_detached(plan: Plan, out: TextIO) -> int:
    """Hand the plan to a supervisor in its own session and follow its pidfile until ready or failed."""
    log = Path(plan.log_dir) / "supervisor.log"
    progress = Progress([i.name for i in plan.inventory.instances], out, plan.timeout)
    with open(log, "ab") as fh:
        sup = subprocess.Popen(
            [sys.executable, "-m", "fdngx.launch.supervise"],
            stdin=subprocess.PIPE,
            stdout=fh,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            close_fds=True,
        )
    assert sup.stdin is not None
    sup.stdin.write(json.dumps(plan.to_dict()).encode())
    sup.stdin.close()
    progress.say(f"supervisor pid {sup.pid} starting {len(plan.procs)} process(es); its log: {log}")
    old = signal.signal(signal.SIGTERM, _raise_interrupt)
    deadline = time.monotonic() + plan.timeout + plan.grace + 30
    try:
        while True:
            rc = sup.poll()
            data = read_pidfile(plan.pidfile) or {}
            if data.get("supervisor", {}).get("pid") != sup.pid:
                data = {}
            if data.get("instances"):
                progress.update(data["instances"])
            if rc is None and data.get("state") == "ready":
                progress.say(
                    f"{len(plan.inventory.instances)} replica(s) healthy; inventory {plan.inventory_path}; "
                    f"supervisor pid {sup.pid} (pidfile {plan.pidfile}); stop with: fdngx stop --inventory "
                    f"{plan.inventory_path}"
                )
                return 0
            if rc is not None:
                if data.get("log_tail"):
                    progress.say(f"last lines of {data.get('log_file', log)}:")
                    print(data["log_tail"], file=out)
                remove_pidfile(plan.pidfile, sup.pid)
                raise LaunchError(data.get("error") or f"the supervisor exited with status {rc}; see {log}")
            if time.monotonic() > deadline:
                raise LaunchError(f"the supervisor did not report ready in time; stopped it; see {log}")
            time.sleep(0.2)
    except KeyboardInterrupt:
        _stop_supervisor(sup, plan, progress)
        progress.say("interrupted: stopped the supervisor and every replica")
        return 130
    except LaunchError:
        # Failed while starting: nothing may keep running behind the user's back.
        _stop_supervisor(sup, plan, progress)
        raise
    finally:
        signal.signal(signal.SIGTERM, old)


def _stop_supervisor(sup: subprocess.Popen[bytes], plan: Plan, progress: Progress) -> None:
    if sup.poll() is not None:
        return
    progress.say(f"stopping supervisor pid {sup.pid}")
    sup.send_signal(signal.SIGTERM)
    try:
        sup.wait(plan.grace + 15)
    except subprocess.TimeoutExpired:
        sup.kill()
        sup.wait()
        stop(plan.inventory_path, progress.out)


def _raise_interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


# -- stop ------------------------------------------------------------------------------------------------


def stop(inventory_path: str | Path, out: TextIO | None = None, grace: float | None = None) -> list[str]:
    """Stop the supervisor recorded next to the inventory and everything it started; say what stopped."""
    out = out or sys.stderr
    pidfile = pidfile_for(Path(inventory_path).absolute())
    data = read_pidfile(pidfile)
    if data is None:
        if not Path(inventory_path).exists():
            raise LaunchError(f"{inventory_path}: no such inventory and no pidfile {pidfile}: nothing to stop")
        return [f"nothing to stop: no supervisor pidfile {pidfile} (a foreground launch stops with Ctrl-C)"]
    sup = data.get("supervisor", {})
    pid, start = int(sup.get("pid", 0)), sup.get("start")
    grace = float(data.get("grace", 15.0)) if grace is None else grace
    report = []
    supervised = procs.same_process(pid, start)
    if supervised:
        print(f"fdngx: stopping supervisor pid {pid} (up to {grace + 15:.0f}s)", file=out, flush=True)
        procs.signal_pid(pid, start, signal.SIGTERM)
        deadline = time.monotonic() + grace + 15
        while procs.same_process(pid, start) and time.monotonic() < deadline:
            time.sleep(0.1)
        if procs.signal_pid(pid, start, signal.SIGKILL):
            report.append(f"supervisor pid {pid} did not exit in time: killed")
        else:
            report.append(f"stopped supervisor pid {pid}")
    else:
        report.append(f"supervisor pid {pid} was not running (stale pidfile)")
    children = [c for c in data.get("children", []) if c.get("pid")]
    groups = [(int(c["pid"]), c.get("start"), c.get("stop_signal", "SIGTERM")) for c in children]
    left = [g for g in groups if procs.group_is_ours(g[0], g[1])]
    killed = procs.stop_all(left, [], grace) if left else []
    left_pids = {g[0] for g in left}
    for c in children:
        pid_c = int(c["pid"])
        how = "killed" if pid_c in killed else "stopped" if supervised or pid_c in left_pids else "already gone:"
        report.append(f"{how} {c['name']} pid {pid_c} serving {', '.join(c.get('instances', []))}")
    with contextlib.suppress(FileNotFoundError):
        Path(pidfile).unlink()
    return report
