"""The registry's INFO about updated registrations: one line per check for all the instances that changed in
it, with what changed; one instance alone keeps a line of its own. fdngx.registry.changes, no I/O.

Before, every accepted change wrote its own line: an instance flapping is_paused (FastDeploy posts every 5 s)
wrote one per heartbeat, a fleet of them buried the joins and leaves."""

from __future__ import annotations

import logging
from typing import Any

import pytest

from fdngx.registry.changes import Changes, changed_fields


def entry(port: int, **fd: Any) -> dict[str, Any]:
    return {"name": f"fd-{port}", "port": port, "metrics_port": 9001, "metrics_source": "body",
            "fastdeploy": {"version": "v1", "is_paused": False, **fd}}


def test_changed_fields_names_top_level_and_fastdeploy_fields() -> None:
    old = entry(8001)
    assert changed_fields(old, old) == []
    assert changed_fields(old, {**entry(8001, is_paused=True), "metrics_port": 9002}) == ["metrics_port", "is_paused"]
    assert changed_fields(old, entry(8001, version="v2", tp_size=2)) == ["version", "tp_size"]


def test_many_instances_changing_in_one_check_are_one_line(caplog: pytest.LogCaptureFixture) -> None:
    changes = Changes()
    changes.say(100.0)  # the check before
    caplog.set_level(logging.INFO, logger="fdngx.registry")
    for beat in range(5):  # 40 instances flapping is_paused every heartbeat
        for port in range(8000, 8040):
            changes.add(f"fd-{port}", entry(port, is_paused=beat % 2 == 1), entry(port, is_paused=beat % 2 == 0),
                        101.0 + beat)
    changes.add("fd-8000", entry(8000), entry(8000, version="v2"), 104.5)
    assert caplog.records == []  # nothing said between checks
    changes.say(105.0)
    assert [r.getMessage() for r in caplog.records] == [
        "registry: 40 registered instances updated in 5 s (201 changes: is_paused, version): fd-8000, fd-8001, "
        "fd-8002, fd-8003, fd-8004 and 35 more"]
    assert all(r.levelno == logging.INFO for r in caplog.records)
    caplog.clear()
    changes.say(110.0)  # nothing changed since: nothing said
    assert caplog.records == []


def test_one_instance_changing_keeps_a_line_of_its_own(caplog: pytest.LogCaptureFixture) -> None:
    changes = Changes()
    changes.say(0.0)
    caplog.set_level(logging.INFO, logger="fdngx.registry")
    changes.add("fd-8001", entry(8001), entry(8001, version="v2"), 1.0)
    changes.say(5.0)
    for beat in range(3):
        changes.add("fd-8001", entry(8001, is_paused=beat % 2 == 0), entry(8001, is_paused=beat % 2 == 1), 6.0 + beat)
    moved = {**entry(8001), "metrics_port": 9100, "metrics_source": "rule"}
    changes.add("fd-8001", entry(8001), moved, 9.0)
    changes.say(10.0)
    assert [r.getMessage() for r in caplog.records] == [
        "registry: fd-8001 updated (version; metrics port 9001 from body)",
        "registry: fd-8001 updated 4 times in 5 s (is_paused, metrics_port, metrics_source; metrics port 9100 "
        "from rule)"]
