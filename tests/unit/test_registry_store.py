"""The registry's inventory reads and writes (fdngx.registry.store): parsed once per content, an outside
change always seen, its own writes serialised once and never parsed back."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from fdngx import inventory
from fdngx.domain import Inventory
from fdngx.errors import InventoryError
from fdngx.registry.store import CachedLoad, editing
from tests.support import edit_in_place

REPO = Path(inventory.__file__).resolve().parents[1]  # the fdngx under test, for another process


class Counts:
    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.parsed: list[str] = []
        self.reads = 0
        self.serialised = 0
        parse, read, to_json = inventory.parse_text, inventory.read, inventory.to_json

        def counted_read(path: str | Path) -> bytes:
            self.reads += 1
            return read(path)

        def counted_to_json(inv: Inventory) -> str:
            self.serialised += 1
            return to_json(inv)

        monkeypatch.setattr(inventory, "parse_text", lambda raw, where: self.parsed.append(where) or parse(raw, where))
        monkeypatch.setattr(inventory, "read", counted_read)
        monkeypatch.setattr(inventory, "to_json", counted_to_json)


def one(name: str, port: int, weight: int = 1) -> dict[str, object]:
    return {"name": name, "host": "10.0.0.7", "port": port, "weight": weight}


def test_cached_load_parses_once_per_content(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A settled file is told by its stat (not read); a file changed within RACY_SECONDS is read each time and
    parsed only when its bytes differ from those last parsed; a save (rename), an edit in place are seen."""
    path = tmp_path / "fdngx.json"
    inventory.save(Inventory([]), path)
    n = Counts(monkeypatch)
    now = [0.0]
    cached = CachedLoad(clock=lambda: now[0])

    def recent() -> None:
        now[0] = path.stat().st_mtime_ns / 1e9 + 0.5

    def settled() -> None:
        now[0] = path.stat().st_mtime_ns / 1e9 + 10

    recent()
    first = cached(path)
    assert cached(path) is first and cached(path) is first, "changed just now: read again, the same bytes"
    assert (n.reads, n.parsed) == (3, [str(path)])
    settled()
    assert cached(path) is first and (n.reads, len(n.parsed)) == (4, 1), "last read while recent: read again"
    assert cached(path) is first and cached(path) is first and n.reads == 4, "settled: not read at all"
    doc = json.loads(path.read_text())
    doc["instances"] = [one("dp0", 8001)]
    path.write_text(json.dumps(doc))  # in place: same inode, new size and mtime
    settled()
    assert [i.name for i in cached(path).instances] == ["dp0"] and len(n.parsed) == 2
    path.write_text(json.dumps(doc).replace("8001", "8002"))  # same size, in place
    settled()
    assert cached(path).instances[0].port == 8002 and len(n.parsed) == 3
    data = path.read_bytes()
    path.unlink()
    path.write_bytes(data)  # a new inode, the same bytes: read, not parsed
    recent()
    assert cached(path).instances[0].port == 8002 and len(n.parsed) == 3
    path.unlink()
    with pytest.raises(InventoryError, match="inventory file not found"):
        cached(path)


