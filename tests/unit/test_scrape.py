"""Scraping: engine metric names -> LoadSample; one bad instance never delays or breaks the others."""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import prometheus_client.parser
import pytest

from fdngx.domain import Engine, Instance, Load, LoadSample
from fdngx.engines import spec
from fdngx.weights.fetch import HttpClient
from fdngx.weights.scrape import (
    MAX_PARSED_BYTES,
    MAX_PARSED_LINE,
    load_from_metrics,
    make_client,
    parse_metrics,
    scrape_all,
    wanted_names,
)

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures"
FD_PAGE = (FIXTURES / "fastdeploy-metrics-sample.prom").read_text()

FD_MINIMAL = """# TYPE fastdeploy:num_requests_running gauge
fastdeploy:num_requests_running {running}
# TYPE fastdeploy:num_requests_waiting gauge
fastdeploy:num_requests_waiting {waiting}
# TYPE fastdeploy:gpu_cache_usage_perc gauge
fastdeploy:gpu_cache_usage_perc 0.5
"""


def _load(text: str, engine: str) -> Load:
    # The scraper parses only the series it uses; both ways must agree.
    full = load_from_metrics(parse_metrics(text), spec(engine))
    assert load_from_metrics(parse_metrics(text, wanted_names(spec(engine))), spec(engine)) == full
    return full


# -- parsing -----------------------------------------------------------------------------------------


def test_fastdeploy_sample_page() -> None:
    got = _load(FD_PAGE, "fastdeploy")
    # 3 running, 2 waiting + 0 queuing, 0.1875 KV, max_batch_size 64 (see the fixture's header)
    # TPOT histogram: 9663.2 s over 401267 tokens
    assert got == Load(
        running=3.0,
        queued=2.0,
        kv_usage=0.1875,
        capacity=64.0,
        queued_reliable=True,
        tpot_sum=9663.2,
        tpot_count=401267.0,
        queue_time_sum=188.4,  # fastdeploy:request_queue_time_seconds_sum: waits, for a backlog estimate
        unfinished=7.0,  # fastdeploy:requests_number_total 1287 - fastdeploy:request_success_total 1280
    )


def test_fastdeploy_queued_adds_waiting_and_enqueued() -> None:
    page = FD_PAGE.replace("fastdeploy:num_requests_enqueued 0.0", "fastdeploy:num_requests_enqueued 7.0")
    assert _load(page, "fastdeploy").queued == 9.0


# FastDeploy's own CI test (PaddlePaddle/FastDeploy tests/ci_use/metrics/test_metrics.py,
# test_metrics_with_too_many_requests): max_num_seqs 1, 10 requests sent: running == 1 and
# enqueued + waiting == 9. The series came with PR #5798; enqueued's help text is docs/online_serving/metrics.md's
# (preempted's was not read; it is not part of the backlog fdngx counts).
FD_CI_PAGE = """# HELP fastdeploy:num_requests_running Number of requests currently running
# TYPE fastdeploy:num_requests_running gauge
fastdeploy:num_requests_running 1.0
# HELP fastdeploy:num_requests_waiting Number of requests currently waiting
# TYPE fastdeploy:num_requests_waiting gauge
fastdeploy:num_requests_waiting 3.0
# TYPE fastdeploy:num_requests_preempted gauge
fastdeploy:num_requests_preempted 0.0
# HELP fastdeploy:num_requests_enqueued Number of requests to be scheduled
# TYPE fastdeploy:num_requests_enqueued gauge
fastdeploy:num_requests_enqueued 6.0
# HELP fastdeploy:max_batch_size Maximum batch size determined when service started
# TYPE fastdeploy:max_batch_size gauge
fastdeploy:max_batch_size 1.0
"""


@pytest.mark.parametrize("fast", [True, False], ids=["line-filter", "whole-page"])
def test_fastdeploy_backlog_is_waiting_plus_enqueued_as_its_ci_test_says(fast: bool) -> None:
    """Read the series under a name no FastDeploy serves (`num_requests_queuing`), fdngx called every
    current build "old" and dropped its backlog: a replica 22 deep looked like one 2 deep."""
    fd = spec(Engine.FASTDEPLOY)
    got = load_from_metrics(parse_metrics(FD_CI_PAGE, wanted_names(fd) if fast else None), fd)
    assert got.queued_reliable is True
    assert got.queued == 9.0


