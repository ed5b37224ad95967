"""Talking to nginx, and the one safe-apply path every config write goes through.

safe_apply: lock -> render -> skip if identical -> backup -> atomic replace -> `nginx -t` on the full
config -> reload -> confirm the new generation serves -> on any failure restore the old bytes, put nginx
back on them, and say why in nginx's own words.

A reload's exit status only says a signal was sent. Proof that nginx loaded the new file: the master
started new worker processes (it keeps the old ones when the new config fails to load), and, for site
and standalone configs, `GET /fdngx/generation` answers the new file's generation id.
"""

from __future__ import annotations

import difflib
import re
import shlex
import shutil
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import requests

from fdngx import procs
from fdngx.errors import ApplyError, UsageError
from fdngx.fsutil import atomic_write, backup, file_lock, read_bytes_or_none, restore

_GENERATION = re.compile(r"^# fdngx-generation: ([0-9a-f]+)$", re.M)
_PID_DIRECTIVE = re.compile(r"^\s*pid\s+([^;\s]+)\s*;", re.M)
DEFAULT_PID_FILE = Path("/run/nginx.pid")

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


def unified_diff(old: bytes | None, new: str, path: Path) -> str:
    old_lines = (old or b"").decode("utf-8", "replace").splitlines(keepends=True)
    return "".join(
        difflib.unified_diff(old_lines, new.splitlines(keepends=True), f"{path} (on disk)", f"{path} (rendered)")
    )


def _old_workers_retired(old: set[int]) -> bool:
    """Old workers close their listening sockets when they retitle themselves 'is shutting down'.

    Until then a new connection may still land on an old worker and see the old config.
    """
    for pid in old:
        title = procs.cmdline(pid)
        if "worker process" in title and "shutting down" not in title:
            return False
    return True


class NginxNotRunning(ApplyError):
    """Nothing to reload: the file passed `nginx -t` and is kept for when nginx starts."""


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

    def argv(self, *extra: str) -> list[str]:
        args = [self.binary]
        if self.prefix is not None:
            args += ["-p", f"{str(self.prefix).rstrip('/')}/"]
        if self.conf is not None:
            args += ["-c", str(self.conf)]
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

    def test(self) -> None:
        """`nginx -t` on the full configuration; raises ApplyError with nginx's own message."""
        proc = self._run(self.argv("-t", "-q"), "nginx -t")
        if proc.returncode != 0:
            raise ApplyError(f"nginx -t failed: {_nginx_message(proc.stderr or proc.stdout)}")

    def master_pid(self) -> int | None:
        path = self.pid_file or self._pid_file_from_conf()
        try:
            pid = int(path.read_text().strip())
        except (OSError, ValueError):
            return None
        return pid if procs.alive(pid) else None

    def _pid_file_from_conf(self) -> Path:
        conf = self.conf or Path("/etc/nginx/nginx.conf")
        try:
            m = _PID_DIRECTIVE.search(conf.read_text(encoding="utf-8", errors="replace"))
        except OSError:
            m = None
        if not m:
            return DEFAULT_PID_FILE
        pid = Path(m.group(1))
        return pid if pid.is_absolute() or self.prefix is None else self.prefix / pid

    def _error_log_path(self) -> Path:
        path = Path(self.error_log) if self.error_log else Path("/var/log/nginx/error.log")
        return self.prefix / path if not path.is_absolute() and self.prefix is not None else path

    def _error_log_size(self) -> int:
        try:
            return self._error_log_path().stat().st_size
        except OSError:
            return 0

    def _new_errors(self, offset: int) -> str:
        """The last [emerg]/[alert]/[crit] line nginx logged after `offset`, or ''."""
        try:
            with open(self._error_log_path(), "rb") as fh:
                fh.seek(offset)
                lines = fh.read(1 << 20).decode("utf-8", "replace").splitlines()
        except OSError:
            return ""
        bad = [ln for ln in lines if "[emerg]" in ln or "[alert]" in ln or "[crit]" in ln]
        return _nginx_message(bad[-1]) if bad else ""

    def reload(self, expect_generation: str | None = None) -> None:
        """Reload and wait until nginx serves the new configuration; raises ApplyError otherwise."""
        master = self.master_pid()
        if master is None:
            raise NginxNotRunning(
                "nginx is not running (no live master in its pid file); it will read the new file when "
                f"started, e.g. {shlex.join(self.argv())}"
            )
        before = procs.children(master)
        log_offset = self._error_log_size()
        argv = list(self.reload_cmd) if self.reload_cmd else self.argv("-s", "reload")
        proc = self._run(argv, "reload")
        if proc.returncode != 0:
            raise ApplyError(f"{shlex.join(argv)} failed: {_nginx_message(proc.stderr or proc.stdout)}")
        deadline = time.monotonic() + self.timeout
        new_workers = False
        while time.monotonic() < deadline:
            new_workers = new_workers or bool(procs.children(master) - before)
            if new_workers and _old_workers_retired(before) and self._serves(expect_generation):
                return
            if not procs.alive(master):
                raise ApplyError(f"nginx master {master} exited during reload {self._new_errors(log_offset)}".strip())
            # The master logs why it refused the new config (bind() failed, ...) and keeps the old one.
            if not new_workers and (why := self._new_errors(log_offset)):
                raise ApplyError(f"nginx refused the new config: {why}")
            time.sleep(0.02)
        why = self._new_errors(log_offset) or "no new worker processes and no new generation served"
        raise ApplyError(f"nginx did not take the new config within {self.timeout:.0f}s: {why}")

    def _serves(self, generation: str | None) -> bool:
        if not self.verify_url or not generation:
            return True
        try:
            resp = requests.get(self.verify_url, timeout=2)
        except requests.RequestException:
            return False
        return resp.status_code == 200 and resp.text.strip() == generation


