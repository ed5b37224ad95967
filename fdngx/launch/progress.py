"""Launch progress on stderr: a redrawn bar on a terminal, one line per change otherwise (logs).

Off a terminal (journald, a log file, CI) a change line alone leaves a 10-minute FastDeploy load silent:
a summary line every HEARTBEAT seconds says the launch is still waiting, and on what.
"""

from __future__ import annotations

import shutil
import sys
import time
from collections.abc import Callable
from typing import TextIO

HEARTBEAT = 30.0
HEALTHY = "healthy"


class Progress:
    """Per-instance status on stderr: a redrawn bar on a terminal, one line per change otherwise (logs)."""

    def __init__(
        self,
        names: list[str],
        out: TextIO | None = None,
        timeout: float = 0.0,
        clock: Callable[[], float] = time.monotonic,
        heartbeat: float = HEARTBEAT,
    ) -> None:
        self.names = names
        self.out = out or sys.stderr
        self.tty = self.out.isatty()
        self.timeout = timeout
        self.clock = clock
        self.heartbeat = heartbeat
        self.t0 = clock()
        self.last_line = self.t0
        self.last: dict[str, str] = {}
        self.drawn = False

    def say(self, msg: str) -> None:
        self._clear()
        print(f"fdngx: {msg}", file=self.out, flush=True)
        self.last_line = self.clock()

    def update(self, status: dict[str, str]) -> None:
        now = self.clock()
        elapsed = now - self.t0
        ok = sum(1 for n in self.names if status.get(n) == HEALTHY)
        pending = ", ".join(f"{n}: {status.get(n, '?')}" for n in self.names if status.get(n) != HEALTHY)
        if self.tty:
            width = 20
            fill = int(width * ok / max(1, len(self.names)))
            cols = shutil.get_terminal_size((100, 20)).columns
            line = f"[{'#' * fill}{'.' * (width - fill)}] {ok}/{len(self.names)} healthy {elapsed:4.0f}s"
            line += f"/{self.timeout:.0f}s" if self.timeout else ""
            line = (line + ("  " + pending if pending else ""))[: cols - 1]
            self.out.write("\r\x1b[K" + line)
            self.out.flush()
            self.drawn = True
        else:
            changed = False
            for n in self.names:
                if status.get(n) and status.get(n) != self.last.get(n):
                    print(f"fdngx: {n}: {status[n]} ({elapsed:.1f}s)", file=self.out, flush=True)
                    changed = True
            if changed:
                self.last_line = now
            elif pending and now - self.last_line >= self.heartbeat:
                of = f" of {self.timeout:.0f}s" if self.timeout else ""
                print(f"fdngx: still waiting after {elapsed:.0f}s{of}: {ok}/{len(self.names)} healthy; {pending}",
                      file=self.out, flush=True)
                self.last_line = now
        self.last = dict(status)

    def _clear(self) -> None:
        if self.tty and self.drawn:
            self.out.write("\r\x1b[K")
            self.drawn = False
