"""Process primitives: start in a new session, identify by (pid, start time), stop a group, read /proc.

Safety rule: fdngx only ever signals processes it started. A pid alone can be reused by the kernel, so
every pid we keep is paired with its start time from /proc/<pid>/stat and checked before any signal.
A whole group is signalled only while its leader is the very process we recorded (a zombie leader still
holds its pid, so the group id cannot have been handed out again). Once the leader is gone its group id
proves nothing (a stale pidfile may name a group id since reused by someone else's process group), so
only the members we recorded, each checked by its own start time, are signalled then.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import functools
import os
import signal
import subprocess
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

_PR_SET_PDEATHSIG = 1
_PR_SET_CHILD_SUBREAPER = 36
_PR_GET_CHILD_SUBREAPER = 37
try:
    _libc: ctypes.CDLL | None = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
except OSError:  # not glibc/Linux: the safety nets below are skipped, the group signals still work
    _libc = None


def _stat(pid: int) -> list[str] | None:
    """Fields of /proc/<pid>/stat after the command name (which may contain spaces and parentheses)."""
    try:
        # open(), not Path(): a reload scans every process on the host, and pathlib interns each path part
        # (a soak review saw CPython's interned-string table grow and be rebuilt in ~1.9 MB steps)
        with open(f"/proc/{pid}/stat", "rb") as fh:
            raw = fh.read().decode("utf-8", "replace")
    except OSError:  # gone (FileNotFoundError, ProcessLookupError), not ours to read (PermissionError)
        return None
    return raw[raw.rfind(")") + 2 :].split()


def starttime(pid: int) -> int | None:
    """Start time in clock ticks since boot; None when the pid is gone or a zombie."""
    f = _stat(pid)
    if f is None or f[0] in ("Z", "X"):
        return None
    return int(f[19])


def _starttime_any(pid: int) -> int | None:
    """Start time of `pid` even when it is a zombie (it still holds its pid and group id)."""
    f = _stat(pid)
    return None if f is None or f[0] == "X" else int(f[19])


@functools.cache
def _boot_time() -> float:
    for line in Path("/proc/stat").read_text().splitlines():
        if line.startswith("btime "):
            return float(line.split()[1])
    return 0.0


@functools.cache
def boot_id() -> str | None:
    """This boot's random id (/proc/sys/kernel/random/boot_id): start times count from boot, so a (pid, start
    time) recorded before a reboot may match a new process; None when it cannot be read."""
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip() or None
    except OSError:
        return None


def start_time_epoch(pid: int) -> float | None:
    """When `pid` started, in seconds since the epoch (1/CLK_TCK resolution); None when gone."""
    ticks = starttime(pid)
    if ticks is None:
        return None
    return _boot_time() + ticks / os.sysconf("SC_CLK_TCK")


def same_process(pid: int, start: int | None) -> bool:
    """True when `pid` is still the very process we recorded (not a reused pid)."""
    return pid > 0 and start is not None and starttime(pid) == start


def cmdline(pid: int) -> str:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return "?"
    return " ".join(raw.replace(b"\0", b" ").decode(errors="replace").split()) or "?"


def executable(pid: int) -> str | None:
    """The program file `pid` runs (/proc/<pid>/exe; one deleted or replaced since, by a package upgrade say,
    by its path); None when it cannot be read (gone, or another user's process without privileges)."""
    try:
        return os.readlink(f"/proc/{pid}/exe").removesuffix(" (deleted)")
    except OSError:
        return None


def group_alive(pgid: int) -> bool:
    """Any live (non-zombie) member in process group `pgid`?"""
    return bool(group_members(pgid))


def _all_pids() -> list[int]:
    try:
        return [int(d) for d in os.listdir("/proc") if d.isdigit()]
    except OSError:
        return []


def group_is_ours(pgid: int, start: int | None) -> bool:
    """May we signal process group `pgid`, recorded with leader start time `start`?

    Only while its leader, alive or a zombie not yet reaped, is the very process we recorded: then the
    group id cannot have been reused. With the leader gone the answer is no, even if members live: a
    group id named by a stale record may since belong to someone else's group. Callers signal the members
    they recorded one by one instead (stop_all's `extra`).
    """
    if start is None or _starttime_any(pgid) != start:
        return False
    return starttime(pgid) is not None or group_alive(pgid)  # a zombie leader: is anyone left in its group?


def children(ppid: int) -> set[int]:
    """Live direct children of `ppid` (nginx's workers, for a reload's proof)."""
    out = set()
    for pid in _all_pids():
        f = _stat(pid)
        if f and f[0] not in ("Z", "X") and int(f[1]) == ppid:
            out.add(pid)
    return out


def alive(pid: int) -> bool:
    return starttime(pid) is not None


def descendants(root: int) -> dict[int, int]:
    """Live descendants of `root` as {pid: start time}: what a stop must see gone, whatever their group."""
    parent: dict[int, int] = {}
    start: dict[int, int] = {}
    for pid in _all_pids():
        f = _stat(pid)
        if f and f[0] not in ("Z", "X"):
            parent[pid] = int(f[1])
            start[pid] = int(f[19])
    out: dict[int, int] = {}
    frontier = [root]
    while frontier:
        p = frontier.pop()
        for child, ppid in parent.items():
            if ppid == p and child not in out:
                out[child] = start[child]
                frontier.append(child)
    return out


def unreaped_children(parent: int) -> list[int]:
    """Children of `parent` that exited and that it has not waited for (zombies), lowest pid first."""
    return sorted(pid for pid in _all_pids() if (f := _stat(pid)) and f[0] == "Z" and int(f[1]) == parent)


def become_subreaper(on: bool = True) -> bool:
    """Orphaned grandchildren (FastDeploy's workers when an api_server dies) reparent to us, not init,
    so they stay visible as our descendants and get stopped with the rest. `on=False` undoes it. Returns
    whether this process was a subreaper before (False where it cannot be told)."""
    if _libc is None:
        return False
    was = ctypes.c_int(0)
    _libc.prctl(_PR_GET_CHILD_SUBREAPER, ctypes.byref(was), 0, 0, 0)
    _libc.prctl(_PR_SET_CHILD_SUBREAPER, int(on), 0, 0, 0)
    return bool(was.value)


def _child_setup(parent: int, death_signal: int) -> None:
    # Runs in the child between fork and exec (after setsid). If the supervisor dies without a chance to
    # clean up (SIGKILL, OOM), the kernel sends `death_signal` to the child instead of leaving it running:
    # the child's own stop signal (multi_api_server only cleans up its ranks on SIGINT, its Ctrl-C path).
    # An ignored signal stays ignored across exec (a shell's `cmd &` ignores SIGINT): restore the default,
    # or that stop signal would never reach the engine's handler.
    signal.signal(death_signal, signal.SIG_DFL)
    if _libc is not None:
        _libc.prctl(_PR_SET_PDEATHSIG, death_signal, 0, 0, 0)
    if os.getppid() != parent:
        os._exit(1)


def start(
    argv: list[str], env: dict[str, str], log: Path, header: str, death_signal: int = signal.SIGTERM,
    unset: Iterable[str] = (),
) -> subprocess.Popen[bytes]:
    """Start one process in its own session (so its pgid is its pid), output appended to `log` after a
    `# fdngx <time>: <header>` line. It gets this process's environment without `unset`, plus `env`.
    `death_signal` reaches it if this process dies without cleaning up."""
    log.parent.mkdir(parents=True, exist_ok=True)
    dropped = set(unset)
    env = {**{k: v for k, v in os.environ.items() if k not in dropped}, **env}
    with open(log, "ab") as fh:
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S")
        fh.write(f"# fdngx {stamp}: {header}\n".encode())
        fh.flush()
        return subprocess.Popen(
            argv,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=fh,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            close_fds=True,
            preexec_fn=functools.partial(_child_setup, os.getpid(), death_signal),
        )


def signal_group(pgid: int, sig: int) -> bool:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)
        return True
    return False


