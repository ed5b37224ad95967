"""Talking to one nginx: find it, `nginx -t`, reload it, prove the reload, and make sure it is our nginx.

A reload's exit status only says a signal was sent. Proof that nginx loaded the new file: the master
started new worker processes (it keeps the old ones when the new config fails to load), the old workers
retitled themselves "shutting down", and, for site and standalone configs, `GET /fdngx/generation`
answers the new file's generation id.

A refused reload: the master logs why ([emerg] bind() failed, ...) and keeps its workers. Only the master's
own [emerg] lines count (a worker's [crit] while serving a request says nothing about the reload; an [alert]
may come before workers that still start), and only once it stopped retrying (a failed bind() is retried for
about 2.5 s) without starting new workers. Anything else is judged by the workers, within the timeout.

Process identity: a pid file can be stale and its pid reused by an unrelated process. fdngx signals a
master only when its command line is nginx's master title and it started before the pid file was
written (a reused pid belongs to a process that started later) or, when the clock says otherwise (it may
have been stepped forward since nginx started: NTP at boot), it is this nginx in every other way: our nginx
program, our mount namespace, our main config.
"""

from __future__ import annotations

import itertools
import os
import re
import shlex
import shutil
import signal
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import requests

from fdngx.errors import ApplyError, UsageError
from fdngx.system import procs
from fdngx.system.files import read_regular_file

_GENERATION = re.compile(r"^# fdngx-generation: ([0-9a-f]+)$", re.M)
_PID_DIRECTIVE = re.compile(r"^\s*pid\s+([^;\s]+)\s*;", re.M)
DEFAULT_PID_FILE = Path("/run/nginx.pid")
DEFAULT_CONF = Path("/etc/nginx/nginx.conf")  # nginx's own default (Debian's build), without -c
# nginx retries a failed bind() five times, 500 ms apart, before it gives up on a new config: a master quiet
# for longer than this has stopped retrying.
SETTLE_QUIET = 1.0
# An error-log line: "2024/05/01 12:00:00 [emerg] 1234#1234: message" (level, pid#thread id).
_LOG_LINE = re.compile(rb"^\d{4}/\d\d/\d\d \d\d:\d\d:\d\d \[([a-z]+)\] (\d+)#\d+: ")
_SERIOUS = (b"emerg", b"alert", b"crit")

Runner = Callable[..., "subprocess.CompletedProcess[str]"]


def find_nginx(binary: str | None = None) -> str:
    """The nginx binary: as given, else on PATH, else Debian's /usr/sbin/nginx (not on a user's PATH)."""
    candidates = [binary] if binary else ["nginx", "/usr/sbin/nginx", "/usr/local/openresty/nginx/sbin/nginx"]
    for cand in candidates:
        found = shutil.which(cand) if cand else None
        if found:
            return found
    raise UsageError(
        f"nginx binary {binary or 'nginx'} not found; install it (apt-get install nginx) or pass --nginx-bin"
    )


def generation_in(text: str) -> str | None:
    m = _GENERATION.search(text)
    return m.group(1) if m else None


def prepare_prefix(prefix: Path) -> None:
    """A standalone prefix needs logs/ and tmp/ before nginx starts (nginx creates only leaf dirs)."""
    for sub in ("logs", "tmp"):
        (prefix / sub).mkdir(parents=True, exist_ok=True)


def nginx_message(text: str) -> str:
    """nginx's own words, without its 'nginx: ' prefixes and the final 'test failed' line."""
    lines = [ln.strip() for ln in (text or "").splitlines() if ln.strip()]
    useful = [ln for ln in lines if "test failed" not in ln and "syntax is ok" not in ln] or lines
    return "; ".join(ln.removeprefix("nginx: ") for ln in useful) or "(no output)"


def _old_workers_retired(old: set[int]) -> bool:
    """Old workers close their listening sockets when they retitle themselves 'is shutting down'.

    Until then a new connection may still land on an old worker and see the old config.
    """
    for pid in old:
        title = procs.cmdline(pid)
        if "worker process" in title and "shutting down" not in title:
            return False
    return True


