"""The shape of an engine adapter."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class MetricNames:
    """Prometheus sample names for each load signal; the first name present wins, queued ones add up."""

    running: tuple[str, ...]
    queued: tuple[str, ...]
    kv_usage: tuple[str, ...]
    capacity: tuple[str, ...] = ()
    # Histogram(s) of time per output token (their _sum and _count): the replica's decode speed.
    tpot: tuple[str, ...] = ()
    # A series whose absence means `queued` cannot be trusted (FastDeploy before 2026-04-29).
    queued_marker: str | None = None


@dataclass(frozen=True)
class EngineSpec:
    name: str
    metrics: MetricNames
    health_path: str = "/health"
    # Whether metrics are served on the API port (vLLM, SGLang) rather than a separate metrics port.
    metrics_on_api_port: bool = False
