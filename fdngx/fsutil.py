"""File-system primitives: atomic write, backup/restore, advisory lock.

Atomic means: the reader sees the old bytes or the new bytes, never a mix, and a crash half-way leaves
the old file in place. The temp file lives in the target's directory so the rename never crosses a
file system.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write(path: Path, content: str | bytes, mode: int | None = None) -> None:
    """Replace `path` with `content` atomically; keeps the old file's permissions when there is one."""
    path = Path(path)
    data = content.encode("utf-8") if isinstance(content, str) else content
    directory = path.parent if str(path.parent) else Path(".")
    if mode is None:
        try:
            mode = path.stat().st_mode & 0o7777
        except FileNotFoundError:
            mode = 0o644
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    _fsync_dir(directory)


def read_bytes_or_none(path: Path) -> bytes | None:
    try:
        return Path(path).read_bytes()
    except FileNotFoundError:
        return None


def backup_path(path: Path) -> Path:
    return path.with_name(path.name + ".fdngx-bak")


def backup(path: Path) -> Path | None:
    """Copy `path` aside (same directory) before it is replaced; None when there is nothing to keep."""
    if not path.exists():
        return None
    dest = backup_path(path)
    tmp = dest.with_name(dest.name + ".tmp")
    shutil.copy2(path, tmp)
    os.replace(tmp, dest)
    return dest


def restore(path: Path, saved: bytes | None) -> None:
    """Put back what was there before: the old bytes, or no file at all."""
    if saved is None:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
    else:
        atomic_write(path, saved)


@contextlib.contextmanager
def file_lock(path: Path, timeout: float = 60.0) -> Iterator[None]:
    """An exclusive flock on `path` (created if needed); waits up to `timeout` seconds.

    flock is released by the kernel when the process dies, so a crashed cron run never wedges the next one.
    """
    from fdngx.errors import ApplyError

    path = Path(path)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    deadline = time.monotonic() + timeout
    try:
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except OSError as exc:
                if exc.errno not in (errno.EAGAIN, errno.EACCES):
                    raise
                if time.monotonic() >= deadline:
                    raise ApplyError(
                        f"{path}: another fdngx run holds the lock for more than {timeout:.0f}s; giving up"
                    ) from None
                time.sleep(0.05)
        yield
    finally:
        os.close(fd)
