"""The OpenResty flavor where a fleet's production pushes it: a full shared dict, and /health probes that never
end. An outside review (2026-12-06) on the real nginx found both: a push the 16m zone had no room for deleted
the snapshot in force (a worker started afterwards had no peers: every request 503) and evicted the in-flight
counts of long requests (their totals never came down); a replica that accepts and never answers gathered a
probe every 0.25 s until lua_max_running_timers dropped the balancer's own timer. Real nginx + Lua module,
127.0.0.1 only."""

from __future__ import annotations

import collections
import os
import signal
import socket
import threading
from pathlib import Path

import pytest
import requests

from fdngx.errors import ApplyError
from fdngx.nginx.generation import next_generation
from tests.integration.lua_site import LuaSite, needs_lua
from tests.support import Backends, free_ports, wait_for

pytestmark = needs_lua


class Drip:
    """A replica that accepts, then sends one byte every 0.2 s and never a whole status line."""

    def __init__(self) -> None:
        self.port = free_ports(1)[0]
        self.sock = socket.create_server(("127.0.0.1", self.port), backlog=64)
        self.open = self.most = self.accepted = self.ended = 0
        self.lock = threading.Lock()
        self.stopped = threading.Event()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self.stopped.is_set():
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with self.lock:
                self.accepted += 1
                self.open += 1
                self.most = max(self.most, self.open)
            threading.Thread(target=self._drip, args=(conn,), daemon=True).start()

    def _drip(self, conn: socket.socket) -> None:
        try:
            while not self.stopped.wait(0.2):
                conn.sendall(b"H")
        except OSError:
            pass
        finally:
            conn.close()
            with self.lock:
                self.open -= 1
                self.ended += 1

    def stop(self) -> None:
        self.stopped.set()
        self.sock.close()


def test_a_health_probe_that_never_ends_is_cut_at_its_deadline_and_never_doubled(tmp_path: Path) -> None:
    site = LuaSite(tmp_path, 2)
    drip = Drip()
    try:
        lines = [f"generation {next_generation()}"]
        lines += [f"peer {n} 127.0.0.1 {site.ports[n]} 10 0 64 0.000" for n in site.names]
        lines.append(f"peer hung 127.0.0.1 {drip.port} 10 1 64 0.000")  # the sidecar says down: probed
        assert site.admin.push("\n".join(lines) + "\n").status == "ok"
        # the first probes end at their deadline (the peer's bytes never make a status line) and the next start
        wait_for(lambda: drip.ended >= 2, 15, what="two probes of the dripping peer cut at their deadline")
        # before: a new probe every 0.25 s while the old ones kept reading, ~7 open when the first was cut
        assert drip.most <= 2, f"{drip.most} probes of one peer open at once ({drip.accepted} in all)"
        assert {site.one() for _ in range(6)} <= set(site.names)
        assert "lua_max_running_timers are not enough" not in site.error_log()
    finally:
        drip.stop()
        site.stop()


def test_a_push_a_full_dict_has_no_room_for_is_refused_and_the_snapshot_in_force_stays(tmp_path: Path) -> None:
    site = LuaSite(tmp_path, 2, render_args=("--lua-dict-size", "1m"))
    try:
        assert site.nginx is not None
        assert "lua_shared_dict fdngx_fastdeploy 1m;" in site.conf.read_text()
        real = [f"peer {n} 127.0.0.1 {site.ports[n]} 10 0 64 0.000" for n in site.names]
        # filler ports never a real replica's (a duplicate address is refused before the dict fills)
        ports = [p for p in range(20000, 27000) if p not in site.ports.values()]

        def body(k: int) -> str:
            fill = [f"peer f{i:05d}.{'x' * 110} 127.0.0.1 {ports[i]} 10 1 64 0.000" for i in range(k)]
            return "\n".join([f"generation {next_generation()}", *real, *fill]) + "\n"

        assert site.admin.push(body(300)).status == "ok"
        refusal = ""
        for k in range(400, 6000, 400):  # ever bigger fleets until the 1m zone has no room for one
            try:
                site.admin.push(body(k))
            except ApplyError as exc:
                refusal = str(exc)
                break
        assert "HTTP 507" in refusal and "shared dict fdngx_fastdeploy is full" in refusal, refusal
        assert "--lua-dict-size" in refusal, refusal
        in_force = site.generation()
        # every worker respawned (a crash, an OOM kill) reads the snapshot in force from the dict
        workers = site.nginx.worker_pids()
        for pid in workers:
            os.kill(pid, signal.SIGKILL)
        wait_for(lambda: (pids := site.nginx.worker_pids()) and not pids & workers, 10, what="respawned workers")
        assert {site.one() for _ in range(10)} <= set(site.names)  # before: 503, no peers
        assert site.generation() == in_force
        log = site.error_log()
        assert "no snapshot" not in log and "shared dict fdngx_fastdeploy is full" in log
    finally:
        site.stop()


