"""Fault switches of one simulated replica, set by startup flags or at run time by `POST /sim/fault`.

| fault | effect |
|---|---|
| `unhealthy: bool` | `/health` and `/ping` answer 404 "Worker Service Not Healthy"; completions still work |
| `no_weights: bool` | weights cleared (dynamic weight loading): `/health`, `/ping`, completions, `/v1/models`: 304 |
| `error_rate: 0..1` | that share of completion requests gets an immediate 500 (FastDeploy's internal_error body) |
| `hang: bool` | completion requests are accepted and never answered (until the client gives up) |
| `metrics_delay: s` | `/metrics` answers after that many seconds |
| `garbage_metrics: bool` | `/metrics` answers 200 with text that breaks a Prometheus parser part way |
| `speed: > 0` | the replica's speed factor (step times are divided by it) |
| `crash: true` | the replica closes its API and metrics sockets (connections refused), cuts open streams |

`no_weights` has no startup flag (set it at run time). Crash is irreversible; once every replica of a process
has crashed, the process exits with status 1.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from fdngx.errors import UsageError

FAULT_NAMES = ("unhealthy", "no_weights", "error_rate", "hang", "metrics_delay", "garbage_metrics", "speed", "crash")


@dataclass
class Faults:
    unhealthy: bool = False
    no_weights: bool = False
    error_rate: float = 0.0
    hang: bool = False
    metrics_delay: float = 0.0
    garbage_metrics: bool = False

    def as_dict(self) -> dict[str, Any]:
        return {
            "unhealthy": self.unhealthy,
            "no_weights": self.no_weights,
            "error_rate": self.error_rate,
            "hang": self.hang,
            "metrics_delay": self.metrics_delay,
            "garbage_metrics": self.garbage_metrics,
        }


def _label(name: str, cli: bool) -> str:
    return "--" + name.replace("_", "-") if cli else f"fault {name!r}"


def _bool(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise UsageError(f"{name} must be true or false, got {value!r}")
    return value


def _number(name: str, value: Any, *, low: float, high: float | None = None, low_open: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise UsageError(f"{name} must be a number, got {value!r}")
    v = float(value)
    too_low = v <= low if low_open else v < low
    if too_low or (high is not None and v > high):
        bound = f"({low}, {high}]" if low_open else f"[{low}, {high if high is not None else 'inf'}]"
        raise UsageError(f"{name} must be in {bound}, got {value!r}")
    return v


def validate_fault(body: Any, *, cli: bool = False) -> dict[str, Any]:
    """Check a fault request and return it normalised; raises UsageError naming what is wrong.

    `cli` names the faults as the command-line flags that set them.
    """
    if not isinstance(body, dict) or not body:
        raise UsageError(f"a fault must be a non-empty JSON object with keys from {', '.join(FAULT_NAMES)}")
    out: dict[str, Any] = {}
    for key, value in body.items():
        label = _label(key, cli)
        if key in ("unhealthy", "no_weights", "hang", "garbage_metrics", "crash"):
            out[key] = _bool(label, value)
        elif key == "error_rate":
            out[key] = _number(label, value, low=0.0, high=1.0)
        elif key == "metrics_delay":
            out[key] = _number(label, value, low=0.0, high=3600.0)
        elif key == "speed":
            out[key] = _number(label, value, low=0.0, high=1000.0, low_open=True)
        else:
            raise UsageError(f"unknown fault {key!r}; known: {', '.join(FAULT_NAMES)}")
    return out
