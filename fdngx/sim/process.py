"""Start and stop an `fdngx sim` process from Python: the library API for tests, benchmarks and the demo.

with start_sim([8001, 8002], [9001, 9002], speed=[1.0, 0.5], max_num_seqs=4) as sim:
    sim.fault(1, unhealthy=True)
    sim.state(0)["running"]
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, BinaryIO

import requests

from fdngx.errors import LaunchError

STOP_GRACE_S = 5.0


# The kernel's ephemeral range: every outgoing connection (a curl, nginx to an upstream, a scrape) takes its
# source port from it, and while it is open nobody can bind that port. A port bound to 0 and closed again
# comes from that range, so a listener started a moment later could find it taken (a docs run lost nginx's
# bind() that way, CI stop 32). free_ports hands out ports below it instead, one cursor per process.
_LOCAL_RANGE = Path("/proc/sys/net/ipv4/ip_local_port_range")
_FLOOR = 10000
_cursor: list[int] = []


def _below_ephemeral() -> range:
    try:
        low = int(_LOCAL_RANGE.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        low = 32768
    return range(_FLOOR, low) if low - _FLOOR >= 1000 else range(0)


def _bindable(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def _kernel_ports(n: int, host: str) -> list[int]:
    socks = []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind((host, 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def free_ports(n: int, host: str = "127.0.0.1", consecutive: bool = False) -> list[int]:
    """n distinct ports that were free a moment ago, below the kernel's ephemeral range (no outgoing
    connection can take one before its listener binds it) and not handed out before by this process;
    `consecutive` makes them a run (base, base+1, ...). Where that range leaves no room (a host whose
    ephemeral range starts low): single ports bound to 0, runs from 20000-60000 as before."""
    span = _below_ephemeral()
    if len(span) < 2 * n:
        if not consecutive:
            return _kernel_ports(n, host)
        span = range(20000, 60000)
    if not _cursor:
        import random

        _cursor.append(random.Random(os.getpid() ^ time.monotonic_ns()).randrange(len(span)))
    found: list[int] = []
    for _ in range(len(span)):
        port = span[_cursor[0] % len(span)]
        _cursor[0] += 1
        if not _bindable(host, port):
            found = []
            continue
        if consecutive and found and port != found[-1] + 1:  # wrapped around
            found = []
        found.append(port)
        if len(found) == n:
            return found
    raise LaunchError(f"no {n} free ports on {host} below the ephemeral range")


def _csv(values: Sequence[Any] | Any) -> str:
    if isinstance(values, (list, tuple)):
        return ",".join(str(v) for v in values)
    return str(values)


def _tail(path: Path, lines: int = 15) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return "(no log)"
    return " | ".join(text.strip().splitlines()[-lines:]) or "(empty log)"


class SimProcess:
    def __init__(
        self,
        proc: subprocess.Popen[bytes],
        host: str,
        ports: list[int],
        metrics_ports: list[int],
        log_path: Path,
        log_file: BinaryIO,
        own_log: bool = False,
    ) -> None:
        self.proc = proc
        self.host = host
        self.ports = ports
        self.metrics_ports = metrics_ports
        self.log_path = log_path
        self._log_file = log_file
        self._own_log = own_log
        self._http = requests.Session()
        self._http.trust_env = False  # never route loopback control calls through a proxy

    @property
    def pid(self) -> int:
        return self.proc.pid

    def url(self, i: int) -> str:
        return f"http://{self.host}:{self.ports[i]}"

    def metrics_url(self, i: int) -> str:
        return f"http://{self.host}:{self.metrics_ports[i]}"

    def _index(self, which: int) -> int:
        """A replica index, or a metrics or API port number."""
        if 0 <= which < len(self.ports):
            return which
        for seq in (self.metrics_ports, self.ports):
            if which in seq:
                return seq.index(which)
        raise ValueError(f"no replica {which}: give an index below {len(self.ports)} or one of its ports")

    def state(self, which: int) -> dict[str, Any]:
        r = self._http.get(f"{self.metrics_url(self._index(which))}/sim/state", timeout=5)
        r.raise_for_status()
        return r.json()

    def fault(self, which: int, **fault: Any) -> dict[str, Any]:
        r = self._http.post(f"{self.metrics_url(self._index(which))}/sim/fault", json=fault, timeout=5)
        if r.status_code != 200:
            raise LaunchError(f"sim fault {fault} refused: {r.status_code} {r.text.strip()}")
        return r.json()

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self, grace: float = STOP_GRACE_S) -> int | None:
        """SIGTERM, then SIGKILL after `grace` seconds; by PID only; safe to call twice."""
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    self.proc.kill()
                self.proc.wait(timeout=10)
        self._http.close()
        if not self._log_file.closed:
            self._log_file.close()
            # Start-up failures quote the log's tail; pass log_path to keep a log for longer.
            if self._own_log:
                self.log_path.unlink(missing_ok=True)
        return self.proc.returncode

    def __enter__(self) -> SimProcess:
        return self

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None) -> None:
        self.stop()

    def __del__(self) -> None:
        # Last resort so an exception between start and the `with` cannot leak a process.
        proc = getattr(self, "proc", None)
        if proc is not None and proc.poll() is None:
            with contextlib.suppress(Exception):
                proc.kill()


def sim_argv(
    ports: Sequence[int],
    metrics_ports: Sequence[int],
    *,
    host: str = "127.0.0.1",
    speed: Sequence[float] | float | None = None,
    max_num_seqs: Sequence[int] | int | None = None,
    seed: int = 0,
    extra_args: Iterable[str] = (),
) -> list[str]:
    argv = [
        sys.executable,
        "-m",
        "fdngx.cli",
        "sim",
        "--ports",
        _csv(ports),
        "--metrics-ports",
        _csv(metrics_ports),
        "--host",
        host,
        "--seed",
        str(seed),
    ]
    if speed is not None:
        argv += ["--speed", _csv(speed)]
    if max_num_seqs is not None:
        argv += ["--max-num-seqs", _csv(max_num_seqs)]
    return argv + list(extra_args)


def start_sim(
    ports: list[int],
    metrics_ports: list[int],
    *,
    host: str = "127.0.0.1",
    speed: Sequence[float] | float | None = None,
    max_num_seqs: Sequence[int] | int | None = None,
    seed: int = 0,
    extra_args: Iterable[str] = (),
    log_path: str | Path | None = None,
    timeout: float = 30.0,
) -> SimProcess:
    """Start `fdngx sim` in its own session and return once every replica's /health answers 200."""
    argv = sim_argv(
        ports, metrics_ports, host=host, speed=speed, max_num_seqs=max_num_seqs, seed=seed, extra_args=extra_args
    )
    own_log = log_path is None
    if log_path is None:
        fd, name = tempfile.mkstemp(prefix="fdngx-sim-", suffix=".log")
        os.close(fd)
        log_path = name
    path = Path(log_path)
    log_file = path.open("ab")
    proc = subprocess.Popen(
        argv, stdin=subprocess.DEVNULL, stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True
    )
    sim = SimProcess(proc, host, list(ports), list(metrics_ports), path, log_file, own_log)
    try:
        # Started faulty on purpose: listening with the documented status is "up".
        expect = 404 if "--unhealthy" in argv else 304 if "--no-weights" in argv else 200
        _wait_healthy(sim, timeout, expect=expect)
    except BaseException:
        sim.stop(grace=1.0)
        raise
    return sim


def _wait_healthy(sim: SimProcess, timeout: float, *, expect: int = 200) -> None:
    deadline = time.monotonic() + timeout
    pending = set(range(len(sim.ports)))
    while pending:
        if not sim.alive():
            raise LaunchError(f"fdngx sim exited with status {sim.proc.returncode}: {_tail(sim.log_path)}")
        for i in sorted(pending):
            try:
                if sim._http.get(f"{sim.url(i)}/health", timeout=1).status_code == expect:
                    pending.discard(i)
            except requests.RequestException:
                pass
        if pending and time.monotonic() > deadline:
            raise LaunchError(
                f"fdngx sim replicas on ports {[sim.ports[i] for i in sorted(pending)]} not healthy after "
                f"{timeout:.0f} s: {_tail(sim.log_path)}"
            )
        if pending:
            time.sleep(0.05)
