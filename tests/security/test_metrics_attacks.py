"""One replica's metrics page (issue 10): a buggy engine build can report anything.

`fastdeploy:max_batch_size 1e308` made every cycle fail (OverflowError): nothing applied, not even
inventory changes, and `status` printed a traceback. `1e300` failed nothing but gave the liar weight 20 and
the others 1. Here every replica is a tiny HTTP server on 127.0.0.1 (this process), and the real CLI
scrapes it: the bad page stays with its replica, the others get their weights, changes still apply.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from fdngx.weights.memory import CAPACITY_ABOVE, CAPACITY_TRUST
from tests.security.conftest import PageServer, cli, fastdeploy_page, scaled, write

StartPage = Callable[[str, str], PageServer]
_SERVER = re.compile(r"server 127\.0\.0\.1:(\d+) weight=(\d+)")


def _fleet(tmp: Path, start: StartPage, liar_page: str, honest: int = 2) -> tuple[Path, dict[str, int]]:
    servers = {f"ok{i}": start(f"ok{i}", fastdeploy_page(running=8)) for i in range(honest)}
    servers["liar"] = start("liar", liar_page)
    insts = [{"name": name, "host": "127.0.0.1", "port": s.port, "metrics_port": s.port, "engine": "fastdeploy",
              "max_num_seqs": 64} for name, s in servers.items()]
    inv = write(tmp / "fdngx.json", json.dumps({"version": 1, "instances": insts}))
    return inv, {name: s.port for name, s in servers.items()}


def _weights(config: str, ports: dict[str, int]) -> dict[str, int]:
    by_port = {int(p): int(w) for p, w in _SERVER.findall(config)}
    return {name: by_port[port] for name, port in ports.items() if port in by_port}


def _cron(inv: Path, out: Path) -> None:
    proc = cli("render", "-i", str(inv), "--out", str(out), "--scrape", timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr


BAD_PAGES = {
    "max_batch_size_1e308": fastdeploy_page(max_batch_size="1e308"),
    "running_1e308": fastdeploy_page(running="1e308"),
    "running_nan": fastdeploy_page(running="NaN"),
    "running_inf": fastdeploy_page(running="+Inf"),
    "running_negative": fastdeploy_page(running="-5"),
    "kv_1e308": fastdeploy_page(kv="1e308"),
    "kv_nan": fastdeploy_page(kv="NaN"),
    "max_batch_size_0": fastdeploy_page(max_batch_size="0"),
    "max_batch_size_tiny": fastdeploy_page(max_batch_size="1e-300"),
    "garbage": "\x00\xff<html>not metrics</html>\nfastdeploy:num_requests_running{ 3\n",
    "duplicate_series": fastdeploy_page() + fastdeploy_page(running="1e308"),
    "empty": "",
    # Terminal escapes the parser quotes in its error messages (clear screen, set the title).
    "escape_in_type": "# TYPE fastdeploy:num_requests_running \x1b[2J\x1b]0;owned\x07\n" + fastdeploy_page(),
    "escape_in_labels": 'fastdeploy:num_requests_running{\x1b[31m="1"} 1\n' + fastdeploy_page(),
    # OSC (set the title; OSC 52 writes the clipboard on some terminals): click strips only CSI sequences.
    "osc_in_labels": 'fastdeploy:num_requests_running{\x1b]0;owned\x07="1"} 1\n' + fastdeploy_page(),
}


@pytest.mark.parametrize("page", ["max_batch_size_1e308", "running_nan", "garbage"])
def test_one_replicas_bad_metrics_stay_with_that_replica(tmp_path: Path, page_servers: StartPage,
                                                         page: str) -> None:
    """The real cron path (`render --scrape`), twice: the second run must still apply an inventory change."""
    inv, ports = _fleet(tmp_path, page_servers, BAD_PAGES[page])
    out = tmp_path / "fdngx.conf"
    _cron(inv, out)
    weights = _weights(out.read_text(), ports)
    assert set(weights) == set(ports), weights
    # The honest replicas are alike: same weight, in bounds; nobody gets everything.
    assert weights["ok0"] == weights["ok1"] >= 1, weights
    assert all(1 <= w <= 100 for w in weights.values()), weights
    extra = page_servers("new", fastdeploy_page(running=8))
    doc = json.loads(inv.read_text())
    doc["instances"].append({"name": "new", "host": "127.0.0.1", "port": extra.port, "metrics_port": extra.port,
                             "engine": "fastdeploy", "max_num_seqs": 64})
    inv.write_text(json.dumps(doc))
    _cron(inv, out)
    assert f"127.0.0.1:{extra.port} " in out.read_text()


@pytest.mark.parametrize("page", sorted(BAD_PAGES))
def test_every_bad_page_stays_with_its_replica_through_scrape_and_policy(page_servers: StartPage,
                                                                         page: str) -> None:
    """In process, over real HTTP: the bad replica's sample is refused or clamped, the others are read,
    and the policy keeps every weight in bounds, cycle after cycle."""
    from fdngx.domain import Engine, Instance, Inventory
    from fdngx.weights.memory import MAX_REQUESTS
    from fdngx.weights.policy import decide
    from fdngx.weights.scrape import scrape_all
    from fdngx.weights.settings import PolicyConfig
    from fdngx.weights.state import PolicyState

    servers = {f"ok{i}": page_servers(f"ok{i}", fastdeploy_page(running=8)) for i in range(2)}
    servers["liar"] = page_servers("liar", BAD_PAGES[page])
    inv = Inventory([Instance(n, "127.0.0.1", s.port, s.port, Engine.FASTDEPLOY, 64) for n, s in servers.items()])
    state, config = PolicyState(), PolicyConfig()
    for cycle in range(3):
        samples = scrape_all(inv.instances, deadline=3.0)
        assert samples["ok0"].ok and samples["ok1"].ok, samples
        liar = samples["liar"]
        if liar.ok:
            for v in (liar.running, liar.queued):
                assert 0 <= v <= MAX_REQUESTS
            assert liar.kv_usage is None or 0 <= liar.kv_usage <= 1
            assert liar.capacity is None or 1 <= liar.capacity <= 64 * CAPACITY_TRUST
        else:
            assert liar.error and liar.error.isprintable(), repr(liar.error)
        decisions, state = decide(samples, inv, state, config, 1000.0 + 2 * cycle)
        w = {d.name: d.weight for d in decisions}
        assert all(1 <= x <= config.max_weight for x in w.values()), w
        assert w["ok0"] == w["ok1"], w


@pytest.mark.parametrize("page", ["osc_in_labels", "escape_in_labels"])
def test_a_metrics_page_cannot_send_terminal_escapes_through_status(tmp_path: Path, page_servers: StartPage,
                                                                    page: str) -> None:
    inv, _ = _fleet(tmp_path, page_servers, BAD_PAGES[page])
    # A state in which every replica has a load: the reason then quotes this scrape's error.
    now = time.time()
    known = {"load": 0.2, "last_ok_at": now - 1, "weight": 20, "capacity": 64.0}
    state = write(tmp_path / "state.json", json.dumps(
        {"version": 1, "updated_at": now - 1, "instances": {n: known for n in ("ok0", "ok1", "liar")}}))
    state.chmod(0o600)
    for args in (["--json"], []):
        proc = cli("status", "-i", str(inv), "--state", str(state), *args, timeout=60)
        assert proc.returncode == 0, proc.stderr
        assert "\x1b" not in proc.stdout and "\x07" not in proc.stdout, repr(proc.stdout)
        assert "\x1b" not in proc.stderr, repr(proc.stderr)


@pytest.mark.parametrize("page", ["max_batch_size_1e308", "running_nan", "garbage"])
def test_status_shows_a_replica_with_bad_metrics_without_a_traceback(tmp_path: Path, page_servers: StartPage,
                                                                     page: str) -> None:
    inv, _ = _fleet(tmp_path, page_servers, BAD_PAGES[page])
    proc = cli("status", "-i", str(inv), "--json", timeout=60)
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr
    doc = json.loads(proc.stdout)
    rows = {r["name"]: r for r in doc["instances"]}
    assert set(rows) == {"ok0", "ok1", "liar"}
    assert all(1 <= r["proposed_weight"] <= 100 for r in rows.values()), rows


def test_a_capacity_liar_at_1e300_cannot_take_the_fleet(tmp_path: Path, page_servers: StartPage) -> None:
    """A scraped capacity above the inventory's max_num_seqs is trusted up to CAPACITY_ABOVE (2x) times it
    (the original gave the liar 20 and the others 1)."""
    inv, ports = _fleet(tmp_path, page_servers, fastdeploy_page(running=8, max_batch_size="1e300"), honest=3)
    out = tmp_path / "fdngx.conf"
    _cron(inv, out)
    w = _weights(out.read_text(), ports)
    honest = [w[f"ok{i}"] for i in range(3)]
    assert len(set(honest)) == 1, w
    # Integer weights: each is within 0.5 of what the formula gives.
    assert w["liar"] <= CAPACITY_ABOVE * (honest[0] + 0.5), w
    assert honest[0] >= 9, w


def test_a_replicas_status_line_cannot_send_terminal_escapes() -> None:
    """http.client quotes a bad status line in its exception: the sample's errors escape it."""
    import socket

    from fdngx.domain import Engine, Instance
    from fdngx.weights.scrape import scrape_all
    from tests.support import RawServer

    def answer(conn: socket.socket) -> None:
        conn.recv(4096)
        conn.sendall(b"HTTP/\x1b]0;owned\x07 200 OK\r\nContent-Length: 0\r\n\r\n")

    with RawServer(answer) as srv:
        s = scrape_all([Instance("r", "127.0.0.1", srv.port, srv.port, Engine.FASTDEPLOY)], deadline=3.0)["r"]
    assert not s.ok and s.error and s.health_error
    assert s.error.isprintable() and s.health_error.isprintable(), (s.error, s.health_error)
    assert "\\x1b" in s.error  # escaped, still readable


