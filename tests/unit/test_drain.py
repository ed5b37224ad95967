"""`"drain": true` (planned maintenance of one replica, `fdngx drain`): the inventory field and its errors, the
policy's view (held out, not failing, no fail-open), the render, the command's edits, what the OpenResty
balancer gets (the Lua pool, under luajit, never picks a drained peer), and what the registry and launch's
supervisor keep when they rewrite the inventory."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from fdngx import inventory as inv_mod
from fdngx.commands import status_view
from fdngx.commands.drain import not_held_out
from fdngx.commands.status_view import rows_of
from fdngx.domain import Flavor, Instance, Inventory, LoadSample, ServerState
from fdngx.errors import InventoryError, RenderError
from fdngx.nginx import admin
from fdngx.nginx.render import RenderOptions, render
from fdngx.nginx.target import Target
from fdngx.weights.policy import decide
from fdngx.weights.settings import PolicyConfig
from fdngx.weights.state import InstanceState, PolicyState
from fdngx.weights.store import store_for
from tests.support import NEEDS_LUAJIT, REPO, AdminDouble, luajit_script


def doc(*extra: dict[str, Any]) -> dict[str, Any]:
    insts = [{"name": f"dp{i}", "host": "127.0.0.1", "port": 8001 + i, "metrics_port": 9001 + i, **e}
             for i, e in enumerate(extra)]
    return {"version": 1, "upstream": "fastdeploy", "instances": insts}


def write(path: Path, data: dict[str, Any]) -> Path:
    path.write_text(json.dumps(data, indent=2))
    return path


# -- (d) the inventory field -------------------------------------------------------------------------------

@pytest.mark.parametrize("value", ["yes", 1, 0, None, [], "true"])
def test_a_drain_that_is_not_a_boolean_is_one_line_naming_file_and_instance(value: Any) -> None:
    with pytest.raises(InventoryError) as err:
        inv_mod.parse_inventory(doc({}, {"drain": value}), "/etc/fdngx/fdngx.json")
    msg = str(err.value)
    assert msg.startswith("/etc/fdngx/fdngx.json instance 'dp1': field 'drain' must be true or false, got ")
    assert "\n" not in msg


def test_drain_defaults_to_false_and_an_inventory_without_it_saves_byte_identical(tmp_path: Path) -> None:
    parsed = inv_mod.parse_inventory(doc({}, {"drain": False}, {"drain": True}))
    assert [i.drain for i in parsed.instances] == [False, False, True]
    plain = inv_mod.parse_inventory(doc({}, {}))
    text = inv_mod.to_json(plain)
    assert "drain" not in text
    path = tmp_path / "fdngx.json"
    inv_mod.save(plain, path)
    inv_mod.save(inv_mod.load(path), path)
    assert path.read_text() == text
    # A drained one round-trips as true, beside the fields launch adds.
    drained = inv_mod.parse_inventory(doc({"drain": True, "pid": 7}))
    assert drained.instances[0].to_dict()["drain"] is True
    assert inv_mod.parse_text(inv_mod.to_json(drained), "x").instances[0].drain is True


# -- (a) and (e), in process: the render ----------------------------------------------------------------------

def test_render_marks_a_drained_replica_down_whatever_the_policy_says_and_nothing_else_changes() -> None:
    inv = inv_mod.parse_inventory(doc({}, {}))
    drained = inv_mod.parse_inventory(doc({}, {"drain": True}))
    states = {"dp0": ServerState(20), "dp1": ServerState(20, backup=True)}
    before, after = render(inv, RenderOptions(), states), render(drained, RenderOptions(), states)
    changed = [(a, b) for a, b in zip(before.splitlines(), after.splitlines(), strict=True) if a != b]
    assert changed[-1] == ("    server 127.0.0.1:8002 weight=20 max_fails=3 fail_timeout=1s backup;  # dp1",
                           "    server 127.0.0.1:8002 weight=20 max_fails=3 fail_timeout=1s down;  # dp1")
    assert all(line.startswith("# fdngx-generation") for line, _ in changed[:-1])


def test_every_replica_drained_is_refused_by_render() -> None:
    with pytest.raises(RenderError, match=r"every instance is drained \(dp0, dp1\)"):
        render(inv_mod.parse_inventory(doc({"drain": True}, {"drain": True}), "f.json"), RenderOptions())


# -- the policy ------------------------------------------------------------------------------------------------

def sample(name: str, running: float = 0.0, healthy: bool = True) -> LoadSample:
    if not healthy:
        return LoadSample(name, False, False, error="connection refused", health_error="connection refused")
    return LoadSample(name, True, True, running=running, capacity=8.0, scraped_at=0.0)


def test_policy_holds_a_drained_replica_out_without_calling_it_failing() -> None:
    inv = inv_mod.parse_inventory(doc({"max_num_seqs": 8}, {"max_num_seqs": 8, "drain": True}))
    cfg = PolicyConfig()
    state = PolicyState()
    decisions, state = decide({"dp0": sample("dp0", 2), "dp1": sample("dp1", 3)}, inv, state, cfg, 100.0)
    d = decisions.by_name()["dp1"]
    assert d.down and d.drained and d.changed
    assert d.reason == "draining: 3 request(s) in flight (running 3, queued 0)"
    assert not decisions.by_name()["dp0"].down and decisions.fail_open is None
    # Stopped for its maintenance: still only "draining" (no /health verdict, no fail-open for the others).
    for t in range(101, 110):
        decisions, state = decide({"dp0": sample("dp0", 2), "dp1": sample("dp1", healthy=False)}, inv, state, cfg, t)
    d = decisions.by_name()["dp1"]
    assert d.down and d.drained and not d.changed and d.reason.startswith("draining: in-flight count unknown")
    assert decisions.fail_open is None
    # Its metrics alone do not keep a fleet out of fail-open: the replica in rotation is what counts.
    _, fresh = decide({"dp1": sample("dp1", 0)}, inv, PolicyState(), cfg, 200.0)
    alone, _ = decide({"dp1": sample("dp1", 0)}, inv, fresh, cfg, 200.0 + cfg.stale_after + 60)
    assert alone.by_name()["dp1"].down and alone.fail_open is not None
    # Undrained (and healthy again): back at once, at full weight, no ramp, no "recovered from down".
    back = inv_mod.parse_inventory(doc({"max_num_seqs": 8}, {"max_num_seqs": 8}))
    ok = {"dp0": sample("dp0", 2), "dp1": sample("dp1", 0)}
    decisions, state = decide(ok, back, state, cfg, 120.0)
    d = decisions.by_name()["dp1"]
    assert not d.down and not d.drained and d.changed and d.weight == cfg.scale
    assert d.reason == f"back in rotation after a drain; weight {cfg.scale}"
    assert state.instances["dp1"].recovered_at is None


def test_an_undrain_whose_apply_failed_stays_pending_and_comes_back_without_a_ramp() -> None:
    from fdngx.weights.controller import unapplied

    drained = inv_mod.parse_inventory(doc({"max_num_seqs": 8}, {"max_num_seqs": 8, "drain": True}))
    back = inv_mod.parse_inventory(doc({"max_num_seqs": 8}, {"max_num_seqs": 8}))
    cfg = PolicyConfig()
    ok = {"dp0": sample("dp0", 2), "dp1": sample("dp1", 0)}
    _, held = decide(ok, drained, PolicyState(), cfg, 100.0)
    _, undrained = decide(ok, back, held, cfg, 101.0)
    # nginx never got the undrain (the apply failed): the next cycle must still see a replica back from a drain
    kept = unapplied(undrained, held)
    assert kept.instances["dp1"].drained and kept.instances["dp1"].down
    decisions, state = decide(ok, back, kept, cfg, 102.0)
    d = decisions.by_name()["dp1"]
    assert not d.down and d.changed and d.reason == f"back in rotation after a drain; weight {cfg.scale}"
    assert state.instances["dp1"].recovered_at is None  # no ramp


def test_status_rows_say_drain_and_the_running_count() -> None:
    inv = inv_mod.parse_inventory(doc({"max_num_seqs": 8}, {"max_num_seqs": 8, "drain": True}))
    samples = {"dp0": sample("dp0", 1), "dp1": sample("dp1", 3)}
    decisions, _ = decide(samples, inv, PolicyState(), PolicyConfig(), 100.0)
    rows = {r["name"]: r for r in rows_of(inv, samples, decisions, PolicyState())}
    assert rows["dp1"]["drain"] is True and rows["dp1"]["running"] == 3 and rows["dp1"]["proposed_down"] is True
    assert rows["dp1"]["current_down"] is True and rows["dp1"]["share"] == 0.0  # no state: the static render's view
    assert rows["dp0"]["drain"] is False and rows["dp0"]["share"] == 1.0


# -- the command's edit ---------------------------------------------------------------------------------------

def test_set_drain_edits_the_owning_file_idempotently_and_refuses_unknown_names(tmp_path: Path) -> None:
    a = write(tmp_path / "a.json", doc({}, {}))
    b_doc = doc({})
    b_doc["instances"][0].update(name="node-b-dp0", port=8101, metrics_port=9101)
    b = write(tmp_path / "b.json", b_doc)
    b_before = b.read_bytes()
    first = inv_mod.set_drain([a, b], "dp1", True)
    assert (first.path, first.drain, first.changed) == (a.absolute(), True, True)
    assert [i.drain for i in inv_mod.load(a).instances] == [False, True]
    assert b.read_bytes() == b_before
    text = a.read_text()
    again = inv_mod.set_drain([a, b], "dp1", True)
    assert not again.changed and a.read_text() == text
    with pytest.raises(InventoryError) as err:
        inv_mod.set_drain([a, b], "dp7", True)
    assert "no instance named \"dp7\"; known: dp0, dp1, node-b-dp0" in str(err.value)
    undo = inv_mod.set_drain([a, b], "dp1", False)
    assert undo.changed and not undo.drain and "drain" not in a.read_text()
    assert (tmp_path / ".a.json.registry.lock").is_file()  # the lock the registry's writes take too


def test_set_drain_refuses_the_last_replica_in_rotation_across_files(tmp_path: Path) -> None:
    a = write(tmp_path / "a.json", doc({"drain": True}))
    b_doc = doc({})
    b_doc["instances"][0].update(name="b0", port=8101)
    b = write(tmp_path / "b.json", b_doc)
    with pytest.raises(InventoryError, match="b0 is the last instance in rotation"):
        inv_mod.set_drain([a, b], "b0", True)
    assert "drain" not in b.read_text()


# -- (c) the OpenResty balancer ---------------------------------------------------------------------------------

class FakeAdmin(AdminDouble):
    def __init__(self) -> None:
        self.bodies: list[str] = []

    def push(self, body: str) -> admin.PushResult:
        self.bodies.append(body)
        return admin.PushResult("ok", 1, body.count("\npeer "))


PICKS = """
package.path = arg[1] .. "/?.lua;" .. arg[2] .. "/?.lua;" .. package.path
local peers, pool_mod = require("fdngx.peers"), require("fdngx.pool")
local pick, health = require("fdngx.pick"), require("fdngx.health")
local fakedict = require("fakedict")
for i = 3, #arg do
    local fh = assert(io.open(arg[i], "rb")); local text = fh:read("*a"); fh:close()
    local snap = assert(peers.parse(text))
    local pool = { name = "fastdeploy", dict = fakedict.new() }
    assert(pool_mod.install(pool, text, snap, 1))
    assert(pool_mod.sync(pool, 1, true))
    local now = 2
    local function usable(p) return (health.usable(p.h, p.down, p.s_at, now)) end
    local function load() return 0 end
    local got = {}
    local function take(p) if p then got[#got + 1] = p.name else got[#got + 1] = "-" end end
    for _, mode in ipairs({ "least", "p2c" }) do
        for _ = 1, 50 do take(pick.choose(mode, pool.peers, {}, usable, load, math.random, {})) end
    end
    -- every other peer failing: a fail-open guess, with the broadest fallback (any untried peer in the
    -- snapshot; the balancer's own takes none out by its evidence); and a retry with every other peer tried
    for _, p in ipairs(pool.peers) do
        if p.name ~= "dp1" then pool_mod.mark(pool, p.name, health.on_failure, now) end
    end
    local function any() return true end
    take(pick.choose("least", pool.peers, {}, usable, load, math.random, {}, any))
    take(pick.choose("least", pool.peers, { dp0 = true, dp2 = true }, usable, load, math.random, {}, any))
    print(table.concat(got, " "))
end
"""


@NEEDS_LUAJIT
def test_the_lua_pool_never_picks_a_drained_peer(tmp_path: Path) -> None:
    """What fdngx gives the balancer (the peers file, a static push, a policy push) for a fleet with dp1
    drained, installed in the real pool and picked from: never dp1, not even as the fail-open guess or a retry."""
    inv = inv_mod.parse_inventory(doc({}, {"drain": True}, {}))
    admin = FakeAdmin()
    peers_file = tmp_path / ".site.conf.fdngx-peers"
    target = Target(None, RenderOptions(), None, False, admin, peers_file)  # type: ignore[arg-type]
    target.write_peers(inv)
    target.push(inv, None, {})
    states = {"dp0": ServerState(20), "dp1": ServerState(20, down=True), "dp2": ServerState(20)}
    target.push(inv, states, {"dp1": LoadSample("dp1", True, True, running=4.0)})
    files = [peers_file]
    for n, body in enumerate(admin.bodies):
        files.append(tmp_path / f"push{n}")
        files[-1].write_text(body)
    argv = luajit_script(tmp_path / "picks.lua", PICKS)
    proc = subprocess.run([*argv, str(REPO / "tests" / "lua"), *map(str, files)], capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.split("\n")[:-1]
    assert len(lines) == 3
    for line in lines:
        picked = line.split()
        assert len(picked) == 102
        assert "dp1" not in picked, line
        assert set(picked[:100]) == {"dp0", "dp2"}
        assert picked[100] in ("dp0", "dp2")  # fail open: a guess among the peers in rotation
        assert picked[101] == "-"  # a retry after dp0 and dp2: nothing left, never the drained one


def test_every_replica_drained_is_never_pushed(tmp_path: Path) -> None:
    inv = inv_mod.parse_inventory(doc({"drain": True}, {"drain": True}))
    admin = FakeAdmin()
    target = Target(None, RenderOptions(), None, False, admin, tmp_path / "peers")  # type: ignore[arg-type]
    for call in (lambda: target.write_peers(inv), lambda: target.push(inv, None, {}),
                 lambda: target.push(inv, {}, {})):
        with pytest.raises(InventoryError, match="every instance is drained"):
            call()
    assert admin.bodies == [] and not (tmp_path / "peers").exists()


# -- rewrites by the registry and by launch's supervisor keep the flag ------------------------------------------

def test_a_registry_heartbeat_keeps_drain_and_silence_does_not_remove_a_drained_instance(tmp_path: Path) -> None:
    from tests.unit.test_registry import BODY, OK, Env, H

    env = Env(tmp_path, grace=10.0)
    assert env.reg.register(dict(BODY), H) == OK
    name = inv_mod.load(env.path).instances[0].name
    env.clock.t += 8
    assert env.reg.register({**BODY, "port": 8002}, H) == OK  # a second one, heart-beating throughout
    inv_mod.set_drain([env.path], name, True)
    # A heartbeat that changes the entry (a metrics port now sent): the registry rewrites it, drain and all.
    assert env.reg.register({**BODY, "metrics_port": 9101}, H) == OK
    assert (inv_mod.load(env.path).instances[0].metrics_port, inv_mod.load(env.path).instances[0].drain) == (9101, True)
    env.clock.t += 60  # no heartbeat for longer than the grace, /health failing: under maintenance, it stays
    env.probe.health_of[(H, 8001)] = "connection refused"
    env.reg.register({**BODY, "port": 8002}, H)
    assert env.reg.check() == []
    assert inv_mod.load(env.path).by_name()[name].drain is True
    inv_mod.set_drain([env.path], name, False)
    assert env.reg.check() == [name]  # back in rotation and still silent: removed, as any other


def bare_supervisor(path: Path, plan_inv: Inventory) -> tuple[Any, SimpleNamespace, list[str]]:
    """A launch supervisor with one running child serving every planned instance, only for _write_inventory;
    returns it, the child and what it says."""
    from fdngx.launch import supervise

    sup = supervise.Supervisor.__new__(supervise.Supervisor)
    said: list[str] = []
    child = SimpleNamespace(spec=SimpleNamespace(instances=[i.name for i in plan_inv.instances]), pid=42,
                            exit_code=None, state=supervise.ChildState.RUNNING)
    sup.plan = SimpleNamespace(inventory=plan_inv, inventory_path=path)
    sup.children, sup.by_name, sup.down, sup.stopped = [child], plan_inv.by_name(), set(), False
    sup.progress = SimpleNamespace(say=said.append)
    sup.inventory_written, sup.lockless_said = False, False
    return sup, child, said


def test_launch_supervisor_keeps_drain_when_it_rewrites_the_inventory(tmp_path: Path) -> None:
    path = tmp_path / "fdngx.json"
    plan_inv = Inventory([Instance("dp0", "127.0.0.1", 8001, 9001), Instance("dp1", "127.0.0.1", 8002, 9002)])
    sup, child, said = bare_supervisor(path, plan_inv)
    # An older launch's inventory with dp1 drained: a new launch keeps it drained, and says so.
    inv_mod.save(Inventory([Instance("dp0", "127.0.0.1", 8001, 9001),
                            Instance("dp1", "127.0.0.1", 8002, 9002, drain=True)]), path)
    sup._write_inventory()
    assert inv_mod.load(path).by_name()["dp1"].drain is True
    assert said == ["dp1 stays drained, as the old inventory had it (`fdngx drain dp1 --undo` puts it back)"]
    # A supervised restart rewrites it again (pid, status): a drain set meanwhile stays.
    inv_mod.set_drain([path], "dp1", False)
    inv_mod.set_drain([path], "dp0", True)
    child.pid = 43
    sup._write_inventory()
    now = inv_mod.load(path).by_name()
    assert now["dp0"].drain is True and now["dp1"].drain is False and now["dp0"].extra["pid"] == 43


def test_launch_supervisor_says_once_when_it_writes_without_the_inventory_lock(tmp_path: Path) -> None:
    """A lock it cannot take (another user's, or here one it cannot open) does not stop the write, but the
    supervisor says so once: a drain in that moment could be lost."""
    path = tmp_path / "fdngx.json"
    inv_mod.lock_path(path).mkdir()  # os.open(O_RDWR) of a directory fails: EISDIR
    sup, child, said = bare_supervisor(path, Inventory([Instance("dp0", "127.0.0.1", 8001, 9001)]))
    for pid in (42, 43):
        child.pid = pid
        sup._write_inventory()
        assert inv_mod.load(path).by_name()["dp0"].extra["pid"] == pid  # written all the same
    assert len(said) == 1, said
    assert said[0].startswith(f"{inv_mod.lock_path(path)}: Is a directory: writing {path} without the inventory lock")


def test_a_state_nothing_wrote_for_two_cron_minutes_is_said_stale(tmp_path: Path) -> None:
    # A sidecar saves every 10 s and cron every minute: 5 minutes let a killed sidecar's table look current.
    state = tmp_path / ".x.fdngx-state.json"
    assert status_view.state_note(state, 100.0) is None
    note = status_view.state_note(state, 200.0)
    assert note is not None and "no sidecar or cron run is keeping the weights now" in note, note
    assert status_view.state_note(state, 200.0, interval=300.0) is None  # a sidecar with --interval 300


def test_wait_reads_whether_nginx_holds_the_replica_out_from_the_file_it_reads(tmp_path: Path) -> None:
    """drain --wait --out: the nginx flavor's file says it (a plain render applies a drain and writes no policy
    state: the wait read only the state and never counted); the OpenResty flavor's file holds no weights, so
    the policy state beside it does (its drains are pushed)."""
    inv = inv_mod.parse_inventory({"instances": [
        {"name": f"dp{i}", "host": "127.0.0.1", "port": 8001 + i, "metrics_port": 9001 + i} for i in range(2)]})
    drained = inv_mod.parse_inventory({"instances": [
        {"name": f"dp{i}", "host": "127.0.0.1", "port": 8001 + i, "metrics_port": 9001 + i, "drain": i == 0}
        for i in range(2)]})
    out = tmp_path / "upstream.conf"
    store = store_for(out, None)
    out.write_text(render(inv, RenderOptions()))
    assert not_held_out(out, store, "dp0", inv.upstream) == f"{out} does not hold it out"
    out.write_text(render(drained, RenderOptions()))  # a plain render: no policy state at all
    assert not store.path.exists() and not_held_out(out, store, "dp0", inv.upstream) is None
    assert not_held_out(out, store, "dp1", inv.upstream) is not None
    out.write_text(render(drained, RenderOptions(flavor=Flavor.OPENRESTY, admin_token_file=str(tmp_path / "t"),
                                                 peers_file=str(tmp_path / "peers"))))
    assert not_held_out(out, store, "dp0", inv.upstream) == "the policy state does not hold it out"
    store.save(PolicyState({"dp0": InstanceState(weight=20, down=True, drained=True)}))
    assert not_held_out(out, store, "dp0", inv.upstream) is None
    assert not_held_out(None, store, "dp0", inv.upstream) is None  # --state alone: the state
