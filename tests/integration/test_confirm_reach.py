"""The reload confirmation (GET /fdngx/generation on the listener) reaches nginx as a sysadmin's host has it:

- with http_proxy in the environment (GPU clusters often set it, without no_proxy for 127.0.0.1), fdngx
  asks nginx directly: before, the check went to the proxy, every apply waited 15 s, failed and reloaded back;
- with a specific listen address, the check comes from that address, not from loopback, and the generation
  and status locations allow it (before: 403, the same failed apply on every run).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support import Nginx, fdngx, free_ports, write_inventory

pytestmark = pytest.mark.nginx


def test_a_proxy_in_the_environment_does_not_stand_between_fdngx_and_its_nginx(tmp_path: Path) -> None:
    api, port, closed = free_ports(3)  # `closed`: nothing listens there, the proxy refuses every connection
    inv = write_inventory(tmp_path / "fdngx.json", [{"name": "dp0", "host": "127.0.0.1", "port": api}])
    conf = tmp_path / "nginx" / "nginx.conf"
    args = ["render", "-i", str(inv), "--mode", "standalone", "--listen", f"127.0.0.1:{port}", "--out", str(conf)]
    fdngx(*args, check=True)
    nginx = Nginx(conf.parent).start(f"http://127.0.0.1:{port}/health")
    try:
        write_inventory(inv, [{"name": "dp0", "host": "127.0.0.1", "port": api, "weight": 3}])
        env = {k: v for k, v in os.environ.items() if k.lower() not in ("no_proxy", "http_proxy", "all_proxy")}
        env |= {"http_proxy": f"http://127.0.0.1:{closed}", "HTTP_PROXY": f"http://127.0.0.1:{closed}"}
        run = subprocess.run([sys.executable, "-m", "fdngx", *args, "--reload"], capture_output=True, text=True,
                             env=env, timeout=60)
        assert run.returncode == 0, run.stderr
        assert f"server 127.0.0.1:{api} weight=3 " in conf.read_text()
        assert "not confirmed" not in run.stderr and "restored" not in run.stderr, run.stderr
    finally:
        nginx.stop()


@pytest.mark.parametrize(("listen", "allowed"), [("10.0.0.5:8080", "10.0.0.5"), ("[fd00::5]:8080", "fd00::5")])
def test_a_specific_listen_address_may_ask_for_the_generation(tmp_path: Path, listen: str, allowed: str) -> None:
    inv = write_inventory(tmp_path / "fdngx.json", [{"name": "dp0", "host": "127.0.0.1", "port": 8001}])
    conf = tmp_path / "nginx" / "nginx.conf"
    fdngx("render", "-i", str(inv), "--mode", "standalone", "--listen", listen, "--out", str(conf), check=True)
    text = conf.read_text()
    for location in ("location = /fdngx/generation {", "location = /fdngx/status {"):
        block = text.split(location, 1)[1].split("}", 1)[0]
        assert f"allow {allowed};" in block and "deny all;" in block, block


def test_a_wildcard_or_loopback_listener_allows_loopback_only(tmp_path: Path) -> None:
    inv = write_inventory(tmp_path / "fdngx.json", [{"name": "dp0", "host": "127.0.0.1", "port": 8001}])
    for listen in ("8080", "0.0.0.0:8080", "127.0.0.1:8080"):
        text = fdngx("render", "-i", str(inv), "--mode", "site", "--listen", listen, check=True).stdout
        block = text.split("location = /fdngx/generation {", 1)[1].split("}", 1)[0]
        allows = [line.strip() for line in block.splitlines() if line.strip().startswith("allow")]
        assert allows == ["allow 127.0.0.1;", "allow ::1;"], (listen, allows)
