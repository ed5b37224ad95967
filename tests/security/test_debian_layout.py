"""Debian's own layout (issue 10): nginx.conf has `include /etc/nginx/sites-enabled/*;` and fdngx writes
`--mode site --out /etc/nginx/sites-enabled/fdngx`. The second apply left `fdngx.fdngx-bak` beside it:
nginx saw a duplicate upstream and every later apply, `nginx -t` and restart failed.

Here the sites-enabled directory is a temp dir, included by a wrapper nginx.conf with `dir/*`, and a real
nginx master runs on it (127.0.0.1 only). Nothing fdngx keeps beside the file may match the glob: not after
an apply, and not in the middle of one (paused by the test hook, then killed by PID).
"""

from __future__ import annotations

import glob
import json
import os
import signal
import subprocess
from pathlib import Path

import pytest

from fdngx.nginx.control import find_nginx
from tests.security.conftest import cli, main_conf, popen_cli, write
from tests.support import Backends, free_ports, stop_process_group, wait_for

pytestmark = pytest.mark.nginx


def _main_conf(tmp: Path, sites: Path) -> Path:
    return main_conf(tmp, f"{sites}/*")


def _inventory(path: Path, ports: list[int]) -> Path:
    insts = [{"name": f"b{i}", "host": "127.0.0.1", "port": p} for i, p in enumerate(ports)]
    return write(path, json.dumps({"version": 1, "instances": insts}))


def _nginx_t(conf: Path, prefix: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([find_nginx(), "-t", "-p", f"{prefix}/", "-c", str(conf), "-e", "logs/error.log"],
                          capture_output=True, text=True, timeout=30)


def _includable(sites: Path) -> list[str]:
    """What nginx's `include sites/*` reads (glob(3): `*` does not match a leading dot; glob.glob agrees,
    pathlib's glob does not)."""
    return sorted(Path(p).name for p in glob.glob(f"{glob.escape(str(sites))}/*"))


def test_debian_sites_enabled_second_apply_leaves_nothing_includable(tmp_path: Path) -> None:
    sites = tmp_path / "sites-enabled"
    sites.mkdir()
    conf = _main_conf(tmp_path, sites)
    out = sites / "fdngx"
    with Backends(free_ports(2), ["b0", "b1"]) as backends:
        inv = _inventory(tmp_path / "fdngx.json", backends.ports[:1])
        port = free_ports(1)[0]
        args = ["render", "-i", str(inv), "--mode", "site", "--out", str(out), "--listen", f"127.0.0.1:{port}",
                "--access-log", "off", "--nginx-conf", str(conf), "--prefix", str(tmp_path), "--reload"]
        first = cli(*args)
        assert first.returncode == 0, first.stderr  # nginx not running yet: tested, written, said so
        master = subprocess.Popen(
            [find_nginx(), "-p", f"{tmp_path}/", "-c", str(conf), "-e", "logs/error.log", "-g", "daemon off;"],
            start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        try:
            wait_for(lambda: _get(f"http://127.0.0.1:{port}/health") == 200, 20, what="nginx on the site config")
            for n, ports in enumerate([backends.ports, backends.ports[1:], backends.ports]):
                _inventory(inv, ports)
                proc = cli(*args)
                assert proc.returncode == 0, f"apply {n + 2}: {proc.stderr}"
                assert "reloaded" in proc.stderr, proc.stderr
                assert _includable(sites) == ["fdngx"], f"after apply {n + 2}: {_includable(sites)}"
                test = _nginx_t(conf, tmp_path)
                assert test.returncode == 0, f"nginx -t after apply {n + 2}: {test.stderr}"
            assert master.poll() is None
        finally:
            stop_process_group(master)
        # A restart reads the same files: it must come up.
        again = _nginx_t(conf, tmp_path)
        assert again.returncode == 0, again.stderr


@pytest.mark.parametrize("step", ["candidate-tested", "swapped"])
def test_debian_sites_enabled_nothing_includable_in_the_middle_of_an_apply(tmp_path: Path, step: str) -> None:
    """Paused where the candidate, backup and journal exist: nginx (a restart now) still reads one file.
    The apply is then SIGKILLed (by PID): the next run rolls it back or finishes, and the glob stays clean."""
    sites = tmp_path / "sites-enabled"
    sites.mkdir()
    conf = _main_conf(tmp_path, sites)
    out = sites / "fdngx"
    inv = _inventory(tmp_path / "fdngx.json", [8001])
    args = ["render", "-i", str(inv), "--mode", "site", "--out", str(out), "--listen", "127.0.0.1:18999",
            "--access-log", "off", "--nginx-conf", str(conf), "--prefix", str(tmp_path), "--reload"]
    assert cli(*args).returncode == 0
    _inventory(inv, [8002])
    proc = popen_cli(*args, env={"FDNGX_TEST_PAUSE_AT": step})
    try:
        assert proc.stderr is not None
        seen = []
        for line in proc.stderr:  # ends when the process does; the hook waits at most 60 s
            seen.append(line)
            if f"paused at {step}" in line:
                break
        assert any(f"paused at {step}" in ln for ln in seen), f"the apply did not pause at {step}: {seen}"
        assert _includable(sites) == ["fdngx"], _includable(sites)
        hidden = [p.name for p in sites.iterdir() if p.name.startswith(".")]
        assert hidden, "the paused apply should have files beside the live one (all hidden)"
        test = _nginx_t(conf, tmp_path)
        assert test.returncode == 0, test.stderr
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
    after = cli(*args)
    assert after.returncode == 0, after.stderr
    assert _includable(sites) == ["fdngx"]
    assert "127.0.0.1:8002" in out.read_text()
    assert _nginx_t(conf, tmp_path).returncode == 0


def _get(url: str) -> int:
    import requests

    try:
        return requests.get(url, timeout=1).status_code
    except requests.RequestException:
        return 0