class MasterLog:
    """What one nginx master writes to its error log from now on: its own lines only.

    A worker logs too ([crit] open() failed while serving a request, ...) under its own pid; only the
    master's lines say how a reload went. Read incrementally, at most 4 MiB a call."""

    def __init__(self, path: Path, master: int) -> None:
        self.path, self.master = path, master
        try:
            self.offset = path.stat().st_size
        except OSError:
            self.offset = 0
        self.lines: list[tuple[bytes, bytes]] = []  # (level, line)
        self.changed = time.monotonic()  # when the master last wrote a line
        self._partial = b""

    def read(self) -> None:
        try:
            with open(self.path, "rb") as fh:
                if os.fstat(fh.fileno()).st_size < self.offset:  # truncated (rotated by copy): start over
                    self.offset, self._partial = 0, b""
                fh.seek(self.offset)
                data = fh.read(4 << 20)
        except OSError:
            return
        self.offset += len(data)
        *complete, self._partial = (self._partial + data).split(b"\n")
        self._partial = self._partial[-65536:]
        mine = [(m.group(1), ln) for ln in complete
                if (m := _LOG_LINE.match(ln)) and int(m.group(2)) == self.master]
        if mine:
            self.lines += mine
            self.changed = time.monotonic()

    def _last(self, levels: tuple[bytes, ...]) -> str:
        bad = [ln for level, ln in self.lines if level in levels]
        return nginx_message(bad[-1].decode("utf-8", "replace")) if bad else ""

    def error(self) -> str:
        """The master's last [emerg]/[alert]/[crit] line, or ''."""
        return self._last(_SERIOUS)

    def refusal(self) -> str:
        """The master's last [emerg] line, or '': how nginx says it cannot load a config (a parse error, a
        bind() that failed). An [alert] or [crit] alone may come before workers that still start (a slow
        init): the reload is then judged by its workers, within the timeout."""
        return self._last((b"emerg",))


class NginxNotRunning(ApplyError):
    """Nothing to reload: no live nginx master behind the pid file."""


class ReloadError(ApplyError):
    """A reload failed. `took_new`: nginx started workers on the new config (so a rollback must reload
    again); False: nginx refused it and still runs the old one (a rollback only restores the file)."""

    def __init__(self, message: str, took_new: bool) -> None:
        super().__init__(message)
        self.took_new = took_new


