"""`fdngx sim` as users see it: real processes, real sockets, the official openai client. No mocks.

Timing: the machine has two shared, noisy cores, so every wait polls a condition with a generous timeout
and every comparison leaves a wide margin.
"""

from __future__ import annotations

import json
import socket
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import openai
import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families

from fdngx.sim.process import SimProcess, free_ports, start_sim
from tests.support import wait_for

pytestmark = pytest.mark.timeout(120)

HTTP = requests.Session()
HTTP.trust_env = False


def metric(sim: SimProcess, i: int, name: str) -> float | None:
    text = HTTP.get(f"{sim.metrics_url(i)}/metrics", timeout=5).text
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            if s.name == name:
                return s.value
    return None


def open_stream(port: int, max_tokens: int = 4000, content: str = "hello") -> socket.socket:
    """A streaming request that stays open until the socket is closed (we never read it)."""
    body = json.dumps(
        {"messages": [{"role": "user", "content": content}], "stream": True, "max_tokens": max_tokens}
    ).encode()
    s = socket.create_connection(("127.0.0.1", port), timeout=5)
    head = (
        "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    )
    s.sendall(head.encode() + body)
    return s


def refused(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
    except ConnectionRefusedError:
        return True
    return False


@pytest.fixture
def sims() -> Iterator[Callable[..., SimProcess]]:
    """Start sims on free ports; every one is stopped at the end, pass or fail."""
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


@pytest.fixture(scope="module")
def pair() -> Iterator[SimProcess]:
    """Two replicas, the second at half speed."""
    ports = free_ports(4)
    sim = start_sim(ports[:2], ports[2:], speed=[1.0, 0.5], max_num_seqs=8, extra_args=["--token-rate", "100"])
    try:
        yield sim
    finally:
        sim.stop()


def client(sim: SimProcess, i: int = 0) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{sim.url(i)}/v1", api_key="x", max_retries=0, timeout=30)


def test_openai_client_streams_and_not(pair: SimProcess) -> None:
    c = client(pair)
    msgs = [{"role": "user", "content": "Say something."}]
    stream = c.chat.completions.create(
        model="fdngx-sim", messages=msgs, stream=True, max_tokens=10, stream_options={"include_usage": True}
    )
    chunks = list(stream)
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert len(text.split()) == 10
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 10
    assert [ch.choices[0].finish_reason for ch in chunks if ch.choices][-1] == "length"

    full = c.chat.completions.create(model="fdngx-sim", messages=msgs, max_completion_tokens=5)
    assert len((full.choices[0].message.content or "").split()) == 5 and full.usage.completion_tokens == 5

    comp = c.completions.create(model="fdngx-sim", prompt="Once upon", max_tokens=4)
    assert len(comp.choices[0].text.split()) == 4
    streamed = "".join(
        ch.choices[0].text
        for ch in c.completions.create(model="fdngx-sim", prompt="Once upon", max_tokens=6, stream=True)
        if ch.choices
    )
    assert len(streamed.split()) == 6

    assert "fdngx-sim" in [m.id for m in c.models.list()]
    raw = c.chat.completions.with_raw_response.create(model="fdngx-sim", messages=msgs, max_tokens=1)
    assert raw.headers["x-fdngx-replica"] == str(pair.ports[0])
    assert HTTP.get(f"{pair.url(1)}/health", timeout=5).headers["X-Fdngx-Replica"] == str(pair.ports[1])


def test_bad_requests_get_fastdeploys_errors(pair: SimProcess) -> None:
    """As FastDeploy answers them (fastdeploy/utils.py ExceptionHandler; api_server.py sends a handler's
    ErrorResponse as 500); every case, with its upstream source, is in tests/unit/test_sim_fidelity.py."""
    url = f"{pair.url(0)}/v1/chat/completions"
    r = HTTP.post(url, json={"max_tokens": 1}, timeout=5)
    assert r.status_code == 400 and r.json()["error"]["code"] == "missing_required_parameter"
    with pytest.raises(openai.BadRequestError) as bad:
        client(pair).chat.completions.create(model="m", messages=[{"role": "user", "content": "x"}], max_tokens="x")  # type: ignore[arg-type]
    assert bad.value.code == "invalid_value" and bad.value.param == "max_tokens"
    with pytest.raises(openai.InternalServerError):
        client(pair).chat.completions.create(model="m", messages=[], max_tokens=1)
    r = HTTP.post(url, data=b"{not json", timeout=5)
    assert r.status_code == 500 and r.json()["error"]["type"] == "internal_error"
    r = HTTP.post(url, json={"messages": [{"role": "user", "content": "x"}], "max_tokens": -3}, timeout=5)
    assert r.status_code == 500 and r.json()["error"]["param"] == "max_tokens"


def test_info_endpoints(pair: SimProcess) -> None:
    for path in ("/get_model_info", "/model_info", "/get_server_info", "/server_info", "/get_load"):
        r = HTTP.get(f"{pair.url(0)}{path}", timeout=5)
        assert r.status_code == 200, path
        assert r.json(), path
    assert HTTP.get(f"{pair.url(0)}/health_generate", timeout=5).status_code == 200
    info = HTTP.get(f"{pair.metrics_url(1)}/config-info", timeout=5).json()
    assert info["scheduler_config"]["max_num_seqs"] == 8 and info["sim"]["speed"] == 0.5


def test_slower_replica_has_higher_ttft(pair: SimProcess) -> None:
    """Same load on both replicas at once: the half-speed one answers its first token later."""
    ttfts: dict[int, list[float]] = {0: [], 1: []}
    before = {
        i: (
            metric(pair, i, "fastdeploy:time_to_first_token_seconds_sum") or 0.0,
            metric(pair, i, "fastdeploy:time_to_first_token_seconds_count") or 0.0,
        )
        for i in (0, 1)
    }

    def one(i: int) -> None:
        t0 = time.monotonic()
        for ch in client(pair, i).chat.completions.create(
            model="m", messages=[{"role": "user", "content": "z" * 4000}], max_tokens=2, stream=True
        ):
            if ch.choices and ch.choices[0].delta.content:
                ttfts[i].append(time.monotonic() - t0)
                break

    threads = [threading.Thread(target=one, args=(i,)) for i in (0, 1) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert len(ttfts[0]) == len(ttfts[1]) == 4
    assert statistics.median(ttfts[1]) > statistics.median(ttfts[0])
    server = {}
    for i in (0, 1):
        s = metric(pair, i, "fastdeploy:time_to_first_token_seconds_sum") or 0.0
        n = metric(pair, i, "fastdeploy:time_to_first_token_seconds_count") or 0.0
        server[i] = (s - before[i][0]) / (n - before[i][1])
    # Model: ~0.4 s prefill + one step at speed 1, twice that at 0.5; leave room for a noisy machine.
    assert server[1] > 1.4 * server[0]


@pytest.mark.parametrize("legacy", [False, True], ids=["default", "legacy"])
def test_metrics_track_load_and_cap_answers_429(sims: Callable[..., SimProcess], legacy: bool) -> None:
    """Both metric shapes (fastdeploy/metrics/metrics.py): the default shows the backlog as waiting + enqueued;
    the legacy shape (FastDeploy 2.4/2.5) has no enqueued series and keeps waiting at 0. The 429 comes at once
    with FastDeploy's body (api_server.py connection_manager)."""
    extra = ["--max-concurrency", "6", "--token-rate", "50"] + (["--legacy-metrics"] if legacy else [])
    sim = sims(1, max_num_seqs=2, extra_args=extra)
    socks = [open_stream(sim.ports[0]) for _ in range(6)]
    try:
        wait_for(lambda: metric(sim, 0, "fastdeploy:num_requests_running") == 2, what="running == max_num_seqs")
        wait_for(lambda: sim.state(0)["waiting"] == 4, what="a backlog of 4 in the engine")
        waiting = metric(sim, 0, "fastdeploy:num_requests_waiting")
        enqueued = metric(sim, 0, "fastdeploy:num_requests_enqueued")
        # default: one batch in the resource manager, the rest in the scheduler; legacy: nothing visible
        assert (waiting, enqueued) == ((0, None) if legacy else (2, 2))
        assert metric(sim, 0, "fastdeploy:batch_size") == 2
        assert metric(sim, 0, "fastdeploy:max_batch_size") == 2
        wait_for(lambda: (metric(sim, 0, "fastdeploy:gpu_cache_usage_perc") or 0) > 0, what="KV usage")
        state = sim.state(0)
        assert (state["running"], state["waiting"], state["in_flight"]) == (2, 4, 6)
        t0 = time.monotonic()
        r = HTTP.post(
            f"{sim.url(0)}/v1/chat/completions",
            json={"messages": [{"role": "user", "content": "x"}], "max_tokens": 1},
            timeout=10,
        )
        assert r.status_code == 429 and time.monotonic() - t0 < 3
        assert r.json() == {"detail": "Too many requests,current max concurrency is 6"}
        assert r.headers["X-Fdngx-Replica"] == str(sim.ports[0])
    finally:
        for s in socks:
            s.close()
    wait_for(lambda: sim.state(0)["in_flight"] == 0, what="closed clients to leave")
    assert metric(sim, 0, "fastdeploy:num_requests_running") == 0
    assert metric(sim, 0, "fastdeploy:requests_number_total") == 6
    assert metric(sim, 0, "fastdeploy:num_requests_waiting") == 0


@pytest.fixture(scope="module")
def faulty() -> Iterator[SimProcess]:
    """One replica per fault, so the fault tests cannot disturb each other."""
    ports = free_ports(16)
    sim = start_sim(ports[:8], ports[8:], max_num_seqs=4, extra_args=["--token-rate", "100"])
    try:
        yield sim
    finally:
        sim.stop()


def chat(sim: SimProcess, i: int, timeout: float | tuple[float, float] = 10, **kw: Any) -> requests.Response:
    body = {"messages": [{"role": "user", "content": "x"}], "max_tokens": 1, **kw}
    return HTTP.post(f"{sim.url(i)}/v1/chat/completions", json=body, timeout=timeout)


def test_fault_unhealthy(faulty: SimProcess) -> None:
    faulty.fault(0, unhealthy=True)
    for path in ("/health", "/ping"):
        r = HTTP.get(f"{faulty.url(0)}{path}", timeout=5)
        assert (r.status_code, r.text) == (404, "Worker Service Not Healthy")
    assert faulty.state(0)["healthy"] is False
    assert chat(faulty, 0).status_code == 200  # only health checks see it
    faulty.fault(0, unhealthy=False)
    assert HTTP.get(f"{faulty.url(0)}/health", timeout=5).status_code == 200


def test_fault_error_rate(faulty: SimProcess) -> None:
    faulty.fault(1, error_rate=1.0)
    r = chat(faulty, 1)
    assert r.status_code == 500 and r.json()["error"]["type"] == "internal_error"
    faulty.fault(1, error_rate=0.5)
    codes = [chat(faulty, 1).status_code for _ in range(40)]
    assert set(codes) == {200, 500} and 6 <= codes.count(500) <= 34
    faulty.fault(1, error_rate=0.0)
    assert chat(faulty, 1).status_code == 200


def test_fault_hang(faulty: SimProcess) -> None:
    faulty.fault(2, hang=True)
    with pytest.raises(requests.ReadTimeout):
        chat(faulty, 2, timeout=(3, 0.5))
    s = open_stream(faulty.ports[2], max_tokens=1)
    try:
        wait_for(lambda: faulty.state(2)["hung"] >= 1, what="a hung request")
    finally:
        s.close()
    wait_for(lambda: faulty.state(2)["in_flight"] == 0, what="hung clients to leave")
    faulty.fault(2, hang=False)
    assert chat(faulty, 2).status_code == 200


def test_fault_metrics_delay(faulty: SimProcess) -> None:
    faulty.fault(3, metrics_delay=1.0)
    t0 = time.monotonic()
    assert HTTP.get(f"{faulty.metrics_url(3)}/metrics", timeout=10).status_code == 200
    assert time.monotonic() - t0 >= 0.9
    with pytest.raises(requests.ReadTimeout):
        HTTP.get(f"{faulty.metrics_url(3)}/metrics", timeout=(3, 0.3))
    faulty.fault(3, metrics_delay=0)
    assert metric(faulty, 3, "fastdeploy:max_batch_size") == 4


def test_fault_garbage_metrics(faulty: SimProcess) -> None:
    faulty.fault(4, garbage_metrics=True)
    r = HTTP.get(f"{faulty.metrics_url(4)}/metrics", timeout=5)
    assert r.status_code == 200
    with pytest.raises(ValueError):
        list(text_string_to_metric_families(r.text))
    faulty.fault(4, garbage_metrics=False)
    assert metric(faulty, 4, "fastdeploy:max_batch_size") == 4


def test_fault_speed(faulty: SimProcess) -> None:
    assert faulty.fault(5, speed=0.25)["speed"] == 0.25
    assert chat(faulty, 5).status_code == 200
    # A step at batch 1 is 10 ms at speed 1 (token rate 100); at 0.25 it is 40 ms, give or take jitter.
    assert (metric(faulty, 5, "fastdeploy:infer_latency") or 0) > 0.03
    faulty.fault(5, speed=1.0)


def test_fault_crash_closes_only_that_replica(faulty: SimProcess) -> None:
    faulty.fault(6, crash=True)
    wait_for(lambda: refused(faulty.ports[6]) and refused(faulty.metrics_ports[6]), what="replica 6 sockets closed")
    assert faulty.alive()
    assert chat(faulty, 7).status_code == 200


def test_fault_requests_are_checked(faulty: SimProcess) -> None:
    url = f"{faulty.metrics_url(7)}/sim/fault"
    for body in ({"error_rate": 3}, {"boom": True}, {}):
        r = HTTP.post(url, json=body, timeout=5)
        assert r.status_code == 400, body
    assert HTTP.post(url, data=b"{nope", timeout=5).status_code == 400


def test_startup_fault_flags(sims: Callable[..., SimProcess]) -> None:
    sim = sims(2, extra_args=["--unhealthy", "--error-rate", "1"])
    for i in (0, 1):
        assert HTTP.get(f"{sim.url(i)}/health", timeout=5).status_code == 404
        assert chat(sim, i).status_code == 500


def test_crash_of_every_replica_ends_the_process(sims: Callable[..., SimProcess]) -> None:
    sim = sims(1, extra_args=["--crash-after", "1.0"])
    wait_for(lambda: not sim.alive(), timeout=15, what="the sim to exit")
    assert sim.proc.returncode == 1


def test_sigterm_exits_fast_with_open_streams(sims: Callable[..., SimProcess]) -> None:
    sim = sims(1, max_num_seqs=1)
    socks = [open_stream(sim.ports[0]) for _ in range(3)]
    try:
        wait_for(lambda: sim.state(0)["in_flight"] == 3, what="3 requests in flight")
        t0 = time.monotonic()
        assert sim.stop() == 0
        assert time.monotonic() - t0 < 4
    finally:
        for s in socks:
            s.close()


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "fdngx.cli", "sim", *args],
        capture_output=True,
        text=True,
        timeout=30,
        stdin=subprocess.DEVNULL,
    )


@pytest.mark.parametrize(
    ("args", "code", "needle"),
    [
        (["--ports", "1,2", "--metrics-ports", "3"], 2, "--metrics-ports has 1"),
        (["--ports", "70000", "--metrics-ports", "3"], 2, "out of range"),
        (["--ports", "5,5", "--metrics-ports", "6,7"], 2, "given twice"),
        (["--ports", "5", "--metrics-ports", "6", "--error-rate", "2"], 2, "--error-rate must be in"),
    ],
)
def test_cli_rejects_bad_options(args: list[str], code: int, needle: str) -> None:
    r = run_cli(*args)
    assert r.returncode == code, r.stderr
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and needle in lines[0], r.stderr


def test_cli_busy_port_is_a_one_line_error() -> None:
    busy = socket.socket()
    try:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        (other,) = free_ports(1)
        r = run_cli("--ports", str(port), "--metrics-ports", str(other))
    finally:
        busy.close()
    assert r.returncode == 1
    errors = [ln for ln in r.stderr.splitlines() if "error" in ln]
    assert len(errors) == 1 and f"127.0.0.1:{port}" in errors[0], r.stderr