FILL = """
        location = /test-lock {
            content_by_lua_block { ngx.say(tostring(ngx.shared.fdngx_fastdeploy:add("adm:lock", true, 2))) }
        }
        location = /test-legacy-layout {
            content_by_lua_block {
                -- the layout of fdngx before 2026-12-06: one `snap` key for every generation
                local d = ngx.shared.fdngx_fastdeploy
                local gen = d:get("gen")
                local key = string.format("snap:%d", gen)
                d:set("snap", d:get(key))
                d:delete(key)
                ngx.say(gen)
            }
        }
        location = /test-fill-the-dict {
            content_by_lua_block {
                local d, n, prefix = ngx.shared.fdngx_fastdeploy, 0, ngx.var.arg_prefix
                -- every slab size nginx has room in: values from 1 KB down to a number
                for _, v in ipairs({ string.rep("x", 1024), string.rep("x", 256), string.rep("x", 64),
                                     string.rep("x", 16), 0 }) do
                    while d:safe_set(prefix .. n, v) do n = n + 1 end
                end
                ngx.say(n)
            }
        }
"""


def with_test_locations(site: LuaSite, http: str = "", workers: int = 0) -> None:
    """Restart the site's nginx with FILL's locations (and `http` lines, and that many workers) in its config."""
    assert site.nginx is not None
    text = site.conf.read_text().replace("        location = /health {", FILL + "        location = /health {", 1)
    if workers:
        text = text.replace("worker_processes auto;", f"worker_processes {workers};", 1)
    site.conf.write_text(text.replace("    lua_socket_log_errors off;", "    lua_socket_log_errors off;\n" + http, 1))
    site.nginx.stop()
    site.nginx.start(f"{site.url}/health")


def test_requests_a_full_dict_cannot_count_are_served_uncounted_and_nothing_is_evicted(tmp_path: Path) -> None:
    """The dict filled by something else (here a test location): a request's in-flight counter has no room.
    Before, incr() evicted the least recently used keys to make room (another request's share, a health
    record, the snapshot); now the request is served uncounted, said in the error log, and every count that
    exists comes back to 0."""
    site = LuaSite(tmp_path, 2, render_args=("--lua-dict-size", "1m"))
    try:
        with_test_locations(site)
        pool, _ = site.admin.view()
        assert int(pool["dict_size"]) == 1 << 20 and 0 < int(pool["dict_free"]) < 1 << 20, pool
        filled = int(requests.get(f"{site.url}/test-fill-the-dict?prefix=a", timeout=10).text)
        assert filled > 100
        assert int(site.admin.view()[0]["dict_free"]) == 0  # what the operator's curl of the admin GET shows
        got = {site.one() for _ in range(10)}
        assert got <= set(site.names), got
        log = site.error_log()
        assert "goes uncounted in the picks" in log, log[-2000:]
        fills = int(requests.get(f"{site.url}/test-fill-the-dict?prefix=b", timeout=10).text)
        # room for at most what expired meanwhile: the reaper's lock (it lapses every 1.8 s, and is taken again
        # only where there is room); an eviction frees whole slab pages of the 1 KB fill values
        assert fills <= 2, f"{fills} keys could be written again: something was evicted to make room"
        wait_for(lambda: all(v == 0 for v in site.inflight().values()), 10, what="in-flight counts at 0")
    finally:
        site.stop()



