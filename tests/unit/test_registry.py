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
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from fdngx import inventory as inv_mod
from fdngx.errors import UsageError
from fdngx.registry.body import BodyError, parse_body
from fdngx.registry.core import Registry, RegistrySettings, instance_name
from fdngx.registry.rules import MetricsRule, NameCache, Networks, RateLimit

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
                 targets: str = "loopback,private", names: dict[str, list[str]] | None = None) -> None:
        self.path = tmp / "fdngx.json"
        self.probe = FakeProbe()
        self.clock = Clock()
        self.lookups: list[str] = []

        def resolver(name: str) -> list[str]:
            self.lookups.append(name)
            return (names or {}).get(name, [])

        settings = RegistrySettings.from_options(grace, targets, rule)
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
    assert (inst["metrics_port"], inst["metrics_source"]) == (8001, "api-port")


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


def test_heartbeats_write_nothing(tmp_path: Path) -> None:
    """FastDeploy posts every 5 s (register_manager.py); a heartbeat that changes nothing is no write (and
    so no sidecar reload), and probes the metrics no more."""
    env = Env(tmp_path, rule="+1000")
    assert env.reg.register(dict(BODY), H) == OK
    stamp = env.path.stat().st_mtime_ns
    metric_probes = sum(c[0] == "metrics" for c in env.probe.calls)
    for _ in range(20):
        assert env.reg.register(dict(BODY), H) == OK
    assert env.path.stat().st_mtime_ns == stamp
    assert sum(c[0] == "metrics" for c in env.probe.calls) == metric_probes


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


def test_silent_instance_leaves_after_the_grace_and_the_next_heartbeat_adds_it_back(tmp_path: Path) -> None:
    env = Env(tmp_path, grace=30)
    assert env.reg.register({**BODY, "metrics_port": 9001}, H) == OK
    env.clock.t += 29
    assert env.reg.check() == [] and len(env.instances()) == 1
    env.clock.t += 2
    assert env.reg.check() == [instance_name(H, 8001)] and env.instances() == []
    assert env.reg.register({**BODY, "metrics_port": 9001}, H) == OK
    assert len(env.instances()) == 1


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


def test_metrics_port_order_body_then_api_port_then_rule(tmp_path: Path) -> None:
    env = Env(tmp_path, rule="+1000")
    env.probe.metrics_of[(H, 8001)] = None  # this one serves /metrics on its API port
    assert env.reg.register(dict(BODY), H) == OK
    assert env.reg.register({**BODY, "port": 8002}, H) == OK  # this one does not (a separate metrics port)
    env.probe.metrics_of[(H, 9003)] = None
    assert env.reg.register({**BODY, "port": 8003, "metrics_port": 9999}, H) == OK  # the body says: no probe
    got = {i["port"]: (i["metrics_port"], i["metrics_source"]) for i in env.instances()}
    assert got == {8001: (8001, "api-port"), 8002: (9002, "rule"), 8003: (9999, "body")}
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
    assert env.instances()[0]["metrics_source"] == "api-port"


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
def test_an_address_of_another_inventory_file_is_refused_409(tmp_path: Path, listed: str, sent: str) -> None:
    """issue 10: registering an address already in another -i file answered success and then blocked every
    apply. Now 409 with the file and the name (canonical addresses compared), and the merged inventory
    still loads."""
    other = write_inv(tmp_path / "node2.json", [{"name": "dp0", "host": listed, "port": 8001}])
    env = Env(tmp_path, others=(other,))
    status, doc = env.reg.register({**BODY, "host_ip": sent}, "127.0.0.1")
    assert status == 409 and "node2.json" in doc["msg"] and "'dp0'" in doc["msg"], doc
    assert env.instances() == [] and env.probe.calls == []
    inv_mod.load_many([env.path, other])


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
    judged = env.reg._seen[key]
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
