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

Where: the pid file is --pid-file, else the main config's `pid` (its main context, included files too), else
this build's default (`nginx -V`); the error log -e, else the config's, else the build's (fdngx.nginx.build).
"""

from __future__ import annotations

import itertools
import os
import re
import shlex
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from fdngx.errors import ApplyError, Interrupted
from fdngx.nginx import build as nb
from fdngx.nginx.build import MasterLog, find_nginx, nginx_message, prepare_prefix
from fdngx.nginx.networds import REFUSED, get_generation
from fdngx.nginx.stamp import generation_in
from fdngx.system import procs
from fdngx.system.files import read_regular_file

__all__ = ["MasterLog", "NginxControl", "NginxNotRunning", "ReloadError", "find_nginx", "generation_in",
           "nginx_message", "prepare_prefix"]

# nginx retries a failed bind() five times, 500 ms apart, before it gives up on a new config: a master quiet
# for longer than this has stopped retrying.
SETTLE_QUIET = 1.0
_HEX = re.compile(r"[0-9a-f]{1,64}")


def _old_workers_retired(old: set[int]) -> bool:
    """Old workers close their listening sockets when they retitle themselves 'is shutting down'.

    Until then a new connection may still land on an old worker and see the old config.
    """
    for pid in old:
        title = procs.cmdline(pid)
        if "worker process" in title and "shutting down" not in title:
            return False
    return True


def _stopping(master: int) -> bool:
    """Every child of `master` is a worker finishing its requests (none takes new ones): nginx is stopping
    (`nginx -s quit`, Debian's ExecStop, streams open). A reload starts its new workers before it retires the old."""
    # Not _old_workers_retired: a new worker still titled as its master is not one, nor a USR2's new master.
    titles = [t for t in map(procs.cmdline, procs.children(master)) if t != "?"]  # "?": exited meanwhile
    return bool(titles) and all("shutting down" in t for t in titles)


class NginxNotRunning(ApplyError):
    """Nothing to reload: no live nginx master behind the pid file."""


class ReloadError(ApplyError):
    """A reload failed. `took_new`: nginx started workers on the new config (so a rollback must reload
    again); False: nginx refused it and still runs the old one (a rollback only restores the file)."""

    def __init__(self, message: str, took_new: bool) -> None:
        super().__init__(message)
        self.took_new = took_new


class ReloadInterrupted(Interrupted):
    """Ctrl-C after the reload signal went to nginx: it loads the new file whatever the apply does now."""


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
    runner: nb.Runner = field(default=subprocess.run, repr=False)

    def argv(self, *extra: str, conf: Path | None = None, prefix: Path | None = None,
             error_log: str | None = None) -> list[str]:
        args = [self.binary]
        prefix = prefix if prefix is not None else self.prefix
        conf = conf if conf is not None else self.conf
        if prefix is not None:
            args += ["-p", f"{str(prefix).rstrip('/')}/"]
        if conf is not None:
            args += ["-c", str(conf)]
        if (error_log or self.error_log) is not None:
            args += ["-e", error_log or self.error_log]  # type: ignore[list-item]
        return [*args, *extra]

    def _run(self, argv: list[str], what: str, **kwargs: object) -> subprocess.CompletedProcess[str]:
        out: dict[str, object] = {"capture_output": True} if "stdout" not in kwargs else {"stderr": subprocess.PIPE}
        limit = max(self.timeout, 30.0)
        try:
            return self.runner(argv, text=True, timeout=limit, **out, **kwargs)
        except FileNotFoundError:
            raise ApplyError(f"{what}: {argv[0]} not found") from None
        except subprocess.TimeoutExpired:
            raise ApplyError(f"{what}: {shlex.join(argv)} did not finish within {limit:g} s (stopped)") from None

    def test(self, conf: Path | None = None, prefix: Path | None = None,
             what: str = "nginx -t") -> frozenset[str]:
        """`nginx -T` on the full configuration (or on `conf`); raises ApplyError with nginx's own message.

        Returns the files nginx loaded (its "# configuration file PATH:" lines), as printed and as real paths;
        empty when it printed none. The dump itself is read as it comes and not kept."""
        found: set[str] = set()
        read_fd, write_fd = os.pipe()
        reader = threading.Thread(target=nb.scan_dump, args=(os.fdopen(read_fd, "rb"), found), daemon=True)
        reader.start()
        # Its words on stderr only, where they are read: not into the live nginx's error log, where a refused
        # candidate's [emerg] lines set off the alerts of a run that changed nothing (nginx 1.19.5 and later).
        quiet = "stderr" if nb.stderr_log_ok(self.build.version) else None
        try:
            proc = self._run(self.argv("-T", "-q", conf=conf, prefix=prefix, error_log=quiet), what, stdout=write_fd)
        finally:
            os.close(write_fd)  # the reader sees the end once nginx (which had a copy) is gone too
            reader.join(timeout=10)
        if proc.returncode != 0:
            raise ApplyError(f"{what} failed: {nginx_message(proc.stderr or '')}")
        return nb.with_real_paths(found)

    @property
    def build(self) -> nb.NginxBuild:
        """Where this binary looks by default (`nginx -V`), run with our -p."""
        return nb.nginx_build(self.binary, self.runner).under(self.prefix)

    @property
    def default_conf(self) -> Path:
        """The config this binary reads without -c (and without -p: the system's nginx.conf)."""
        return nb.nginx_build(self.binary, self.runner).conf_path

    @property
    def main_conf(self) -> Path:
        """Our -c, else the config the binary reads with our -p."""
        return self.conf or self.build.conf_path

    def _from_main_conf(self, build: nb.NginxBuild) -> tuple[Path | None, Path | None]:
        """The main config's pid file and error log file (None: it names none), relative ones resolved."""
        settings = nb.main_settings(self.main_conf)
        return (nb.full_name(settings.pid, build.prefix) if settings.pid else None,
                nb.full_name(settings.error_log, build.prefix) if settings.error_log else None)

    def _pid_path_and_source(self) -> tuple[Path, str]:
        if self.pid_file is not None:
            return self.pid_file, "given by --pid-file"
        build = self.build
        pid, _log = self._from_main_conf(build)
        if pid is not None:
            return pid, f"named by the pid directive in {self.main_conf}"
        return build.pid_path, f"{self.binary}'s default from -V; {self.main_conf} sets no pid"

    def pid_path(self) -> Path:
        """--pid-file, else the main config's `pid` (relative to the prefix), else the build's default."""
        return self._pid_path_and_source()[0]

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
        """The main config a master title names: its -c (relative to its -p or ours), else the build's."""
        args = title.removeprefix("nginx: master process").split()
        given = {flag: value for flag, value in itertools.pairwise(args) if flag in ("-c", "-p")}
        conf, prefix = given.get("-c"), given.get("-p") or (str(self.prefix) if self.prefix else None)
        if conf is None:
            build = nb.nginx_build(self.binary, self.runner)
            return os.path.realpath(build.under(Path(prefix) if prefix else None).conf_path)
        return os.path.realpath(conf if os.path.isabs(conf) or prefix is None else os.path.join(prefix, conf))

    def running(self) -> bool:
        """A master that takes new connections: one stopping is not (nothing to reload; changes wait in the file)."""
        master = self.master_pid()
        return master is not None and not _stopping(master)

    def _error_log_path(self) -> Path | None:
        """-e (relative to the prefix), else the main config's error_log file, else the build's (None: stderr)."""
        build = self.build
        if self.error_log:
            return nb.full_name(self.error_log, build.prefix)
        return self._from_main_conf(build)[1] or build.error_log_path

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

    def _not_running(self, stopping: int | None = None) -> NginxNotRunning:
        path, source = self._pid_path_and_source()
        if stopping is not None:  # SIGHUP to it would be lost; a 15 s wait for new workers, an apply failure
            return NginxNotRunning(f"nginx is stopping (master pid {stopping}: its workers finish the requests they "
                                   f"have); it will read the new file when started, e.g. {shlex.join(self.argv())}")
        hint = "if it runs, say where its pid file is with --pid-file PATH"
        if self.reload_cmd:
            return NginxNotRunning(f"no live nginx master behind the pid file {path} ({source}), so "
                                   f"{shlex.join(self.reload_cmd)} was not run; {hint}")
        return NginxNotRunning(f"nginx is not running (no live nginx master behind {path}, {source}); it will read "
                               f"the new file when started, e.g. {shlex.join(self.argv())}; {hint}")

    def reload(self, expect_generation: str | None = None) -> float:
        """Reload and wait until nginx serves the new configuration; returns the seconds it took.

        Raises NginxNotRunning, or ReloadError saying whether nginx took the new config."""
        master = self.master_pid()
        if master is None or _stopping(master):
            raise self._not_running(master)
        t0 = time.monotonic()
        before = procs.children(master)
        log = MasterLog(self._error_log_path(), master)
        self._signal_reload(master)
        try:
            return self._confirm(master, before, log, t0, expect_generation)
        except KeyboardInterrupt:  # after the signal: nginx loads the new file whatever happens here
            raise ReloadInterrupted("nginx was told to reload") from None

    def _confirm(self, master: int, before: set[int], log: MasterLog, t0: float,
                 expect_generation: str | None) -> float:
        """Wait until nginx serves the new configuration (reload's second half, after the signal)."""
        deadline = time.monotonic() + self.timeout
        new_workers = retired = False
        # since when only new workers listen and the verify URL gives one final other answer (the same, each time)
        other_since, other = 0.0, ""
        while time.monotonic() < deadline:
            new_workers = new_workers or bool(procs.children(master) - before)
            retired = new_workers and _old_workers_retired(before)
            if retired:
                served, answer = self._answer() if self.verify_url and expect_generation else (expect_generation, "")
                if served == expect_generation:
                    return time.monotonic() - t0
                final = answer.startswith("answered") or answer == REFUSED
                if not final or answer != other:  # a timeout or a reset (a busy worker) decides nothing
                    other_since, other = time.monotonic(), answer if final else ""
                elif time.monotonic() - other_since >= SETTLE_QUIET:
                    # Only the new config's workers listen now: another answer there will not change (another
                    # server block has that address), nor will a refusal (nothing the new config opened listens
                    # there: a --listen address this host cannot be reached at). Not waiting out the timeout,
                    # with the front door perhaps dark meanwhile: the apply rolls back at once.
                    seen = self._timeout_story(new_workers, retired, expect_generation)
                    raise ReloadError(f"nginx reloaded, but the new config does not answer at its --listen "
                                      f"address: {seen}", True)
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
        seen = self._timeout_story(new_workers, retired, expect_generation)
        why = f"{seen}; nginx logged: {log.error()}" if log.error() else seen
        raise ReloadError(f"nginx did not take the new config within {self.timeout:.0f}s: {why}", new_workers)

    def _timeout_story(self, new_workers: bool, retired: bool, expect: str | None) -> str:
        """What a reload that timed out showed: new workers or not, and what the verify URL answered."""
        if not new_workers:
            seen = "no new worker processes started"
        else:
            seen = "new worker processes started" + ("" if retired else ", the old ones did not shut down")
        if not self.verify_url or not expect:
            return seen
        served, answer = self._answer()
        if served == expect:
            return f"{seen}; {self.verify_url} answers generation {expect}"
        seen += f"; {self.verify_url} {answer}, expected generation {expect}"
        if retired and answer == REFUSED:
            seen += "; nothing listens there now: check --listen"
        elif retired and "unreachable" not in answer:  # only the new config's workers answer: it is not ours
            seen += ("; another server block answers that address (a default_server on the same listen "
                     "address?): check --listen")
        return seen

    @staticmethod
    def _settle(log: MasterLog, master: int, before: set[int], deadline: float) -> None:
        """After the master logged an error: wait until it started new workers, or wrote nothing more for a
        while (a bind() retry comes every 0.5 s), or died."""
        while time.monotonic() < deadline and procs.alive(master) and not procs.children(master) - before:
            log.read()
            if time.monotonic() - log.changed > SETTLE_QUIET:
                return
            time.sleep(0.05)

    def served_generation(self) -> str | None:
        """What `GET /fdngx/generation` answers now (site/standalone), None when unknown or unreachable."""
        return self._answer()[0]

    def _answer(self) -> tuple[str | None, str]:
        """GET verify_url: (its body when it answered 200, else None; what it answered, in words)."""
        if not self.verify_url:
            return None, "no verify URL"
        body, words = get_generation(self.verify_url, 2)
        if body is not None and _HEX.fullmatch(body):
            return body, f"answered generation {body}"
        return body, words
