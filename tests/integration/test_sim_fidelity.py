"""`fdngx sim` over real sockets against FastDeploy's own source: each test names the upstream file it mirrors
(versions in tests/fixtures/upstream/README.md). The pure checks of the same bodies are in
tests/unit/test_sim_fidelity.py; this file proves the running server sends them.

Every wait polls a condition with a timeout; every process started here is stopped, pass or fail.
"""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Callable, Iterator
from typing import Any

import openai
import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families

from fdngx.sim.process import SimProcess, free_ports, start_sim
from tests.support import wait_for
from tests.unit.test_sim_fidelity import shape, sse_events, upstream

pytestmark = pytest.mark.timeout(120)

HTTP = requests.Session()
HTTP.trust_env = False
HI = [{"role": "user", "content": "hi"}]


@pytest.fixture(scope="module")
def fleet() -> Iterator[SimProcess]:
    """Four replicas (max_num_seqs 1, at most 2 in flight, 100 tokens/s), one per test that changes state."""
    ports = free_ports(8)
    sim = start_sim(ports[:4], ports[4:], max_num_seqs=1, extra_args=["--token-rate", "100", "--max-concurrency", "2"])
    try:
        yield sim
    finally:
        sim.stop()


@pytest.fixture
def sims() -> Iterator[Callable[..., SimProcess]]:
    started: list[SimProcess] = []

    def start(n: int = 1, **kwargs: Any) -> SimProcess:
        ports = free_ports(2 * n)
        sim = start_sim(ports[:n], ports[n:], **kwargs)
        started.append(sim)
        return sim

    try:
        yield start
    finally:
        for sim in started:
            sim.stop()


