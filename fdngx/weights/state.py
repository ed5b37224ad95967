"""The policy's memory between cycles: per-instance smoothing, health counts, applied weights, the reload
budget. Pure values; fdngx.weights.store keeps them in a file between cron runs and sidecar restarts.

`from_dict` checks the document against this schema: a state file with a wrong type anywhere is
refused as a whole (ValueError), and the store starts fresh, as it does for garbage.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any

STATE_VERSION = 1
# Ranges a loaded value is clamped to: a state file edited by hand (or by someone else) cannot push the
# policy's arithmetic out of bounds.
RANGES = {
    "weight": (1, 100_000), "fails": (0, 1_000_000), "oks": (0, 1_000_000), "load": (0.0, 1e6),
    "log_gain": (-20.0, 20.0), "capacity": (1.0, 1e6), "tpot_sum": (0.0, 1e15), "tpot_count": (0.0, 1e15),
    "tpot": (1e-6, 1e3), "speed": (0.01, 100.0),
}
# Every clock time an InstanceState keeps (the policy's timers), for PolicyState.clamped.
TIMES = ("calm_since", "failing_since", "last_ok_at", "last_change_at", "resumed_at", "recovered_at")
# A clock stepped back by less than this is not worth a WARNING (its times are clamped all the same).
SAY_AHEAD = 1.0


@dataclass
class InstanceState:
    weight: int | None = None  # weight applied (None: never decided)
    down: bool = False  # `down` applied
    backup: bool = False  # `backup` applied: traffic from elsewhere fills it, nginx sends it nothing of its own
    drained: bool = False  # held out last cycle because the inventory said `drain` (not for its health)
    overflow: bool = False  # the load model's verdict behind `backup` (with hysteresis)
    calm_since: float | None = None  # while `backup`: since when the verdict has said the replica is not full
    fails: int = 0  # consecutive failed health checks
    oks: int = 0  # consecutive good health checks
    health_error: str | None = None
    failing_since: float | None = None  # first failed /health of the current run of failures
    refused: bool = False  # the failures so far were refused connections only
    load: float | None = None  # EWMA of the per-slot load
    log_gain: float = 0.0  # log of the correction g
    capacity: float | None = None  # last capacity seen in metrics
    last_ok_at: float | None = None  # last usable metrics
    last_error: str | None = None
    last_change_at: float | None = None
    # Metrics usable again after a gap (failed scrapes) or counters that went back (an engine restart): the
    # first readings describe the restart's transient, not the traffic (see policy._plan).
    resumed_at: float | None = None
    recovered_at: float | None = None  # start of the ramp after recovery
    tpot_sum: float | None = None  # the TPOT histogram's counters at the last speed update
    tpot_count: float | None = None
    tpot: float | None = None  # EWMA of the mean time per output token between updates, seconds
    speed: float = 1.0  # speed factor applied to the weight (1: within tolerance of the fleet's median)
    address: str | None = None  # host:port of the server this is the memory of (None: from before fdngx kept it)

    @classmethod
    def from_dict(cls, raw: Any) -> InstanceState:
        """Raises ValueError naming the first field of the wrong type; unknown fields are ignored."""
        if not isinstance(raw, Mapping):
            raise ValueError("an instance state must be an object")
        values: dict[str, Any] = {}
        for f in fields(cls):
            if f.name not in raw:
                continue
            value = _typed(f.name, raw[f.name], str(f.type))
            if value is not None and f.name in RANGES:
                lo, hi = RANGES[f.name]
                value = min(hi, max(lo, value))
            values[f.name] = value
        return cls(**values)


def _typed(name: str, value: Any, kind: str) -> Any:
    """`value` if it fits the annotation `kind` (as written above), else ValueError."""
    optional = kind.endswith("| None")
    if value is None:
        if optional:
            return None
        raise ValueError(f"field {name!r} must not be null")
    base = kind.removesuffix(" | None")
    if base == "bool":
        ok = isinstance(value, bool)
    elif base == "int":
        ok = type(value) is int
    elif base == "float":
        ok = type(value) in (int, float) and math.isfinite(value)
    else:
        ok = isinstance(value, str)
    if not ok:
        raise ValueError(f"field {name!r} = {str(value)[:40]!r} is not {base}")
    return float(value) if base == "float" else value


@dataclass
class PolicyState:
    instances: dict[str, InstanceState] = field(default_factory=dict)
    reloads: list[float] = field(default_factory=list)  # times of cycles that changed something
    updated_at: float | None = None
    # The PolicyConfig that wrote this state (as a dict): `fdngx status` decides with the same settings.
    config: dict[str, Any] = field(default_factory=dict)

    def clamped(self, now: float) -> tuple[PolicyState, float]:
        """This state with every time later than `now` set to `now`, and how far the latest was ahead (0: none).

        Times from the future mean the clock was stepped back (NTP, an operator) since they were written,
        here or in the saved file. Left alone, every `now - t` would be negative, and every timer would hold
        for as long as the step (min-hold, the reload budget, the refused grace, the backup's calm, the
        settling, the ramp at step 1). Clamped, each reads as "just now", the safe side of every timer: a
        change waits one min-hold, a ramp starts over (it does not jump to full weight), a replica's metrics
        count as read just now (stale after stale_after if they fail), a refused replica gets one more
        refused-grace (nginx's passive check keeps covering it meanwhile, as for a fresh failure). The reload
        budget's entries count as reloads made just now, not as expired: the budget is there to limit
        reloads and we cannot tell when they really were; so it holds changes for one window (60 s) at
        most, never for as long as the step, and nginx gets no burst of reloads right after a step."""
        ahead = max([0.0, *(t - now for t in self.reloads),
                     *(t - now for t in (self.updated_at,) if t is not None),
                     *(t - now for st in self.instances.values() for n in TIMES if (t := getattr(st, n)) is not None)])
        if not ahead:
            return self, 0.0
        instances = {name: replace(st, **{n: min(now, t) for n in TIMES if (t := getattr(st, n)) is not None})
                     for name, st in self.instances.items()}
        updated = None if self.updated_at is None else min(now, self.updated_at)
        return PolicyState(instances, [min(now, t) for t in self.reloads], updated, dict(self.config)), ahead

    @staticmethod
    def clock_note(ahead: float) -> str | None:
        """What to log (once: the state saved next holds no such time) for a state `ahead` seconds ahead."""
        if ahead < SAY_AHEAD:
            return None
        return (f"the clock went back: the policy state held times up to {ahead:.0f}s ahead of now; its timers "
                "(hold, reload budget, refused grace, ramp) count from now")

    def to_dict(self) -> dict[str, Any]:
        return {
            "version": STATE_VERSION,
            "updated_at": self.updated_at,
            "config": dict(sorted(self.config.items())),
            "reloads": list(self.reloads),
            "instances": {name: asdict(st) for name, st in sorted(self.instances.items())},
        }

    @classmethod
    def from_dict(cls, raw: Any) -> PolicyState:
        """Raises ValueError on a document that is not a state of this version, or has a wrong type."""
        if not isinstance(raw, dict) or type(raw.get("version")) is not int or raw["version"] != STATE_VERSION:
            raise ValueError("not an fdngx policy state (version 1)")
        insts = raw.get("instances", {})
        if not isinstance(insts, dict):
            raise ValueError("'instances' must be an object")
        config = raw.get("config", {})
        if not isinstance(config, dict):
            raise ValueError("'config' must be an object")
        reloads = raw.get("reloads", [])
        if not isinstance(reloads, list):
            raise ValueError("'reloads' must be a list")
        updated_at = raw.get("updated_at")
        return cls(
            instances={str(k): _instance(k, v) for k, v in insts.items()},
            reloads=[_typed("reloads", t, "float") for t in reloads],
            updated_at=None if updated_at is None else _typed("updated_at", updated_at, "float"),
            config=config,
        )


def _instance(name: str, raw: Any) -> InstanceState:
    try:
        return InstanceState.from_dict(raw)
    except ValueError as exc:
        raise ValueError(f"instance {name!r}: {exc}") from None
