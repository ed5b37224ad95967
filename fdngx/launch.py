"""`fdngx launch` and `fdngx stop`: preflight checks, health probes, the pidfile, detach, stop.

The supervision loop itself (start, wait for health, watch, restart, shut down) is in fdngx.supervise;
process primitives (sessions, identity by start time, group stop) in fdngx.procs; command lines in
fdngx.plan and fdngx.engines.<engine>.
"""

from __future__ import annotations

import contextlib
import errno
import http.client
import importlib.util
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, TextIO

from fdngx import procs
from fdngx.errors import LaunchError
from fdngx.fsutil import atomic_write
from fdngx.plan import Plan, pidfile_for

# -- health ----------------------------------------------------------------------------------------------


def probe_host(host: str) -> str:
    """Where to probe an instance from this machine: a wildcard listen address means loopback."""
    return {"0.0.0.0": "127.0.0.1", "::": "::1"}.get(host, host)


def health(host: str, port: int, path: str = "/health", timeout: float = 2.0) -> tuple[bool, str]:
    """(healthy, what we saw). Only 200 is healthy: FastDeploy answers 404/304 while its workers are not."""
    conn = http.client.HTTPConnection(probe_host(host), port, timeout=timeout)
    try:
        conn.request("GET", path)
        resp = conn.getresponse()
        resp.read()
        return resp.status == 200, "healthy" if resp.status == 200 else f"HTTP {resp.status}"
    except ConnectionRefusedError:
        return False, "not listening yet"
    except TimeoutError:
        return False, f"no answer in {timeout:.0f}s"
    except (OSError, http.client.HTTPException) as exc:
        return False, getattr(exc, "strerror", None) or type(exc).__name__
    finally:
        conn.close()


# -- progress --------------------------------------------------------------------------------------------


class Progress:
    """Per-instance status on stderr: a redrawn bar on a terminal, one line per change otherwise (logs)."""

    def __init__(self, names: list[str], out: TextIO | None = None, timeout: float = 0.0) -> None:
        self.names = names
        self.out = out or sys.stderr
        self.tty = self.out.isatty()
        self.timeout = timeout
        self.t0 = time.monotonic()
        self.last: dict[str, str] = {}
        self.drawn = False

    def say(self, msg: str) -> None:
        self._clear()
        print(f"fdngx: {msg}", file=self.out, flush=True)

    def update(self, status: dict[str, str]) -> None:
        elapsed = time.monotonic() - self.t0
        if self.tty:
            ok = sum(1 for n in self.names if status.get(n) == "healthy")
            width = 20
            fill = int(width * ok / max(1, len(self.names)))
            pending = ", ".join(f"{n}: {status.get(n, '?')}" for n in self.names if status.get(n) != "healthy")
            cols = shutil.get_terminal_size((100, 20)).columns
            line = f"[{'#' * fill}{'.' * (width - fill)}] {ok}/{len(self.names)} healthy {elapsed:4.0f}s"
            line += f"/{self.timeout:.0f}s" if self.timeout else ""
            line = (line + ("  " + pending if pending else ""))[: cols - 1]
            self.out.write("\r\x1b[K" + line)
            self.out.flush()
            self.drawn = True
        else:
            for n in self.names:
                if status.get(n) and status.get(n) != self.last.get(n):
                    print(f"fdngx: {n}: {status[n]} ({elapsed:.1f}s)", file=self.out, flush=True)
        self.last = dict(status)

    def _clear(self) -> None:
        if self.tty and self.drawn:
            self.out.write("\r\x1b[K")
            self.drawn = False


# -- preflight -------------------------------------------------------------------------------------------


def port_holder(port: int) -> str | None:
    """'pid N (command)' holding a TCP port, from /proc; None when not visible (another user's process)."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            rows = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for row in rows:
            f = row.split()
            # 0A = LISTEN, 07 = CLOSE (bound, not listening): both block a server's bind.
            if len(f) > 9 and int(f[1].rsplit(":", 1)[1], 16) == port and f[3] in ("0A", "07") and f[9] != "0":
                inodes.add(f"socket:[{f[9]}]")
    if not inodes:
        return None
    for pid in sorted(int(d) for d in os.listdir("/proc") if d.isdigit()):
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue
        for fd in fds:
            with contextlib.suppress(OSError):
                if os.readlink(f"/proc/{pid}/fd/{fd}") in inodes:
                    return f"pid {pid} ({procs.cmdline(pid)[:80]})"
    return None


def port_free(host: str, port: int) -> bool:
    """Can a server bind `port`? Checks the wildcard address too: FastDeploy binds 0.0.0.0 for its checks."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    wildcard = "::" if family == socket.AF_INET6 else "0.0.0.0"
    for addr in dict.fromkeys((host, wildcard)):
        with socket.socket(family, socket.SOCK_STREAM) as s:
            # Servers set SO_REUSEADDR, so lingering TIME_WAIT connections must not count as busy.
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                s.bind((addr, port))
            except OSError as exc:
                if exc.errno == errno.EADDRINUSE:
                    return False
                if exc.errno != errno.EADDRNOTAVAIL:
                    raise LaunchError(f"cannot check port {port} on {addr}: {exc.strerror}") from None
    return True


