"""A failing apply is said once a minute, not once a cycle, even when its text holds numbers that change every
cycle: a frontend refusing every push ("generation 1796590912345 is 400 s ahead of this frontend's clock")
wrote one ERROR per cycle, 43,200 a day (an outside review of controller mode). A fake apply, no nginx."""

from __future__ import annotations

import itertools
import logging
from pathlib import Path

import pytest

from fdngx.errors import ApplyError
from tests.unit.test_loop import FakeTarget, cycles, make


def test_the_same_failure_with_new_numbers_is_said_once_a_minute(tmp_path: Path,
                                                                 caplog: pytest.LogCaptureFixture) -> None:
    sc, scrape, clock, _ = make(tmp_path)
    generation = itertools.count(1796590912345, 1000)
    failing = {"on": True}

    def apply(text: str, guard: object = None) -> object:
        if failing["on"]:
            raise ApplyError(f"no frontend took the push: fe0: HTTP 400 generation {next(generation)} is "
                             "400 s ahead of this frontend's clock")
        return FakeTarget.apply(sc.config.target, text, guard)  # type: ignore[arg-type]

    object.__setattr__(sc.config.target, "apply", apply)
    caplog.set_level(logging.INFO, logger="fdngx")
    scrape.unhealthy.add("dp1")  # a change every cycle wants applied
    cycles(sc, clock, 5)
    said = [r for r in caplog.records if "apply failed" in r.getMessage()]
    assert len(said) == 1 and said[0].levelno == logging.ERROR, [r.getMessage() for r in said]
    failing["on"] = False
    cycles(sc, clock, 1)
    assert "apply works again" in caplog.text
