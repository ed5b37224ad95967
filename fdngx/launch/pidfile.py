"""The supervisor's pidfile (`<inventory>.pid`): who supervises which processes, and their state.

One typed record, written by the supervisor and read in one place (read_pidfile), validated on load: a
field of the wrong type is an error naming the file and the field, never a KeyError later. Every pid
comes with its start time, so a stale file can never make `fdngx stop` signal somebody else's process.
"""

from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fdngx.domain import Engine, StrEnum
from fdngx.errors import LaunchError
from fdngx.system import procs
from fdngx.system.files import atomic_write

MAX_BYTES = 4 * 1024 * 1024  # a pidfile lists a few processes and their members: far below this
# The only signals a record may ask `fdngx stop` to send (anything else is a corrupt or planted file).
STOP_SIGNALS = ("SIGINT", "SIGTERM")


class LaunchState(StrEnum):
    STARTING = "starting"
    READY = "ready"
    FAILED = "failed"


class ChildState(StrEnum):
    STARTING = "starting"  # started, /health not 200 yet
    RUNNING = "running"
    WAITING_RESTART = "waiting-restart"  # died; --restart on-failure starts it again after a backoff
    EXITED = "exited"  # died or stopped; no restart coming


LIVE = (ChildState.STARTING, ChildState.RUNNING)


@dataclass(frozen=True)
class ProcessRecord:
    pid: int
    start: int | None  # /proc start time in clock ticks: the pid's identity

    def alive(self) -> bool:
        return procs.same_process(self.pid, self.start)


@dataclass
class ChildRecord:
    name: str
    pid: int | None
    start: int | None
    stop_signal: str
    instances: list[str]
    state: ChildState
    # Descendants seen while it ran {pid: start time}: the only processes `stop` may signal one by one once
    # the group's leader is gone (FastDeploy's workers live in sessions of their own).
    members: dict[int, int] = field(default_factory=dict)


@dataclass
class Pidfile:
    supervisor: ProcessRecord
    state: LaunchState
    detached: bool
    engine: Engine
    inventory: str
    grace: float
    children: list[ChildRecord]
    instances: dict[str, str]  # instance name -> what its last /health probe saw
    error: str | None = None
    log_tail: str | None = None
    log_file: str | None = None
    # The boot it was written in (procs.boot_id): after a reboot no pid in it is ours. None: an older file.
    boot: str | None = None
    # Files the supervisor cannot write now (the inventory: a full disk, a replaced file) -> why the last try
    # failed; it tries again every loop. What `fdngx status` and a detached launch show of it: unwritten_lines.
    unwritten: dict[str, str] = field(default_factory=dict)

    def from_another_boot(self) -> bool:
        return self.boot is not None and procs.boot_id() is not None and self.boot != procs.boot_id()

    def still_running(self) -> list[int]:
        """Recorded processes that still run, each the very one recorded: a group by its live leader, a
        member by its own start time. Nothing from a file written before a reboot."""
        if self.from_another_boot():
            return []
        found = [c.pid for c in self.children if c.pid is not None and procs.group_is_ours(c.pid, c.start)]
        found += [p for c in self.children for p, s in c.members.items() if procs.same_process(p, s)]
        return sorted(set(found))

    def to_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = {
            "supervisor": {"pid": self.supervisor.pid, "start": self.supervisor.start},
            "state": self.state.value,
            "detached": self.detached,
            "engine": self.engine.value,
            "inventory": self.inventory,
            "grace": self.grace,
            "children": [
                {"name": c.name, "pid": c.pid, "start": c.start, "stop_signal": c.stop_signal,
                 "instances": c.instances, "state": c.state.value,
                 "members": [[p, s] for p, s in sorted(c.members.items())]}
                for c in self.children
            ],
            "instances": self.instances,
        }
        if self.boot is not None:
            data["boot"] = self.boot
        if self.unwritten:
            data["unwritten"] = self.unwritten
        if self.error is not None:
            data.update(error=self.error, log_tail=self.log_tail, log_file=self.log_file)
        return data

    @classmethod
    def from_dict(cls, data: Any, where: str) -> Pidfile:
        """Validate a loaded document; raises LaunchError naming `where` and the field."""
        f = _Fields(where)
        doc = f.as_obj(data, "the document")
        sup = f.as_obj(doc.get("supervisor"), "supervisor")
        children = []
        for n, raw in enumerate(f.as_list(doc.get("children", []), "children")):
            c = f.as_obj(raw, f"children[{n}]")
            sig = f.as_str(c.get("stop_signal", "SIGTERM"), f"children[{n}].stop_signal")
            if sig not in STOP_SIGNALS:
                raise f.error(f"children[{n}].stop_signal", f"must be one of {', '.join(STOP_SIGNALS)}")
            members = {}
            for m, pair in enumerate(f.as_list(c.get("members", []), f"children[{n}].members")):
                what = f"children[{n}].members[{m}]"
                if not isinstance(pair, list) or len(pair) != 2:
                    raise f.error(what, "must be [pid, start time]")
                members[f.as_pid(pair[0], what)] = f.as_int(pair[1], what)
            children.append(ChildRecord(
                name=f.as_str(c.get("name"), f"children[{n}].name"),
                pid=None if c.get("pid") is None else f.as_pid(c["pid"], f"children[{n}].pid"),
                start=f.opt_int(c.get("start"), f"children[{n}].start"),
                stop_signal=sig,
                instances=[f.as_str(i, f"children[{n}].instances") for i in f.as_list(c.get("instances", []),
                                                                                  f"children[{n}].instances")],
                state=f.as_enum(ChildState, c.get("state", "exited"), f"children[{n}].state"),
                members=members,
            ))
        instances = f.as_obj(doc.get("instances", {}), "instances")
        unwritten = f.as_obj(doc.get("unwritten", {}), "unwritten")
        return cls(
            supervisor=ProcessRecord(f.as_pid(sup.get("pid"), "supervisor.pid"),
                                     f.opt_int(sup.get("start"), "supervisor.start")),
            state=f.as_enum(LaunchState, doc.get("state"), "state"),
            detached=bool(doc.get("detached", False)),
            engine=f.as_enum(Engine, doc.get("engine", "sim"), "engine"),
            inventory=f.as_str(doc.get("inventory", ""), "inventory"),
            grace=f.as_grace(doc.get("grace", 15.0)),
            children=children,
            instances={f.as_str(k, "instances"): f.as_str(v, f"instances.{k}") for k, v in instances.items()},
            error=None if doc.get("error") is None else f.as_str(doc["error"], "error"),
            log_tail=None if doc.get("log_tail") is None else f.as_str(doc["log_tail"], "log_tail"),
            log_file=None if doc.get("log_file") is None else f.as_str(doc["log_file"], "log_file"),
            boot=None if doc.get("boot") is None else f.as_str(doc["boot"], "boot"),
            unwritten={f.as_str(k, "unwritten"): f.as_str(v, f"unwritten.{k}") for k, v in unwritten.items()},
        )


