"""Planned maintenance of one replica (`fdngx drain`), end to end: the real CLI, a real nginx under a temp
prefix, simulated replicas (their own request counters and X-Fdngx-Replica headers say who served what).

- a drained replica is rendered `down` and the config passes `nginx -t`;
- drained with the command and applied with `render --reload`: every new request goes to the other
  replica (its counters stay put), while a stream already running on the drained one completes;
- every replica drained: render exits 1 with one line and writes nothing (nginx flavor and OpenResty).
"""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families

from fdngx.sim.process import SimProcess, start_sim
from tests.support import Nginx, fdngx, free_ports, wait_for, write_inventory

pytestmark = pytest.mark.nginx

CHAT = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}


def two(api: list[int], metrics: list[int], drained: tuple[str, ...] = ()) -> list[dict[str, object]]:
    out: list[dict[str, object]] = []
    for i, (port, mport) in enumerate(zip(api, metrics, strict=True)):
        inst: dict[str, object] = {"name": f"dp{i}", "host": "127.0.0.1", "port": port, "metrics_port": mport,
                                   "engine": "sim", "max_num_seqs": 8}
        if f"dp{i}" in drained:
            inst["drain"] = True
        out.append(inst)
    return out


def test_a_drained_replica_is_rendered_down_and_nginx_accepts_it(tmp_path: Path) -> None:
    inv = write_inventory(tmp_path / "fdngx.json", two([8001, 8002], [9001, 9002], drained=("dp1",)))
    prefix = tmp_path / "nginx"
    prefix.mkdir()
    fdngx("render", "-i", str(inv), "--mode", "standalone", "--out", str(prefix / "nginx.conf"), check=True)
    text = (prefix / "nginx.conf").read_text()
    servers = [line.strip() for line in text.splitlines() if line.strip().startswith("server 127.0.0.1:")]
    assert servers == [
        "server 127.0.0.1:8001 weight=1 max_fails=3 fail_timeout=1s;  # dp0",
        "server 127.0.0.1:8002 weight=1 max_fails=3 fail_timeout=1s down;  # dp1",
    ]
    proc = Nginx(prefix).test()
    assert proc.returncode == 0, proc.stderr


@pytest.mark.parametrize("flavor", ["nginx", "openresty"])
def test_every_replica_drained_is_refused_and_nothing_is_written(tmp_path: Path, flavor: str) -> None:
    inv = write_inventory(tmp_path / "fdngx.json", two([8001, 8002], [9001, 9002], drained=("dp0", "dp1")))
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    proc = fdngx("render", "-i", str(inv), "--mode", "site", "--flavor", flavor, "--out", str(out_dir / "site.conf"))
    assert proc.returncode == 1, proc.stdout + proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert "every instance is drained (dp0, dp1)" in lines[0] and "fdngx drain NAME --undo" in lines[0]
    assert "Traceback" not in proc.stderr
    # Nothing at all: no config, no peers file, no token, no lock left behind by a half-done apply.
    assert [p.name for p in out_dir.iterdir() if not p.name.endswith("fdngx-lock")] == []
    # A config already in place stays byte for byte.
    (out_dir / "site.conf").write_text("# the config in force\n")
    again = fdngx("render", "-i", str(inv), "--mode", "site", "--flavor", flavor, "--out", str(out_dir / "site.conf"))
    assert again.returncode == 1
    assert (out_dir / "site.conf").read_text() == "# the config in force\n"


def requests_received(sim: SimProcess, i: int) -> float:
    """The replica's own counter of requests received (fastdeploy:requests_number)."""
    text = requests.get(f"http://127.0.0.1:{sim.metrics_ports[i]}/metrics", timeout=2).text
    return sum(s.value for fam in text_string_to_metric_families(text) for s in fam.samples
               if s.name == "fastdeploy:requests_number_total")


