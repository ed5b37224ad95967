"""The load model's `backup` verdict (nginx flavor) in a closed loop with least_conn: what nginx does with a
`backup` server (sends it nothing while the others are up, whatever its weight) and what the policy must
therefore not pay reloads for, nor subtract from its load."""

from __future__ import annotations

from fdngx.weights.policy import Decisions
from tests.unit.test_policy import CFG, LeastConn, inventory, run

NAMES = ["dp0", "dp1", "dp2", "dp3"]


def _backup_from(ds: list[Decisions]) -> int:
    return next(k for k, d in enumerate(ds) if d.by_name()["dp0"].backup)


def test_a_backup_replica_s_weight_is_not_worth_a_reload() -> None:
    """dp0 filled from elsewhere goes `backup`. nginx gives a backup server nothing while the others are up,
    whatever its weight, and scaling every other weight alike changes nothing either: after that verdict,
    steady traffic is worth no reload (measured before: bench.lb external, 10->8->5->3 on the backup, four
    reloads in a minute, each cutting a request sent on a keep-alive connection)."""
    loop = LeastConn(NAMES, total=120, external={"dp0": 45})
    ds, _, _ = run(inventory(64, 64, 64, 64), loop, 40)
    k = _backup_from(ds)
    after = ds[k + 1:]
    assert all(d.by_name()["dp0"].backup for d in after), [d.by_name()["dp0"].reason for d in after]
    moved = [x.reason for d in after for x in d if x.changed]
    assert not moved, moved


def test_a_backup_replica_s_own_load_is_all_from_elsewhere() -> None:
    """In backup nginx sends dp0 nothing: every request there came from elsewhere. Still 0.8 of a fair share
    (above the 0.7 that lets it out), it stays backup; counting nginx's share per weight times its backup
    weight as nginx's made it look emptier than it was, let it out, and nginx flooded it."""
    loop = LeastConn(NAMES, total=120, external={"dp0": 45})
    ds, state, t = run(inventory(64, 64, 64, 64), loop, 30)
    assert ds[-1].by_name()["dp0"].backup
    loop.external = {"dp0": 30.0}  # fair share (120 + 30) / 4 = 37.5: 0.8 of it
    ds, _, _ = run(inventory(64, 64, 64, 64), loop, 30, state=state, start=t)
    assert all(d.by_name()["dp0"].backup for d in ds), [d.by_name()["dp0"].reason for d in ds]


def test_a_replica_back_from_backup_keeps_what_the_traffic_from_elsewhere_still_takes() -> None:
    """The traffic from elsewhere falls to about half a fair share: dp0 leaves backup at the weight its
    remaining room calls for, not at full weight (nginx then sends it a full share on top and it is seen
    full again: the flap of the demo's replica, backup -> 20 -> backup)."""
    loop = LeastConn(NAMES, total=120, external={"dp0": 45})
    ds, state, t = run(inventory(64, 64, 64, 64), loop, 30)
    assert ds[-1].by_name()["dp0"].backup
    loop.external = {"dp0": 18.0}  # fair share (120 + 18) / 4 = 34.5
    ds, _, _ = run(inventory(64, 64, 64, 64), loop, 20, state=state, start=t)
    back = next(d.by_name()["dp0"] for d in ds if not d.by_name()["dp0"].backup)
    assert "back from backup" in back.reason, back.reason
    assert 6 <= back.weight <= 14, back.reason  # its room: about (34.5 - 18) / 34.5 of a full share
    assert CFG.min_hold < 20 * CFG.interval
    per_slot = {n: loop.running(n) / 64 for n in NAMES}
    assert max(per_slot.values()) / min(per_slot.values()) < 1.2, per_slot
