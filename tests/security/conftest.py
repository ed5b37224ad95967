"""Shared pieces of the security suite: hypothesis profiles, the CLI runner, hostile-input helpers.

Profiles: `security` (the default, bounded so the whole suite stays well under a minute in `make test`)
and `fuzz` (long runs): HYPOTHESIS_PROFILE=fuzz. Tests take their settings from `PROPERTY` instead of
loading a profile globally, so the rest of the test suite is unaffected. No example database is written
(nothing lands in the repository).

FDNGX_UNDER_TEST=/path/to/a/checkout runs the CLI-level tests against that tree's `fdngx` (PYTHONPATH),
e.g. a worktree of the original main, to show that a test catches the attack there.
"""

from __future__ import annotations

import http.server
import os
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, settings

settings.register_profile(
    "security", max_examples=40, deadline=None, database=None, derandomize=False,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.register_profile(
    "fuzz", max_examples=3000, deadline=None, database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
PROFILE_NAME = os.environ.get("HYPOTHESIS_PROFILE", "security")
if PROFILE_NAME not in ("security", "fuzz"):
    PROFILE_NAME = "security"
PROPERTY = settings(settings.get_profile(PROFILE_NAME))


def scaled(n: int) -> settings:
    """PROPERTY with `n` examples in the bounded profile (a slow property), the fuzz count under fuzz."""
    if PROFILE_NAME == "fuzz":
        return PROPERTY
    return settings(PROPERTY, max_examples=n)


UNDER_TEST = os.environ.get("FDNGX_UNDER_TEST")
NOBODY = 65534  # an account that is not ours (tests run as root or as a user; see needs_root)

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="giving a file to another account needs root")


def cli(*args: str, cwd: Path | None = None, timeout: float = 60.0,
        env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """The real `fdngx` command in a subprocess (as cron and users run it)."""
    e = dict(os.environ)
    e.pop("FDNGX_TEST_PAUSE_AT", None)
    if UNDER_TEST:
        e["PYTHONPATH"] = UNDER_TEST
    e.update(env or {})
    if UNDER_TEST and cwd is None:
        cwd = Path(UNDER_TEST)  # `-m` puts the working directory first on sys.path
    return subprocess.run([sys.executable, "-m", "fdngx", *args], capture_output=True, text=True, cwd=cwd,
                          timeout=timeout, env=e)


def popen_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.Popen[str]:
    e = dict(os.environ)
    if UNDER_TEST:
        e["PYTHONPATH"] = UNDER_TEST
    e.update(env or {})
    return subprocess.Popen([sys.executable, "-m", "fdngx", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=e, start_new_session=True,
                            cwd=UNDER_TEST or None)


def assert_refused(proc: subprocess.CompletedProcess[str], *words: str, codes: tuple[int, ...] = (1, 2)) -> str:
    """A clean refusal: exit 1 (or 2, usage), no traceback, no config on stdout, and one stderr line that
    names every one of `words` (the file, the field, the option). Returns that line."""
    err = proc.stderr
    assert proc.returncode in codes, f"exit {proc.returncode}, expected a refusal; stderr: {err[-2000:]}"
    assert "Traceback" not in err, err[-3000:]
    assert "upstream" not in proc.stdout and "server" not in proc.stdout, proc.stdout[:500]
    lines = [ln for ln in err.splitlines() if all(w in ln for w in words)]
    assert lines, f"no stderr line names {words}: {err[-2000:]}"
    return lines[0]


def write(path: Path, text: str | bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text)
    return path


def main_conf(tmp: Path, *includes: str) -> Path:
    """A distribution-like main nginx.conf under `tmp` (pid, logs and temp files there too) whose http {}
    includes `includes` (globs such as `dir/*`), as Debian's includes conf.d/*.conf and sites-enabled/*."""
    for sub in ("logs", "tmp"):
        (tmp / sub).mkdir(exist_ok=True)
    lines = "".join(f"    include {inc};\n" for inc in includes)
    return write(tmp / "nginx.conf", (
        f"pid {tmp}/logs/nginx.pid;\nerror_log {tmp}/logs/error.log;\nworker_processes 1;\n"
        "events { worker_connections 256; }\n"
        "http {\n"
        f"    client_body_temp_path {tmp}/tmp/body;\n    proxy_temp_path {tmp}/tmp/proxy;\n"
        f"    fastcgi_temp_path {tmp}/tmp/fastcgi;\n    uwsgi_temp_path {tmp}/tmp/uwsgi;\n"
        f"    scgi_temp_path {tmp}/tmp/scgi;\n"
        f"    access_log off;\n{lines}"
        "}\n"
    ))


class PageServer:
    """A tiny HTTP server on 127.0.0.1 playing one replica: /health answers 200, /metrics answers `page`
    (a str, or a callable returning one), /v1/* answers 200 with its name."""

    def __init__(self, name: str, page: str | Callable[[], str]) -> None:
        self.name = name
        self.page = page
        owner = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self) -> None:
                if self.path == "/metrics":
                    page = owner.page() if callable(owner.page) else owner.page
                    body = page.encode("utf-8")
                elif self.path == "/health" or self.path.startswith("/v1/"):
                    body = owner.name.encode()
                else:
                    self.send_error(404)
                    return
                self.send_response(200)
                self.send_header("Content-Type", "text/plain; version=0.0.4")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, args=(0.05,), name=f"page-{name}",
                                       daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def fastdeploy_page(running: float | str = 3, waiting: float | str = 0, max_batch_size: float | str = 64,
                    kv: float | str = 0.2) -> str:
    """A FastDeploy /metrics page (the series fdngx reads), values printed as given ('NaN', '1e308', ...)."""
    return (
        "# HELP fastdeploy:num_requests_running Number of requests currently running\n"
        "# TYPE fastdeploy:num_requests_running gauge\n"
        f"fastdeploy:num_requests_running {running}\n"
        "# TYPE fastdeploy:num_requests_waiting gauge\n"
        f"fastdeploy:num_requests_waiting {waiting}\n"
        "# TYPE fastdeploy:num_requests_enqueued gauge\n"
        "fastdeploy:num_requests_enqueued 0.0\n"
        "# TYPE fastdeploy:gpu_cache_usage_perc gauge\n"
        f"fastdeploy:gpu_cache_usage_perc {kv}\n"
        "# TYPE fastdeploy:max_batch_size gauge\n"
        f"fastdeploy:max_batch_size {max_batch_size}\n"
    )


@pytest.fixture
def page_servers() -> Iterator[Callable[[str, str | Callable[[], str]], PageServer]]:
    started: list[PageServer] = []

    def start(name: str, page: str | Callable[[], str]) -> PageServer:
        s = PageServer(name, page)
        started.append(s)
        return s

    yield start
    for s in started:
        s.stop()
