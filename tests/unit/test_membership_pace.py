"""A replica leaving reloads nginx (the nginx flavor) at most once per reload-budget slot.

An outside review flapped one registered replica every 6 s under 40 long streams: every down-mark, removal and
re-add was a reload exempt from the budget (60 in 120 s), and nginx's old workers, each waiting for its streams,
went from 2 to 33 (15 -> 253 MB). An inventory in which a replica leaves is now held until the budget's pace
allows (60 s / --max-reloads-per-minute after the last one taken), and a replica back before then cancels its
removal; a replica joining (capacity), a drain, pushed membership or no reload: never held.
The real render and file write, a fake scrape and a policy clock the test moves (tests/unit/test_loop.py).
"""

from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path

import pytest

from fdngx.domain import Inventory
from fdngx.inventory import save
from fdngx.weights.sidecar import Sidecar
from tests.unit.test_loop import Clock, inv_of, make


def _names(text: str) -> list[str]:
    return [ln.rsplit("# ", 1)[1] for ln in text.splitlines() if ln.strip().startswith("server ") and "# " in ln]


def _down(text: str, name: str) -> bool:
    return any(ln.endswith(f"# {name}") and " down;" in ln for ln in text.splitlines())


def _held(sc: Sidecar) -> float | None:
    return sc.telemetry.registry.get_sample_value("fdngx_inventory_held")


def _fleet(n: int, drained: int | None = None) -> Inventory:
    inv = inv_of(n)
    if drained is not None:
        inv.instances[drained].drain = True
    return inv


def _paced(tmp_path: Path, n: int, reloads: bool = True) -> tuple[Sidecar, Clock, list[str], Path]:
    """A sidecar on dp0..dp<n-1> with one reload slot per 15 s; `reloads`: nginx reloads for a change."""
    sc, _, clock, written = make(tmp_path, n=n, max_reloads_per_minute=4)
    object.__setattr__(sc.config.target, "reload", reloads)
    return sc, clock, written, tmp_path / "fdngx.json"


def _joined(tmp_path: Path, reloads: bool = True) -> tuple[Sidecar, Clock, list[str], Path]:
    """dp0, dp1, then dp2 joined and applied: the last membership change, taken just now."""
    sc, clock, written, inv = _paced(tmp_path, 2, reloads)
    sc.run_once()
    save(inv_of(3), inv)
    assert sc.reload_inventory() is True, "a replica joining is taken at once"
    sc.run_once()
    assert _names(written[-1]) == ["dp0", "dp1", "dp2"]
    return sc, clock, written, inv


@pytest.mark.parametrize("reloads", [True, False])
def test_a_second_membership_change_waits_for_the_budgets_pace(tmp_path: Path, reloads: bool,
                                                               caplog: pytest.LogCaptureFixture) -> None:
    sc, clock, written, inv = _joined(tmp_path, reloads)
    clock.t += 2.0
    save(inv_of(2), inv)  # dp2 leaves
    caplog.set_level(logging.INFO, logger="fdngx")
    taken = sc.reload_inventory()
    sc.run_once()
    if not reloads:  # nothing reloads for it: nothing to pace
        assert taken is True and _names(written[-1]) == ["dp0", "dp1"]
        return
    assert taken is False and len(sc.inventory.instances) == 3
    assert _names(written[-1]) == ["dp0", "dp1", "dp2"], "held: nginx keeps the membership it has"
    assert "inventory change held for 13 s" in caplog.text and "--max-reloads-per-minute" in caplog.text
    clock.t += 12.0
    sc.run_once()
    assert _names(written[-1]) == ["dp0", "dp1", "dp2"]
    assert _held(sc) == 1.0, "a held change is seen in the metrics, not only in one log line"
    clock.t += 1.0  # 15 s after the last one taken
    sc.run_once()
    assert _names(written[-1]) == ["dp0", "dp1"]
    assert _held(sc) == 0.0
    assert "inventory change applied after its hold: 2 instance(s)" in caplog.text


def test_a_replica_back_before_the_hold_ends_cancels_its_removal(tmp_path: Path) -> None:
    """A flap (removed, registered again) costs no reload at all."""
    sc, clock, written, inv = _joined(tmp_path)
    count = len(written)
    save(inv_of(2), inv)
    assert sc.reload_inventory() is False
    save(inv_of(3), inv)  # back to what nginx has
    assert sc.reload_inventory() is False
    clock.t += 60.0
    sc.run_once()
    assert len(written) == count and _names(written[-1]) == ["dp0", "dp1", "dp2"]


def test_an_edit_that_keeps_the_members_is_never_held(tmp_path: Path) -> None:
    """A drain (or a weight) is an admin's deliberate edit: taken at once, right after a membership change."""
    sc, _, written, inv = _joined(tmp_path)
    save(_fleet(3, drained=1), inv)
    assert sc.reload_inventory() is True
    sc.run_once()
    assert _down(written[-1], "dp1"), written[-1]


def test_a_drain_during_a_held_removal_is_taken_at_once_with_it(tmp_path: Path) -> None:
    """The drain was held behind the pending removal for 13 s (a review of the pace)."""
    sc, clock, written, inv = _joined(tmp_path)
    clock.t += 1.0
    save(inv_of(2), inv)
    assert sc.reload_inventory() is False  # dp2 leaves: held
    save(_fleet(2, drained=1), inv)
    assert sc.reload_inventory() is True
    sc.run_once()
    assert _names(written[-1]) == ["dp0", "dp1"]
    assert _down(written[-1], "dp1"), written[-1]


def test_only_a_membership_change_starts_the_pace(tmp_path: Path) -> None:
    """An edit that keeps the members (here a drain) does not make the next removal wait (it did, and the
    line said 'nginx reloaded for one' of a change nginx never saw)."""
    sc, clock, written, inv = _paced(tmp_path, 3)
    sc.run_once()
    save(_fleet(3, drained=0), inv)
    assert sc.reload_inventory() is True
    sc.run_once()
    clock.t += 1.0
    save(_fleet(2, drained=0), inv)
    assert sc.reload_inventory() is True, "no membership change was taken before: no wait"
    sc.run_once()
    assert _names(written[-1]) == ["dp0", "dp1"]


def test_the_last_replica_leaving_is_never_held(tmp_path: Path) -> None:
    """A registry's fleet going empty renders nginx's 503 (Retry-After) at once: held, nginx kept proxying to
    replicas that were gone, 502 for up to 60/N s."""
    sc, _, written, inv = _joined(tmp_path)
    target = sc.config.target
    object.__setattr__(target, "opts", replace(target.opts, allow_empty=True))  # as with --registry-listen
    save(Inventory([]), inv)
    assert sc.reload_inventory() is True
    sc.run_once()
    assert _names(written[-1]) == [] and _held(sc) == 0.0
