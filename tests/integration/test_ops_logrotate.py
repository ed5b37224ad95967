"""examples/logrotate/fdngx with the real logrotate: the replica logs `fdngx launch` keeps open (O_APPEND,
fdngx/launch/run.py) are rotated without a restart, and the writer goes on into the emptied file."""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import requests

from tests.integration.test_ops import run, tool
from tests.support import REPO, Backends, Site, wait_for

EXAMPLE = REPO / "examples" / "logrotate" / "fdngx"


def test_logrotate_example_rotates_a_replica_log_the_engine_keeps_open(tmp_path: Path) -> None:
    logs = tmp_path / "log"
    logs.mkdir()
    conf = tmp_path / "fdngx.logrotate"
    conf.write_text(EXAMPLE.read_text().replace("/var/log/fdngx/", f"{logs}/"))
    conf.chmod(0o644)
    check = run(tool("logrotate"), "-d", "-s", str(tmp_path / "state"), str(conf))
    assert check.returncode == 0 and "error" not in check.stderr.lower(), check.stderr
    log = logs / "dp0.log"
    go = tmp_path / "go"
    # An engine as `fdngx launch` runs one: its output in the log, opened for appending, for as long as it runs.
    writer = ("import sys, os, time\n"
              "for n in range(1000):\n"
              "    print(f'line {n}', flush=True)\n"
              f"    if n == 4:\n"
              f"        while not os.path.exists({str(go)!r}): time.sleep(0.01)\n"
              "    if n == 9: break\n")
    with open(log, "ab") as fh:
        proc = subprocess.Popen([sys.executable, "-c", writer], stdout=fh, stderr=subprocess.STDOUT)
    try:
        wait_for(lambda: log.read_text().count("\n") == 5, 10, what="the first lines")
        rotated = run(tool("logrotate"), "-f", "-s", str(tmp_path / "state"), str(conf))
        assert rotated.returncode == 0, rotated.stderr
        go.write_text("")
        assert proc.wait(timeout=10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    old = (logs / "dp0.log.1").read_text()
    assert old.splitlines() == [f"line {n}" for n in range(5)], old
    new = log.read_bytes()
    assert new.splitlines() == [f"line {n}".encode() for n in range(5, 10)], new[:200]  # no hole of NULs first


def _standalone_stanza() -> str:
    """The logrotate stanza docs/operations.md gives for a standalone prefix (the page is what is tested)."""
    text = (REPO / "docs" / "operations.md").read_text()
    block = text.split('```text title="a standalone prefix in /etc/logrotate.d/fdngx', 1)[1]
    return block.split("\n", 1)[1].split("\n```", 1)[0] + "\n"


@pytest.mark.nginx
def test_the_documented_stanza_rotates_a_standalone_nginxs_logs_and_nginx_reopens_them(two_backends: Backends) -> None:
    """A standalone nginx logs under its prefix, which nothing rotated (a soak review: ~17 MB a day at one request
    a second). The documented stanza with the real logrotate: the log is rotated and nginx writes a new one.
    Its own directory under /tmp, mode 0755: nginx's workers (nobody) reopen the log there, and pytest's temp
    root is 0700 (changing that for one test raced other pytest runs)."""
    base = Path(tempfile.mkdtemp(prefix="fdngx-logrotate-", dir="/tmp"))
    try:
        base.chmod(0o755)
        site = Site(base, two_backends, [1, 3])
        try:
            _rotate_and_reopen(site, site.conf.parent)
        finally:
            site.nginx.stop()
    finally:
        shutil.rmtree(base, ignore_errors=True)


def _rotate_and_reopen(site: Site, prefix: Path) -> None:
    conf = site.tmp / "nginx.logrotate"
    conf.write_text(_standalone_stanza().replace("/srv/fdngx/nginx/", f"{prefix}/"))
    conf.chmod(0o644)
    access = prefix / "logs" / "access.log"
    requests.post(f"{site.url}/v1/chat/completions?before-rotation", json={}, timeout=10)  # /health is not logged
    wait_for(lambda: access.exists() and access.stat().st_size > 0, 10, what="a first access line")
    rotated = run(tool("logrotate"), "-f", "-s", str(site.tmp / "state"), str(conf))
    assert rotated.returncode == 0, rotated.stderr
    assert (prefix / "logs" / "access.log.1").stat().st_size > 0
    wait_for(lambda: access.exists(), 10, what="nginx to reopen its log (USR1)")
    requests.post(f"{site.url}/v1/chat/completions?after-rotation", json={}, timeout=10)
    wait_for(lambda: "after-rotation" in access.read_text(), 10, what="the next request in the new log")
    assert "after-rotation" not in (prefix / "logs" / "access.log.1").read_text()
