"""A failure that lasts is said when it starts and once a minute, not once a cycle: a failing apply even when
its text holds numbers that change every cycle (a frontend refusing every push, "generation 1796590912345 is
400 s ahead of this frontend's clock", wrote one ERROR per cycle, 43,200 a day: an outside review of controller
mode), and a policy state that cannot be saved (a full disk). A fake apply, no nginx; a real failing save."""

from __future__ import annotations

import itertools
import logging
import shutil
from pathlib import Path

import pytest

from fdngx.errors import ApplyError
from fdngx.weights.store import StateStore
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


def test_a_state_that_cannot_be_saved_is_said_once_then_saved_again(tmp_path: Path,
                                                                    caplog: pytest.LogCaptureFixture) -> None:
    """A full disk wrote "cannot save policy state" every cycle (52 lines in 100 s, the path twice, an errno and
    a repr: an outside review). Said when it starts, in one line naming the file; working again is said."""
    sc, _, clock, _ = make(tmp_path)
    where = tmp_path / "states"
    where.mkdir()
    sc.store = StateStore(where / "state.json")
    cycles(sc, clock, 1)
    assert (where / "state.json").is_file()
    shutil.rmtree(where)
    where.write_text("a file where the directory was: every save fails (ENOTDIR)\n")
    caplog.set_level(logging.INFO, logger="fdngx")
    for _ in range(6):  # a change every cycle, or a failed save tried again every 10 s: each saves
        sc.save()
    said = [r.getMessage() for r in caplog.records if "cannot save the policy state" in r.getMessage()]
    assert len(said) == 1 and f"{where / 'state.json'}: " in said[0] and "Errno" not in said[0], said
    where.unlink()
    where.mkdir()
    sc.save()
    assert "policy state saved again" in caplog.text and (where / "state.json").is_file()
