"""Generations are the pusher's clock in ms, and the balancer takes none more than FUTURE_S ahead of its own
clock (fdngx.pool.FUTURE_MS): what the Python side does about that window (security review M2)."""

from __future__ import annotations

import logging
import os
import re
import socket
import time
from collections.abc import Mapping
from pathlib import Path
from types import SimpleNamespace

import pytest

from fdngx.domain import Flavor, Instance, Inventory, ServerState
from fdngx.nginx import fanout, generation
from fdngx.nginx.admin import PushResult
from fdngx.nginx.fanout import Fanout, FrontendSpec, PushOutcome
from fdngx.nginx.openresty import write_peers_file
from fdngx.nginx.render import RenderOptions
from fdngx.nginx.target import Target
from fdngx.weights.controller import GENERATION_KEY, Controller
from fdngx.weights.settings import config_for_flavor, config_of_state
from fdngx.weights.state import PolicyState
from fdngx.weights.store import StateStore
from tests.support import AdminDouble, read_request
from tests.unit.test_push_deadline import FakeFrontend, answer, good

AHEAD_MS = int(generation.FUTURE_S * 1000)


def fleet() -> Inventory:
    return Inventory([Instance("dp0", "127.0.0.1", 1, 1, max_num_seqs=64)])


def now_ms() -> int:
    return time.time_ns() // 1_000_000


def test_a_clock_stepped_back_by_more_than_the_window_starts_generations_again_from_it(
        monkeypatch: pytest.MonkeyPatch) -> None:
    clock = [1_733_212_345_678]
    monkeypatch.setattr(generation, "time", SimpleNamespace(time_ns=lambda: clock[0] * 1_000_000,
                                                           time=lambda: clock[0] / 1000))
    monkeypatch.setattr(generation, "_last_generation", 0)
    first = generation.next_generation()
    assert first == clock[0] and generation.next_generation() == first + 1
    clock[0] -= 60_000  # a minute back: still strictly increasing, as before
    assert generation.next_generation() == first + 2
    # The clock was a year ahead and is set right: counting on from there, every push would be refused (400).
    clock[0] = first - 365 * 86_400_000
    assert generation.next_generation() == clock[0]
    assert generation.next_generation() == clock[0] + 1


def with_generation(text: str, generation: int) -> str:
    return re.sub(r"(?m)^generation [0-9]+$", f"generation {generation}", text)


def test_a_peers_file_written_by_a_clock_far_ahead_is_rewritten(tmp_path: Path) -> None:
    path = tmp_path / ".nginx.conf.fdngx-peers"
    text = write_peers_file(path, fleet())
    assert write_peers_file(path, fleet()) == text  # same replicas: same file
    near = with_generation(text, now_ms() + 60_000)
    path.write_text(near)
    assert write_peers_file(path, fleet()) == near  # a minute ahead: a generation like any other
    # Written while this clock was far ahead: re-sent as it is, every frontend would refuse it (400).
    far = with_generation(text, 2**53)
    path.write_text(far)
    fresh = write_peers_file(path, fleet())
    found = re.search(r"(?m)^generation ([0-9]+)$", fresh)
    assert found is not None and abs(int(found.group(1)) - now_ms()) < 60_000
    assert path.read_text() == fresh and with_generation(fresh, 2**53) == far


class FakeAdmin(AdminDouble):
    def __init__(self, answers: list[PushResult]) -> None:
        self.answers = answers

    def push(self, body: str) -> PushResult:
        return self.answers.pop(0)


class PushOnly(Target):
    """A Target whose config text is no concern here: only its push is."""

    def render(self, inv: Inventory, states: Mapping[str, ServerState] | None) -> str:
        return ""


def controller(admin: FakeAdmin, *, policy: bool = True, sidecar: bool = True) -> Controller:
    """A controller pushing to one frontend (`admin`), as the sidecar (logs its outcome) or render does."""
    target = PushOnly(None, RenderOptions(flavor=Flavor.OPENRESTY), None, False, admin)  # type: ignore[arg-type]
    return Controller(target, config_for_flavor(Flavor.OPENRESTY) if policy else None, scrape=lambda *a, **k: {},
                      log_outcome=sidecar)


