"""The supervisor: start the planned processes, wait for health, write the inventory, watch, restart, stop.

Runs inside `fdngx launch` (foreground) or as `python -m fdngx.launch.supervise` reading the plan as JSON on
stdin (`--detach`). multi_api_server never polls its ranks and orphans them on SIGTERM, so fdngx owns
supervision: every process in its own session, stops by process group, and this process is the
subreaper of everything below it so nothing escapes to init. Children and how they are stopped:
fdngx.launch.children; the pidfile record: fdngx.launch.pidfile.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any, TextIO

from fdngx import inventory as inv_mod
from fdngx.domain import Restart
from fdngx.engines import spec as engine_spec
from fdngx.engines.argv import RANK_PRIVATE_ENV
from fdngx.errors import FdngxError, LaunchError, os_error_line
from fdngx.launch.children import Child, describe_exit, remember_trees, stop_child, stop_every
from fdngx.launch.pidfile import ChildState, LaunchState, Pidfile, ProcessRecord, remove_pidfile, write_pidfile
from fdngx.launch.plan import Plan
from fdngx.launch.probe import Health, HealthState, health
from fdngx.launch.progress import Progress
from fdngx.system import procs
from fdngx.system.files import file_lock

POLL = 0.25
# While running, each instance is probed this often; REFUSED_LIMIT refused connections in a row mean the
# rank is gone even though its process group lives (multi_api_server never notices a dead rank).
PROBE_EVERY = 2.0
REFUSED_LIMIT = 3
# A process that stayed healthy this long before dying starts its backoff over.
BACKOFF_RESET = 300.0
BACKOFF_MAX = 60.0
_LIVE = (ChildState.STARTING, ChildState.RUNNING)


class Supervisor:
    def __init__(self, plan: Plan, out: TextIO | None = None, detached: bool = False) -> None:
        self.plan = plan
        self.out = out or sys.stderr
        self.detached = detached
        self.children = [Child(s) for s in plan.procs]
        # What each instance's last probe saw, as people read it (progress, pidfile); `healthy` is the typed truth.
        self.status = {i.name: "starting" for i in plan.inventory.instances}
        self.healthy: set[str] = set()
        self.by_name = plan.inventory.by_name()
        self.health_path = engine_spec(plan.engine).health_path
        self.progress = Progress(list(self.status), self.out, plan.timeout)
        self.stop_signal: int | None = None
        self.refused = dict.fromkeys(self.status, 0)
        self.down: set[str] = set()
        self.inventory_written = False
        self.lockless_said = False  # said once that the inventory was written without its lock
        self.stopped = False
        self.state = LaunchState.STARTING

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

    def _pidfile(self, state: LaunchState, error: str | None = None, log_tail: str | None = None,
                 log: str | None = None) -> None:
        self.state = state
        me = os.getpid()
        record = Pidfile(
            supervisor=ProcessRecord(me, procs.starttime(me)), state=state, detached=self.detached,
            engine=self.plan.engine, inventory=self.plan.inventory_path, grace=self.plan.grace,
            children=[c.record() for c in self.children], instances=dict(self.status),
            error=error, log_tail=log_tail, log_file=log,
        )
        write_pidfile(self.plan.pidfile, record)

    def _write_inventory(self) -> None:
        """Atomically write the inventory with pid/log/status per instance, other edits kept, under its lock."""
        with contextlib.ExitStack() as stack:
            # A lock another user made (root ran `fdngx drain`), or held too long: write without it, as before.
            try:
                stack.enter_context(file_lock(inv_mod.lock_path(self.plan.inventory_path), timeout=5.0))
            except (OSError, FdngxError) as exc:
                if not self.lockless_said:  # once: a drain in that same moment could be lost
                    self.lockless_said = True
                    self.progress.say(f"{os_error_line(exc) if isinstance(exc, OSError) else exc}: writing "
                                      f"{self.plan.inventory_path} without the inventory lock; a `fdngx drain` at "
                                      "the same moment could be lost (run fdngx drain as this user)")
            self._rewrite_inventory()

    def _rewrite_inventory(self) -> None:
        ours = {}
        for c in self.children:
            for name in c.spec.instances:
                extra: dict[str, Any] = {"pid": c.pid, "status": self._inst_state(c, name)}
                if c.exit_code is not None and c.state is not ChildState.RUNNING:
                    extra["exit_code"] = c.exit_code
                ours[name] = extra
        try:
            current = inv_mod.load(self.plan.inventory_path)  # the first time: an old launch's, if any
        except FdngxError:
            current = None
        doc = current if self.inventory_written and current else self.plan.inventory
        if not self.inventory_written and current is not None:
            # A new launch over an old inventory: a replica drained there (same name, same address) stays drained.
            was = {(i.name, i.host, i.port) for i in current.instances if i.drain}
            for inst in doc.instances:
                if (inst.name, inst.host, inst.port) in was and not inst.drain:
                    inst.drain = True
                    self.progress.say(f"{inst.name} stays drained, as the old inventory had it "
                                      f"(`fdngx drain {inst.name} --undo` puts it back)")
        for inst in doc.instances:
            mine = self.by_name.get(inst.name)
            if mine is not None and (inst.host, inst.port) == (mine.host, mine.port):
                inst.extra = {k: v for k, v in inst.extra.items() if k not in ("pid", "status", "exit_code")}
                inst.extra = {"pid": ours[inst.name]["pid"], **inst.extra, **ours[inst.name]}
        inv_mod.save(doc, self.plan.inventory_path)
        self.inventory_written = True

    def _inst_state(self, c: Child, name: str) -> str:
        if self.stopped and c.state in _LIVE:
            return "stopped"
        if c.state is ChildState.RUNNING and name in self.down:
            return "down"
        return {ChildState.RUNNING: "running", ChildState.STARTING: "starting"}.get(c.state, "exited")

    def _note(self, name: str, h: Health) -> None:
        self.status[name] = str(h)
        if h.ok:
            self.healthy.add(name)
        else:
            self.healthy.discard(name)

    # -- lifecycle -----------------------------------------------------------------------------------------

    def run(self) -> int:
        """Start and supervise until a stop signal; returns the exit code. Raises LaunchError on a failed start.
        A stop signal before every replica is healthy exits 128 + the signal (nothing was launched, as a
        shell reports it); after that SIGTERM is the normal way to stop (0) and Ctrl-C exits 130."""
        procs.become_subreaper()
        old = self._install_signals()
        failure: LaunchError | None = None
        code = 0
        ready = False
        try:
            self._pidfile(LaunchState.STARTING)
            self.progress.say(f"engine {self.plan.engine}: starting {len(self.children)} process(es), "
                              f"waiting up to {self.plan.timeout:.0f}s for {len(self.status)} /health endpoint(s)")
            for var in RANK_PRIVATE_ENV:
                if var in os.environ:
                    self.progress.say(f"{var}={os.environ[var]} is not passed to the replicas: shared by every "
                                      "rank it would add up their metrics; each engine makes its own")
            for c in self.children:
                self._start(c)
            if self._wait_healthy():
                ready = True
                self._write_inventory()
                self._pidfile(LaunchState.READY)
                pids = ", ".join(f"{c.spec.name} pid {c.pid}" for c in self.children if c.popen)
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
            if not ready:
                self.progress.say(f"{name} before every replica was healthy: stopped every replica; "
                                  "no inventory written")
                return 128 + self.stop_signal
            self.progress.say(f"{name}: stopped every replica")
            return 130 if self.stop_signal == signal.SIGINT else 0
        return code

    def _start(self, c: Child) -> None:
        c.tree.clear()
        header = f"starting {c.spec.name}: {c.spec.command_line()}"
        c.popen = procs.start(c.spec.argv, c.spec.env, Path(c.spec.log), header, death_signal=c.death_signal,
                              unset=RANK_PRIVATE_ENV)
        c.start = procs.starttime(c.popen.pid)
        c.state, c.started_at, c.healthy_at, c.exit_code = ChildState.STARTING, time.monotonic(), None, None
        for name in c.spec.instances:
            self.status[name] = "starting"
            self.healthy.discard(name)

    def _probe(self, c: Child) -> bool:
        """Probe the child's instances that are not healthy yet; True once all of them are."""
        for name in c.spec.instances:
            if name not in self.healthy:
                self._note(name, health(self.plan.bind_host, self.by_name[name].port, self.health_path))
        return all(n in self.healthy for n in c.spec.instances)

    def _fail(self, c: Child, msg: str) -> LaunchError:
        """Print the failing child's log tail, record the failure for a detached parent, build the error."""
        log_tail = procs.tail(c.spec.log)
        if not self.detached:
            self.progress.say(f"last lines of {c.spec.log}:")
            print(log_tail, file=self.out, flush=True)
        err = f"{msg}; stopped every replica; full log: {c.spec.log}"
        self._pidfile(LaunchState.FAILED, err, log_tail, c.spec.log)
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
                remember_trees(self.children)
                for c in self.children:
                    c.state, c.healthy_at = ChildState.RUNNING, time.monotonic()
                return True
            if time.monotonic() > deadline:
                waiting = [n for n in self.status if n not in self.healthy]
                culprit = next(c for c in self.children if set(c.spec.instances) & set(waiting))
                detail = ", ".join(f"{n} ({self.status[n]})" for n in waiting)
                raise self._fail(culprit, f"timed out after {self.plan.timeout:.0f}s waiting for /health on {detail}")
            if time.monotonic() - last_pidfile > 1.0:
                remember_trees(self.children)
                self._pidfile(LaunchState.STARTING)
                last_pidfile = time.monotonic()
            self._sleep(POLL * 2)
        return False

    def _watch(self) -> int:
        """Until a stop signal: report children that die, mark them in the inventory, restart if asked."""
        last_tree = last_probe = 0.0
        while self.stop_signal is None:
            changed = record = False
            now = time.monotonic()
            if now - last_tree >= 5.0:
                record = remember_trees(self.children)  # new members: `fdngx stop` must know them
                last_tree = now
            for c in self.children:
                changed |= self._check(c, now)
            if now - last_probe >= PROBE_EVERY:
                last_probe = now
                for c in self.children:
                    changed |= self._check_ranks(c, now)
            if changed:
                self._write_inventory()
            if changed or record:
                self._pidfile(LaunchState.READY)
            # EXITED means no restart is coming (restart=no, or a clean exit under on-failure).
            if all(c.state is ChildState.EXITED for c in self.children):
                self.progress.say("every replica has exited; nothing left to supervise")
                return 1
            self._sleep(POLL * 2)
        return 0

    def _check(self, c: Child, now: float) -> bool:
        if c.state in _LIVE and c.popen is not None:
            rc = c.popen.poll()
            if rc is not None:
                return self._died(c, rc, now)
        if c.state is ChildState.WAITING_RESTART and now >= c.restart_at:
            self.progress.say(f"restarting {c.spec.name} (restart #{c.restarts})")
            self._start(c)
            return True
        if c.state is ChildState.STARTING:
            if self._probe(c):
                c.state, c.healthy_at = ChildState.RUNNING, now
                self.progress.say(f"{c.spec.name} (pid {c.pid or '?'}) is healthy again")
                return True
            if now - c.started_at > self.plan.timeout:
                self.progress.say(f"{c.spec.name}: not healthy after {self.plan.timeout:.0f}s; stopping it")
                return self._died(c, None, now, why=f"not healthy after {self.plan.timeout:.0f}s")
        return False

    def _check_ranks(self, c: Child, now: float) -> bool:
        """A running process whose instance stopped listening has lost that rank: report it, mark it down,
        and with --restart on-failure restart the whole process (its ranks fail together)."""
        if c.state is not ChildState.RUNNING:
            return False
        lost = []
        for name in c.spec.instances:
            h = health(self.plan.bind_host, self.by_name[name].port, self.health_path)
            self._note(name, h)
            self.refused[name] = self.refused[name] + 1 if h.state is HealthState.NOT_LISTENING else 0
            if self.refused[name] >= REFUSED_LIMIT and name not in self.down:
                lost.append(name)
        if not lost:
            return False
        self.down.update(lost)
        self.progress.say(f"{', '.join(lost)} of {c.spec.name} (pid {c.pid or '?'}) stopped "
                          f"listening (connection refused {REFUSED_LIMIT} times in a row)")
        if self.plan.restart is Restart.ON_FAILURE:
            return self._died(c, None, now, why=f"lost {', '.join(lost)}")
        return True

    def _died(self, c: Child, rc: int | None, now: float, why: str | None = None) -> bool:
        pid = c.pid or "?"
        # Ranks of multi_api_server (and sim processes) live and die together: clear the whole group.
        stop_child(c, self.plan.grace)
        if rc is None and c.popen is not None:
            rc = c.popen.returncode
        c.exit_code = rc
        for name in c.spec.instances:
            self.status[name] = why or describe_exit(rc if rc is not None else -9)
            self.healthy.discard(name)
            self.down.discard(name)
            self.refused[name] = 0
        self.progress.say(f"{c.spec.name} (pid {pid}, serving {', '.join(c.spec.instances)}) "
                          f"{why or self.status[c.spec.instances[0]]}; last lines of {c.spec.log}:")
        print(procs.tail(c.spec.log, 10), file=self.out, flush=True)
        # on-failure, as in Docker/systemd: a clean exit (status 0) was asked for by someone; leave it.
        if self.plan.restart is Restart.ON_FAILURE and (why is not None or rc != 0):
            if c.healthy_at is not None and now - c.healthy_at >= BACKOFF_RESET:
                c.restarts = 0
            delay = min(BACKOFF_MAX, 2.0**c.restarts)
            c.restarts += 1
            c.state, c.restart_at = ChildState.WAITING_RESTART, now + delay
            self.progress.say(f"{c.spec.name}: restart in {delay:.0f}s (--restart on-failure)")
        else:
            c.state = ChildState.EXITED
        if self.plan.coupled:
            self._stop_coupled(c)
        return True

    def _stop_coupled(self, dead: Child) -> None:
        """Ranks of one data-parallel group in separate processes (vLLM's external load balancing) cannot run
        without each other (collectives wait for every rank): stop the others, restart them with it."""
        others = [o for o in self.children if o is not dead and o.state in _LIVE]
        if not others:
            return
        self.progress.say(f"stopping {', '.join(o.spec.name for o in others)}: ranks of one data-parallel "
                          f"group cannot run without {dead.spec.name}")
        for o in others:
            stop_child(o, self.plan.grace)
            o.exit_code = o.popen.returncode if o.popen is not None else None
            o.state, o.restart_at, o.restarts = dead.state, dead.restart_at, dead.restarts
            for name in o.spec.instances:
                self.status[name] = f"stopped with {dead.spec.name}"
                self.healthy.discard(name)
                self.down.discard(name)
                self.refused[name] = 0

    def _shutdown(self) -> None:
        """Stop every child group and every descendant, whatever group it moved to."""
        killed = stop_every(self.children, self.plan.grace, lambda n: self.progress.say(
            f"stopping {n} process group(s) (grace {self.plan.grace:.0f}s)"))
        if killed:
            self.progress.say(f"killed after the grace period: {', '.join(map(str, killed))}")
        if self.inventory_written:
            self.stopped = True
            with contextlib.suppress(FdngxError, OSError):
                self._write_inventory()

    def _sleep(self, seconds: float) -> None:
        end = time.monotonic() + seconds
        while self.stop_signal is None and (left := end - time.monotonic()) > 0:
            time.sleep(min(0.05, left))


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
