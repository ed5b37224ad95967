from __future__ import annotations

import json
from pathlib import Path

from fdngx.weights.registry import Registry, instance_name

BODY = {"role": "mixed", "host_ip": "10.0.0.7", "port": 8001, "metrics_port": 9001, "connector_port": 0,
        "rdma_ports": [], "engine_worker_queue_port": 8600, "device_ids": [0], "transfer_protocol": ["ipc"],
        "tp_size": 1, "is_paused": False, "version": "2.5", "connected_decodes": []}


def test_registration_adds_once_and_heartbeats_write_nothing(tmp_path: Path) -> None:
    inv = tmp_path / "fdngx.json"
    reg = Registry(inv)
    assert json.loads(inv.read_text())["instances"] == []
    assert reg.register(BODY, "10.0.0.7") == (200, {"status": "success", "code": 200, "msg": "Register success"})
    doc = json.loads(inv.read_text())
    [inst] = doc["instances"]
    assert (inst["host"], inst["port"], inst["metrics_port"], inst["engine"]) == ("10.0.0.7", 8001, 9001, "fastdeploy")
    assert inst["name"] == instance_name("10.0.0.7", 8001) and inst["registered"] is True
    stamp = inv.stat().st_mtime_ns
    for _ in range(20):  # a build that re-posts in a tight loop
        assert reg.register(BODY, "10.0.0.7")[0] == 200
    assert inv.stat().st_mtime_ns == stamp
    assert reg.registered_number() == {"mixed": 1, "prefill": 0, "decode": 0}


def test_metrics_port_defaults_to_port_and_changes_are_applied(tmp_path: Path) -> None:
    reg = Registry(tmp_path / "fdngx.json")
    body = {k: v for k, v in BODY.items() if k != "metrics_port"}
    reg.register(body, "10.0.0.7")
    assert reg.registered()[0]["metrics_port"] == 8001
    reg.register({**body, "metrics_port": 9100, "role": "decode"}, "10.0.0.7")
    [inst] = reg.registered()
    assert (inst["metrics_port"], inst["role"]) == (9100, "decode")


def test_loopback_claim_from_another_machine_uses_the_peer_address(tmp_path: Path) -> None:
    reg = Registry(tmp_path / "fdngx.json")
    reg.register({**BODY, "host_ip": "127.0.1.1"}, "10.0.0.9")
    assert reg.registered()[0]["host"] == "10.0.0.9"
    reg.register({**BODY, "host_ip": "127.0.0.1", "port": 8002}, "127.0.0.1")
    assert reg.registered()[1]["host"] == "127.0.0.1"


def test_bad_registrations_are_400_and_change_nothing(tmp_path: Path) -> None:
    inv = tmp_path / "fdngx.json"
    reg = Registry(inv)
    before = inv.read_bytes()
    for body, needle in [
        ([1, 2], "JSON object"),
        ({"port": 8001}, "'host_ip'"),
        ({**BODY, "host_ip": "10.0.0.1; include /etc/passwd"}, "field 'host'"),
        ({**BODY, "port": 70000}, "out of range"),
        ({**BODY, "role": "boss"}, "field 'role'"),
    ]:
        status, answer = reg.register(body, "10.0.0.1")
        assert status == 400 and needle in answer["detail"], answer
    assert inv.read_bytes() == before
