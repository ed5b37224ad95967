"""What the pidfile beside an inventory says about its launch, for those who were not there when it ended:
`fdngx status`, `fdngx stop` and the next `fdngx launch`.

Where the pidfile is (find): beside the file the inventory is (plan.pidfile_for: a symlink's target). An
older fdngx kept it beside the name the launch was given (legacy_pidfile): for a launch it started through a
symlink, that is beside the link, where it is looked for when the first is absent, and said.

A supervisor that ends on its own removes its pidfile. A pidfile whose supervisor is not running any more
(Gone) means it was killed (kill -9, the OOM killer), a detached start failed with nobody left to clean up
after it (its error is recorded: fdngx.launch.detach), or the machine restarted. Nothing then supervises or
restarts the replicas, and the inventory's `status` fields are the supervisor's last word: said in one line
naming the supervisor, how it ended, what still runs and what to do.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fdngx import inventory as inv_mod
from fdngx.errors import FdngxError, os_error_line
from fdngx.launch.pidfile import LaunchState, Pidfile, read_pidfile, unwritten_lines
from fdngx.launch.plan import pidfile_for

# An instance the launch's supervisor last recorded as one of these was in its care when it ended.
SUPERVISED = ("starting", "running", "down")


@dataclass(frozen=True)
class Found:
    path: str  # the pidfile
    record: Pidfile
    legacy: bool = False  # beside a symlink's own name, where an older fdngx wrote it


def legacy_pidfile(inventory: str | Path) -> str | None:
    """Where an older fdngx wrote the pidfile of a launch through this name (beside the name as given, not the
    file a symlink points to); None when that is where it is now (not a symlink)."""
    old = str(Path(inventory).absolute()) + ".pid"
    return None if old == pidfile_for(inventory) else old


def find(inventory: str | Path) -> Found | None:
    """The pidfile beside the inventory; else an older fdngx's beside the symlink's name; None when neither is
    there. An unreadable one raises LaunchError (fdngx.launch.pidfile.read_pidfile)."""
    current = pidfile_for(inventory)
    record = read_pidfile(current)
    if record is not None:
        return Found(current, record)
    old = legacy_pidfile(inventory)
    record = read_pidfile(old) if old is not None else None
    return Found(old, record, legacy=True) if old is not None and record is not None else None


def legacy_line(inventory: str | Path, found: Found) -> str:
    return (f"{found.path}: an older fdngx's pidfile, beside the symlink's name (pidfiles are now kept beside the "
            f"file it points to, {pidfile_for(inventory)})")


def is_gone(record: Pidfile) -> bool:
    return record.from_another_boot() or not record.supervisor.alive()


def failed_start(record: Pidfile) -> bool:
    """It recorded a failed start (a detached supervisor leaves that to the launch that follows it)."""
    return record.state is LaunchState.FAILED and bool(record.error)


def how_it_ended(found: Found) -> str:
    """How a gone supervisor ended, as far as its pidfile tells."""
    if found.record.from_another_boot():
        return f"{found.path} was written before the machine restarted"
    if failed_start(found.record):
        return f"the launch failed: {found.record.error}"
    return (f"it ended without removing {found.path}: killed (kill -9, the OOM killer: journalctl -k | grep -i "
            "oom) or crashed")


@dataclass(frozen=True)
class Gone:
    """A launch whose supervisor is not running any more though its pidfile stays."""

    inventory: str
    found: Found
    left: list[int]  # processes it started that still run (pidfile.still_running)

    @property
    def failed(self) -> bool:
        return failed_start(self.found.record)

    def line(self) -> str:
        """The one line `fdngx status` says (after "fdngx: ")."""
        pid = self.found.record.supervisor.pid
        where = f" (its pidfile {self.found.path}: an older fdngx's, beside the symlink's name)" \
            if self.found.legacy else ""
        stop = f"'fdngx stop --inventory {self.inventory}'"
        if self.left:
            todo = (f"processes it started still run, unsupervised (pid {', '.join(map(str, self.left))}): {stop} "
                    "stops them and removes its pidfile; then 'fdngx launch' again")
        else:
            todo = f"nothing it started runs any more: 'fdngx launch' again ({stop} removes its pidfile)"
        stale = "" if self.failed else "; the inventory's status fields still say what it last saw"
        return (f"warning: {self.inventory}: the launch's supervisor (pid {pid}) is not running any more{where}: "
                f"{how_it_ended(self.found)}{stale}; {todo}")

    def to_json(self) -> dict[str, Any]:
        record = self.found.record
        return {"inventory": self.inventory, "pidfile": self.found.path, "legacy_pidfile": self.found.legacy,
                "supervisor_pid": record.supervisor.pid, "state": record.state.value, "error": record.error,
                "still_running": self.left, "note": self.line().removeprefix("warning: ")}


def gone(inventory: str | Path, found: Found | None) -> Gone | None:
    if found is None or not is_gone(found.record):
        return None
    return Gone(str(Path(inventory).absolute()), found, found.record.still_running())


def notes(inventories: Iterable[Path]) -> tuple[tuple[str, ...], tuple[Gone, ...]]:
    """For `fdngx status`: the warnings of the launch beside each inventory: files its running supervisor cannot
    write (pidfile.unwritten_lines), and a supervisor that is gone. No pidfile, or one that cannot be read:
    nothing, never an error (status is not the launch's judge)."""
    lines: list[str] = []
    ended: list[Gone] = []
    for path in inventories:
        try:
            found = find(path)
            if found is None:
                continue
            lines += unwritten_lines(found.record)
            if (g := gone(path, found)) is not None:
                ended.append(g)
        except (FdngxError, OSError, ValueError):
            continue
    return tuple(dict.fromkeys(lines)), tuple(ended)


def mark_stopped(inventory: str | Path, record: Pidfile, stopped: set[int]) -> str | None:
    """After `fdngx stop` of a gone supervisor's launch: its instances still recorded in its care (same name,
    same pid) say "stopped" (their process was among `stopped`) or "exited" (gone before), as the supervisor
    would have written. None when done (or nothing to do), else why not, for a line."""
    ours = {(name, c.pid): "stopped" if c.pid in stopped else "exited"
            for c in record.children if c.pid is not None for name in c.instances}
    try:
        with inv_mod.lock(inventory, timeout=5.0):
            inv = inv_mod.load(inventory)
            mine = [i for i in inv.instances
                    if (i.name, i.extra.get("pid")) in ours and i.extra.get("status") in SUPERVISED]
            for inst in mine:
                inst.extra["status"] = ours[inst.name, inst.extra["pid"]]
            if mine:
                inv_mod.save(inv, inventory)
    except (OSError, FdngxError) as exc:
        return os_error_line(exc) if isinstance(exc, OSError) else str(exc)
    return None


def replaced_line(found: Found) -> str | None:
    """What a new launch says of the pidfile it replaces, when its supervisor is gone (and nothing it started
    runs: else the launch is refused): how that launch ended, which nobody may have seen."""
    if not is_gone(found.record):
        return None
    then = "removing it (an older fdngx's, beside the symlink's name)" if found.legacy else "replacing its pidfile"
    return (f"{found.path}: the last launch with this inventory (supervisor pid {found.record.supervisor.pid}) is "
            f"over: {how_it_ended(found)}; {then}")
