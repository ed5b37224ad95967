"""SGLang: metrics on the API port (with --enable-metrics)."""

from __future__ import annotations

from fdngx.engines.base import EngineSpec, MetricNames

SPEC = EngineSpec(
    name="sglang",
    metrics=MetricNames(
        running=("sglang:num_running_reqs",),
        queued=("sglang:num_queue_reqs",),
        kv_usage=("sglang:token_usage",),
    ),
    metrics_on_api_port=True,
)
