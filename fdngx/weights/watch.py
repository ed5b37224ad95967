"""The sidecar's watch on its inventory files: which directories to watch, which events count, and whether a
file really changed (fdngx.weights.sidecar acts on it).

- `identity`: (dev, inode, size, mtime) of each file as it opens (symlinks followed). The sidecar re-reads
  the inventory only when this changed: a read (`cat`, `fdngx status`, its own) changes nothing, and a bad
  file is read, and said, once per change. Checked every cycle too: a change no event announced (inotify
  unavailable, a network file system, a watch lost) is still picked up within --interval.
- `through`: every path opening a file goes through that a change could redirect: each symlink on the way, by
  its own name, and the file it ends at. A deploy tool's `current -> releases/N` and a Kubernetes ConfigMap
  volume's `..data -> ..<timestamp>` are swapped, not written: the swap shows in the link's directory.
- `InventoryWatch`: a watchdog observer on the directories holding those paths, for the events that can
  change a file (created, written and closed, modified, moved, deleted: not opened or closed after a read).
  `refresh` re-resolves the paths and moves the watches where they now are (a watched directory removed ends
  its watch: said, and watched again where the inventory is). A watch that cannot be had (inotify's limits)
  is said once, and the per-cycle check stands in for it.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from watchdog.events import (
    DirCreatedEvent,
    DirDeletedEvent,
    DirMovedEvent,
    EventsLostEvent,
    FileClosedEvent,
    FileCreatedEvent,
    FileDeletedEvent,
    FileModifiedEvent,
    FileMovedEvent,
    FileSystemEvent,
    FileSystemEventHandler,
)
from watchdog.observers import Observer

from fdngx.system.files import Identity as FileIdentity
from fdngx.system.files import identity as file_identity

log = logging.getLogger("fdngx.sidecar")
Identity = tuple[FileIdentity | None, ...]
# What can change what a path opens. Not opened/closed-without-write (every read, the sidecar's own included).
EVENTS: list[type[FileSystemEvent]] = [
    FileCreatedEvent, FileModifiedEvent, FileMovedEvent, FileDeletedEvent, FileClosedEvent,
    DirCreatedEvent, DirMovedEvent, DirDeletedEvent, EventsLostEvent,
]
KINDS = frozenset(e.event_type for e in EVENTS)
MAX_HOPS = 40  # symlinks followed before giving up (Linux's own limit): a loop ends here


def identity(paths: Sequence[Path]) -> Identity:
    """(dev, inode, size, mtime_ns) of each file as it opens; None where it cannot be stat'ed."""
    return tuple(file_identity(p) for p in paths)


def through(path: Path) -> list[Path]:
    """Each symlink opening `path` follows (absolute, by its own name in a real directory), then the path it
    ends at. Their directories are what to watch; a change to any of them may change what `path` opens."""
    todo = [part for part in Path(path).absolute().parts if part != "/"]
    here, hops, out = Path("/"), MAX_HOPS, []
    while todo:
        name = todo.pop(0)
        if name in ("", "."):
            continue
        if name == "..":
            here = here.parent
            continue
        step = here / name
        if hops and os.path.islink(step):
            hops -= 1
            out.append(step)
            try:
                link = os.readlink(step)
            except OSError:
                here = step
                continue
            if os.path.isabs(link):
                here = Path("/")
            todo[:0] = [part for part in Path(link).parts if part != "/"]
            continue
        here = step
    out.append(here)
    return out


def _dir_id(directory: Path) -> tuple[int, int] | None:
    try:
        st = os.stat(directory)
    except OSError:
        return None
    return st.st_dev, st.st_ino


class InventoryWatch(FileSystemEventHandler):
    """Calls `changed` (from the observer's thread) when an event may have changed one of `paths`."""

    def __init__(self, paths: Sequence[Path], changed: Callable[[], None]) -> None:
        self.paths = tuple(Path(p).absolute() for p in paths)
        self.changed = changed
        self.relevant: frozenset[str] = frozenset()  # replaced whole: the observer thread reads it
        self.observer: Any = None
        self.watches: dict[Path, tuple[Any, tuple[int, int] | None]] = {}  # directory: (its watch, its identity)
        self.lost: set[Path] = set()  # watched directories removed (added by the observer thread)
        self._failed: dict[Path, str] = {}  # directories that could not be watched, and why (said once)
        self._started = False  # the first refresh's watches are the start's: not news

    # -- the observer's thread -------------------------------------------------------------------------

    def on_any_event(self, event: FileSystemEvent) -> None:
        if event.event_type not in KINDS:  # opened, closed after a read, attributes: nothing changed
            return
        src, dest = os.fsdecode(event.src_path), os.fsdecode(event.dest_path or "")
        if event.event_type == "events_lost":
            self.changed()
            return
        if event.is_directory and event.event_type == "deleted" and Path(src) in self.watches:
            self.lost.add(Path(src))  # inotify ends a watch whose directory goes
            self.changed()
            return
        if src in self.relevant or dest in self.relevant:
            self.changed()

    # -- the sidecar's thread ----------------------------------------------------------------------------

    def start(self) -> None:
        """Start watching; a watch that cannot be had is said (once) and the sidecar's per-cycle check stands
        in for it, never a refusal to start."""
        try:
            observer = Observer()
            observer.daemon = True
            observer.start()
        except OSError as exc:
            log.warning("inventory watch unavailable (%s): changes are found by a look at the files every cycle "
                        "(--interval) instead", exc.strerror or exc)
            return
        self.observer = observer
        self.refresh()

    def refresh(self) -> None:
        """Re-resolve the inventory paths and watch the directories they go through now (cheap: a few stat
        calls; the sidecar calls it on every inventory event and every cycle)."""
        paths = [p for path in self.paths for p in through(path)]
        self.relevant = frozenset(str(p) for p in paths)
        if self.observer is None:
            return
        wanted = {p.parent: _dir_id(p.parent) for p in paths}
        lost, self.lost = self.lost, set()
        for directory in sorted(lost & self.watches.keys()):
            log.info("inventory watch on %s ended: the directory was removed", directory)
        for directory, (watch, ident) in list(self.watches.items()):
            if directory in lost or wanted.get(directory, ()) != ident:
                self._unschedule(directory, watch)
        added = []
        for directory, ident in wanted.items():
            if directory in self.watches or ident is None:
                continue
            try:
                watch = self.observer.schedule(self, str(directory), recursive=False, event_filter=EVENTS)
            except OSError as exc:
                why = exc.strerror or str(exc)
                if self._failed.get(directory) != why:
                    log.warning("cannot watch %s for inventory changes (%s): changes there are found by a look "
                                "at the files every cycle (--interval) instead", directory, why)
                    self._failed[directory] = why
                continue
            self.watches[directory] = (watch, ident)
            self._failed.pop(directory, None)
            added.append(str(directory))
        if added:
            log.log(logging.INFO if lost or self._started else logging.DEBUG, "watching %s for inventory changes",
                    ", ".join(added))
        self._started = True

    def _unschedule(self, directory: Path, watch: Any) -> None:
        del self.watches[directory]
        try:
            self.observer.unschedule(watch)
        except (KeyError, RuntimeError, OSError) as exc:  # its emitter ended already (its directory went)
            log.debug("unwatching %s: %s", directory, exc)

    def stop(self) -> None:
        if self.observer is not None:
            self.observer.stop()
            self.observer.join(timeout=5)
            self.observer = None
