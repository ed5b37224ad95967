"""What the registry says when a registered instance's registration changes (its version, is_paused, device
ids, metrics port, ...): one INFO line per periodic check for all the instances that changed in it, not one
line per change. FastDeploy posts every 5 s, so an instance flapping is_paused or its version wrote a line
per heartbeat, and a fleet of them buried the joins and leaves. Those keep a line each (fdngx.registry.core);
a check in which one instance alone changed says it in full: what changed, how often, where its metrics are.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger("fdngx.registry")


def changed_fields(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[str]:
    """The fields that differ between two inventory entries: top-level ones by name, the FastDeploy fields
    (under "fastdeploy") by theirs."""
    out: list[str] = []
    for key in dict.fromkeys([*new, *old]):
        was, now = old.get(key), new.get(key)
        if was == now:
            continue
        if key == "fastdeploy" and isinstance(was, dict) and isinstance(now, dict):
            out.extend(k for k in dict.fromkeys([*now, *was]) if was.get(k) != now.get(k))
        else:
            out.append(key)
    return out


@dataclass
class _Changed:
    times: int = 0
    fields: dict[str, None] = field(default_factory=dict)  # an ordered set
    metrics: str = ""  # where its metrics are after the last change


class Changes:
    """The changes since the last say(), per instance name. Not locked: the registry calls it under its lock."""

    def __init__(self) -> None:
        self._changed: dict[str, _Changed] = {}
        self._since: float | None = None  # the last say(), or the first change before any

    def add(self, name: str, old: Mapping[str, Any], new: Mapping[str, Any], now: float) -> None:
        """One accepted change of a registered instance's entry, from `old` to `new` (written)."""
        if self._since is None:
            self._since = now
        entry = self._changed.setdefault(name, _Changed())
        entry.times += 1
        entry.fields.update(dict.fromkeys(changed_fields(old, new)))
        entry.metrics = f"metrics port {new.get('metrics_port')} from {new.get('metrics_source')}"

    def say(self, now: float, shown: int = 5) -> None:
        """One INFO line for the changes since the last call (each periodic check's end), if there were any."""
        changed, self._changed = self._changed, {}
        since, self._since = self._since, now
        if not changed:
            return
        span = f"{now - (now if since is None else since):.0f} s"
        if len(changed) == 1:
            [(name, one)] = changed.items()
            times = f" {one.times} times in {span}" if one.times > 1 else ""
            log.info("registry: %s updated%s (%s; %s)", name, times, ", ".join(one.fields) or "no field", one.metrics)
            return
        fields = dict.fromkeys(f for c in changed.values() for f in c.fields)
        names = ", ".join(list(changed)[:shown]) + (f" and {len(changed) - shown} more" if len(changed) > shown else "")
        log.info("registry: %d registered instances updated in %s (%d changes: %s): %s", len(changed), span,
                 sum(c.times for c in changed.values()), ", ".join(fields), names)
