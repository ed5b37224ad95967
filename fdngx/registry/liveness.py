"""When a registered instance counts as gone: the rule of the registry's periodic check, and what it keeps
per instance address (the last heartbeat, since when /health fails, whether a silence was reported).

FastDeploy's Go router (`fastdeploy/golang_router/internal/manager/health.go`) removes an instance only when
its /health check fails. fdngx waits `--registry-grace` for that, and also removes an instance that has sent
no heartbeat for the grace, but only when its /health has not passed in two checks in a row (it failed or
did not answer in time; one slow answer of a busy instance is not enough), or when the check asks none. A
silent instance whose /health passes is serving: its heartbeats are refused or lost on the way (the registry
busy, --registry-allow, the network), and removing it would turn that into an outage. It is kept, said once
per silence, in one WARNING per check for every instance that fell silent in it (1,024 instances cut off
from the registry at once wrote 1,350 lines in 3 minutes); nothing more is said when heartbeats return. An
accepted heartbeat (the registry's /health probe of it passed) starts both counts over: checks that failed
before it no longer count.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping

from fdngx.registry.metrics_port import Key

log = logging.getLogger("fdngx.registry")
SILENT_MISSES = 2  # checks in a row without a passing /health after which a silent instance goes


class Liveness:
    """Heartbeats and /health answers per instance address, and the verdict. Not locked: the registry calls
    it under its own lock."""

    def __init__(self) -> None:
        self.seen: dict[Key, float] = {}  # last heartbeat
        self.failing: dict[Key, tuple[float, str]] = {}  # failing /health since, why
        self._silence_said: set[Key] = set()  # silent with /health passing: said once per silence
        self.misses: dict[Key, int] = {}  # checks in a row whose /health did not pass
        self._fell_silent: list[tuple[str, float]] = []  # (name, silent s) since the last say_silent()

    def heartbeat(self, key: Key, now: float) -> None:
        """A sign of life, the one place that records it: a registration or heartbeat accepted (it checked
        its own /health to post, and the registry's /health probe of it passed before accepting), or a
        fresh grace after a restart. A new silence counts afresh, and a failing /health starts over:
        misses and "failing since" from before it no longer count."""
        self.seen[key] = now
        self._silence_said.discard(key)
        self.misses.pop(key, None)
        self.failing.pop(key, None)

    def forget(self, key: Key) -> None:
        for table in (self.seen, self.failing, self.misses):
            table.pop(key, None)
        self._silence_said.discard(key)

    def keep_only(self, keys: Iterable[Key]) -> None:
        """Forget every instance not in `keys` (the registered ones in the inventory now): one deleted from
        the file by hand, or removed while a heartbeat of it was on the way, leaves nothing behind."""
        kept = set(keys)
        for key in {*self.seen, *self.failing, *self.misses, *self._silence_said} - kept:
            self.forget(key)

    def judge(self, key: Key, name: str, now: float, grace: float, health: Mapping[Key, str | None] | None,
              drained: bool = False) -> str | None:
        """Record this check's /health answer for `key` (`health`: the answers that came in time, None when
        the check asked none) and return why the instance goes now, or None when it stays."""
        seen = self.seen.setdefault(key, now)
        answered = health is not None and key in health
        why_not = health.get(key) if health is not None else None  # None: passed (when answered)
        if answered and why_not is None:
            self.failing.pop(key, None)
            self.misses.pop(key, None)
        elif health is not None:  # failed, or no answer in time: both count against it
            self.failing.setdefault(key, (now, str(why_not) if answered else "no answer in time"))
            self.misses[key] = self.misses.get(key, 0) + 1
        if drained or grace <= 0:  # drained (`fdngx drain`): silent or failing on purpose; grace 0: never remove
            return None
        silent = now - seen
        if silent > grace and answered and why_not is None:
            if key not in self._silence_said:
                self._silence_said.add(key)
                self._fell_silent.append((name, silent))
            return None
        if silent > grace and (health is None or self.misses.get(key, 0) >= SILENT_MISSES):
            status = why_not if answered else "no answer in time" if health is not None else "not checked"
            return (f"no heartbeat for {silent:.0f} s (--registry-grace {grace:g}) and /health not passing "
                    f"({status})")
        since, why = self.failing.get(key, (now, ""))
        if now - since > grace:
            return f"/health failing for {now - since:.0f} s ({why})"
        return None

    def say_silent(self, shown: int = 5) -> None:
        """One WARNING for the instances judged silent-but-serving since the last call (the check's end)."""
        fell, self._fell_silent = self._fell_silent, []
        if not fell:
            return
        if len(fell) == 1:
            log.warning("registry: %s has sent no heartbeat for %.0f s but its /health passes, so it is kept; its "
                        "heartbeats may be refused or not reaching the registry (busy, --registry-allow, network)",
                        fell[0][0], fell[0][1])
            return
        names = ", ".join(n for n, _ in fell[:shown]) + (f" and {len(fell) - shown} more" if len(fell) > shown else "")
        log.warning("registry: %d instances have sent no heartbeat for %.0f s or more but their /health passes, so "
                    "they are kept (%s); their heartbeats may be refused or not reaching the registry (busy, "
                    "--registry-allow, network)", len(fell), min(s for _, s in fell), names)
