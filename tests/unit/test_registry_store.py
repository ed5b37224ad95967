"""The registry's inventory reads (fdngx.registry.store): parsed once per content, an outside change
always seen."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fdngx import inventory
from fdngx.domain import Inventory
from fdngx.errors import InventoryError
from fdngx.registry.store import CachedLoad
from tests.support import edit_in_place


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
