"""The OpenResty flavor's data: snapshots fdngx writes (peers file, pushes) and what the Lua parser accepts."""

from __future__ import annotations

import math
import os
import re
import subprocess
from pathlib import Path

import pytest

from fdngx.domain import Instance, Inventory, LoadSample, ServerState
from fdngx.errors import ApplyError, RenderError, UnsafeFileError
from fdngx.nginx import generation, openresty
from fdngx.nginx.openresty import Peer, capacity_weights, live_peers, snapshot, write_peers_file
from fdngx.nginx.render import RenderOptions, builtin_template_dir, check_fleet
from tests.support import NEEDS_LUAJIT, luajit_script


def inv(*specs: tuple[str, str, int, int, int]) -> Inventory:
    return Inventory([Instance(n, h, p, p, max_num_seqs=c, weight=w) for n, h, p, c, w in specs])


def test_capacity_weights_give_a_half_slots_replica_half_the_weight() -> None:
    fleet = inv(("dp0", "127.0.0.1", 1, 64, 1), ("dp1", "127.0.0.1", 2, 32, 1), ("dp2", "127.0.0.1", 3, 64, 2))
    assert capacity_weights(fleet) == {"dp0": 10, "dp1": 5, "dp2": 20}


def test_live_peers_carry_policy_weights_scraped_capacity_and_bounded_values() -> None:
    fleet = inv(("dp0", "127.0.0.1", 1, 64, 1), ("dp1", "::1", 2, 32, 1), ("dp10", "10.0.0.1", 3, 8, 1))
    samples = {
        "dp0": LoadSample("dp0", True, True, running=3, queued=1.5, capacity=128.0),
        "dp1": LoadSample("dp1", True, True, running=math.inf),
        "dp10": LoadSample("dp10", False, False),
    }
    states = {"dp0": ServerState(7), "dp1": ServerState(10**26, down=True)}
    text = snapshot(42, live_peers(fleet, states, samples), "fastdeploy")
    assert text.splitlines()[1:] == [
        "generation 42",
        "upstream fastdeploy",  # as data: a frontend of another upstream refuses it
        "peer dp0 127.0.0.1 1 7 0 128 4.500",
        "peer dp1 ::1 2 10000 1 32 0.000",  # weight clamped; an infinite load is no load
        "peer dp10 10.0.0.1 3 2 0 8 0.000",  # no state: its capacity weight (20 * 8 / 64); after dp1
    ]


def test_a_line_fdngx_would_write_for_a_non_ip_host_is_refused() -> None:
    with pytest.raises(ApplyError, match="dp0"):
        Peer("dp0", "localhost", 80, 1, False, 1).line()
    with pytest.raises(ApplyError):
        Peer('dp0"..os.execute("id")', "127.0.0.1", 80, 1, False, 1).line()


# The Lua parser's rule (fdngx.peers.not_a_server): fdngx never writes a line the balancer refuses.
NO_SERVER = ["0.0.0.0", "0.1.2.3", "::", "::ffff:0.0.0.0", "224.0.0.1", "239.255.255.255", "ff02::1",
             "::ffff:224.0.0.251", "255.255.255.255", "::ffff:255.255.255.255"]
SERVERS = ["127.0.0.1", "1.0.0.0", "223.255.255.255", "240.0.0.1", "255.255.255.254", "::1", "fe80::1", "ff::1",
           "::ffff:10.0.0.1"]


def test_no_line_for_an_address_that_is_no_servers() -> None:
    for host in NO_SERVER:
        assert not openresty.balancer_host(host), host
        with pytest.raises(ApplyError, match=r"dp0.*IP host of a server"):
            Peer("dp0", host, 80, 1, False, 1).line()
    assert all(openresty.balancer_host(h) for h in SERVERS)


def test_an_inventory_the_balancer_cannot_take_is_refused_before_anything_is_pushed() -> None:
    """fdngx.nginx.render.check_fleet (a render, and a controller reading a new inventory, which keeps the one in
    force): a host that is no server's would make every snapshot fail (Peer.line) and stop every push."""
    opts = RenderOptions(flavor="openresty", mode="upstream")
    check_fleet(inv(("dp0", "127.0.0.1", 1, 64, 1)), opts)
    for host in ("0.0.0.0", "::", "224.0.0.1"):
        with pytest.raises(RenderError, match=rf"instance 'dp1': host '{re.escape(host)}' is no server's address"):
            check_fleet(inv(("dp0", "127.0.0.1", 1, 64, 1), ("dp1", host, 2, 64, 1)), opts)
    with pytest.raises(RenderError, match="needs an IP address, not host 'localhost'"):
        check_fleet(inv(("dp1", "localhost", 2, 64, 1)), opts)