def test_the_sidecar_says_a_refused_push_once_per_change_and_loud_when_this_clock_is_behind(
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, "fdngx.controller")
    g = now_ms()
    admin = FakeAdmin([
        PushResult("stale", g, current=g + 30_000),  # a second controller: INFO, once
        PushResult("stale", g + 1, current=g + 30_000),
        PushResult("stale", g + 2, current=g + AHEAD_MS + 60_000),  # beyond any pusher: this clock is behind
        PushResult("stale", g + 3, current=g + AHEAD_MS + 60_000),
        PushResult("ok", g + 4, 1),
    ])
    ctl, state = controller(admin), PolicyState()
    results = []
    for _ in range(5):
        result, state = ctl.step(fleet(), state)
        results.append(result)
    # a normal outcome for the sidecar: no error, `pushed` is what the balancer took, the reason kept
    assert [(r.error, r.pushed) for r in results] == [(None, 0)] * 4 + [(None, 1)]
    assert results[0].superseded is not None and results[0].superseded.startswith(
        f"{admin.url}: holds generation {g + 30_000}, 30.0 s newer than this push's {g}: another controller")
    assert results[4].superseded is None
    said = [(r.levelno, r.getMessage()) for r in caplog.records if "holds generation" in r.getMessage()
            or "takes this host's" in r.getMessage()]
    assert [level for level, _ in said] == [logging.INFO, logging.WARNING, logging.INFO], said
    assert "this host's clock looks behind" in said[1][1] and "\n" not in said[1][1]
    assert said[2][1] == f"{admin.url}: takes this host's snapshots again"


def test_render_keeps_its_error_line_alone_and_a_static_push_refused_as_stale_is_normal(
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, "fdngx")
    g = now_ms()
    # render (log_outcome off) prints the reason itself: no log line says it a second time
    result = controller(FakeAdmin([PushResult("stale", g, current=g + 5_000)]), sidecar=False).step(
        fleet(), PolicyState())[0]
    assert result.superseded is not None and result.decisions is not None
    assert not [r for r in caplog.records if "holds generation" in r.getMessage()]
    # the peers file re-sent under its own generation, a sidecar's newer one in force: said as such, no error
    admin = FakeAdmin([PushResult("stale", g, current=g + 5_000)])
    result = controller(admin, policy=False).step(fleet(), PolicyState())[0]
    assert result.error is None and result.pushed == 0 and result.decisions is None
    assert result.superseded == (f"{admin.url}: keeps its newer snapshot (generation {g + 5_000}, 5.0 s newer than "
                                 f"the peers file's {g}), as a sidecar's should be")
    assert not [r for r in caplog.records if "holds generation" in r.getMessage()]