def _nginx_message(text: str) -> str:
    """nginx's own words, without its 'nginx: ' prefixes and the final 'test failed' line."""
    lines = [ln.strip() for ln in (text or "").splitlines() if ln.strip()]
    useful = [ln for ln in lines if "test failed" not in ln and "syntax is ok" not in ln] or lines
    return "; ".join(ln.removeprefix("nginx: ") for ln in useful) or "(no output)"


@dataclass(frozen=True)
class ApplyResult:
    path: Path
    changed: bool
    reloaded: bool
    diff: str
    generation: str | None
    note: str = ""

    @property
    def summary(self) -> str:
        if not self.changed:
            return f"{self.path}: unchanged"
        gen = f" (generation {self.generation})" if self.generation else ""
        note = f"; {self.note}" if self.note else ""
        return f"{self.path}: {'applied and reloaded' if self.reloaded else 'written'}{gen}{note}"


def lock_path(path: Path) -> Path:
    return path.with_name(f".{path.name}.fdngx.lock")


def safe_apply(
    path: Path,
    content_fn: Callable[[], str],
    control: NginxControl | None,
    *,
    reload: bool,
    lock_timeout: float = 120.0,
) -> ApplyResult:
    """Write `content_fn()` to `path` the safe way (see module doc). `control=None`: write only.

    content_fn runs under the lock, so two overlapping cron runs cannot interleave render and write.
    """
    path = Path(path)
    if not path.parent.is_dir():
        raise ApplyError(f"{path}: directory {path.parent} does not exist")
    with file_lock(lock_path(path), timeout=lock_timeout):
        content = content_fn()
        old = read_bytes_or_none(path)
        generation = generation_in(content)
        if old == content.encode("utf-8"):
            return ApplyResult(path, False, False, "", generation)
        diff = unified_diff(old, content, path)
        backup(path)
        atomic_write(path, content)
        if control is None:
            return ApplyResult(path, True, False, diff, generation)
        reload_started = False
        try:
            control.test()
            if reload:
                reload_started = True
                control.reload(generation)
        except NginxNotRunning as exc:
            # At boot, cron or the sidecar may run before nginx: the file passed `nginx -t`, keep it.
            return ApplyResult(path, True, False, diff, generation, str(exc))
        except BaseException as exc:
            restore(path, old)
            reason = str(exc) if isinstance(exc, ApplyError) else f"{type(exc).__name__}: {exc}"
            if reload_started and old is not None:
                # nginx may have taken the bad file before we noticed; put it back on the old one. Verify by
                # new workers only: the generation URL belongs to the config we just gave up on.
                try:
                    control.reload(None)
                except ApplyError as again:
                    reason += f"; reloading the restored config also failed: {again}"
            if not isinstance(exc, Exception):
                raise
            raise ApplyError(f"{path}: {reason}; restored the previous file, nginx keeps the old config") from None
        return ApplyResult(path, True, reload, diff, generation)
