"""Capacity learned from the engines: SGLang's /server_info (/get_server_info before), and the observed running
peak as a floor under a guessed capacity (vLLM states none). Loopback HTTP servers only; the scrape stays bounded."""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Iterator
from dataclasses import replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from fdngx.domain import Engine, Instance, Load, LoadSample, QueueEstimate
from fdngx.weights.fetch import Fetch, HttpClient
from fdngx.weights.memory import PeakRunning, capacity_from_server_info, learn_capacity, peaks_for
from fdngx.weights.sample import describe
from fdngx.weights.scrape import scrape_all
from fdngx.weights.state import InstanceState

UPSTREAM = Path(__file__).resolve().parent.parent / "fixtures" / "upstream"
SGLANG_INFO = (UPSTREAM / "sglang-server-info.json").read_bytes()
STOP = threading.Event()


def sglang_page(running: float) -> str:
    return (
        "# TYPE sglang:num_running_reqs gauge\n"
        f'sglang:num_running_reqs{{tp_rank="0"}} {running}\n'
        "# TYPE sglang:num_queue_reqs gauge\n"
        'sglang:num_queue_reqs{tp_rank="0"} 0\n'
        "# TYPE sglang:token_usage gauge\n"
        'sglang:token_usage{tp_rank="0"} 0.1\n'
    )


def vllm_page(running: float) -> str:
    return (
        "# TYPE vllm:num_requests_running gauge\n"
        f'vllm:num_requests_running{{engine="0"}} {running}\n'
        "# TYPE vllm:num_requests_waiting gauge\n"
        'vllm:num_requests_waiting{engine="0"} 0\n'
    )