def open_stream(port: int, max_tokens: int = 4000) -> socket.socket:
    """A streaming chat request that stays open until the socket is closed (never read)."""
    body = json.dumps({"messages": HI, "stream": True, "max_tokens": max_tokens}).encode()
    s = socket.create_connection(("127.0.0.1", port), timeout=5)
    head = (
        "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    )
    s.sendall(head.encode() + body)
    return s


def page(sim: SimProcess, i: int) -> str:
    r = HTTP.get(f"{sim.metrics_url(i)}/metrics", timeout=5)
    assert r.status_code == 200
    return r.text


def metric(sim: SimProcess, i: int, name: str) -> float | None:
    for fam in text_string_to_metric_families(page(sim, i)):
        for s in fam.samples:
            if s.name == name:
                return s.value
    return None


def test_health_answers_304_without_weights_and_ping_takes_post(fleet: SimProcess) -> None:
    """fastdeploy/entrypoints/openai/api_server.py health(): 404 when engine_client.check_health fails, 304 when
    is_workers_alive fails ("No model weight enabled"; a 304 carries no body); /ping is
    @app.api_route(methods=["GET", "POST"]) and answers as health(); /health is GET only. While weights are
    cleared, create_chat_completion, create_completion and list_models answer 304 too."""
    base = fleet.url(0)
    assert HTTP.get(f"{base}/health", timeout=5).status_code == 200
    assert HTTP.post(f"{base}/ping", timeout=5).status_code == 200
    assert HTTP.post(f"{base}/health", timeout=5).status_code == 405
    fleet.fault(0, no_weights=True)
    try:
        for method, path in (("GET", "/health"), ("GET", "/ping"), ("POST", "/ping"), ("GET", "/v1/models")):
            r = HTTP.request(method, f"{base}{path}", timeout=5)
            assert (r.status_code, r.content) == (304, b""), (method, path)
        for path, body in (("/v1/chat/completions", {"messages": HI}), ("/v1/completions", {"prompt": "x"})):
            assert HTTP.post(f"{base}{path}", json=body, timeout=5).status_code == 304, path
        assert fleet.state(0)["healthy"] is False
        fleet.fault(0, unhealthy=True)  # check_health comes first: 404 wins over 304
        r = HTTP.get(f"{base}/health", timeout=5)
        assert (r.status_code, r.text) == (404, "Worker Service Not Healthy")
    finally:
        fleet.fault(0, no_weights=False, unhealthy=False)
    assert HTTP.get(f"{base}/ping", timeout=5).status_code == 200


def test_429_body_on_the_wire(fleet: SimProcess) -> None:
    """api_server.py connection_manager(): a full semaphore answers 429 at once with
    {"detail": "Too many requests,current max concurrency is N"} (tests/fixtures/upstream/fastdeploy-429.json)."""
    socks = [open_stream(fleet.ports[1]) for _ in range(2)]
    try:
        wait_for(lambda: fleet.state(1)["in_flight"] == 2, what="2 requests in flight")
        t0 = time.monotonic()
        r = HTTP.post(f"{fleet.url(1)}/v1/chat/completions", json={"messages": HI, "max_tokens": 1}, timeout=10)
        assert r.status_code == 429 and time.monotonic() - t0 < 3
        assert r.headers["Content-Type"].startswith("application/json")
        assert r.text == upstream("fastdeploy-429.json").strip().replace("512", "2")
        assert shape(r.json()) == shape(json.loads(upstream("fastdeploy-429.json")))
    finally:
        for s in socks:
            s.close()
    wait_for(lambda: fleet.state(1)["in_flight"] == 0, what="closed clients to leave")


def stream_raw(sim: SimProcess, i: int, path: str, body: dict) -> tuple[requests.Response, str]:
    r = HTTP.post(f"{sim.url(i)}{path}", json=body, stream=True, timeout=30)
    return r, r.content.decode()


def test_chat_stream_on_the_wire_matches_upstream(fleet: SimProcess) -> None:
    """serving_chat.py chat_completion_stream_generator via api_server.py StreamingResponse
    (text/event-stream): the chunks have the shapes of tests/fixtures/upstream/fastdeploy-chat-stream.txt."""
    body = {"messages": HI, "max_tokens": 3, "stream": True, "stream_options": {"include_usage": True}}
    r, text = stream_raw(fleet, 2, "/v1/chat/completions", body)
    assert r.status_code == 200 and r.headers["Content-Type"] == "text/event-stream; charset=utf-8"
    ours, theirs = sse_events(text), sse_events(upstream("fastdeploy-chat-stream.txt"))
    assert len(ours) == len(theirs)
    for mine, upstream_event in zip(ours[:-1], theirs[:-1], strict=True):
        assert shape(json.loads(mine)) == shape(json.loads(upstream_event))
    assert text.startswith("data: {") and text.split("\n\n")[0].endswith("} ")
    assert json.loads(ours[-2])["usage"]["completion_tokens"] == 3


def test_completion_stream_on_the_wire_matches_upstream(fleet: SimProcess) -> None:
    """serving_completion.py completion_stream_generator: tests/fixtures/upstream/fastdeploy-completion-stream.txt."""
    body = {"prompt": "Once upon", "max_tokens": 2, "stream": True, "stream_options": {"include_usage": True}}
    _, text = stream_raw(fleet, 2, "/v1/completions", body)
    ours, theirs = sse_events(text), sse_events(upstream("fastdeploy-completion-stream.txt"))
    assert len(ours) == len(theirs) and ours[-1] == "[DONE]"
    for mine, upstream_event in zip(ours[:-1], theirs[:-1], strict=True):
        assert shape(json.loads(mine)) == shape(json.loads(upstream_event))


def test_openai_client_sees_finish_reason_on_the_last_token(fleet: SimProcess) -> None:
    """serving_chat.py: finish_reason "length" at the client's max_tokens, "stop" otherwise, both on the last
    token's chunk; the first delta carries role "assistant"; /v1/models (serving_models.py) is owned_by
    "FastDeploy" and the answers name the served model whatever the request said."""
    c = openai.OpenAI(base_url=f"{fleet.url(3)}/v1", api_key="x", max_retries=0, timeout=30)
    for kwargs, reason in (({"max_tokens": 4}, "length"), ({}, "stop")):
        chunks = list(c.chat.completions.create(model="anything", messages=HI, stream=True, **kwargs))
        assert chunks[0].choices[0].delta.role == "assistant" and chunks[0].model == "fdngx-sim"
        reasons = [ch.choices[0].finish_reason for ch in chunks if ch.choices]
        assert reasons[-1] == reason and reasons.count(reason) == 1
        assert chunks[-1].choices[0].delta.content is not None  # the finishing chunk is a token chunk
    full = c.chat.completions.create(model="anything", messages=HI, max_tokens=2)
    assert full.choices[0].finish_reason == "length" and full.usage is not None
    assert full.usage.prompt_tokens_details is not None and full.usage.completion_tokens_details is not None
    models = c.models.list().data
    assert [m.owned_by for m in models] == ["FastDeploy"] and models[0].id == "fdngx-sim"


def test_streams_send_headers_before_the_first_token(sims: Callable[..., SimProcess]) -> None:
    """api_server.py returns a starlette StreamingResponse once the request is in the engine: status and headers
    go out at once, the first token later (so nginx cannot retry a stream on a slow first token)."""
    sim = sims(1, extra_args=["--token-rate", "1", "--jitter", "0"])  # one step = 1 s
    t0 = time.monotonic()
    r = HTTP.post(
        f"{sim.url(0)}/v1/chat/completions",
        json={"messages": HI, "max_tokens": 2, "stream": True},
        stream=True,
        timeout=30,
    )
    t_headers = time.monotonic() - t0
    assert r.status_code == 200
    first = next(line for line in r.iter_lines() if line.startswith(b"data:"))
    t_first = time.monotonic() - t0
    assert first.startswith(b"data: {") and t_first > 0.8 and t_headers < t_first - 0.5
    r.close()


SHAPES = [
    pytest.param(False, "fastdeploy-metrics.prom", id="default"),
    pytest.param(True, "fastdeploy-metrics-legacy.prom", id="legacy"),
]


@pytest.mark.parametrize(("legacy", "fixture"), SHAPES)
def test_metrics_page_has_upstream_names_and_types(sims: Callable[..., SimProcess], legacy: bool, fixture: str) -> None:
    """fastdeploy/metrics/metrics.py (+ metrics_middleware.py for http_*, which appear after one counted call
    such as GET /v1/models): the live page has exactly the fixture's families and types, in both shapes."""
    sim = sims(1, extra_args=["--legacy-metrics"] if legacy else [])
    assert HTTP.get(f"{sim.url(0)}/v1/models", timeout=5).status_code == 200
    r = HTTP.get(f"{sim.metrics_url(0)}/metrics", timeout=5)
    assert r.headers["Content-Type"] == "text/plain; charset=utf-8"
    ours = {f.name: f.type for f in text_string_to_metric_families(r.text)}
    theirs = {f.name: f.type for f in text_string_to_metric_families(upstream(fixture))}
    assert ours == theirs


@pytest.mark.parametrize("legacy", [False, True], ids=["default", "legacy"])
def test_backlog_per_shape_on_the_wire(sims: Callable[..., SimProcess], legacy: bool) -> None:
    """Default shape: backlog = num_requests_waiting + num_requests_enqueued; legacy (FastDeploy 2.4/2.5,
    metrics.py as read): no enqueued series and num_requests_waiting stays 0 while requests wait; running,
    batch size, capacity and KV usage read the same in both."""
    sim = sims(1, max_num_seqs=1, extra_args=["--token-rate", "50"] + (["--legacy-metrics"] if legacy else []))
    socks = [open_stream(sim.ports[0]) for _ in range(4)]
    try:
        wait_for(lambda: sim.state(0)["waiting"] == 3, what="a backlog of 3")
        text = page(sim, 0)
        assert ("fastdeploy:num_requests_enqueued" in text) is not legacy
        waiting = metric(sim, 0, "fastdeploy:num_requests_waiting")
        enqueued = metric(sim, 0, "fastdeploy:num_requests_enqueued")
        assert (waiting, enqueued) == ((0, None) if legacy else (1, 2))
        assert metric(sim, 0, "fastdeploy:num_requests_running") == 1
        assert metric(sim, 0, "fastdeploy:max_batch_size") == 1
        wait_for(lambda: (metric(sim, 0, "fastdeploy:gpu_cache_usage_perc") or 0) > 0, what="KV usage")
    finally:
        for s in socks:
            s.close()
    wait_for(lambda: sim.state(0)["in_flight"] == 0, what="closed clients to leave")


def test_a_legacy_backlog_is_counted_from_the_request_counters(sims: Callable[..., SimProcess]) -> None:
    """Legacy shape (no queue gauge): fdngx's scraper reads the backlog from requests_number_total -
    request_success_total - running (common_engine.py counts a request as the engine takes it,
    token_processor.py _record_completion_metrics as it succeeds), after calibrating the requests lost without
    a success (here: streams the client closed mid-answer) while a slot was free."""
    from fdngx.domain import Engine, Instance, QueueEstimate
    from fdngx.weights.memory import PeakRunning
    from fdngx.weights.scrape import scrape_all

    sim = sims(1, max_num_seqs=1, extra_args=["--token-rate", "50", "--legacy-metrics"])
    inst = Instance("dp0", "127.0.0.1", sim.ports[0], sim.metrics_ports[0], Engine.FASTDEPLOY, max_num_seqs=1)
    memory = PeakRunning()

    def backlog() -> tuple[float, QueueEstimate | None]:
        got = scrape_all([inst], peaks=memory)["dp0"]
        assert got.ok, got.error
        return got.queued, got.queue_estimate

    def open_and_wait(n: int) -> list[socket.socket]:
        socks = [open_stream(sim.ports[0]) for _ in range(n)]
        wait_for(lambda: sim.state(0)["waiting"] == n - 1, what=f"a backlog of {n - 1}")
        return socks

    for _ in range(2):  # idle: calibrated, nothing lost
        assert backlog() == (0.0, QueueEstimate.COUNTERS)
    socks = open_and_wait(4)
    assert backlog() == (3.0, QueueEstimate.COUNTERS)
    for s in socks:  # the client goes away: four requests the engine never finishes
        s.close()
    wait_for(lambda: sim.state(0)["in_flight"] == 0, what="closed clients to leave")
    state = sim.state(0)
    assert state["requests_total"] - state["success_total"] == 4, "the sim finishes none of them as a success"
    for _ in range(2):
        assert backlog() == (0.0, QueueEstimate.COUNTERS)
    socks = open_and_wait(3)
    try:
        assert backlog() == (2.0, QueueEstimate.COUNTERS), "the four lost requests are not taken for a backlog"
    finally:
        for s in socks:
            s.close()
    wait_for(lambda: sim.state(0)["in_flight"] == 0, what="closed clients to leave")


def test_tpot_counts_every_token_on_the_wire(sims: Callable[..., SimProcess]) -> None:
    """output/token_processor.py TokenProcessor._record_metrics: one time_per_output_token_seconds observation per
    token after each request's first, so two answers of 20 and 10 tokens add 19 + 9 observations."""
    sim = sims(1, max_num_seqs=2, extra_args=["--token-rate", "200"])
    before = metric(sim, 0, "fastdeploy:time_per_output_token_seconds_count") or 0
    for max_tokens in (20, 10):
        r = HTTP.post(f"{sim.url(0)}/v1/completions", json={"prompt": "x", "max_tokens": max_tokens}, timeout=30)
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == max_tokens
    assert metric(sim, 0, "fastdeploy:time_per_output_token_seconds_count") == before + 19 + 9
    assert metric(sim, 0, "fastdeploy:generation_tokens_total") == 30
    assert (metric(sim, 0, "fastdeploy:time_per_output_token_seconds_sum") or 0) > 0
