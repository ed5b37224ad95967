"""FastDeploy: metric names from fastdeploy/metrics/metrics.py (see shared/reference/fastdeploy.md)."""

from __future__ import annotations

from fdngx.engines.base import EngineSpec, MetricNames

SPEC = EngineSpec(
    name="fastdeploy",
    metrics=MetricNames(
        running=("fastdeploy:num_requests_running",),
        queued=("fastdeploy:num_requests_waiting", "fastdeploy:num_requests_queuing"),
        kv_usage=("fastdeploy:gpu_cache_usage_perc",),
        capacity=("fastdeploy:max_batch_size",),
        queued_marker="fastdeploy:num_requests_queuing",
    ),
)