class Replica:
    """A loopback replica whose pages the test changes between scrapes."""

    def __init__(self) -> None:
        self.pages: dict[str, tuple[int, bytes]] = {"/health": (200, b"")}
        self.hang: set[str] = set()
        self.hits: list[str] = []
        owner = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self) -> None:
                owner.hits.append(self.path)
                if self.path in owner.hang:
                    STOP.wait(5.0)
                    return
                status, body = owner.pages.get(self.path, (404, b"no"))
                self.send_response(status)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: object) -> None:
                pass

        self.srv = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.srv.daemon_threads = True
        self.srv.block_on_close = False
        threading.Thread(target=self.srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        self.port = self.srv.server_address[1]

    def instance(self, engine: Engine, max_num_seqs: int, **extra: Any) -> Instance:
        return Instance("r", "127.0.0.1", self.port, self.port, engine, max_num_seqs, extra=dict(extra))


@pytest.fixture
def replica() -> Iterator[Callable[[], Replica]]:
    STOP.clear()
    made: list[Replica] = []

    def make() -> Replica:
        made.append(Replica())
        return made[-1]

    yield make
    STOP.set()
    for r in made:
        r.srv.shutdown()
        r.srv.server_close()


# -- pure -------------------------------------------------------------------------------------------------


def test_server_info_states_sglang_capacity() -> None:
    # The fixture reconstructed from SGLang's http_server.py: max_running_requests 128, set by the user.
    assert capacity_from_server_info(SGLANG_INFO) == 128.0
    doc = json.loads(SGLANG_INFO)
    # Newer schedulers: the effective limit per DP rank; the server's is their sum (DP attention: 2 ranks).
    doc["max_running_requests"] = None
    doc["internal_states"] = [{"effective_max_running_requests_per_dp": 48}] * 2
    assert capacity_from_server_info(json.dumps(doc).encode()) == 96.0
    # A rank without the field: fall back to the server argument (null here: nothing stated).
    doc["internal_states"][1] = {"last_gen_throughput": 1.0}
    assert capacity_from_server_info(json.dumps(doc).encode()) is None


@pytest.mark.parametrize(
    "body",
    [b"", b"not json", b"[1,2]", b'{"max_running_requests": true}', b'{"max_running_requests": "128"}',
     b'{"max_running_requests": 0}', b'{"max_running_requests": NaN}', b'{"max_running_requests": -5}',
     b'{"internal_states": [{"effective_max_running_requests_per_dp": 1e400}]}', b"[" * 100_000],
)  # fmt: skip
def test_server_info_garbage_states_nothing(body: bytes) -> None:
    assert capacity_from_server_info(body) is None


def test_server_info_is_clamped() -> None:
    assert capacity_from_server_info(b'{"max_running_requests": 1e300}') == 1_000_000.0


def test_peak_is_a_floor_only_under_a_guessed_capacity() -> None:
    peaks = PeakRunning()
    guessed = Instance("v", "127.0.0.1", 8001, 8001, Engine.VLLM, 256, extra={"capacity_guessed": True})
    known = Instance("k", "127.0.0.1", 8002, 8002, Engine.VLLM, 256)
    assert learn_capacity(Load(running=100.0), guessed, None, peaks).capacity is None  # under the guess: no news
    assert learn_capacity(Load(running=600.0), guessed, None, peaks).capacity == 600.0
    assert learn_capacity(Load(running=10.0), guessed, None, peaks).capacity == 600.0  # a floor: it stays
    assert learn_capacity(Load(running=600.0), known, None, peaks).capacity is None  # a known setting is not a guess
    peaks.forget(guessed)
    assert learn_capacity(Load(running=10.0), guessed, None, peaks).capacity is None
    # What the engine states wins over the floor, and both stay within the inventory's trust band (8x).
    info = Fetch(200, b'{"max_running_requests": 1000}', 0.01, None)
    assert learn_capacity(Load(running=900.0), guessed, info, PeakRunning()).capacity == 1000.0
    assert learn_capacity(Load(running=5000.0), guessed, None, PeakRunning()).capacity == 2048.0
    failed = Fetch(None, b"", 0.01, "timed out")
    assert learn_capacity(Load(running=1.0, capacity=64.0), guessed, failed, PeakRunning()).capacity == 64.0


def test_peak_memory_is_bounded() -> None:
    peaks = PeakRunning()
    for i in range(PeakRunning.LIMIT + 50):
        inst = Instance(f"r{i}", "127.0.0.1", 1000 + i % 60000, 1, Engine.VLLM)
        peaks.see(inst, 1.0)
        peaks.queue_rate(Instance(f"q{i}", "127.0.0.1", 1000, 1, Engine.VLLM), 1.0, 1.0)
        peaks.backlog(Instance(f"b{i}", "127.0.0.1", 1000, 1, Engine.VLLM), 3.0, 1.0, 2.0)
    assert peaks.remembered() == PeakRunning.LIMIT


# -- scraping real sockets --------------------------------------------------------------------------------


def test_sglang_capacity_from_its_info_page(replica: Callable[[], Replica]) -> None:
    r = replica()
    r.pages["/metrics"] = (200, sglang_page(11).encode())
    r.pages["/server_info"] = (200, SGLANG_INFO)
    client = HttpClient()
    try:
        got = scrape_all([r.instance(Engine.SGLANG, 256, capacity_guessed=True)], session=client)["r"]
    finally:
        client.close()
    assert got.ok and got.running == 11.0 and got.capacity == 128.0
    assert "/server_info" in r.hits and "/get_server_info" not in r.hits  # the deprecated alias logs a WARNING


def test_a_one_off_scrape_asks_the_info_path_every_sglang_serves(replica: Callable[[], Replica]) -> None:
    # status and cron have no next cycle to move on to after a 404: an older SGLang serves only this path.
    r = replica()
    r.pages["/metrics"] = (200, sglang_page(11).encode())
    r.pages["/get_server_info"] = (200, SGLANG_INFO)
    assert scrape_all([r.instance(Engine.SGLANG, 256, capacity_guessed=True)])["r"].capacity == 128.0
    assert [h for h in r.hits if "server_info" in h] == ["/get_server_info"]


def test_the_info_page_is_read_once_a_minute_and_an_older_sglangs_path_after_a_404(
    replica: Callable[[], Replica]
) -> None:
    # Older SGLang serves only /get_server_info; its answer asks every DP scheduler, so not every cycle.
    r = replica()
    r.pages["/metrics"] = (200, sglang_page(11).encode())
    r.pages["/get_server_info"] = (200, SGLANG_INFO)
    inst = r.instance(Engine.SGLANG, 256, capacity_guessed=True)
    client = HttpClient()
    try:
        capacities = [scrape_all([inst], session=client)["r"].capacity for _ in range(4)]
    finally:
        client.close()
    assert capacities == [None, 128.0, 128.0, 128.0]  # the first cycle found /server_info missing
    assert [h for h in r.hits if "server_info" in h] == ["/server_info", "/get_server_info"]


@pytest.mark.parametrize("broken", ["500", "hang", "garbage"])
def test_a_broken_info_page_is_no_error_and_keeps_the_scrape_bounded(
    replica: Callable[[], Replica], broken: str
) -> None:
    import time

    r = replica()
    r.pages["/metrics"] = (200, sglang_page(3).encode())
    if broken == "500":
        r.pages["/get_server_info"] = (500, b"oops")
    elif broken == "hang":
        r.hang.add("/get_server_info")
    else:
        r.pages["/get_server_info"] = (200, b"{" * 50_000)
    t0 = time.monotonic()
    got = scrape_all([r.instance(Engine.SGLANG, 48)], timeout=0.5, deadline=1.0)["r"]
    assert time.monotonic() - t0 < 3.0
    assert got.ok and got.error is None and got.healthy
    assert got.running == 3.0 and got.capacity is None  # the policy falls back to the inventory's 48


def test_a_session_forgets_the_replicas_that_left_its_inventory(replica: Callable[[], Replica]) -> None:
    # A replica that leaves the inventory alive is never refused: it was remembered until LIMIT pushed out the
    # oldest entries, which may be replicas still serving (their learned peaks lost).
    r = replica()
    r.pages["/metrics"] = (200, vllm_page(700).encode())
    stays = r.instance(Engine.VLLM, 256, capacity_guessed=True)
    leaves = replace(stays, name="gone")
    client = HttpClient()
    try:
        scrape_all([stays, leaves], session=client)
        peaks = peaks_for(client)
        assert peaks.remembered() == 2
        r.pages["/metrics"] = (200, vllm_page(20).encode())
        assert scrape_all([stays], session=client)["r"].capacity == 700.0  # the one kept keeps its peak
        assert peaks.remembered() == 1
        peaks.keep_only([replace(stays, port=stays.port + 1)])  # the name at another address: another server
        assert peaks.remembered() == 0
    finally:
        client.close()


def test_vllm_guessed_capacity_learns_the_running_peak_within_one_session(replica: Callable[[], Replica]) -> None:
    r = replica()
    inst = r.instance(Engine.VLLM, 256, capacity_guessed=True)
    client = HttpClient()
    try:
        r.pages["/metrics"] = (200, vllm_page(700).encode())
        assert scrape_all([inst], session=client)["r"].capacity == 700.0
        r.pages["/metrics"] = (200, vllm_page(20).encode())
        assert scrape_all([inst], session=client)["r"].capacity == 700.0  # the session remembers the peak
        assert scrape_all([inst])["r"].capacity is None  # a one-off scrape knows only what it saw
    finally:
        client.close()
    # vLLM has no info page: no extra GET is made for it.
    assert set(r.hits) == {"/metrics", "/health"}


def test_a_legacy_backlog_is_estimated_from_queue_times() -> None:
    """FastDeploy without num_requests_enqueued: `waiting` says nothing. The queue-time histogram's sum grew by
    6 s in 2 s: on average 3 requests waited (Little's law)."""
    from fdngx.weights.memory import estimate_queue

    inst = Instance("dp0", "127.0.0.1", 8001, 9001, Engine.FASTDEPLOY)
    memory = PeakRunning()
    first = Load(running=16.0, queued=0.0, capacity=16.0, queued_reliable=False, queue_time_sum=100.0)
    assert estimate_queue(first, inst, memory, at=1000.0) == first, "one read says nothing yet"
    later = estimate_queue(replace(first, queue_time_sum=106.0), inst, memory, at=1002.0)
    assert later.queued == pytest.approx(3.0) and later.queued_reliable
    assert later.queue_estimate is QueueEstimate.QUEUE_TIMES
    reset = estimate_queue(replace(first, queue_time_sum=1.0), inst, memory, at=1004.0)
    assert reset.queue_estimate is None, "a restarted engine's counter starts over: no estimate from it"
    reliable = Load(running=4.0, queued=2.0, queue_time_sum=110.0, unfinished=9.0)
    other = Instance("dp1", "127.0.0.1", 8002, 9002, Engine.FASTDEPLOY)
    assert estimate_queue(reliable, other, memory, at=1006.0) == reliable, "a reported queue is used as it is"
    assert memory.remembered() == 1, "and a replica that reports its queue costs no memory"


def _counted(memory: PeakRunning, inst: Instance, unfinished: float, running: float, slots: float = 16.0) -> Load:
    from fdngx.weights.memory import estimate_queue

    load = Load(running=running, queued=0.0, capacity=slots, queued_reliable=False, unfinished=unfinished)
    return estimate_queue(load, inst, memory, at=0.0)


def test_a_legacy_backlog_is_read_from_the_request_counters() -> None:
    """FastDeploy without num_requests_enqueued: received - finished - running is the backlog at the scrape,
    less the requests the engine lost without a success (an abort), counted while a slot is free."""
    inst = Instance("dp0", "127.0.0.1", 8001, 9001, Engine.FASTDEPLOY)
    memory = PeakRunning()
    assert _counted(memory, inst, 20.0, 16.0).queue_estimate is None, "full at the first read: not calibrated"
    # Two scrapes with a free slot: 3 requests the counters hold are neither running nor waiting (lost).
    assert _counted(memory, inst, 13.0, 10.0).queued == 0.0
    assert _counted(memory, inst, 15.0, 12.0).queued == 0.0
    full = _counted(memory, inst, 16.0 + 3.0 + 9.0, 16.0)
    assert full.queued == 9.0 and full.queue_estimate is QueueEstimate.COUNTERS and full.queued_reliable
    said = describe(LoadSample.of("dp0", True, full), InstanceState(load=1.5), None)
    assert "queue ~9 (from request counters)" in said
    # The counters start over (a restart the scraper did not see refused): never a negative backlog.
    assert _counted(memory, inst, 16.0, 16.0).queued == 0.0
    assert _counted(memory, inst, 16.0 + 5.0, 16.0).queued == 5.0, "lost recalibrated down to 0 by the restart"


def test_one_request_between_arrival_and_admission_is_not_taken_for_lost() -> None:
    """A scrape that catches one request arriving while a slot is free must not make the estimator think it
    was lost (it would then hide one request of every later backlog): the lower of two free scrapes counts."""
    inst = Instance("dp0", "127.0.0.1", 8001, 9001, Engine.FASTDEPLOY)
    memory = PeakRunning()
    _counted(memory, inst, 8.0, 8.0)
    _counted(memory, inst, 15.0, 14.0)  # one request not admitted yet at this scrape
    _counted(memory, inst, 12.0, 12.0)
    assert _counted(memory, inst, 16.0 + 4.0, 16.0).queued == 4.0


def test_counters_win_over_queue_times_and_a_reported_queue_wins_over_both() -> None:
    from fdngx.weights.memory import estimate_queue

    inst = Instance("dp0", "127.0.0.1", 8001, 9001, Engine.FASTDEPLOY)
    memory = PeakRunning()
    base = Load(running=16.0, queued=0.0, capacity=16.0, queued_reliable=False, queue_time_sum=100.0)
    estimate_queue(replace(base, running=4.0, unfinished=4.0), inst, memory, at=1000.0)
    both = estimate_queue(replace(base, queue_time_sum=106.0, unfinished=23.0), inst, memory, at=1002.0)
    assert both.queued == 7.0 and both.queue_estimate is QueueEstimate.COUNTERS
    reported = Load(running=16.0, queued=2.0, capacity=16.0, unfinished=40.0)
    assert estimate_queue(reported, inst, memory, at=1004.0) == reported


def test_a_replica_whose_engine_has_no_info_page_leaves_no_memory(replica: Callable[[], Replica]) -> None:
    # vLLM states no capacity and has no info page; it reports its queue: nothing to remember per cycle.
    r = replica()
    r.pages["/metrics"] = (200, vllm_page(7).encode())
    peaks = PeakRunning()
    got = scrape_all([r.instance(Engine.VLLM, 256)], peaks=peaks)["r"]
    assert got.ok and got.running == 7.0
    assert peaks.remembered() == 0
