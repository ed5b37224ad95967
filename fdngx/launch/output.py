"""Best-effort output for the supervisor: nothing it must do (stop the replicas, remove its pidfile) may
depend on a line getting out.

A terminal that hung up (SSH gone: SIGHUP, then EIO), a reader that went away (`| head`, a dead `tee`:
EPIPE) or a closed stream would otherwise raise from the middle of a stop. Such a stream is remembered as
broken and never written again; a full disk under a log file only loses the line (later ones may fit).
"""

from __future__ import annotations

import errno
from typing import TextIO

# Errors after which the stream is gone for good; others (ENOSPC, EDQUOT) lose only the line.
_GONE = (errno.EPIPE, errno.EIO, errno.EBADF, errno.ENXIO, errno.ECONNRESET)


class Out:
    """Writes lines to a stream, swallowing what breaking it raises (OSError, ValueError)."""

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream
        self.broken = False
        try:
            self.tty = stream.isatty()
        except (OSError, ValueError):
            self.tty = False

    def write(self, text: str) -> bool:
        """Write and flush `text`; False when it did not get out (and will not, once the stream is broken)."""
        if self.broken:
            return False
        try:
            self.stream.write(text)
            self.stream.flush()
        except ValueError:  # closed
            self.broken = True
            return False
        except OSError as exc:
            self.broken = exc.errno in _GONE or exc.errno is None
            return False
        return True

    def line(self, text: str) -> bool:
        return self.write(text + "\n")
