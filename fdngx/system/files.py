"""File-system primitives that stay safe in a directory other accounts can write to.

- atomic_write: the reader sees the old bytes or the new bytes, never a mix; a crash half-way leaves the
  old file. The temp file is created exclusively (O_EXCL: a planted file or symlink makes it fail, never
  followed) in the target's directory, so the rename never crosses a file system. A symlinked path is
  followed: its target is replaced and the link kept (Debian's sites-enabled -> sites-available). The
  replaced file's owner, group and mode are kept.
- read_regular_file: regular files only (a FIFO would hang the reader while it holds a lock), bounded.
- file_lock: the lock file is opened with O_NOFOLLOW and must be a regular file we own (or one of the
  `owners` the caller names); a wait for it ends early (LockWaitStopped) when the caller's `stop` event is
  set (a stopping sidecar).
- check_private: token and state files must belong to us and not be writable by anyone else.
- atomic_write(private=True): fdngx's own files beside the config (backup, journal, state) replace what
  is at their path, a planted symlink included, instead of writing through it.
"""

from __future__ import annotations

import contextlib
import contextvars
import errno
import fcntl
import glob
import logging
import os
import secrets
import stat
import threading
import time
from collections.abc import Collection, Iterator
from pathlib import Path

from fdngx.errors import ApplyError, UnsafeFileError

log = logging.getLogger("fdngx.files")

# A lock wait longer than this is said once, naming the holder (at _WAIT_LEVEL): an apply waits up to two minutes.
LOCK_PATIENCE = 1.0
_WAIT_LEVEL: contextvars.ContextVar[int] = contextvars.ContextVar("fdngx_lock_wait_level", default=logging.INFO)
# A temp file beside NAME is `.NAME.<8 of these>.fdngx-tmp` (the shape tempfile.mkstemp gave them before): the
# random part has no dot, so NAME's temps and a sibling's (`NAME.bak`: `.NAME.bak.<8>.fdngx-tmp`) never mix.
_TEMP_CHARS = "abcdefghijklmnopqrstuvwxyz0123456789_"
_TEMP_LEN = 8
TEMP_SUFFIX = ".fdngx-tmp"


class LockWaitStopped(ApplyError):
    """A wait for a lock ended by the caller's stop event: the lock was not taken."""


def _fsync_dir(directory: Path) -> None:
    with contextlib.suppress(OSError):  # best effort: a file system without directory fsync
        fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def real_target(path: Path) -> Path:
    """Where a write to `path` lands: `path`, or the final target of a symlink chain (absolute)."""
    path = Path(path).absolute()
    return Path(os.path.realpath(path)) if path.is_symlink() else path


def temp_glob(target: Path) -> str:
    """A glob (relative to `target`'s directory) that matches write_beside's temp files for `target` only."""
    return f".{glob.escape(target.name)}.{'[a-z0-9_]' * _TEMP_LEN}{TEMP_SUFFIX}"


def _temp_path(target: Path) -> Path:
    rand = "".join(secrets.choice(_TEMP_CHARS) for _ in range(_TEMP_LEN))
    return target.parent / f".{target.name}.{rand}{TEMP_SUFFIX}"


def _create_beside(target: Path) -> tuple[int, Path]:
    """A new temp file beside `target`, created exclusively (never through a planted file or symlink)."""
    for _ in range(100):
        tmp = _temp_path(target)
        try:
            return os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600), tmp
        except FileExistsError:
            continue
    raise FileExistsError(errno.EEXIST, "no unused temp file name", str(target.parent))


