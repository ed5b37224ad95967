"""What the sidecar says of a stopped nginx must be true of the file: "changes wait in the file until it
starts" was said while every apply failed (nginx -t refused the candidate: the file holds the old weights,
not the changes; an outside day-two review). A fake apply and a fake nginx control, no nginx."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from tests.unit.test_loop import cycles, make


class Stopped:
    def running(self) -> bool:
        return False


@pytest.mark.parametrize("failing", [False, True])
def test_a_stopped_nginx_is_said_with_what_the_file_holds(tmp_path: Path, failing: bool,
                                                          caplog: pytest.LogCaptureFixture) -> None:
    sc, scrape, clock, _ = make(tmp_path, fail=lambda: failing)
    target = sc.config.target
    object.__setattr__(target, "control", Stopped())
    object.__setattr__(target, "reload", True)
    caplog.set_level(logging.INFO, logger="fdngx")
    scrape.unhealthy.add("dp1")
    cycles(sc, clock, 4)
    said = [r.getMessage() for r in caplog.records if "nginx is not running" in r.getMessage()]
    assert len(said) == 1, said
    if failing:
        assert "changes wait" not in said[0] and "the failed apply left unchanged" in said[0], said
    else:
        assert said[0].endswith("nginx is not running: changes wait in the file until it starts"), said
