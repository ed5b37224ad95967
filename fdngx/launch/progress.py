"""Launch progress on stderr: a redrawn bar on a terminal, one line per change otherwise (logs)."""

from __future__ import annotations

import shutil
import sys
import time
from typing import TextIO


class Progress:
    """Per-instance status on stderr: a redrawn bar on a terminal, one line per change otherwise (logs)."""

    def __init__(self, names: list[str], out: TextIO | None = None, timeout: float = 0.0) -> None:
        self.names = names
        self.out = out or sys.stderr
        self.tty = self.out.isatty()
        self.timeout = timeout
        self.t0 = time.monotonic()
        self.last: dict[str, str] = {}
        self.drawn = False

    def say(self, msg: str) -> None:
        self._clear()
        print(f"fdngx: {msg}", file=self.out, flush=True)

    def update(self, status: dict[str, str]) -> None:
        elapsed = time.monotonic() - self.t0
        if self.tty:
            ok = sum(1 for n in self.names if status.get(n) == "healthy")
            width = 20
            fill = int(width * ok / max(1, len(self.names)))
            pending = ", ".join(f"{n}: {status.get(n, '?')}" for n in self.names if status.get(n) != "healthy")
            cols = shutil.get_terminal_size((100, 20)).columns
            line = f"[{'#' * fill}{'.' * (width - fill)}] {ok}/{len(self.names)} healthy {elapsed:4.0f}s"
            line += f"/{self.timeout:.0f}s" if self.timeout else ""
            line = (line + ("  " + pending if pending else ""))[: cols - 1]
            self.out.write("\r\x1b[K" + line)
            self.out.flush()
            self.drawn = True
        else:
            for n in self.names:
                if status.get(n) and status.get(n) != self.last.get(n):
                    print(f"fdngx: {n}: {status[n]} ({elapsed:.1f}s)", file=self.out, flush=True)
        self.last = dict(status)

    def _clear(self) -> None:
        if self.tty and self.drawn:
            self.out.write("\r\x1b[K")
            self.drawn = False


