"""The OpenResty flavor on Debian's nginx + libnginx-mod-http-lua: the Lua balancer as a module, replicas as
data, pushes (weights, membership, generations) with no reload, and a hostile admin body changing nothing.

Health (passive failures, active probes, the sidecar's `down`) and in-flight reconciliation:
test_openresty_health.py.
"""

from __future__ import annotations

import collections
import re
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import requests

from fdngx.errors import ApplyError
from fdngx.nginx.admin import Admin, PushResult
from fdngx.nginx.generation import next_generation
from fdngx.nginx.render import builtin_template_dir
from tests.integration.lua_site import LuaSite, needs_lua
from tests.support import fdngx, wait_for

pytestmark = needs_lua


@pytest.fixture
def site(tmp_path: Path) -> Iterator[LuaSite]:
    s = LuaSite(tmp_path, 2, weights=[1, 3])
    try:
        yield s
    finally:
        s.stop()


def test_the_module_is_required_and_the_replicas_are_data(site: LuaSite) -> None:
    text = site.conf.read_text()
    lua_dir = builtin_template_dir() / "lua"
    assert f'lua_package_path "{lua_dir}/?.lua;;";' in text
    assert 'require("fdngx.balancer").init(' in text and "balancer_by_lua_block" in text
    # No replica reaches the config text: names, ports and weights live in the peers file.
    for name, port in site.ports.items():
        assert not re.search(rf"\b{name}\b", text) and str(port) not in text
    peers = site.peers_file.read_text()
    # capacity weights: slots x static weight (64 x 1, 64 x 3), the biggest at 20
    assert f"peer b0 127.0.0.1 {site.ports['b0']} 7 0 64 0.000\n" in peers
    assert f"peer b1 127.0.0.1 {site.ports['b1']} 20 0 64 0.000\n" in peers
    assert site.admin.token not in text and site.token_file.stat().st_mode & 0o777 == 0o600
    assert "unchanged" in fdngx("render", *site.args, check=True).stderr  # the same bytes again


def test_idle_split_follows_the_capacity_weights(site: LuaSite) -> None:
    counts = site.split(120)
    assert 0.62 <= counts["b1"] / 120 <= 0.88, counts  # static weights 1:3 at equal slots: weighted ties


def test_pushes_change_routing_without_reload(site: LuaSite) -> None:
    assert site.nginx is not None
    workers = site.nginx.worker_pids()
    gen = site.generation()
    result = site.admin.push(site.snapshot(gen + 1, {"b0": (1, 0, 0), "b1": (3, 1, 0)}))
    assert result == PushResult("ok", gen + 1, 2)
    assert site.split(30) == collections.Counter({"b0": 30})
    # Back in, and b0 carries heavy load from elsewhere (another frontend): b1 takes the traffic. The
    # balancer smooths external load across pushes (fdngx.pool SMOOTH, 2 s): 1,000 counts as more than
    # 4 in flight even a tenth of a second after the previous push.
    site.admin.push(site.snapshot(gen + 2, {"b0": (1, 0, 1000.0), "b1": (1, 0, 0.0)}))
    counts = site.split(40, workers=4)
    assert counts["b1"] >= 36, counts
    assert site.nginx.worker_pids() == workers  # no reload happened


def test_a_replica_added_or_removed_is_pushed_not_reloaded(tmp_path: Path) -> None:
    site = LuaSite(tmp_path, 3, listed=2)
    try:
        assert site.nginx is not None and site.nginx.proc is not None
        master, workers, config = site.nginx.proc.pid, site.nginx.worker_pids(), site.conf.read_bytes()
        assert set(site.split(30)) == {"b0", "b1"}
        site.list(["b0", "b1", "b2"])
        run = fdngx("render", *site.args, "--reload", check=True)
        assert "unchanged" in run.stderr, run.stderr
        assert site.conf.read_bytes() == config, "a membership change does not change the config text"
        assert "peer b2 " in site.peers_file.read_text()
        assert set(site.view()) == {"b0", "b1", "b2"}
        wait_for(lambda: "b2" in site.split(9), 10, what="b2 served")
        site.list(["b1", "b2"])
        fdngx("render", *site.args, "--reload", check=True)
        assert set(site.view()) == {"b1", "b2"} and "b0" not in site.split(20)
        assert site.nginx.proc.pid == master and site.nginx.worker_pids() == workers, "no reload happened"
        # Re-sending the file is a no-op: its generation is not newer than what is in force.
        assert "unchanged" in fdngx("render", *site.args, "--reload", check=True).stderr
    finally:
        site.stop()


