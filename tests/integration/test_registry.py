"""FastDeploy instances register themselves with `--router`: the sidecar's /register feeds nginx."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import requests

from fdngx.sim.process import start_sim
from tests.support import Nginx, free_ports, stop_process_group, wait_for

pytestmark = pytest.mark.nginx


def test_registered_instance_reaches_nginx(tmp_path: Path) -> None:
    api, metrics = free_ports(2), free_ports(2)
    reg_port, listen = free_ports(2)
    inv = tmp_path / "fdngx.json"  # does not exist yet: the registry creates it
    conf = tmp_path / "nginx" / "nginx.conf"
    with start_sim(api, metrics) as sim:
        sidecar = subprocess.Popen(
            [sys.executable, "-m", "fdngx", "sidecar", "-i", str(inv), "--out", str(conf), "--mode", "standalone",
             "--listen", str(listen), "--interval", "0.5", "--debounce", "0.2", "--metrics-listen", "off",
             "--registry-listen", f"127.0.0.1:{reg_port}"],
            start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        )
        nginx: Nginx | None = None
        try:
            url = f"http://127.0.0.1:{reg_port}"
            wait_for(lambda: requests.get(f"{url}/registered_number", timeout=1).json()["mixed"] == 0, 20,
                     what="registry up")
            # What FastDeploy's register_manager sends (a heartbeat every 5 s).
            body = {"role": "mixed", "host_ip": "127.0.0.1", "port": api[0], "metrics_port": metrics[0],
                    "tp_size": 1, "is_paused": False, "version": "2.5"}
            r = requests.post(f"{url}/register", json=body, timeout=5)
            assert r.status_code == 200 and r.json()["status"] == "success"
            # nginx is not running yet: the sidecar writes a tested config and keeps it for nginx's start.
            wait_for(lambda: conf.exists() and f"server 127.0.0.1:{api[0]} " in conf.read_text(), 20,
                     what="the registered replica in the rendered config")
            nginx = Nginx(conf.parent).start(f"http://127.0.0.1:{listen}/health")
            requests.post(f"{url}/register", json={**body, "port": api[1], "metrics_port": metrics[1]}, timeout=5)
            wait_for(lambda: f"server 127.0.0.1:{api[1]} " in conf.read_text(), 20, what="second replica")

            def both_serve() -> bool:
                completions = f"http://127.0.0.1:{listen}/v1/completions"
                seen = {requests.post(completions, json={"prompt": "x", "max_tokens": 1}, timeout=10)
                        .headers.get("X-Fdngx-Replica") for _ in range(12)}
                return seen == {str(api[0]), str(api[1])}

            wait_for(both_serve, 30, interval=0.5, what="nginx serving both registered replicas")
            bad = requests.post(f"{url}/register", json={"host_ip": "x y", "port": 1}, timeout=5)
            assert bad.status_code == 400 and "field 'host'" in bad.json()["detail"]
            assert [i["port"] for i in requests.get(f"{url}/registered", timeout=5).json()] == api
            assert sim.state(0)["healthy"]
        finally:
            stop_process_group(sidecar)
            if nginx is not None:
                nginx.stop()
