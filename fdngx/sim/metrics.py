"""FastDeploy's Prometheus page for one simulated replica: the same families, types, buckets and help texts.

Mirrors PaddlePaddle/FastDeploy fastdeploy/metrics/metrics.py (`MetricsManager`: GAUGE_METRICS, METRICS,
SERVER_METRICS, `set_cache_config_info`; version in tests/fixtures/upstream/README.md) and
`get_filtered_metrics`, which serves the gauges from memory and everything else through prometheus-client's
multiprocess collector: those families carry the help text "Multiprocess metric" and no `_created` series.
The `http_*` families come from metrics_middleware.py `PrometheusMiddleware` (every API path but health,
metrics and the completion routes) and appear once such a path was called.

Two shapes: the default adds `fastdeploy:num_requests_enqueued` and splits the backlog between it and
`num_requests_waiting` (PaddlePaddle/FastDeploy PR #5798: enqueued = in the local scheduler, not yet taken
by the engine; waiting = taken, waiting for resources; its help text is the docs' description,
docs/online_serving/metrics.md @19d8ac22, the metrics.py defining it was not read); `legacy=True` is the
shape of the source versions we read (2.4, 2.5): no enqueued series, and
`num_requests_waiting` does not hold the backlog. The scheduler adds each request it accepts
(scheduler/local_scheduler.py put_requests), the engine subtracts the ones it takes (engine/common_engine.py),
and the resource manager sets it to its own tasks less the running ones (engine/resource_manager.py) each
time it updates: a sawtooth near 0 while the backlog sits in the scheduler. The simulator serves its floor, 0.

Load gauges are read from the model at scrape time (`set_function`), so stepping costs nothing; histograms
and counters are fed as FastDeploy feeds them: per request, per step, or per token where it does.
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
HTTP_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 2.5, 3.0, 3.5, 4.0, 4.5, 5.0, 7.5, 10, 30, 60)
# metrics_middleware.py EXCLUDE_PATHS: requests to these paths are not counted in http_*.
HTTP_EXCLUDED_PATHS = frozenset({"/health", "/metrics", "/ping", "/load", "/v1/chat/completions", "/v1/completions"})
MULTIPROCESS_HELP = "Multiprocess metric"


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


class _MultiprocessView(Collector):
    """What FastDeploy's multiprocess collector makes of the non-gauge families: no `_created` series, help
    text "Multiprocess metric". Done here rather than with prometheus-client's process-wide switches, which
    would change every other registry in the process too."""

    def __init__(self, inner: CollectorRegistry, in_memory: set[str]) -> None:
        self.inner = inner
        self.in_memory = in_memory

    def collect(self) -> Iterator[Metric]:
        for family in self.inner.collect():
            family.samples = [s for s in family.samples if not s.name.endswith("_created")]
            if family.name not in self.in_memory:
                if not family.samples:  # a labelled family nobody used yet has no file, hence no family
                    continue
                family.documentation = MULTIPROCESS_HELP
            yield family


class ReplicaMetrics:
    def __init__(self, model: ReplicaModel, *, legacy: bool = False) -> None:
        self.model = model
        self.legacy = legacy
        reg = CollectorRegistry(auto_describe=True)
        in_memory: set[str] = set()
        self.registry = CollectorRegistry()
        self.registry.register(_MultiprocessView(reg, in_memory))
        m = model
        p = model.params

        # -- GAUGE_METRICS: served from memory, with their own help texts ------------------------------------
        def gauge(name: str, doc: str, fn: object = None) -> Gauge:
            g = Gauge(f"fastdeploy:{name}", doc, registry=reg)
            in_memory.add(f"fastdeploy:{name}")
            if fn is not None:
                g.set_function(fn)  # type: ignore[arg-type]
            return g

        gauge("num_requests_running", "Number of requests currently running", lambda: m.num_running)
        if legacy:
            gauge("num_requests_waiting", "Number of requests currently waiting", lambda: 0)
        else:
            gauge("num_requests_waiting", "Number of requests currently waiting", self._waiting)
            gauge("num_requests_enqueued", "Number of requests to be scheduled", self._enqueued)
        gauge("gpu_cache_usage_perc", "GPU KV-cache usage. 1 means 100 percent usage", m.cache_usage)
        gauge("batch_size", "Real batch size during inference", lambda: m.num_running)
        gauge("max_batch_size", "Maximum batch size determined when service started", lambda: p.max_num_seqs)
        gauge(
            "available_gpu_block_num",
            "Number of available gpu blocks in cache, including blocks in LRU list",
            lambda: p.kv_blocks - m.used_blocks(),
        )
        gauge("free_gpu_block_num", "Number of free blocks in cache", lambda: p.kv_blocks - m.used_blocks())
        gauge("max_gpu_block_num", "Number of total blocks determined when service started", lambda: p.kv_blocks)
        gauge(
            "available_gpu_resource",
            "Available blocks percentage, i.e. available_gpu_block_num / max_gpu_block_num",
            lambda: 1.0 - m.cache_usage(),
        )
        self.first_token_latency = gauge("first_token_latency", "Latest time to first token in seconds")
        gauge("infer_latency", "Latest time to generate one token in seconds", lambda: m.last_step_s)
        self.available_batch_size = gauge(
            "available_batch_size", "Number of requests that can still be inserted during the Decode phase"
        )
        self.available_batch_size.set(p.max_num_seqs)
        for name, doc in (
            ("hit_req_rate", "Request-level prefix cache hit rate"),
            ("hit_token_rate", "Token-level prefix cache hit rate"),
            ("cpu_hit_token_rate", "Token-level CPU prefix cache hit rate"),
            ("gpu_hit_token_rate", "Token-level GPU prefix cache hit rate"),
        ):
            gauge(name, doc, lambda: 0.0)

        # -- METRICS and SERVER_METRICS: through the multiprocess collector -----------------------------------
        def counter(name: str, doc: str) -> Counter:
            return Counter(f"fastdeploy:{name}", doc, registry=reg)

        def hist(name: str, doc: str, buckets: tuple[float, ...] | list[float]) -> Histogram:
            return Histogram(f"fastdeploy:{name}", doc, buckets=buckets, registry=reg)

        self.ttft = hist("time_to_first_token_seconds", "Time to first token in seconds", TTFT_BUCKETS)
        self.tpot = hist("time_per_output_token_seconds", "Time per output token in seconds", TPOT_BUCKETS)
        self.inference_time = hist(
            "request_inference_time_seconds",
            "Time spent in inference phase (from inference start to last token)",
            REQUEST_LATENCY_BUCKETS,
        )
        self.queue_time = hist(
            "request_queue_time_seconds",
            "Time spent in waiting queue (from preprocess end to inference start)",
            REQUEST_LATENCY_BUCKETS,
        )
        self.generation_tokens = counter("generation_tokens_total", "Total number of generation tokens processed")
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
        self.req_gen_tokens = hist("request_generation_tokens", "Number of generation tokens processed.", TOKEN_BUCKETS)
        self.request_success = counter("request_success_total", "Total number of successfully processed requests")
        counter("prefix_cache_token_num", "Total number of cached tokens")
        counter("prefix_gpu_cache_token_num", "Total number of cached tokens on GPU")
        counter("prefix_cpu_cache_token_num", "Total number of cached tokens on CPU")
        counter("prefix_ssd_cache_token_num", "Total number of cached tokens on SSD")
        self.requests_number = counter("requests_number", "Total number of requests received")
        counter("send_cache_failed_num", "Total number of failures of sending cache")
        self.http_requests = Counter(
            "http_requests_total",
            "Total number of requests by method, status and handler.",
            ["method", "path", "status_code"],
            registry=reg,
        )
        self.http_duration = Histogram(
            "http_request_duration_seconds",
            "Duration of HTTP requests in seconds",
            ["method", "path"],
            buckets=HTTP_BUCKETS,
            registry=reg,
        )
        self.e2e = hist(
            "e2e_request_latency_seconds",
            "End-to-end request latency (from request arrival to final response)",
            REQUEST_LATENCY_BUCKETS,
        )
        self.req_max_tokens = hist(
            "request_params_max_tokens", "Histogram of max_tokens parameter in request parameters", TOKEN_BUCKETS
        )
        self.prompt_tokens = counter("prompt_tokens_total", "Total number of prompt tokens processed")
        self.req_prompt_tokens = hist("request_prompt_tokens", "Number of prefill tokens processed", TOKEN_BUCKETS)

        # set_cache_config_info: one series, labels = every CacheConfig field as a string (a subset here).
        cache_info = Gauge(
            "fastdeploy:cache_config_info",
            "Information of the engine's CacheConfig",
            [
                "block_size",
                "gpu_memory_utilization",
                "num_gpu_blocks_override",
                "kv_cache_ratio",
                "cache_dtype",
                "enable_prefix_caching",
                "num_cpu_blocks",
                "total_block_num",
            ],
            registry=reg,
        )
        cache_info.labels(str(p.block_size), "0.9", "None", "1.0", "bfloat16", "True", "0", str(p.kv_blocks)).set(1)

    # The resource manager pulls up to one batch worth of requests from the scheduler; the rest queue there.
    def _waiting(self) -> int:
        return min(self.model.num_waiting, self.model.params.max_num_seqs)

    def _enqueued(self) -> int:
        return max(0, self.model.num_waiting - self.model.params.max_num_seqs)

    # -- events ------------------------------------------------------------------------------------
    def on_arrival(self, req: SimRequest) -> None:
        self.requests_number.inc()
        self.prompt_tokens.inc(req.prompt_tokens)
        self.req_prompt_tokens.observe(req.prompt_tokens)
        self.req_max_tokens.observe(req.max_tokens)

    def on_step(self, tokens: int) -> None:
        # token_processor.py TokenProcessor._record_metrics: generation_tokens_total += tokens of the step.
        self.generation_tokens.inc(tokens)

    def on_token(self, req: SimRequest) -> None:
        """Every token after a request's first: token_processor.py TokenProcessor._record_metrics observes
        time_per_output_token_seconds = now - task.last_token_time, once per decode step per request."""
        if req.token_gap is not None:
            self.tpot.observe(req.token_gap)

    def on_first_token(self, req: SimRequest) -> None:
        # token_processor.py _record_first_token_metrics
        assert req.first_token is not None and req.admitted is not None
        ttft = req.first_token - req.arrival
        self.ttft.observe(ttft)
        self.first_token_latency.set(ttft)
        self.queue_time.observe(req.admitted - req.arrival)
        self.prefill_time.observe(req.first_token - req.admitted)

    def on_finish(self, req: SimRequest) -> None:
        # token_processor.py _record_completion_metrics; e2e is observed by the API server (serving_chat.py).
        assert req.finished is not None and req.first_token is not None and req.admitted is not None
        self.request_success.inc()
        self.e2e.observe(req.finished - req.arrival)
        self.inference_time.observe(req.finished - req.admitted)
        self.decode_time.observe(req.finished - req.first_token)
        self.req_gen_tokens.observe(req.generated)
        # token_processor.py _recycle_resources refreshes this gauge only when a request finishes.
        self.available_batch_size.set(self.model.params.max_num_seqs - self.model.num_running)

    def on_http(self, method: str, path: str, status: int, seconds: float) -> None:
        """metrics_middleware.py PrometheusMiddleware.dispatch."""
        if path in HTTP_EXCLUDED_PATHS:
            return
        self.http_requests.labels(method=method, path=path, status_code=str(status)).inc()
        self.http_duration.labels(method=method, path=path).observe(seconds)

    def render(self) -> bytes:
        return generate_latest(self.registry)


GARBAGE_METRICS = (
    b"# HELP fastdeploy:num_requests_running Number of requests currently running\n"
    b"# TYPE fastdeploy:num_requests_running gauge\n"
    b"fastdeploy:num_requests_running 3.0\n"
    b"fastdeploy:num_requests_waiting{oops=} not-a-number\n"
    b"\x00\xff<html>502 Bad Gateway</html>\n"
)
