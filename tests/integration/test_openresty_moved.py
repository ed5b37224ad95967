"""A name moved to a new address by a push is not held out for what its OLD server did: requests still open on
the old server when the push lands fail afterwards (the old server is stopped), and those failures mark no one.
The replacement, at the new address, stays in the picks and gets new requests at once (through the real nginx
with the OpenResty flavor's Lua balancer)."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from tests.integration.lua_site import LuaSite, needs_lua
from tests.support import Backends, free_ports, wait_for

pytestmark = needs_lua

OPEN_ON_OLD = 6  # more than health.FLAP_LEVEL (3) failures in a row: a /health 200 would not bring a name back


def test_requests_failing_on_a_moved_names_old_server_do_not_hold_the_replacement_out(tmp_path: Path) -> None:
    site = LuaSite(tmp_path, 2, delay=0.02)
    clients = ThreadPoolExecutor(OPEN_ON_OLD)
    try:
        old_port, (new_port,) = site.ports["b1"], free_ports(1)
        cap = site.capacities["b1"]

        def push(generation: int, b0_down: int, b1_port: int) -> None:
            body = (f"generation {generation}\n"
                    f"peer b0 127.0.0.1 {site.ports['b0']} 20 {b0_down} {site.capacities['b0']} 0.000\n"
                    f"peer b1 127.0.0.1 {b1_port} 20 0 {cap} 0.000\n")
            assert site.admin.push(body).status == "ok"

        # b1's server answers slowly, so requests stay open on it; the sidecar says b0 is down, so every
        # request goes to b1 (no evidence against b0: it is only out of the picks).
        site.stop_backend("b1")
        site.backends["b1-old"] = Backends([old_port], ["b1-old"], delay=30.0)
        site.backends["b1-new"] = Backends([new_port], ["b1-new"], delay=0.02)  # the replacement, healthy
        gen = site.generation()
        push(gen + 1, 1, old_port)
        futures = [clients.submit(site.one, 20) for _ in range(OPEN_ON_OLD)]
        wait_for(lambda: site.inflight()["b1"] == OPEN_ON_OLD, 5, interval=0.02,
                 what=f"{OPEN_ON_OLD} requests open on b1's old server: {site.view()}")

        # The push moves b1 to the replacement (and b0 is up again). Only then does the old server go away:
        # every request open on it fails (nginx: upstream closed, a 502 to Lua), each after the push.
        push(gen + 2, 0, new_port)
        assert site.view()["b1"]["addr"] == f"127.0.0.1:{new_port}", site.view()
        assert site.view()["b1"]["health"] == "up", site.view()  # started with no health record
        site.stop_backend("b1-old")
        answers = [f.result() for f in futures]
        # Retried (proxy_next_upstream error ... non_idempotent) on another name than b1: b0.
        assert answers == ["b0"] * OPEN_ON_OLD, answers
        failures = [ln for ln in site.error_log().splitlines()
                    if "[error]" in ln and f"127.0.0.1:{old_port}/" in ln]
        assert len(failures) == OPEN_ON_OLD, failures  # the scenario did happen: each failed on the OLD address
        wait_for(lambda: site.inflight()["b1"] == 0, 5, interval=0.02, what=f"b1's slots released: {site.view()}")

        view = site.view()["b1"]
        marked = [ln[ln.index("fdngx: b1 "):].split(" while ")[0] for ln in site.error_log().splitlines()
                  if "fdngx: b1 " in ln]
        assert (view["health"], view["level"]) == ("up", "0"), (
            f"b1, moved to :{new_port}, is {view['health']} (level {view['level']}) after {OPEN_ON_OLD} requests "
            f"failed on its old server :{old_port}; the balancer said {marked}")
        assert not marked, marked  # no "b1 failed ...: out of new picks" for the old server's failures

        # New requests reach the replacement (on the old code it was held out for its 8 s back-off, which a
        # /health 200 does not end past FLAP_LEVEL: the view above already says so).
        seen: list[str] = []
        wait_for(lambda: seen.append(site.one(timeout=2)) or seen[-1] == "b1-new", 5, interval=0,
                 what=f"a request answered by b1's replacement (answers {seen}, view {site.view()})")
        assert set(seen) <= {"b0", "b1-new"}, seen
    finally:
        clients.shutdown(wait=False, cancel_futures=True)
        site.stop()
