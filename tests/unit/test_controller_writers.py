"""The controller beside other writers and a full disk: a config file someone else wrote is put right at the
next cycle, and a peers file that cannot be written does not keep the snapshot from the balancer."""

from __future__ import annotations

import dataclasses
import logging
import os
from pathlib import Path

import pytest

from fdngx.domain import Flavor, Listen
from fdngx.errors import FdngxError
from fdngx.nginx.admin import Admin, PushResult
from fdngx.nginx.apply import ApplyResult, safe_apply
from fdngx.nginx.generation import generation_in
from fdngx.nginx.render import RenderOptions
from fdngx.nginx.target import Target
from fdngx.weights.controller import Controller, CycleResult, _log_scrapes
from fdngx.weights.settings import PolicyConfig, config_for_flavor
from fdngx.weights.state import InstanceState, PolicyState
from tests.support import AdminDouble, fdngx, token_file
from tests.unit.test_loop import Clock, FakeScrape, FakeTarget, inv_of, make


def test_a_config_someone_else_wrote_is_put_right_at_the_next_cycle(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """nginx flavor: the sidecar applied only when its decisions changed, so an operator's `fdngx render
    --reload` (static weights) stayed in nginx on a steady fleet, while status and the metrics showed the
    sidecar's weights."""
    caplog.set_level(logging.WARNING, "fdngx.controller")
    out, written = tmp_path / "upstream.conf", []
    c = Controller(FakeTarget(out, lambda: False, written), PolicyConfig(), scrape=FakeScrape(), clock=Clock(),
                   log_outcome=False)
    inv = inv_of(2)
    _, state = c.step(inv, PolicyState(), force_render=True)
    ours = out.read_text()
    assert ours.count("weight=20") == 2
    _, state = c.step(inv, state)
    assert len(written) == 1 and not caplog.records  # steady: nothing to write
    out.write_text(ours.replace("weight=20", "weight=1"))  # another writer
    result, state = c.step(inv, state)
    assert result.error is None and out.read_text() == ours and len(written) == 2
    assert [r.getMessage() for r in caplog.records if "changed by another writer" in r.getMessage()]
    caplog.clear()
    c.step(inv, state)
    assert len(written) == 2 and not caplog.records  # put right once, then steady again


class Balancer(AdminDouble):
    def __init__(self) -> None:
        self.bodies: list[str] = []

    def push(self, body: str) -> PushResult:
        self.bodies.append(body)
        return PushResult("ok", generation_in(body) or 0, body.count("\npeer "))


def _openresty_controller(tmp_path: Path, balancer: Balancer, peers: Path) -> Controller:
    """An OpenResty-flavor controller pushing to `balancer`, its peers file at `peers`; dp1 fails /health."""
    opts = RenderOptions(flavor=Flavor.OPENRESTY, admin_token_file=str(token_file(tmp_path)), peers_file=str(peers))
    target = Target(tmp_path / "site.conf", opts, None, False, balancer, peers)  # type: ignore[arg-type]
    scrape = FakeScrape()
    scrape.unhealthy.add("dp1")
    return Controller(target, config_for_flavor(Flavor.OPENRESTY), scrape=scrape, clock=Clock(), log_outcome=False)


def test_a_peers_file_that_cannot_be_written_does_not_keep_the_snapshot_from_the_balancer(tmp_path: Path) -> None:
    """openresty flavor, full disk: the peers file's OSError escaped the cycle before the push, every cycle, so
    a replica failing /health stayed in the balancer's rotation (and no apply failure was counted)."""
    balancer = Balancer()
    gone = tmp_path / "gone"  # the peers file's directory is not there: its write fails as a full disk's would
    c = _openresty_controller(tmp_path, balancer, gone / "peers")
    state = PolicyState()
    for _ in range(4):
        result, state = c.step(inv_of(2), state)
        assert result.error is not None and "cannot write the peers file" in result.error
        assert str(gone / "peers") in result.error
        assert result.pushed == 2  # the balancer took the snapshot all the same
    assert result.decisions is not None and result.decisions.by_name()["dp1"].down
    assert "peer dp1 127.0.0.1 8001" in balancer.bodies[-1] and state.instances["dp1"].down, \
        "the state records what the balancer got: dp1 down"


def test_a_clock_stepped_back_is_said_once_even_while_the_apply_fails(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """The state a failed apply keeps is clamped like the policy's (else its times from the future came back
    every cycle, and the WARNING with them)."""
    caplog.set_level(logging.WARNING, "fdngx.controller")
    out, clock = tmp_path / "upstream.conf", Clock()
    c = Controller(FakeTarget(out, lambda: True, []), PolicyConfig(), scrape=FakeScrape(), clock=clock,
                   log_outcome=False)
    inv = inv_of(2)
    future = clock.t + 3600  # the state was written while the clock ran an hour ahead
    state = PolicyState({n: InstanceState(weight=20, last_change_at=future) for n in ("dp0", "dp1")},
                        [future], future)
    for _ in range(3):
        result, state = c.step(inv, state, force_render=True)  # as cron's runs
        assert result.error is not None  # the apply keeps failing
        clock.t += 2
    said = [r.getMessage() for r in caplog.records if "the clock went back" in r.getMessage()]
    assert len(said) == 1 and "3600s ahead" in said[0]
    assert max(state.reloads, default=0) <= clock.t and state.instances["dp0"].last_change_at <= clock.t


def test_one_sidecar_per_config_and_render_is_told(tmp_path: Path) -> None:
    """Two sidecars on one file would put each other's writes right every cycle (a reload each time): the
    second is refused, naming the first; `fdngx render` to it is warned that the sidecar rewrites it."""
    first, _, _, _ = make(tmp_path, n=2)
    try:
        with pytest.raises(FdngxError, match=r"upstream.conf: another fdngx sidecar manages this config .*held by "
                                             rf"pid {os.getpid()}"):
            make(tmp_path, n=2)
        got = fdngx("render", "-i", str(tmp_path / "fdngx.json"), "--out", str(tmp_path / "upstream.conf"))
        assert got.returncode == 0 and "a running fdngx sidecar manages" in got.stderr, got.stderr
    finally:
        first._close()
    again, _, _, _ = make(tmp_path, n=2)  # the first one gone: its lock with it
    again._close()
    got = fdngx("render", "-i", str(tmp_path / "fdngx.json"), "--out", str(tmp_path / "upstream.conf"))
    assert got.returncode == 0 and "a running fdngx sidecar" not in got.stderr


def _written_over(tmp_path: Path, text: str) -> tuple[CycleResult, Path]:
    """A controller's cycle after it applied its config once and another writer put `text` in the file."""
    out = tmp_path / "upstream.conf"
    c = Controller(Target(out, RenderOptions(), None, False, None), PolicyConfig(), scrape=FakeScrape(),
                   clock=Clock(), log_outcome=False)
    _, state = c.step(inv_of(2), PolicyState(), force_render=True)
    out.write_text(text)
    return c.step(inv_of(2), state)[0], out


def test_a_config_replaced_by_a_hand_written_file_is_left_alone_and_said_so(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """The sidecar said "rewriting it" and then the apply refused the file (not fdngx's): say what happens."""
    caplog.set_level(logging.WARNING, "fdngx.controller")
    result, out = _written_over(tmp_path, "upstream mine { server 127.0.0.1:1; }\n")  # a config tool's own file
    assert result.error is not None and "not a file fdngx wrote" in result.error
    assert out.read_text() == "upstream mine { server 127.0.0.1:1; }\n"
    said = [r.getMessage() for r in caplog.records]
    assert any("replaced by a file fdngx did not write" in m for m in said), said
    assert not any("rewriting it" in m for m in said), said


def test_a_render_whose_inventory_changed_writes_no_peers_file_either(tmp_path: Path) -> None:
    """openresty: the peers file (the replicas nginx reads at a reload) was written from the inventory this run
    had read before the apply noticed it had changed (a drain undone in the file until the rerun)."""
    peers = tmp_path / ".upstream.conf.fdngx-peers"
    target = Target(tmp_path / "upstream.conf", RenderOptions(), None, False, None, peers_file=peers)
    c = Controller(target, None, log_outcome=False, inputs_changed=lambda: "the inventory changed")
    result, _state = c.step(inv_of(2), PolicyState(), force_render=True)
    assert result.stale_inputs and "the inventory changed" in (result.error or "")
    assert not peers.exists() and not (tmp_path / "upstream.conf").exists()


def test_a_drained_replica_stopped_for_maintenance_is_not_a_warning(caplog: pytest.LogCaptureFixture) -> None:
    """`journalctl -p warning` showed every planned stop of a drained replica; and working again is news."""
    caplog.set_level(logging.INFO, "fdngx.controller")
    quiet = PolicyState({"dp0": InstanceState(), "dp1": InstanceState(drained=True, down=True)})
    failing = PolicyState({"dp0": InstanceState(last_error="connection refused"),
                           "dp1": InstanceState(drained=True, down=True, last_error="connection refused")})
    _log_scrapes(quiet, failing)
    _log_scrapes(failing, quiet)
    said = [(r.levelname, r.getMessage()) for r in caplog.records]
    assert said == [("WARNING", "dp0: metrics scrape failing: connection refused"),
                    ("INFO", "dp1: metrics scrape failing (drained): connection refused"),
                    ("INFO", "dp0: metrics scrape works again"),
                    ("INFO", "dp1: metrics scrape works again")], said


class _NginxComesAndGoes(Target):
    """Writes the file; says nginx runs or not as the test's list does, one entry per apply."""

    def __init__(self, out: Path, running: list[bool]) -> None:
        super().__init__(out, RenderOptions(), None, False, None)
        object.__setattr__(self, "running", running)

    def apply(self, text: str, guard: object = None) -> ApplyResult:
        result = safe_apply(self.out or Path(), text, None, reload=False)
        return dataclasses.replace(result, nginx_running=self.running.pop(0))  # type: ignore[attr-defined]


def test_nginx_stopped_and_started_again_is_said_both_ways(tmp_path: Path,
                                                          caplog: pytest.LogCaptureFixture) -> None:
    """'nginx is not running' came once, and its end never: the log left the operator guessing."""
    caplog.set_level(logging.INFO, "fdngx.controller")
    c = Controller(_NginxComesAndGoes(tmp_path / "upstream.conf", [True, False, False, True, True]), PolicyConfig(),
                   scrape=FakeScrape(), clock=Clock())
    state = PolicyState()
    for _ in range(5):
        _, state = c.step(inv_of(2), state, force_render=True)
    said = [r.getMessage() for r in caplog.records if "nginx is" in r.getMessage()]
    assert said == [f"{tmp_path / 'upstream.conf'}: nginx is not running: changes wait in the file until it starts",
                    f"{tmp_path / 'upstream.conf'}: nginx is running again"], said


class _Recovering(Target):
    """An apply that recovered something first (an older fdngx's backup moved) and reloaded."""

    def apply(self, text: str, guard: object = None) -> ApplyResult:
        result = safe_apply(self.out or Path(), text, None, reload=False)
        return dataclasses.replace(result, recovered="moved x.fdngx-bak to .x.fdngx-bak-legacy", reloaded=True)


def test_what_an_apply_recovered_is_said_once(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """The sidecar logged the recovery, then the apply's summary, which carries it too: twice."""
    caplog.set_level(logging.INFO, "fdngx.controller")
    c = Controller(_Recovering(tmp_path / "upstream.conf", RenderOptions(), None, False, None), PolicyConfig(),
                   scrape=FakeScrape(), clock=Clock())
    c.step(inv_of(2), PolicyState(), force_render=True)
    said = [r.getMessage() for r in caplog.records]
    assert sum("moved x.fdngx-bak" in m for m in said) == 1, said
    assert any("applied and reloaded" in m for m in said), said


def test_another_writer_of_an_older_version_is_named(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """An older fdngx still writing the config (a cron line of the previous layout) and this sidecar undo each
    other; the warning named neither. The other's version is in its header."""
    caplog.set_level(logging.WARNING, "fdngx.controller")
    _written_over(tmp_path, "# Generated by fdngx 0.1.0: do not edit.\n# fdngx-generation: 0123456789ab\n"
                            "upstream x {}\n")
    said = [r.getMessage() for r in caplog.records if "changed by another writer" in r.getMessage()]
    assert said and "(fdngx 0.1.0: an older run still writes it?)" in said[0], said


def test_a_rotated_admin_token_is_pushed_with_after_the_frontends_reload(tmp_path: Path,
                                                                        caplog: pytest.LogCaptureFixture) -> None:
    """The per-frontend sidecar read its token once, at its start: after a rotation (and nginx's reload) every
    push got 403 until a restart. It reads the file again when it changes; a bad rewrite keeps the old one."""
    caplog.set_level(logging.INFO, "fdngx")  # the token file is said by fdngx.nginx.admin.TokenFile
    path = token_file(tmp_path, text="old-token-0001-0123456789")
    target = Target(tmp_path / "upstream.conf", RenderOptions(flavor=Flavor.OPENRESTY, admin_token_file=str(path)),
                    None, False, Admin(Listen.parse("127.0.0.1:9"), "old-token-0001-0123456789"))
    target._renew_token()  # the first look: what it was started with
    assert target.admin is not None and target.admin.token == "old-token-0001-0123456789"
    new = tmp_path / "token.new"
    new.write_text("new-token-0002-0123456789\n")
    new.chmod(0o600)
    os.replace(new, path)  # the documented rotation: a new file renamed over the old one
    target._renew_token()
    assert target.admin.token == "new-token-0002-0123456789"
    assert any("admin token changed" in r.getMessage() for r in caplog.records)
    path.write_text("two words\n")  # a bad edit: kept, said
    target._renew_token()
    assert target.admin.token == "new-token-0002-0123456789"
    assert any("not read again" in r.getMessage() for r in caplog.records)


class _Superseded(Balancer):
    """Another controller's newer snapshot is in force: every push is refused as older (409 stale)."""

    def push(self, body: str) -> PushResult:
        self.bodies.append(body)
        sent = generation_in(body) or 0
        return PushResult("stale", sent, 0, current=sent + 5_000)


def test_a_push_refused_as_older_is_not_recorded_as_what_the_balancer_has(tmp_path: Path) -> None:
    """The state records only what nginx got: a controller whose every push was refused as older (another
    controller's snapshot in force) recorded its own down flags and weights as applied, so its status, its
    metrics and its next decisions read a change no frontend had."""
    balancer = _Superseded()
    c = _openresty_controller(tmp_path, balancer, tmp_path / "peers")
    state = PolicyState()
    for _ in range(4):
        result, state = c.step(inv_of(2), state)
        assert result.pushed == 0 and result.superseded
    assert result.decisions is not None and result.decisions.by_name()["dp1"].down, "decided down"
    assert "peer dp1 127.0.0.1 8001 20 1 " in balancer.bodies[-1], "pushed as down (its fifth field)"
    assert not state.instances["dp1"].down, "no frontend took the snapshot that held dp1 down"