def test_admin_body_is_all_or_nothing_and_hostile_bodies_change_nothing(site: LuaSite) -> None:
    gen = site.generation()
    before = site.view()
    pwned = site.tmp / "PWNED"
    good = f"peer b0 127.0.0.1 {site.ports['b0']} 7 0 64 0.000"
    hostile = [
        f"generation {gen + 1}\n{good}\npeer b1 127.0.0.1 {site.ports['b1']} abc 0 64 0\n",  # 2nd line bad
        f"generation {gen + 1}\n{good}\npeer b1 127.0.0.1 {site.ports['b1']} 100000000000000000000000000 0 64 0\n",
        f"generation {gen + 1}\n{good}\npeer b1 127.0.0.1 {site.ports['b1']} 1 0 64 1e308\n",
        f"generation {gen + 1}\n{good}\npeer b1 127.0.0.1 {site.ports['b1']} 1 0 64 nan\n",
        f'generation {gen + 1}\n{good}\npeer b1"..os.execute("touch {pwned}").." 127.0.0.1 1 1 0 1 0\n',
        f'generation {gen + 1}\n{good}\npeer b1 ::1%"..(os.execute("touch {pwned}") and "").." 1 1 0 1 0\n',
        f"generation {gen + 1}\n{good}\npeer b1 localhost 80 1 0 64 0\n",
        f"generation {gen + 1}\n{good}\npeer b1 127.0.0.1 {site.ports['b1']} 1 0 64 0\r\n",
        f"generation {gen + 1}\n{good}\npeer b0 127.0.0.2 80 1 0 64 0\n",  # duplicate name
        f"generation {gen + 1}\n{good}\nos.execute('touch {pwned}')\n",
        f"generation {gen + 1}\n",  # would empty the pool
        "",
        f"{good}\ngeneration {gen + 1}\n",
        "\x00" * 100,
    ]
    for body in hostile:
        r = requests.post(site.admin.url, data=body.encode(), headers={"X-Fdngx-Token": site.admin.token}, timeout=5)
        assert r.status_code == 400 and "nothing applied" in r.text, (body, r.status_code, r.text)
    big = f"generation {gen + 1}\n" + "#" * (5 << 20)
    r = requests.post(site.admin.url, data=big, headers={"X-Fdngx-Token": site.admin.token}, timeout=10)
    assert r.status_code == 413
    assert site.generation() == gen and site.view() == before, "nothing was applied"
    assert not pwned.exists()
    assert sum(site.split(10).values()) == 10


def test_a_controllers_frontends_count_the_others_requests_since_the_push(tmp_path: Path) -> None:
    """A snapshot a controller pushes to 4 frontends: this nginx's own request since the push counts 4 times
    (its own and the 3 others', who act on the same snapshot), so the replica it went to looks as loaded as
    4 requests, not 1 (fdngx.pick.others); a snapshot of a sidecar of its own (no `frontends` line): 1."""
    site = LuaSite(tmp_path, 2, delay=4.0)
    try:
        def push(gen: int, frontends: int) -> None:
            body = site.snapshot(gen, {"b0": (1, 0, 0), "b1": (1, 0, 0)})
            if frontends > 1:
                body = body.replace("\n", f"\nfrontends {frontends}\n", 1)
            assert site.admin.push(body).status == "ok"

        gen = site.generation()
        push(gen + 1, 4)
        assert site.admin.view()[0]["frontends"] == "4"
        with ThreadPoolExecutor(1) as pool:
            held = pool.submit(site.one)  # open for 4 s on one replica
            busy = wait_for(lambda: [n for n, k in site.inflight().items() if k == 1], 10, what="a request open")[0]
            idle = "b1" if busy == "b0" else "b0"
            view = site.view()
            scores = {n: float(p["score"]) for n, p in view.items()}
            assert scores == {busy: 4.0, idle: 0.0}, scores
            # the view's columns say the same: 1 own, 3 the others', 4 per slot of capacity
            cap = site.capacities[busy]
            assert (view[busy]["inflight"], view[busy]["others"]) == ("1", "3"), view
            assert abs(float(view[busy]["per_slot"]) - 4 / cap) < 0.001, view
            push(gen + 2, 1)  # the request is this nginx's at the push: nothing since, and nobody else's
            head, view = site.admin.view()
            assert head["frontends"] == "1" and float(view[busy]["score"]) == 1.0, view
            assert view[busy]["others"] == "0" and abs(float(view[busy]["per_slot"]) - 1 / cap) < 0.001, view
            assert held.result(timeout=30) == busy
    finally:
        site.stop()