def write_beside(target: Path, data: bytes, perm: int, owner: tuple[int, int] | None = None) -> Path:
    """`data` in a new exclusive temp file beside `target` (see temp_glob), mode `perm`, given to `owner`
    (uid, gid) when that is not us and we may, synced; returns its path. On failure nothing is left behind,
    and an error that names no file (a full disk, a file size limit) names `target`."""
    try:
        fd, tmp = _create_beside(target)
    except OSError as exc:  # it names the random temp name: name the file and its directory instead
        why = "no such directory" if exc.errno == errno.ENOENT else exc.strerror or str(exc)
        raise OSError(exc.errno, f"cannot write it in {target.parent}: {why}; the file is unchanged",
                      str(target)) from exc
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            if owner is not None and owner != (os.geteuid(), os.getegid()):
                with contextlib.suppress(PermissionError):  # only root may give a file away
                    os.fchown(fh.fileno(), *owner)
            os.fchmod(fh.fileno(), perm)
            os.fsync(fh.fileno())
    except BaseException as exc:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        if isinstance(exc, OSError) and exc.filename is None:
            # write and fsync errors name no file: name it, and say first that the old file is untouched.
            raise OSError(exc.errno, f"cannot write it: {exc.strerror or exc}; the file is unchanged",
                          str(target)) from exc
        raise
    return tmp


def atomic_write(path: Path, content: str | bytes, mode: int | None = None, *, private: bool = False) -> Path:
    """Replace `path` (through a symlink: its target) with `content` atomically; returns the file written.

    Keeps the old file's mode, owner and group; `mode` applies to a new file (default 0644) or forces one.
    `private` (fdngx's own files: backup, journal, state, token): `path` itself is replaced, a symlink
    planted there is replaced and never followed, the file is ours (no foreign owner kept), mode 0600
    unless `mode` says otherwise.
    """
    target = Path(path).absolute() if private else real_target(Path(path))
    data = content.encode("utf-8") if isinstance(content, str) else content
    try:
        old = os.stat(target, follow_symlinks=False)
    except FileNotFoundError:
        old = None
    if old is not None and not stat.S_ISREG(old.st_mode) and not (private and stat.S_ISLNK(old.st_mode)):
        raise UnsafeFileError(f"{target}: not a regular file; refusing to replace it")
    if private:
        perm = 0o600 if mode is None else mode
        old = None  # nothing of a planted file is kept: not its owner, not its mode
    else:
        perm = mode if mode is not None else (stat.S_IMODE(old.st_mode) if old is not None else 0o644)
    tmp = write_beside(target, data, perm, (old.st_uid, old.st_gid) if old is not None else None)
    try:
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    _fsync_dir(target.parent)
    return target


def read_regular_file(path: Path, max_bytes: int, *, follow_symlinks: bool = True) -> bytes:
    """The bytes of a regular file (symlinks to one are fine unless `follow_symlinks` is False), at most
    `max_bytes`; OSError otherwise.

    Opened non-blocking so a FIFO cannot hang us, then checked with fstat.
    """
    nofollow = 0 if follow_symlinks else os.O_NOFOLLOW
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | nofollow)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise OSError(errno.EINVAL, "not a regular file", str(path))
        chunks, size = [], 0
        while chunk := os.read(fd, 1 << 20):
            size += len(chunk)
            if size > max_bytes:
                raise OSError(errno.EFBIG, f"larger than {max_bytes} bytes", str(path))
            chunks.append(chunk)
        return b"".join(chunks)
    finally:
        os.close(fd)


def read_bytes_or_none(path: Path, max_bytes: int = 64 << 20) -> bytes | None:
    try:
        return read_regular_file(path, max_bytes)
    except FileNotFoundError:
        return None


Identity = tuple[int, int, int, int]


def identity(path: Path, *, follow_symlinks: bool = True) -> Identity | None:
    """A file's (device, inode, size, mtime_ns); None when it is not there (or cannot be looked at). Any one
    changing says the file was written or replaced, without reading it."""
    try:
        st = os.stat(path, follow_symlinks=follow_symlinks)
    except OSError:
        return None
    return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns


