"""The policy's memory between cycles: per-instance smoothing, health counts, applied weights, the reload
budget. Pure values; fdngx.weights.store keeps them in a file between cron runs and sidecar restarts.

`from_dict` checks the document against this schema: a state file with a wrong type anywhere is
refused as a whole (ValueError), and the store starts fresh, as it does for garbage.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields
from typing import Any

STATE_VERSION = 1
# Ranges a loaded value is clamped to: a state file edited by hand (or by someone else) cannot push the
# policy's arithmetic out of bounds.
RANGES = {
    "weight": (1, 100_000), "fails": (0, 1_000_000), "oks": (0, 1_000_000), "load": (0.0, 1e6),
    "log_gain": (-20.0, 20.0), "capacity": (1.0, 1e6), "tpot_sum": (0.0, 1e15), "tpot_count": (0.0, 1e15),
    "tpot": (1e-6, 1e3), "speed": (0.01, 100.0),
}


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
