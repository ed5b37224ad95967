"""Shared fixtures. Helpers live in tests/support.py (importable by every test module)."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from fdngx import logs
from fdngx.sim import process as sim_process
from fdngx.system import procs
from tests.support import Backends, Site, free_ports, stop_process_group, wait_for

# A suite started in the background of a script (`make test &` in a shell without job control) inherits
# SIGINT ignored, one under `nohup` SIGHUP, and so would every fdngx the tests start: the Ctrl-C and hang-up
# tests' signals would do nothing (fdngx launch keeps an inherited ignored signal ignored, as nohup means).
# Their default dispositions here are what the children inherit.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)
if signal.getsignal(signal.SIGHUP) is signal.SIG_IGN:
    signal.signal(signal.SIGHUP, signal.SIG_DFL)


@pytest.fixture(autouse=True, scope="session")
def _a_share_of_the_ports() -> None:
    """On pytest-xdist's workers (`make test`), each hands out free ports from its own share of the range
    free_ports draws from: two tests running at once never pick the same port before either binds it."""
    worker, count = os.environ.get("PYTEST_XDIST_WORKER", ""), os.environ.get("PYTEST_XDIST_WORKER_COUNT", "")
    span = len(sim_process._below_ephemeral())
    if worker[:2] == "gw" and worker[2:].isdigit() and count.isdigit() and int(count) > 1 and span:
        sim_process._cursor[:] = [int(worker[2:]) * span // int(count)]


@pytest.fixture(autouse=True)
def _logging_as_it_was() -> Iterator[None]:
    """What a test's in-process CLI run did to logging is undone after it: setup_logging puts a handler on the
    stream of that run (closed after it: "--- Logging error --- I/O operation on closed file" in later tests)
    and stops the fdngx logger propagating (a later test's caplog saw nothing, or not, by test order)."""
    loggers = (logging.getLogger(), logging.getLogger(logs.LOGGER))
    kept = [(lg, list(lg.handlers), lg.level, lg.propagate) for lg in loggers]
    state = dict(logs._state)
    yield
    for lg, handlers, level, propagate in kept:
        lg.handlers[:] = handlers
        lg.setLevel(level)
        lg.propagate = propagate
    logs._state.clear()
    logs._state.update(state)


@pytest.fixture
def two_backends() -> Iterator[Backends]:
    """Two real HTTP replicas (one process) named b0 and b1."""
    with Backends(free_ports(2), ["b0", "b1"]) as b:
        yield b


@pytest.fixture
def prefix(tmp_path: Path) -> Path:
    p = tmp_path / "nginx"
    p.mkdir()
    return p


@pytest.fixture
def site(tmp_path: Path, two_backends: Backends) -> Iterator[Site]:
    """A real nginx (standalone, under tmp_path) in front of two_backends, weights 1 and 3."""
    s = Site(tmp_path, two_backends, [1, 3])
    try:
        yield s
    finally:
        s.nginx.stop()


@pytest.fixture
def nginx_titled_decoy() -> Iterator[subprocess.Popen[bytes]]:
    """An unrelated process (a `sleep`) that even carries nginx's master title (argv[0]); SIGHUP would kill it."""
    proc = subprocess.Popen(["bash", "-c", 'exec -a "nginx: master process /usr/sbin/nginx" sleep 120'],
                            start_new_session=True)
    wait_for(lambda: procs.cmdline(proc.pid).startswith("nginx: master process"), 10, what="decoy title")
    yield proc
    stop_process_group(proc, grace=2)
