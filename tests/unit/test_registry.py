"""The registry (fdngx.registry.core*) against FastDeploy's routers, with no network at all.

Upstream read (PaddlePaddle/FastDeploy): golang_router/internal/manager/instance.go @ 171b4d3f (types),
register.go @ 03850e3f (answers, /registered), health.go @ 03850e3f (removal), config/config.go @ 0afcff2b
(5 s check, 5 s timeout); router/router.py @ 029e4cf8 and router/utils.py @ 171b4d3f (Python router);
config.py @ acfda944 / 0009064e (the body); engine/register_manager.py @ def0bd23 (the loop).

Every test injects a fake probe (health, metrics) and a fake resolver; an autouse guard fails any test
that makes fdngx open a connection or a DNS query.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import os
import socket
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fdngx import inventory as inv_mod
from fdngx.errors import UsageError
from fdngx.registry.body import MAX_INFO_BYTES, MAX_LIST, MAX_TEXT, BodyError, parse_body
from fdngx.registry.core import Registry, RegistrySettings, instance_name
from fdngx.registry.http import conn_key
from fdngx.registry.rules import DEFAULT_MAX_INSTANCES, MetricsRule, NameCache, Networks, RateLimit, canonical_ip
from tests.support import edit_in_place

UPSTREAM = json.loads((Path(__file__).parent.parent / "fixtures/upstream/fastdeploy-register-body.json").read_text())
OK = (200, {"code": 200, "msg": "Register success"})
H = "10.0.0.7"
BODY: dict[str, Any] = {**UPSTREAM, "host_ip": H, "port": 8001}  # config.py @ acfda944: no metrics_port


@pytest.fixture(autouse=True)
def no_network(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[str]]:
    """Any connect() or real DNS query from a test is recorded and fails it."""
    seen: list[str] = []

    def connect(self: socket.socket, address: Any) -> None:
        seen.append(f"connect {address}")
        raise OSError("no network in unit tests")

    def getaddrinfo(*args: Any, **kw: Any) -> Any:
        seen.append(f"getaddrinfo {args[:1]}")
        raise OSError("no DNS in unit tests")

    monkeypatch.setattr(socket.socket, "connect", connect)
    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    yield seen
    assert not seen, f"a unit test reached the network: {seen}"


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


class FakeProbe:
    """health/metrics answers by (host, port): None = 200 / a usable page; absent metrics = HTTP 404."""

    def __init__(self) -> None:
        self.health_of: dict[tuple[str, int], str | None] = {}
        self.metrics_of: dict[tuple[str, int], str | None] = {}
        self.calls: list[tuple[str, str, int]] = []

    def health(self, host: str, port: int) -> str | None:
        self.calls.append(("health", host, port))
        return self.health_of.get((host, port))

    def metrics(self, host: str, port: int) -> str | None:
        self.calls.append(("metrics", host, port))
        return self.metrics_of.get((host, port), "HTTP 404")

    def close(self) -> None:
        pass


class Env:
    def __init__(self, tmp: Path, others: tuple[Path, ...] = (), grace: float = 30.0, rule: str | None = None,
                 targets: str = "loopback,private", names: dict[str, list[str]] | None = None,
                 **options: Any) -> None:
        self.path = tmp / "fdngx.json"
        self.probe = FakeProbe()
        self.clock = Clock()
        self.lookups: list[str] = []

        def resolver(name: str) -> list[str]:
            self.lookups.append(name)
            return (names or {}).get(name, [])

        settings = RegistrySettings.from_options(grace, targets, rule, **options)
        self.reg = Registry(self.path, others, settings=settings, probe=self.probe, names=NameCache(resolver),
                            clock=self.clock)

    def instances(self) -> list[dict[str, Any]]:
        return json.loads(self.path.read_text())["instances"]


def write_inv(path: Path, instances: list[dict[str, Any]], upstream: str = "fastdeploy") -> Path:
    path.write_text(json.dumps({"version": 1, "upstream": upstream, "instances": instances}))
    return path


# -- accepted types and answers (instance.go, register.go) ------------------------------------------------


def test_fastdeploy_body_registers_with_the_go_routers_answer(tmp_path: Path) -> None:
    """The exact body of config.py @ acfda944 + register_manager.py's three fields: 200 and Go's answer."""
    env = Env(tmp_path)
    assert env.reg.register(dict(BODY), H) == OK
    [inst] = env.instances()
    assert (inst["host"], inst["port"], inst["engine"], inst["role"], inst["registered"]) == (
        H, 8001, "fastdeploy", "mixed", True)
    assert inst["name"] == instance_name(H, 8001)
    assert inst["fastdeploy"]["engine_worker_queue_port"] == "8182" and inst["fastdeploy"]["device_ids"] == ["0"]


@pytest.mark.parametrize("port", [8001, "8001"])
@pytest.mark.parametrize("metrics_port", [9001, "9001"])
@pytest.mark.parametrize("role", ["mixed", "MIXED", "Mixed", 0, None])
def test_ports_as_int_or_string_and_role_as_int_or_any_case(tmp_path: Path, port: Any, metrics_port: Any,
                                                             role: Any) -> None:
    """instance.go: Port takes an int or a numeric string; Role an int 0..2 or a case-insensitive string.
    A missing role (None here) is taken as mixed."""
    env = Env(tmp_path)
    body = {**BODY, "port": port, "metrics_port": metrics_port, "role": role}
    if role is None:
        del body["role"]
    assert env.reg.register(body, H) == OK
    [inst] = env.instances()
    assert (inst["port"], inst["metrics_port"], inst["role"], inst["metrics_source"]) == (8001, 9001, "mixed", "body")


@pytest.mark.parametrize("absent", [{}, {"metrics_port": 0}, {"metrics_port": "0"}, {"metrics_port": None},
                                    {"metrics_port": ""}])
def test_missing_or_zero_metrics_port_is_not_sent(tmp_path: Path, absent: dict[str, Any]) -> None:
    """router/utils.py InstanceInfo: metrics_port defaults to 0; instance.go: "" means not sent. Either way
    fdngx looks for the metrics (here: /metrics on the API port answers) instead of answering 400."""
    env = Env(tmp_path)
    env.probe.metrics_of[(H, 8001)] = None
    assert env.reg.register({**BODY, **absent}, H) == OK
    [inst] = env.instances()
    assert (inst["metrics_port"], inst["metrics_source"]) == (8001, "api-port-suspect")


DEVELOP = json.loads((Path(__file__).parent.parent / "fixtures/upstream/fastdeploy-register-body-develop.json")
                     .read_text())  # an instance started without --metrics-port: metrics_port is its API port


@pytest.mark.parametrize(("rule", "want"), [("+1000", (9180, "rule")), (None, (8180, "api-port-suspect"))])
def test_a_metrics_port_equal_to_the_api_port_is_no_port_of_its_own(tmp_path: Path, rule: str | None,
                                                                     want: tuple[int, str],
                                                                     caplog: pytest.LogCaptureFixture) -> None:
    """FastDeploy's newer body sends the API port as metrics_port when the instance has no --metrics-port
    (config.py @ 0009064e RouterConfig): the same instance as a 2.x body without it. Before: trusted as
    "body", past the --registry-metrics-port rule and past the api-port-suspect WARNING."""
    env = Env(tmp_path, rule=rule)
    env.probe.metrics_of[(H, 9180)] = env.probe.metrics_of[(H, 8180)] = None
    with caplog.at_level(logging.WARNING, "fdngx.registry"):
        assert env.reg.register({**DEVELOP, "host_ip": H}, H) == OK
    [inst] = env.instances()
    assert (inst["metrics_port"], inst["metrics_source"]) == want
    assert ("api-port-suspect" in caplog.text) is (rule is None)
    (tmp_path / "distinct").mkdir()
    env = Env(tmp_path / "distinct", rule=rule)  # a metrics port of its own is still the body's word
    assert env.reg.register({**DEVELOP, "host_ip": H, "metrics_port": 9999}, H) == OK
    assert (env.instances()[0]["metrics_port"], env.instances()[0]["metrics_source"]) == (9999, "body")


@pytest.mark.parametrize(("change", "needle"), [
    ({"port": "80a"}, "invalid port"), ({"port": 8001.5}, "invalid port"), ({"port": True}, "invalid port"),
    ({"port": 0}, "invalid port: 0"), ({"port": 70000}, "invalid port: 70000"), ({"port": None}, "port is required"),
    ({"metrics_port": -1}, "invalid metrics_port"), ({"metrics_port": [9001]}, "invalid metrics_port"),
    ({"role": 5}, "invalid role integer: 5"), ({"role": "boss"}, "invalid role"), ({"role": True}, "invalid role"),
    ({"host_ip": ""}, "host_ip is required"), ({"host_ip": None}, "host_ip is required"),
    ({"host_ip": 7}, "invalid host_ip"), ({"transfer_protocol": ["tcp"]}, "invalid protocol"),
    ({"transfer_protocol": "ipc"}, "invalid transfer_protocol"), ({"device_ids": [{"a": 1}]}, "invalid device_ids"),
    ({"rdma_ports": "1,2"}, "invalid rdma_ports"), ({"engine_worker_queue_port": [1]}, "engine_worker_queue_port"),
])
def test_bad_bodies_are_400_with_the_reason_and_change_nothing(tmp_path: Path, change: dict[str, Any],
                                                                 needle: str) -> None:
    """instance.go NewInstanceInfo's checks and Go's unmarshal errors -> register.go's 400 {code, msg}."""
    env = Env(tmp_path)
    before = env.path.read_bytes()
    status, doc = env.reg.register({**BODY, **change}, H)
    assert status == 400 and doc["code"] == 400 and needle in doc["msg"] and doc["detail"] == doc["msg"], doc
    assert env.path.read_bytes() == before
    assert ("health", H, 8001) not in env.probe.calls  # refused before fdngx contacts anything


@pytest.mark.parametrize("body", [[1, 2], "x", None, 3])
def test_a_body_that_is_not_an_object_is_400(tmp_path: Path, body: Any) -> None:
    status, doc = Env(tmp_path).reg.register(body, H)
    assert status == 400 and "Invalid InstanceInfo JSON format" in doc["msg"]