def group_members(pgid: int) -> dict[int, int]:
    """Live members of process group `pgid` as {pid: start time}."""
    out = {}
    for pid in _all_pids():
        f = _stat(pid)
        if f and f[0] not in ("Z", "X") and int(f[2]) == pgid:
            out[pid] = int(f[19])
    return out


def stop_popen_group(proc: subprocess.Popen[Any], grace: float = 10.0, sig: int = signal.SIGTERM) -> None:
    """Stop a child started in its own session (start_new_session=True) and whatever is left in its group.

    `sig` to the group, SIGKILL after `grace` seconds, then SIGKILL for members that outlived the leader
    (nginx workers whose master died). The group is signalled only while the leader is unreaped (alive or
    a zombie: its group id cannot have been reused); the members left after that are the ones seen in the
    group before the leader was reaped, each checked by start time. Idempotent.
    """
    members = group_members(proc.pid) if proc.returncode is None else {}
    if proc.poll() is None:
        signal_group(proc.pid, sig)
        try:
            proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            signal_group(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
    for pid, start in members.items():
        if pid != proc.pid:
            signal_pid(pid, start, signal.SIGKILL)


def signal_pid(pid: int, start: int | None, sig: int) -> bool:
    if not same_process(pid, start):
        return False
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.kill(pid, sig)
        return True
    return False


def reap(popens: Iterable[subprocess.Popen[bytes]]) -> None:
    """Collect exit statuses: our Popen children first, then reparented orphans (we are their subreaper)."""
    known = set()
    for p in popens:
        p.poll()
        known.add(p.pid)
    me = os.getpid()
    for pid in _all_pids():
        if pid in known:
            continue
        st = _raw_state(pid)
        if st is not None and st[0] == "Z" and st[1] == me:
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, os.WNOHANG)


