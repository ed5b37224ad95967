"""A controller process ends while a push hangs on a frontend that drips bytes: its exit (the sidecar's
SIGTERM clean-up, or main simply returning) must not wait on the push thread. 127.0.0.1 only."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.support import token_file, wait_for
from tests.unit.test_push_deadline import FakeFrontend, Handler, drip, frontends

__all__ = ["frontends"]  # the fixture

REPO = Path(__file__).resolve().parents[2]
SCRIPT = """
import sys, threading
from pathlib import Path
from fdngx.nginx.fanout import Fanout
from fdngx.nginx.pushfile import FrontendSpec
fan = Fanout([FrontendSpec(sys.argv[1], Path(sys.argv[2]))], timeout=60.0)
threading.Thread(target=fan.push, args=("generation 1\\nempty\\n",), daemon=True).start()  # the cycle, waiting
sys.stdin.readline()  # the test says when the push is in flight
if sys.argv[3] == "close":
    fan.close()  # what the sidecar does when SIGTERM ends its loop
print("main returns", flush=True)
"""


@pytest.mark.parametrize("clean_up", ["close", "no-close"])
def test_exit_never_waits_on_a_hung_push(frontends: Callable[[Handler], FakeFrontend], tmp_path: Path,
                                         clean_up: str) -> None:
    slow = frontends(drip)
    proc = subprocess.Popen([sys.executable, "-c", SCRIPT, f"{slow.url}/fdngx/peers", str(token_file(tmp_path)),
                             clean_up], cwd=REPO, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                            start_new_session=True, env={**os.environ, "PYTHONPATH": str(REPO)})
    try:
        wait_for(slow.got_request.is_set, 20, what="the push in flight")
        assert proc.stdin is not None
        proc.stdin.write("\n")
        proc.stdin.flush()
        try:
            proc.wait(timeout=10)  # the drip goes on for 30 s: a process waiting on the push is still here
        except subprocess.TimeoutExpired:
            pytest.fail("the process did not exit: it waits on the hung push thread")
        assert proc.returncode == 0
        assert proc.stdout is not None and "main returns" in proc.stdout.read()
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(5)
