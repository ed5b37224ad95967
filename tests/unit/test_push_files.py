"""Controller mode's push file: it decides where the admin tokens go, so it is trusted like the token files;
an empty one is refused (a cycle that pushes to nobody is no success); a relative token path is relative to
the push file. Fake frontends on 127.0.0.1 only."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from pathlib import Path

import pytest

from fdngx.commands.options import render_options
from fdngx.domain import Balancer, Flavor, Mode
from fdngx.errors import FdngxError, UnsafeFileError, UsageError
from fdngx.nginx.fanout import NO_FRONTENDS, Fanout, PushOutcome
from fdngx.nginx.pushfile import read_push_file
from fdngx.nginx.target import TargetSpec, open_target
from fdngx.weights.controller import CycleResult, fleet_outcome
from fdngx.weights.settings import config_for_flavor
from fdngx.weights.sidecar import Sidecar, SidecarConfig
from fdngx.weights.state import PolicyState
from fdngx.weights.telemetry import Telemetry
from tests.support import token_file
from tests.unit.test_loop import FakeScrape
from tests.unit.test_push_deadline import FakeFrontend, Handler, frontends, good

__all__ = ["frontends"]  # the fixture

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("text", ["", "\n\n", "# every frontend commented out\n# http://10.0.0.1:9401\n"])
def test_a_push_file_with_no_frontend_is_refused(tmp_path: Path, text: str) -> None:
    f = tmp_path / "frontends"
    f.write_text(text)
    with pytest.raises(UsageError, match=r"frontends: the push file lists no frontend \(one admin URL per line\)$"):
        read_push_file(f, token_file(tmp_path))


@pytest.mark.parametrize("mode", [0o666, 0o620, 0o602])
def test_a_push_file_others_can_write_is_refused(tmp_path: Path, mode: int) -> None:
    """Whoever writes it could add `http://their-host:port /path/to/any/0600/file` and receive that file."""
    f = tmp_path / "frontends"
    f.write_text(f"http://127.0.0.1:9401 {token_file(tmp_path, 'secret-of-another-service')}\n")
    f.chmod(mode)
    with pytest.raises(UnsafeFileError) as err:
        read_push_file(f, None)
    assert str(err.value) == (f"{f}: the push file is writable by group or others (mode {mode:04o}), and it says "
                              f"where the admin tokens go; chmod go-w {f}")
    f.chmod(0o644)
    assert len(read_push_file(f, None)) == 1


def test_a_relative_token_path_is_relative_to_the_push_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    conf = tmp_path / "etc"
    conf.mkdir()
    token_file(conf, "fe1-token")
    f = conf / "frontends"
    f.write_text("http://10.0.0.1:9401 fe1-token\nhttp://10.0.0.2:9401 ./sub/../fe1-token\n")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)  # systemd starts the sidecar in /
    specs = read_push_file(f, None)
    assert [s.token_file.resolve() for s in specs] == [conf / "fe1-token"] * 2


def test_a_push_to_no_frontend_fails_the_cycle(tmp_path: Path) -> None:
    fan = Fanout([])
    try:
        pushes = fan.push("generation 1\nempty\n")
    finally:
        fan.close()
    assert pushes == ()
    assert fleet_outcome(pushes) == (None, NO_FRONTENDS)  # pushed to nobody: no success


def frontend_up(tel: Telemetry, label: str) -> float | None:
    return tel.registry.get_sample_value("fdngx_frontend_up", {"frontend": label})


def test_telemetry_forgets_the_frontends_when_none_is_left() -> None:
    tel = Telemetry(flavor="openresty")
    pushes = (PushOutcome("10.0.0.1:9401", "ok", peers=1), PushOutcome("10.0.0.2:9401", "ok", peers=1))
    tel.cycle(CycleResult(None, {}, None, 1, None, pushes=pushes), PolicyState(), 1.0, 0.1)
    assert frontend_up(tel, "10.0.0.1:9401") == 1.0
    # A cycle that failed before its push says nothing about the frontends: their series stay.
    tel.cycle(CycleResult(None, {}, None, None, "cannot write it: disk full"), PolicyState(), 2.0, 0.1)
    assert frontend_up(tel, "10.0.0.1:9401") == 1.0
    # No frontend left to push to: the old ones' series go (they said 1 forever).
    tel.cycle(CycleResult(None, {}, None, None, NO_FRONTENDS, pushes=()), PolicyState(), 3.0, 0.1)
    assert frontend_up(tel, "10.0.0.1:9401") is None and frontend_up(tel, "10.0.0.2:9401") is None


def sidecar(tmp_path: Path, push_file: Path, token: Path) -> Sidecar:
    """A controller with no nginx of its own, pushing to the frontends its push file lists."""
    inv = tmp_path / "fdngx.json"
    inv.write_text((REPO / "examples" / "fdngx.json").read_text())
    opts = render_options(mode=Mode.SITE, flavor=Flavor.OPENRESTY, listen="127.0.0.1:8080", template_dir=None,
                          max_fails=1, fail_timeout=10, keepalive=16, access_log=None,
                          admin_listen="127.0.0.1:9401", balancer=Balancer.LEAST)
    target = open_target(TargetSpec(opts, None, controller=True, frontends=(), push_timeout=2.0))
    cfg = SidecarConfig((inv,), target, policy=config_for_flavor("openresty"), push_file=push_file,
                        push_token_file=token)
    try:
        return Sidecar(cfg, scrape=FakeScrape(), telemetry=Telemetry(flavor="openresty"))
    except BaseException:
        target.close()
        raise


def test_the_sidecar_keeps_its_frontends_when_the_push_file_is_emptied(
        frontends: Callable[[Handler], FakeFrontend], tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    fe = frontends(good)
    token = token_file(tmp_path)
    push_file = tmp_path / "frontends"
    push_file.write_text("")
    with pytest.raises(FdngxError, match="lists no frontend"):  # at start: a startup error
        sidecar(tmp_path, push_file, token)
    push_file.write_text(f"{fe.url}\n")
    sc = sidecar(tmp_path, push_file, token)
    try:
        first = sc.run_once()
        assert first.error is None and [o.status for o in first.pushes] == ["ok"]
        caplog.set_level(logging.INFO, "fdngx")
        # Emptied (a truncate-then-write edit caught half-way, a config-management bug): the list stays.
        with open(push_file, "w"):
            pass
        os.utime(push_file, ns=(1, 1))  # a new mtime, whatever the clock's resolution
        for _ in range(2):
            result = sc.run_once()
            assert result.error is None and [o.status for o in result.pushes] == ["ok"]
        said = [r.getMessage() for r in caplog.records if "lists no frontend" in r.getMessage()]
        assert len(said) == 1 and "keeping the frontends in use" in said[0], said
    finally:
        sc.config.target.close()
