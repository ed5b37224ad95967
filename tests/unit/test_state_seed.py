"""A sidecar whose policy state is gone (deleted, damaged, a new --state, one from a newer fdngx after a roll
back) keeps a replica the config it wrote holds out (down, backup) out, not put back at neutral: it gave a
replica nginx held out full weight and reloaded, then took it out again and reloaded a second time (an
outside day-two review). The real render and file, a fake scrape and a policy clock (tests/unit/test_loop.py)."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from tests.unit.test_loop import cycles, make


def _down(text: str, name: str) -> bool:
    return any(ln.endswith(f"# {name}") and " down;" in ln for ln in text.splitlines())


def test_a_replica_nginx_holds_down_stays_down_when_the_state_is_lost(tmp_path: Path,
                                                                      caplog: pytest.LogCaptureFixture) -> None:
    sc, scrape, clock, written = make(tmp_path)
    scrape.unhealthy.add("dp0")
    cycles(sc, clock, 5)
    assert _down(written[-1], "dp0"), written[-1]
    live = (tmp_path / "upstream.conf").read_text()
    sc._close()
    (tmp_path / ".upstream.conf.fdngx-state.json").unlink()  # the policy's memory, lost

    caplog.set_level(logging.INFO, logger="fdngx")
    again, scrape2, clock2, written2 = make(tmp_path)
    scrape2.unhealthy.add("dp0")  # still failing /health
    clock2.t = clock.t + 60
    cycles(again, clock2, 3)
    assert written2 == [] and (tmp_path / "upstream.conf").read_text() == live, \
        "nginx kept dp0 down: no write, no reload (it was put up at weight 20, then down again)"
    assert "1 replica(s) without policy memory stay as" in caplog.text and "dp0 down (weight" in caplog.text, \
        caplog.text
    assert again.state.instances["dp0"].down
