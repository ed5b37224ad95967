"""Two pushers with different fleets on one frontend (two controllers reading different inventories): each
push changed the frontend's replicas back, so a replica drained in one inventory was still picked from the
other's snapshots, and nothing said so. The frontend's answers name what each push added and removed
(templates/lua/fdngx/admin.lua: `ok generation=G peers=N added=a,b removed=c`, relative to the snapshot in
force before it); the fake frontend below answers the same way. 127.0.0.1 only."""

from __future__ import annotations

import logging
import re
import socket
from collections.abc import Callable
from pathlib import Path

import pytest

from fdngx.nginx.fanout import FOREIGN_AFTER, Fanout
from fdngx.nginx.pushfile import FrontendSpec
from tests.support import read_request, token_file
from tests.unit.test_push_deadline import FakeFrontend, Handler, answer, frontends

__all__ = ["frontends"]  # the fixture


def balancer_like() -> Handler:
    """Keeps the last snapshot's replica names; answers each push with what it added and removed."""
    held: list[set[str]] = [set()]

    def handler(fe: FakeFrontend, conn: socket.socket) -> None:
        while request := read_request(conn):
            body = request.split(b"\r\n\r\n", 1)[1].decode()
            gen = re.search(r"(?m)^generation ([0-9]+)$", body)
            names = set(re.findall(r"(?m)^peer (\S+) ", body))
            added, removed = sorted(names - held[0]), sorted(held[0] - names)
            held[0] = names
            text = f"ok generation={gen.group(1) if gen else '?'} peers={len(names)} added={','.join(added)} " \
                   f"removed={','.join(removed)}\n"
            answer(conn, request, text=text.encode())
    return handler


def snapshot(gen: int, names: list[str]) -> tuple[str, frozenset[str]]:
    lines = [f"generation {gen}", "upstream fleet", *(f"peer {n} 127.0.0.1 {8000 + i} 20 0 64 0.000"
                                                      for i, n in enumerate(names))]
    return "\n".join(lines) + "\n", frozenset(names)


def warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and "another fleet" in
            r.getMessage()]


def test_two_pushers_of_different_fleets_are_said_once_each(
        frontends: Callable[[Handler], FakeFrontend], tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, "fdngx.fanout")
    fe = frontends(balancer_like())
    spec = FrontendSpec(f"{fe.url}/fdngx/peers", token_file(tmp_path))
    a, b = Fanout([spec]), Fanout([spec])
    try:
        gen = 1_700_000_000_000
        for _ in range(FOREIGN_AFTER + 3):
            for fan, fleet in ((a, ["dp0", "dp1"]), (b, ["dp0", "dp1", "dp2"])):
                gen += 1
                (o,) = fan.push(*snapshot(gen, fleet))
                assert o.accepted
        said = warnings(caplog)
        assert len(said) == 2, said  # once per controller, not every cycle
        assert any("added dp2; removed none" in w for w in said) and any("added none; removed dp2" in w for w in said)
        assert all(fe.url in w for w in said)
        caplog.clear()
        for _ in range(2):  # the other controller stops: this one's fleet stays in force
            gen += 1
            (o,) = a.push(*snapshot(gen, ["dp0", "dp1"]))
        assert o.added == () and o.removed == ()
        assert [r.getMessage() for r in caplog.records] == [
            f"{fe.url}/fdngx/peers: its replicas stay this controller's fleet again"]
    finally:
        a.close()
        b.close()


def test_a_controllers_own_fleet_changes_are_not_another_pusher(
        frontends: Callable[[Handler], FakeFrontend], tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A replica added, removed and added again by this controller's own inventory: its answers name those
    changes every time, which is no other fleet."""
    caplog.set_level(logging.INFO, "fdngx.fanout")
    fe = frontends(balancer_like())
    fan = Fanout([FrontendSpec(f"{fe.url}/fdngx/peers", token_file(tmp_path))])
    try:
        gen = 1_700_000_000_000
        for i in range(3 * FOREIGN_AFTER):
            gen += 1
            (o,) = fan.push(*snapshot(gen, ["dp0", "dp1"] if i % 2 else ["dp0"]))
            assert o.accepted and (o.added or o.removed)  # every push changed the frontend's replicas
        assert not warnings(caplog)
    finally:
        fan.close()
