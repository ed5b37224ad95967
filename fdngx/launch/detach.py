"""`fdngx launch --detach`: hand the plan to a supervisor in a session of its own, follow it until every
replica is healthy (return) or the start failed (raise), and leave nothing running behind a failed start.

Until the supervisor reports ready this process is a subreaper (fdngx.system.procs.become_subreaper): a
supervisor that dies without cleaning up (SIGKILL, the OOM killer) leaves its replicas to us, not to init,
and they are stopped here, with what its record names, before the launch fails. A replica that ignores its
parent-death signal (a FastDeploy rank busy loading) would otherwise outlive it where `fdngx stop` cannot
find it, and a new launch would start a second copy.

The supervisor reports each state it records, and its last error, over a pipe (fdngx.launch.handshake), not
only in its pidfile and supervisor.log: with no room for those (a full disk) the parent still learns that
the replicas are ready, or why they failed, at once.

The terminal closing (SIGHUP) does not end this process: the supervisor, in a session of its own, carries on,
and so does this one, to the end of the start, so that a supervisor killed meanwhile still has what it left
stopped. Nobody reads the terminal any more: a failed start keeps its error in the pidfile (state failed),
where `fdngx status`, `fdngx stop` and the next `fdngx launch` say it (fdngx.launch.standing).
"""

from __future__ import annotations

import contextlib
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
from fdngx.launch.handshake import Listener
from fdngx.launch.lock import LaunchLock
from fdngx.launch.pidfile import (
    LaunchState,
    Pidfile,
    ProcessRecord,
    read_pidfile,
    remove_pidfile,
    unwritten_lines,
    write_pidfile,
)
from fdngx.launch.plan import Plan
from fdngx.launch.progress import Progress
from fdngx.system import procs


def launch_detached(plan: Plan, out: TextIO, lock: LaunchLock) -> int:
    """Start the supervisor (it inherits the launch lock); follow its reports until ready or failed."""
    log = Path(plan.log_dir) / "supervisor.log"
    progress = Progress([i.name for i in plan.inventory.instances], out, plan.timeout)
    before = set(procs.descendants(os.getpid()))  # ours already: never taken for the supervisor's
    was_subreaper = procs.become_subreaper()
    hangup = _HangUp()
    try:
        sup, listener = _start(plan, log, lock)
        try:
            progress.say(f"supervisor pid {sup.pid} starting {len(plan.procs)} process(es); its log: {log}")
            return _Follow(sup, plan, log, progress, before, listener, hangup).run()
        finally:
            listener.close()
    finally:
        hangup.restore()
        procs.become_subreaper(was_subreaper)


class _HangUp:
    """SIGHUP while following the supervisor (the terminal closed): noted, never the end of this process. One
    ignored when fdngx started (nohup) stays ignored: the output then goes where nohup put it."""

    def __init__(self) -> None:
        self.got = False
        self.said = False
        self.old = signal.getsignal(signal.SIGHUP)
        if self.old is not signal.SIG_IGN:
            signal.signal(signal.SIGHUP, self._on)

    def _on(self, signum: int, frame: Any) -> None:
        self.got = True

    def restore(self) -> None:
        if self.old is not signal.SIG_IGN and self.old is not None:
            signal.signal(signal.SIGHUP, self.old)


def _start(plan: Plan, log: Path, lock: LaunchLock) -> tuple[subprocess.Popen[bytes], Listener]:
    r, w = os.pipe()
    try:
        with open(log, "ab") as fh:
            sup = subprocess.Popen(
                [sys.executable, "-m", "fdngx.launch.supervise", "--lock-fd", str(lock.fd), "--status-fd", str(w)],
                stdin=subprocess.PIPE,
                stdout=fh,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                close_fds=True,
                pass_fds=(lock.fd, w),
            )
    except OSError as exc:
        os.close(r)
        if exc.filename != str(log):
            raise
        raise LaunchError(f"{log}: cannot open the supervisor's log ({exc.strerror}); nothing was started") from None
    finally:
        os.close(w)  # the supervisor's now: the pipe ends when it does
    assert sup.stdin is not None
    sup.stdin.write(json.dumps(plan.to_dict()).encode())
    sup.stdin.close()
    return sup, Listener(r)


