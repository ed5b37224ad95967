"""FastDeploy's Prometheus metrics for one simulated replica, with FastDeploy's names, types and buckets.

Names and buckets follow fastdeploy/metrics/metrics.py (see shared/reference/fastdeploy.md). Load gauges are
read from the model at scrape time (`set_function`), so stepping costs nothing; histograms and counters are
fed once per request (or once per step), never once per token.
"""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

from fdngx.sim.model import ReplicaModel, SimRequest

TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0)
TPOT_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0)
REQUEST_LATENCY_BUCKETS = (
    0.3,
    0.5,
    0.8,
    1.0,
    1.5,
    2.0,
    2.5,
    5.0,
    10.0,
    15.0,
    20.0,
    30.0,
    40.0,
    50.0,
    60.0,
    120.0,
    240.0,
    480.0,
    960.0,
    1920.0,
    7680.0,
)


def build_1_2_5_buckets(max_value: int) -> list[float]:
    """1, 2, 5, 10, 20, 50, ... up to max_value, as FastDeploy's token-count histograms use."""
    out: list[float] = []
    exponent = 0
    while True:
        for mantissa in (1, 2, 5):
            value = mantissa * 10**exponent
            if value > max_value:
                return out
            out.append(float(value))
        exponent += 1


TOKEN_BUCKETS = build_1_2_5_buckets(33792)


class _WithoutCreated(Collector):
    """FastDeploy runs prometheus-client in multiprocess mode, which has no `_created` series; drop them here
    rather than through prometheus-client's process-wide switch, which would change other registries too."""

    def __init__(self, inner: CollectorRegistry) -> None:
        self.inner = inner

    def collect(self) -> Iterator[Metric]:
        for family in self.inner.collect():
            family.samples = [s for s in family.samples if not s.name.endswith("_created")]
            yield family


