"""Processes the benchmark starts: each in its own session, stopped by process group, never leaked.

Every child is registered here; `stop_all` (atexit, SIGTERM handler, finally blocks) stops whatever is
still running, by its own process-group id only.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import platform
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import requests

from fdngx.system.procs import stop_popen_group

CLK_TCK = os.sysconf("SC_CLK_TCK")
_live: dict[int, subprocess.Popen[bytes]] = {}


def spawn(argv: Sequence[str], log: Path, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
    with log.open("ab") as fh:
        proc = subprocess.Popen(list(argv), stdin=subprocess.DEVNULL, stdout=fh, stderr=subprocess.STDOUT,
                                start_new_session=True, env=env)
    _live[proc.pid] = proc
    return proc


def stop_group(proc: subprocess.Popen[Any], grace: float = 3.0) -> None:
    """SIGTERM the group, SIGKILL it after `grace` s (sglang's gateway keeps serving long after SIGTERM),
    then SIGKILL leftovers of the group (nginx workers whose master died)."""
    stop_popen_group(proc, grace)
    _live.pop(proc.pid, None)


def stop_all() -> None:
    for proc in list(_live.values()):
        stop_group(proc, grace=1.0)


atexit.register(stop_all)


def wait_http(url: str, timeout: float, proc: subprocess.Popen[Any] | None = None, ok: int = 200) -> None:
    deadline = time.monotonic() + timeout
    session = requests.Session()
    session.trust_env = False
    while True:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process {proc.args[:4]!r} exited {proc.returncode} before {url} answered")
        try:
            if session.get(url, timeout=1).status_code == ok:
                return
        except requests.RequestException:
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"{url} not answering {ok} after {timeout:.0f} s")
        time.sleep(0.05)


def proc_stat_cpu() -> list[int]:
    with open("/proc/stat") as f:
        return [int(x) for x in f.readline().split()[1:]]


def group_cpu_seconds(pgids: Sequence[int]) -> dict[int, float]:
    """utime+stime of every live process in each process group (children that exited are not counted)."""
    want = set(pgids)
    out = dict.fromkeys(want, 0.0)
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        pgrp = int(fields[2])
        if pgrp in want:
            out[pgrp] += (int(fields[11]) + int(fields[12])) / CLK_TCK
    return out


def wait_quiet(max_busy: float = 0.3, window: float = 1.0, max_wait: float = 30.0) -> float:
    """Wait (at most max_wait s) until the machine was under max_busy for one window: other users' jobs
    on the same 2 cores would distort the next run. Returns the busy share seen last."""
    deadline = time.monotonic() + max_wait
    while True:
        a = proc_stat_cpu()
        time.sleep(window)
        b = proc_stat_cpu()
        delta = [y - x for x, y in zip(a, b, strict=False)]
        busy = 1.0 - (delta[3] + delta[4]) / max(1, sum(delta))
        if busy <= max_busy or time.monotonic() > deadline:
            return busy


def self_cpu_seconds() -> float:
    t = os.times()
    return t.user + t.system


def machine() -> dict[str, Any]:
    model = ""
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    mem = ""
    with contextlib.suppress(OSError), open("/proc/meminfo") as f:
        mem = f.readline().split(":", 1)[1].strip()
    return {
        "nproc": os.cpu_count(),
        "cpu_model": model,
        "mem_total": mem,
        "loadavg_at_start": os.getloadavg(),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "nginx": _nginx_version(),
    }


def _nginx_version() -> str:
    from fdngx.nginx.control import find_nginx

    try:
        out = subprocess.run([find_nginx(), "-v"], capture_output=True, text=True, timeout=10)
        return out.stderr.strip().split("/", 1)[-1]
    except Exception:
        return "unknown"
