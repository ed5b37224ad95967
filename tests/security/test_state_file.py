"""The policy state file (issue 10): valid JSON with wrong types made `render --scrape` print a 55-line
traceback on every run and froze the sidecar for good. Now: a warning and a fresh state, like garbage.

The replicas here are addresses nobody listens on (127.0.0.1, a free port): the scrape fails at once and
the policy still runs on the loaded state.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest

from tests.security.conftest import cli, write
from tests.support import free_ports

WRONG = {
    "weight_is_text": {"version": 1, "instances": {"dp0": {"weight": "abc"}}},
    "weight_is_float": {"version": 1, "instances": {"dp0": {"weight": 1e308}}},
    "down_is_text": {"version": 1, "instances": {"dp0": {"down": "yes"}}},
    "load_is_nan": {"version": 1, "instances": {"dp0": {"load": math.nan}}},
    "instances_is_a_list": {"version": 1, "instances": [{"weight": 3}]},
    "instance_is_a_number": {"version": 1, "instances": {"dp0": 7}},
    "reloads_hold_text": {"version": 1, "instances": {}, "reloads": ["yesterday"]},
    "updated_at_is_text": {"version": 1, "instances": {}, "updated_at": "now"},
    "config_is_a_list": {"version": 1, "instances": {}, "config": [1, 2]},
    "config_ramp_steps_1e308": {"version": 1, "instances": {"dp0": {"weight": 5, "recovered_at": 1.0}},
                                "config": {"ramp_steps": 1e308, "ramp_duration": 10.0}},
    "config_max_weight_text": {"version": 1, "instances": {}, "config": {"max_weight": "abc"}},
    "version_is_true": {"version": True, "instances": {}},
    "top_level_list": [1, 2, 3],
}


def _setup(tmp: Path, doc: Any) -> tuple[Path, Path, Path]:
    port = free_ports(1)[0]
    inv = write(tmp / "fdngx.json", json.dumps(
        {"version": 1, "instances": [{"name": "dp0", "host": "127.0.0.1", "port": port}]}))
    out = tmp / "fdngx.conf"
    text = doc if isinstance(doc, str) else json.dumps(doc)
    state = write(tmp / ".fdngx.conf.fdngx-state.json", text)  # today's name
    write(tmp / "fdngx.conf.state.json", text)  # the original's
    for p in (state, tmp / "fdngx.conf.state.json"):
        p.chmod(0o600)
    return inv, out, state


@pytest.mark.parametrize("case", ["weight_is_text", "config_ramp_steps_1e308"])
def test_a_state_file_with_wrong_types_starts_fresh_with_a_warning(tmp_path: Path, case: str) -> None:
    """The real cron path (`render --scrape`); every other case below goes through the same loader."""
    inv, out, state = _setup(tmp_path, WRONG[case])
    proc = cli("render", "-i", str(inv), "--out", str(out), "--scrape")
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    assert len(proc.stderr.splitlines()) <= 6, proc.stderr
    assert "state" in proc.stderr  # the warning says which file was ignored
    assert "server 127.0.0.1:" in out.read_text()
    # The state written back is a valid one (the next run, and a restarted sidecar, read it).
    saved = json.loads(state.read_text())
    assert saved["version"] == 1 and isinstance(saved["instances"]["dp0"]["weight"], int)


@pytest.mark.parametrize("case", ["weight_is_text", "config_ramp_steps_1e308"])
def test_status_reads_a_state_file_with_wrong_types_without_a_traceback(tmp_path: Path, case: str) -> None:
    inv, _, state = _setup(tmp_path, WRONG[case])
    proc = cli("status", "-i", str(inv), "--state", str(state), "--json")
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr
    rows = json.loads(proc.stdout)["instances"]
    assert [r["name"] for r in rows] == ["dp0"] and 1 <= rows[0]["proposed_weight"] <= 100


def test_a_garbage_state_file_starts_fresh(tmp_path: Path) -> None:
    inv, out, _ = _setup(tmp_path, "[" * 100_000 + "]" * 100_000)
    proc = cli("render", "-i", str(inv), "--out", str(out), "--scrape")
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr


GARBAGE = ["", "{", "\x00\xff", "null", "[]" * 10, "[" * 100_000 + "]" * 100_000, '{"version": 1, "instances": {}}x']


@pytest.mark.parametrize("case", sorted(WRONG) + [f"garbage{n}" for n in range(len(GARBAGE))])
def test_every_unusable_state_loads_as_a_fresh_one_that_drives_the_policy(
        tmp_path: Path, case: str, caplog: pytest.LogCaptureFixture) -> None:
    """In process: the loader the CLI and the sidecar use; then the policy as `fdngx status` runs it."""
    from fdngx.domain import Instance, Inventory, LoadSample
    from fdngx.weights.policy import decide
    from fdngx.weights.settings import config_of_state
    from fdngx.weights.store import StateStore

    doc = GARBAGE[int(case[7:])] if case.startswith("garbage") else WRONG[case]
    path = write(tmp_path / ".fdngx.conf.fdngx-state.json", doc if isinstance(doc, str) else json.dumps(doc))
    path.chmod(0o600)
    with caplog.at_level("WARNING"):
        state = StateStore(path).load()
    assert state.instances == {} and state.config == {}
    if case not in ("garbage0",):  # an empty file is a missing state: nothing to warn about
        assert any(str(path) in r.getMessage() for r in caplog.records), caplog.text
    inv = Inventory([Instance("dp0", "127.0.0.1", 8001, 8001)])
    decisions, _ = decide({"dp0": LoadSample("dp0", True, True, 3.0, 0.0, 0.2, 64.0)}, inv, state,
                          config_of_state(state), 1.7e9)
    assert [d.weight for d in decisions] == [20]
