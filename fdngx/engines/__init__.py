"""Engine adapters: one registry entry per engine (FastDeploy, vLLM, SGLang, the simulator).

Each entry carries the engine's launch builder, default launch timeout, metric names for the load
signals, health path and "is it installed" check. Nothing else in fdngx keeps a per-engine table.
"""

from __future__ import annotations

from fdngx.domain import Engine
from fdngx.engines import fastdeploy, sglang, sim, vllm
from fdngx.engines.base import EngineSpec, Launched, MetricNames

REGISTRY: dict[Engine, EngineSpec] = {e.SPEC.name: e.SPEC for e in (fastdeploy, vllm, sglang, sim)}


def spec(engine: Engine | str) -> EngineSpec:
    """The registry entry; `engine` was validated as an Engine when the inventory or CLI was parsed."""
    return REGISTRY[Engine(engine)]


__all__ = ["REGISTRY", "EngineSpec", "Launched", "MetricNames", "spec"]