def test_a_file_that_keeps_changing_is_compared_not_parsed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The case heartbeats live in while any instance changes a field once a second: the file is never
    settled. Rewritten with the same bytes (a new inode each time, as fdngx writes), it is never parsed
    again; with other bytes, once per change."""
    path = tmp_path / "fdngx.json"
    inv = inventory.parse_inventory({"instances": [one("dp0", 8001)]}, str(path))
    inventory.save(inv, path)
    n = Counts(monkeypatch)
    cached = CachedLoad()
    first = cached(path)
    for _ in range(10):
        inventory.save(inv, path)
        assert cached(path) is first
    assert n.parsed == [str(path)]
    for port in (8002, 8003):
        inventory.save(inventory.parse_inventory({"instances": [one("dp0", port)]}, str(path)), path)
        assert cached(path).instances[0].port == port and cached(path).instances[0].port == port
    assert len(n.parsed) == 3


def test_an_edit_in_place_within_one_mtime_tick_is_seen(tmp_path: Path) -> None:
    """Another process edits the file in place and leaves device, inode, size and mtime_ns as they were
    (two edits within one tick of the kernel's clock): seen while the file is recent, and still seen after
    it settled with no read in between (a read while recent does not vouch for the file's stat later).
    Once read after settling, a later change shows in the stat (verify= reads the bytes anyway)."""
    path = tmp_path / "fdngx.json"
    inventory.save(inventory.parse_inventory({"instances": [one("dp0", 8001)]}, str(path)), path)
    mtime = path.stat().st_mtime_ns / 1e9
    now = [mtime + 0.5]
    cached = CachedLoad(clock=lambda: now[0])
    assert cached(path).instances[0].port == 8001
    edit_in_place(path, '"port": 8001', '"port": 8002')
    assert cached(path).instances[0].port == 8002, "recent: read and compared"
    edit_in_place(path, '"port": 8002', '"port": 8003')
    now[0] = mtime + 10  # settled, unread since the edit
    assert cached(path).instances[0].port == 8003, "settled, but last read while recent: read again"
    edit_in_place(path, '"port": 8003', '"port": 8004')  # only a writer setting the mtime back makes this
    assert cached(path).instances[0].port == 8003
    assert cached(path, verify=True).instances[0].port == 8004


def test_editing_serialises_once_and_parses_only_what_someone_else_wrote(tmp_path: Path,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """The registry's read-modify-write under the inventory lock: its own last write is compared, not parsed;
    a write by another process taking the same lock (as fdngx drain and fdngx launch do), or an edit in place
    that keeps the stat, is parsed and kept; a change is serialised once; no change writes nothing; an
    exception saves nothing and leaves the cache as it was."""
    path = tmp_path / "fdngx.json"
    inventory.save(inventory.parse_inventory({"instances": [one("dp0", 8001)]}, str(path)), path)
    cached = CachedLoad()
    n = Counts(monkeypatch)
    with editing(path, cached) as inv:
        inv.instances.append(inventory.parse_instance(one("dp1", 8002), "test", 1))
    assert (n.parsed, n.serialised) == ([str(path)], 1)
    with editing(path, cached) as inv:  # the registry's own last write: compared, not parsed
        inv.instances[1] = replace(inv.instances[1], weight=2)
    assert (len(n.parsed), n.serialised) == (1, 2)
    stamp = path.stat()
    with editing(path, cached) as inv:
        pass
    assert (path.stat().st_ino, path.stat().st_mtime_ns) == (stamp.st_ino, stamp.st_mtime_ns) and n.serialised == 2

    other = ("import sys\nfrom fdngx import inventory\nwith inventory.editing(sys.argv[1]) as inv:\n"
             "    inv.instances[0].weight = 5\n")
    subprocess.run([sys.executable, "-c", other, str(path)], check=True, timeout=60,
                   env={**os.environ, "PYTHONPATH": str(REPO)})
    with editing(path, cached) as inv:
        inv.instances.append(inventory.parse_instance(one("dp2", 8003), "test", 2))
    assert len(n.parsed) == 2
    edit_in_place(path, '"weight": 5', '"weight": 7')  # the stat cannot tell: the bytes are read under the lock
    with editing(path, cached) as inv:
        inv.instances[2] = replace(inv.instances[2], weight=3)
    assert len(n.parsed) == 3
    assert [(i["name"], i["weight"]) for i in json.loads(path.read_text())["instances"]] == \
        [("dp0", 7), ("dp1", 2), ("dp2", 3)]

    before = path.read_bytes()
    with pytest.raises(RuntimeError), editing(path, cached) as inv:
        inv.instances.clear()
        raise RuntimeError("a refusal half-way")
    assert path.read_bytes() == before and len(cached(path).instances) == 3
    assert cached(path) == inventory.load(path) and inventory.to_json(cached(path)).encode() == path.read_bytes()
    assert len(n.parsed) == 4  # the load just above; the cache parsed nothing it wrote
