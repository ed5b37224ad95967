"""vLLM: metrics on the API port; KV usage was renamed in v1."""

from __future__ import annotations

from fdngx.engines.base import EngineSpec, MetricNames

SPEC = EngineSpec(
    name="vllm",
    metrics=MetricNames(
        running=("vllm:num_requests_running",),
        queued=("vllm:num_requests_waiting",),
        kv_usage=("vllm:kv_cache_usage_perc", "vllm:gpu_cache_usage_perc"),
    ),
    metrics_on_api_port=True,
)
