"""One sidecar per nginx config: the sidecar holds an flock beside its --out for its whole life.

A sidecar puts right, at its next cycle, a config file someone else wrote (fdngx.weights.controller): two
sidecars (or a sidecar and cron's `sidecar --once`) on one file would undo each other's writes every cycle,
a reload each time. So the second one is refused at start, naming the first (a `--once` run waits for the
lock first: overlapping cron runs take turns). `fdngx render` to a file a
sidecar holds is not refused (an operator may mean it), but warned: the sidecar's next cycle rewrites it.

The lock is `.<config>.fdngx-sidecar.lock` beside the config's real file (fdngx.nginx.apply.aside), taken
with fdngx.system.files.file_lock (never through a symlink, ours); the kernel drops it when the process dies.
Its holder writes what it is into it (`sidecar` or `once`): a `--once` run that finds a long-running sidecar
there is refused at once instead of waiting its whole wait for a lock that is never given back.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
from pathlib import Path

from fdngx.errors import ApplyError, FdngxError
from fdngx.nginx.apply import aside
from fdngx.system.files import file_lock, real_target


def owner_lock(out: Path) -> Path:
    return aside(real_target(out), "sidecar.lock")


def hold(out: Path | None, wait: float = 0.0) -> contextlib.ExitStack:
    """Take the config's sidecar lock for as long as the returned stack is open (nothing to take without a
    config: a controller that only pushes), waiting up to `wait` s for it (cron's `--once` runs take turns).
    Raises FdngxError (exit 1: a state of the machine, not a mistake in the command) when another sidecar
    holds it."""
    stack = contextlib.ExitStack()
    if out is None:
        return stack
    if wait > 0 and held(out) and _kind(out) == DAEMON:
        raise FdngxError(f"{out}: a running fdngx sidecar manages this config (its lock "
                         f"{owner_lock(out)}): its cycles do what --once would; leave it to them, or stop it first")
    try:
        stack.enter_context(file_lock(owner_lock(out), timeout=wait))
    except ApplyError as exc:
        stack.close()
        raise FdngxError(f"{out}: another fdngx sidecar manages this config ({exc}): one sidecar per config, "
                         "two would undo each other's writes; stop that one first") from None
    _say_kind(out, ONCE if wait > 0 else DAEMON)
    return stack


DAEMON, ONCE = "sidecar", "once"


def _say_kind(out: Path, kind: str) -> None:
    """Write what holds the lock into the lock file (best effort: only a waiting --once reads it)."""
    with contextlib.suppress(OSError):
        fd = os.open(owner_lock(out), os.O_WRONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        try:
            os.ftruncate(fd, 0)
            os.write(fd, kind.encode() + b"\n")
        finally:
            os.close(fd)


def _kind(out: Path) -> str:
    try:
        fd = os.open(owner_lock(out), os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
    except OSError:
        return ""
    try:
        return os.read(fd, 64).decode("ascii", "replace").strip()
    finally:
        os.close(fd)


def held(out: Path) -> bool:
    """Whether a running sidecar holds `out`'s lock (never creates the lock file)."""
    try:
        fd = os.open(owner_lock(out), os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except OSError as exc:
        return exc.errno in (errno.EAGAIN, errno.EACCES)
    finally:
        os.close(fd)
    return False
