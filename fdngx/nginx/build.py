"""nginx the program: where one build and its main config put things (the config it reads without -c, its
pid file, its error log), the files `nginx -T` says it loaded, and what nginx says (its words in a message,
its master's lines in the error log).

A build's defaults come from `<binary> -V` ("configure arguments: --prefix=... --pid-path=..."), with
nginx's own defaults for an argument that is absent (auto/options: prefix /usr/local/nginx, conf-path
conf/nginx.conf, pid-path logs/nginx.pid, error-log-path logs/error.log; "stderr" logs to no file). A
relative path is relative to the prefix nginx runs with (-p, else the compiled one). The main config's
`pid` and `error_log` (main context, files included there too) override them; read with crossplane.
"""

from __future__ import annotations

import glob
import logging
import os
import re
import shlex
import shutil
import stat
import subprocess
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, BinaryIO

import crossplane

from fdngx.errors import ApplyError, UsageError
from fdngx.system.files import Identity, identity

log = logging.getLogger("fdngx.nginx")
Runner = Callable[..., "subprocess.CompletedProcess[str]"]

NGINX_PREFIX = "/usr/local/nginx"
_NGINX_DEFAULTS = {"conf_path": "conf/nginx.conf", "pid_path": "logs/nginx.pid", "error_log_path": "logs/error.log"}
_OPTIONS = {"--prefix": "prefix", "--conf-path": "conf_path", "--pid-path": "pid_path",
            "--error-log-path": "error_log_path"}
_NOT_FILES = ("stderr", "syslog:", "memory:")  # error_log targets that are no file
_DUMP_HEADER = b"# configuration file "
_MAX_INCLUDED = 1000  # main-context files followed for pid/error_log (an include loop ends here)
_MAX_DUMPED = 100_000  # file names kept from one `nginx -T`
# An error-log line: "2024/05/01 12:00:00 [emerg] 1234#1234: message" (level, pid#thread id).
_LOG_LINE = re.compile(rb"^\d{4}/\d\d/\d\d \d\d:\d\d:\d\d \[([a-z]+)\] (\d+)#\d+: ")
_SERIOUS = (b"emerg", b"alert", b"crit")
_GAVE_UP, _BIND_FAILED = b"still could not bind()", b": bind() to "  # ngx_open_listening_sockets' words
# What nginx puts before its words: "nginx: ", a log line's "2024/05/01 12:00:00 " and, after the level, "1234#1234: ".
_MESSAGE_HEAD = re.compile(r"^(?:nginx: )?(?:\d{4}/\d\d/\d\d \d\d:\d\d:\d\d )?(?:(\[[a-z]+\] )(\d+#\d+: )?)?")


def find_nginx(binary: str | None = None) -> str:
    """The nginx binary: as given, else on PATH, else Debian's /usr/sbin/nginx (not on a user's PATH)."""
    candidates = [binary] if binary else ["nginx", "/usr/sbin/nginx", "/usr/local/openresty/nginx/sbin/nginx"]
    for cand in candidates:
        found = shutil.which(cand) if cand else None
        if found:
            return found
    message = f"nginx binary {binary or 'nginx'} not found; install it (apt-get install nginx) or pass --nginx-bin"
    # --nginx-bin naming nothing is a bad option value (exit 2); no nginx on this machine is not (exit 1).
    raise UsageError(message) if binary else ApplyError(message)


def prepare_prefix(prefix: Path) -> None:
    """A standalone prefix needs logs/ and tmp/ before nginx starts (nginx creates only leaf dirs)."""
    for sub in ("logs", "tmp"):
        (prefix / sub).mkdir(parents=True, exist_ok=True)


# nginx's variables named after the upstream (`$fdngx_<upstream>_request_id`, the OpenResty flavor's
# `..._balancer_rid`) fit nginx's default variables_hash_bucket_size (64: names of at most 46 bytes on 64-bit
# builds) up to this upstream length; a standalone config (its http {} is ours) sets 128 past it.
HASH_SAFE_UPSTREAM = 46 - len("fdngx__balancer_rid")


