"""SIGHUPs that come before the sidecar's loop can take them.

The shipped unit starts the sidecar with Type=exec, so `systemctl reload` (ExecReload=kill -HUP) may come as
soon as the process exists, while its set-up (imports, the inventory, the target's checks) still runs for a
good half second. Python leaves SIGHUP at its default action, death, and systemd counts a death by SIGHUP as
clean: Restart=on-failure would not bring the sidecar back. So `fdngx.cli.main` holds SIGHUPs first thing
for `sidecar` (before the command's imports), and the sidecar's own handler takes over once its loop exists,
with the count: a SIGHUP during set-up is one re-read of the inventory as the loop starts, never lost.

Light on purpose (signal only): it runs before anything else is imported.
"""

from __future__ import annotations

import signal
from collections.abc import Callable
from types import FrameType

Handler = Callable[[int, FrameType | None], object]


class EarlyHups:
    """The SIGHUP handler until the sidecar's own: counts, nothing more (a signal handler must not block)."""

    def __init__(self) -> None:
        self.count = 0

    def __call__(self, signum: int, frame: FrameType | None) -> None:
        self.count += 1


def hold() -> None:
    """From now on a SIGHUP is counted, not fatal (main thread only). Kept as it is when already holding."""
    if not isinstance(signal.getsignal(signal.SIGHUP), EarlyHups):
        signal.signal(signal.SIGHUP, EarlyHups())


def hand_over(handler: Handler) -> int:
    """Make `handler` the SIGHUP handler; returns how many SIGHUPs came while they were held (0: none, or
    none were held). One swap, so a SIGHUP is either counted here or goes to `handler`."""
    before = signal.signal(signal.SIGHUP, handler)
    return before.count if isinstance(before, EarlyHups) else 0
