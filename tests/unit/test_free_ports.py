"""free_ports (tests, benchmarks): ports no outgoing connection can take before their listener binds them.

CI stop 32 lost a docs run that way: nginx's bind() to a port picked minutes before found it in use, a port
of the kernel's ephemeral range (32768-60999 here) that an outgoing connection had taken as its source port.
"""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from fdngx.sim import process
from fdngx.sim.process import free_ports

LOW = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])


@pytest.mark.skipif(LOW - process._FLOOR < 1000, reason="this host's ephemeral range starts too low")
def test_ports_are_below_the_ephemeral_range_and_never_repeat() -> None:
    seen: list[int] = []
    for _ in range(50):
        seen += free_ports(3)
    assert all(process._FLOOR <= p < LOW for p in seen), [p for p in seen if p >= LOW]
    assert len(set(seen)) == len(seen)


def test_a_bound_port_is_skipped_and_a_run_is_consecutive() -> None:
    nxt = free_ports(1)[0] + 1
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", nxt))
        run = free_ports(4, consecutive=True)
    assert nxt not in run
    assert run == list(range(run[0], run[0] + 4))


def test_a_host_whose_ephemeral_range_starts_low_still_gets_runs(tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """With no room below the range, a run came out as an error and the docs runner could not start (a review)."""
    wide = tmp_path / "ip_local_port_range"
    wide.write_text("1024\t65535\n")
    monkeypatch.setattr(process, "_LOCAL_RANGE", wide)
    run = free_ports(4, consecutive=True)
    assert run == list(range(run[0], run[0] + 4)) and 20000 <= run[0] < 60000
    assert len(free_ports(3)) == 3