def test_a_snapshot_names_its_upstream_and_refuses_what_the_balancer_cannot_read() -> None:
    text = snapshot(7, [Peer("dp0", "127.0.0.1", 80, 1, False, 1)], "model_b")
    assert text.splitlines()[1:3] == ["generation 7", "upstream model_b"]
    assert "upstream" not in snapshot(7, [], "").replace("# fdngx peers", "")  # none given: none written
    assert snapshot(2**53 - 1, [], "x").splitlines()[1] == "generation 9007199254740991"
    for bad in (2**53, -1, True):
        with pytest.raises(ApplyError, match=r"0\.\.2\^53-1"):
            snapshot(bad, [], "x")  # type: ignore[arg-type]
    with pytest.raises(ApplyError, match="upstream"):
        snapshot(1, [], "a\nempty")
    # a controller's: how many frontends take it, said when more than one (a lone frontend's reads as before)
    assert snapshot(7, [], "u", 4).splitlines()[1:4] == ["generation 7", "upstream u", "frontends 4"]
    assert "frontends" not in snapshot(7, [], "u", 1)
    for bad_count in (0, 1025, True, 2.0):
        with pytest.raises(ApplyError, match=r"frontends .*1\.\.1024"):
            snapshot(1, [], "x", bad_count)  # type: ignore[arg-type]


def test_the_peers_file_changes_only_with_the_replicas(tmp_path: Path) -> None:
    path = tmp_path / ".nginx.conf.fdngx-peers"
    fleet = inv(("dp0", "127.0.0.1", 1, 64, 1))
    first = write_peers_file(path, fleet)
    assert path.read_text() == first and path.stat().st_mode & 0o777 == 0o644
    assert write_peers_file(path, fleet) == first  # same replicas: same file, same generation
    grown = inv(("dp0", "127.0.0.1", 1, 64, 1), ("dp1", "127.0.0.1", 2, 64, 1))
    second = write_peers_file(path, grown)
    assert "peer dp1 " in second and second != first
    assert int(second.splitlines()[1].split()[1]) > int(first.splitlines()[1].split()[1])


def test_a_planted_peers_file_symlink_is_refused(tmp_path: Path) -> None:
    victim = tmp_path / "victim"
    victim.write_text("precious\n")
    link = tmp_path / ".nginx.conf.fdngx-peers"
    os.symlink(victim, link)
    with pytest.raises(UnsafeFileError):
        write_peers_file(link, inv(("dp0", "127.0.0.1", 1, 64, 1)))
    assert victim.read_text() == "precious\n"


def test_generations_strictly_increase() -> None:
    gens = [generation.next_generation() for _ in range(1000)]
    assert gens == sorted(set(gens))


@NEEDS_LUAJIT
def test_every_snapshot_fdngx_writes_is_one_the_lua_parser_accepts(tmp_path: Path) -> None:
    fleet = inv(("dp0", "127.0.0.1", 1, 1, 1), ("a.b-c_d:e@f", "2001:db8::8:800:200c:417a", 65535, 1_000_000, 10_000),
                ("z" * 128, "::ffff:10.0.0.1", 80, 7, 3))
    samples = {"dp0": LoadSample("dp0", True, True, running=999_999.9999, queued=5.0)}
    bodies = [snapshot(1, openresty.initial_peers(fleet), "fastdeploy"),
              snapshot(2**53 - 1, live_peers(fleet, {"dp0": ServerState(0, down=True)}, samples), "u_2")]
    for i, body in enumerate(bodies):
        (tmp_path / f"s{i}").write_text(body)
    argv = luajit_script(
        tmp_path / "parse.lua",
        "local peers = require('fdngx.peers')\n"
        "for i = 2, #arg do\n"
        "  local f = io.open(arg[i]); local s, err = peers.parse(f:read('*a')); f:close()\n"
        "  if not s then print(arg[i] .. ': ' .. err); os.exit(1) end\n"
        "  print(#s.peers)\n"
        "end\n"
    )
    proc = subprocess.run([*argv, *[str(tmp_path / f"s{i}") for i in range(len(bodies))]],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and proc.stdout.split() == ["3", "3"], proc.stdout + proc.stderr


@NEEDS_LUAJIT
def test_the_lua_parser_takes_the_hosts_fdngx_writes_and_refuses_the_others(tmp_path: Path) -> None:
    argv = luajit_script(tmp_path / "hosts.lua", "local peers = require('fdngx.peers')\n"
                         "for i = 2, #arg do print(arg[i], peers.valid_host(arg[i])) end\n")
    proc = subprocess.run([*argv, *NO_SERVER, *SERVERS], capture_output=True, text=True, timeout=60)
    said = dict(line.split("\t") for line in proc.stdout.splitlines())
    assert said == {**dict.fromkeys(NO_SERVER, "false"), **dict.fromkeys(SERVERS, "true")}, proc.stdout


def test_the_clock_window_is_the_balancers() -> None:
    # fdngx says "this host's clock looks behind" past the window the Lua balancer refuses beyond.
    store = (builtin_template_dir() / "lua" / "fdngx" / "store.lua").read_text()
    assert f"M.FUTURE_MS = {int(generation.FUTURE_S * 1000)}\n" in store


def test_a_refused_push_says_how_far_ahead_the_one_in_force_is() -> None:
    why = generation.superseded("http://127.0.0.1:9/fdngx/peers", 1_000, 61_500)
    assert why.startswith("http://127.0.0.1:9/fdngx/peers: holds generation 61500, 60.5 s newer than this push's 1000")
    assert "nothing applied" in why and "\n" not in why
