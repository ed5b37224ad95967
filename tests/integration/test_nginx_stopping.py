"""nginx stopping gracefully with streams open (`nginx -s quit`, what Debian's nginx.service sends first): its
master lives on, workers titled "is shutting down", until the last stream ends, which for LLM streams is
minutes. An apply then SIGHUPed the exiting master, waited 15 s for new workers that never came, restored the
file and failed ("apply failed", counted; an outside day-two review). Now it is "nginx is stopping": the file
is written, nothing signalled, and nginx reads it when started again. Real nginx, a real held request."""

from __future__ import annotations

import os
import signal
import threading
from pathlib import Path

import pytest
import requests

from fdngx.system import procs
from tests.support import Nginx, RawServer, fdngx, free_ports, read_request, wait_for, write_inventory

pytestmark = pytest.mark.nginx


def test_an_apply_while_nginx_stops_with_a_stream_open_waits_in_the_file(tmp_path: Path) -> None:
    got, release = threading.Event(), threading.Event()

    def held(conn: object) -> None:  # the request arrives, the answer never comes until released
        read_request(conn)  # type: ignore[arg-type]
        got.set()
        release.wait(60)

    with RawServer(held) as backend:
        inv = write_inventory(tmp_path / "fdngx.json", [{"name": "r0", "host": "127.0.0.1", "port": backend.port,
                                                        "metrics_port": backend.port, "weight": 1}])
        port = free_ports(1)[0]
        conf = tmp_path / "nginx" / "nginx.conf"
        args = ["render", "-i", str(inv), "--mode", "standalone", "--listen", f"127.0.0.1:{port}", "--out",
                str(conf)]
        fdngx(*args, check=True)
        nginx = Nginx(tmp_path / "nginx").start(f"http://127.0.0.1:{port}/health")
        client = threading.Thread(target=lambda: requests.post(f"http://127.0.0.1:{port}/v1/completions", json={},
                                                               timeout=60), daemon=True)
        try:
            client.start()
            assert got.wait(20), "the request never reached the backend"
            assert nginx.proc is not None
            os.kill(nginx.proc.pid, signal.SIGQUIT)
            wait_for(lambda: all("shutting down" in procs.cmdline(w) for w in nginx.worker_pids()), 20,
                     what="the workers shutting down")
            write_inventory(inv, [{"name": "r0", "host": "127.0.0.1", "port": backend.port,
                                   "metrics_port": backend.port, "weight": 3}])
            proc = fdngx(*args, "--reload")
            assert proc.returncode == 0, proc.stderr
            assert "nginx is stopping (master pid" in proc.stderr + proc.stdout, proc.stderr + proc.stdout
            assert "weight=3" in conf.read_text(), "the file is written: nginx reads it when started again"
            assert nginx.proc.poll() is None and nginx.worker_pids(), "the stream is still being served"
        finally:
            release.set()
            client.join(30)
            nginx.stop()