# -- one replica's bytes on the wire -------------------------------------------------------------------------

WIRE_PIECES = st.one_of(
    st.sampled_from([1, 2, 255, 300, 6000]).map(lambda n: b"HTTP/1.1 100 Continue\r\n\r\n" * n),
    st.sampled_from([
        b"HTTP/1.1 103 Early Hints\r\nTransfer-Encoding: chunked\r\n\r\n", b"HTTP/1.1 200 OK\r\n", b"HTTP/1.0 200\r\n",
        b"Transfer-Encoding: chunked\r\n", b"Content-Length: 5\r\n", b"Content-Length: 99999999\r\n",
        b"Connection: close\r\n", b"\r\n", b"1\r\na\r\n" * 20_000, b"-2\r\n", b"fffffffffff\r\n", b"0;x=y\r\n",
        b"X-Trailer: 1\r\n" * 20_000, b"HTTP/\x1b]0;owned\x07 200 OK\r\n", b"x" * 70_000, b"\r\n\r\n" * 1000,
        fastdeploy_page().encode(),
    ]),
    st.binary(max_size=64),
)


@pytest.fixture(scope="module")
def wire_fleet() -> Iterator[tuple[list[object], dict[str, bytes]]]:
    """Two honest replicas and one that answers every GET with `sent["bytes"]`, then closes."""
    import socket

    from fdngx.domain import Engine, Instance
    from tests.security.conftest import PageServer
    from tests.support import RawServer

    sent = {"bytes": b""}

    def answer(conn: socket.socket) -> None:
        conn.recv(65536)
        conn.sendall(sent["bytes"])
        conn.shutdown(socket.SHUT_WR)

    srv = RawServer(answer)
    honest = [PageServer(f"ok{i}", fastdeploy_page(running=8)) for i in range(2)]
    insts: list[object] = [Instance(s.name, "127.0.0.1", s.port, s.port, Engine.FASTDEPLOY) for s in honest]
    insts.append(Instance("hostile", "127.0.0.1", srv.port, srv.port, Engine.FASTDEPLOY))
    yield insts, sent
    for s in honest:
        s.stop()
    srv.close()


@scaled(30)
@example(b"HTTP/1.1 100 Continue\r\n\r\n" * 6000)  # was a RecursionError out of the whole cycle
@example(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" + b"1\r\na\r\n" * 400_000)
@given(st.lists(WIRE_PIECES, max_size=8).map(b"".join))
def test_property_one_replicas_bytes_on_the_wire_stay_with_that_replica(
        wire_fleet: tuple[list[object], dict[str, bytes]], payload: bytes) -> None:
    """Whatever one replica sends (interim floods, chunk framing, trailers, escapes, junk), the cycle returns,
    the honest replicas are read, and that replica's errors are printable text."""
    from fdngx.weights.scrape import scrape_all

    insts, sent = wire_fleet
    sent["bytes"] = payload
    samples = scrape_all(insts, deadline=3.0)  # type: ignore[arg-type]
    assert samples["ok0"].ok and samples["ok1"].ok, samples
    hostile = samples["hostile"]
    for text in (hostile.error, hostile.health_error):
        assert text is None or text.isprintable(), repr(text)