def stderr_log_ok(version: str) -> bool:
    """Does this build take `-e stderr` (nginx 1.19.5 and later; OpenResty's version starts with its nginx's)?
    Unknown: no."""
    m = re.match(r"(?:nginx|openresty)/(\d+)\.(\d+)\.(\d+)", version)
    return m is not None and tuple(map(int, m.groups())) >= (1, 19, 5)


def nginx_message(text: str, keep_pid: bool = False) -> str:
    """nginx's own words ("[emerg] unknown directive ..."), without its 'nginx: ' prefixes, a log line's time
    and (unless `keep_pid`) its "PID#TID: ", and without the final 'test failed' line."""
    lines = [ln.strip() for ln in (text or "").splitlines() if ln.strip()]
    useful = [ln for ln in lines if "test failed" not in ln and "syntax is ok" not in ln] or lines
    words = []
    for ln in useful:
        m = _MESSAGE_HEAD.match(ln)  # every part optional: always matches
        level, pid = (m.group(1) or "", m.group(2) or "") if m else ("", "")
        words.append(level + (pid if keep_pid else "") + ln[m.end() if m else 0:])
    said = "; ".join(words) or "(no output)"
    if "variables_hash_bucket_size" in said:
        said += (" (fdngx names variables after the inventory's 'upstream', e.g. $fdngx_<upstream>_request_id: "
                 "set variables_hash_bucket_size 128; in the http {} that includes this config, or use an "
                 f"upstream name of at most {HASH_SAFE_UPSTREAM} characters)")
    return said


@dataclass(frozen=True)
class NginxBuild:
    """Where one nginx binary looks for things by default. Paths are absolute (relative ones resolved against
    the compiled prefix; `under(prefix)` moves them with -p). `error_log_path` None: the build logs to stderr
    (Debian's: --error-log-path=stderr). `version`: "nginx/1.22.1", "openresty/1.21.4.1", "" when unknown."""

    binary: Path
    version: str
    prefix: Path
    conf_path: Path
    pid_path: Path
    error_log_path: Path | None
    relative: frozenset[str] = frozenset()  # the path fields nginx resolves against its prefix at run time

    def under(self, prefix: Path | None) -> NginxBuild:
        """The same build run with `-p prefix`: its relative defaults move with the prefix."""
        if prefix is None or Path(prefix) == self.prefix:
            return self
        moved: dict[str, Any] = {name: Path(prefix) / getattr(self, name).relative_to(self.prefix)
                                 for name in self.relative}
        return replace(self, prefix=Path(prefix), **moved)


def debian_build(binary: Path) -> NginxBuild:
    """What fdngx assumes when the binary cannot say (`nginx -V` failed): Debian's layout."""
    return NginxBuild(binary, "", Path("/usr/share/nginx"), Path("/etc/nginx/nginx.conf"), Path("/run/nginx.pid"),
                      Path("/var/log/nginx/error.log"))


def parse_build(binary: Path, text: str) -> NginxBuild:
    """An NginxBuild from the text `<binary> -V` prints (on stderr). Raises ValueError when it is not nginx's."""
    version, configure = "", None
    for line in text.splitlines():
        if line.startswith("nginx version:"):
            version = (line.removeprefix("nginx version:").split() or ["?"])[0]
        elif line.startswith("configure arguments:"):
            configure = line.removeprefix("configure arguments:")
    if not version:
        raise ValueError("no 'nginx version:' line")
    given: dict[str, str] = {}
    for arg in shlex.split(configure or ""):
        name, eq, value = arg.partition("=")
        if eq and name in _OPTIONS:
            given[_OPTIONS[name]] = value
    prefix = Path(given.get("prefix") or NGINX_PREFIX)
    if not prefix.is_absolute():
        prefix = Path("/") / prefix
    paths: dict[str, Path | None] = {}
    relative = set()
    for name, default in _NGINX_DEFAULTS.items():
        value = given.get(name, default)
        if name == "error_log_path" and value in ("", "stderr"):
            paths[name] = None
            continue
        if not os.path.isabs(value):
            relative.add(name)
        paths[name] = prefix / value
    conf, pid = paths["conf_path"], paths["pid_path"]
    assert conf is not None and pid is not None
    return NginxBuild(binary, version, prefix, conf, pid, paths["error_log_path"], frozenset(relative))