@dataclass
class NginxControl:
    """How to test and reload one nginx: binary, `-p` prefix, `-c` main config, or a reload command."""

    binary: str = "nginx"
    conf: Path | None = None
    prefix: Path | None = None
    error_log: str | None = None
    reload_cmd: Sequence[str] | None = None
    pid_file: Path | None = None
    verify_url: str | None = None
    timeout: float = 15.0
    runner: Runner = field(default=subprocess.run, repr=False)

    def argv(self, *extra: str, conf: Path | None = None, prefix: Path | None = None) -> list[str]:
        args = [self.binary]
        prefix = prefix if prefix is not None else self.prefix
        conf = conf if conf is not None else self.conf
        if prefix is not None:
            args += ["-p", f"{str(prefix).rstrip('/')}/"]
        if conf is not None:
            args += ["-c", str(conf)]
        if self.error_log is not None:
            args += ["-e", self.error_log]
        return [*args, *extra]

    def _run(self, argv: list[str], what: str) -> subprocess.CompletedProcess[str]:
        try:
            return self.runner(argv, capture_output=True, text=True, timeout=max(self.timeout, 30.0))
        except FileNotFoundError:
            raise ApplyError(f"{what}: {argv[0]} not found") from None
        except subprocess.TimeoutExpired:
            raise ApplyError(f"{what}: {shlex.join(argv)} did not finish in time") from None

    def test(self, conf: Path | None = None, prefix: Path | None = None, what: str = "nginx -t") -> None:
        """`nginx -t` on the full configuration (or on `conf`); raises ApplyError with nginx's own message."""
        proc = self._run(self.argv("-t", "-q", conf=conf, prefix=prefix), what)
        if proc.returncode != 0:
            raise ApplyError(f"{what} failed: {nginx_message(proc.stderr or proc.stdout)}")

    @property
    def main_conf(self) -> Path:
        return self.conf or DEFAULT_CONF

    def pid_path(self) -> Path:
        if self.pid_file is not None:
            return self.pid_file
        try:
            m = _PID_DIRECTIVE.search(self.main_conf.read_text(encoding="utf-8", errors="replace"))
        except OSError:
            m = None
        if not m:
            return DEFAULT_PID_FILE
        pid = Path(m.group(1))
        return pid if pid.is_absolute() or self.prefix is None else self.prefix / pid

    def master_pid(self) -> int | None:
        """The live nginx master named by the pid file, verified; None when nginx is not running.

        Verified: the process's title is nginx's master title, and it started no later than the pid file
        was written or it is this nginx (_is_ours: its program, mount namespace and config). A stale pid
        file whose pid was reused by another process gives None."""
        path = self.pid_path()
        try:
            # A regular file only: a FIFO planted as the pid file must not hang an apply that holds the lock.
            pid = int(read_regular_file(path, 64).decode("ascii").strip())
            written = path.stat().st_mtime
        except (OSError, ValueError):  # UnicodeDecodeError is a ValueError
            return None
        if pid <= 1:
            return None  # 0, -1: os.kill would signal a process group or everyone; 1 is init
        title = procs.cmdline(pid)
        if not title.startswith("nginx: master process"):
            return None
        started = procs.start_time_epoch(pid)
        if started is None:
            return None
        # Start time vs the pid file's mtime is only as good as the wall clock: stepped forward after nginx
        # started (NTP at boot), a live master looks younger than its pid file. Then it must be our nginx in
        # every other way: a title alone can be borrowed (`exec -a`), and a reused pid can be another nginx's.
        return pid if started <= written + 2.0 or self._is_ours(pid, title) else None

    def _is_ours(self, pid: int, title: str) -> bool:
        """Is `pid` the master of this nginx: our nginx program file (by path: an upgrade replaces the file),
        seen from our mount namespace (not another container's nginx), and loaded from our main config?"""
        exe = procs.executable(pid)
        ours = shutil.which(self.binary)
        if exe is None or ours is None or os.path.realpath(ours) != os.path.realpath(exe):
            return False
        try:
            if os.readlink(f"/proc/{pid}/ns/mnt") != os.readlink("/proc/self/ns/mnt"):
                return False
        except OSError:
            return False
        return self._title_conf(title) == os.path.realpath(self.main_conf)

    def _title_conf(self, title: str) -> str:
        """The main config a master title names: its -c (relative to its -p or ours), else nginx's default."""
        args = title.removeprefix("nginx: master process").split()
        given = {flag: value for flag, value in itertools.pairwise(args) if flag in ("-c", "-p")}
        conf, prefix = given.get("-c"), given.get("-p") or (str(self.prefix) if self.prefix else None)
        if conf is None:
            return os.path.realpath(DEFAULT_CONF)
        return os.path.realpath(conf if os.path.isabs(conf) or prefix is None else os.path.join(prefix, conf))

    def running(self) -> bool:
        return self.master_pid() is not None

    def _error_log_path(self) -> Path:
        path = Path(self.error_log) if self.error_log else Path("/var/log/nginx/error.log")
        return self.prefix / path if not path.is_absolute() and self.prefix is not None else path

    def _signal_reload(self, master: int) -> None:
        if self.reload_cmd:
            argv = list(self.reload_cmd)
            proc = self._run(argv, "reload")
            if proc.returncode != 0:
                raise ReloadError(f"{shlex.join(argv)} failed: {nginx_message(proc.stderr or proc.stdout)}", False)
            return
        # Not `nginx -s reload`: it signals whatever pid the pid file names, unchecked.
        try:
            os.kill(master, signal.SIGHUP)
        except OSError as exc:
            raise ReloadError(f"cannot signal nginx master {master}: {exc.strerror}", False) from None

    def reload(self, expect_generation: str | None = None) -> float:
        """Reload and wait until nginx serves the new configuration; returns the seconds it took.

        Raises NginxNotRunning, or ReloadError saying whether nginx took the new config."""
        master = self.master_pid()
        if master is None:
            raise NginxNotRunning(
                f"nginx is not running (no live nginx master behind {self.pid_path()}); it will read the new "
                f"file when started, e.g. {shlex.join(self.argv())}"
            )
        t0 = time.monotonic()
        before = procs.children(master)
        log = MasterLog(self._error_log_path(), master)
        self._signal_reload(master)
        deadline = time.monotonic() + self.timeout
        new_workers = False
        while time.monotonic() < deadline:
            new_workers = new_workers or bool(procs.children(master) - before)
            if new_workers and _old_workers_retired(before) and self._serves(expect_generation):
                return time.monotonic() - t0
            log.read()
            if not procs.alive(master):
                raise ReloadError(f"nginx master {master} exited during the reload {log.error()}".strip(), True)
            if not new_workers and log.refusal():
                # The master logged why it cannot load the new config (bind() failed, ...). It retries a failed
                # bind() for a few seconds and may still take it: the refusal is final only once it stopped
                # writing and still started no new workers. (A worker's lines are not the master's: ignored.)
                self._settle(log, master, before, deadline)
                new_workers = bool(procs.children(master) - before)
                if new_workers or not procs.alive(master):
                    continue  # it took the new config after all (or died): judged on the normal path above
                raise ReloadError(f"nginx refused the new config and keeps running the old one: {log.refusal()}",
                                  False)
            time.sleep(0.02)
        log.read()
        why = log.error() or "no new worker processes and no new generation served"
        raise ReloadError(f"nginx did not take the new config within {self.timeout:.0f}s: {why}", new_workers)

    @staticmethod
    def _settle(log: MasterLog, master: int, before: set[int], deadline: float) -> None:
        """After the master logged an error: wait until it started new workers, or wrote nothing more for a
        while (a bind() retry comes every 0.5 s), or died."""
        while time.monotonic() < deadline and procs.alive(master) and not procs.children(master) - before:
            log.read()
            if time.monotonic() - log.changed > SETTLE_QUIET:
                return
            time.sleep(0.05)

    def _serves(self, generation: str | None) -> bool:
        if not self.verify_url or not generation:
            return True
        return self.served_generation() == generation

    def served_generation(self) -> str | None:
        """What `GET /fdngx/generation` answers now (site/standalone), None when unknown or unreachable."""
        if not self.verify_url:
            return None
        try:
            # Never through a proxy from the environment (http_proxy on GPU clusters): the URL is this host's.
            with requests.Session() as session:
                session.trust_env = False
                resp = session.get(self.verify_url, timeout=2)
        except requests.RequestException:
            return None
        return resp.text.strip() if resp.status_code == 200 else None
