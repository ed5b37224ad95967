"""The policy's memory between cycles: per-instance smoothing, health counts, applied weights, the reload
budget. JSON-serialisable, so cron mode can keep it in a file beside the config (see fdngx.cycle)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields
from typing import Any

STATE_VERSION = 1


@dataclass
class InstanceState:
    weight: int | None = None  # weight applied (None: never decided)
    down: bool = False  # `down` applied
    fails: int = 0  # consecutive failed health checks
    oks: int = 0  # consecutive good health checks
    health_error: str | None = None
    load: float | None = None  # EWMA of the per-slot load
    log_gain: float = 0.0  # log of the correction g
    capacity: float | None = None  # last capacity seen in metrics
    last_ok_at: float | None = None  # last usable metrics
    last_error: str | None = None
    last_change_at: float | None = None
    recovered_at: float | None = None  # start of the ramp after recovery
    tpot_sum: float | None = None  # the TPOT histogram's counters at the last speed update
    tpot_count: float | None = None
    tpot: float | None = None  # EWMA of the mean time per output token between updates, seconds
    speed: float = 1.0  # speed factor applied to the weight (1: within tolerance of the fleet's median)

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> InstanceState:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in raw.items() if k in known})


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
        """Raises ValueError on a document that is not a state of this version."""
        if not isinstance(raw, dict) or raw.get("version") != STATE_VERSION:
            raise ValueError("not an fdngx policy state (version 1)")
        insts = raw.get("instances", {})
        if not isinstance(insts, dict):
            raise ValueError("'instances' must be an object")
        config = raw.get("config", {})
        if not isinstance(config, dict):
            raise ValueError("'config' must be an object")
        try:
            return cls(
                instances={str(k): InstanceState.from_dict(v) for k, v in insts.items()},
                reloads=[float(t) for t in raw.get("reloads", [])],
                updated_at=raw.get("updated_at"),
                config=config,
            )
        except (TypeError, AttributeError) as exc:
            raise ValueError(f"bad state: {exc}") from None