class _Follow:
    """The parent's side of the hand-over: what the supervisor reports, until it is ready or gone."""

    def __init__(self, sup: subprocess.Popen[bytes], plan: Plan, log: Path, progress: Progress, before: set[int],
                 listener: Listener, hangup: _HangUp) -> None:
        self.sup, self.plan, self.log, self.progress = sup, plan, log, progress
        self.sup_start = procs.starttime(sup.pid)
        self.before = before
        self.listener = listener
        self.hangup = hangup
        self.record: Pidfile | None = None
        self.error: str | None = None  # its last words, when it failed before it could record them

    def hear(self) -> None:
        for msg in self.listener.poll():
            with contextlib.suppress(LaunchError):
                if "record" in msg:
                    self.record = Pidfile.from_dict(msg["record"], f"supervisor pid {self.sup.pid}'s report")
                    if self.record.instances:
                        self.progress.update(self.record.instances)
            if isinstance(msg.get("error"), str):
                self.error = msg["error"]

    def run(self) -> int:
        got: list[int] = []
        old = signal.signal(signal.SIGTERM, functools.partial(_raise_interrupt, got))
        deadline = time.monotonic() + self.plan.timeout + self.plan.grace + 30
        try:
            while True:
                rc = self.sup.poll()
                self.hear()
                self.hung_up()
                record = self.record
                if rc is None and record is not None and record.state is LaunchState.READY:
                    _ready(self.sup, self.plan, record, self.progress)
                    return 0
                if rc is not None:
                    self.hear()  # what it said before it went
                    raise LaunchError(self.failed(rc))
                if time.monotonic() > deadline:
                    raise LaunchError(f"the supervisor did not report ready in time; stopped it; see {self.log}")
                time.sleep(0.2)
        except KeyboardInterrupt:
            self.stop()
            signum = got[0] if got else signal.SIGINT
            self.progress.say(f"{signal.Signals(signum).name}: stopped the supervisor and every replica before "
                              "they were healthy")
            return 128 + signum
        except LaunchError as exc:
            # Failed while starting: nothing may keep running behind the user's back (a supervisor that exited
            # had what it left stopped in failed()).
            if self.sup.poll() is None:
                self.stop()
            if self.hangup.got:
                self.keep(str(exc))
            raise
        finally:
            signal.signal(signal.SIGTERM, old)

    def failed(self, rc: int) -> str:
        """The supervisor exited before ready: say what it said, stop what it left; the error's words."""
        record = self.record
        if record is not None and record.log_tail:
            self.progress.say(f"last lines of {record.log_file or self.log}:")
            self.progress.text(record.log_tail)
        if rc < 0:  # killed: it stopped nothing
            why = f"the supervisor (pid {self.sup.pid}) {describe_exit(rc)} before every replica was healthy"
        else:
            why = ((record.error if record else None) or self.error
                   or f"the supervisor exited with status {rc}; see {self.log}")
        return why + _leftovers(self.sup, self.plan, record, self.before, self.progress, self.log,
                                keep=self.hangup.got)

    def stop(self) -> None:
        if self.sup.poll() is None:
            self.progress.say(f"stopping supervisor pid {self.sup.pid}")
            self.sup.send_signal(signal.SIGTERM)
            try:
                self.sup.wait(self.plan.grace + 15)
            except subprocess.TimeoutExpired:
                self.sup.kill()
                self.sup.wait()
        self.hear()
        _leftovers(self.sup, self.plan, self.record, self.before, self.progress, keep=self.hangup.got)

    def hung_up(self) -> None:
        if self.hangup.got and not self.hangup.said:
            self.hangup.said = True
            self.progress.say(f"SIGHUP (the terminal hung up): the supervisor (pid {self.sup.pid}) carries on in a "
                              "session of its own, and so does this launch until every replica is healthy or the "
                              f"start fails (then said by 'fdngx status --inventory {self.plan.inventory_path}')")

    def keep(self, why: str) -> None:
        """A failed start after a hang-up: nobody saw the error, so the pidfile keeps it (state failed) for
        `fdngx status`, `fdngx stop` and the next launch. Best effort: what failed may be that very file. Only
        while the pidfile is this supervisor's (or none): the launch lock keeps any other launch out meanwhile."""
        with contextlib.suppress(LaunchError, OSError):
            there = read_pidfile(self.plan.pidfile)
            if there is not None and there.supervisor.pid != self.sup.pid:
                return
            record = self.record or there or Pidfile(
                supervisor=ProcessRecord(self.sup.pid, self.sup_start), state=LaunchState.STARTING, detached=True,
                engine=self.plan.engine, inventory=self.plan.inventory_path, grace=self.plan.grace, children=[],
                instances={}, boot=procs.boot_id())
            record.state, record.error = LaunchState.FAILED, why
            record.unwritten.pop(self.plan.pidfile, None)  # written now, if at all
            write_pidfile(self.plan.pidfile, record)


def _ready(sup: subprocess.Popen[bytes], plan: Plan, record: Pidfile, progress: Progress) -> None:
    # Its output goes to supervisor.log, which nobody reads: what it cannot write is said here.
    for line in unwritten_lines(record):
        progress.say(line)
    inventory = f"inventory {plan.inventory_path}" + (
        " NOT written yet (see above)" if plan.inventory_path in record.unwritten else "")
    if plan.pidfile in record.unwritten:
        where = (f"supervisor pid {sup.pid} (pidfile {plan.pidfile} NOT written yet (see above): until it is, "
                 f"fdngx stop cannot find it; kill -TERM {sup.pid} stops every replica)")
    else:
        where = (f"supervisor pid {sup.pid} (pidfile {plan.pidfile}); stop with: fdngx stop --inventory "
                 f"{plan.inventory_path}")
    progress.say(f"{len(plan.inventory.instances)} replica(s) healthy; {inventory}; {where}")


def _leftovers(sup: subprocess.Popen[bytes], plan: Plan, record: Pidfile | None, before: set[int],
               progress: Progress, log: Path | None = None, keep: bool = False) -> str:
    """The supervisor is gone: stop what it started and left running (its orphans came to us; its record names
    the groups and members). Removes its pidfile when nothing is left, unless `keep`; the words to add to the
    error."""
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
    procs.reap([])  # its orphans that had exited: zombies of ours
    left = sorted({g[0] for g in groups if procs.group_is_ours(g[0], g[1])}
                  | {p for p, s in extra.items() if procs.same_process(p, s)})
    if left:  # kept: `fdngx stop` finds them by it
        how = (f"kept {plan.pidfile}; run 'fdngx stop --inventory {plan.inventory_path}'"
               if Path(plan.pidfile).exists() else f"{plan.pidfile} could not be written: stop them by pid")
        return f"{said}; pid {', '.join(map(str, left))} still run: {how}" + (f"; see {log}" if log else "")
    if not keep:
        remove_pidfile(plan.pidfile, sup.pid)
    return said + (f"; see {log}" if log and said else "")


def _raise_interrupt(got: list[int], signum: int, frame: Any) -> None:
    got.append(signum)
    raise KeyboardInterrupt
