"""The sidecar's inventory watch (fdngx.weights.watch) in a running loop: real files, the real watchdog observer
(inotify), a fake scrape and apply (fdngx.weights.sidecar's loop in a thread, no nginx).

What the loop must not do: re-read the inventory or cycle early because someone read it (its own read
included), or say a bad inventory more than once per change. What it must do: follow an inventory behind a
swapped symlink (a deploy tool's `current -> releases/N`, a Kubernetes ConfigMap's `..data`), and find
changes with no watch at all (inotify's limits) by its per-cycle look at the files.
"""

from __future__ import annotations

import errno
import logging
import os
import shutil
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from watchdog.events import FileClosedEvent, FileClosedNoWriteEvent, FileMovedEvent, FileOpenedEvent
from watchdog.observers.inotify_c import InotifyFD

from fdngx import inventory as inv_mod
from fdngx.inventory import save
from fdngx.weights.settings import PolicyConfig
from fdngx.weights.sidecar import Sidecar, SidecarConfig
from fdngx.weights.telemetry import Telemetry
from tests.support import wait_for
from tests.unit.test_loop import FakeScrape, FakeTarget, inv_of, make


class Running:
    """A sidecar on `inv` (debounce 0.2 s) looping in a thread, with its inventory reads and cycle starts counted."""

    def __init__(self, tmp: Path, inv: Path, interval: float, monkeypatch: pytest.MonkeyPatch) -> None:
        target = FakeTarget(tmp / "upstream.conf", lambda: False, [])
        cfg = SidecarConfig((inv,), target, policy=PolicyConfig(interval=interval), debounce=0.2)
        self.sc = Sidecar(cfg, scrape=FakeScrape(), telemetry=Telemetry())
        self.loads = 0
        self.starts: list[float] = []
        load_many = inv_mod.load_many

        def counted(*a: Any, **kw: Any) -> Any:
            self.loads += 1
            return load_many(*a, **kw)

        monkeypatch.setattr(inv_mod, "load_many", counted)
        cycle = self.sc.run_once

        def timed() -> Any:
            self.starts.append(time.monotonic())
            return cycle()

        self.sc.run_once = timed  # type: ignore[method-assign]
        self.sc.watch()
        self.thread = threading.Thread(target=self.sc.run, daemon=True)
        self.thread.start()
        wait_for(lambda: self.sc.cycles >= 1, 10, what="the first cycle")

    def listed(self, n: int, timeout: float = 5.0) -> None:
        wait_for(lambda: len(self.sc.inventory.instances) == n, timeout, what=f"{n} instances listed")

    def stop(self) -> None:
        self.sc.stop()
        self.thread.join(timeout=10)
        assert not self.thread.is_alive()


