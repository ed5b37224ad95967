"""Best-effort output for the supervisor: nothing it must do (stop the replicas, remove its pidfile) may
depend on a line getting out.

A terminal that hung up (SSH gone: SIGHUP, then EIO), a reader that went away (`| head`, a dead `tee`:
EPIPE) or a closed stream would otherwise raise from the middle of a stop. Such a stream is remembered as
broken and never written again.

Any other failure (a full disk or a quota under `> file` or supervisor.log: ENOSPC, EDQUOT, EFBIG) is not
given up on for good: room may come back, and a log that ends at the full disk reads as a supervisor that
died. But it is not tried for every line either: the lines of the next HOLD seconds are dropped unwritten
(counted), then the stream is tried again; the first line that gets out is preceded by one saying how many
may be missing above it, and why.
"""

from __future__ import annotations

import errno
import time
from collections.abc import Callable
from typing import TextIO

# Errors after which the stream is gone for good.
_GONE = (errno.EPIPE, errno.EIO, errno.EBADF, errno.ENXIO, errno.ECONNRESET)
HOLD = 10.0  # seconds between tries at a stream that failed otherwise (no room)


class Out:
    """Writes lines to a stream, swallowing what breaking it raises (OSError, ValueError)."""

    def __init__(self, stream: TextIO, clock: Callable[[], float] = time.monotonic) -> None:
        self.stream = stream
        self.clock = clock
        self.broken = False
        self.lost = 0  # writes not made (failed, or held back) since the stream last failed
        self.why = ""  # why it failed last
        self.retry_at = 0.0  # clock time before which a stream that failed is not tried again
        try:
            self.tty = stream.isatty()
        except (OSError, ValueError):
            self.tty = False

    def write(self, text: str) -> bool:
        """Write and flush `text`; False when it did not get out (and will not, once the stream is broken)."""
        if self.broken:
            return False
        if self.lost and self.clock() < self.retry_at:
            self.lost += 1
            return False
        note = (f"fdngx: up to {self.lost} line(s) of output missing here ({self.why}): lost while it could "
                "not be written\n") if self.lost else ""
        try:
            self.stream.write(note + text)
            self.stream.flush()
        except ValueError:  # closed
            self.broken = True
            return False
        except OSError as exc:
            self.broken = exc.errno in _GONE or exc.errno is None
            self.lost += 1
            self.why = exc.strerror or type(exc).__name__
            self.retry_at = self.clock() + HOLD
            return False
        self.lost = 0
        return True

    def line(self, text: str) -> bool:
        return self.write(text + "\n")