def test_a_full_dict_answers_a_push_507_not_busy(tmp_path: Path) -> None:
    """No room left for the admin lock's key: safe_add's "no memory" was read as the lock held: every push spun
    2 s and got 503 "busy: another push holds the admin lock" (a review of the fix). A full dict is said as such."""
    site = LuaSite(tmp_path, 2, render_args=("--lua-dict-size", "1m"))
    try:
        with_test_locations(site)
        assert int(requests.get(f"{site.url}/test-fill-the-dict?prefix=a", timeout=10).text) > 100
        with pytest.raises(ApplyError) as refused:
            site.admin.push(f"generation {next_generation()}\npeer b0 127.0.0.1 {site.ports['b0']} 10 0 64 0.000\n")
        assert "HTTP 507" in str(refused.value) and "is full" in str(refused.value), refused.value
    finally:
        site.stop()


def test_a_reload_onto_the_older_layout_keeps_the_snapshot_in_force(tmp_path: Path) -> None:
    """An upgrade by reload: the dict holds the older fdngx's one `snap` key (its old workers push that way until
    they exit). A push had drained b1; the reload, with a push holding the admin lock so the peers file waits,
    must keep b1 out (before: the older `snap` was not read: the peers file came back, or, with the lock held,
    no worker had a peer: every request 503)."""
    site = LuaSite(tmp_path, 2)
    try:
        with_test_locations(site)
        assert site.nginx is not None and site.nginx.proc is not None
        assert site.admin.push(f"generation {next_generation()}\npeer b0 127.0.0.1 {site.ports['b0']} 10 0 64 0.000\n"
                               ).status == "ok"
        assert {site.one() for _ in range(6)} == {"b0"}
        assert int(requests.get(f"{site.url}/test-legacy-layout", timeout=5).text) == site.generation()
        assert requests.get(f"{site.url}/test-lock", timeout=5).text.strip() == "true"  # a push in progress
        old = site.nginx.worker_pids()
        os.kill(site.nginx.proc.pid, signal.SIGHUP)
        wait_for(lambda: (pids := site.nginx.worker_pids()) and not pids & old, 15, what="the new workers alone")
        assert {site.one() for _ in range(6)} == {"b0"}, "the drained replica took requests again"
        assert "no snapshot" not in site.error_log()
    finally:
        site.stop()



def test_a_pool_over_64_replicas_picks_among_a_sample_and_serves_every_replica(tmp_path: Path) -> None:
    """Above fdngx.pick.SAMPLE_ABOVE usable replicas a pick reads 16 drawn at random, not every replica's count
    (the rule and its spread: tests/lua/test_pick.lua; the cost: python -m bench.pick). In the real nginx: 80
    replicas pushed, every request answered by one of them, the draws reaching nearly all."""
    site = LuaSite(tmp_path, 2, delay=0.0)
    extra = Backends(free_ports(78), [f"x{i}" for i in range(78)])
    try:
        names = [*site.names, *extra.names]
        ports = [*(site.ports[n] for n in site.names), *extra.ports]
        body = "\n".join([f"generation {next_generation()}",
                          *(f"peer {n} 127.0.0.1 {p} 10 0 64 0.000" for n, p in zip(names, ports, strict=True))])
        assert site.admin.push(body + "\n").status == "ok"
        wait_for(lambda: site.one() in extra.names, 10, what="the pushed replicas in the picks")
        got = collections.Counter(site.one() for _ in range(400))
        assert set(got) <= set(names), got  # no error, no 503
        assert len(got) >= 70, f"{len(got)} of 80 replicas answered 400 sequential requests"
        assert "[error]" not in site.error_log() and "[crit]" not in site.error_log()
    finally:
        extra.stop()
        site.stop()