@pytest.fixture
def running(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    started: list[Running] = []

    def start(inv: Path, interval: float) -> Running:
        started.append(Running(tmp_path, inv, interval, monkeypatch))
        return started[-1]

    yield start
    for r in started:
        r.stop()


def test_a_read_or_an_identical_rewrite_makes_no_early_cycle(tmp_path: Path, running: Any) -> None:
    """A `cat` of the inventory (the sidecar's own read is one) used to start a re-read and a cycle every
    --debounce seconds, for good. Now a read costs nothing, and a rewrite with the same content one re-read
    and no cycle before the timer's."""
    inv = tmp_path / "fdngx.json"
    save(inv_of(2), inv)
    r = running(inv, 0.5)
    save(inv_of(3), inv)
    r.listed(3)
    loads, first = r.loads, len(r.starts)
    inv.read_bytes()  # a reader: fdngx status, a backup job, cat
    save(inv_of(3), inv)  # the same inventory, written again (fdngx drain of a replica already drained)
    wait_for(lambda: len(r.starts) >= first + 6, 10, what="six more cycles")
    assert r.loads == loads + 1, f"{r.loads - loads} re-reads for one rewrite and one read"
    gaps = [b - a for a, b in zip(r.starts[first:], r.starts[first + 1:], strict=False)]
    assert min(gaps) > 0.3, f"cycles closer than --interval 0.5: {[round(g, 2) for g in gaps]}"


def test_a_bad_inventory_is_said_once_until_it_changes(tmp_path: Path, running: Any,
                                                       caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="fdngx")
    inv = tmp_path / "fdngx.json"
    save(inv_of(2), inv)
    r = running(inv, 0.3)

    def said() -> int:
        return caplog.text.count("inventory not reloaded")

    inv.write_text('{"version": 1, "instances": [')  # an editor saving half a file
    wait_for(lambda: said() == 1, 5, what="the bad inventory said")
    cycles = len(r.starts)
    wait_for(lambda: len(r.starts) >= cycles + 5, 10, what="five more cycles")
    assert said() == 1 and len(r.sc.inventory.instances) == 2, caplog.text
    inv.write_text("{ not json")  # another bad edit: said again
    wait_for(lambda: said() == 2, 5, what="the new bad inventory said")
    save(inv_of(3), inv)
    r.listed(3)
    assert "inventory read again" in caplog.text


def configmap(tmp: Path, version: int, n: int) -> None:
    """A Kubernetes ConfigMap volume's update: a new ..<version> directory, ..data swapped to it, the old one gone."""
    (tmp / f"..v{version}").mkdir()
    save(inv_of(n), tmp / f"..v{version}" / "fdngx.json")
    os.symlink(f"..v{version}", tmp / "..data_tmp")
    os.replace(tmp / "..data_tmp", tmp / "..data")
    if (tmp / f"..v{version - 1}").exists():
        shutil.rmtree(tmp / f"..v{version - 1}")


def release(tmp: Path, version: int, n: int) -> None:
    """A deploy tool's release: releases/<version>, `current` swapped to it, the old release kept."""
    (tmp / "releases" / str(version)).mkdir(parents=True)
    save(inv_of(n), tmp / "releases" / str(version) / "fdngx.json")
    os.symlink(tmp / "releases" / str(version), tmp / "current.tmp")
    os.replace(tmp / "current.tmp", tmp / "current")


@pytest.mark.parametrize("layout", ["configmap", "release"])
def test_an_inventory_behind_a_swapped_symlink_is_followed(tmp_path: Path, running: Any, layout: str,
                                                           caplog: pytest.LogCaptureFixture) -> None:
    """--interval 30: no timer cycle comes in the test's time, so the watch alone picks up each swap (it watched
    the directory the path resolved to at start, and nothing after a swap)."""
    caplog.set_level(logging.INFO, logger="fdngx")
    swap = configmap if layout == "configmap" else release
    swap(tmp_path, 1, 2)
    if layout == "configmap":
        os.symlink("..data/fdngx.json", tmp_path / "fdngx.json")
        inv = tmp_path / "fdngx.json"
    else:
        inv = tmp_path / "current" / "fdngx.json"
    r = running(inv, 30.0)
    swap(tmp_path, 2, 3)
    r.listed(3)
    swap(tmp_path, 3, 1)  # and again: the watch followed the first swap
    r.listed(1)
    if layout == "configmap":
        assert f"inventory watch on {tmp_path / '..v1'} ended: the directory was removed" in caplog.text
    wait_for(lambda: r.sc.cycles >= 3, 5, what="the second change's cycle")
    assert r.sc.cycles == 3, "the start's cycle and one per change"


def test_with_no_inotify_the_per_cycle_look_finds_changes(tmp_path: Path, running: Any,
                                                          monkeypatch: pytest.MonkeyPatch,
                                                          caplog: pytest.LogCaptureFixture) -> None:
    """fs.inotify.max_user_instances used up (128 by default, shared by every process of the user): the
    sidecar used to refuse to start; now it warns and a stat of each file per cycle finds the change."""

    def exhausted(cls: type) -> int:
        raise OSError(errno.EMFILE, "inotify instance limit reached")

    monkeypatch.setattr(InotifyFD, "_create_inotify_fd", classmethod(exhausted))
    inv = tmp_path / "fdngx.json"
    save(inv_of(2), inv)
    r = running(inv, 0.3)
    assert "inotify instance limit reached" in caplog.text and "every cycle" in caplog.text
    save(inv_of(3), inv)
    r.listed(3)


def test_only_events_that_can_change_a_file_count(tmp_path: Path) -> None:
    from fdngx.weights.watch import InventoryWatch

    calls: list[int] = []
    inv = tmp_path / "fdngx.json"
    inv.write_text("{}")
    watch = InventoryWatch([inv], lambda: calls.append(1))
    watch.refresh()  # no observer: only what is relevant
    for quiet in (FileOpenedEvent(str(inv)), FileClosedNoWriteEvent(str(inv)), FileClosedEvent(str(tmp_path / "x"))):
        watch.on_any_event(quiet)
    assert not calls
    watch.on_any_event(FileClosedEvent(str(inv)))
    watch.on_any_event(FileMovedEvent(str(tmp_path / ".fdngx.json.tmp"), str(inv)))
    assert len(calls) == 2


def test_through_names_every_symlink_on_the_way(tmp_path: Path) -> None:
    from fdngx.weights.watch import through

    (tmp_path / "..v1").mkdir()
    (tmp_path / "..v1" / "fdngx.json").write_text("{}")
    os.symlink("..v1", tmp_path / "..data")
    os.symlink("..data/fdngx.json", tmp_path / "fdngx.json")
    os.symlink(tmp_path, tmp_path / "here")
    assert through(tmp_path / "here" / "fdngx.json") == [
        tmp_path / "here", tmp_path / "fdngx.json", tmp_path / "..data", tmp_path / "..v1" / "fdngx.json"]
    os.symlink("loop", tmp_path / "loop")
    assert through(tmp_path / "loop")[-1] == tmp_path / "loop"  # a loop ends (open says ELOOP)


def test_sighup_with_an_unchanged_inventory_says_it_read_it(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """`systemctl reload fdngx-sidecar` (SIGHUP) logged nothing when nothing had changed: no sign it happened."""
    sc, _scrape, _clock, _written = make(tmp_path, n=2)
    caplog.set_level(logging.INFO, "fdngx")
    assert sc.reload_inventory(force=True) is False
    said = [r.getMessage() for r in caplog.records]
    assert "inventory read again (SIGHUP): unchanged, 2 instance(s)" in said, said
    caplog.clear()
    assert sc.reload_inventory() is False  # a look without the signal: nothing to say
    assert not caplog.records
