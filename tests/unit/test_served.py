"""fdngx.nginx.served reads back what a config fdngx rendered gives nginx: every mode's server lines (weight,
`backup`, `down`), an empty fleet's placeholder, the OpenResty flavor (no weights in the file), and files it
must not trust (missing, hand-written, empty, a server line it cannot read, another upstream's name)."""

from __future__ import annotations

from pathlib import Path

import pytest

from fdngx import inventory
from fdngx.domain import Flavor, ServerState
from fdngx.nginx import served
from fdngx.nginx.render import RenderOptions, render
from fdngx.nginx.served import Kind, Server

STATES = {"dp0": ServerState(weight=3, backup=True), "dp1": ServerState(weight=28), "dp2": ServerState(5, down=True)}


def fleet(*hosts: str) -> inventory.Inventory:
    return inventory.parse_inventory({"version": 1, "upstream": "fastdeploy", "instances": [
        {"name": f"dp{i}", "host": h, "port": 8001 + i, "metrics_port": 9001 + i, "weight": 2 if i == 1 else 1}
        for i, h in enumerate(hosts)]})


def written(tmp_path: Path, text: str) -> Path:
    out = tmp_path / "fdngx.conf"
    out.write_text(text)
    return out


@pytest.mark.parametrize("mode", ["upstream", "site", "standalone"])
def test_each_mode_reads_back_the_weights_backup_and_down_it_rendered(tmp_path: Path, mode: str) -> None:
    inv = fleet("127.0.0.1", "127.0.0.1", "::1")
    opts = RenderOptions(mode=mode, listen="0.0.0.0:18080")
    got = served.read(written(tmp_path, render(inv, opts, STATES)), "fastdeploy")
    assert got.kind is Kind.WEIGHTS, got
    assert dict(got.servers) == {"dp0": Server("127.0.0.1:8001", 3, backup=True), "dp1": Server("127.0.0.1:8002", 28),
                                 "dp2": Server("[::1]:8003", 5, down=True)}
    assert got.generation and got.written_at is not None
    # site/standalone answer GET /fdngx/generation on their listener (a wildcard reached on loopback)
    assert got.verify_url == (None if mode == "upstream" else "http://127.0.0.1:18080/fdngx/generation")


def test_a_static_render_reads_back_the_inventorys_weights(tmp_path: Path) -> None:
    got = served.read(written(tmp_path, render(fleet("127.0.0.1", "127.0.0.1"), RenderOptions())), "fastdeploy")
    assert {n: (s.weight, s.down, s.backup) for n, s in got.servers.items()} == {"dp0": (1, False, False),
                                                                                  "dp1": (2, False, False)}


def test_an_empty_fleets_placeholder_is_no_replica(tmp_path: Path) -> None:
    text = render(fleet(), RenderOptions(allow_empty=True))
    assert "server 127.0.0.1:9 down;" in text
    got = served.read(written(tmp_path, text), "fastdeploy")
    assert got.kind is Kind.WEIGHTS and dict(got.servers) == {}


def test_the_openresty_flavor_keeps_no_weights_in_the_file(tmp_path: Path) -> None:
    opts = RenderOptions(flavor=Flavor.OPENRESTY, admin_token_file="/run/t", peers_file="/run/peers")
    got = served.read(written(tmp_path, render(fleet("127.0.0.1"), opts, STATES)), "fastdeploy")
    assert got.kind is Kind.OPENRESTY and dict(got.servers) == {}


def test_files_it_must_not_read_weights_from(tmp_path: Path) -> None:
    assert served.read(tmp_path / "none.conf", "fastdeploy").kind is Kind.MISSING
    hand = written(tmp_path, "upstream fastdeploy {\n    server 127.0.0.1:8001 weight=9;  # dp0\n}\n")
    assert served.read(hand, "fastdeploy").kind is Kind.FOREIGN  # no fdngx header: not parsed at all
    assert served.read(written(tmp_path, "\n"), "fastdeploy").kind is Kind.FOREIGN
    (tmp_path / "dir.conf").mkdir()
    unreadable = served.read(tmp_path / "dir.conf", "fastdeploy")
    assert unreadable.kind is Kind.UNREADABLE and "not a regular file" in str(unreadable.error)

    text = render(fleet("127.0.0.1", "127.0.0.1"), RenderOptions())
    bad = served.read(written(tmp_path, text.replace("weight=2 ", "weight=two ")), "fastdeploy")
    assert bad.kind is Kind.UNPARSED and "weight 'two' is not a weight" in str(bad.error), bad
    assert str(bad.error).startswith("line ")
    other = served.read(written(tmp_path, text), "vllm")  # the inventory's upstream was renamed since
    assert other.kind is Kind.UNPARSED and "no `upstream vllm {` block" in str(other.error), other
    twice = text.replace("# dp1", "# dp0")
    assert "a second server line for dp0" in str(served.read(written(tmp_path, twice), "fastdeploy").error)

