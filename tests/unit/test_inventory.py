from __future__ import annotations

import json
from pathlib import Path

import pytest

from fdngx import inventory
from fdngx.errors import InventoryError


def inst(**kw: object) -> dict[str, object]:
    base: dict[str, object] = {"name": "dp0", "host": "127.0.0.1", "port": 8001, "metrics_port": 9001}
    base.update(kw)
    return base


def test_load_defaults_and_round_trip_keeps_unknown_fields(tmp_path: Path) -> None:
    src = tmp_path / "fdngx.json"
    src.write_text(
        json.dumps({"version": 1, "upstream": "llm", "cluster": "a", "instances": [inst(pid=1234, log="/tmp/dp0.log")]})
    )
    inv = inventory.load(src)
    i = inv.instances[0]
    assert (i.engine, i.weight, i.role, i.max_num_seqs) == ("fastdeploy", 1, "mixed", 64)
    assert i.extra == {"pid": 1234, "log": "/tmp/dp0.log"}
    out = tmp_path / "out.json"
    inventory.save(inv, out)
    again = json.loads(out.read_text())
    assert again["cluster"] == "a"
    assert again["instances"][0]["pid"] == 1234 and again["instances"][0]["log"] == "/tmp/dp0.log"
    assert inventory.load(out).to_dict() == inv.to_dict()


@pytest.mark.parametrize("host", ["127.0.0.1", "::1", "fe80::1", "node-1.example.com", "gpu7", "a.b.c."])
def test_valid_hosts(host: str) -> None:
    assert inventory.valid_host(host)


@pytest.mark.parametrize(
    "host",
    [
        "",
        " ",
        "a b",
        "127.0.0.1;",
        "x}",
        "x{",
        "h#1",
        "'h'",
        '"h"',
        "$host",
        "a\nb",
        "-bad",
        "bad-",
        "a..b",
        "127.0.0.1; include /etc/passwd",
        "x" * 64,
        "under_score",
    ],
)
def test_invalid_hosts_are_rejected_with_the_field_named(host: str) -> None:
    assert not inventory.valid_host(host)
    with pytest.raises(InventoryError, match=r"x\.json instance 'dp0': field 'host'"):
        inventory.parse_inventory({"instances": [inst(host=host)]}, "x.json")


@pytest.mark.parametrize(
    ("bad", "pattern"),
    [
        (inst(port=0), r"'dp0': field 'port' = 0 is out of range 1..65535"),
        (inst(port=70000), r"field 'port' = 70000 is out of range"),
        (inst(port="80"), r"field 'port' must be an integer"),
        (inst(port=True), r"field 'port' must be an integer"),
        (inst(metrics_port=0), r"field 'metrics_port' = 0"),
        (inst(engine="tgi"), r"field 'engine' = \"tgi\" is not one of"),
        (inst(weight=0), r"field 'weight' = 0 is out of range"),
        (inst(max_num_seqs=-1), r"field 'max_num_seqs' = -1"),
        (inst(role="boss"), r"field 'role'"),
        (inst(name="dp 0"), r"field 'name'"),
        ({"name": "dp0", "port": 8001}, r"x.json instance 'dp0': missing field 'host'"),
        ({"port": 8001}, r"x.json instance #0: missing field 'host'"),
        ({"name": "dp0", "host": "h"}, r"missing field 'port'"),
        ("dp0", r"an instance must be a JSON object"),
    ],
)
def test_bad_instances(bad: object, pattern: str) -> None:
    with pytest.raises(InventoryError, match=pattern):
        inventory.parse_inventory({"instances": [bad]}, "x.json")


def test_duplicates_and_document_errors() -> None:
    with pytest.raises(InventoryError, match=r"127.0.0.1:8001 is already listed as 'dp0'"):
        inventory.parse_inventory({"instances": [inst(), inst(name="dp1", metrics_port=9002)]}, "x.json")
    with pytest.raises(InventoryError, match=r"the name is used twice"):
        inventory.parse_inventory({"instances": [inst(), inst(port=8002)]}, "x.json")
    with pytest.raises(InventoryError, match=r"missing field 'instances'"):
        inventory.parse_inventory({"version": 1}, "x.json")
    with pytest.raises(InventoryError, match=r"field 'version' = 2"):
        inventory.parse_inventory({"version": 2, "instances": []}, "x.json")
    with pytest.raises(InventoryError, match=r"field 'upstream'"):
        inventory.parse_inventory({"upstream": "a b", "instances": []}, "x.json")


def test_bad_json_names_file_and_position(tmp_path: Path) -> None:
    p = tmp_path / "broken.json"
    p.write_text('{"instances": [\n  {"host": "h",}\n]}')
    with pytest.raises(InventoryError, match=r"broken.json: invalid JSON at line 2"):
        inventory.load(p)


def test_ipv6_address_is_bracketed() -> None:
    inv = inventory.parse_inventory({"instances": [inst(host="::1")]})
    assert inv.instances[0].address == "[::1]:8001"
    assert inv.instances[0].metrics_url == "http://[::1]:9001/metrics"


def test_merge_multi_node(tmp_path: Path) -> None:
    a = inventory.parse_inventory({"instances": [inst(name="a0", host="10.0.0.1")]}, "a.json")
    b = inventory.parse_inventory({"instances": [inst(name="b0", host="10.0.0.2")]}, "b.json")
    merged = inventory.merge([a, b])
    assert [i.name for i in merged.instances] == ["a0", "b0"]
    clash = inventory.parse_inventory({"instances": [inst(name="c0", host="10.0.0.1")]}, "c.json")
    with pytest.raises(InventoryError, match=r"a.json \+ c.json instance 'c0': 10.0.0.1:8001 is already listed"):
        inventory.merge([a, clash])
    other = inventory.parse_inventory({"upstream": "other", "instances": [inst(name="d0", port=1)]}, "d.json")
    with pytest.raises(InventoryError, match="different upstreams"):
        inventory.merge([a, other])


def test_an_ipv6_host_without_a_name_gets_a_valid_default_name() -> None:
    inv = inventory.parse_inventory({"version": 1, "instances": [{"host": "::1", "port": 8001}]}, "x.json")
    assert inv.instances[0].name == "ip6-1-8001" and inv.instances[0].address == "[::1]:8001"