_builds: dict[tuple[str, int, int, Runner], NginxBuild] = {}


def nginx_build(binary: str, runner: Runner = subprocess.run, timeout: float = 10.0) -> NginxBuild:
    """The build of `binary` (a path or a name on PATH), from `<binary> -V`, cached per program file. When
    `-V` fails (no such program, not nginx, too slow): Debian's layout, logged at DEBUG, never raised."""
    path = Path(os.path.realpath(shutil.which(binary) or binary))
    try:
        st = path.stat()
        key = (str(path), st.st_ino, st.st_mtime_ns, runner)
    except OSError:
        key = None
    if key is not None and key in _builds:
        return _builds[key]
    try:
        proc = runner([binary, "-V"], capture_output=True, text=True, timeout=timeout)
        build = parse_build(path, f"{proc.stderr or ''}\n{proc.stdout or ''}")
    except (OSError, subprocess.SubprocessError, ValueError, UnicodeError) as exc:
        log.debug("%s -V: %s; assuming Debian's layout (/etc/nginx/nginx.conf, /run/nginx.pid)", binary, exc)
        build = debian_build(path)  # kept too: a -V that hangs must not cost its timeout on every look
    if key is not None:
        _builds[key] = build
    return build


# -- the main config ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class MainSettings:
    """The main context's `pid` and first `error_log` naming a file, as written (maybe relative); None when
    the config sets none (or cannot be read)."""

    pid: str | None = None
    error_log: str | None = None


def _main_directives(conf: Path, deps: list[tuple[str, Identity | None]]) -> Iterable[tuple[str, list[str]]]:
    """The main-context directives of `conf` and of the files it includes there, in nginx's order. Files that
    cannot be read or parsed are skipped; an include is relative to the main config's directory. `deps` gets
    every file and glob directory looked at, with its identity before it was read (main_settings' cache)."""
    base = os.path.dirname(str(conf))
    seen: set[str] = set()

    def walk(path: str) -> Iterable[tuple[str, list[str]]]:
        if path in seen or len(seen) >= _MAX_INCLUDED:
            return
        deps.append((path, identity(Path(path))))
        if not os.path.isfile(path):  # not a FIFO: never hang
            return
        seen.add(path)
        try:
            payload = crossplane.parse(path, single=True, catch_errors=True, check_ctx=False, check_args=False)
            parsed = payload["config"][0]["parsed"]
        except Exception as exc:  # crossplane's own errors, a recursion limit: this file says nothing
            log.debug("%s: cannot parse: %s", path, exc)
            return
        for stmt in parsed:
            name, args = stmt.get("directive"), stmt.get("args") or []
            if name == "include" and args:
                pattern = args[0] if os.path.isabs(args[0]) else os.path.join(base, args[0])
                if glob.has_magic(pattern):  # a file added or removed there changes the directory's mtime
                    deps.append((os.path.dirname(pattern), identity(Path(os.path.dirname(pattern)))))
                names = sorted(glob.glob(pattern)) if glob.has_magic(pattern) else [pattern]
                for included in names:
                    yield from walk(included)
            elif isinstance(name, str):
                yield name, [str(a) for a in args]

    return walk(str(conf))


_settings: dict[str, tuple[tuple[tuple[str, Identity | None], ...], MainSettings]] = {}


