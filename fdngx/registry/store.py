"""The registry's inventory files, read on every heartbeat.

FastDeploy posts `/register` every 5 s per instance: ~200 reads a second at 1,024 instances, nearly all of
an unchanged file. CachedLoad parses a file once per content: a file whose stat (device, inode, size, mtime
in ns) is the one last read, when that read came after the file had settled (unchanged for RACY_SECONDS),
is not read at all. Any other (changed, or changed too recently to tell by its stat: an edit in place within
one tick of the kernel's clock keeps the mtime, and one of the same size looks alike; git's "racy" rule) is
read again and its bytes compared with those last parsed: the same bytes are the same inventory, not parsed
again. So a file that keeps changing (an instance flapping its version once a second, a rollout's churn of
registrations) costs a read and a compare per heartbeat, not a parse (`python -m bench.registry`).
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from fdngx import inventory as inv_mod
from fdngx.domain import Inventory


@dataclass(frozen=True)
class _Seen:
    version: tuple[int, int, int, int]  # the stat before `raw` was read
    settled: bool  # the file had not changed for RACY_SECONDS when read: a later change shows in its stat
    raw: bytes
    inv: Inventory  # parse_text(raw)


class CachedLoad:
    """inventory.load for files read again and again; the Inventory returned is shared: callers must not
    change it."""

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