class ReplicaMetrics:
    def __init__(self, model: ReplicaModel, *, legacy: bool = False) -> None:
        self.model = model
        self.legacy = legacy
        reg = CollectorRegistry(auto_describe=True)
        self.registry = CollectorRegistry()
        self.registry.register(_WithoutCreated(reg))
        m = model
        p = model.params

        def gauge(name: str, doc: str, fn: object = None) -> Gauge:
            g = Gauge(f"fastdeploy:{name}", doc, registry=reg)
            if fn is not None:
                g.set_function(fn)  # type: ignore[arg-type]
            return g

        def counter(name: str, doc: str) -> Counter:
            return Counter(f"fastdeploy:{name}", doc, registry=reg)

        def hist(name: str, doc: str, buckets: tuple[float, ...] | list[float]) -> Histogram:
            return Histogram(f"fastdeploy:{name}", doc, buckets=buckets, registry=reg)

        self.requests_number = counter("requests_number", "Total number of requests received")
        self.request_success = counter("request_success_total", "Total number of successfully processed requests")
        self.prompt_tokens = counter("prompt_tokens_total", "Total number of prompt tokens processed")
        self.generation_tokens = counter("generation_tokens_total", "Total number of generation tokens processed")
        counter("prefix_cache_token_num", "Total number of cached tokens")
        counter("prefix_gpu_cache_token_num", "Total number of cached tokens on GPU")
        counter("prefix_cpu_cache_token_num", "Total number of cached tokens on CPU")
        counter("send_cache_failed_num", "Total number of failures of sending cache")

        self.ttft = hist("time_to_first_token_seconds", "Time to first token in seconds", TTFT_BUCKETS)
        self.tpot = hist("time_per_output_token_seconds", "Time per output token in seconds", TPOT_BUCKETS)
        self.queue_time = hist(
            "request_queue_time_seconds",
            "Time spent in waiting queue (from preprocess end to inference start)",
            REQUEST_LATENCY_BUCKETS,
        )
        self.e2e = hist(
            "e2e_request_latency_seconds",
            "End-to-end request latency (from request arrival to final response)",
            REQUEST_LATENCY_BUCKETS,
        )
        self.inference_time = hist(
            "request_inference_time_seconds",
            "Time spent in inference phase (from inference start to last token)",
            REQUEST_LATENCY_BUCKETS,
        )
        self.prefill_time = hist(
            "request_prefill_time_seconds",
            "Time spent in prefill phase (from preprocess start to preprocess end)",
            REQUEST_LATENCY_BUCKETS,
        )
        self.decode_time = hist(
            "request_decode_time_seconds",
            "Time spent in decode phase (from first token to last token)",
            REQUEST_LATENCY_BUCKETS,
        )
        self.req_prompt_tokens = hist("request_prompt_tokens", "Number of prefill tokens processed.", TOKEN_BUCKETS)
        self.req_gen_tokens = hist("request_generation_tokens", "Number of generation tokens processed.", TOKEN_BUCKETS)
        self.req_max_tokens = hist(
            "request_params_max_tokens", "Histogram of the max_tokens request parameter.", TOKEN_BUCKETS
        )

        cache_info = Gauge(
            "fastdeploy:cache_config_info",
            "Information of the engine's CacheConfig",
            [
                "block_size",
                "cache_dtype",
                "enable_prefix_caching",
                "gpu_memory_utilization",
                "kv_cache_ratio",
                "num_cpu_blocks",
            ],
            registry=reg,
        )
        cache_info.labels(str(p.block_size), "bfloat16", "True", "0.9", "0.75", "0").set(1)

        gauge("num_requests_running", "Number of requests currently running", lambda: m.num_running)
        if legacy:
            # Builds before 2026-04-29: the backlog sits in the scheduler, invisible to this gauge.
            gauge("num_requests_waiting", "Number of requests currently waiting in resource manager", lambda: 0)
        else:
            gauge("num_requests_waiting", "Number of requests currently waiting in resource manager", self._waiting)
            gauge("num_requests_queuing", "Number of requests currently queuing in local scheduler", self._queuing)
        gauge("gpu_cache_usage_perc", "GPU KV-cache usage. 1 means 100 percent usage", m.cache_usage)
        gauge("batch_size", "Real batch size during inference", lambda: m.num_running)
        gauge("max_batch_size", "Maximum batch size determined when service started", lambda: p.max_num_seqs)
        self.available_batch_size = gauge(
            "available_batch_size", "Number of requests that can still be inserted during the Decode phase"
        )
        self.available_batch_size.set(p.max_num_seqs)
        gauge("max_gpu_block_num", "Number of total GPU blocks determined when service started", lambda: p.kv_blocks)
        gauge("free_gpu_block_num", "Number of free blocks in cache", lambda: p.kv_blocks - m.used_blocks())
        gauge(
            "available_gpu_block_num",
            "Number of available gpu blocks in cache, including blocks in LRU list",
            lambda: p.kv_blocks - m.used_blocks(),
        )
        gauge(
            "available_gpu_resource",
            "Available blocks percentage, i.e. available_gpu_block_num / max_gpu_block_num",
            lambda: 1.0 - m.cache_usage(),
        )
        gauge("max_cpu_block_num", "Number of total CPU blocks determined when service started", lambda: 0)
        self.first_token_latency = gauge("first_token_latency", "Latest time to first token in seconds")
        gauge("infer_latency", "Latest time to generate one token in seconds", lambda: m.last_step_s)
        for name, doc in (
            ("hit_req_rate", "Request-level prefix cache hit rate"),
            ("hit_token_rate", "Token-level prefix cache hit rate"),
            ("cpu_hit_token_rate", "Token-level CPU prefix cache hit rate"),
            ("gpu_hit_token_rate", "Token-level GPU prefix cache hit rate"),
        ):
            gauge(name, doc, lambda: 0.0)

    # The resource manager pulls up to one batch worth of requests from the scheduler; the rest queue there.
    def _waiting(self) -> int:
        return min(self.model.num_waiting, self.model.params.max_num_seqs)

    def _queuing(self) -> int:
        return max(0, self.model.num_waiting - self.model.params.max_num_seqs)

    # -- events ------------------------------------------------------------------------------------
    def on_arrival(self, req: SimRequest) -> None:
        self.requests_number.inc()
        self.prompt_tokens.inc(req.prompt_tokens)
        self.req_prompt_tokens.observe(req.prompt_tokens)
        self.req_max_tokens.observe(req.max_tokens)

    def on_step(self, tokens: int) -> None:
        self.generation_tokens.inc(tokens)

    def on_first_token(self, req: SimRequest) -> None:
        assert req.first_token is not None and req.admitted is not None
        ttft = req.first_token - req.arrival
        self.ttft.observe(ttft)
        self.first_token_latency.set(ttft)
        self.queue_time.observe(req.admitted - req.arrival)
        self.prefill_time.observe(req.first_token - req.admitted)

    def on_finish(self, req: SimRequest) -> None:
        assert req.finished is not None and req.first_token is not None and req.admitted is not None
        self.request_success.inc()
        self.e2e.observe(req.finished - req.arrival)
        self.inference_time.observe(req.finished - req.admitted)
        self.decode_time.observe(req.finished - req.first_token)
        self.req_gen_tokens.observe(req.generated)
        if req.generated > 1:
            self.tpot.observe((req.finished - req.first_token) / (req.generated - 1))
        # FastDeploy refreshes this gauge only when a request finishes.
        self.available_batch_size.set(self.model.params.max_num_seqs - self.model.num_running)

    def render(self) -> bytes:
        return generate_latest(self.registry)


GARBAGE_METRICS = (
    b"# HELP fastdeploy:num_requests_running Number of requests currently running\n"
    b"# TYPE fastdeploy:num_requests_running gauge\n"
    b"fastdeploy:num_requests_running 3.0\n"
    b"fastdeploy:num_requests_waiting{oops=} not-a-number\n"
    b"\x00\xff<html>502 Bad Gateway</html>\n"
)
