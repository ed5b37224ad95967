"""The registry's inventory files: read on every heartbeat, written under the inventory lock.

FastDeploy posts `/register` every 5 s per instance: ~200 reads a second at 1,024 instances, nearly all of
an unchanged file. CachedLoad parses a file once per content: a file whose stat (device, inode, size, mtime
in ns) is the one last read, when that read came after the file had settled (unchanged for RACY_SECONDS),
is not read at all. Any other (changed, or changed too recently to tell by its stat: an edit in place within
one tick of the kernel's clock keeps the mtime, and one of the same size looks alike; git's "racy" rule) is
read again and its bytes compared with those last parsed: the same bytes are the same inventory, not parsed
again. So a file that keeps changing (an instance flapping its version once a second, a rollout's churn of
registrations) costs a read and a compare per heartbeat, not a parse (`python -m bench.registry`).

editing is the registry's read-modify-write: under inventory.lock (the lock every writer takes: fdngx
launch, fdngx drain, older fdngx), the file read and compared as above (an outside change is parsed, the
registry's own last write is not), serialised once, written atomically (inventory.save: temp file, fsync,
rename), and the cache primed with what was written.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path

from fdngx import inventory as inv_mod
from fdngx.domain import Inventory


@dataclass(frozen=True)
class _Seen:
    version: tuple[int, int, int, int] | None  # the stat before `raw` was read; None: a write of ours, not read
    settled: bool  # the file had not changed for RACY_SECONDS when read: a later change shows in its stat
    raw: bytes
    inv: Inventory  # parse_text(raw), or what the registry wrote as `raw`


class CachedLoad:
    """inventory.load for files read again and again; the Inventory returned is shared: callers must not
    change it (editing hands out a copy)."""

    RACY_SECONDS = 2.0

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self.clock = clock  # wall time, to compare with mtimes
        self._mu = threading.Lock()
        self._seen: dict[Path, _Seen] = {}

    def __call__(self, path: str | Path, *, verify: bool = False) -> Inventory:
        """The inventory in `path` as it is now; `verify`: its bytes read and compared even when settled."""
        p = Path(path).absolute()
        try:
            st = os.stat(p)
        except OSError:
            return inv_mod.load(p)  # the error, as load words it
        version = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
        settled = self.clock() - st.st_mtime_ns / 1e9 > self.RACY_SECONDS  # a clock stepped back: not settled
        with self._mu:
            seen = self._seen.get(p)
        if seen is not None and seen.settled and seen.version == version and not verify:
            return seen.inv
        raw = inv_mod.read(p)  # read after the stat: at least as new as `version` (a newer one is read again next time)
        inv = seen.inv if seen is not None and seen.raw == raw else inv_mod.parse_text(raw, str(p))
        with self._mu:
            self._seen[p] = _Seen(version, settled, raw, inv)
        return inv

    def prime(self, path: str | Path, raw: bytes, inv: Inventory) -> None:
        """`inv` was just written to `path` as `raw`: the next read compares the bytes instead of parsing."""
        with self._mu:
            self._seen[Path(path).absolute()] = _Seen(None, False, raw, inv)


def _unchanged(now: Inventory, was: Inventory) -> bool:
    return ((now.upstream, now.version, now.extra) == (was.upstream, was.version, was.extra)
            and len(now.instances) == len(was.instances)
            and all(a is b for a, b in zip(now.instances, was.instances, strict=True)))


@contextmanager
def editing(path: str | Path, cache: CachedLoad) -> Iterator[Inventory]:
    """inventory.editing through `cache`: under the inventory lock, a copy of the file as it is now. Replace
    instances in it (a new list, a new Instance in a slot), never change one in place: they are the cache's.
    On a normal exit, when an instance, the upstream or a top-level field changed, it is saved atomically
    (one serialisation) and the cache learns what was written. An exception saves nothing."""
    p = Path(path).absolute()
    with inv_mod.lock(p):
        was = cache(p, verify=True)
        inv = replace(was, instances=list(was.instances), extra=dict(was.extra))
        yield inv
        if not _unchanged(inv, was):
            cache.prime(p, inv_mod.save(inv, p), inv)