def test_unhealthy_instance_is_503_and_not_added(tmp_path: Path) -> None:
    """register.go: CheckWorkerHealth fails -> 503 {"code": 503, "msg": "service is not healthy"}."""
    env = Env(tmp_path)
    env.probe.health_of[(H, 8001)] = "HTTP 404"
    status, doc = env.reg.register(dict(BODY), H)
    assert status == 503 and doc["code"] == 503 and "not healthy" in doc["msg"] and "HTTP 404" in doc["msg"]
    assert env.instances() == []


@pytest.mark.parametrize("role", ["prefill", "decode", "PREFILL", 1, 2])
def test_prefill_and_decode_are_refused_never_mixed_into_the_upstream(tmp_path: Path, role: Any) -> None:
    """register.go: without splitwise "only MIXED instances are allowed"; router.py the same. fdngx has no
    split mode: a prefill/decode instance is refused with what to use instead."""
    env = Env(tmp_path)
    status, doc = env.reg.register({**BODY, "role": role}, H)
    assert status == 400 and "only MIXED instances are allowed" in doc["msg"] and "--splitwise" in doc["msg"]
    assert env.instances() == [] and env.probe.calls == []


def test_registered_and_registered_number_shapes(tmp_path: Path) -> None:
    """register.go Registered: {code, msg: "success", prefill[], decode[], mixed[]} of WorkerInfo, ports as
    strings; RegisteredNumber: {mixed, prefill, decode}. Instances of the other -i files are listed too."""
    other = write_inv(tmp_path / "b.json", [{"name": "dp9", "host": "127.0.0.1", "port": 7001}])
    env = Env(tmp_path, others=(other,))
    assert env.reg.register({**BODY, "metrics_port": 9001}, H) == OK
    doc = env.reg.registered()
    assert (doc["code"], doc["msg"], doc["prefill"], doc["decode"]) == (200, "success", [], [])
    mine = next(e for e in doc["mixed"] if e["registered"])
    assert mine["url"] == f"http://{H}:8001" and mine["worker_type"] == "mixed"
    assert (mine["engine_worker_queue_port"], mine["connector_port"], mine["metrics_port"]) == ("8182", "", "9001")
    assert (mine["transfer_protocol"], mine["device_ids"], mine["rdma_ports"]) == (["ipc"], ["0"], [])
    hand = next(e for e in doc["mixed"] if not e["registered"])
    assert hand["url"] == "http://127.0.0.1:7001" and hand["name"] == "dp9"
    assert env.reg.registered_number() == {"mixed": 2, "prefill": 0, "decode": 0}
    assert env.reg.health_generate()["msg"] == "Health check complete"


def test_heartbeats_write_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """FastDeploy posts every 5 s (register_manager.py); a heartbeat that changes nothing is no write (and
    so no sidecar reload), probes the metrics no more, and parses no file (the inventory and the other -i
    files are read once per version: ~200 heartbeats a second at 1,024 instances)."""
    other = tmp_path / "node2.json"
    write_inv(other, [{"name": "dp0", "host": "10.0.0.7", "port": 7001}])
    env = Env(tmp_path, rule="+1000", others=(other,))
    assert env.reg.register(dict(BODY), H) == OK
    metric_probes = sum(c[0] == "metrics" for c in env.probe.calls)
    for path in (env.path, other):  # settled: not changed within CachedLoad.RACY_SECONDS
        os.utime(path, (time.time() - 10, time.time() - 10))
    stamp = env.path.stat().st_mtime_ns
    assert env.reg.register(dict(BODY), H) == OK  # reads the files as they are now (utime made new versions)
    parsed: list[str] = []
    real_parse = inv_mod.parse_text
    monkeypatch.setattr(inv_mod, "parse_text", lambda raw, where: parsed.append(where) or real_parse(raw, where))
    for _ in range(20):
        assert env.reg.register(dict(BODY), H) == OK
    assert env.path.stat().st_mtime_ns == stamp
    assert sum(c[0] == "metrics" for c in env.probe.calls) == metric_probes
    assert parsed == [], f"{len(parsed)} whole-file parses for 20 unchanged heartbeats"
    write_inv(other, [{"name": "dp0", "host": "10.0.0.7", "port": 7002}])  # a change is read at once
    assert env.reg.register(dict(BODY), H) == OK and parsed == [str(other)]


def test_heartbeats_and_writes_parse_nothing_while_the_file_keeps_changing(tmp_path: Path,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """One instance changing a field once a second (a flapping version or is_paused), or a rollout's churn of
    registrations, keeps the file changed within the last RACY_SECONDS for good. Its heartbeats, the others'
    and the writes themselves read the file and compare its bytes with what the registry last wrote: nothing
    is parsed (was: the whole file on every heartbeat and every write), and a change is serialised once (was:
    three times)."""
    env = Env(tmp_path, rule="+1000")
    for port in (8001, 8002, 8003, 8004):
        assert env.reg.register({**BODY, "port": port}, H) == OK
    parsed: list[str] = []
    serialised: list[int] = []
    real_parse, real_to_json = inv_mod.parse_text, inv_mod.to_json
    monkeypatch.setattr(inv_mod, "parse_text", lambda raw, where: parsed.append(where) or real_parse(raw, where))
    monkeypatch.setattr(inv_mod, "to_json", lambda inv: serialised.append(1) or real_to_json(inv))
    for k in range(6):
        assert env.reg.register({**BODY, "version": f"v{k % 2}"}, H) == OK  # a change: one write
        for port in (8002, 8003, 8004):
            assert env.reg.register({**BODY, "port": port}, H) == OK  # unchanged heartbeats
    assert env.reg.register({**BODY, "port": 8005}, H) == OK  # a new one
    assert [i["fastdeploy"].get("version") for i in env.instances()] == ["v1", None, None, None, None]
    assert parsed == [], f"{len(parsed)} whole-file parses"
    assert len(serialised) == 7, f"{len(serialised)} serialisations for 7 writes"
    monkeypatch.undo()
    assert env.reg._load(env.path) == inv_mod.load(env.path), "what the registry keeps is what it wrote"


def test_an_edit_by_another_process_within_one_mtime_tick_is_seen_and_kept(tmp_path: Path) -> None:
    """Another process (a person's editor) changes the file in place and leaves its device, inode, size and
    mtime_ns as they were: the registry's reads see the change, and its next write keeps it."""
    path = write_inv(tmp_path / "fdngx.json", [{"name": "dp9", "host": "10.0.0.9", "port": 7001, "weight": 2}])
    env = Env(tmp_path, rule="+1000")
    assert env.reg.register(dict(BODY), H) == OK
    assert [e["url"] for e in env.reg.registered()["mixed"]] == ["http://10.0.0.9:7001", f"http://{H}:8001"]
    edit_in_place(path, '"port": 7001', '"port": 7002')
    assert [e["url"] for e in env.reg.registered()["mixed"]] == ["http://10.0.0.9:7002", f"http://{H}:8001"]
    edit_in_place(path, '"weight": 1', '"weight": 3')  # the registered instance
    assert env.reg.register(dict(BODY), H) == OK  # unchanged: the edit is no reason to write
    assert env.reg.register({**BODY, "version": "v2"}, H) == OK
    assert [(i["port"], i["weight"], i.get("fastdeploy", {}).get("version")) for i in env.instances()] == \
        [(7002, 2, None), (8001, 3, "v2")]


def test_changes_are_applied_and_hand_edits_kept(tmp_path: Path) -> None:
    env = Env(tmp_path)
    assert env.reg.register({**BODY, "metrics_port": 9001}, H) == OK
    doc = json.loads(env.path.read_text())
    doc["instances"][0]["weight"] = 3  # a sysadmin's edit
    env.path.write_text(json.dumps(doc))
    assert env.reg.register({**BODY, "metrics_port": 9100}, H) == OK
    [inst] = env.instances()
    assert (inst["metrics_port"], inst["weight"]) == (9100, 3)


def test_loopback_claim_from_another_machine_uses_the_peer_address(tmp_path: Path) -> None:
    """get_host_ip() is 127.0.1.1 on Debian: from a remote peer that means the peer's address."""
    env = Env(tmp_path)
    assert env.reg.register({**BODY, "host_ip": "127.0.1.1", "metrics_port": 9001}, "10.0.0.9") == OK
    assert env.reg.register({**BODY, "host_ip": "127.0.0.1", "port": 8002, "metrics_port": 9002}, "::1") == OK
    assert [i["host"] for i in env.instances()] == ["10.0.0.9", "127.0.0.1"]


# -- removal (health.go MonitorInstanceHealthCore; router.py monitor_instance_health) ---------------------


def test_a_silent_instance_whose_health_does_not_pass_leaves_after_the_grace(tmp_path: Path,
                                                                            caplog: pytest.LogCaptureFixture) -> None:
    """Silent for the grace AND /health not passing in that check (failing, or not asked): removed; the next
    heartbeat adds it back."""
    env = Env(tmp_path, grace=30)
    assert env.reg.register({**BODY, "metrics_port": 9001}, H) == OK
    env.clock.t += 29
    env.probe.health_of[(H, 8001)] = "connection refused"
    assert env.reg.check() == [] and len(env.instances()) == 1
    env.clock.t += 2
    with caplog.at_level(logging.INFO, logger="fdngx.registry"):
        assert env.reg.check() == [instance_name(H, 8001)] and env.instances() == []
    assert "no heartbeat for 31 s (--registry-grace 30) and /health not passing (connection refused)" in caplog.text
    env.probe.health_of.clear()
    assert env.reg.register({**BODY, "metrics_port": 9001}, H) == OK
    assert len(env.instances()) == 1
    env.clock.t += 31
    assert env.reg.check(health=False) == [instance_name(H, 8001)]  # a check that asked no /health: not passing


def test_a_silent_instance_whose_health_passes_is_kept_and_said_once(tmp_path: Path,
                                                                     caplog: pytest.LogCaptureFixture) -> None:
    """health.go removes an instance only when its /health check fails. An instance whose heartbeats are
    refused or lost (the registry busy, --registry-allow, the network) while it serves is kept, with one
    WARNING per silence (was: removed after the grace, an outage made of a registry problem)."""
    env = Env(tmp_path, grace=30)
    name = instance_name(H, 8001)
    assert env.reg.register({**BODY, "metrics_port": 9001}, H) == OK
    with caplog.at_level(logging.WARNING, logger="fdngx.registry"):
        for _ in range(6):
            env.clock.t += 10
            assert env.reg.check() == []
    assert len(env.instances()) == 1
    said = [r.getMessage() for r in caplog.records if "no heartbeat" in r.getMessage()]
    assert said == [f"registry: {name} has sent no heartbeat for 40 s but its /health passes, so it is kept; its "
                    "heartbeats may be refused or not reaching the registry (busy, --registry-allow, network)"]
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="fdngx.registry"):
        assert env.reg.register({**BODY, "metrics_port": 9001}, H) == OK  # heartbeats are back: nothing said
        env.clock.t += 10
        assert env.reg.check() == [] and not caplog.records
        env.clock.t += 25  # silent again: said again, once
        assert env.reg.check() == [] and env.reg.check() == []
    assert [r.getMessage() for r in caplog.records] == [said[0].replace("for 40 s", "for 35 s")]
    # Still silent, and now /health fails: one failed (or slow) answer of a busy instance is not enough;
    # two checks in a row are.
    env.probe.health_of[(H, 8001)] = "HTTP 503"
    assert env.reg.check() == [] and len(env.instances()) == 1
    env.probe.health_of.pop((H, 8001))  # it passes again in between: the count starts over
    assert env.reg.check() == []
    env.probe.health_of[(H, 8001)] = "timed out"
    assert env.reg.check() == [] and env.reg.check() == [name]