def test_controller_mode_says_warning_when_a_frontend_is_further_ahead_than_any_pusher(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    token = tmp_path / "token"
    fd = os.open(token, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write("t" * 32 + "\n")
    url = "http://127.0.0.1:9/fdngx/peers"
    fanout = Fanout([FrontendSpec(url, token)])
    try:
        caplog.set_level(logging.INFO, "fdngx.fanout")
        f = fanout._frontends[url]
        g = now_ms()
        for o in [PushOutcome(f.label, "stale", current=g + 30_000, generation=g, url=url),
                  PushOutcome(f.label, "stale", current=g + AHEAD_MS + 60_000, generation=g + 1, url=url),
                  PushOutcome(f.label, "stale", current=g + AHEAD_MS + 60_000, generation=g + 2, url=url),
                  PushOutcome(f.label, "ok", peers=1, generation=g + 3, url=url)]:
            fanout._note(f, o)
        said = [(r.levelno, r.getMessage()) for r in caplog.records if r.name == "fdngx.fanout"
                and "pushing to" not in r.getMessage()]
        assert [level for level, _ in said] == [logging.INFO, logging.WARNING, logging.INFO], said
        assert "another controller pushes there" in said[0][1]
        assert said[1][1].startswith(f"{url}: holds generation {g + AHEAD_MS + 60_000}")
        assert "this host's clock looks behind" in said[1][1]
        assert said[2][1] == f"{url}: takes this controller's snapshots again"
    finally:
        fanout.close()


def test_a_peers_file_superseded_says_which_kind_of_newer_snapshot_is_in_force() -> None:
    # One wording for both pushes (generation.superseded): a sidecar's snapshot within the window is normal for
    # a static render; one beyond any pusher means this host's clock is behind, whatever was pushed.
    url, g = "http://127.0.0.1:9/fdngx/peers", now_ms()
    assert generation.superseded(url, g, g + 5_000, peers_file=True).startswith(f"{url}: keeps its newer snapshot")
    far = generation.superseded(url, g, g + AHEAD_MS + 60_000, peers_file=True)
    assert far.startswith(f"{url}: holds generation {g + AHEAD_MS + 60_000}") and "clock looks behind" in far
    assert generation.PushState.of("stale", g + AHEAD_MS + 60_000) is generation.PushState.BEHIND
    assert generation.PushState.of("stale", g + 5_000) is generation.PushState.STALE
    assert generation.PushState.of("unchanged", None) is generation.PushState.OK
    assert generation.PushState.of("timeout", None) is generation.PushState.FAILED


class RecordingAdmin(FakeAdmin):
    """Takes every push, and keeps what it was sent."""

    def __init__(self) -> None:
        super().__init__([])
        self.bodies: list[str] = []

    def push(self, body: str) -> PushResult:
        self.bodies.append(body)
        return PushResult("ok", pushed(body), 1)


def pushed(body: str) -> int:
    found = re.search(r"(?m)^generation ([0-9]+)$", body)
    assert found is not None
    return int(found.group(1))


def test_a_restart_counts_on_from_the_generation_its_state_saved(monkeypatch: pytest.MonkeyPatch,
                                                                 tmp_path: Path) -> None:
    """The clock was set back two minutes, then the controller restarted: generations from the clock alone
    are older than what every frontend holds (409 stale for two minutes)."""
    monkeypatch.setattr(generation, "_last_generation", 0)  # a new process
    saved = now_ms() + 120_000
    admin = RecordingAdmin()
    ctl = controller(admin)
    _result, state = ctl.step(fleet(), PolicyState(config={GENERATION_KEY: saved}))
    assert pushed(admin.bodies[0]) == saved + 1
    # Kept in the state file, for the next process; the policy settings recorded there are unchanged.
    store = StateStore(tmp_path / "state.json")
    store.save(state)
    back = store.load()
    assert back.config[GENERATION_KEY] == saved + 1 and config_of_state(back) == ctl.policy
    monkeypatch.setattr(generation, "_last_generation", 0)
    controller(admin).step(fleet(), back)
    assert pushed(admin.bodies[1]) == saved + 2
    # One further ahead than any frontend takes (a clock that was far ahead, set right) is not followed.
    monkeypatch.setattr(generation, "_last_generation", 0)
    controller(admin).step(fleet(), PolicyState(config={GENERATION_KEY: now_ms() + AHEAD_MS + 60_000}))
    assert abs(pushed(admin.bodies[2]) - now_ms()) < 60_000
    for junk in ("12", 1.5, True, None, -5):
        generation.seed(junk)  # a hand-edited state: ignored
    assert generation.last_generation() == pushed(admin.bodies[2])


def stale(fe: FakeFrontend, conn: socket.socket) -> None:
    """Refuses every push: a snapshot 30 s newer is in force."""
    while request := read_request(conn):
        found = re.search(rb"(?m)^generation ([0-9]+)$", request)
        g = int(found.group(1)) if found else 0
        answer(conn, request, b"409 Conflict", f"stale generation={g} current={g + 30_000}\n".encode())


def test_every_frontend_refusing_this_controllers_pushes_for_a_while_is_a_warning(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """One frontend holding a newer snapshot is a second controller (INFO); all of them, for longer than a
    short while, is rather this host's clock set back (or another controller's clock ahead): WARNING."""
    fes = [FakeFrontend(stale), FakeFrontend(stale), FakeFrontend(good)]
    token = tmp_path / "token"
    fd = os.open(token, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write("t" * 32 + "\n")
    caplog.set_level(logging.INFO, "fdngx.fanout")
    fan = Fanout([FrontendSpec(f"{fe.url}/fdngx/peers", token) for fe in fes[:2]])
    try:
        def warnings() -> list[str]:
            return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]

        g = now_ms()
        for i in range(3):
            fan.push(f"generation {g + i}\nempty\n")
        assert warnings() == []  # not at once: two controllers side by side take turns
        monkeypatch.setattr(fanout, "ALL_STALE_S", 0.0)
        for i in range(3, 6):
            assert [o.status for o in fan.push(f"generation {g + i}\nempty\n")] == ["stale", "stale"]
        said = warnings()
        assert len(said) == 1 and said[0].startswith("every frontend that answers has refused this controller's "
                                                     "pushes as older for ") and "set back" in said[0], said
        # One frontend takes a push: the episode is over; said again when it comes back.
        fan.set_frontends([FrontendSpec(f"{fe.url}/fdngx/peers", token) for fe in fes])
        fan.push(f"generation {g + 6}\nempty\n")
        fan.set_frontends([FrontendSpec(f"{fe.url}/fdngx/peers", token) for fe in fes[:2]])
        fan.push(f"generation {g + 7}\nempty\n")
        assert len(warnings()) == 2
    finally:
        fan.close()
        for fe in fes:
            fe.close()
