"""The supervisor's pidfile (`<inventory>.pid`): who supervises which processes, and their state."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Any

from fdngx.errors import LaunchError
from fdngx.system import procs
from fdngx.system.files import atomic_write


def read_pidfile(path: str | Path) -> dict[str, Any] | None:
    try:
        data = json.loads(Path(path).read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise LaunchError(f"{path}: unreadable pidfile ({exc}); remove it if no fdngx supervisor runs") from None
    return data if isinstance(data, dict) else None


def write_pidfile(path: str | Path, data: dict[str, Any]) -> None:
    atomic_write(Path(path), json.dumps(data, indent=2) + "\n")


def live_supervisor(path: str | Path) -> dict[str, Any] | None:
    """The pidfile's content when its supervisor still runs (same pid and start time), else None."""
    data = read_pidfile(path)
    sup = (data or {}).get("supervisor") or {}
    if data and procs.same_process(int(sup.get("pid", 0)), sup.get("start")):
        return data
    return None


def remove_pidfile(path: str | Path, pid: int) -> None:
    """Remove the pidfile only when it is still ours (a newer launch may have replaced it)."""
    with contextlib.suppress(Exception):
        data = read_pidfile(path)
        if data and data.get("supervisor", {}).get("pid") == pid:
            Path(path).unlink()