def _raw_state(pid: int) -> tuple[str, int] | None:
    f = _stat(pid)
    return (f[0], int(f[1])) if f else None


def stop_all(
    groups: list[tuple[int, int, str]],
    popens: list[subprocess.Popen[bytes]],
    grace: float,
    extra: dict[int, int] | None = None,
) -> list[int]:
    """Stop process groups [(pgid, leader start time, stop signal name)] and every recorded descendant.

    Graceful signal to each group whose leader is still the recorded process, wait up to `grace` seconds
    for the groups and the `extra` processes {pid: start time} (members we recorded: a descendants()
    snapshot, or a pidfile's record; each is signalled only while it is that very process), then SIGKILL
    what is left. A group whose leader is gone is never signalled as a group: its recorded members are.
    Returns the pids that needed SIGKILL, each once.
    """
    for pgid, start, signame in groups:
        if group_is_ours(pgid, start):
            signal_group(pgid, getattr(signal, signame))
    return kill_after(groups, popens, grace, extra)


def kill_after(
    groups: list[tuple[int, int, str]],
    popens: list[subprocess.Popen[bytes]],
    grace: float,
    extra: dict[int, int] | None = None,
) -> list[int]:
    """stop_all once the groups have had their stop signal (from us, or from whoever else stops them: `fdngx
    stop` waits while the supervisor stops its children): wait up to `grace` seconds, then SIGKILL what is
    left. Returns the pids that needed SIGKILL, each once."""
    extra = dict(extra or {})
    deadline = time.monotonic() + grace
    termed = False
    while time.monotonic() < deadline:
        reap(popens)
        left = _survivors(groups, extra)
        if not left:
            return []
        if not termed and not any(group_is_ours(pgid, start) for pgid, start, _s in groups):
            # The groups are gone but processes that left them (own sessions) remain: ask them too.
            termed = True
            for pid, start in extra.items():
                signal_pid(pid, start, signal.SIGTERM)
        time.sleep(0.1)
    killed = []
    for pgid, start, _sig in groups:
        if group_is_ours(pgid, start) and signal_group(pgid, signal.SIGKILL):
            killed.append(pgid)
    for pid, start in extra.items():
        # A leader is in `extra` too (a descendants() snapshot): it was killed once, with its group.
        if pid not in killed and signal_pid(pid, start, signal.SIGKILL):
            killed.append(pid)
    end = time.monotonic() + 5.0
    while time.monotonic() < end and _survivors(groups, extra):
        reap(popens)
        time.sleep(0.05)
    reap(popens)
    return killed


def _survivors(groups: list[tuple[int, int, str]], extra: dict[int, int]) -> list[int]:
    alive = [pgid for pgid, start, _g in groups if group_is_ours(pgid, start)]
    alive += [pid for pid, start in extra.items() if same_process(pid, start)]
    return alive


def tail(path: str | Path, lines: int = 30) -> str:
    """The last lines of a log file (bounded read: logs of a failing engine can be huge)."""
    try:
        with open(path, "rb") as fh:
            fh.seek(0, os.SEEK_END)
            size = fh.tell()
            fh.seek(max(0, size - 64 * 1024))
            data = fh.read()
    except OSError as exc:
        return f"(cannot read {path}: {exc.strerror})"
    text = data.decode(errors="replace").splitlines()
    return "\n".join(text[-lines:])
