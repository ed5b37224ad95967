"""Hostile inventories (issue 10: code execution, validation gaps), through the real CLI.

Each is refused with one line naming the file (and the field), exit 1, no traceback, and nothing is
written: no config, no token, and no file the payload would create.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from tests.security.conftest import assert_refused, cli, write


def inventory(tmp: Path, instances: list[dict[str, Any]], **top: Any) -> Path:
    doc = {"version": 1, "upstream": "fastdeploy", **top, "instances": instances}
    return write(tmp / "fdngx.json", json.dumps(doc))


def one(host: str = "127.0.0.1", port: int = 8001, **fields: Any) -> dict[str, Any]:
    return {"name": "dp0", "host": host, "port": port, **fields}


def test_lua_code_in_an_ipv6_scope_id_never_reaches_the_openresty_config(tmp_path: Path) -> None:
    # The payload of issue 10 (no `/`: ipaddress takes anything but a `/` after `%`).
    host = '::1%"..(os.execute("id > PWNED") and "").."'
    inv = inventory(tmp_path, [one(host)])
    out = tmp_path / "conf" / "fdngx.conf"
    out.parent.mkdir()
    proc = cli("render", "-i", str(inv), "--flavor", "openresty", "--out", str(out), cwd=tmp_path)
    assert_refused(proc, str(inv), "host")
    assert not out.exists() and not (tmp_path / "PWNED").exists()


def test_ipv6_scope_id_with_a_semicolon_is_refused_in_the_nginx_flavor(tmp_path: Path) -> None:
    inv = inventory(tmp_path, [one("fe80::1%eth0;x")])
    assert_refused(cli("render", "-i", str(inv), "--out", "-"), str(inv), "host")


def test_trailing_newline_in_a_host_is_refused(tmp_path: Path) -> None:
    inv = inventory(tmp_path, [one("localhost\n")])
    assert_refused(cli("render", "-i", str(inv), "--out", "-"), str(inv), "host")


@pytest.mark.parametrize("host", ["999", "0x7f000001"])
def test_numeric_hosts_that_resolve_to_addresses_are_refused(tmp_path: Path, host: str) -> None:
    inv = inventory(tmp_path, [one(host)])
    assert_refused(cli("render", "-i", str(inv), "--out", "-"), str(inv), "host")


def test_version_true_is_refused(tmp_path: Path) -> None:
    inv = inventory(tmp_path, [one()], version=True)
    assert_refused(cli("render", "-i", str(inv), "--out", "-"), str(inv), "version")


def test_duplicate_ipv6_address_in_another_spelling_is_refused(tmp_path: Path) -> None:
    inv = inventory(tmp_path, [one("::1", name="a"), one("0:0::1", name="b")])
    assert_refused(cli("render", "-i", str(inv), "--out", "-"), str(inv), "already listed")


def test_duplicate_address_across_two_inventory_files_is_refused(tmp_path: Path) -> None:
    first = write(tmp_path / "a.json", json.dumps({"version": 1, "instances": [one("::1", name="a")]}))
    second = write(tmp_path / "b.json", json.dumps({"version": 1, "instances": [one("0::1", name="b")]}))
    assert_refused(cli("render", "-i", str(first), "-i", str(second), "--out", "-"), "already listed")


def test_a_100000_deep_json_is_a_one_line_error_not_a_traceback(tmp_path: Path) -> None:
    deep = '{"version": 1, "instances": [], "x": ' + "[" * 100_000 + "]" * 100_000 + "}"
    inv = write(tmp_path / "fdngx.json", deep)
    assert_refused(cli("render", "-i", str(inv), "--out", "-"), str(inv))


def test_a_number_too_long_for_int_is_named_where_it_is(tmp_path: Path) -> None:
    # json.loads raises a bare ValueError past 4,300 digits (Python's int() limit): say where, not "ValueError".
    doc = json.dumps({"version": 1, "instances": [one()]}, indent=1).replace('"port": 8001', '"port": ' + "9" * 5000)
    inv = write(tmp_path / "fdngx.json", doc)
    line = doc[: doc.index("9" * 5000)].count("\n") + 1
    assert_refused(cli("render", "-i", str(inv), "--out", "-"), str(inv), f"a number of 5000 digits at line {line}")


def test_an_inventory_that_is_a_fifo_neither_hangs_nor_keeps_the_lock(tmp_path: Path) -> None:
    fifo = tmp_path / "fdngx.json"
    os.mkfifo(fifo)
    out = tmp_path / "fdngx.conf"
    t0 = time.monotonic()
    try:
        proc = cli("render", "-i", str(fifo), "--out", str(out), timeout=20)
    except subprocess.TimeoutExpired:
        pytest.fail("fdngx hung reading a FIFO as its inventory")
    assert_refused(proc, str(fifo))
    assert time.monotonic() - t0 < 20
    # Nothing holds the lock: a good inventory renders right after.
    fifo.unlink()
    inventory(tmp_path, [one()])
    ok = cli("render", "-i", str(fifo), "--out", str(out), timeout=30)
    assert ok.returncode == 0, ok.stderr
    assert "server 127.0.0.1:8001" in out.read_text()


# -- the same rules, in process (the loader the CLI calls; one CLI case of each kind is above) ---------


def _refused(path: Path, *words: str) -> str:
    from fdngx.errors import InventoryError
    from fdngx.inventory import load

    with pytest.raises(InventoryError) as info:
        load(path)
    msg = str(info.value)
    assert "\n" not in msg and str(path) in msg and all(w in msg for w in words), msg
    return msg


@pytest.mark.parametrize("field", ["name", "host", "upstream"])
def test_trailing_newline_passes_no_pattern(tmp_path: Path, field: str) -> None:
    inst = one("localhost")
    top: dict[str, Any] = {}
    if field == "upstream":
        top["upstream"] = "fastdeploy\n"
    else:
        inst[field] = inst[field] + "\n"
    _refused(inventory(tmp_path, [inst], **top), field)


@pytest.mark.parametrize("host", ["999", "0x7f000001", "127.1", "1.0x7f", "0177.0.0.1", "0x7f.1", "0X7F000001."])
def test_numeric_host_spellings_are_refused(tmp_path: Path, host: str) -> None:
    _refused(inventory(tmp_path, [one(host)]), "host")


@pytest.mark.parametrize("version", [True, 1.0, "1", 2, None])
def test_version_must_be_the_integer_1(tmp_path: Path, version: Any) -> None:
    _refused(inventory(tmp_path, [one()], version=version), "version")


@pytest.mark.parametrize("a, b", [
    ("::1", "0:0::1"),
    ("127.0.0.1", "::ffff:127.0.0.1"),
    ("localhost", "localhost."),
    ("LocalHost", "localhost"),
    ("::1", "0000:0000:0000:0000:0000:0000:0000:0001"),
])
def test_duplicate_addresses_are_found_in_canonical_form(tmp_path: Path, a: str, b: str) -> None:
    _refused(inventory(tmp_path, [one(a, name="a"), one(b, name="b")]), "already listed")


def test_deep_but_parseable_unknown_field_is_refused(tmp_path: Path) -> None:
    # Within Python's recursion limit, so json.loads succeeds: the nesting cap refuses it.
    deep = {"version": 1, "instances": [one()], "x": json.loads("[" * 200 + "]" * 200)}
    _refused(write(tmp_path / "fdngx.json", json.dumps(deep)), "nested")


def test_an_inventory_symlinked_to_dev_zero_is_refused(tmp_path: Path) -> None:
    inv = tmp_path / "fdngx.json"
    inv.symlink_to("/dev/zero")
    _refused(inv)


def test_an_oversized_inventory_is_refused(tmp_path: Path) -> None:
    doc = {"version": 1, "instances": [one()], "pad": "x" * (17 << 20)}
    _refused(write(tmp_path / "fdngx.json", json.dumps(doc)))


@pytest.mark.parametrize("field, value", [
    ("port", True), ("port", 0), ("port", 65536), ("port", "8001"), ("port", 8001.0),
    ("metrics_port", -1), ("weight", 10**30), ("weight", 0), ("max_num_seqs", 1e308),
    ("engine", "fastdeploy;"), ("role", "mixed\n"), ("name", "dp0 backup"), ("name", "dp0;#"),
    ("host", "127.0.0.1 backup"), ("host", "[::1]"), ("host", "a_b.example"), ("host", "xn--\u00e9.com"),
    ("host", "fe80::1%eth0"), ("host", "10.0.0.1; include /etc/passwd"),
])
def test_hostile_field_values_are_refused_naming_the_field(tmp_path: Path, field: str, value: Any) -> None:
    inst = {**one("localhost"), field: value}
    _refused(inventory(tmp_path, [inst]), field)
