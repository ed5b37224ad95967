"""The OpenResty flavor's own health and accounting, through the real nginx: capacity from the first request,
a failed replica out at once and back within a second of its first /health 200, the sidecar's `down` winning
a longer disagreement, and in-flight counters that return to 0 (retries, client aborts, a killed worker)."""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import requests

from fdngx.nginx.generation import next_generation
from tests.integration.lua_site import LuaSite, needs_lua
from tests.support import Nginx, http_ok, wait_for

pytestmark = needs_lua


class Traffic:
    """Requests through nginx from a few threads until stopped, each answer recorded with its time."""

    def __init__(self, site: LuaSite, threads: int = 4) -> None:
        self.site = site
        self.answers: list[tuple[float, str]] = []
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, daemon=True) for _ in range(threads)]
        for t in self._threads:
            t.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            replica = self.site.one(timeout=10)
            self.answers.append((time.monotonic(), replica))

    def first(self, replica: str, after: float) -> float | None:
        return next((t for t, r in list(self.answers) if r == replica and t >= after), None)

    def stop(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(timeout=15)


@pytest.fixture
def trio(tmp_path: Path) -> Iterator[LuaSite]:
    site = LuaSite(tmp_path, 3, delay=0.02)
    try:
        yield site
    finally:
        site.stop()


def test_a_half_slots_replica_gets_half_the_load_from_the_first_requests(tmp_path: Path) -> None:
    site = LuaSite(tmp_path, 3, capacities=[64, 32, 64], delay=1.5)
    try:
        counts = site.split(30, workers=30)  # all in flight together, before any push
        assert sum(counts.values()) == 30, counts
        assert 4 <= counts["b1"] <= 8, counts  # ideal 6 of 30 (weights 20:10:20)
        assert set(site.view()["b1"].items()) >= {("weight", "10"), ("capacity", "32")}
    finally:
        site.stop()


def test_a_killed_replica_is_out_at_once_and_back_within_a_second_of_its_first_200(trio: LuaSite) -> None:
    # Idle ties go to a random pick: P(one replica never picked in 36) = 3 * (2/3)^36 < 2e-6.
    assert set(trio.split(36)) == {"b0", "b1", "b2"}
    port = trio.ports["b2"]
    trio.stop_backend("b2")
    answers = trio.split(30)
    assert set(answers) <= {"b0", "b1"} and sum(answers.values()) == 30, answers  # retried elsewhere, no error
    refused = [ln for ln in trio.error_log().splitlines() if "connect() failed" in ln and f":{port}/" in ln]
    assert len(refused) == 1, refused  # the first failure took it out of every worker's picks
    assert trio.view()["b2"]["health"] == "out"
    # Said as what nginx knows: a refused connection reaches Lua as a 502, like a 502 answer.
    assert "b2 failed (no connection, or a 502 answer): out of new picks" in trio.error_log()
    # It stays out while its /health fails (well past the first 0.5 s back-off), probed, not tried.
    until = time.monotonic() + 2.0
    while time.monotonic() < until:
        assert trio.view()["b2"]["health"] == "out"
        time.sleep(0.2)
    first_200: list[float] = []

    def poll() -> None:
        while not first_200 and time.monotonic() < until + 30:
            if http_ok(f"http://127.0.0.1:{port}/health"):
                first_200.append(time.monotonic())
            time.sleep(0.01)

    poller = threading.Thread(target=poll, daemon=True)
    poller.start()
    traffic = Traffic(trio)
    try:
        trio.start_backend("b2")
        wait_for(lambda: first_200, 10, what="b2 answering /health")
        back = wait_for(lambda: traffic.first("b2", first_200[0]), 5, interval=0.02, what="b2 picked again")
    finally:
        traffic.stop()
        poller.join(timeout=5)
    assert back - first_200[0] < 1.0, f"b2 picked {back - first_200[0]:.2f}s after its first /health 200"
    assert "answers /health 200 again" in trio.error_log()


class _Answering(BaseHTTPRequestHandler):
    """A replica whose /health says 200 and whose every other request gets `status` (set by a subclass);
    `hits` counts those requests, `probes` the /health ones."""

    protocol_version = "HTTP/1.1"
    status = 503
    hits: list[str]
    probes: list[float]

    def log_message(self, *args: object) -> None:
        pass

    def _answer(self) -> None:
        if self.headers.get("Content-Length"):
            self.rfile.read(int(self.headers["Content-Length"]))
        if self.path == "/health":
            code = 200
            self.probes.append(time.monotonic())
        else:
            code = self.status
            self.hits.append(self.path)
        self.send_response(code)
        self.send_header("Content-Length", "0")
        self.end_headers()

    do_GET = _answer
    do_POST = _answer


@contextlib.contextmanager
def answering(site: LuaSite, name: str, status: int, probes: list[float] | None = None) -> Iterator[list[str]]:
    """Replace backend `name` by an in-process replica answering `status` (see _Answering), for the block;
    yields the list its requests are counted in (its /health probes: in `probes`, if given)."""
    hits: list[str] = []
    handler = type(f"Answering{status}", (_Answering,),
                   {"status": status, "hits": hits, "probes": [] if probes is None else probes})
    site.stop_backend(name)
    server = ThreadingHTTPServer(("127.0.0.1", site.ports[name]), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield hits
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def test_503s_take_a_replica_out_and_a_flapping_one_stays_out(tmp_path: Path) -> None:
    site = LuaSite(tmp_path, 2, delay=0.01)
    try:
        with answering(site, "b1", 503):
            answers = site.split(40)
            assert answers == {"b0": 40}, answers  # every 503 retried on b0 (proxy_next_upstream http_503)
            view = site.view()["b1"]
        # /health says 200, so probes bring it back at first; each return fails again: the back-off grows
        # and, past a few failures in a row, a probe's 200 no longer brings it back before the back-off ends.
        assert int(view["level"]) >= 2, view
    finally:
        site.stop()


def test_a_full_replicas_429_on_the_retry_path_does_not_take_it_out(tmp_path: Path) -> None:
    """A 429 says "full", not "broken": nginx retries it elsewhere (the rendered proxy_next_upstream names
    http_429) and reports it to the balancer as a failed attempt, as it does every status but 403/404
    (ngx_http_upstream_next). Before, the balancer took the replica out for a back-off that grew with every
    429; it must stay in the picks, at level 0, and keep being tried first as often as its twin."""
    site = LuaSite(tmp_path, 2, delay=0.01)
    try:
        assert "http_429" in site.conf.read_text()
        with answering(site, "b1", 429) as hits:
            for i in range(20):
                assert site.one(timeout=10) == "b0", f"request {i}: the 429 retried on b0"
                view = site.view()["b1"]  # right after the retry that reported it
                assert (view["health"], view["level"]) == ("up", "0"), f"after request {i}: {view}"
            # idle ties alternate in each worker: b1 is the first try of about half the requests
            assert len(hits) >= 5, hits
            assert "b1 failed" not in site.error_log()
    finally:
        site.stop()


def test_when_every_usable_replica_is_full_the_client_hears_busy_not_a_retry_onto_a_down_one(
        tmp_path: Path) -> None:
    """nginx retries over the servers not down only. The balancer's retry after a 429 failed open onto the
    replica the sidecar holds down once both usable ones had answered 429: a 502 (nothing listens there), or a
    wait for the connect timeout. Now a retry after a 429 goes to a usable replica only, and with none left
    the client hears the site's 503 + Retry-After ("every replica is busy"); a retry after a broken attempt
    still fails open (test_openresty_moved)."""
    site = LuaSite(tmp_path, 3, delay=0.01)
    try:
        gen = site.generation() + 1
        assert site.admin.push(site.snapshot(gen, {"b0": (1, 0, 0), "b1": (1, 0, 0), "b2": (1, 1, 0)})).status == "ok"
        site.stop_backend("b2")  # held down by the sidecar, and nothing listens there
        with answering(site, "b0", 429) as h0, answering(site, "b1", 429) as h1:
            answers = [site.one(timeout=10) for _ in range(9)]
            r = requests.post(f"{site.url}/v1/completions", json={}, timeout=10)
        assert answers == ["status 503"] * 9, answers
        assert (r.status_code, r.headers.get("Retry-After"), r.json()["error"]["code"]) == (
            503, "1", "service_unavailable")
        assert len(h0) + len(h1) == 20, (h0, h1)  # each request tried both full replicas, and no other
        assert "b2 failed" not in site.error_log()
    finally:
        site.stop()


def test_with_every_replica_out_a_request_hears_busy_at_once_and_the_first_200_brings_one_back(
        tmp_path: Path) -> None:
    """Every replica failing by the balancer's own evidence (refused connections; a black-holed host would make
    each attempt wait for the connect timeout): the balancer failed open onto them, so every request made
    its 3 tries and got a 502 (or waited 3 connect timeouts). As nginx's own "no live upstreams", it now
    answers 503 + Retry-After without trying them, until a probe's 200 brings one back."""
    site = LuaSite(tmp_path, 2, delay=0.01)
    try:
        for name in site.names:
            site.stop_backend(name)
        wait_for(lambda: site.one(timeout=10) == "status 503", 10, what="every replica out")
        tried = site.error_log().count("connect() failed")
        answers = [requests.post(f"{site.url}/v1/completions", json={}, timeout=10) for _ in range(10)]
        assert [(r.status_code, r.headers.get("Retry-After")) for r in answers] == [(503, "1")] * 10
        assert site.error_log().count("connect() failed") == tried  # not one attempt on a replica out
        site.start_backend("b1")
        wait_for(lambda: site.one(timeout=10) == "b1", 10, what="b1 back on its first /health 200")
    finally:
        site.stop()


def test_a_replica_killed_with_requests_waiting_is_back_on_its_first_200_after_the_restart(tmp_path: Path) -> None:
    """Killed with requests waiting for their answers (non-streaming ones), a replica failed once per request,
    all at once: five failures in a row, taken for flapping, its 8 s back-off; restarted, its first /health 200
    did not bring it back (still out 4 s after the restart). Failures at once are one episode now."""
    site = LuaSite(tmp_path, 2, delay=2.0)
    try:
        with ThreadPoolExecutor(10) as pool:
            answers = [pool.submit(site.one, 30) for _ in range(10)]
            wait_for(lambda: site.inflight()["b1"] >= 4, 10, what="requests waiting on b1")
            site.kill_backend("b1")  # while they wait (2 s): each of them fails
            wait_for(lambda: site.view()["b1"]["health"] == "out", 10, what="b1 out")
            assert {a.result() for a in answers} == {"b0"}  # each retried on b0
        assert site.view()["b1"]["level"] == "1"  # one episode, however many requests failed in it
        assert site.error_log().count("b1 failed") <= 2  # said once (by each of the 2 workers, at most, racing)
        site.start_backend("b1")
        wait_for(lambda: site.view()["b1"]["health"] == "up", 4, what="b1 back on its first /health 200")
    finally:
        site.stop()


def test_the_balancer_serves_with_master_process_off(tmp_path: Path) -> None:
    """`master_process off` (nginx in one process, as some run it under a debugger or a supervisor): its one
    process is of type "single", and init_worker set the balancer up in "worker" processes only; every
    request then failed in balance() (a 500)."""
    site = LuaSite(tmp_path, 2, delay=0.01)
    try:
        assert site.nginx is not None
        site.nginx.stop()
        site.nginx.start(f"{site.url}/health", directives="master_process off;")
        assert not site.nginx.worker_pids()  # one process: no workers
        assert site.split(20) == {"b0": 10, "b1": 10}
        gen = site.generation() + 1  # and pushes apply without a reload
        assert site.admin.push(site.snapshot(gen, {"b0": (1, 0, 0), "b1": (1, 1, 0)})).status == "ok"
        assert site.split(10) == {"b0": 10}
        assert "[error]" not in site.error_log()
    finally:
        site.stop()


def test_a_probe_nginx_cannot_schedule_is_tried_again_at_the_next_tick_and_warned_about(tmp_path: Path) -> None:
    """Over lua_max_pending_timers, ngx.timer.at refuses a /health probe. The refusal was ignored and the probe's
    lock kept: the peer went unprobed until the lock lapsed, and as the locks of a tick lapse together, a peer
    after the one that took the last timer was never probed at all. Now its lock is given back, so the next
    tick probes it, and each worker warns, at most once per 10 s."""
    site = LuaSite(tmp_path, 3, delay=0.01)
    try:
        assert site.nginx is not None
        site.nginx.stop()
        # Two pending timers per worker: its own 0.1 s tick (re-armed before it runs) and one probe.
        site.conf.write_text(site.conf.read_text().replace("http {", "http {\n    lua_max_pending_timers 2;", 1))
        site.nginx = Nginx(site.conf.parent).start(f"{site.url}/health")
        probed: dict[str, list[float]] = {"b1": [], "b2": []}
        with answering(site, "b1", 200, probed["b1"]), answering(site, "b2", 200, probed["b2"]):
            # the sidecar says both are down: both are due for a probe at every tick (b1 first)
            site.admin.push(site.snapshot(site.generation() + 1, {"b0": (20, 0, 0), "b1": (20, 1, 0),
                                                                   "b2": (20, 1, 0)}))
            started = time.monotonic()
            time.sleep(2.5)
            counts = {name: len([t for t in times if t >= started]) for name, times in probed.items()}
        assert counts["b1"] >= 4 and counts["b2"] >= 4, counts  # one every 0.25 s: about 10 each
        warned = [ln for ln in site.error_log().splitlines() if "could not schedule the /health probe" in ln]
        assert warned, "no warning"
        assert any(f"probe of {name}: too many pending timers (lua_max_pending_timers?)" in warned[0]
                   for name in probed), warned[0]
        assert len(warned) <= len(site.nginx.worker_pids()), warned  # one per worker per 10 s, not per tick
    finally:
        site.stop()


class Pusher:
    """A live sidecar: the same peers, a new generation every `every` seconds, until stopped."""

    def __init__(self, site: LuaSite, peers: dict[str, tuple[int, int, float]], every: float = 1.0) -> None:
        self.site, self.peers, self.every = site, peers, every
        self.last = ""
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self.push()
        self._thread.start()

    def push(self) -> None:
        self.last = self.site.snapshot(next_generation(), self.peers)
        assert self.site.admin.push(self.last).status == "ok"

    def _run(self) -> None:
        while not self._stop.wait(self.every):
            self.push()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=15)


def test_the_sidecars_down_wins_a_longer_disagreement(tmp_path: Path) -> None:
    site = LuaSite(tmp_path, 2, delay=0.02)
    pusher = None
    try:
        pusher = Pusher(site, {"b0": (20, 0, 0), "b1": (20, 1, 0)})  # the sidecar says down, and goes on saying it
        assert site.view()["b1"]["health"] == "down" and "b1" not in site.split(20)  # no evidence against it
        site.stop_backend("b1")
        wait_for(lambda: site.view()["b1"]["health"] == "out", 5, interval=0.05, what="b1 probed and found out")
        site.start_backend("b1")
        started = time.monotonic()
        # The balancer saw it come back: it overrides the sidecar's (older) down at once...
        wait_for(lambda: site.view()["b1"]["health"] == "probe-up", 3, interval=0.05, what="b1 probe-up")
        assert "b1" in site.split(20)
        # ...and says for how long: the log said "back in picks" while the sidecar's down won again 10 s later
        assert ("b1 answers /health 200 again: back in picks for up to 10 s, though the last push says it is down: "
                "unless a push says up by then, or pushes stop, that down holds it out again") in site.error_log()
        # ...for 10 s; the sidecar keeps pushing down, and then it wins.
        wait_for(lambda: site.view()["b1"]["health"] == "down", 15, interval=0.2, what="the sidecar's down")
        assert time.monotonic() - started >= 9.0
        assert site.admin.push(pusher.last).status in ("unchanged", "stale")  # a retry, or one pushed since
        assert "b1" not in site.split(20)
        assert "no snapshot for" not in site.error_log(), "a sidecar pushing every second is not silent"
    finally:
        if pusher is not None:
            pusher.stop()
        site.stop()


def test_inflight_counters_return_to_zero(trio: LuaSite) -> None:
    trio.split(60, workers=8)
    # retries: a replica dies under traffic
    with ThreadPoolExecutor(1) as pool:
        later = pool.submit(trio.split, 60, 6)
        time.sleep(0.1)
        trio.stop_backend("b1")
        assert "error" not in later.result()
    wait_for(lambda: all(v == 0 for v in trio.inflight().values()), 10, what=f"in flight back to 0: {trio.view()}")


def test_in_upstream_mode_under_a_hand_written_server_every_slot_is_released(tmp_path: Path) -> None:
    """--mode upstream, included by a server that never names $request_id: before, every read of it was a new
    random id, so no request found its own state again (no slot ever released, retries not known as such)."""
    site = LuaSite(tmp_path, 3, mode="upstream")
    try:
        assert "request_id" not in (site.conf.parent / "nginx.conf").read_text()
        served = site.split(60, workers=6)
        assert sum(served.values()) == 60 and set(served) <= set(site.names), served
        wait_for(lambda: all(v == 0 for v in site.inflight().values()), 10, what=f"in flight back to 0: {site.view()}")
    finally:
        site.stop()


def test_client_aborts_release_their_slot(tmp_path: Path) -> None:
    site = LuaSite(tmp_path, 2, delay=2.0)
    try:
        def abort(_: int) -> None:
            with contextlib.suppress(requests.RequestException):
                requests.post(f"{site.url}/v1/completions", json={}, timeout=0.3)

        with ThreadPoolExecutor(10) as pool:
            list(pool.map(abort, range(10)))
        wait_for(lambda: all(v == 0 for v in site.inflight().values()), 10, what=f"slots released: {site.view()}")
    finally:
        site.stop()


def test_killed_workers_requests_are_taken_back(tmp_path: Path) -> None:
    site = LuaSite(tmp_path, 2, delay=4.0)
    try:
        assert site.nginx is not None
        pool = ThreadPoolExecutor(8)
        futures = [pool.submit(site.one, 30) for _ in range(8)]
        wait_for(lambda: sum(site.inflight().values()) == 8, 10, what="8 requests in flight")
        for worker in site.nginx.worker_pids():
            os.kill(worker, signal.SIGKILL)  # mid-request: they never release what they hold
        assert {f.result() for f in futures} == {"error"}
        pool.shutdown()
        wait_for(lambda: sum(site.inflight().values()) == 0, 20, interval=0.25,
                 what=f"a dead worker's in-flight counts taken back: {site.view()}")
        assert "dead worker" in site.error_log()
    finally:
        site.stop()
