"""The supervisor: start the planned processes, wait for health, write the inventory, watch, restart, stop.

Runs inside `fdngx launch` (foreground) or as `python -m fdngx.launch.supervise` reading the plan as JSON on
stdin (`--detach`). multi_api_server never polls its ranks and orphans them on SIGTERM, so fdngx owns
supervision: every process in its own session, stops by process group, and this process is the
subreaper of everything below it so nothing escapes to init.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from fdngx import inventory as inv_mod
from fdngx.engines import spec as engine_spec
from fdngx.engines.argv import ProcSpec
from fdngx.errors import FdngxError, LaunchError
from fdngx.launch.pidfile import remove_pidfile, write_pidfile
from fdngx.launch.plan import Plan
from fdngx.launch.probe import health
from fdngx.launch.progress import Progress
from fdngx.system import procs

POLL = 0.25
# While running, each instance is probed this often; REFUSED_LIMIT refused connections in a row mean the
# rank is gone even though its process group lives (multi_api_server never notices a dead rank).
PROBE_EVERY = 2.0
REFUSED_LIMIT = 3
# A process that stayed healthy this long before dying starts its backoff over.
BACKOFF_RESET = 300.0
BACKOFF_MAX = 60.0


@dataclass
class Child:
    spec: ProcSpec
    popen: subprocess.Popen[bytes] | None = None
    start: int | None = None
    state: str = "starting"  # starting | running | exited | waiting-restart
    started_at: float = 0.0
    healthy_at: float | None = None
    restarts: int = 0
    restart_at: float = 0.0
    exit_code: int | None = None
    # Descendants seen so far {pid: start time}, refreshed while the child runs (see _remember_trees).
    tree: dict[int, int] = field(default_factory=dict)


def describe_exit(rc: int) -> str:
    if rc < 0:
        with contextlib.suppress(ValueError):
            return f"was killed by {signal.Signals(-rc).name}"
        return f"was killed by signal {-rc}"
    return f"exited with status {rc}"


class Supervisor:
    def __init__(self, plan: Plan, out: TextIO | None = None, detached: bool = False) -> None:
        self.plan = plan
        self.out = out or sys.stderr
        self.detached = detached
        self.children = [Child(s) for s in plan.procs]
        self.status = {i.name: "starting" for i in plan.inventory.instances}
        self.by_name = plan.inventory.by_name()
        self.health_path = engine_spec(plan.engine).health_path
        self.progress = Progress(list(self.status), self.out, plan.timeout)
        self.stop_signal: int | None = None
        self.refused = dict.fromkeys(self.status, 0)
        self.down: set[str] = set()
        self.inventory_written = False
        self.state = "starting"

    # -- signals and bookkeeping -------------------------------------------------------------------------

    def _on_signal(self, signum: int, frame: Any) -> None:
        # Only set a flag: the loops notice within POLL seconds; raising here could cut a Popen in half.
        self.stop_signal = signum

    def _install_signals(self) -> dict[int, Any]:
        sigs = [signal.SIGINT, signal.SIGTERM] + ([] if self.detached else [signal.SIGHUP])
        old = {s: signal.signal(s, self._on_signal) for s in sigs}
        if self.detached:
            # No terminal to hang up on; a stray SIGHUP must not take the replicas down.
            old[signal.SIGHUP] = signal.signal(signal.SIGHUP, signal.SIG_IGN)
        return old

    def _pidfile(self, state: str, error: str | None = None, log_tail: str | None = None, log: str = "") -> None:
        self.state = state
        me = os.getpid()
        data = {
            "supervisor": {"pid": me, "start": procs.starttime(me)},
            "state": state,
            "detached": self.detached,
            "engine": self.plan.engine,
            "inventory": self.plan.inventory_path,
            "grace": self.plan.grace,
            "children": [
                {"name": c.spec.name, "pid": c.popen.pid if c.popen else None, "start": c.start,
                 "stop_signal": c.spec.stop_signal, "instances": c.spec.instances, "state": c.state}
                for c in self.children
            ],
            "instances": self.status,
        }
        if error:
            data.update(error=error, log_tail=log_tail, log_file=log)
        write_pidfile(self.plan.pidfile, data)

    def _write_inventory(self) -> None:
        """Atomically write the inventory with pid/log/status per instance (other edits to the file kept)."""
        ours = {}
        for c in self.children:
            for name in c.spec.instances:
                extra = {"pid": c.popen.pid if c.popen else None, "status": self._inst_state(c, name)}
                if c.exit_code is not None and c.state != "running":
                    extra["exit_code"] = c.exit_code
                ours[name] = extra
        try:
            current = inv_mod.load(self.plan.inventory_path) if self.inventory_written else None
        except FdngxError:
            current = None
        doc = current or self.plan.inventory
        for inst in doc.instances:
            mine = self.by_name.get(inst.name)
            if mine is not None and (inst.host, inst.port) == (mine.host, mine.port):
                inst.extra = {k: v for k, v in inst.extra.items() if k not in ("pid", "status", "exit_code")}
                inst.extra = {"pid": ours[inst.name]["pid"], **inst.extra, **ours[inst.name]}
        inv_mod.save(doc, self.plan.inventory_path)
        self.inventory_written = True

    def _inst_state(self, c: Child, name: str) -> str:
        if self.state == "stopped" and c.state in ("starting", "running"):
            return "stopped"
        if c.state == "running" and name in self.down:
            return "down"
        return {"running": "running", "starting": "starting"}.get(c.state, "exited")

    # -- lifecycle -----------------------------------------------------------------------------------------

    def run(self) -> int:
        """Start and supervise until a stop signal; returns the exit code. Raises LaunchError on a failed start."""
        procs.become_subreaper()
        old = self._install_signals()
        failure: LaunchError | None = None
        code = 0
        try:
            self._pidfile("starting")
            self.progress.say(f"engine {self.plan.engine}: starting {len(self.children)} process(es), "
                              f"waiting up to {self.plan.timeout:.0f}s for {len(self.status)} /health endpoint(s)")
            for c in self.children:
                self._start(c)
            if self._wait_healthy():
                self._write_inventory()
                self._pidfile("ready")
                pids = ", ".join(f"{c.spec.name} pid {c.popen.pid}" for c in self.children if c.popen)
                self.progress.say(f"all {len(self.status)} replica(s) healthy ({pids}); "
                                  f"inventory written to {self.plan.inventory_path}")
                code = self._watch()
        except LaunchError as exc:
            failure = exc
        finally:
            self._shutdown()
            for sig, handler in old.items():
                signal.signal(sig, handler)
        if failure is not None:
            if not self.detached:
                remove_pidfile(self.plan.pidfile, os.getpid())
            raise failure
        remove_pidfile(self.plan.pidfile, os.getpid())
        if self.stop_signal is not None:
            name = signal.Signals(self.stop_signal).name
            self.progress.say(f"{name}: stopped every replica")
            return 130 if self.stop_signal == signal.SIGINT else 0
        return code

    def _start(self, c: Child) -> None:
        c.tree.clear()
        header = f"starting {c.spec.name}: {c.spec.command_line()}"
        c.popen = procs.start(c.spec.argv, c.spec.env, Path(c.spec.log), header)
        c.start = procs.starttime(c.popen.pid)
        c.state, c.started_at, c.healthy_at, c.exit_code = "starting", time.monotonic(), None, None
        for name in c.spec.instances:
            self.status[name] = "starting"

    def _probe(self, c: Child) -> bool:
        """Probe the child's instances that are not healthy yet; True once all of them are."""
        for name in c.spec.instances:
            if self.status[name] != "healthy":
                inst = self.by_name[name]
                _ok, self.status[name] = health(inst.host, inst.port, self.health_path)
        return all(self.status[n] == "healthy" for n in c.spec.instances)

    def _fail(self, c: Child, msg: str) -> LaunchError:
        """Print the failing child's log tail, record the failure for a detached parent, build the error."""
        log_tail = procs.tail(c.spec.log)
        if not self.detached:
            self.progress.say(f"last lines of {c.spec.log}:")
            print(log_tail, file=self.out, flush=True)
        err = f"{msg}; stopped every replica; full log: {c.spec.log}"
        self._pidfile("failed", err, log_tail, c.spec.log)
        return LaunchError(err)

    def _wait_healthy(self) -> bool:
        deadline = time.monotonic() + self.plan.timeout
        last_pidfile = 0.0
        while self.stop_signal is None:
            for c in self.children:
                assert c.popen is not None
                rc = c.popen.poll()
                if rc is not None:
                    self.status.update({n: describe_exit(rc) for n in c.spec.instances})
                    self.progress.update(self.status)
                    raise self._fail(c, f"{c.spec.name} (pid {c.popen.pid}) {describe_exit(rc)} before /health was 200")
            done = [self._probe(c) for c in self.children]
            self.progress.update(self.status)
            if all(done):
                self._remember_trees()
                for c in self.children:
                    c.state, c.healthy_at = "running", time.monotonic()
                return True
            if time.monotonic() > deadline:
                waiting = [n for n, s in self.status.items() if s != "healthy"]
                culprit = next(c for c in self.children if set(c.spec.instances) & set(waiting))
                detail = ", ".join(f"{n} ({self.status[n]})" for n in waiting)
                raise self._fail(culprit, f"timed out after {self.plan.timeout:.0f}s waiting for /health on {detail}")
            if time.monotonic() - last_pidfile > 1.0:
                self._pidfile("starting")
                last_pidfile = time.monotonic()
            self._sleep(POLL * 2)
        return False

    def _watch(self) -> int:
        """Until a stop signal: report children that die, mark them in the inventory, restart if asked."""
        last_tree = last_probe = 0.0
        while self.stop_signal is None:
            changed = False
            now = time.monotonic()
            if now - last_tree >= 5.0:
                self._remember_trees()
                last_tree = now
            for c in self.children:
                changed |= self._check(c, now)
            if now - last_probe >= PROBE_EVERY:
                last_probe = now
                for c in self.children:
                    changed |= self._check_ranks(c, now)
            if changed:
                self._write_inventory()
                self._pidfile("ready")
            # "exited" means no restart is coming (restart=no, or a clean exit under on-failure).
            if all(c.state == "exited" for c in self.children):
                self.progress.say("every replica has exited; nothing left to supervise")
                return 1
            self._sleep(POLL * 2)
        return 0

    def _check(self, c: Child, now: float) -> bool:
        if c.state in ("starting", "running") and c.popen is not None:
            rc = c.popen.poll()
            if rc is not None:
                return self._died(c, rc, now)
        if c.state == "waiting-restart" and now >= c.restart_at:
            self.progress.say(f"restarting {c.spec.name} (restart #{c.restarts})")
            self._start(c)
            return True
        if c.state == "starting":
            if self._probe(c):
                c.state, c.healthy_at = "running", now
                self.progress.say(f"{c.spec.name} (pid {c.popen.pid if c.popen else '?'}) is healthy again")
                return True
            if now - c.started_at > self.plan.timeout:
                self.progress.say(f"{c.spec.name}: not healthy after {self.plan.timeout:.0f}s; stopping it")
                return self._died(c, None, now, why=f"not healthy after {self.plan.timeout:.0f}s")
        return False

    def _check_ranks(self, c: Child, now: float) -> bool:
        """A running process whose instance stopped listening has lost that rank: report it, mark it down,
        and with --restart on-failure restart the whole process (its ranks fail together)."""
        if c.state != "running":
            return False
        lost = []
        for name in c.spec.instances:
            inst = self.by_name[name]
            ok, what = health(inst.host, inst.port, self.health_path)
            self.refused[name] = self.refused[name] + 1 if what == "not listening yet" else 0
            self.status[name] = "healthy" if ok else what
            if self.refused[name] >= REFUSED_LIMIT and name not in self.down:
                lost.append(name)
        if not lost:
            return False
        self.down.update(lost)
        self.progress.say(f"{', '.join(lost)} of {c.spec.name} (pid {c.popen.pid if c.popen else '?'}) stopped "
                          f"listening (connection refused {REFUSED_LIMIT} times in a row)")
        if self.plan.restart == "on-failure":
            return self._died(c, None, now, why=f"lost {', '.join(lost)}")
        return True

    def _died(self, c: Child, rc: int | None, now: float, why: str | None = None) -> bool:
        pid = c.popen.pid if c.popen else "?"
        # Ranks of multi_api_server (and sim processes) live and die together: clear the whole group.
        self._stop_child(c)
        if rc is None and c.popen is not None:
            rc = c.popen.returncode
        c.exit_code = rc
        for name in c.spec.instances:
            self.status[name] = why or describe_exit(rc if rc is not None else -9)
            self.down.discard(name)
            self.refused[name] = 0
        self.progress.say(f"{c.spec.name} (pid {pid}, serving {', '.join(c.spec.instances)}) "
                          f"{why or self.status[c.spec.instances[0]]}; last lines of {c.spec.log}:")
        print(procs.tail(c.spec.log, 10), file=self.out, flush=True)
        # on-failure, as in Docker/systemd: a clean exit (status 0) was asked for by someone; leave it.
        if self.plan.restart == "on-failure" and (why is not None or rc != 0):
            if c.healthy_at is not None and now - c.healthy_at >= BACKOFF_RESET:
                c.restarts = 0
            delay = min(BACKOFF_MAX, 2.0**c.restarts)
            c.restarts += 1
            c.state, c.restart_at = "waiting-restart", now + delay
            self.progress.say(f"{c.spec.name}: restart in {delay:.0f}s (--restart on-failure)")
        else:
            c.state = "exited"
        return True

    def _stop_child(self, c: Child) -> None:
        if c.popen is None:
            return
        if c.popen.poll() is None:
            c.tree.update(procs.descendants(c.popen.pid))
        # Members of its group (even reparented ones) and every descendant we saw, verified by start time.
        mine = {p: s for p, s in procs.descendants(os.getpid()).items() if _pgid(p) == c.popen.pid}
        mine.update(c.tree)
        procs.stop_all([(c.popen.pid, c.start or 0, c.spec.stop_signal)], [c.popen], self.plan.grace, mine)
        c.tree.clear()

    def _shutdown(self) -> None:
        """Stop every child group and every descendant, whatever group it moved to."""
        live = [c for c in self.children if c.popen is not None]
        if not live:
            return
        snapshot = procs.descendants(os.getpid())
        groups = [(c.popen.pid, c.start or 0, c.spec.stop_signal) for c in live if c.popen is not None]
        popens = [c.popen for c in live if c.popen is not None]
        if any(c.popen.poll() is None for c in live if c.popen is not None) or snapshot:
            self.progress.say(f"stopping {len(groups)} process group(s) (grace {self.plan.grace:.0f}s)")
        killed = procs.stop_all(groups, popens, self.plan.grace, snapshot)
        if killed:
            self.progress.say(f"killed after the grace period: {', '.join(map(str, killed))}")
        if self.inventory_written:
            self.state = "stopped"
            with contextlib.suppress(FdngxError, OSError):
                self._write_inventory()

    def _sleep(self, seconds: float) -> None:
        end = time.monotonic() + seconds
        while self.stop_signal is None and (left := end - time.monotonic()) > 0:
            time.sleep(min(0.05, left))

    def _remember_trees(self) -> None:
        """Note each child's descendants: once a leader dies its workers reparent to us and the link is lost,
        and FastDeploy starts its GPU workers in sessions of their own, outside the child's group."""
        for c in self.children:
            if c.popen is not None and c.popen.poll() is None:
                c.tree.update(procs.descendants(c.popen.pid))


def _pgid(pid: int) -> int | None:
    try:
        return os.getpgid(pid)
    except OSError:
        return None


def main() -> None:
    """`python -m fdngx.launch.supervise`: the detached supervisor; the plan arrives as JSON on stdin."""
    plan = Plan.from_dict(json.loads(sys.stdin.read()))
    sys.stdin.close()
    try:
        code = Supervisor(plan, out=sys.stdout, detached=True).run()
    except FdngxError as exc:
        print(f"fdngx: error: {exc}", flush=True)
        sys.exit(exc.exit_code)
    sys.exit(code)


if __name__ == "__main__":
    main()
