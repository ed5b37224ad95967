"""Engine adapters: what differs between FastDeploy, vLLM, SGLang and the simulator.

Each engine module defines `SPEC`, an EngineSpec: metric names for the load signals and the health
path. Launch command lines for each engine live beside it (see `fdngx.launch`).
"""

from __future__ import annotations

from fdngx.engines.base import EngineSpec, MetricNames
from fdngx.engines.fastdeploy import SPEC as FASTDEPLOY
from fdngx.engines.sglang import SPEC as SGLANG
from fdngx.engines.vllm import SPEC as VLLM
from fdngx.errors import UsageError

# The simulator speaks FastDeploy's API and metric names exactly.
SPECS: dict[str, EngineSpec] = {"fastdeploy": FASTDEPLOY, "vllm": VLLM, "sglang": SGLANG, "sim": FASTDEPLOY}


def spec(engine: str) -> EngineSpec:
    try:
        return SPECS[engine]
    except KeyError:
        raise UsageError(f"unknown engine '{engine}' (known: {', '.join(SPECS)})") from None


__all__ = ["SPECS", "EngineSpec", "MetricNames", "spec"]