def remove(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


def _holds(path: Path, expected: bytes) -> bool:
    """Is `path` itself (not through a symlink) a regular file holding exactly `expected`?"""
    try:
        return read_regular_file(path, len(expected), follow_symlinks=False) == expected
    except OSError:
        return False


def link_backup(live: Path, backup: Path, expected: bytes) -> bool:
    """Keep the file `live` (holding `expected`) at `backup` too, as a second hard link: nothing is written,
    so it takes no disk space, and the backup is the very file (owner, group, mode) restore_by_rename puts back.

    Only for a regular file of ours that nobody else can write (what check_private asks of a backup). False
    when that, or the link, cannot be (another owner, a file system without hard links, `live` changed
    meanwhile): the caller writes a copy instead."""
    try:
        st = os.stat(live, follow_symlinks=False)
    except OSError:
        return False
    if not stat.S_ISREG(st.st_mode) or st.st_uid != os.geteuid() or st.st_mode & 0o022:
        return False
    try:
        remove(backup)  # a planted symlink is removed, never followed; linkat refuses a name that exists
        os.link(live, backup, follow_symlinks=False)
    except OSError:
        return False
    if not _holds(backup, expected):
        with contextlib.suppress(OSError):
            remove(backup)
        return False
    _fsync_dir(backup.parent)
    return True


def restore_by_rename(backup: Path, target: Path, expected: bytes) -> bool:
    """Put `backup` back at `target` by a rename: nothing is written, so a rollback works on a full disk.

    Only when `backup` holds exactly `expected` and has the owner, group and mode of the file it replaces
    (the candidate got the previous file's; a backup kept by link_backup is that file). False otherwise, or
    when the rename fails: the caller writes the bytes instead. The backup is gone afterwards."""
    try:
        kept = os.stat(backup, follow_symlinks=False)
        now = os.stat(target, follow_symlinks=False)
    except OSError:
        return False
    if (kept.st_uid, kept.st_gid, kept.st_mode) != (now.st_uid, now.st_gid, now.st_mode):
        return False
    if not _holds(backup, expected):
        return False
    try:
        os.replace(backup, target)
    except OSError:
        return False
    _fsync_dir(target.parent)
    return True


def check_private(path: Path, what: str, *, secret: bool = False) -> None:
    """Refuse a file another account could have planted or can change: it must be a regular file (not a
    symlink) owned by us, writable by nobody else (a `secret` readable by nobody else either, as ssh wants
    of a key). Raises UnsafeFileError with the fix."""
    try:
        st = os.stat(path, follow_symlinks=False)
    except FileNotFoundError:
        return
    if stat.S_ISLNK(st.st_mode) or not stat.S_ISREG(st.st_mode):
        raise UnsafeFileError(f"{path}: the {what} must be a regular file, not a symlink or special file")
    if st.st_uid != os.geteuid():
        raise UnsafeFileError(
            f"{path}: the {what} belongs to uid {st.st_uid}, not to this user (uid {os.geteuid()}); "
            "remove it and let fdngx create it"
        )
    if st.st_mode & (0o077 if secret else 0o022):
        how = "readable or writable" if secret else "writable"
        fix = "go-rwx" if secret else "go-w"
        raise UnsafeFileError(
            f"{path}: the {what} is {how} by group or others (mode {stat.S_IMODE(st.st_mode):04o}); "
            f"chmod {fix} {path}, or remove it and let fdngx create it"
        )


def writable_by_others(directory: Path) -> bool:
    """Can an account other than ours (and root) create or replace files in `directory`?"""
    try:
        st = os.stat(directory)
    except OSError:
        return False
    if st.st_uid not in (0, os.geteuid()):
        return True
    return bool(st.st_mode & 0o002) or bool(st.st_mode & 0o020 and st.st_gid != os.getegid())


def _held_by(st: os.stat_result, locks: Path = Path("/proc/locks")) -> str:
    """", held by pid N (its command line)" for the file of `st`, from the kernel's lock table; "" when it
    cannot tell (no /proc, another pid namespace, the holder gone)."""
    ident = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
    try:
        table = locks.read_text()
    except OSError:
        return ""
    for line in table.splitlines():
        fields = line.split()
        # "1: FLOCK  ADVISORY  WRITE 1234 fd:01:5678 0 EOF"; a waiter's line has "->" after the number.
        if len(fields) >= 6 and fields[1] == "FLOCK" and fields[5] == ident and fields[4].isdigit():
            pid = int(fields[4])
            try:
                raw = Path(f"/proc/{pid}/cmdline").read_bytes()[:200]
            except OSError:
                raw = b""
            command = " ".join(part.decode("utf-8", "replace") for part in raw.split(b"\0") if part)
            command = "".join(c if c.isprintable() else "?" for c in command)  # one line, whatever argv holds
            command = command if len(command) <= 120 else command[:117] + "..."
            return f", held by pid {pid}" + (f" ({command})" if command and pid > 0 else "")
    return ""


def _open_lock(path: Path, give_to: tuple[int, int] | None) -> int:
    """The lock file's descriptor, never through a symlink. A new one is 0600, ours; made by root for
    `give_to` (uid, gid), it is made as a temp file, given away, then linked into place (link never replaces
    anything), so it never shows at `path` with an owner the other account cannot open. An existing file is
    never chowned: a hard link planted there could be any file."""
    flags = os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK
    if give_to is None or os.geteuid() != 0 or give_to[0] == 0:
        return os.open(path, flags | os.O_CREAT, 0o600)
    for _ in range(100):
        with contextlib.suppress(FileNotFoundError):
            return os.open(path, flags)
        fd, tmp = _create_beside(path)
        try:
            os.fchown(fd, *give_to)
            os.link(tmp, path)
            return fd
        except FileExistsError:  # made meanwhile by someone else: open theirs
            os.close(fd)
        except BaseException:
            os.close(fd)
            raise
        finally:
            remove(tmp)
    raise OSError(errno.EAGAIN, "the lock file keeps appearing and disappearing", str(path))


@contextlib.contextmanager
def lock_waits_said_at(level: int) -> Iterator[None]:
    """Within the block (this thread) file_lock says its waits at `level`; giving up is an error all the same."""
    token = _WAIT_LEVEL.set(level)
    try:
        yield
    finally:
        _WAIT_LEVEL.reset(token)


@contextlib.contextmanager
def file_lock(path: Path, timeout: float = 60.0, *, stop: threading.Event | None = None,
              owners: Collection[int] = (), give_to: tuple[int, int] | None = None) -> Iterator[None]:
    """An exclusive flock on `path` (created 0600 if needed, never through a symlink); waits `timeout` s, or
    until `stop` is set (LockWaitStopped: a stopping process must not wait for another one's apply).

    The lock file must be a regular file owned by us or by one of `owners`; one root creates goes to
    `give_to` (uid, gid) when that is another account (see _open_lock). flock is released by the kernel when
    the process dies, so a crashed cron run never wedges the next one.
    """
    path = Path(path)
    try:
        fd = _open_lock(path, give_to)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise UnsafeFileError(f"{path}: the lock file is a symlink; remove it (someone planted it)") from None
        raise
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_uid not in {os.geteuid(), *owners}:
            also = ", ".join(str(uid) for uid in sorted(set(owners) - {os.geteuid()}))
            raise UnsafeFileError(f"{path}: the lock file is not a regular file owned by this user"
                                  f"{f' (or uid {also})' if also else ''}; remove it")
        started, said = time.monotonic(), False
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except OSError as exc:
                if exc.errno not in (errno.EAGAIN, errno.EACCES):
                    raise
                waited = time.monotonic() - started
                if waited >= timeout:
                    held = f" for more than {timeout:g}s" if timeout > 0 else ""
                    raise ApplyError(f"{path}: another fdngx run holds the lock{held}{_held_by(st)}; giving up"
                                     ) from None
                if not said and waited >= min(LOCK_PATIENCE, timeout / 2):
                    log.log(_WAIT_LEVEL.get(), "%s: waiting for the lock%s (up to %g s)", path, _held_by(st), timeout)
                    said = True
                if stop is None:
                    time.sleep(0.05)
                elif stop.wait(0.05):
                    raise LockWaitStopped(f"{path}: stopping: gave up waiting for the lock after {waited:.1f} s"
                                          ) from None
        if said:
            log.log(_WAIT_LEVEL.get(), "%s: got the lock after %.1f s", path, time.monotonic() - started)
        yield
    finally:
        os.close(fd)