@pytest.fixture
def fleet(tmp_path: Path) -> Iterator[tuple[SimProcess, Nginx, str, Path, list[str]]]:
    api0, api1, met0, met1, port = free_ports(5)
    sim = start_sim([api0, api1], [met0, met1], max_num_seqs=8, log_path=tmp_path / "sim.log")
    nginx: Nginx | None = None
    try:
        inv = write_inventory(tmp_path / "fdngx.json", two([api0, api1], [met0, met1]))
        conf = tmp_path / "nginx" / "nginx.conf"
        common = ["-i", str(inv), "--mode", "standalone", "--listen", f"127.0.0.1:{port}", "--out", str(conf)]
        fdngx("render", *common, check=True)
        url = f"http://127.0.0.1:{port}"
        nginx = Nginx(tmp_path / "nginx").start(f"{url}/health")
        yield sim, nginx, url, inv, common
    finally:
        if nginx is not None:
            nginx.stop()
        sim.stop(grace=2.0)


def test_drain_sends_new_requests_elsewhere_while_a_running_stream_completes(
    fleet: tuple[SimProcess, Nginx, str, Path, list[str]],
) -> None:
    sim, _nginx, url, inv, common = fleet
    names = {str(p): f"dp{i}" for i, p in enumerate(sim.ports)}
    # A stream of ~10 s (300 tokens at the simulator's 30 tokens/s) on whichever replica nginx picks.
    body = {**CHAT, "max_tokens": 300, "stream": True}
    with requests.post(f"{url}/v1/chat/completions", json=body, stream=True, timeout=60) as stream:
        assert stream.status_code == 200
        busy = names[stream.headers["X-Fdngx-Replica"]]
        other = "dp1" if busy == "dp0" else "dp0"
        chunks = stream.iter_lines()
        first = next(line for line in chunks if line)
        assert first.startswith(b"data: {")

        drained = fdngx("drain", busy, "-i", str(inv))
        assert drained.returncode == 0, drained.stderr
        assert f"{busy}: drained in {inv}" in drained.stdout and "run `fdngx render --reload`" in drained.stdout
        assert json.loads(inv.read_text())["instances"][int(busy[2:])]["drain"] is True
        fdngx("render", *common, "--reload", check=True)

        before = requests_received(sim, int(busy[2:]))
        with requests.Session() as s:
            served = Counter(
                names[s.post(f"{url}/v1/chat/completions", json={**CHAT, "max_tokens": 1}, timeout=30)
                      .headers["X-Fdngx-Replica"]]
                for _ in range(20)
            )
        assert served == {other: 20}
        assert requests_received(sim, int(busy[2:])) == before, "the drained replica received a new request"
        assert stream.raw is not None and not stream.raw.closed, "the stream ended before the drain was tested"

        # The stream that was running on the drained replica goes on to its normal end.
        rest = [line for line in chunks if line]
    assert rest[-1] == b"data: [DONE]"
    finals = [json.loads(line[6:]) for line in rest[:-1] if line.startswith(b"data: {")]
    assert finals and finals[-1]["choices"][0]["finish_reason"] == "length"
    tokens = sum(1 for f in [json.loads(first[6:]), *finals]
                 if f["choices"] and f["choices"][0]["delta"].get("content"))
    assert tokens >= 290, f"only {tokens} tokens reached the client"

    # Undone and applied: the replica takes requests again.
    assert fdngx("drain", busy, "--undo", "-i", str(inv), check=True).returncode == 0
    fdngx("render", *common, "--reload", check=True)

    def both() -> bool:
        with requests.Session() as s:
            seen = {names[s.post(f"{url}/v1/chat/completions", json={**CHAT, "max_tokens": 1}, timeout=30)
                          .headers["X-Fdngx-Replica"]] for _ in range(6)}
        return seen == {"dp0", "dp1"}

    wait_for(both, 20, what="both replicas serving after the undo")
    assert re.search(r'"drain"', inv.read_text()) is None
