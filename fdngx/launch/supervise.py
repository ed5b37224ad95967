"""The supervisor: start the planned processes, wait for health, write the inventory, watch, restart, stop.

Runs inside `fdngx launch` (foreground) or as `python -m fdngx.launch.supervise` reading the plan as JSON on
stdin (`--detach`). multi_api_server never polls its ranks and orphans them on SIGTERM, so fdngx owns
supervision: every process in its own session, stops by process group, and this process is the
subreaper of everything below it so nothing escapes to init. Children and how they are stopped:
fdngx.launch.children; what a death sets off: fdngx.launch.deaths; the inventory and pidfile writes:
fdngx.launch.books; running ranks lost or back: fdngx.launch.ranks; the pidfile record: fdngx.launch.pidfile;
the lock held for its life: fdngx.launch.lock.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, TextIO

from fdngx.engines import spec as engine_spec
from fdngx.engines.argv import RANK_PRIVATE_ENV
from fdngx.errors import FdngxError, LaunchError, os_error_line
from fdngx.launch.books import INVENTORY, PIDFILE, Books
from fdngx.launch.children import Child, remember_trees, stop_every
from fdngx.launch.deaths import Deaths
from fdngx.launch.handshake import STOP_MARGIN, Reporter, asked_grace
from fdngx.launch.pidfile import LIVE, ChildState, LaunchState, remove_pidfile
from fdngx.launch.plan import Plan
from fdngx.launch.probe import Health, HealthState, foreign_listener, health_all, probe_host
from fdngx.launch.progress import Progress
from fdngx.launch.ranks import PROBE_EVERY, Ranks, Watch
from fdngx.system import procs

POLL = 0.25


class Supervisor(Books, Deaths, Ranks):
    def __init__(self, plan: Plan, out: TextIO | None = None, detached: bool = False,
                 reporter: Reporter | None = None) -> None:
        self.plan = plan
        self.out = out or sys.stderr
        self.detached = detached
        self.reporter = reporter or Reporter()  # a detached parent's pipe (fdngx.launch.handshake)
        self.children = [Child(s) for s in plan.procs]
        # What each instance's last probe saw, as people read it (progress, pidfile); `healthy` is the typed truth.
        self.status = {i.name: "starting" for i in plan.inventory.instances}
        self.healthy: set[str] = set()
        self.by_name = plan.inventory.by_name()
        self.health_path = engine_spec(plan.engine).health_path
        self.progress = Progress(list(self.status), self.out, plan.timeout)
        self.stop_signal: int | None = None
        self.watch = {name: Watch() for name in self.status}
        self.down: set[str] = set()
        self.inventory_written = False
        self.lockless_said = False  # said once that the inventory was written without its lock
        self.stopped = False
        self.state = LaunchState.STARTING
        self.clock = time.monotonic
        self._init_books()

    # -- signals and bookkeeping -------------------------------------------------------------------------

    def _on_signal(self, signum: int, frame: Any) -> None:
        # Only set a flag: the loops notice within POLL seconds; raising here could cut a Popen in half.
        self.stop_signal = signum

    def _install_signals(self) -> dict[int, Any]:
        """SIGTERM always stops; SIGINT and SIGHUP too, unless they were ignored when fdngx started: `nohup`
        ignores SIGHUP and a script's `cmd &` SIGINT, so that a hang-up or a Ctrl-C meant for the shell does
        not stop the job (the Unix convention); such a signal stays ignored, and that is said."""
        sigs = [signal.SIGINT, signal.SIGTERM] + ([] if self.detached else [signal.SIGHUP])
        old = {}
        for sig in sigs:
            if sig != signal.SIGTERM and signal.getsignal(sig) is signal.SIG_IGN:
                old[sig] = signal.SIG_IGN
                self.progress.say(f"{signal.Signals(sig).name} was ignored when fdngx started (nohup, or a "
                                  "background job): it stays ignored; SIGTERM stops the replicas (fdngx stop "
                                  f"--inventory {self.plan.inventory_path})")
                continue
            old[sig] = signal.signal(sig, self._on_signal)
        if self.detached:
            # No terminal to hang up on; a stray SIGHUP must not take the replicas down.
            old[signal.SIGHUP] = signal.signal(signal.SIGHUP, signal.SIG_IGN)
        return old

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
        shell reports it); after that SIGTERM is the normal way to stop (0) and Ctrl-C exits 130.
        Nothing but a failed start or a stop signal stops the replicas: not a file it cannot write, not a
        process it cannot start on a restart, not a terminal gone (fdngx.launch.books, .output)."""
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
                if (why := self._start(c)) is not None:
                    raise self._fail(c, f"cannot start {c.spec.name}: {why}")
                self._pidfile(LaunchState.STARTING)  # at once: `fdngx stop` and a detached parent need its pid
            if self._wait_healthy():
                ready = True
                self._inventory()
                self._pidfile(LaunchState.READY)
                pids = ", ".join(f"{c.spec.name} pid {c.pid}" for c in self.children if c.popen)
                where = (f"inventory {self.plan.inventory_path} not written yet" if INVENTORY in self.dirty
                         else f"inventory written to {self.plan.inventory_path}")
                self.progress.say(f"all {len(self.status)} replica(s) healthy ({pids}); {where}")
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

    def _start(self, c: Child) -> str | None:
        """Start `c`; None, or why it could not be started (its log not writable, fork: EAGAIN, EMFILE)."""
        c.tree.clear()
        header = f"starting {c.spec.name}: {c.spec.command_line()}"
        try:
            c.popen = procs.start(c.spec.argv, c.spec.env, Path(c.spec.log), header, death_signal=c.death_signal,
                                  unset=RANK_PRIVATE_ENV)
        except (OSError, subprocess.SubprocessError) as exc:
            return os_error_line(exc) if isinstance(exc, OSError) else str(exc)
        c.start = procs.starttime(c.popen.pid)
        c.state, c.started_at, c.healthy_at, c.exit_code = ChildState.STARTING, time.monotonic(), None, None
        for name in c.spec.instances:
            self.status[name] = "starting"
            self.healthy.discard(name)
        return None

    def _probe(self, children: list[Child]) -> dict[str, str]:
        """Probe, all at once, the instances of `children` not healthy yet. One answering 200 on a port that
        another process listens on too is not marked healthy: returns {its name: why it is not ours}."""
        ports = {n: self.by_name[n].port for c in children for n in c.spec.instances if n not in self.healthy}
        seen = health_all(self.plan.bind_host, ports, self.health_path)
        foreign = {}
        for c in children:
            for name in (n for n in c.spec.instances if n in seen):
                h = seen[name]
                where = h.peer or probe_host(self.plan.bind_host)
                if h.ok and (who := foreign_listener(where, ports[name], c.own_pids())) is not None:
                    foreign[name] = (f"port {ports[name]} answers /health but is held by {who}, not by "
                                     f"{c.spec.name} (pid {c.pid}) or its processes")
                    h = Health(HealthState.ERROR, detail=f"port held by {who}")
                self._note(name, h)
        return foreign

    def _fail(self, c: Child, msg: str) -> LaunchError:
        """Print the failing child's log tail, record the failure for a detached parent, build the error."""
        log_tail = procs.tail(c.spec.log)
        if not self.detached:
            self.progress.say(f"last lines of {c.spec.log}:")
            self.progress.text(log_tail)
        err = f"{msg}; stopped every replica; full log: {c.spec.log}"
        self._pidfile(LaunchState.FAILED, err, log_tail, c.spec.log)
        return LaunchError(err)

    def _wait_healthy(self) -> bool:
        deadline = time.monotonic() + self.plan.timeout
        last_pidfile = 0.0
        while self.stop_signal is None:
            for c in self.children:
                if (what := c.ended()) is not None:
                    self.status.update({n: what for n in c.spec.instances})
                    self.progress.update(self.status)
                    raise self._fail(c, f"{c.spec.name} (pid {c.pid}) {what} before /health was 200")
            foreign = self._probe(self.children)
            self.progress.update(self.status)
            if foreign:
                name, why = next(iter(foreign.items()))
                raise self._fail(self._owner(name), f"{name}: {why}")
            if all(n in self.healthy for n in self.status):
                remember_trees(self.children)
                for c in self.children:
                    c.state, c.healthy_at = ChildState.RUNNING, time.monotonic()
                return True
            if time.monotonic() > deadline:
                waiting = [n for n in self.status if n not in self.healthy]
                detail = ", ".join(f"{n} ({self.status[n]})" for n in waiting)
                raise self._fail(self._owner(waiting[0]),
                                 f"timed out after {self.plan.timeout:.0f}s waiting for /health on {detail}")
            if time.monotonic() - last_pidfile > 1.0:
                remember_trees(self.children)
                self._pidfile(LaunchState.STARTING)
                last_pidfile = time.monotonic()
            procs.reap(self._popens())
            self._sleep(POLL * 2)
        return False

    def _owner(self, name: str) -> Child:
        return next(c for c in self.children if name in c.spec.instances)

    def _popens(self) -> list[subprocess.Popen[bytes]]:
        return [c.popen for c in self.children if c.popen is not None]

    def _watch(self) -> int:
        """Until a stop signal: report children that die, mark them in the inventory, restart if asked."""
        last_tree = last_probe = 0.0
        while self.stop_signal is None:
            changed = record = False
            now = time.monotonic()
            procs.reap(self._popens())  # workers reparented to us that exited: no zombie until the stop
            if now - last_tree >= 5.0:
                record = remember_trees(self.children)  # new members: `fdngx stop` must know them
                last_tree = now
            for c in self.children:
                changed |= self._check(c, now)
            changed |= self._check_starting(now)
            if now - last_probe >= PROBE_EVERY:
                last_probe = now
                changed |= self._check_ranks(now)
            if changed:
                self.dirty.add(INVENTORY)
            if changed or record:
                self.dirty.add(PIDFILE)
            self._flush()  # and what could not be written before is tried again, every loop
            # EXITED means no restart is coming (restart=no, or a clean exit under on-failure).
            if all(c.state is ChildState.EXITED for c in self.children):
                self.progress.say("every replica has exited; nothing left to supervise")
                return 1
            self._sleep(POLL * 2)
        return 0

    def _check(self, c: Child, now: float) -> bool:
        """A live child that died, or lost a rank as it restarts (a running one's: _check_ranks); a restart due."""
        if c.state in LIVE and c.popen is not None:
            rc = c.popen.poll()
            if rc is not None:
                return self._died(c, rc, now)
            if c.state is ChildState.STARTING and (what := c.lost_rank()) is not None:
                return self._died(c, None, now, why=what)
        if c.state is ChildState.WAITING_RESTART and now >= c.restart_at:
            if not any(o.state is ChildState.STARTING for o in self.children):
                self.progress.begin()  # "still waiting after Ns" counts from this restart
            self.progress.say(f"restarting {c.spec.name} (restart #{c.restarts})")
            if (why := self._start(c)) is not None:
                # A failed attempt like any other: the next one after a longer backoff; never a shutdown.
                c.healthy_at = None
                self.status.update({n: f"cannot start it ({why})" for n in c.spec.instances})
                delay = self._backoff(c)
                self.progress.say(f"{c.spec.name}: cannot start it ({why}); restart in {delay:.0f}s "
                                  "(--restart on-failure)")
                if self.plan.coupled:
                    self._stop_coupled(c)
            return True
        return False

    def _check_starting(self, now: float) -> bool:
        """Restarted children: healthy again, held up by somebody else's server on their port, or too slow."""
        starting = [c for c in self.children if c.state is ChildState.STARTING]
        if not starting:
            return False
        foreign = self._probe(starting)
        self.progress.update(self.status)  # lines as statuses change, and "still waiting" every 30 s
        changed = False
        for c in starting:
            if c.state is not ChildState.STARTING:
                continue  # stopped meanwhile with a coupled rank
            theirs = [foreign[n] for n in c.spec.instances if n in foreign]
            if theirs:
                changed |= self._died(c, None, now, why=f"is not the server on its port: {theirs[0]}")
            elif all(n in self.healthy for n in c.spec.instances):
                c.state, c.healthy_at = ChildState.RUNNING, now
                remember_trees([c])
                self.progress.say(f"{c.spec.name} (pid {c.pid or '?'}) is healthy again")
                changed = True
            elif now - c.started_at > self.plan.timeout:
                self.progress.say(f"{c.spec.name}: not healthy after {self.plan.timeout:.0f}s; stopping it")
                changed |= self._died(c, None, now, why=f"not healthy after {self.plan.timeout:.0f}s")
        return changed

    def _shutdown(self) -> None:
        """Stop every child group and every descendant, whatever group it moved to; nothing said here can fail
        (a broken stream is given up on). A `fdngx stop --grace N` that sent the SIGTERM left N for it
        (fdngx.launch.handshake) and kills what is left after N itself: the wait here is STOP_MARGIN longer."""
        live = [c for c in self.children if c.alive()]  # before the request is taken: stop may kill at once
        grace, by = self.plan.grace, ""
        asked = asked_grace(self.plan.pidfile) if self.stop_signal == signal.SIGTERM else None
        if asked is not None:
            grace, by = asked[0], f", asked by fdngx stop pid {asked[1]}"
        announced: list[int] = []
        def announce(n: int) -> None:
            announced.append(n)
            self.progress.say(f"stopping {n} process group(s) (grace {grace:g}s{by})")

        killed = stop_every(self.children, grace + (STOP_MARGIN if asked else 0), announce)
        if asked is not None and not announced:  # with --grace 0 it may have killed them all already
            self.progress.say(f"nothing left to stop (grace {grace:g}s{by}, which stopped them)")
        # Killed by us, or by that `fdngx stop`: said the same way.
        killed += [c.pid for c in live if c.popen and c.popen.poll() == -signal.SIGKILL and c.pid not in killed]
        if killed:
            self.progress.say(f"killed after the grace period: {', '.join(map(str, killed))}")
        if self.inventory_written:
            self.stopped = True
            self._inventory()

    def _sleep(self, seconds: float) -> None:
        end = time.monotonic() + seconds
        while self.stop_signal is None and (left := end - time.monotonic()) > 0:
            time.sleep(min(0.05, left))


