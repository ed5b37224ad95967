"""How fdngx judges a reload from nginx's error log, against a real nginx under a temp prefix.

Only the master's own lines say how a reload went: a worker's [crit] line (a request that hit a missing
file) is not a refusal. And a refusal is final only once nginx stopped retrying and still started no new
workers: nginx retries a failed bind() five times, 500 ms apart, and takes the config when the port frees
up. Before, both made fdngx report "nginx refused the new config" and put the old file back without
reloading, while nginx ran (or went on to run) the new one.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests

from fdngx.nginx.apply import safe_apply
from fdngx.nginx.control import NginxControl, generation_in
from tests.support import Site, fdngx, stop_process_group, wait_for

pytestmark = pytest.mark.nginx


def _error_log(site: Site) -> Path:
    return site.conf.parent / "logs" / "error.log"


def _rendered(site: Site, weights: list[int]) -> str:
    """The standalone config `fdngx render` makes for `weights` (on stdout: the live file is untouched)."""
    site.set_weights(weights)
    args = [a for a in site.args if a not in ("--out", str(site.conf))]
    return fdngx("render", *args, check=True).stdout


def test_a_workers_crit_line_during_the_reload_is_not_a_refusal(site: Site,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """A worker logs `[crit] ... open() ... failed` while serving a request, just as the reload starts."""
    control = NginxControl(site.nginx.binary, site.conf, site.conf.parent, "logs/error.log",
                           verify_url=f"{site.url}/fdngx/generation", timeout=15)
    worker = min(site.nginx.worker_pids())
    signal_reload = NginxControl._signal_reload

    def a_worker_complains_then_reload(self: NginxControl, master: int) -> None:
        # After fdngx marked where the reload's part of the log starts, before any new worker can exist.
        stamp = time.strftime("%Y/%m/%d %H:%M:%S")
        with _error_log(site).open("a", encoding="utf-8") as fh:
            fh.write(f'{stamp} [crit] {worker}#{worker}: *7 open() "{site.tmp}/html/missing" failed '
                     '(13: Permission denied), client: 127.0.0.1, server: , request: "GET /missing HTTP/1.1"\n')
        signal_reload(self, master)

    monkeypatch.setattr(NginxControl, "_signal_reload", a_worker_complains_then_reload)
    content = _rendered(site, [4, 1])
    result = safe_apply(site.conf, content, control, reload=True, standalone=True)
    assert result.changed and result.reloaded, result.summary
    assert site.conf.read_text() == content
    assert site.generation() == generation_in(content)
    assert f"[crit] {worker}#{worker}" in _error_log(site).read_text(), "the worker's line was in the log"


def test_a_bind_that_succeeds_on_nginxs_retry_is_a_reload_not_a_refusal(site: Site) -> None:
    """The new --listen port is held by another socket that lets go after nginx's first failed bind():
    nginx's next try (0.5 s later) binds it and nginx runs the new config, so the new file must stay."""
    blocker = socket.socket()
    try:
        blocker.bind(("127.0.0.1", 0))
        blocker.listen()
        port = blocker.getsockname()[1]
        args = [f"127.0.0.1:{port}" if a.startswith("127.0.0.1:") else a for a in site.args]
        proc = subprocess.Popen([sys.executable, "-m", "fdngx", "render", *args, "--reload"],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
        try:
            wait_for(lambda: f"bind() to 127.0.0.1:{port} failed" in _error_log(site).read_text(), 30,
                     what="nginx's first failed bind() of the new port")
            blocker.close()
            _out, err = proc.communicate(timeout=120)
        finally:
            stop_process_group(proc)
    finally:
        blocker.close()
    assert proc.returncode == 0, err
    assert "applied and reloaded" in err and "refused" not in err, err
    assert f"listen 127.0.0.1:{port}" in site.conf.read_text(), "the new file is the live one"
    served = requests.get(f"http://127.0.0.1:{port}/fdngx/generation", timeout=5).text.strip()
    assert served == generation_in(site.conf.read_text())


def test_a_clock_stepped_forward_after_nginx_started_does_not_hide_it(site: Site) -> None:
    """NTP steps the clock forward at boot after nginx wrote its pid file: nginx's start time (boot time +
    ticks, on the new clock) is then later than the pid file's mtime (the old clock), the sign of a reused
    pid. Moving the pid file's mtime an hour back makes the same picture. Before: "nginx is not running",
    and every apply skipped the reload."""
    pid_file = site.conf.parent / "logs" / "nginx.pid"
    hour_ago = time.time() - 3600
    os.utime(pid_file, (hour_ago, hour_ago))
    control = NginxControl(site.nginx.binary, site.conf, site.conf.parent, "logs/error.log",
                           verify_url=f"{site.url}/fdngx/generation", timeout=15)
    assert site.nginx.proc is not None and control.master_pid() == site.nginx.proc.pid
    site.set_weights([4, 1])
    proc = site.apply()
    assert proc.returncode == 0 and "applied and reloaded" in proc.stderr, proc.stderr
    assert site.generation() == generation_in(site.conf.read_text())
