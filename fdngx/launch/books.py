"""The supervisor's bookkeeping: the inventory it rewrites and its pidfile (`<inventory>.pid`).

Neither may ever stop a replica. A write that fails (a full disk, a read-only or replaced file) is said
once, naming the file and why, and tried again at the supervisor's next loop until it succeeds (then that
is said too): the files are marked dirty, and _flush writes what is dirty. An inventory that cannot be
written is recorded in the pidfile too (`unwritten`), for those who never read the supervisor's output
(a detached launch: `fdngx launch --detach` returning, `fdngx status`); the record goes when it is written.
A detached parent gets each record over its pipe too (fdngx.launch.handshake), the pidfile's own failure in
it: it learns that the replicas are ready, or why they failed, when neither file can be written.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable
from typing import Any

from fdngx import inventory as inv_mod
from fdngx.errors import FdngxError, os_error_line
from fdngx.launch.children import Child
from fdngx.launch.handshake import Reporter
from fdngx.launch.pidfile import LIVE, ChildState, LaunchState, Pidfile, ProcessRecord, write_pidfile
from fdngx.launch.plan import Plan
from fdngx.system import procs

INVENTORY, PIDFILE = "inventory", "pidfile"


class Books:
    """Mixin of fdngx.launch.supervise.Supervisor: what it writes about its replicas, and how."""

    plan: Plan
    children: list[Child]
    status: dict[str, str]
    by_name: dict[str, Any]
    down: set[str]
    detached: bool
    stopped: bool
    progress: Any  # fdngx.launch.progress.Progress (say)
    inventory_written: bool
    lockless_said: bool
    state: LaunchState
    reporter: Reporter

    def _init_books(self) -> None:
        self.dirty: set[str] = set()
        self.failing: dict[str, str] = {}  # path -> why its last write failed (said once)
        self.failure: tuple[str, str, str] | None = None  # a failed start: error, log tail, log file

    def _pidfile(self, state: LaunchState, error: str | None = None, log_tail: str | None = None,
                 log: str | None = None) -> None:
        """Record the state and write the pidfile now (a failure is said, and retried by _flush)."""
        self.state = state
        if error is not None:
            self.failure = (error, log_tail or "", log or "")
        self.dirty.add(PIDFILE)
        self._flush()

    def _inventory(self) -> None:
        """Write the inventory now (a failure is said, and retried by _flush)."""
        self.dirty.add(INVENTORY)
        self._flush()

    def _flush(self) -> None:
        """Write whatever is dirty; what fails stays dirty for the next call."""
        if INVENTORY in self.dirty and self._attempt(str(self.plan.inventory_path), self._write_inventory):
            self.dirty.discard(INVENTORY)
        if PIDFILE in self.dirty and self._attempt(self.plan.pidfile, self._write_pidfile):
            self.dirty.discard(PIDFILE)
        self.reporter.drain()  # what a detached parent has not read yet

    def _attempt(self, path: str, write: Callable[[], None]) -> bool:
        try:
            write()
        except (OSError, FdngxError) as exc:
            why = _why(path, exc)
            if path not in self.failing:
                self.progress.say(f"warning: {path}: not written ({why}); the replicas keep running; fdngx tries "
                                  "again until it can")
            if self.failing.get(path) != why and path != self.plan.pidfile:
                self.dirty.add(PIDFILE)  # the pidfile records it (written after it in _flush)
            self.failing[path] = why
            return False
        if self.failing.pop(path, None) is not None:
            self.progress.say(f"{path}: written again")
            if path != self.plan.pidfile:
                self.dirty.add(PIDFILE)
        return True

    def _write_pidfile(self) -> None:
        """Write the pidfile; send its record to a detached parent whether or not the file could be written."""
        me = os.getpid()
        error, log_tail, log = self.failure or (None, None, None)
        record = Pidfile(
            supervisor=ProcessRecord(me, procs.starttime(me)), state=self.state, detached=self.detached,
            engine=self.plan.engine, inventory=self.plan.inventory_path, grace=self.plan.grace,
            children=[c.record() for c in self.children], instances=dict(self.status),
            error=error, log_tail=log_tail, log_file=log, boot=procs.boot_id(),
            unwritten={p: why for p, why in self.failing.items() if p != self.plan.pidfile},
        )
        try:
            write_pidfile(self.plan.pidfile, record)
        except (OSError, FdngxError) as exc:
            self._report(record, _why(self.plan.pidfile, exc))
            raise
        self._report(record, None)

    def _report(self, record: Pidfile, pidfile_failed: str | None) -> None:
        doc = record.to_dict()
        if pidfile_failed is not None:  # the parent says it: `fdngx stop` cannot find the launch until then
            doc["unwritten"] = {**record.unwritten, self.plan.pidfile: pidfile_failed}
        self.reporter.send({"record": doc}, last=record.state is not LaunchState.STARTING)

    def _write_inventory(self) -> None:
        """Atomically write the inventory with pid/log/status per instance, other edits kept, under its lock."""
        with contextlib.ExitStack() as stack:
            # A lock root shares with us (inv_mod.lock), or else one we cannot use (a third account's, root's
            # from an older fdngx), or held too long: write without it, as before.
            try:
                stack.enter_context(inv_mod.lock(self.plan.inventory_path, timeout=5.0))
            except (OSError, FdngxError) as exc:
                if not self.lockless_said:  # once: a drain in that same moment could be lost
                    self.lockless_said = True
                    self.progress.say(f"{os_error_line(exc) if isinstance(exc, OSError) else exc}: writing "
                                      f"{self.plan.inventory_path} without the inventory lock; a `fdngx drain` at "
                                      "the same moment could be lost (a lock file this user cannot use: remove it "
                                      "while no fdngx runs)")
            self._rewrite_inventory()

    def _rewrite_inventory(self) -> None:
        ours = {}
        for c in self.children:
            for name in c.spec.instances:
                extra: dict[str, Any] = {"pid": c.pid, "status": self._inst_state(c, name)}
                if c.exit_code is not None and c.state is not ChildState.RUNNING:
                    extra["exit_code"] = c.exit_code
                ours[name] = extra
        try:
            current = inv_mod.load(self.plan.inventory_path)  # the first time: an old launch's, if any
        except FdngxError:
            current = None
        doc = current if self.inventory_written and current else self.plan.inventory
        if not self.inventory_written and current is not None:
            # A new launch over an old inventory: a replica drained there (same name, same address) stays drained.
            was = {(i.name, i.host, i.port) for i in current.instances if i.drain}
            for inst in doc.instances:
                if (inst.name, inst.host, inst.port) in was and not inst.drain:
                    inst.drain = True
                    self.progress.say(f"{inst.name} stays drained, as the old inventory had it "
                                      f"(`fdngx drain {inst.name} --undo` puts it back)")
        for inst in doc.instances:
            mine = self.by_name.get(inst.name)
            if mine is not None and (inst.host, inst.port) == (mine.host, mine.port):
                inst.extra = {k: v for k, v in inst.extra.items() if k not in ("pid", "status", "exit_code")}
                inst.extra = {"pid": ours[inst.name]["pid"], **inst.extra, **ours[inst.name]}
        inv_mod.save(doc, self.plan.inventory_path)
        self.inventory_written = True

    def _inst_state(self, c: Child, name: str) -> str:
        if self.stopped and c.state in LIVE:
            return "stopped"
        if c.state is ChildState.RUNNING and name in self.down:
            return "down"
        return {ChildState.RUNNING: "running", ChildState.STARTING: "starting"}.get(c.state, "exited")


def _why(path: str, exc: OSError | FdngxError) -> str:
    """Why a write of `path` failed, in the words a line about `path` ends with."""
    return (exc.strerror or str(exc)) if isinstance(exc, OSError) else str(exc).removeprefix(f"{path}: ")