def test_unknown_and_removed_peers_are_reported(site: LuaSite) -> None:
    gen = site.generation()
    body = (f"generation {gen + 1}\npeer b0 127.0.0.1 {site.ports['b0']} 5 0 64 0\n"
            f"peer x9 127.0.0.2 {site.ports['b1']} 1 0 16 0\n")
    assert site.admin.push(body) == PushResult("ok", gen + 1, 2, added=("x9",), removed=("b1",))


def test_generations_the_newest_push_wins(site: LuaSite) -> None:
    gen = site.generation()
    newer = site.snapshot(gen + 10, {"b0": (9, 0, 0), "b1": (1, 0, 0)})
    assert site.admin.push(newer).status == "ok"
    older = site.snapshot(gen + 5, {"b0": (1, 0, 0), "b1": (9, 0, 0)})
    r = requests.post(site.admin.url, data=older, headers={"X-Fdngx-Token": site.admin.token}, timeout=5)
    assert r.status_code == 409 and f"current={gen + 10}" in r.text, r.text
    assert site.admin.push(older) == PushResult("stale", gen + 5, current=gen + 10)
    assert site.admin.push(newer).status == "unchanged"  # a retry of the one in force
    assert site.view()["b0"]["weight"] == "9"
    # A reload keeps the newest push (the shared dict survives it; the peers file is older).
    assert site.nginx is not None and site.nginx.proc is not None
    workers = site.nginx.worker_pids()
    site.nginx.proc.send_signal(1)  # SIGHUP
    wait_for(lambda: site.nginx is not None and not site.nginx.worker_pids() & workers, 20, what="new workers")
    assert site.generation() == gen + 10 and site.view()["b0"]["weight"] == "9"


def test_a_far_future_generation_is_refused_and_never_wedges_the_pool(site: LuaSite) -> None:
    # Generations are the pusher's clock in ms: accepted, 2^53 made every honest push "stale" until a restart.
    gen = site.generation()
    rogue = site.snapshot(2**53 - 1, {"b0": (1, 0, 0), "b1": (9, 0, 0)})
    with pytest.raises(ApplyError, match=rf"HTTP 400 generation {2**53 - 1} is \d+ s ahead of this frontend's clock"):
        site.admin.push(rogue)
    # Past 2^53 - 1 a number is no longer exact in Lua: 2^53 + 1 was read, and answered, as 2^53.
    for beyond in (2**53, 2**53 + 1):
        with pytest.raises(ApplyError, match=rf'HTTP 400 line 1: bad generation "{beyond}" \(0..2\^53-1\)'):
            site.admin.push(site.snapshot(beyond, {"b0": (1, 0, 0), "b1": (9, 0, 0)}))
    assert site.generation() == gen
    honest = next_generation()
    assert site.admin.push(site.snapshot(honest, {"b0": (9, 0, 0), "b1": (1, 0, 0)})).status == "ok"
    assert site.generation() == honest and site.view()["b0"]["weight"] == "9"


