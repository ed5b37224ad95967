"""What a detached supervisor tells the `fdngx launch --detach` that started it, over a pipe of their own.

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
from typing import Any

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
