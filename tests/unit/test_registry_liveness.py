"""The registry's silent-but-serving WARNING: once per silence, one line per check for all that fell silent.

An outside review cut 1,024 registered instances off from the registry (their /health still passing): one
WARNING each, 1,350 lines in 3 minutes. fdngx.registry.liveness, no I/O."""

from __future__ import annotations

import logging

import pytest

from fdngx.registry.liveness import Liveness


def _silent(live: Liveness, names: list[str], now: float) -> None:
    for n, name in enumerate(names):
        key = ("127.0.0.1", 20000 + n)
        assert live.judge(key, name, now, 30.0, {key: None}) is None  # /health passes: kept


def test_many_falling_silent_in_one_check_are_one_warning(caplog: pytest.LogCaptureFixture) -> None:
    live = Liveness()
    names = [f"fd-{n}" for n in range(40)]
    for n in range(40):
        live.heartbeat(("127.0.0.1", 20000 + n), 0.0)
    caplog.set_level(logging.WARNING, logger="fdngx.registry")
    _silent(live, names, 40.0)
    live.say_silent()
    [record] = caplog.records
    text = record.getMessage()
    assert "40 instances have sent no heartbeat for 40 s" in text and "fd-0, fd-1" in text and "35 more" in text
    _silent(live, names, 45.0)  # the same silence: said once
    live.say_silent()
    assert len(caplog.records) == 1


def test_one_falling_silent_keeps_its_own_line(caplog: pytest.LogCaptureFixture) -> None:
    live = Liveness()
    live.heartbeat(("127.0.0.1", 20000), 0.0)
    caplog.set_level(logging.WARNING, logger="fdngx.registry")
    _silent(live, ["fd-a"], 31.0)
    live.say_silent()
    assert [r.getMessage().split(";")[0] for r in caplog.records] == [
        "registry: fd-a has sent no heartbeat for 31 s but its /health passes, so it is kept"]