def test_fastdeploy_reads_num_requests_queuing_in_its_place_never_both() -> None:
    """The name a 2026-04 pull request gave the series is read where a build serves it instead; a page with
    both (none known) counts the backlog once."""
    queuing = FD_CI_PAGE.replace("num_requests_enqueued", "num_requests_queuing")
    got = _load(queuing, "fastdeploy")
    assert (got.queued, got.queued_reliable) == (9.0, True)
    both = FD_CI_PAGE + "fastdeploy:num_requests_queuing 6.0\n"
    assert _load(both, "fastdeploy").queued == 9.0


def test_old_fastdeploy_without_enqueued_marks_queue_unreliable() -> None:
    page = "\n".join(line for line in FD_PAGE.splitlines() if "num_requests_enqueued" not in line)
    got = _load(page, "fastdeploy")
    assert got.queued_reliable is False
    assert got.queued == 2.0


def test_vllm_sums_running_over_engines_and_takes_max_kv() -> None:
    got = _load((FIXTURES / "vllm-metrics-sample.prom").read_text(), "vllm")
    assert got == Load(
        running=7.0,
        queued=3.0,
        kv_usage=0.5,
        capacity=None,
        queued_reliable=True,
        tpot_sum=30.0,  # the newer name, summed over engines
        tpot_count=1500.0,
    )


def test_vllm_old_kv_name_still_read() -> None:
    page = (FIXTURES / "vllm-metrics-sample.prom").read_text().replace("kv_cache_usage_perc", "gpu_cache_usage_perc")
    assert _load(page, "vllm").kv_usage == 0.5


def test_sglang_page() -> None:
    got = _load((FIXTURES / "sglang-metrics-sample.prom").read_text(), "sglang")
    assert got == Load(
        running=11.0,
        queued=4.0,
        kv_usage=0.92,
        capacity=None,
        queued_reliable=True,
        tpot_sum=9.6,  # the older name: read when the newer one is absent
        tpot_count=320.0,
    )


def test_a_page_without_tpot_still_gives_a_load() -> None:
    page = "\n".join(line for line in FD_PAGE.splitlines() if "time_per_output_token" not in line)
    got = _load(page, "fastdeploy")
    assert (got.running, got.tpot_sum, got.tpot_count) == (3.0, None, None)


