"""`fdngx launch --detach`: hand the plan to a supervisor in a session of its own, follow it until every
replica is healthy (return) or the start failed (raise), and leave nothing running behind a failed start.

Until the supervisor reports ready this process is a subreaper (fdngx.system.procs.become_subreaper): a
supervisor that dies without cleaning up (SIGKILL, the OOM killer) leaves its replicas to us, not to init,
and they are stopped here, with what its record names, before the launch fails. A replica that ignores its
parent-death signal (a FastDeploy rank busy loading) would otherwise outlive it where `fdngx stop` cannot
find it, and a new launch would start a second copy.
"""

from __future__ import annotations

import functools
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, TextIO

from fdngx.errors import LaunchError
from fdngx.launch.children import describe_exit
from fdngx.launch.lock import LaunchLock
from fdngx.launch.pidfile import LaunchState, Pidfile, read_pidfile, remove_pidfile, unwritten_lines
from fdngx.launch.plan import Plan
from fdngx.launch.progress import Progress
from fdngx.system import procs


def launch_detached(plan: Plan, out: TextIO, lock: LaunchLock) -> int:
    """Start the supervisor (it inherits the launch lock); follow its pidfile until ready or failed."""
    log = Path(plan.log_dir) / "supervisor.log"
    progress = Progress([i.name for i in plan.inventory.instances], out, plan.timeout)
    before = set(procs.descendants(os.getpid()))  # ours already: never taken for the supervisor's
    was_subreaper = procs.become_subreaper()
    try:
        sup = _start(plan, log, lock)
        progress.say(f"supervisor pid {sup.pid} starting {len(plan.procs)} process(es); its log: {log}")
        return _follow(sup, plan, log, progress, before)
    finally:
        procs.become_subreaper(was_subreaper)


def _start(plan: Plan, log: Path, lock: LaunchLock) -> subprocess.Popen[bytes]:
    with open(log, "ab") as fh:
        sup = subprocess.Popen(
            [sys.executable, "-m", "fdngx.launch.supervise", "--lock-fd", str(lock.fd)],
            stdin=subprocess.PIPE,
            stdout=fh,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            close_fds=True,
            pass_fds=(lock.fd,),
        )
    assert sup.stdin is not None
    sup.stdin.write(json.dumps(plan.to_dict()).encode())
    sup.stdin.close()
    return sup


def _follow(sup: subprocess.Popen[bytes], plan: Plan, log: Path, progress: Progress, before: set[int]) -> int:
    got: list[int] = []
    old = signal.signal(signal.SIGTERM, functools.partial(_raise_interrupt, got))
    deadline = time.monotonic() + plan.timeout + plan.grace + 30
    record: Pidfile | None = None
    try:
        while True:
            rc = sup.poll()
            seen = read_pidfile(plan.pidfile)
            if seen is not None and seen.supervisor.pid == sup.pid:  # not an older launch's file
                record = seen
                if record.instances:
                    progress.update(record.instances)
            if rc is None and record is not None and record.state is LaunchState.READY:
                _ready(sup, plan, record, progress)
                return 0
            if rc is not None:
                if record is not None and record.log_tail:
                    progress.say(f"last lines of {record.log_file or log}:")
                    progress.text(record.log_tail)
                why = (record.error if record else None) or f"the supervisor exited with status {rc}; see {log}"
                if rc < 0:  # killed: it stopped nothing
                    why = f"the supervisor (pid {sup.pid}) {describe_exit(rc)} before every replica was healthy"
                raise LaunchError(why + _leftovers(sup, plan, record, before, progress, log))
            if time.monotonic() > deadline:
                raise LaunchError(f"the supervisor did not report ready in time; stopped it; see {log}")
            time.sleep(0.2)
    except KeyboardInterrupt:
        _stop_supervisor(sup, plan, progress, before, record)
        signum = got[0] if got else signal.SIGINT
        progress.say(f"{signal.Signals(signum).name}: stopped the supervisor and every replica before they were "
                     "healthy")
        return 128 + signum
    except LaunchError:
        # Failed while starting: nothing may keep running behind the user's back (a supervisor that exited
        # had what it left stopped above).
        if sup.poll() is None:
            _stop_supervisor(sup, plan, progress, before, record)
        raise
    finally:
        signal.signal(signal.SIGTERM, old)


def _ready(sup: subprocess.Popen[bytes], plan: Plan, record: Pidfile, progress: Progress) -> None:
    # Its output goes to supervisor.log, which nobody reads: what it cannot write is said here.
    for line in unwritten_lines(record):
        progress.say(line)
    inventory = f"inventory {plan.inventory_path}" + (
        " NOT written yet (see above)" if plan.inventory_path in record.unwritten else "")
    progress.say(
        f"{len(plan.inventory.instances)} replica(s) healthy; {inventory}; supervisor pid {sup.pid} (pidfile "
        f"{plan.pidfile}); stop with: fdngx stop --inventory {plan.inventory_path}"
    )


def _leftovers(sup: subprocess.Popen[bytes], plan: Plan, record: Pidfile | None, before: set[int],
               progress: Progress, log: Path | None = None) -> str:
    """The supervisor is gone: stop what it started and left running (its orphans came to us; its record names
    the groups and members). Removes its pidfile when nothing is left; the words to add to the error."""
    strays = {p: s for p, s in procs.descendants(os.getpid()).items() if p not in before}
    groups = [(c.pid, c.start, c.stop_signal) for c in (record.children if record else [])
              if c.pid is not None and c.start is not None and procs.group_is_ours(c.pid, c.start)]
    members = {p: s for c in (record.children if record else []) for p, s in c.members.items()}
    extra = {p: s for p, s in {**members, **strays}.items() if procs.same_process(p, s)}
    said = ""
    if groups or extra:
        pids = sorted({g[0] for g in groups} | set(extra))
        progress.say(f"stopping {len(pids)} process(es) the supervisor (pid {sup.pid}) started and left running: "
                     f"pid {', '.join(map(str, pids))}")
        killed = procs.stop_all(groups, [], plan.grace, extra)
        said = f"; stopped the {len(pids)} process(es) it left running (pid {', '.join(map(str, pids))}" + (
            f"; killed after the grace period: {', '.join(map(str, killed))})" if killed else ")")
    left = sorted({g[0] for g in groups if procs.group_is_ours(g[0], g[1])}
                  | {p for p, s in extra.items() if procs.same_process(p, s)})
    if left:  # kept: `fdngx stop` finds them by it
        return (f"{said}; pid {', '.join(map(str, left))} still run: kept {plan.pidfile}; run 'fdngx stop "
                f"--inventory {plan.inventory_path}'") + (f"; see {log}" if log else "")
    remove_pidfile(plan.pidfile, sup.pid)
    return said + (f"; see {log}" if log and said else "")


def _stop_supervisor(sup: subprocess.Popen[bytes], plan: Plan, progress: Progress, before: set[int],
                     record: Pidfile | None) -> None:
    if sup.poll() is None:
        progress.say(f"stopping supervisor pid {sup.pid}")
        sup.send_signal(signal.SIGTERM)
        try:
            sup.wait(plan.grace + 15)
        except subprocess.TimeoutExpired:
            sup.kill()
            sup.wait()
    seen = read_pidfile(plan.pidfile)
    if seen is not None and seen.supervisor.pid == sup.pid:
        record = seen
    _leftovers(sup, plan, record, before, progress)


def _raise_interrupt(got: list[int], signum: int, frame: Any) -> None:
    got.append(signum)
    raise KeyboardInterrupt
