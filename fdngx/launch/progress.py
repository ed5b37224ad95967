"""Launch progress on stderr: a redrawn bar on a terminal, one line per change otherwise (logs).

Off a terminal (journald, a log file, CI) a change line alone leaves a 10-minute FastDeploy load silent:
a summary line every HEARTBEAT seconds says the launch is still waiting, and on what. Every line goes
through fdngx.launch.output.Out: a stream that broke is given up on, never raised from.
"""

from __future__ import annotations

import shutil
import sys
import time
from collections.abc import Callable
from typing import TextIO

from fdngx.launch.output import Out

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
        self.w = Out(self.out)
        self.tty = self.w.tty
        self.timeout = timeout
        self.clock = clock
        self.heartbeat = heartbeat
        self.t0 = clock()
        self.last_line = self.t0
        self.last: dict[str, str] = {}
        self.drawn = False

    def begin(self) -> None:
        """A new wait (a restart): elapsed times and the heartbeat count from now."""
        self.t0 = self.last_line = self.clock()

    def say(self, msg: str) -> None:
        self._clear()
        self.w.line(f"fdngx: {msg}")
        self.last_line = self.clock()

    def text(self, text: str) -> None:
        """Lines as they are (a log's tail)."""
        self._clear()
        self.w.line(text)

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
            self.drawn = self.w.write("\r\x1b[K" + line)
        else:
            changed = False
            for n in self.names:
                if status.get(n) and status.get(n) != self.last.get(n):
                    self.w.line(f"fdngx: {n}: {status[n]} ({elapsed:.1f}s)")
                    changed = True
            if changed:
                self.last_line = now
            elif pending and now - self.last_line >= self.heartbeat:
                of = f" of {self.timeout:.0f}s" if self.timeout else ""
                self.w.line(f"fdngx: still waiting after {elapsed:.0f}s{of}: {ok}/{len(self.names)} healthy; {pending}")
                self.last_line = now
        self.last = dict(status)

    def _clear(self) -> None:
        if self.tty and self.drawn:
            self.w.write("\r\x1b[K")
            self.drawn = False
