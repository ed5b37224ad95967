"""What a supervisor and the commands around it tell each other besides signals: a detached supervisor's
reports to the `fdngx launch --detach` that started it (a pipe), and the grace `fdngx stop --grace N` asks
of a running supervisor (a file beside its pidfile; below).

The pidfile and supervisor.log may sit on a full or read-only file system: a parent that learnt of the
start only from them waited out its deadline and stopped healthy replicas, and said "exited with status 1"
of a supervisor whose error went to a log with no room. So the supervisor also sends each state it records
(the pidfile's record, with the files it cannot write, the pidfile itself included) and its last error as
one JSON line each on a descriptor the parent passed it (`--status-fd`). Neither end touches a file.

The supervisor's end never blocks and never raises: a parent that stops reading (Ctrl-Z) cannot stall the
supervision (only the message being written and the newest are kept), one that has gone (it returns once
the replicas are ready) just closes the pipe.
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import Any

from fdngx.errors import FdngxError, os_error_line
from fdngx.system import procs
from fdngx.system.files import atomic_write

KEEP = 2  # messages queued while the parent does not read: the one being written and the newest


class Reporter:
    """The supervisor's end; `fd` None: there is nobody to tell (a foreground launch)."""

    def __init__(self, fd: int | None = None) -> None:
        self.fd = -1 if fd is None else fd
        self.queue: list[bytes] = []
        self.done = False  # the last message (ready, failed) is queued: nothing after it
        if self.fd >= 0:
            with contextlib.suppress(OSError):
                os.set_blocking(self.fd, False)

    def send(self, message: dict[str, Any], last: bool = False) -> None:
        if self.fd < 0 or self.done:
            return
        self.queue.append((json.dumps(message) + "\n").encode())
        if len(self.queue) > KEEP:
            del self.queue[1:-1]
        self.done = last
        self.drain()

    def drain(self) -> None:
        """Write what is queued, as far as the pipe takes it; close once the last message is out."""
        while self.fd >= 0 and self.queue:
            try:
                n = os.write(self.fd, self.queue[0])
            except BlockingIOError:
                return
            except OSError:  # EPIPE: the parent is gone
                self.close()
                return
            self.queue[0] = self.queue[0][n:]
            if not self.queue[0]:
                self.queue.pop(0)
        if self.done:
            self.close()

    def close(self) -> None:
        self.queue.clear()
        if self.fd >= 0:
            with contextlib.suppress(OSError):
                os.close(self.fd)
            self.fd = -1


class Listener:
    """The parent's end: poll() returns the messages that arrived since the last call."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.buf = b""
        self.eof = False
        os.set_blocking(fd, False)

    def poll(self) -> list[dict[str, Any]]:
        while not self.eof:
            try:
                chunk = os.read(self.fd, 65536)
            except BlockingIOError:
                break
            except OSError:
                chunk = b""
            if not chunk:
                self.eof = True
            self.buf += chunk
        *lines, self.buf = self.buf.split(b"\n")
        out = []
        for line in lines:
            with contextlib.suppress(ValueError):
                doc = json.loads(line)
                if isinstance(doc, dict):
                    out.append(doc)
        return out

    def close(self) -> None:
        if self.fd >= 0:
            with contextlib.suppress(OSError):
                os.close(self.fd)
            self.fd = -1


# -- `fdngx stop --grace N` to a running supervisor ---------------------------------------------------------
#
# A signal carries no number, so `fdngx stop` leaves its grace beside the pidfile (`<pidfile>.stop`) before
# its SIGTERM; the supervisor takes it (and removes the file: stop's sign that it was read) when that SIGTERM
# starts its shutdown. `fdngx stop` itself kills what is left after N seconds, so that it knows, and says,
# which replicas were killed; the supervisor waits STOP_MARGIN seconds longer before it would kill anything.

STOP_MARGIN = 5.0
MAX_REQUEST = 4096


def request_path(pidfile: str | Path) -> Path:
    return Path(f"{pidfile}.stop")


def ask_grace(pidfile: str | Path, supervisor: tuple[int, int | None], grace: float) -> str | None:
    """Leave `grace` for that supervisor (pid, start time); None when done, else why it could not be."""
    me = os.getpid()
    doc = {"grace": grace, "supervisor": list(supervisor), "by": [me, procs.starttime(me)]}
    try:
        atomic_write(request_path(pidfile), json.dumps(doc) + "\n", private=True)
    except (OSError, FdngxError) as exc:
        return os_error_line(exc) if isinstance(exc, OSError) else str(exc)
    return None


def withdraw(pidfile: str | Path, supervisor: tuple[int, int | None]) -> None:
    """Remove a request left for that supervisor (it exited before it read it)."""
    doc = _request(pidfile)
    if doc is not None and doc["supervisor"] == list(supervisor):
        with contextlib.suppress(OSError):
            request_path(pidfile).unlink()


def asked_grace(pidfile: str | Path) -> tuple[float, int] | None:
    """The supervisor's side: (grace, pid of the `fdngx stop` asking) when a live `fdngx stop` left one for this
    very process; the request is removed once read (a stale one too, when its asker is gone)."""
    me = os.getpid()
    doc = _request(pidfile)
    if doc is None or doc["supervisor"] != [me, procs.starttime(me)]:
        return None
    with contextlib.suppress(OSError):
        request_path(pidfile).unlink()
    by, start = doc["by"]
    return (float(doc["grace"]), by) if procs.same_process(by, start) else None


def _request(pidfile: str | Path) -> dict[str, Any] | None:
    """The request file, when there is one of the right shape (anything else is no request)."""
    try:
        fd = os.open(request_path(pidfile), os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
        with os.fdopen(fd, "rb") as fh:
            doc = json.loads(fh.read(MAX_REQUEST))
    except (OSError, ValueError):
        return None
    ok = (isinstance(doc, dict) and isinstance(doc.get("grace"), int | float) and not isinstance(doc["grace"], bool)
          and 0 <= doc["grace"] <= 3600 and _pair(doc.get("supervisor")) and _pair(doc.get("by")))
    return doc if ok else None


def _pair(v: Any) -> bool:
    return isinstance(v, list) and len(v) == 2 and all(isinstance(x, int) and not isinstance(x, bool) for x in v)