def main_settings(conf: Path) -> MainSettings:
    """The main config's own `pid` and `error_log` file (see MainSettings); never raises. Parsed again only when
    a file it read (or a directory it globbed) changed: the sidecar asks every cycle (is nginx running?), and a
    config with thousands of servers takes a parse of a quarter second."""
    cached = _settings.get(str(conf))
    if cached is not None and all(identity(Path(path)) == seen for path, seen in cached[0]):
        return cached[1]
    deps: list[tuple[str, Identity | None]] = []
    pid = error_log = None
    for name, args in _main_directives(conf, deps):
        if name == "pid" and args and pid is None:
            pid = args[0]
        elif name == "error_log" and args and error_log is None and not args[0].startswith(_NOT_FILES):
            error_log = args[0]
    if len(_settings) >= 64:
        _settings.clear()
    _settings[str(conf)] = (tuple(deps), MainSettings(pid, error_log))
    return _settings[str(conf)][1]


def full_name(value: str | Path, prefix: Path) -> Path:
    """A path as nginx reads it: relative ones are relative to the prefix."""
    path = Path(value)
    return path if path.is_absolute() else prefix / path


# -- what `nginx -T` loaded -------------------------------------------------------------------------------


def scan_dump(stream: BinaryIO, found: set[str]) -> None:
    """Collect into `found` the file names `nginx -T` prints ("# configuration file PATH:" at a line's start)
    while reading its output to the end; keeps no more than the names."""
    at_start = True
    while chunk := stream.readline(65536):
        if at_start and chunk.startswith(_DUMP_HEADER) and chunk.endswith(b":\n") and len(found) < _MAX_DUMPED:
            found.add(os.fsdecode(chunk[len(_DUMP_HEADER):-2]))
        at_start = chunk.endswith(b"\n")


def with_real_paths(names: Iterable[str]) -> frozenset[str]:
    """The names as nginx printed them and their real paths (symlinks resolved)."""
    names = set(names)
    return frozenset(names | {os.path.realpath(n) for n in names})


# -- what nginx says -------------------------------------------------------------------------------------


class MasterLog:
    """What one nginx master writes to its error log from now on: its own lines only.

    A worker logs too ([crit] open() failed while serving a request, ...) under its own pid; only the
    master's lines say how a reload went. Read incrementally, at most 4 MiB a call, from a regular file only
    (never a FIFO or a terminal: /dev/stderr); `path` None: nginx logs to no file."""

    def __init__(self, path: Path | None, master: int) -> None:
        self.path, self.master = path, master
        try:
            self.offset = path.stat().st_size if path is not None else 0
        except OSError:
            self.offset = 0
        self.lines: list[tuple[bytes, bytes]] = []  # (level, line)
        self.changed = time.monotonic()  # when the master last wrote a line
        self._partial = b""

    def read(self) -> None:
        try:
            if self.path is None:
                return
            with open(os.open(self.path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC), "rb") as fh:
                st = os.fstat(fh.fileno())
                if not stat.S_ISREG(st.st_mode):
                    return
                if st.st_size < self.offset:  # truncated (rotated by copy): start over
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
        """The last of the master's lines of these levels. nginx ends a reload whose listen address is taken
        with "still could not bind()" after five "bind() to ADDRESS failed (98: ...)" tries: the last try's
        line names the address and why, so it comes first."""
        bad = [ln for level, ln in self.lines if level in levels]
        if not bad:
            return ""
        last = bad[-1]
        if last.rstrip().endswith(_GAVE_UP) and (tried := [ln for ln in bad[:-1] if _BIND_FAILED in ln]):
            return "; ".join(nginx_message(ln.decode("utf-8", "replace"), keep_pid=True) for ln in (tried[-1], last))
        return nginx_message(last.decode("utf-8", "replace"), keep_pid=True)

    def error(self) -> str:
        """The master's last [emerg]/[alert]/[crit] line, or ''."""
        return self._last(_SERIOUS)

    def refusal(self) -> str:
        """The master's last [emerg] line, or '': how nginx says it cannot load a config (a parse error, a
        bind() that failed). An [alert] or [crit] alone may come before workers that still start (a slow
        init): the reload is then judged by its workers, within the timeout."""
        return self._last((b"emerg",))
