"""Controller mode end to end: `fdngx sidecar --push-to-file` scrapes simulated replicas once and pushes the
same snapshot to several real OpenResty frontends (Debian's nginx + the Lua module, standalone configs from
`fdngx render`). Only 127.0.0.1; every wait has a timeout; every process is stopped by its process group.

The harness is the fleet benchmark's (bench/fleet/cluster.py), so the benchmark's smoke run is tested too.
"""

from __future__ import annotations

import json
import re
import signal
import socket
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import cast

import pytest

from bench.fleet.cluster import SLOTS, Controller, Frontends, Replicas, make_token
from fdngx.sim.process import free_ports
from tests.integration.lua_site import needs_lua
from tests.support import stop_process_group, wait_for

pytestmark = [*needs_lua, pytest.mark.timeout(240)]

N = 6  # replicas: dp0..dp5, two `fdngx sim` processes; dp3 answers /health 404 (the controller marks it down)


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Replicas, Path, Path]]:
    work = tmp_path_factory.mktemp("fleet")
    token = make_token(work / "admin-token")
    replicas = Replicas(N, 2, work, unhealthy=1)
    try:
        assert replicas.unhealthy == [3]
        yield replicas, work, token
    finally:
        replicas.stop()


@pytest.fixture
def frontends(fleet: tuple[Replicas, Path, Path], tmp_path: Path) -> Iterator[Frontends]:
    replicas, _work, token = fleet
    replicas.write_inventory(range(N))
    fe = Frontends(3, replicas, tmp_path, token)
    try:
        yield fe
    finally:
        fe.stop()


def tables(fe: Frontends) -> list[tuple[int, dict[str, tuple[str, str]]]]:
    out = []
    for head, peers in fe.views():
        out.append((int(head["generation"]), {n: (p["weight"], p["down"]) for n, p in peers.items()}))
    return out


def settled(fe: Frontends, want_down: set[str]) -> list[tuple[int, dict[str, tuple[str, str]]]] | None:
    """Every frontend at one generation, with exactly `want_down` down."""
    views = tables(fe)
    gens = {g for g, _t in views}
    downs = [{n for n, (_w, d) in t.items() if d == "1"} for _g, t in views]
    return views if len(gens) == 1 and all(d == want_down for d in downs) else None


def metric(text: str, name: str, frontend: str) -> float:
    m = re.search(rf'^{name}\{{frontend="{re.escape(frontend)}"\}} (\S+)$', text, re.M)
    return float(m.group(1)) if m else float("nan")


