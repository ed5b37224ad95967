"""One supervised process (a Child), its typed state, and how the supervisor stops one or all of them.

Every signal goes through fdngx.system.procs, which checks (pid, start time) first: a group is signalled
only while its recorded leader lives; otherwise the members recorded as our descendants, one by one.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
from collections.abc import Callable
from dataclasses import dataclass, field

from fdngx.engines.argv import ProcSpec
from fdngx.launch.pidfile import ChildRecord, ChildState
from fdngx.system import procs


@dataclass
class Child:
    spec: ProcSpec
    popen: subprocess.Popen[bytes] | None = None
    start: int | None = None
    state: ChildState = ChildState.STARTING
    started_at: float = 0.0
    healthy_at: float | None = None
    restarts: int = 0
    restart_at: float = 0.0
    exit_code: int | None = None
    # Descendants seen so far {pid: start time}, refreshed while the child runs (see remember_trees).
    tree: dict[int, int] = field(default_factory=dict)

    @property
    def pid(self) -> int | None:
        return self.popen.pid if self.popen is not None else None

    @property
    def death_signal(self) -> int:
        return int(getattr(signal, self.spec.stop_signal))

    def alive(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def ended(self) -> str | None:
        """Why it can serve no more, as people read it: its process exited, or lost a rank; None while both live."""
        if self.popen is None:
            return None
        if (rc := self.popen.poll()) is not None:
            return describe_exit(rc)
        return self.lost_rank()

    def lost_rank(self) -> str | None:
        """(multi_api_server) one of its rank processes exited, which the launcher never notices; None else."""
        if self.spec.unreaped_ranks and self.popen is not None and (dead := procs.unreaped_children(self.popen.pid)):
            return (f"lost a rank: its process {dead[0]} exited and {self.spec.name} goes on without it "
                    "(it never checks its ranks)")
        return None

    def own_pids(self) -> set[int]:
        """Its process, its current descendants and those it was seen with."""
        if self.popen is None:
            return set()
        return {self.popen.pid, *procs.descendants(self.popen.pid), *self.tree}

    def record(self) -> ChildRecord:
        return ChildRecord(self.spec.name, self.pid, self.start, self.spec.stop_signal, list(self.spec.instances),
                           self.state, dict(self.tree))


def describe_exit(rc: int) -> str:
    if rc < 0:
        with contextlib.suppress(ValueError):
            return f"was killed by {signal.Signals(-rc).name}"
        return f"was killed by signal {-rc}"
    return f"exited with status {rc}"


def remember_trees(children: list[Child]) -> bool:
    """Note each live child's descendants: once a leader dies its workers reparent to us and the link is lost,
    and FastDeploy starts its GPU workers in sessions of their own, outside the child's group. True when
    something new was seen (the pidfile then records it for `fdngx stop`)."""
    changed = False
    for c in children:
        if c.alive() and c.popen is not None:
            seen = procs.descendants(c.popen.pid)
            changed |= not seen.items() <= c.tree.items()
            c.tree.update(seen)
    return changed


def _pgid(pid: int) -> int | None:
    try:
        return os.getpgid(pid)
    except OSError:
        return None


def stop_child(c: Child, grace: float, children: list[Child] | None = None) -> None:
    """Stop one child: its group (while its leader is the process we started), the members of that group
    that are our descendants (even reparented ones), every descendant we saw, and every other descendant
    of this process that no other live child owns (`children`: all of them), each by (pid, start).

    The last ones are the workers of this child's earlier runs or of its dead leader: in sessions of their
    own, reparented to us (the subreaper) and seen by no tree yet, they would outlive every restart."""
    if c.popen is None:
        return
    if c.popen.poll() is None:
        c.tree.update(procs.descendants(c.popen.pid))
    mine = {p: s for p, s in procs.descendants(os.getpid()).items() if _pgid(p) == c.popen.pid}
    if children is not None:
        mine.update(strays(c, children))
    mine.update(c.tree)
    procs.stop_all([(c.popen.pid, c.start or 0, c.spec.stop_signal)], [c.popen], grace, mine)
    c.tree.clear()


def strays(c: Child, children: list[Child]) -> dict[int, int]:
    """Descendants of this process that belong to no live child other than `c`: neither its process, nor in
    its group, nor among its current or recorded descendants."""
    others = [o for o in children if o is not c and o.alive() and o.popen is not None]
    keep: set[int] = set()
    for o in others:
        assert o.popen is not None
        keep.add(o.popen.pid)
        keep.update(o.tree)
        keep.update(procs.descendants(o.popen.pid))
    leaders = {o.popen.pid for o in others if o.popen is not None}
    return {p: s for p, s in procs.descendants(os.getpid()).items() if p not in keep and _pgid(p) not in leaders}


def stop_every(children: list[Child], grace: float, announce: Callable[[int], None]) -> list[int]:
    """Stop every child group and every descendant of this process, whatever group it moved to; `announce`
    gets the number of groups before the (up to `grace` seconds) wait. Returns the pids that needed SIGKILL."""
    live = [c for c in children if c.popen is not None]
    if not live:
        return []
    snapshot = procs.descendants(os.getpid())
    for c in live:
        snapshot.update(c.tree)
    groups = [(c.popen.pid, c.start or 0, c.spec.stop_signal) for c in live if c.popen is not None]
    popens = [c.popen for c in live if c.popen is not None]
    if any(c.alive() for c in live) or snapshot:
        announce(len(groups))
    return procs.stop_all(groups, popens, grace, snapshot)