class _Fields:
    """Type checks for one document, each failure naming the file and the field."""

    def __init__(self, where: str) -> None:
        self.where = where

    def error(self, name: str, why: str) -> LaunchError:
        return LaunchError(f"{self.where}: pidfile field {name} {why}; remove the file if no fdngx supervisor runs")

    def as_obj(self, v: Any, name: str) -> dict[str, Any]:
        if not isinstance(v, dict):
            raise self.error(name, "must be an object")
        return v

    def as_list(self, v: Any, name: str) -> list[Any]:
        if not isinstance(v, list):
            raise self.error(name, "must be a list")
        return v

    def as_str(self, v: Any, name: str) -> str:
        if not isinstance(v, str):
            raise self.error(name, "must be a string")
        return v

    def as_int(self, v: Any, name: str) -> int:
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            raise self.error(name, "must be a non-negative integer")
        return v

    def opt_int(self, v: Any, name: str) -> int | None:
        return None if v is None else self.as_int(v, name)

    def as_pid(self, v: Any, name: str) -> int:
        # 0 and negative pids mean "my group" / "every process" to kill(2): never from a file.
        if self.as_int(v, name) < 1:
            raise self.error(name, "must be a pid (1 or more)")
        return int(v)

    def as_grace(self, v: Any) -> float:
        if isinstance(v, bool) or not isinstance(v, int | float) or not 0 <= v <= 3600:
            raise self.error("grace", "must be 0..3600 seconds")
        return float(v)

    def as_enum(self, kind: type[StrEnum], v: Any, name: str) -> Any:
        try:
            return kind(v)
        except ValueError:
            raise self.error(name, f"must be one of {', '.join(kind.values())}") from None


def read_pidfile(path: str | Path) -> Pidfile | None:
    """The pidfile next to an inventory, validated; None when there is none."""
    where = str(Path(path).absolute())
    try:
        with open(path, "rb") as fh:
            raw = fh.read(MAX_BYTES + 1)
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise LaunchError(
            f"{where}: unreadable pidfile ({exc.strerror}); remove it if no fdngx supervisor runs"
        ) from None
    if len(raw) > MAX_BYTES:
        raise LaunchError(f"{where}: pidfile over {MAX_BYTES} bytes; remove it if no fdngx supervisor runs")
    try:
        data = json.loads(raw)
    except (ValueError, RecursionError) as exc:
        raise LaunchError(f"{where}: unreadable pidfile ({exc}); remove it if no fdngx supervisor runs") from None
    return Pidfile.from_dict(data, where)


def write_pidfile(path: str | Path, record: Pidfile) -> None:
    atomic_write(Path(path), json.dumps(record.to_dict(), indent=2) + "\n")


def live_supervisor(path: str | Path) -> Pidfile | None:
    """The pidfile's record when its supervisor still runs (same pid and start time, this boot), else None."""
    record = read_pidfile(path)
    ok = record is not None and not record.from_another_boot() and record.supervisor.alive()
    return record if ok else None


def unwritten_lines(record: Pidfile | None) -> list[str]:
    """One line per file a live supervisor cannot write now, for those who look at the launch but not at its
    output (a detached `fdngx launch` returning; `fdngx status`). None from a stale or foreign-boot record."""
    if record is None or record.from_another_boot() or not record.supervisor.alive():
        return []
    return [f"warning: {path}: the launch's supervisor (pid {record.supervisor.pid}) cannot write it "
            f"({why.removeprefix('cannot write it: ')}): it "
            "shows an older state, or none, until it can; the replicas keep running and it tries again every loop"
            for path, why in sorted(record.unwritten.items())]


def remove_pidfile(path: str | Path, pid: int, start: int | None = None) -> None:
    """Remove the pidfile only when it still names that supervisor (pid, and start time when given): a newer
    launch may have replaced it."""
    with contextlib.suppress(Exception):
        record = read_pidfile(path)
        if record is not None and record.supervisor.pid == pid and (start is None or record.supervisor.start == start):
            Path(path).unlink()