def test_one_scrape_the_same_snapshot_on_every_frontend(fleet: tuple[Replicas, Path, Path], frontends: Frontends,
                                                       tmp_path: Path) -> None:
    replicas, _work, token = fleet
    pids = frontends.pids()
    ctl = Controller(replicas, frontends.urls, tmp_path, token, interval=0.5)
    try:
        views = wait_for(lambda: settled(frontends, {"dp3"}), 30, interval=0.2, what="dp3 down everywhere")
        (_gen, table), *others = views
        assert all(t == table for _g, t in others), views
        # each frontend knows it is one of three (the others' requests since a push: fdngx.pick.others)
        assert [head["frontends"] for head, _p in frontends.views()] == ["3"] * 3
        # Capacity weights from the scrape (slots 16/32/48/64 -> 5/10/15/20), the same bytes everywhere.
        assert {n: w for n, (w, _d) in table.items()} == {f"dp{i}": str(20 * SLOTS[i % 4] // 64) for i in range(N)}
        cycles = ctl.wait_cycles(6, 30)
        assert all(c["pushes"] and all(s == "ok" for s, _t in c["pushes"].values()) for c in cycles[-3:])  # type: ignore[union-attr]
        assert frontends.pids() == pids, "a push never reloads a frontend"
        text = ctl.metrics()
        for url in frontends.urls:
            label = url.split("//")[1].split("/")[0]
            assert metric(text, "fdngx_frontend_up", label) == 1.0
            assert metric(text, "fdngx_push_failures_total", label) == 0.0
            assert metric(text, "fdngx_push_duration_seconds_count", label) >= 6
    finally:
        ctl.stop()


def black_hole() -> socket.socket:
    """A port that accepts connections (the kernel's backlog) and never answers."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen(16)
    return s


def test_a_dead_or_silent_frontend_never_holds_the_others(fleet: tuple[Replicas, Path, Path], frontends: Frontends,
                                                          tmp_path: Path) -> None:
    replicas, _work, token = fleet
    hole = black_hole()
    dead_port = free_ports(1)[0]
    silent = f"http://127.0.0.1:{hole.getsockname()[1]}"
    dead = f"http://127.0.0.1:{dead_port}"
    ctl = Controller(replicas, [*frontends.urls, dead, silent], tmp_path, token, interval=0.5,
                     extra=("--push-timeout", "0.4"))
    try:
        cycles = ctl.wait_cycles(8, 40)
        for c in cycles[-4:]:
            pushes = c["pushes"]
            assert isinstance(pushes, dict)
            assert all(pushes[u.split("//")[1].split("/")[0]][0] == "ok" for u in frontends.urls), pushes
            assert pushes[f"127.0.0.1:{dead_port}"][0] == "failed"
            assert pushes[silent.split("//")[1]][0] in ("failed", "timeout", "busy")  # read timeout
            assert float(c["push_s"]) < 1.0  # type: ignore[arg-type]  # at most one push timeout, not one per frontend
        # The healthy frontends' own pushes are as quick as ever.
        oks = [t for c in cycles[-4:] for u, (s, t) in c["pushes"].items() if s == "ok"]  # type: ignore[union-attr]
        assert max(oks) < 0.3, oks
        # Each frontend is told how many take the snapshot: the three that answer, not the five listed.
        assert [a.view()[0]["frontends"] for a in frontends.admins] == ["3"] * 3
        # One frontend of three killed mid-run (its whole process group: master and workers): the others go on.
        stop_process_group(frontends.procs[2], grace=1.0, sig=signal.SIGKILL)
        gen0 = int(frontends.admins[0].view()[0]["generation"])
        wait_for(lambda: int(frontends.admins[1].view()[0]["generation"]) > gen0 + 1, 10, what="newer pushes")
        wait_for(lambda: frontends.admins[1].view()[0]["frontends"] == "2", 10, what="two frontends said")
        log = ctl.log.read_text()
        # Said once when a frontend starts failing (not every cycle), counted in telemetry every time.
        assert log.count(f"{dead}/fdngx/peers: push failed") == 1, log[-3000:]
        assert log.count(f"{silent}/fdngx/peers: push failed") == 1
        text = ctl.metrics()
        assert metric(text, "fdngx_push_failures_total", f"127.0.0.1:{dead_port}") >= 6
        assert metric(text, "fdngx_frontend_up", f"127.0.0.1:{dead_port}") == 0.0
        assert '"level": "error"' not in log, "some frontends took every push: no cycle failed"
    finally:
        ctl.stop()
        hole.close()


def test_two_controllers_side_by_side_the_newest_snapshot_wins(fleet: tuple[Replicas, Path, Path],
                                                               frontends: Frontends, tmp_path: Path) -> None:
    replicas, _work, token = fleet
    a = Controller(replicas, frontends.urls, tmp_path, token, interval=0.3, name="a")
    b = None
    try:
        b = Controller(replicas, frontends.urls, tmp_path, token, interval=0.3, name="b", extra=("--scale", "40"))
        a.wait_cycles(10, 30)
        b.wait_cycles(10, 30)
    finally:
        a.stop()
        if b is not None:
            b.stop()
    last = {name: max(int(c["generation"] or 0) for c in ctl.cycles()) for name, ctl in (("a", a), ("b", b))}
    newest = max(last, key=last.get)  # type: ignore[arg-type]
    for gen, table in tables(frontends):
        assert gen == last[newest], (gen, last)
        # The whole snapshot of that controller: B doubles every weight (--scale 40).
        assert table["dp5"][0] == ("10" if newest == "a" else "20"), table  # 32 slots: 10 at scale 20
    for ctl in (a, b):
        assert ctl is not None
        log = ctl.log.read_text()
        assert '"level": "error"' not in log and "push failed" not in log, log[-2000:]
    # A frontend holding a newer generation (a controller whose clock runs two minutes ahead, within the five the
    # balancer accepts): this one's pushes get 409, said once, counted, and never an error or a failed cycle.
    ahead = frontends.admins[0]
    gen = int(ahead.view()[0]["generation"])
    peers = ahead.view()[1]
    body = f"generation {gen + 120_000}\n" + "".join(
        f"peer {n} 127.0.0.1 {p['addr'].split(':')[1]} 7 0 {p['capacity']} 0.000\n" for n, p in peers.items())
    assert ahead.push(body).status == "ok"
    c = Controller(replicas, frontends.urls[:1], tmp_path, token, interval=0.3, name="c")
    try:
        cycles = c.wait_cycles(6, 30)
    finally:
        c.stop()
    assert all(s == "stale" for cy in cycles for s, _t in cy["pushes"].values())  # type: ignore[union-attr]
    log = c.log.read_text()
    assert log.count(": holds generation ") == 1, log[-2000:]
    loud = [r["msg"] for r in map(json.loads, log.splitlines()) if r["level"] in ("warning", "error")]
    assert all(m.startswith("dp3: ") for m in loud), loud  # only the unhealthy replica's news
    assert int(ahead.view()[0]["generation"]) == gen + 120_000


def test_a_frontend_of_another_upstream_refuses_the_snapshot_and_the_controller_says_so(
        fleet: tuple[Replicas, Path, Path], frontends: Frontends, tmp_path: Path) -> None:
    """An outside review: a frontend rendered for upstream modelB, listed by mistake in the push file of upstream
    fleet (one admin token for every frontend, as the docs advise), took fleet's snapshot and sent modelB's
    traffic to fleet's replicas; nothing anywhere said so."""
    replicas, _work, token = fleet
    other = tmp_path / "model-b"
    other.mkdir()
    (other / "fdngx.json").write_text(json.dumps({"version": 1, "upstream": "modelB", "instances": [
        {"name": "b0", "host": "127.0.0.1", "port": replicas.api[0], "metrics_port": replicas.met[0],
         "engine": "sim"}]}))
    model_b = Frontends(1, cast(Replicas, SimpleNamespace(inventory=other / "fdngx.json")), other, token)
    ctl = None
    try:
        head, peers = model_b.admins[0].view()
        ctl = Controller(replicas, [*frontends.urls, *model_b.urls], tmp_path, token, interval=0.5)
        cycles = ctl.wait_cycles(4, 30)
        label = model_b.urls[0].split("//")[1].split("/")[0]
        for c in cycles[-2:]:
            pushes = c["pushes"]
            assert isinstance(pushes, dict) and pushes[label][0] == "failed", pushes
            assert all(s == "ok" for fe, (s, _t) in pushes.items() if fe != label), pushes
        now_head, now_peers = model_b.admins[0].view()
        assert now_head["generation"] == head["generation"], "nothing applied"
        assert set(now_peers) == set(peers) == {"b0"}
        log = ctl.log.read_text()
        said = [r["msg"] for r in map(json.loads, log.splitlines()) if "push failed" in r.get("msg", "")]
        assert len(said) == 1, said
        assert "HTTP 409 snapshot for upstream fleet; this frontend's pool is modelB" in said[0], said
        assert said[0].startswith(model_b.urls[0]), said
        assert metric(ctl.metrics(), "fdngx_frontend_up", label) == 0.0
        assert settled(frontends, {"dp3"}), "the other frontends took every push"
    finally:
        if ctl is not None:
            ctl.stop()
        model_b.stop()


def test_a_membership_change_reaches_every_frontend_with_no_reload(fleet: tuple[Replicas, Path, Path],
                                                                   frontends: Frontends, tmp_path: Path) -> None:
    replicas, _work, token = fleet
    replicas.write_inventory(range(N - 1))  # dp5 not listed yet
    pids = frontends.pids()
    ctl = Controller(replicas, frontends.urls, tmp_path, token, interval=0.5)
    try:
        wait_for(lambda: all(set(t) == {f"dp{i}" for i in range(N - 1)} for _g, t in tables(frontends)), 30,
                 what="the listed replicas everywhere")
        replicas.write_inventory([1, 2, 3, 4, 5])  # dp0 leaves, dp5 joins
        want = {"dp1", "dp2", "dp3", "dp4", "dp5"}
        wait_for(lambda: all(set(t) == want for _g, t in tables(frontends)), 30, what="the new membership")
        assert frontends.pids() == pids, "membership changes are pushed, not reloaded"
    finally:
        ctl.stop()


def test_the_push_file_is_re_read_when_it_changes(fleet: tuple[Replicas, Path, Path], frontends: Frontends,
                                                  tmp_path: Path) -> None:
    replicas, _work, token = fleet
    ctl = Controller(replicas, frontends.urls[:1], tmp_path, token, interval=0.5)
    try:
        ctl.wait_cycles(2, 30)
        gen = int(frontends.admins[2].view()[0]["generation"])
        ctl.write_frontends(frontends.urls)
        wait_for(lambda: int(frontends.admins[2].view()[0]["generation"]) > gen, 20, what="the added frontend")
        assert "pushing to 3 frontend(s)" in ctl.log.read_text()
    finally:
        ctl.stop()


def test_fleet_benchmark_smoke(tmp_path: Path) -> None:
    """`python -m bench.fleet` end to end, small: 64 replicas, 2 frontends, a few cycles."""
    from bench.fleet.__main__ import main

    main(["--replicas", "64", "--frontends", "2", "--sims", "2", "--interval", "1", "--window", "6",
          "--warmup-cycles", "4", "--quiet-wait", "0", "--out", str(tmp_path)])
    result = json.loads((tmp_path / "fleet.json").read_text())["results"][0]
    assert result["replicas"] == 64 and result["frontends"] == 2
    agreement = result["agreement"]
    assert agreement["same_generation"] >= 1 and agreement["identical"] == agreement["same_generation"]
    assert agreement["peers"] == 64 and agreement["down"] == 1
    assert result["reloads"] == 0 and result["push_statuses"].get("ok", 0) > 0
    assert "| 64 (fdngx sim) | 2 |" in (tmp_path / "fleet.md").read_text()


def test_an_inventory_nginx_cannot_be_given_keeps_the_one_in_force(fleet: tuple[Replicas, Path, Path],
                                                                   frontends: Frontends, tmp_path: Path) -> None:
    """An outside review: an inventory rewritten with no instance emptied every frontend at once (503 for all
    traffic, said at INFO), though `fdngx render` refuses that file; one replica given by name (the Lua
    balancer takes addresses) stopped every push to every frontend, down marks included. Now the controller
    says why at ERROR and goes on pushing the inventory in force."""
    replicas, _work, token = fleet
    everyone = {f"dp{i}" for i in range(N)}
    ctl = Controller(replicas, frontends.urls, tmp_path, token, interval=0.5)

    def pushing_on() -> None:
        gen = max(g for g, _t in tables(frontends))
        wait_for(lambda: min(g for g, _t in tables(frontends)) > gen, 20, what="pushes going on")
        assert all(set(t) == everyone for _g, t in tables(frontends)), tables(frontends)

    try:
        wait_for(lambda: all(set(t) == everyone for _g, t in tables(frontends)), 30, what="the fleet everywhere")
        replicas.write_inventory([])
        wait_for(lambda: "no instances to render" in ctl.log.read_text(), 20, what="the empty inventory refused")
        pushing_on()
        named = json.loads(replicas.inventory.read_text())
        named["instances"] = [{"name": f"dp{i}", "host": "localhost" if i == 0 else "127.0.0.1",
                               "port": replicas.api[i], "metrics_port": replicas.met[i], "engine": "sim"}
                              for i in range(N)]
        tmp = replicas.inventory.with_suffix(".tmp")
        tmp.write_text(json.dumps(named))
        tmp.replace(replicas.inventory)
        wait_for(lambda: "needs an IP address, not host 'localhost'" in ctl.log.read_text(), 20,
                 what="the named replica refused")
        pushing_on()
        refusals = [json.loads(ln) for ln in ctl.log.read_text().splitlines() if "inventory not reloaded" in ln]
        assert len(refusals) == 2 and all(r["level"] == "error" for r in refusals), refusals
    finally:
        ctl.stop()