def check_ports(host: str, ports: list[int]) -> None:
    busy = [p for p in ports if not port_free(host, p)]
    if not busy:
        return
    where = "; ".join(
        f"port {p} is in use by {port_holder(p) or f'a process fdngx cannot see (try: ss -ltnp sport = :{p})'}"
        for p in busy
    )
    raise LaunchError(f"{where}: stop it or choose other ports (--base-port/--ports); nothing was started")


def check_engine(engine: str) -> None:
    """Fail before starting anything when the engine cannot run here (a child would only die at once)."""
    missing = {
        "fastdeploy": importlib.util.find_spec("fastdeploy") is None,
        "sglang": importlib.util.find_spec("sglang") is None,
        "vllm": shutil.which("vllm") is None,
    }.get(engine, False)
    if missing:
        raise LaunchError(
            f"--engine {engine}: {engine} is not installed for {sys.executable} (install it in this environment, "
            "or use --engine sim for simulated replicas)"
        )


def fastdeploy_installed() -> bool:
    return importlib.util.find_spec("fastdeploy") is not None


# -- pidfile ---------------------------------------------------------------------------------------------


def read_pidfile(path: str | Path) -> dict[str, Any] | None:
    try:
        data = json.loads(Path(path).read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise LaunchError(f"{path}: unreadable pidfile ({exc}); remove it if no fdngx supervisor runs") from None
    return data if isinstance(data, dict) else None


def write_pidfile(path: str | Path, data: dict[str, Any]) -> None:
    atomic_write(Path(path), json.dumps(data, indent=2) + "\n")


def live_supervisor(path: str | Path) -> dict[str, Any] | None:
    """The pidfile's content when its supervisor still runs (same pid and start time), else None."""
    data = read_pidfile(path)
    sup = (data or {}).get("supervisor") or {}
    if data and procs.same_process(int(sup.get("pid", 0)), sup.get("start")):
        return data
    return None


def remove_pidfile(path: str | Path, pid: int) -> None:
    """Remove the pidfile only when it is still ours (a newer launch may have replaced it)."""
    with contextlib.suppress(Exception):
        data = read_pidfile(path)
        if data and data.get("supervisor", {}).get("pid") == pid:
            Path(path).unlink()


# -- launch ----------------------------------------------------------------------------------------------


def preflight(plan: Plan) -> None:
    if not Path(plan.inventory_path).parent.is_dir():
        raise LaunchError(f"{plan.inventory_path}: the inventory's directory does not exist")
    running = live_supervisor(plan.pidfile)
    if running:
        raise LaunchError(
            f"{plan.pidfile}: replicas launched with this inventory are still supervised by pid "
            f"{running['supervisor']['pid']}; run 'fdngx stop --inventory {plan.inventory_path}' first"
        )
    check_engine(plan.engine)
    check_ports(plan.inventory.instances[0].host, plan.ports)


def launch(plan: Plan, detach: bool = False, out: TextIO | None = None) -> int:
    """Start, wait until every /health is 200, write the inventory; then supervise (foreground) or return."""
    out = out or sys.stderr
    preflight(plan)
    try:
        Path(plan.log_dir).mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise LaunchError(f"{plan.log_dir}: cannot create the log directory: {exc.strerror}") from None
    if detach:
        return _launch_detached(plan, out)
    from fdngx.supervise import Supervisor

    return Supervisor(plan, out=out, detached=False).run()


def _launch_detached(plan: Plan, out: TextIO) -> int:
    """Hand the plan to a supervisor in its own session and follow its pidfile until ready or failed."""
    log = Path(plan.log_dir) / "supervisor.log"
    progress = Progress([i.name for i in plan.inventory.instances], out, plan.timeout)
    with open(log, "ab") as fh:
        sup = subprocess.Popen(
            [sys.executable, "-m", "fdngx.supervise"],
            stdin=subprocess.PIPE,
            stdout=fh,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            close_fds=True,
        )
    assert sup.stdin is not None
    sup.stdin.write(json.dumps(plan.to_dict()).encode())
    sup.stdin.close()
    progress.say(f"supervisor pid {sup.pid} starting {len(plan.procs)} process(es); its log: {log}")
    old = signal.signal(signal.SIGTERM, _raise_interrupt)
    deadline = time.monotonic() + plan.timeout + plan.grace + 30
    try:
        while True:
            rc = sup.poll()
            data = read_pidfile(plan.pidfile) or {}
            if data.get("supervisor", {}).get("pid") != sup.pid:
                data = {}
            if data.get("instances"):
                progress.update(data["instances"])
            if rc is None and data.get("state") == "ready":
                progress.say(
                    f"{len(plan.inventory.instances)} replica(s) healthy; inventory {plan.inventory_path}; "
                    f"supervisor pid {sup.pid} (pidfile {plan.pidfile}); stop with: fdngx stop --inventory "
                    f"{plan.inventory_path}"
                )
                return 0
            if rc is not None:
                if data.get("log_tail"):
                    progress.say(f"last lines of {data.get('log_file', log)}:")
                    print(data["log_tail"], file=out)
                remove_pidfile(plan.pidfile, sup.pid)
                raise LaunchError(data.get("error") or f"the supervisor exited with status {rc}; see {log}")
            if time.monotonic() > deadline:
                raise LaunchError(f"the supervisor did not report ready in time; stopped it; see {log}")
            time.sleep(0.2)
    except KeyboardInterrupt:
        _stop_supervisor(sup, plan, progress)
        progress.say("interrupted: stopped the supervisor and every replica")
        return 130
    except LaunchError:
        # Failed while starting: nothing may keep running behind the user's back.
        _stop_supervisor(sup, plan, progress)
        raise
    finally:
        signal.signal(signal.SIGTERM, old)


def _stop_supervisor(sup: subprocess.Popen[bytes], plan: Plan, progress: Progress) -> None:
    if sup.poll() is not None:
        return
    progress.say(f"stopping supervisor pid {sup.pid}")
    sup.send_signal(signal.SIGTERM)
    try:
        sup.wait(plan.grace + 15)
    except subprocess.TimeoutExpired:
        sup.kill()
        sup.wait()
        stop(plan.inventory_path, progress.out)


def _raise_interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


# -- stop ------------------------------------------------------------------------------------------------


def stop(inventory_path: str | Path, out: TextIO | None = None, grace: float | None = None) -> list[str]:
    """Stop the supervisor recorded next to the inventory and everything it started; say what stopped."""
    out = out or sys.stderr
    pidfile = pidfile_for(Path(inventory_path).absolute())
    data = read_pidfile(pidfile)
    if data is None:
        if not Path(inventory_path).exists():
            raise LaunchError(f"{inventory_path}: no such inventory and no pidfile {pidfile}: nothing to stop")
        return [f"nothing to stop: no supervisor pidfile {pidfile} (a foreground launch stops with Ctrl-C)"]
    sup = data.get("supervisor", {})
    pid, start = int(sup.get("pid", 0)), sup.get("start")
    grace = float(data.get("grace", 15.0)) if grace is None else grace
    report = []
    supervised = procs.same_process(pid, start)
    if supervised:
        print(f"fdngx: stopping supervisor pid {pid} (up to {grace + 15:.0f}s)", file=out, flush=True)
        procs.signal_pid(pid, start, signal.SIGTERM)
        deadline = time.monotonic() + grace + 15
        while procs.same_process(pid, start) and time.monotonic() < deadline:
            time.sleep(0.1)
        if procs.signal_pid(pid, start, signal.SIGKILL):
            report.append(f"supervisor pid {pid} did not exit in time: killed")
        else:
            report.append(f"stopped supervisor pid {pid}")
    else:
        report.append(f"supervisor pid {pid} was not running (stale pidfile)")
    children = [c for c in data.get("children", []) if c.get("pid")]
    groups = [(int(c["pid"]), c.get("start"), c.get("stop_signal", "SIGTERM")) for c in children]
    left = [g for g in groups if procs.group_is_ours(g[0], g[1])]
    killed = procs.stop_all(left, [], grace) if left else []
    left_pids = {g[0] for g in left}
    for c in children:
        pid_c = int(c["pid"])
        how = "killed" if pid_c in killed else "stopped" if supervised or pid_c in left_pids else "already gone:"
        report.append(f"{how} {c['name']} pid {pid_c} serving {', '.join(c.get('instances', []))}")
    with contextlib.suppress(FileNotFoundError):
        Path(pidfile).unlink()
    return report
