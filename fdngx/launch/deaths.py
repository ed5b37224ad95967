"""What the supervisor does when a child dies: stop what is left of it, say so, schedule its restart, and
take the ranks coupled with it along. A mixin of fdngx.launch.supervise.Supervisor."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from fdngx.domain import Restart
from fdngx.launch.children import Child, describe_exit, stop_child
from fdngx.launch.pidfile import LIVE, ChildState
from fdngx.launch.plan import Plan
from fdngx.launch.ranks import Watch
from fdngx.system import procs

# A process that stayed healthy this long before dying starts its backoff over.
BACKOFF_RESET = 300.0
BACKOFF_MAX = 60.0


class Deaths:
    plan: Plan
    children: list[Child]
    status: dict[str, str]
    healthy: set[str]
    down: set[str]
    watch: dict[str, Watch]
    progress: Any  # fdngx.launch.progress.Progress
    clock: Callable[[], float]

    def _died(self, c: Child, rc: int | None, now: float, why: str | None = None) -> bool:
        pid = c.pid or "?"
        # Ranks of multi_api_server (and sim processes) live and die together: clear the whole group, and
        # whatever of its earlier runs reparented to us.
        stop_child(c, self.plan.grace, self.children)
        if rc is None and c.popen is not None:
            rc = c.popen.returncode
        c.exit_code = rc
        for name in c.spec.instances:
            self.status[name] = why or describe_exit(rc if rc is not None else -9)
            self.healthy.discard(name)
            self.down.discard(name)
            self.watch[name].clear()
        self.progress.say(f"{c.spec.name} (pid {pid}, serving {', '.join(c.spec.instances)}) "
                          f"{why or self.status[c.spec.instances[0]]}; last lines of {c.spec.log}:")
        self.progress.text(procs.tail(c.spec.log, 10))
        # on-failure, as in Docker/systemd: a clean exit (status 0) was asked for by someone; leave it (unless
        # the engine exits 0 on a failure too).
        if self.plan.restart is Restart.ON_FAILURE and (why is not None or rc != 0 or c.spec.exit_0_fails):
            if c.healthy_at is not None and now - c.healthy_at >= BACKOFF_RESET:
                c.restarts = 0
            delay = self._backoff(c)
            self.progress.say(f"{c.spec.name}: restart in {delay:.0f}s (--restart on-failure)")
        else:
            c.state = ChildState.EXITED
        if self.plan.coupled:
            self._stop_coupled(c)
        return True

    def _backoff(self, c: Child) -> float:
        """Schedule the next restart: 1, 2, 4 .. 60 s from now (after the stop, which may have taken the grace)."""
        delay = min(BACKOFF_MAX, 2.0**c.restarts)
        c.restarts += 1
        c.state, c.restart_at = ChildState.WAITING_RESTART, self.clock() + delay
        return delay

    def _stop_coupled(self, dead: Child) -> None:
        """Ranks of one data-parallel group in separate processes (vLLM's external load balancing) cannot run
        without each other (collectives wait for every rank): stop the others, restart them with it."""
        others = [o for o in self.children if o is not dead and o.state in LIVE]
        if not others:
            return
        self.progress.say(f"stopping {', '.join(o.spec.name for o in others)}: ranks of one data-parallel "
                          f"group cannot run without {dead.spec.name}")
        started = self.clock()
        for o in others:
            stop_child(o, self.plan.grace, self.children)
        dead.restart_at += self.clock() - started  # the backoff counts from the end of these stops too
        for o in others:
            o.exit_code = o.popen.returncode if o.popen is not None else None
            o.state, o.restart_at, o.restarts = dead.state, dead.restart_at, dead.restarts
            for name in o.spec.instances:
                self.status[name] = f"stopped with {dead.spec.name}"
                self.healthy.discard(name)
                self.down.discard(name)
                self.watch[name].clear()