def test_updates_are_said_once_per_check_while_joins_and_leaves_keep_their_lines(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Each accepted change wrote an INFO line ("updated"): eight instances flapping is_paused at every heartbeat
    wrote eight lines per 5 s, for as long as they flapped. Now one line per check says them all; each join and
    each leave is still a line of its own."""
    env = Env(tmp_path, grace=10)
    names = [instance_name(H, 8001 + n) for n in range(8)]
    caplog.set_level(logging.INFO, logger="fdngx.registry")
    for n in range(8):
        assert env.reg.register(_body(8001 + n), H) == OK
    for beat in range(5):
        for n in range(8):
            assert env.reg.register(_body(8001 + n, is_paused=beat % 2 == 0), H) == OK
    said = [r.getMessage() for r in caplog.records]
    assert [s.split(" at ")[0] for s in said] == [f"registry: {name} registered" for name in names]
    env.clock.t += 5
    assert env.reg.check() == []
    assert [r.getMessage() for r in caplog.records][8:] == [
        f"registry: 8 registered instances updated in 5 s (40 changes: is_paused): {', '.join(names[:5])} and 3 more"]
    caplog.clear()
    assert env.reg.register(_body(8001, version="v9", is_paused=True), H) == OK  # one alone: its own line, in full
    env.probe.health_of[(H, 8002)] = "HTTP 404"
    env.clock.t += 5
    assert env.reg.check() == []
    env.clock.t += 6
    assert env.reg.check() == [names[1]]
    said = [r.getMessage() for r in caplog.records if r.levelno == logging.INFO]
    assert said[0] == f"registry: {names[0]} updated (version; metrics port 9001 from body)"
    assert len(said) == 2 and said[1].startswith(f"registry: {names[1]} removed: "), said


def test_a_registration_refused_under_the_lock_says_no_join(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """The join's INFO line was written before the checks under the lock: a registration whose name another
    entry of the file already uses (409, nothing written) still logged "registered at"."""
    env = Env(tmp_path)
    write_inv(env.path, [{"name": instance_name(H, 8001), "host": "10.0.0.9", "port": 8001}])
    with caplog.at_level(logging.INFO, logger="fdngx.registry"):
        status, doc = env.reg.register(dict(BODY), H)
    assert status == 409, doc
    assert [i["host"] for i in env.instances()] == ["10.0.0.9"]
    assert not [r.getMessage() for r in caplog.records if "registered at" in r.getMessage()]


def test_instance_failing_health_leaves_after_the_grace(tmp_path: Path) -> None:
    """Both routers drop an instance whose /health fails; fdngx waits for the grace (the sidecar has already
    marked it down after --fail-threshold checks), then removes it from the inventory."""
    env = Env(tmp_path, grace=10)
    assert env.reg.register({**BODY, "metrics_port": 9001}, H) == OK
    env.probe.health_of[(H, 8001)] = "connection refused"
    assert env.reg.check() == []
    env.clock.t += 6
    env.reg.register({**BODY, "metrics_port": 9001}, "10.0.0.1")  # 503: no heartbeat recorded
    assert env.reg.check() == []
    assert env.reg.health_generate()["unhealthy"] == [f"http://{H}:8001"]
    env.clock.t += 5
    assert env.reg.check() == [instance_name(H, 8001)]


def test_health_that_recovers_resets_the_clock(tmp_path: Path) -> None:
    env = Env(tmp_path, grace=10)
    assert env.reg.register({**BODY, "metrics_port": 9001}, H) == OK
    env.probe.health_of[(H, 8001)] = "HTTP 404"
    env.reg.check()
    env.clock.t += 8
    env.probe.health_of[(H, 8001)] = None
    assert env.reg.register({**BODY, "metrics_port": 9001}, H) == OK
    env.reg.check()
    env.clock.t += 8
    assert env.reg.check() == []


def test_a_heartbeat_between_two_failed_checks_starts_the_failing_clock_over(tmp_path: Path) -> None:
    """A heartbeat is a sign of life (the registry's /health probe of it passed): a check that failed before
    it no longer counts. Was: an unchanged heartbeat kept "failing since" (only a changed registration cleared
    it), so one failed check, a heartbeat, and one more failed check past the grace removed the instance."""
    env = Env(tmp_path, grace=10)
    assert env.reg.register({**BODY, "metrics_port": 9001}, H) == OK
    env.probe.health_of[(H, 8001)] = "HTTP 503"
    assert env.reg.check() == []
    env.clock.t += 8
    env.probe.health_of.pop((H, 8001))
    assert env.reg.register({**BODY, "metrics_port": 9001}, H) == OK  # unchanged: the heartbeat path
    assert env.reg.health_generate()["unhealthy"] == []
    env.clock.t += 3  # 11 s after the first failed check, 3 s after the heartbeat
    env.probe.health_of[(H, 8001)] = "HTTP 503"
    assert env.reg.check() == [] and len(env.instances()) == 1
    env.clock.t += 11  # failing ever since that check, for more than the grace: now it goes
    assert env.reg.check() == [instance_name(H, 8001)]


def test_an_instance_deleted_from_the_file_by_hand_leaves_no_liveness_state(tmp_path: Path) -> None:
    """The periodic check forgets what it kept about an instance no longer registered in the file (deleted by
    hand, not through the registry): was kept forever, and /health_generate still named it unhealthy."""
    env = Env(tmp_path, grace=30)
    assert env.reg.register({**BODY, "metrics_port": 9001}, H) == OK
    assert env.reg.register({**BODY, "port": 8002, "metrics_port": 9002}, H) == OK
    env.probe.health_of[(H, 8001)] = env.probe.health_of[(H, 8002)] = "HTTP 503"
    assert env.reg.check() == []
    assert env.reg.health_generate()["unhealthy"] == [f"http://{H}:8001", f"http://{H}:8002"]
    write_inv(env.path, [i for i in env.instances() if i["port"] == 8002])  # by hand
    assert env.reg.check() == []
    live = env.reg.live
    assert set(live.seen) == set(live.failing) == set(live.misses) == {(H, 8002)}
    assert env.reg.health_generate()["unhealthy"] == [f"http://{H}:8002"]
    write_inv(env.path, [])
    env.reg.check()
    assert (live.seen, live.failing, live.misses) == ({}, {}, {})


def metrics_port_state(env: Env) -> set[tuple[str, int]]:
    """The instances MetricsPorts keeps anything about (when it last looked, what it said)."""
    ports = env.reg.metrics_ports
    return {*ports._probed, *ports._warned, *ports._suspect_said}


def test_an_instance_deleted_from_the_file_by_hand_leaves_no_metrics_port_state(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """MetricsPorts kept what it said about an instance (and when it last looked) for good once the instance
    was deleted from the file by hand. The periodic check drops it now: nothing left behind, and the instance
    registering again is told about afresh, as one the registry removed itself is."""
    env = Env(tmp_path)
    env.probe.metrics_of[(H, 8002)] = None  # 8001: no load signal; 8002: the API port's page, "suspect"
    with caplog.at_level(logging.WARNING, logger="fdngx.registry"):
        assert env.reg.register(dict(BODY), H) == OK
        assert env.reg.register({**BODY, "port": 8002}, H) == OK
        assert env.reg.check() == [] and metrics_port_state(env) == {(H, 8001), (H, 8002)}
        write_inv(env.path, [i for i in env.instances() if i["port"] == 8002])  # by hand
        assert env.reg.check() == [] and metrics_port_state(env) == {(H, 8002)}
        write_inv(env.path, [])
        assert env.reg.check() == [] and metrics_port_state(env) == set()
        caplog.clear()
        assert env.reg.register(dict(BODY), H) == OK
    said = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(said) == 1 and "no load signal" in said[0], said


def test_a_registration_racing_the_check_keeps_its_metrics_port_state(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """The metrics search runs without the registry's lock, before the registration writes the file: a check
    reading the file in between does not see the instance yet, and must not drop what the search just found
    and said (pruning every address not in the file would: the WARNING said again on the next search)."""
    env = Env(tmp_path)
    in_save, go = threading.Event(), threading.Event()
    save = env.reg._save

    def held_save(*args: Any, **kw: Any) -> None:
        in_save.set()
        assert go.wait(5)
        save(*args, **kw)

    monkeypatch.setattr(env.reg, "_save", held_save)
    answers: list[Any] = []
    registering = threading.Thread(target=lambda: answers.append(env.reg.register(dict(BODY), H)))
    with caplog.at_level(logging.WARNING, logger="fdngx.registry"):
        registering.start()
        try:
            assert in_save.wait(5)
            assert env.reg.check() == [] and env.instances() == []  # searched, said, not written yet
            assert metrics_port_state(env) == {(H, 8001)}
        finally:
            go.set()
            registering.join(5)
        assert answers == [OK] and [i["port"] for i in env.instances()] == [8001]
        assert env.reg.check() == [] and metrics_port_state(env) == {(H, 8001)}
        env.clock.t += 61  # searched again: still no load signal, already said
        assert env.reg.register(dict(BODY), H) == OK
    said = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(said) == 1 and "no load signal" in said[0], said


def test_grace_zero_never_removes(tmp_path: Path) -> None:
    env = Env(tmp_path, grace=0)
    assert env.reg.register({**BODY, "metrics_port": 9001}, H) == OK
    env.clock.t += 1e6
    env.probe.health_of[(H, 8001)] = "HTTP 404"
    assert env.reg.check() == [] and len(env.instances()) == 1


def test_hand_written_entries_are_never_touched_or_removed(tmp_path: Path) -> None:
    path = write_inv(tmp_path / "fdngx.json", [{"name": "dp0", "host": H, "port": 8001, "metrics_port": 9001}])
    before = path.read_bytes()
    env = Env(tmp_path, grace=5)
    assert env.reg.register(dict(BODY), H) == OK  # already balanced from this file
    env.clock.t += 100
    env.probe.health_of[(H, 8001)] = "HTTP 404"
    assert env.reg.check() == [] and path.read_bytes() == before


def test_a_restarted_registry_gives_registered_instances_a_fresh_grace(tmp_path: Path) -> None:
    env = Env(tmp_path, grace=10)
    assert env.reg.register({**BODY, "metrics_port": 9001}, H) == OK
    again = Env(tmp_path, grace=10)
    again.probe.health_of[(H, 8001)] = "connection refused"
    again.clock.t += 9
    assert again.reg.check() == []
    again.clock.t += 2
    assert again.reg.check() == [instance_name(H, 8001)]


# -- metrics of registered instances ---------------------------------------------------------------------


def test_metrics_port_rules(tmp_path: Path) -> None:
    table = tmp_path / "ports.json"
    table.write_text(json.dumps({"8001": 9001, f"{H}:8002": 9102, "8002": 9002, "[fd00::1]:8003": 9103}))
    assert MetricsRule.parse("9400").port_for([H], 8001) == 9400
    assert MetricsRule.parse("+1000").port_for([H], 8001) == 9001
    assert MetricsRule.parse("-100").port_for([H], 8001) == 7901
    assert MetricsRule.parse("+65000").port_for([H], 8001) is None  # out of range: no port
    rule = MetricsRule.parse(str(table))
    assert rule.port_for([H], 8001) == 9001
    assert rule.port_for([H], 8002) == 9102 and rule.port_for(["10.0.0.8"], 8002) == 9002
    assert rule.port_for(["fd00::1"], 8003) == 9103 and rule.port_for([H], 8004) is None
    for bad in ("0", "70000", str(tmp_path / "missing.json"), "x y"):
        with pytest.raises(UsageError, match="--registry-metrics-port"):
            MetricsRule.parse(bad)
    table.write_text(json.dumps({"8001": "9001"}))
    with pytest.raises(UsageError, match="must map PORT or HOST:PORT"):
        MetricsRule.parse(str(table))


def test_metrics_port_order_body_then_rule_then_api_port(tmp_path: Path) -> None:
    """reference/fastdeploy.md: without its own metrics port, FastDeploy's /metrics on the API port is
    answered by a forked web worker whose load gauges read 0. So the --registry-metrics-port rule wins over
    the API port, even when the API port answers /metrics."""
    env = Env(tmp_path, rule="+1000")
    env.probe.metrics_of[(H, 8001)] = None  # this one serves /metrics on its API port too
    env.probe.metrics_of[(H, 9001)] = None
    assert env.reg.register(dict(BODY), H) == OK
    assert env.reg.register({**BODY, "port": 8002}, H) == OK  # this one does not (a separate metrics port)
    env.probe.metrics_of[(H, 9003)] = None
    assert env.reg.register({**BODY, "port": 8003, "metrics_port": 9999}, H) == OK  # the body says: no probe
    got = {i["port"]: (i["metrics_port"], i["metrics_source"]) for i in env.instances()}
    assert got == {8001: (9001, "rule"), 8002: (9002, "rule"), 8003: (9999, "body")}
    assert ("metrics", H, 8003) not in env.probe.calls


def test_no_load_signal_is_marked_and_said_once(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Without metrics_port, /metrics on the API port and a rule: "metrics_source": "none" in the
    inventory (for status and telemetry) and exactly one WARNING, never silent."""
    env = Env(tmp_path)
    with caplog.at_level(logging.WARNING, logger="fdngx.registry"):
        for _ in range(5):
            assert env.reg.register(dict(BODY), H) == OK
    [inst] = env.instances()
    assert (inst["metrics_source"], inst["metrics_port"]) == ("none", 8001)
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "no load signal" in warnings[0].getMessage()
    assert "--registry-metrics-port" in warnings[0].getMessage()
    # Looked for again after a while: metrics that appear later are picked up.
    env.clock.t += 61
    env.probe.metrics_of[(H, 8001)] = None
    assert env.reg.register(dict(BODY), H) == OK
    assert env.instances()[0]["metrics_source"] == "api-port-suspect"


def test_a_rule_port_that_does_not_answer_is_used_with_a_warning(tmp_path: Path,
                                                                   caplog: pytest.LogCaptureFixture) -> None:
    env = Env(tmp_path, rule="9400")
    with caplog.at_level(logging.WARNING, logger="fdngx.registry"):
        assert env.reg.register(dict(BODY), H) == OK
    assert env.instances()[0]["metrics_port"] == 9400
    assert any("does not serve /metrics yet" in r.getMessage() for r in caplog.records)


# -- who and what may register (issue 10) -----------------------------------------------------------------


@pytest.mark.parametrize(("host", "status", "needle"), [
    ("169.254.169.254", 400, "link-local"), ("fe80::1", 400, "link-local"), ("224.0.0.1", 400, "multicast"),
    ("ff02::1", 400, "multicast"), ("0.0.0.0", 400, "unspecified"), ("::", 400, "unspecified"),
    ("8.8.8.8", 403, "--registry-targets"), ("2001:db8::1", 403, "--registry-targets"),
    ("fe80::1%eth0", 400, "invalid host_ip"), ('::1%"..(os.execute("id"))', 400, "invalid host_ip"),
    ("999", 400, "invalid host_ip"), ("0x7f000001", 400, "invalid host_ip"), ("a;b", 400, "invalid host_ip"),
    ("10.0.0.1\n", 400, "invalid host_ip"),
])
def test_addresses_that_may_not_be_registered(tmp_path: Path, host: str, status: int, needle: str) -> None:
    env = Env(tmp_path)
    got, doc = env.reg.register({**BODY, "host_ip": host}, "10.0.0.1")
    assert got == status and needle in doc["msg"], doc
    assert env.instances() == [] and env.probe.calls == []


def test_link_local_is_refused_even_when_every_address_is_allowed(tmp_path: Path) -> None:
    env = Env(tmp_path, targets="0.0.0.0/0,::/0")
    assert env.reg.register({**BODY, "host_ip": "169.254.169.254"}, H)[0] == 400
    assert env.reg.register({**BODY, "host_ip": "8.8.8.8", "metrics_port": 9001}, H) == OK  # fake probe only


def test_names_are_resolved_once_and_stored_as_their_address(tmp_path: Path) -> None:
    env = Env(tmp_path, names={"replica-a.example": ["10.0.0.21"], "meta.example": ["169.254.169.254"]})
    for _ in range(3):
        assert env.reg.register({**BODY, "host_ip": "replica-a.example", "metrics_port": 9001}, H) == OK
    [inst] = env.instances()
    assert (inst["host"], inst["registered_as"]) == ("10.0.0.21", "replica-a.example")
    assert env.lookups == ["replica-a.example"]
    status, doc = env.reg.register({**BODY, "host_ip": "nowhere.invalid"}, H)
    assert status == 400 and "does not resolve" in doc["msg"]
    status, doc = env.reg.register({**BODY, "host_ip": "meta.example"}, H)
    assert status == 400 and "link-local" in doc["msg"]
    assert len(env.instances()) == 1


@pytest.mark.parametrize(("listed", "sent"), [("127.0.0.1", "127.0.0.1"), ("::ffff:127.0.0.1", "127.0.0.1"),
                                            ("127.0.0.1", "::ffff:127.0.0.1"), ("::1", "0:0::1")])
def test_an_address_of_another_inventory_file_is_refused_409(tmp_path: Path, listed: str, sent: str,
                                                             caplog: pytest.LogCaptureFixture) -> None:
    """issue 10: registering an address already in another -i file answered success and then blocked every
    apply. Now 409 naming the instance there (canonical addresses compared), and the merged inventory
    still loads. The file is in the log, not in the answer: a caller learns no server path."""
    other = write_inv(tmp_path / "node2.json", [{"name": "dp0", "host": listed, "port": 8001}])
    env = Env(tmp_path, others=(other,))
    with caplog.at_level(logging.DEBUG, logger="fdngx.registry"):
        status, doc = env.reg.register({**BODY, "host_ip": sent}, "127.0.0.1")
    assert status == 409 and "'dp0'" in doc["msg"] and "another -i file" in doc["msg"], doc
    assert "node2.json" not in doc["msg"] and str(other) in caplog.text
    assert env.instances() == [] and env.probe.calls == []
    inv_mod.load_many([env.path, other])


def test_answers_name_no_server_path_and_the_log_has_the_detail(tmp_path: Path,
                                                                 caplog: pytest.LogCaptureFixture) -> None:
    """Outside review: a 500 (an inventory file that cannot be read) and a 409 found where the file is
    written (a hand-written entry in the registry's own file holding the name) answered the file's path to
    any caller. Now the answer says what went wrong without it (409: the instance); the log names the file."""
    env = Env(tmp_path)
    write_inv(env.path, [{"name": instance_name(H, 8001), "host": "10.0.0.99", "port": 8001}])
    with caplog.at_level(logging.DEBUG, logger="fdngx.registry"):
        status, doc = env.reg.register(_body(8001), H)
    assert status == 409 and f"{H}:8001 as '{instance_name(H, 8001)}'" in doc["msg"], doc
    assert str(tmp_path) not in doc["msg"] and "fdngx.json" not in doc["msg"] and str(env.path) in caplog.text
    env.path.write_text("{not json")
    caplog.clear()
    with caplog.at_level(logging.ERROR, logger="fdngx.registry"):
        status, doc = env.reg.register(_body(8002), H)
    assert status == 500 and "could not record the registration" in doc["msg"] and "log" in doc["msg"], doc
    assert str(tmp_path) not in doc["msg"] and "fdngx.json" not in doc["msg"]
    assert str(env.path) in caplog.text and "invalid JSON" in caplog.text


def test_a_clash_that_appears_later_is_removed_so_applies_never_block(tmp_path: Path) -> None:
    other = tmp_path / "node2.json"
    env = Env(tmp_path, others=(other,))
    assert env.reg.register({**BODY, "metrics_port": 9001}, H) == OK  # node2.json does not exist yet
    write_inv(other, [{"name": "dp0", "host": H, "port": 8001}])
    with pytest.raises(Exception, match="already listed"):
        inv_mod.load_many([env.path, other])
    assert env.reg.check(health=False) == [instance_name(H, 8001)]
    inv_mod.load_many([env.path, other])


def test_the_file_is_created_with_the_other_files_upstream(tmp_path: Path) -> None:
    other = write_inv(tmp_path / "b.json", [{"name": "dp0", "host": "127.0.0.1", "port": 7001}], upstream="llm")
    env = Env(tmp_path, others=(other,))
    assert json.loads(env.path.read_text())["upstream"] == "llm"
    assert env.reg.register({**BODY, "metrics_port": 9001}, H) == OK
    inv_mod.load_many([env.path, other])


def test_concurrent_registrations_all_land_in_one_valid_file(tmp_path: Path) -> None:
    env = Env(tmp_path)
    results: list[Any] = []
    threads = [threading.Thread(target=lambda p=p: results.append(
        env.reg.register({**BODY, "port": p, "metrics_port": 9001}, H))) for p in range(8001, 8033)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == [OK] * 32
    assert sorted(i["port"] for i in env.instances()) == list(range(8001, 8033))
    assert not [p for p in os.listdir(tmp_path) if p.endswith(".fdngx-tmp")]


def test_allow_lists_and_rate_limit() -> None:
    nets = Networks.parse("loopback,private", "--registry-allow")
    assert nets.allows(ipaddress.ip_address("127.0.0.1")) and nets.allows(ipaddress.ip_address("192.168.1.2"))
    assert not nets.allows(ipaddress.ip_address("8.8.8.8")) and not nets.allows(ipaddress.ip_address("100.64.0.1"))
    for bad in ("", "10.0.0.0/33", "nope"):
        with pytest.raises(UsageError, match="--registry-allow"):
            Networks.parse(bad, "--registry-allow")
    t = [0.0]
    limit = RateLimit(rate=1.0, burst=3.0, clock=lambda: t[0])
    assert [limit.allow("a") for _ in range(4)] == [True, True, True, False]
    assert limit.allow("b")
    t[0] += 1.0
    assert limit.allow("a") and not limit.allow("a")


def test_connection_budgets_are_per_ipv4_address_and_per_ipv6_64() -> None:
    """One host holds a whole IPv6 /64 and could open connections from as many addresses: its connection
    budget is the /64's (the rate buckets stay per address: a /64 of nodes must not share one)."""
    def key(a: str) -> str:
        ip = canonical_ip(a)
        assert ip is not None
        return str(conn_key(ip))

    assert key("2001:db8::5") == key("2001:db8::ffff:1") == "2001:db8::/64"
    assert key("2001:db8:0:1::5") != key("2001:db8::5")
    assert key("::ffff:10.0.0.1") == key("10.0.0.1") == "10.0.0.1"
    assert key("10.0.0.2") != key("10.0.0.1")


def test_rate_limit_is_per_address_for_ipv6_too_and_bounded() -> None:
    # A data-centre or cloud subnet is one /64 for many nodes: one node refused must not refuse its neighbours
    # (was: one bucket per /64, so a fleet in one subnet shared 10 calls/s).
    limit = RateLimit(rate=0.001, burst=3.0, clock=lambda: 0.0, max_sources=16)
    assert [limit.allow("fd00:1:2:3::1") for _ in range(4)] == [True, True, True, False]
    assert not limit.allow("fd00:1:2:3:0:0:0:1"), "one address however it is written"
    assert limit.allow("fd00:1:2:3::2"), "a neighbour in the same /64 is another source"
    assert limit.allow("10.0.0.2"), "IPv4 per address"
    assert [limit.allow("::ffff:10.0.0.1"), limit.allow("10.0.0.1"), limit.allow("10.0.0.1")] == [True] * 3
    assert not limit.allow("::ffff:10.0.0.1"), "an IPv4-mapped address is its IPv4 address"
    for n in range(1, 101):
        limit.allow(f"fd00:1:2:3::{n:x}")
    assert len(limit._buckets) == 16, "at most max_sources buckets"


def test_settings_from_options() -> None:
    s = RegistrySettings.from_options(30, "loopback", "+1000")
    assert (s.grace, s.check_interval, s.metrics_rule and s.metrics_rule.offset) == (30, 5.0, 1000)
    assert RegistrySettings.from_options(2).check_interval == 0.5
    with pytest.raises(UsageError, match="--registry-grace"):
        RegistrySettings.from_options(-1)
    with pytest.raises(UsageError, match="--registry-targets"):
        RegistrySettings.from_options(30, "10.0.0.0/99")


def test_parse_body_keeps_what_get_registered_shows() -> None:
    reg = parse_body({**BODY, "rdma_ports": [8200, "8201"], "device_ids": [0, 1.0], "version": "v1", "tp_size": 2,
                      "host_ip": "http://10.0.0.7"})
    assert reg.host_ip == H  # instance.go isValidIP strips a scheme
    assert reg.info["rdma_ports"] == ["8200", "8201"] and reg.info["device_ids"] == ["0", "1"]
    assert (reg.info["version"], reg.info["tp_size"], reg.info["is_paused"]) == ("v1", 2, False)
    with pytest.raises(BodyError, match="at most"):
        parse_body({**BODY, "device_ids": list(range(1000))})


def test_a_heartbeat_between_judgement_and_removal_keeps_the_instance(tmp_path: Path) -> None:
    """check() judges outside the file lock; a heartbeat that lands before the removal wins."""
    env = Env(tmp_path, grace=10)
    assert env.reg.register({**BODY, "metrics_port": 9001}, H) == OK
    key = (H, 8001)
    judged = env.reg.live.seen[key]
    env.clock.t += 11
    assert env.reg.register({**BODY, "metrics_port": 9001}, H) == OK  # the heartbeat
    assert env.reg._remove({key: ("no heartbeat", judged)}) == [] and len(env.instances()) == 1
    assert env.reg._remove({key: ("listed elsewhere", None)}) == [instance_name(H, 8001)]


def test_the_register_loop_fixture_is_fastdeploys(monkeypatch: pytest.MonkeyPatch) -> None:
    """tests/fixtures/fastdeploy_register.py: the host is gethostbyname(gethostname()) (utils.py get_host_ip),
    the router URL gets http:// (config.py RouterConfig), and the 2.x body is config.py's register_info
    (@ acfda944) as tests/fixtures/upstream/fastdeploy-register-body.json reconstructs it."""
    from tests.fixtures import fastdeploy_register as fx

    monkeypatch.setattr(socket, "gethostname", lambda: "node7")
    monkeypatch.setattr(socket, "gethostbyname", lambda name: {"node7": "127.0.1.1"}[name])
    assert fx.get_host_ip() == "127.0.1.1"
    assert fx.router_url("10.0.0.1:9500") == "http://10.0.0.1:9500"
    assert fx.router_url("http://r:1") == "http://r:1"
    args = fx.argparse.Namespace(role="mixed", port=8180, engine_worker_queue_port=8182, device_ids="0",
                                 body="2.x", metrics_port=None)
    body = {**fx.register_info(args, "10.0.0.5"), "is_paused": False, "version": None, "connected_decodes": []}
    assert body == UPSTREAM and list(body) == list(UPSTREAM)
    develop = fx.register_info(fx.argparse.Namespace(**{**vars(args), "body": "develop", "metrics_port": 9180}), "h")
    assert (develop["metrics_port"], develop["tp_size"]) == (9180, 1)


# -- an outside security review: H3 (size and count caps), M1 (names of loopback), metrics order, names ------


def _body(port: int, **change: Any) -> dict[str, Any]:
    return {**BODY, "port": port, "metrics_port": 9001, **change}


def test_stored_info_over_4_kib_is_refused_before_any_probe(tmp_path: Path) -> None:
    """H3: rdma_ports and device_ids of 256 strings of 128 characters stored ~70 KB per registration; ~230 of
    them took the file past inventory.MAX_BYTES and wedged every later load. Now what one registration
    stores (the JSON of its FastDeploy fields) is at most 4 KiB: 400 with the reason, nothing written."""
    env = Env(tmp_path)
    before = env.path.read_bytes()
    status, doc = env.reg.register(_body(8001, device_ids=["d" * 128] * 40), H)
    assert status == 400 and str(MAX_INFO_BYTES) in doc["msg"] and "device_ids" in doc["msg"], doc
    assert "\n" not in doc["msg"] and len(doc["msg"]) < 300
    assert env.path.read_bytes() == before and env.probe.calls == []


def test_a_real_8_gpu_registration_is_far_under_the_info_cap(tmp_path: Path) -> None:
    env = Env(tmp_path)
    body = _body(8001, device_ids=[str(i) for i in range(8)], rdma_ports=[str(8200 + i) for i in range(8)],
                 transfer_protocol=["ipc", "rdma"], connector_port=8300, version="2.5.0", tp_size=8)
    assert env.reg.register(body, H) == OK
    [inst] = env.instances()
    assert len(json.dumps(inst["fastdeploy"])) < 400 < MAX_INFO_BYTES


def test_lists_of_one_instance_are_capped_at_64() -> None:
    assert MAX_LIST <= 64
    parse_body({**BODY, "device_ids": list(range(MAX_LIST))})
    for field in ("device_ids", "rdma_ports", "transfer_protocol"):
        with pytest.raises(BodyError, match=f"invalid {field}: .*at most {MAX_LIST}"):
            parse_body({**BODY, field: ["ipc"] * (MAX_LIST + 1)})


def test_a_full_registry_refuses_new_instances_and_keeps_heartbeats(tmp_path: Path,
                                                                   caplog: pytest.LogCaptureFixture) -> None:
    """H3: --registry-max-instances. A NEW registration beyond it is refused with 507 (the file has no room:
    not the caller's rate, not its health); every registered instance keeps heart-beating; one WARNING while
    full; room made by a removal takes the next one."""
    env = Env(tmp_path, grace=30, max_instances=3)
    for port in (8001, 8002, 8003):
        assert env.reg.register(_body(port), H) == OK
    before = env.path.read_bytes()
    with caplog.at_level(logging.WARNING, logger="fdngx.registry"):
        for _ in range(3):
            status, doc = env.reg.register(_body(8004), H)
            assert status == 507 and "--registry-max-instances 3" in doc["msg"], doc
        for port in (8001, 8002, 8003):  # heartbeats of registered instances: still 200, nothing written
            env.clock.t += 1
            assert env.reg.register(_body(port), H) == OK
    assert env.path.read_bytes() == before
    assert ("health", H, 8004) not in env.probe.calls  # refused before fdngx contacts it
    full = [r for r in caplog.records if r.levelno == logging.WARNING and "full" in r.getMessage()]
    assert len(full) == 1 and "--registry-max-instances" in full[0].getMessage()
    env.clock.t += 29
    assert env.reg.register(_body(8002), H) == OK and env.reg.register(_body(8003), H) == OK
    env.clock.t += 2
    assert env.reg.check(health=False) == [instance_name(H, 8001)]  # 8001 fell silent: room for one
    assert env.reg.register(_body(8004), H) == OK
    assert sorted(i["port"] for i in env.instances()) == [8002, 8003, 8004]


def test_hand_written_entries_do_not_count_against_max_instances(tmp_path: Path) -> None:
    write_inv(tmp_path / "fdngx.json", [{"name": f"dp{n}", "host": "127.0.0.1", "port": 7000 + n} for n in range(3)])
    env = Env(tmp_path, max_instances=1)
    assert env.reg.register(_body(8001), H) == OK
    assert env.reg.register(_body(8002), H)[0] == 507


def test_max_instances_is_checked_under_the_lock(tmp_path: Path) -> None:
    """Registrations racing past the early check are still held to the cap where the file is written."""
    env = Env(tmp_path, max_instances=4)
    results: list[int] = []
    threads = [threading.Thread(target=lambda p=p: results.append(env.reg.register(_body(p), H)[0]))
               for p in range(8001, 8017)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(results) == [200] * 4 + [507] * 12 and len(env.instances()) == 4


@pytest.mark.parametrize("bad", [0, -1])
def test_max_instances_must_be_at_least_one(bad: int) -> None:
    with pytest.raises(UsageError, match=f"--registry-max-instances {bad}: "):
        RegistrySettings.from_options(30, max_instances=bad)
    assert RegistrySettings.from_options(30).max_instances == DEFAULT_MAX_INSTANCES == 1024


def test_sidecar_refuses_a_zero_max_instances_before_touching_the_inventory(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from fdngx.cli import app

    inv = tmp_path / "registered.json"
    result = CliRunner().invoke(app, ["sidecar", "-i", str(inv), "--out", str(tmp_path / "nginx.conf"),
                                      "--no-reload", "--registry-listen", "127.0.0.1:0",
                                      "--registry-max-instances", "0", "--metrics-listen", "off"])
    assert isinstance(result.exception, UsageError), result.output
    assert "--registry-max-instances 0" in str(result.exception) and "\n" not in str(result.exception)
    assert not inv.exists()


@pytest.mark.parametrize(("option", "value"), [("--registry-allow", "10.0.0.0/99"), ("--registry-listen", "nope")])
def test_sidecar_refuses_a_bad_registry_server_option_before_touching_the_inventory(
    tmp_path: Path, option: str, value: str
) -> None:
    from typer.testing import CliRunner

    from fdngx.cli import app

    inv = tmp_path / "registered.json"
    args = {"--registry-listen": "127.0.0.1:0", "--registry-allow": "loopback", option: value}
    result = CliRunner().invoke(app, ["sidecar", "-i", str(inv), "--out", str(tmp_path / "nginx.conf"), "--no-reload",
                                      "--metrics-listen", "off", *(t for kv in args.items() for t in kv)])
    assert isinstance(result.exception, UsageError) and option in str(result.exception), result.output
    assert not inv.exists()


def test_a_name_registered_before_is_dropped_when_the_instance_registers_by_address(tmp_path: Path) -> None:
    env = Env(tmp_path, names={"replica-a.example": ["10.0.0.21"]})
    assert env.reg.register({**BODY, "host_ip": "replica-a.example", "metrics_port": 9001}, H) == OK
    assert env.reg.register({**BODY, "host_ip": "10.0.0.21", "metrics_port": 9001}, H) == OK
    [inst] = env.instances()
    assert inst["host"] == "10.0.0.21" and "registered_as" not in inst


def test_save_refuses_a_file_load_would_refuse(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """H3 (c): inventory.save never writes what inventory.load refuses for its size: InventoryError naming
    the file and the limit, nothing written, the old file intact, no temp file left."""
    path = write_inv(tmp_path / "fdngx.json", [{"name": "dp0", "host": "127.0.0.1", "port": 8001}])
    before = path.read_bytes()
    big = inv_mod.Inventory([inv_mod.parse_instance({"name": f"dp{n}", "host": "127.0.0.1", "port": 8001 + n},
                                                    "x", n) for n in range(100)], "fastdeploy")
    monkeypatch.setattr(inv_mod, "MAX_BYTES", 4096)
    with pytest.raises(inv_mod.InventoryError, match=rf"{path}: not written: .* over the 4096-byte limit"):
        inv_mod.save(big, path)
    assert path.read_bytes() == before and sorted(os.listdir(tmp_path)) == ["fdngx.json"]
    small = inv_mod.Inventory(big.instances[:3], "fastdeploy")
    inv_mod.save(small, path)
    assert len(inv_mod.load(path).instances) == 3


def test_the_registry_never_writes_a_file_it_cannot_load(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """H3: the file limit reached (a small MAX_BYTES stands in for 16 MiB): the registration that would pass
    it is refused (507, one line, the limit named), never a 500; the file still loads, heartbeats still
    answer 200 and the periodic check still runs."""
    env = Env(tmp_path)
    assert env.reg.register(_body(8001), H) == OK
    monkeypatch.setattr(inv_mod, "MAX_BYTES", env.path.stat().st_size * 3)
    answers = [env.reg.register(_body(port), H) for port in range(8002, 8012)]
    assert {status for status, _ in answers} == {200, 507}, answers
    refused = next(doc for status, doc in answers if status == 507)
    assert f"{inv_mod.MAX_BYTES}-byte limit" in refused["msg"] and "\n" not in refused["msg"]
    assert str(tmp_path) not in refused["msg"] and "fdngx.json" not in refused["msg"], refused  # no server path
    assert env.path.stat().st_size <= inv_mod.MAX_BYTES
    registered = len(inv_mod.load(env.path).instances)
    assert 2 <= registered < 11
    assert env.reg.register(_body(8001), H) == OK and env.reg.check() == []


def test_the_default_caps_keep_the_worst_case_file_under_max_bytes() -> None:
    """H3: with the default caps the registry's file can never pass inventory.MAX_BYTES, whatever the
    bodies: --registry-max-instances entries, each at most its longest fields plus MAX_INFO_BYTES of
    compact FastDeploy info, which the file's indent=2 grows by at most a newline and an indent per item."""
    longest = {"name": "n" * 128, "host": "f" * 45, "port": 65535, "metrics_port": 65535, "engine": "fastdeploy",
               "role": "mixed", "registered": True, "metrics_source": "api-port-suspect", "fastdeploy": {},
               "registered_as": "a" * 253}
    empty = json.dumps({"version": 1, "upstream": "u" * 64, "instances": []}, indent=2) + "\n"
    one = json.dumps({"version": 1, "upstream": "u" * 64, "instances": [longest]}, indent=2) + "\n"
    deepest = 10  # a list element of "fastdeploy", in an instance, in "instances"
    keys = 8  # connector_port, engine_worker_queue_port, transfer_protocol, rdma_ports, device_ids, version, ...
    items = 3 * MAX_LIST + keys + 4  # list elements, keys, closing brackets
    info = MAX_INFO_BYTES + items * (1 + deepest) + keys  # + a space after each ':'
    entry = len(one) - len(empty) + info + len(",\n    ")
    worst = len(empty) + DEFAULT_MAX_INSTANCES * entry
    assert worst < inv_mod.MAX_BYTES // 2, (worst, inv_mod.MAX_BYTES)
    # The bound holds for the registration that packs the most items into the info cap.
    reg = parse_body({**BODY, "device_ids": [0] * MAX_LIST, "rdma_ports": [0] * MAX_LIST,
                      "transfer_protocol": ["ipc"] * MAX_LIST, "version": "v" * 128, "tp_size": 65536,
                      "connector_port": "c" * 128, "engine_worker_queue_port": "e" * 128})
    text = inv_mod.to_json(inv_mod.Inventory([inv_mod.parse_instance(
        {**longest, "name": "n", "host": "10.0.0.7", "fastdeploy": reg.info}, "x", 0)], "u" * 64))
    assert len(text) - len(empty) <= entry


# Strings of any length up to the cap and past it, of any character (an astral one is 12 bytes of JSON), and
# lists of any length up to the cap and past it: sizes spread over the whole range, not only small ones.
texts = st.text(st.characters(codec="utf-8"), max_size=8) | st.builds(
    lambda c, n: c * n, st.characters(codec="utf-8"), st.integers(0, MAX_TEXT + 2))
elements = texts | st.integers(-2**40, 2**40)
hostile_lists = st.lists(elements, max_size=8) | st.builds(lambda e, n: [e] * n, elements, st.integers(0, MAX_LIST + 2))


@settings(max_examples=200, deadline=None, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ids=hostile_lists, ports=hostile_lists, version=texts)
def test_hostile_info_is_stored_within_the_cap_or_refused(tmp_path: Path, ids: list[Any], ports: list[Any],
                                                         version: str) -> None:
    """Property (H3): whatever the lists and strings (escapes, astral characters), a registration is 200 with
    at most MAX_INFO_BYTES of info stored, or 400; the file always loads."""
    env = Env(tmp_path)
    status, doc = env.reg.register(_body(8001, device_ids=ids, rdma_ports=ports, version=version), H)
    assert status in (200, 400), doc
    stored = env.instances()
    if status == 200:
        assert len(json.dumps(stored[0]["fastdeploy"], separators=(",", ":"))) <= MAX_INFO_BYTES
    inv_mod.load(env.path)


# -- string fields: stored as sent, or 400 naming the field; never cut, dropped, or unencodable in the file --


def _strings(value: Any) -> Iterator[str]:
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for k, v in value.items():
            yield k
            yield from _strings(v)
    elif isinstance(value, list):
        for v in value:
            yield from _strings(v)


def assert_clean_file(path: Path) -> None:
    """The file is UTF-8 and every string in it is text UTF-8 can encode (no "\\ud800" escape either)."""
    for text in _strings(json.loads(path.read_bytes().decode("utf-8"))):
        text.encode("utf-8")


def test_a_version_of_any_length_is_stored_whole(tmp_path: Path) -> None:
    """Neither FastDeploy router reads `version` (no field of the Go router's InstanceInfo; the Python router's
    from_dict takes its own fields only), so neither limits it. fdngx dropped one over 128 characters and
    answered 200 (and one that was no string too); now it is kept as sent, within the 4 KiB of FastDeploy
    fields one registration may store."""
    env = Env(tmp_path)
    long = "2.5.0+" + "0123456789abcdef" * 20  # 326 characters
    assert env.reg.register({**BODY, "version": long}, H) == OK
    assert env.instances()[0]["fastdeploy"]["version"] == long
    assert env.reg.register({**BODY, "version": 3}, H) == OK  # ModelConfig takes version from config.json too
    assert env.instances()[0]["fastdeploy"]["version"] == 3


@pytest.mark.parametrize(("change", "needles"), [
    ({"version": "v" * MAX_INFO_BYTES}, ("version", f"{MAX_INFO_BYTES}-byte limit")),
    ({"version": ["2.5.0"]}, ("invalid version", "a string or a number")),
    ({"version": True}, ("invalid version", "a string or a number")),
    ({"connector_port": "1" * (MAX_TEXT + 1)}, ("invalid connector_port", f"{MAX_TEXT + 1} characters",
                                                f"limit of {MAX_TEXT}")),
    ({"engine_worker_queue_port": "1" * 200}, ("invalid engine_worker_queue_port", "200 characters",
                                               f"limit of {MAX_TEXT}")),
    ({"device_ids": ["0", "d" * (MAX_TEXT + 1)]}, ("invalid device_ids: element 1", f"limit of {MAX_TEXT}")),
    ({"rdma_ports": ["r" * 500]}, ("invalid rdma_ports: element 0", "500 characters", f"limit of {MAX_TEXT}")),
    ({"host_ip": "h" * 254}, ("invalid host_ip", "254 characters", "limit of 253")),
])
def test_a_string_over_its_limit_is_400_naming_the_field_and_the_limit(tmp_path: Path, change: dict[str, Any],
                                                                       needles: tuple[str, ...]) -> None:
    """Before: a version over 128 characters (or not a string) was dropped with a 200; a device id over 128 was
    "not an integer or a string", a long port "(an integer or a string)", a long host_ip just "invalid"."""
    env = Env(tmp_path)
    before = env.path.read_bytes()
    status, doc = env.reg.register({**BODY, **change}, H)
    assert status == 400 and all(n in doc["msg"] for n in needles) and "\n" not in doc["msg"], doc
    assert env.path.read_bytes() == before and env.probe.calls == []


@pytest.mark.parametrize("field", ["version", "connector_port", "engine_worker_queue_port", "device_ids",
                                   "rdma_ports", "host_ip"])
@pytest.mark.parametrize("lone", ["\ud800", "2.5\udfff", "\udbff\ud7ff"])
def test_a_lone_surrogate_in_a_string_field_is_400_naming_the_field(tmp_path: Path, field: str, lone: str) -> None:
    """JSON's "\\ud800" decodes to a lone surrogate, which no UTF-8 file can hold: the registry stored it (the
    file then carried an escape strict JSON readers refuse). Now: 400 naming the field, the file untouched."""
    env = Env(tmp_path)
    before = env.path.read_bytes()
    status, doc = env.reg.register({**BODY, field: [lone] if field in ("device_ids", "rdma_ports") else lone}, H)
    assert status == 400 and f"invalid {field}" in doc["msg"], doc
    doc["msg"].encode("utf-8")  # the answer itself is text
    assert env.path.read_bytes() == before
    assert_clean_file(env.path)


# Text of any character, lone surrogates included, short, or long past the limits (MAX_TEXT, and a version's
# MAX_INFO_BYTES when astral: 12 bytes of JSON each).
lone_or_not = st.characters(codec="utf-8") | st.characters(min_codepoint=0xD800, max_codepoint=0xDFFF)
hostile_texts = st.text(lone_or_not, max_size=6) | st.builds(
    lambda head, c, n: head + c * n, st.text(lone_or_not, max_size=2), st.characters(codec="utf-8"),
    st.integers(MAX_TEXT - 2, 400))


def _bad(text: str, limit: int | None) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return limit is not None and len(text) > limit


@settings(max_examples=300, deadline=None, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(version=hostile_texts | st.none(), connector=hostile_texts, queue=hostile_texts,
       ids=st.lists(hostile_texts, max_size=3), ports=st.lists(hostile_texts, max_size=3))
def test_string_fields_are_stored_as_sent_or_refused_naming_the_field(tmp_path: Path, version: str | None,
                                                                      connector: str, queue: str, ids: list[str],
                                                                      ports: list[str]) -> None:
    """Property: a registration is 200 with every string field stored exactly as sent, or 400 naming a field
    that is not text or is over its limit (or the 4 KiB cap); whatever was sent, the file holds only text."""
    sent = {"version": [version] if version is not None else [], "connector_port": [connector],
            "engine_worker_queue_port": [queue], "device_ids": ids, "rdma_ports": ports}
    bad = {name for name, values in sent.items() if any(_bad(v, None if name == "version" else MAX_TEXT)
                                                         for v in values)}
    env = Env(tmp_path)
    status, doc = env.reg.register(_body(8001, version=version, connector_port=connector,
                                         engine_worker_queue_port=queue, device_ids=ids, rdma_ports=ports), H)
    if status == 200:
        assert not bad, doc
        info = env.instances()[0]["fastdeploy"]
        assert (info.get("version"), info["connector_port"], info["engine_worker_queue_port"], info["device_ids"],
                info["rdma_ports"]) == (version, connector, queue, ids, ports)
    else:
        assert status == 400, doc
        assert any(f"invalid {name}" in doc["msg"] for name in bad) or (
            not bad and f"{MAX_INFO_BYTES}-byte limit" in doc["msg"]), (bad, doc)
    assert_clean_file(env.path)


@pytest.mark.parametrize(("name", "resolved"), [("localhost", "127.0.0.1"), ("ip6-localhost", "::1"),
                                                ("node7.example", "127.0.1.1"), ("mapped.example", "::ffff:127.0.0.1")])
def test_a_name_resolving_to_loopback_from_another_machine_uses_the_peer_address(tmp_path: Path, name: str,
                                                                                 resolved: str) -> None:
    """M1: `host_ip: "localhost"` from another machine resolved to 127.0.0.1 and was stored: a remote
    machine registered our own loopback. The loopback rule applies to the resolved address too."""
    env = Env(tmp_path, names={name: [resolved]})
    assert env.reg.register(_body(8001, host_ip=name), "10.0.0.9") == OK
    [inst] = env.instances()
    assert inst["host"] == "10.0.0.9" and "registered_as" not in inst  # the peer, not what the name means here
    assert {c[1] for c in env.probe.calls} == {"10.0.0.9"}
    # From this machine, the name means this machine: kept, with the name it was sent as.
    assert env.reg.register(_body(8002, host_ip=name), "127.0.0.1") == OK
    local = env.instances()[1]
    assert (local["host"], local["registered_as"]) == (str(canonical_ip(resolved)), name)


loopbacks = st.builds(lambda n: str(ipaddress.IPv4Address((127 << 24) + n)), st.integers(0, 2**24 - 1)) | \
    st.sampled_from(["::1", "0:0:0:0:0:0:0:1", "::ffff:127.0.0.1", "::ffff:127.9.9.9"])
peers = st.builds(lambda n: str(ipaddress.IPv4Address((10 << 24) + n)), st.integers(1, 2**24 - 2)) | \
    st.builds(lambda n: str(ipaddress.IPv6Address((0xfd << 120) + n)), st.integers(1, 2**64))


@settings(max_examples=100, deadline=None, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(loop=loopbacks, peer=peers, by_name=st.booleans())
def test_a_remote_peer_never_registers_a_loopback_address(tmp_path: Path, loop: str, peer: str,
                                                          by_name: bool) -> None:
    """Property (M1): whether host_ip is a loopback literal or a name resolving to one, a registration from a
    non-loopback peer is stored at the peer's address, never at a loopback address."""
    env = Env(Path(tempfile.mkdtemp(dir=tmp_path)), names={"me.example": [loop]})
    status, doc = env.reg.register(_body(8001, host_ip="me.example" if by_name else loop), peer)
    assert status == 200, doc
    [inst] = env.instances()
    assert inst["host"] == ipaddress.ip_address(peer).compressed
    assert not ipaddress.ip_address(inst["host"]).is_loopback


def test_the_api_ports_metrics_are_a_suspect_last_resort_said_once(tmp_path: Path,
                                                                   caplog: pytest.LogCaptureFixture) -> None:
    """reference/fastdeploy.md: "Always give each instance its own metrics port": without one, /metrics on
    the API port is answered by a forked web worker whose load gauges read 0. With no body metrics_port and
    no rule, the API port is still used when it serves /metrics, marked "api-port-suspect", with ONE
    WARNING per instance saying what to do."""
    env = Env(tmp_path)
    env.probe.metrics_of[(H, 8001)] = None
    env.probe.metrics_of[(H, 8002)] = None
    with caplog.at_level(logging.WARNING, logger="fdngx.registry"):
        for _ in range(4):
            assert env.reg.register(dict(BODY), H) == OK
            assert env.reg.register({**BODY, "port": 8002}, H) == OK
    got = {i["port"]: (i["metrics_port"], i["metrics_source"]) for i in env.instances()}
    assert got == {8001: (8001, "api-port-suspect"), 8002: (8002, "api-port-suspect")}
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 2, warnings
    for text, port in zip(warnings, (8001, 8002), strict=True):
        assert instance_name(H, port) in text and "may read 0" in text
        assert "--metrics-port" in text and "--registry-metrics-port" in text


@pytest.mark.parametrize(("source", "rule", "want"), [
    ("api-port", None, (8001, "api-port")), ("api-port", "+1000", (9001, "rule")),
    ("api-port-suspect", "+1000", (9001, "rule")), ("rule", None, (9001, "rule")), ("rule", "+1000", (9001, "rule")),
    ("body", "+1000", (9001, "rule")), ("none", None, (8001, "api-port-suspect")), ("none", "+1000", (9001, "rule")),
])
def test_metrics_sources_already_on_disk_keep_working(tmp_path: Path, caplog: pytest.LogCaptureFixture,
                                                      source: str, rule: str | None, want: tuple[int, str]) -> None:
    """Inventories written before: "api-port" is kept (and warned about once) unless a rule now gives a
    port; "rule" is kept; "none" (after a restart) and "body" without a body metrics_port are looked for
    again."""
    mp = {"api-port": 8001, "api-port-suspect": 8001, "rule": 9001, "body": 9500, "none": 8001}[source]
    write_inv(tmp_path / "fdngx.json", [{"name": "fd-old", "host": H, "port": 8001, "metrics_port": mp,
                                         "engine": "fastdeploy", "registered": True, "metrics_source": source,
                                         "fastdeploy": {}}])
    env = Env(tmp_path, rule=rule)
    env.probe.metrics_of[(H, 8001)] = None
    env.probe.metrics_of[(H, 9001)] = None
    with caplog.at_level(logging.WARNING, logger="fdngx.registry"):
        for _ in range(3):
            assert env.reg.register(dict(BODY), H) == OK
    [inst] = env.instances()
    assert ((inst["metrics_port"], inst["metrics_source"]), inst["name"]) == (want, "fd-old")
    suspect = [r for r in caplog.records if "may read 0" in r.getMessage()]
    assert len(suspect) == (1 if want[1].startswith("api-port") else 0)


def test_instance_names_are_injective_for_ipv6_and_unchanged_for_ipv4(tmp_path: Path) -> None:
    """The name was fd-{host with ':' as '.'}-{port} with '..' collapsed: fd00:1::2 and fd00::1:2 both
    became fd-fd00.1.2-8001, so the second was refused as a duplicate name."""
    assert instance_name("10.0.0.7", 8001) == "fd-10.0.0.7-8001"  # names already on disk stay what they are
    assert instance_name("127.0.0.1", 8180) == "fd-127.0.0.1-8180"
    assert instance_name("fd00:1::2", 8001) != instance_name("fd00::1:2", 8001)
    env = Env(tmp_path)
    assert env.reg.register(_body(8001, host_ip="fd00:1::2"), H) == OK
    assert env.reg.register(_body(8001, host_ip="fd00::1:2"), H) == OK
    assert len({i["name"] for i in env.instances()}) == 2


def test_a_registered_instance_keeps_the_name_it_has_on_disk(tmp_path: Path) -> None:
    """An entry written under the old naming (fd00:1::2 -> fd-fd00.1.2-8001) keeps its name on every
    heartbeat: the sidecar's state, logs and metrics follow it by name."""
    write_inv(tmp_path / "fdngx.json", [{"name": "fd-fd00.1.2-8001", "host": "fd00:1::2", "port": 8001,
                                         "metrics_port": 9001, "registered": True, "metrics_source": "body"}])
    env = Env(tmp_path)
    assert env.reg.register(_body(8001, host_ip="fd00:1::2", version="v2"), H) == OK
    [inst] = env.instances()
    assert (inst["name"], inst["fastdeploy"]["version"]) == ("fd-fd00.1.2-8001", "v2")


ips = st.builds(lambda n: ipaddress.IPv4Address(n), st.integers(0, 2**32 - 1)) | \
    st.builds(lambda n: ipaddress.IPv6Address(n), st.integers(0, 2**128 - 1)) | \
    st.builds(lambda a, b: ipaddress.IPv6Address((a << 64) + b), st.integers(0, 7), st.integers(0, 7)) | \
    st.builds(lambda n: ipaddress.IPv6Address((0xffff << 32) + n), st.integers(0, 2**32 - 1))  # IPv4-mapped


@settings(max_examples=500, deadline=None, database=None)
@given(a=ips, b=ips, pa=st.integers(1, 65535), pb=st.integers(1, 65535))
def test_instance_names_are_valid_and_injective(a: Any, b: Any, pa: int, pb: int) -> None:
    """Property: two addresses get one name exactly when they are one server (inventory.address_key:
    ::ffff:10.0.0.1 is 10.0.0.1), and every name is a valid inventory name."""
    na, nb = instance_name(a.compressed, pa), instance_name(b.compressed, pb)
    assert inv_mod.NAME.fullmatch(na) and inv_mod.NAME.fullmatch(nb)
    assert (na == nb) == (inv_mod.address_key(a.compressed, pa) == inv_mod.address_key(b.compressed, pb))


# -- --registry-targets peer (the hardened setting) ----------------------------------------------------------


def test_targets_peer_allows_only_the_address_the_registration_came_from(tmp_path: Path) -> None:
    env = Env(tmp_path, targets="peer")
    assert env.reg.register(_body(8001, host_ip="10.0.0.7"), "10.0.0.7") == OK
    assert env.reg.register(_body(8002, host_ip="127.0.1.1"), "10.0.0.9") == OK  # loopback claim: the peer
    status, doc = env.reg.register(_body(8003, host_ip="10.0.0.8"), "10.0.0.7")
    assert status == 403 and "--registry-targets peer" in doc["msg"] and "10.0.0.7" in doc["msg"], doc
    assert [i["host"] for i in env.instances()] == ["10.0.0.7", "10.0.0.9"]
    assert ("health", "10.0.0.8", 8003) not in env.probe.calls


def test_targets_peer_with_networks_needs_both(tmp_path: Path) -> None:
    env = Env(tmp_path, targets="peer,10.0.0.0/8")
    assert env.reg.register(_body(8001, host_ip="10.0.0.7"), "10.0.0.7") == OK
    assert env.reg.register(_body(8001, host_ip="192.168.1.5"), "192.168.1.5")[0] == 403
    assert env.reg.register(_body(8001, host_ip="10.0.0.8"), "10.0.0.7")[0] == 403


def test_peer_is_a_keyword_of_targets_only() -> None:
    assert RegistrySettings.from_options(30, "peer").targets.peer
    assert not RegistrySettings.from_options(30).targets.peer  # the default is unchanged
    with pytest.raises(UsageError, match="--registry-allow 'peer'"):
        Networks.parse("peer", "--registry-allow")


def test_a_heartbeat_that_changes_nothing_does_not_wait_for_the_inventory_lock(tmp_path: Path) -> None:
    """Every instance posts every 5 s: an unchanged heartbeat is answered from what it already read, without
    the lock and the whole-file load and compare under it (1,024 instances: ~200 heartbeats a second). A
    change still takes the lock."""
    from fdngx.system.files import file_lock

    env = Env(tmp_path, rule="+1000")
    assert env.reg.register(dict(BODY), H) == OK
    env.clock.t += 3
    with file_lock(inv_mod.lock_path(env.path), timeout=1):  # another writer (fdngx drain) holds it
        assert env.reg.register(dict(BODY), H) == OK  # before: waited for the lock (60 s) and answered 500
        assert env.reg.live.seen[inv_mod.address_key(H, 8001)] == env.clock.t
    assert env.reg.register({**BODY, "port": 8002}, H) == OK and len(env.instances()) == 2


def test_a_lookup_that_timed_out_while_queued_never_runs() -> None:
    """A slow DNS holds the resolver's two threads; a name queued behind them whose caller gave up (its
    registration answered "does not resolve") is not looked up later for nobody."""
    release = threading.Event()
    asked: list[str] = []

    def slow(name: str) -> list[str]:
        asked.append(name)
        release.wait(10)
        return ["10.0.0.9"]

    names = NameCache(slow, timeout=0.2)
    try:
        assert [names.resolve(n) for n in ("a.example", "b.example", "c.example")] == [[], [], []]
        release.set()
        names._pool.shutdown(wait=True)  # every job that was going to run has run
        assert sorted(asked) == ["a.example", "b.example"], asked
    finally:
        release.set()
        names.close()
