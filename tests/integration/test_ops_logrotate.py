"""examples/logrotate/fdngx with the real logrotate: the replica logs `fdngx launch` keeps open (O_APPEND,
fdngx/launch/run.py) are rotated without a restart, and the writer goes on into the emptied file."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from tests.integration.test_ops import run, tool
from tests.support import REPO, wait_for

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