def main() -> None:
    """`python -m fdngx.launch.supervise [--lock-fd N] [--status-fd M]`: the detached supervisor; the plan
    arrives as JSON on stdin, the launch lock (fdngx.launch.lock) as descriptor N, held until this process
    exits; what it records, and its error, go to the parent on descriptor M (fdngx.launch.handshake)."""
    fds = dict(zip(sys.argv[1::2], map(int, sys.argv[2::2]), strict=False))
    for fd in fds.values():
        os.set_inheritable(fd, False)  # kept open; never handed on to an engine
    reporter = Reporter(fds.get("--status-fd"))
    try:
        plan = Plan.from_dict(json.loads(sys.stdin.read()))
        sys.stdin.close()
        code = Supervisor(plan, out=sys.stdout, detached=True, reporter=reporter).run()
    except FdngxError as exc:
        reporter.send({"error": str(exc)}, last=True)
        Progress([], sys.stdout).w.line(f"fdngx: error: {exc}")
        sys.exit(exc.exit_code)
    except Exception as exc:  # the traceback goes to supervisor.log, which may have no room: say it here too
        reporter.send({"error": f"the supervisor failed: {type(exc).__name__}: {exc}"}, last=True)
        raise
    sys.exit(code)


if __name__ == "__main__":
    main()