def test_render_says_when_a_newer_snapshot_is_in_force_and_exits_1(site: LuaSite) -> None:
    # Another controller whose clock is a minute ahead (within what the balancer accepts) pushed last.
    ahead = int(time.time() * 1000) + 60_000
    assert site.admin.push(site.snapshot(ahead, {"b0": (5, 0, 0), "b1": (5, 0, 0)})).status == "ok"
    r = fdngx("render", *site.args, "--scrape")
    assert r.returncode == 1, r.stderr
    [line] = [ln for ln in r.stderr.splitlines() if "error" in ln]
    assert f"not pushed: {site.admin.url}: holds generation {ahead}" in line and "nothing applied" in line, line
    assert "pushed weights to" not in r.stderr
    assert site.generation() == ahead
    # Without --scrape the peers file is re-sent under its own (older) generation: best effort, as before, and
    # it says so rather than "pushed weights to 0 peer(s)".
    r = fdngx("render", *site.args)
    assert r.returncode == 0, r.stderr
    assert f"peers file not applied: {site.admin.url}: keeps its newer snapshot (generation {ahead}" in r.stderr
    assert "pushed weights to" not in r.stderr and "error" not in r.stderr, r.stderr


def test_a_peers_file_from_a_clock_far_ahead_never_wedges_the_pool(site: LuaSite) -> None:
    # A peers file written while this host's clock was far ahead (2^53 - 1 here), read at nginx's start.
    assert site.nginx is not None
    far = f"generation {2**53 - 1}"

    def write_far() -> None:
        site.peers_file.write_text(re.sub(r"(?m)^generation [0-9]+$", far, site.peers_file.read_text()))

    def restart() -> None:
        assert site.nginx is not None
        site.nginx.stop()
        write_far()
        site.nginx.start(f"{site.url}/health")

    # A first start: it is all there is, so it is in force, and the next honest push replaces it.
    restart()
    assert site.generation() == 2**53 - 1
    wait_for(lambda: "in force until the next push replaces it" in site.error_log(), 10, what="the WARN")
    honest = next_generation()
    assert site.admin.push(site.snapshot(honest, {"b0": (9, 0, 0), "b1": (1, 0, 0)})).status == "ok"
    assert site.generation() == honest and site.view()["b0"]["weight"] == "9"
    # Wedged again (a start from that file), then a reload with a sane file: the file's replaces it.
    restart()
    assert site.generation() == 2**53 - 1
    sane = next_generation()
    site.peers_file.write_text(site.peers_file.read_text().replace(far, f"generation {sane}"))
    assert site.nginx.proc is not None
    workers = site.nginx.worker_pids()
    site.nginx.proc.send_signal(1)  # SIGHUP
    wait_for(lambda: site.nginx is not None and not site.nginx.worker_pids() & workers, 20, what="new workers")
    assert site.generation() == sane
    assert f"in force; replaced by the peers file's {sane}" in site.error_log()
    # A render finds such a file and writes it anew (re-sent as it was, the balancer would refuse it: 400).
    write_far()
    r = fdngx("render", *site.args)
    assert r.returncode == 0, r.stderr
    assert far not in site.peers_file.read_text()
    assert site.generation() > sane and "pushed weights to 2 peer(s)" in r.stderr, r.stderr


def test_two_controllers_pushing_side_by_side_converge_on_the_newest(site: LuaSite) -> None:
    gen = site.generation()
    bodies = [site.snapshot(gen + g, {"b0": (g, 0, 0), "b1": (1, 0, 0)}) for g in range(1, 41)]
    with ThreadPoolExecutor(2) as pool:
        results = list(pool.map(site.admin.push, bodies[0::2] + bodies[1::2]))
    assert {r.status for r in results} <= {"ok", "stale", "unchanged"}
    assert site.generation() == gen + 40 and site.view()["b0"]["weight"] == "40"


def test_admin_needs_the_token(site: LuaSite) -> None:
    bad = Admin(site.admin.listen, "x" * 32)
    with pytest.raises(Exception, match="HTTP 403"):
        bad.push(site.snapshot(site.generation() + 1, {"b0": (1, 1, 0), "b1": (1, 1, 0)}))
    with pytest.raises(Exception, match="HTTP 403"):
        bad.view()
    r = requests.post(site.admin.url, data="generation 1\n", timeout=5)
    assert r.status_code == 403
    assert site.split(20)["b0"] > 0  # the rejected push changed nothing


def test_all_held_out_fails_open(site: LuaSite) -> None:
    site.admin.push(site.snapshot(site.generation() + 1, {"b0": (1, 1, 0), "b1": (1, 1, 0)}))
    assert sum(site.split(10).values()) == 10
