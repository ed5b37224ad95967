"""The Lua balancer's pick (templates/lua/fdngx/pick.lua) against its rule written out in Python (hypothesis).

The rule (docs/policy.md, "The OpenResty flavor"): a replica with a free slot (load < slots) before any full
one; among free ones the lowest load / weight; among full ones the lowest (load + 1 - slots) / weight, the
queue ahead of the request per weight. Ties go round, so the property is that the pick is one of the lowest
by that key, never which one. Random fleets of 1..12 peers with weights 1..100, slots 1..64 and loads
0..80 or from 2 below the slots to 6 above, some tried already or unusable (the untried are then the fallback).
"""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from fractions import Fraction

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.support import NEEDS_LUAJIT, luajit_coprocess

pytestmark = NEEDS_LUAJIT

# A coprocess: one fleet per line, "n  w c load tried usable  ...", answers the index (1-based) picked, or 0.
SERVER = r"""
local pick = require('fdngx.pick')
math.randomseed(1)
for line in io.lines() do
  local nums = {}
  for x in line:gmatch('%S+') do nums[#nums + 1] = tonumber(x) end
  local peers, tried, loads, unusable, out = {}, {}, {}, {}, {}
  for i = 1, nums[1] do
    local k = 1 + (i - 1) * 6
    local p = { name = 'p' .. i, idx = i, weight = nums[k + 1], capacity = nums[k + 2] }
    peers[i], loads[p.name] = p, nums[k + 3]
    if nums[k + 4] == 1 then tried[p.name] = true end
    if nums[k + 5] == 0 then unusable[p.name] = true end
    if nums[k + 6] == 1 then out[p.name] = true end
  end
  -- the balancer's fallback: not out by its own evidence
  local p = pick.choose('least', peers, tried, function(q) return not unusable[q.name] end,
                        function(q) return loads[q.name] end, math.random, {}, function(q) return not out[q.name] end)
  io.write(p and p.idx or 0, '\n')
  io.flush()
end
"""

# Loads near the slot count most of the time: the boundary between free and full is where a rule goes wrong.
peer = st.tuples(st.integers(1, 100), st.integers(1, 64), st.integers(-2, 6), st.integers(0, 80), st.booleans(),
                 st.booleans(), st.booleans(), st.booleans()).map(
    lambda t: (t[0], t[1], max(0, t[1] + t[2]) if t[6] else t[3], t[4], t[5], t[7]))


def key(weight: int, slots: int, load: int) -> tuple[bool, Fraction]:
    """The rule, exactly: (full, queue ahead per weight) when full, else (free, load per weight)."""
    if load >= slots:
        return True, Fraction(load + 1 - slots, weight)
    return False, Fraction(load, weight)


@pytest.fixture(scope="module")
def lua_pick(tmp_path_factory: pytest.TempPathFactory) -> Iterator[subprocess.Popen[str]]:
    with luajit_coprocess(tmp_path_factory.mktemp("lua") / "pick.lua", SERVER, text=True) as proc:
        yield proc


def ask(proc: subprocess.Popen[str], fleet: list[tuple[int, int, int, bool, bool, bool]]) -> int:
    """Each peer: weight, slots, load, tried, usable, out (by the balancer's own evidence)."""
    assert proc.stdin is not None and proc.stdout is not None
    fields = " ".join(f"{w} {c} {ld} {int(t)} {int(u)} {int(o)}" for w, c, ld, t, u, o in fleet)
    proc.stdin.write(f"{len(fleet)} {fields}\n")
    proc.stdin.flush()
    return int(proc.stdout.readline())


@settings(max_examples=400, deadline=None, database=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(fleet=st.lists(peer, min_size=1, max_size=12))
def test_property_the_pick_is_a_lowest_by_the_documented_rule(
        lua_pick: subprocess.Popen[str], fleet: list[tuple[int, int, int, bool, bool, bool]]) -> None:
    untried = [i for i, p in enumerate(fleet) if not p[3]]
    # none usable: fail open among the untried not out by the balancer's own evidence
    usable = [i for i in untried if fleet[i][4]] or [i for i in untried if not fleet[i][5]]
    got = ask(lua_pick, fleet)
    if not usable:
        assert got == 0, "every peer tried or out: no pick (nginx answers 503)"
        return
    best = min(key(*fleet[i][:3]) for i in usable)
    assert got - 1 in usable, f"picked peer {got}, not an untried usable one"
    assert key(*fleet[got - 1][:3]) == best, f"picked peer {got} with {key(*fleet[got - 1][:3])}, lowest {best}"


def test_a_full_peer_is_never_picked_beside_a_free_one(lua_pick: subprocess.Popen[str]) -> None:
    # by load / weight alone the heavy peer (weight 100) would win: 20/100 against 5/10
    assert ask(lua_pick, [(100, 20, 20, False, True, False), (10, 16, 5, False, True, False)]) == 2
    assert ask(lua_pick, [(100, 20, 19, False, True, False), (10, 16, 5, False, True, False)]) == 1
    # both full: the queue ahead per weight, one waiting on a peer of weight 1 against ten on weight 100
    assert ask(lua_pick, [(1, 8, 8, False, True, False), (100, 8, 18, False, True, False)]) == 2