@pytest.mark.parametrize(
    ("page", "needle"),
    [
        ("this is { not prometheus\n", None),
        (FD_MINIMAL.format(running="NaN", waiting=1), "non-finite"),
        (FD_MINIMAL.format(running="+Inf", waiting=1), "non-finite"),
        (FD_MINIMAL.format(running=-3, waiting=1), "negative"),
        ("# TYPE fastdeploy:num_requests_waiting gauge\nfastdeploy:num_requests_waiting 1\n", "missing series"),
        ("# TYPE fastdeploy:num_requests_running gauge\nfastdeploy:num_requests_running 1\n", "missing series"),
        (FD_PAGE[: len(FD_PAGE) // 2] + "\nfastdeploy:num_requests_running{{{ 1\n", None),
    ],
)
def test_bad_pages_raise_value_error(page: str, needle: str | None) -> None:
    with pytest.raises(ValueError, match=needle):
        _load(page, "fastdeploy")


def test_percent_kv_is_normalised() -> None:
    page = FD_MINIMAL.format(running=1, waiting=0).replace("0.5", "93.0")
    assert _load(page, "fastdeploy").kv_usage == pytest.approx(0.93)


# -- HTTP: a real local server per instance ------------------------------------------------------------

Behaviour = Callable[[BaseHTTPRequestHandler], None]
STOP = threading.Event()


def _send(h: BaseHTTPRequestHandler, status: int, body: bytes) -> None:
    h.send_response(status)
    h.send_header("Content-Type", "text/plain")
    h.send_header("Content-Length", str(len(body)))
    h.end_headers()
    h.wfile.write(body)


def good(page: str = FD_PAGE, health: int = 200) -> Behaviour:
    def serve(h: BaseHTTPRequestHandler) -> None:
        if h.path == "/health":
            _send(h, health, b"" if health == 200 else b"Worker Service Not Healthy")
        else:
            _send(h, 200, page.encode())

    return serve


def slow(h: BaseHTTPRequestHandler) -> None:
    STOP.wait(5.0)  # never answers within any sane timeout


def drip(h: BaseHTTPRequestHandler) -> None:
    if h.path == "/health":
        return _send(h, 200, b"")
    h.send_response(200)
    h.send_header("Content-Length", str(10_000_000))
    h.end_headers()
    # One byte every 0.2 s: each read is under the read timeout, the whole never ends.
    for _ in range(100):
        if STOP.wait(0.2):
            return
        try:
            h.wfile.write(b"#")
            h.wfile.flush()
        except OSError:
            return


def huge(h: BaseHTTPRequestHandler) -> None:
    if h.path == "/health":
        return _send(h, 200, b"")
    h.send_response(200)
    h.end_headers()
    line = b"# filler comment line that makes the page enormous\n" * 1000
    try:
        for _ in range(2000):  # ~100 MB unless the client hangs up
            h.wfile.write(line)
    except OSError:
        return


@pytest.fixture
def servers() -> Iterator[Callable[[Behaviour], Instance]]:
    STOP.clear()
    started: list[ThreadingHTTPServer] = []

    def make(behaviour: Behaviour) -> Instance:
        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self) -> None:
                behaviour(self)

            def log_message(self, *args: object) -> None:
                pass

        srv = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        srv.daemon_threads = True
        srv.block_on_close = False
        threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        started.append(srv)
        port = srv.server_address[1]
        return Instance(f"dp{len(started) - 1}", "127.0.0.1", port, port, "fastdeploy")

    yield make
    STOP.set()
    for srv in started:
        srv.shutdown()
        srv.server_close()


def test_good_instances_scraped(servers: Callable[[Behaviour], Instance]) -> None:
    insts = [servers(good()), servers(good(FD_MINIMAL.format(running=9, waiting=4)))]
    got = scrape_all(insts, now=lambda: 1234.0)
    a, b = got["dp0"], got["dp1"]
    assert a.ok and a.healthy and a.error is None
    assert (a.running, a.queued, a.capacity, a.scraped_at) == (3.0, 2.0, 64.0, 1234.0)
    assert b.ok and (b.running, b.queued, b.capacity) == (9.0, 4.0, None)
    assert b.queued_reliable is False  # minimal page has no num_requests_enqueued
    assert 0 < a.latency < 1.0


def test_health_other_than_200_is_unhealthy(servers: Callable[[Behaviour], Instance]) -> None:
    got = scrape_all([servers(good(health=404)), servers(good(health=304))])
    assert not got["dp0"].healthy and got["dp0"].health_error == "404"
    assert not got["dp1"].healthy and got["dp1"].health_error == "304"
    assert got["dp0"].ok  # metrics are still read: health and load are separate facts


@pytest.mark.parametrize(
    ("bad", "needle"),
    [
        (good("\x00\x01garbage { { {\n" * 50), "bad metrics"),
        (good(FD_MINIMAL.format(running="NaN", waiting=0)), "non-finite"),
        (good("# nothing here\n"), "missing series"),
        (huge, "over"),
        (drip, "deadline"),
        (slow, "read timeout"),
    ],
    ids=["garbage", "nan", "missing", "huge", "drip", "slow"],
)
def test_one_bad_instance_does_not_hurt_the_others(
    servers: Callable[[Behaviour], Instance], bad: Behaviour, needle: str
) -> None:
    insts = [servers(good()), servers(bad), servers(good())]
    session = HttpClient()
    t0 = time.monotonic()
    try:
        got = scrape_all(insts, session=session, timeout=0.5, connect_timeout=0.5, deadline=1.0, max_bytes=256 * 1024)
    finally:
        session.close()
    elapsed = time.monotonic() - t0
    assert elapsed < 3.0, f"scrape took {elapsed:.2f}s despite a 1 s deadline"  # the bad one holds 5 s
    assert got["dp0"].ok and got["dp2"].ok
    assert (got["dp0"].running, got["dp2"].running) == (3.0, 3.0)
    broken = got["dp1"]
    assert isinstance(broken, LoadSample)
    assert not broken.ok and broken.error and needle in broken.error
    assert not math.isnan(broken.running)


def test_refused_connection_is_a_sample_not_an_exception(servers: Callable[[Behaviour], Instance]) -> None:
    good_one = servers(good())
    dead = Instance("dead", "127.0.0.1", 9, 9, Engine.FASTDEPLOY)  # discard port: nothing listens
    session = HttpClient()
    got = scrape_all([good_one, dead], session=session, timeout=0.5, deadline=1.0)
    session.close()
    assert got["dp0"].ok
    assert not got["dead"].ok and not got["dead"].healthy
    assert got["dead"].error == "connection refused" and got["dead"].health_error == "connection refused"


def test_vllm_metrics_come_from_the_api_port(servers: Callable[[Behaviour], Instance]) -> None:
    inst = servers(good((FIXTURES / "vllm-metrics-sample.prom").read_text()))
    # A wrong metrics_port must not matter: vLLM serves /metrics on the API port.
    vllm = Instance("v", inst.host, inst.port, 9, Engine.VLLM)
    got = scrape_all([vllm])["v"]
    assert got.ok and got.running == 7.0


def test_empty_inventory() -> None:
    assert scrape_all([]) == {}


def test_client_reuses_connections_across_cycles_and_survives_server_closing_them(
    servers: Callable[[Behaviour], Instance],
) -> None:
    inst = servers(good())
    client = HttpClient()
    try:
        for _ in range(3):
            assert scrape_all([inst], session=client)["dp0"].ok
        idle = client._idle[("127.0.0.1", inst.port)]
        assert idle, "keep-alive connections are kept for the next cycle"
        for conn in idle:  # the server side drops them (as an idle timeout would)
            assert conn.sock is not None
            conn.sock.shutdown(2)
        got = scrape_all([inst], session=client)["dp0"]
        assert got.ok and got.healthy, got
    finally:
        client.close()


def test_only_the_used_series_are_parsed() -> None:
    # Garbage on lines we do not use is not our business; garbage on a line we use is an error.
    fd = spec("fastdeploy")
    page = FD_PAGE + "\nsome_other_metric{{{ broken\n"
    assert load_from_metrics(parse_metrics(page, wanted_names(fd)), fd).running == 3.0
    page = FD_PAGE.replace("fastdeploy:num_requests_waiting 2.0", "fastdeploy:num_requests_waiting{oops=} x")
    with pytest.raises(ValueError):
        load_from_metrics(parse_metrics(page, wanted_names(fd)), fd)


def _escaped_line(value_bytes: int) -> str:
    return 'fastdeploy:num_requests_running{a="' + '\\"' * (value_bytes // 2) + '"} 1\n'


@pytest.mark.parametrize(
    ("page", "needle"),
    [
        # prometheus_client's parser is quadratic in a line's escapes: 1 MB of them cost it ~25 s of CPU.
        (FD_PAGE + _escaped_line(MAX_PARSED_LINE), f"a line of {len(_escaped_line(MAX_PARSED_LINE)) - 1} bytes"),
        (FD_PAGE + _escaped_line(1000) * (MAX_PARSED_BYTES // 1000), "bytes of lines for the series fdngx reads"),
    ],
    ids=["long-line", "many-lines"],
)
def test_lines_the_parser_would_spend_seconds_on_are_refused_before_it(page: str, needle: str) -> None:
    fd = spec("fastdeploy")
    with pytest.raises(ValueError, match=needle):
        parse_metrics(page, wanted_names(fd))


def test_the_largest_page_within_the_bounds_is_still_read() -> None:
    fd = spec("fastdeploy")
    line = _escaped_line(MAX_PARSED_LINE - 50)
    # Each line its own label set (n="..."): a label set repeated would be refused as a duplicate series.
    count = (MAX_PARSED_BYTES - len(FD_PAGE)) // (len(line) + 9)
    lines = [line.replace('"} 1', f'",n="{i}"}} 1') for i in range(count)]
    assert max(map(len, lines)) <= MAX_PARSED_LINE + 1
    page = FD_PAGE + "".join(lines)
    values = parse_metrics(page, wanted_names(fd))
    assert len(values["fastdeploy:num_requests_running"]) > 1  # through the parser, every label set read


def test_a_page_that_does_not_parse_is_parsed_once_per_scrape(
    servers: Callable[[Behaviour], Instance], monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = []
    real = prometheus_client.parser.text_string_to_metric_families

    def counting(text: str) -> Iterator[object]:
        calls.append(len(text))
        return real(text)

    monkeypatch.setattr(prometheus_client.parser, "text_string_to_metric_families", counting)  # scrape's import
    for session in (HttpClient(), make_client()):  # the worker pool and the batch loop
        calls.clear()
        try:
            got = scrape_all([servers(good(FD_PAGE + 'fastdeploy:num_requests_running{a="\\""} x\n'))],
                             session=session, deadline=2.0)
        finally:
            session.close()
        sample = next(iter(got.values()))
        assert not sample.ok and sample.error is not None and sample.error.startswith("bad metrics")
        assert len(calls) == 1, f"{type(session).__name__}: parsed {len(calls)} times"


def test_an_instance_registered_without_a_metrics_port_is_health_checked_with_no_load_signal(
    servers: Callable[[Behaviour], Instance],
) -> None:
    inst = servers(good())
    inst.extra["metrics_source"] = "none"  # what the registry writes when it finds no metrics port
    got = scrape_all([inst])[inst.name]
    assert got.healthy and not got.ok
    assert got.error is not None and got.error.startswith("no load signal")
