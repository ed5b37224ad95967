"""Running ranks, probed every PROBE_EVERY seconds: one that stopped listening, or that has answered /health
with an error status on every probe for --unhealthy-after seconds, is lost: said, marked down in the
inventory, and with --restart on-failure its process restarted (its ranks fail together). A mixin of
fdngx.launch.supervise.Supervisor.

Why the second: a process can outlive the engine it serves. FastDeploy's api_server answers 404 "Worker
Service Not Healthy" once its GPU workers have sent no heartbeat for 30 s (fastdeploy/entrypoints/openai/
api_server.py health(), through EngineClient.check_health(time_interval_threashold=30) in
fastdeploy/entrypoints/engine_client.py), and goes on answering that for ever: it never exits, so a
supervisor that waits for an exit never restarts it. Only error statuses count (4xx/5xx; vLLM's and
SGLang's 503 too): a 304 (FastDeploy's "No model weight enabled", weights cleared on purpose for an update)
and probes that time out (a server too busy to answer in time) do not.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from fdngx.domain import Restart
from fdngx.launch.children import Child
from fdngx.launch.pidfile import ChildState
from fdngx.launch.plan import Plan
from fdngx.launch.probe import Health, HealthState, health_all

# While running, each instance is probed this often; REFUSED_LIMIT refused connections in a row mean the
# rank is gone even though its process group lives (multi_api_server never notices a dead rank).
PROBE_EVERY = 2.0
REFUSED_LIMIT = 3


@dataclass
class Watch:
    """What the probes of one running rank have seen in a row."""

    refused: int = 0  # connections refused in a row
    failing_since: float | None = None  # when an unbroken run of error answers began
    failing: Health | None = None  # the latest of them

    def clear(self) -> None:
        self.refused, self.failing_since, self.failing = 0, None, None

    def see(self, h: Health, now: float) -> None:
        self.refused = self.refused + 1 if h.state is HealthState.NOT_LISTENING else 0
        if h.state is HealthState.HTTP_STATUS and h.status is not None and h.status >= 400:
            self.failing_since = now if self.failing_since is None else self.failing_since
            self.failing = h
        else:
            self.failing_since, self.failing = None, None

    def lost(self, now: float, unhealthy_after: float) -> str | None:
        """Why the rank counts as lost (words after its name), or None while it does not."""
        if self.refused >= REFUSED_LIMIT:
            return f"stopped listening (connection refused {REFUSED_LIMIT} times in a row)"
        if (unhealthy_after > 0 and self.failing_since is not None
                and now - self.failing_since >= unhealthy_after):
            return (f"has answered {self.failing} to /health for {now - self.failing_since:.0f}s "
                    f"(--unhealthy-after {unhealthy_after:g})")
        return None


class Ranks:
    plan: Plan
    children: list[Child]
    by_name: dict[str, Any]
    health_path: str
    watch: dict[str, Watch]
    down: set[str]
    progress: Any  # fdngx.launch.progress.Progress

    # Declared, not defined, so that they never shadow the real ones: Supervisor._note, Deaths._died.
    _note: Callable[[str, Health], None]
    _died: Callable[..., bool]

    def _check_ranks(self, now: float) -> bool:
        """Probe every running process's instances; report and mark the lost ones down, and those back (a 200
        again: --restart no, or a rank that came back by itself) up; restart a process that lost one."""
        running = [c for c in self.children if c.state is ChildState.RUNNING]
        seen = health_all(self.plan.bind_host, {n: self.by_name[n].port for c in running for n in c.spec.instances},
                          self.health_path)
        changed = False
        for c in running:
            if c.state is not ChildState.RUNNING:
                continue  # stopped meanwhile with a coupled rank
            lost: dict[str, str] = {}
            back = []
            for name in c.spec.instances:
                h = seen[name]
                self._note(name, h)
                self.watch[name].see(h, now)
                why = self.watch[name].lost(now, self.plan.unhealthy_after)
                if why is not None and name not in self.down:
                    lost[name] = why
                elif h.ok and name in self.down:
                    back.append(name)
            if back:
                self.down.difference_update(back)
                changed = True
                self.progress.say(f"{', '.join(back)} of {c.spec.name} (pid {c.pid or '?'}) is healthy again "
                                  "(/health answers 200)")
            if not lost:
                continue
            self.down.update(lost)
            changed = True
            for name, why in lost.items():
                self.progress.say(f"{name} of {c.spec.name} (pid {c.pid or '?'}) {why}")
            if self.plan.restart is Restart.ON_FAILURE:
                self._died(c, None, now, why=f"lost {', '.join(lost)}")
        return changed
