"""Numeric option values (an outside review): NaN, inf, 1e308 and a negative value for every float option, a huge
int and a negative value for every int option, of launch, stop, sidecar, status and drain give exit 2 and ONE
line on stderr naming the option and the value: no traceback, nothing written, no loop run with them.

What they did before: `launch -n 99999999999999999999 --dry-run` built a list that long (OOM-killed at 24 GB);
`sidecar --debounce nan` never applied an inventory change; `--interval inf`, `--push-timeout 1e308`, `status
--timeout inf` and `--history 1e20` ended in an OverflowError traceback; `status --watch --interval nan` was a
busy loop; `launch --grace 7200` started the replicas, then tore them down over the pidfile it could not write.

Each value runs the real CLI (`python -m fdngx`, the tree this test imports, or FDNGX_UNDER_TEST) under a 1.5 GB
address-space limit and a timeout, so a regression fails the test instead of eating the machine. Everything a
run could reach is 127.0.0.1: the inventories name closed ports from free_ports, launches are --dry-run,
sidecars --once.

The ranges are written out here (not imported) on purpose: they are the contract, and this file runs against
an older tree too (that is how it was shown to catch what the review found).
"""

from __future__ import annotations

import functools
import json
import math
import os
import resource
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

import fdngx
from tests.security.conftest import PROPERTY, scaled
from tests.support import free_ports

TREE = Path(os.environ.get("FDNGX_UNDER_TEST") or Path(fdngx.__file__).resolve().parent.parent)
MEMORY = 1_500_000_000  # bytes of address space per run: python -m fdngx needs a few hundred MB at most
RUN_TIMEOUT = 60.0

VALUES = ["nan", "inf", "1e308", "-1"]  # -inf and a huge int: as -1 and 1e308 to a float option (kept short)
HUGE = "99999999999999999999"


def _limits() -> None:
    resource.setrlimit(resource.RLIMIT_AS, (MEMORY, MEMORY))


def run_all(argvs: list[list[str]], cwd: Path, timeout: float = RUN_TIMEOUT) -> list[subprocess.CompletedProcess[str]]:
    """`python -m fdngx ARGV` for every argv, all started at once (from this thread: preexec_fn is not safe
    with threads), each in its own session, killed by its process group if it outlives `timeout`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("FDNGX_")}  # no settings from outside
    env.update(PYTHONPATH=str(TREE), COLUMNS="200")
    procs = [subprocess.Popen([sys.executable, "-m", "fdngx", *argv], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              stdin=subprocess.DEVNULL, text=True, cwd=cwd, env=env, preexec_fn=_limits,
                              start_new_session=True)
             for argv in argvs]
    done = []
    for proc, argv in zip(procs, argvs, strict=True):
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            out, err = proc.communicate()
            err += f"\n[still running after {timeout:.0f} s: killed]"
        done.append(subprocess.CompletedProcess(argv, proc.returncode, out, err))
    return done


def files_under(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


class Fleet:
    """A temp directory with a two-replica inventory on closed 127.0.0.1 ports and an empty --out directory."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.ports = free_ports(4)  # closed: nothing listens on them
        self.inventory = root / "fdngx.json"
        self.inventory.write_text(json.dumps({"version": 1, "instances": [
            {"name": f"dp{i}", "host": "127.0.0.1", "port": self.ports[i]} for i in range(2)]}))
        self.out = root / "out"
        self.out.mkdir()

    def argv(self, command: str) -> list[str]:
        inv, out, p = str(self.inventory), self.out, self.ports
        sidecar = ["sidecar", "-i", inv, "--out", str(out / "up.conf"), "--no-reload", "--metrics-listen", "off",
                   "--once"]
        status = ["status", "-i", inv, "--out", str(out / "up.conf")]
        launch = ["launch", "--engine", "sim", "--dry-run", "-i", str(out / "fdngx.json")]
        return {
            "sidecar": sidecar,
            "sidecar-push": [*sidecar, "--flavor", "openresty", "--push-to", f"http://127.0.0.1:{p[2]}"],
            "status": status,
            "status-watch": [*status, "--watch", "--count", "2", "--json"],
            "launch": [*launch, "-n", "1", "--ports", str(p[2]), "--metrics-ports", str(p[3])],
            "launch-n": launch,
            "stop": ["stop", "-i", inv],
            "drain": ["drain", "dp0", "-i", inv],
        }[command]


@pytest.fixture
def fleet(tmp_path: Path) -> Fleet:
    return Fleet(tmp_path)


# (command, option): every numeric option of the commands that take one (render's are fdngx.nginx's).
FLOAT_OPTIONS = [
    ("sidecar", "--interval"), ("sidecar", "--debounce"), ("sidecar-push", "--push-timeout"),
    ("sidecar", "--min-hold"), ("sidecar", "--ramp"), ("sidecar", "--refused-grace"), ("sidecar", "--stale-after"),
    ("sidecar", "--registry-grace"),
    ("status", "--timeout"), ("status-watch", "--interval"),
    ("launch", "--grace"), ("launch", "--timeout"), ("launch", "--unhealthy-after"), ("stop", "--grace"),
    ("drain", "--wait"),
]
INT_OPTIONS = [
    ("launch-n", "--num-servers"), ("launch", "--base-port"), ("launch", "--metrics-base-port"),
    ("sidecar", "--scale"), ("sidecar", "--fail-threshold"), ("sidecar", "--recover-threshold"),
    ("sidecar", "--max-reloads-per-minute"), ("status-watch", "--history"),
]


def refused_in_one_line(proc: subprocess.CompletedProcess[str], option: str, shown: str) -> str | None:
    """Why `proc` is not a clean refusal of `option` (None: it is): exit 2, no traceback, nothing on stdout,
    exactly one line on stderr, naming the option and the value."""
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    if proc.returncode != 2:
        return f"exit {proc.returncode}"
    if "Traceback" in proc.stderr:
        return "a traceback"
    if proc.stdout.strip():
        return f"stdout {proc.stdout[:200]!r}"
    if len(lines) != 1:
        return f"{len(lines)} lines on stderr"
    if option not in lines[0] or shown not in lines[0]:
        return f"the line names not both {option} and {shown}"
    return None


def check(fleet: Fleet, command: str, option: str, values: list[str],
          shown: Callable[[str], str], why: Callable[[subprocess.CompletedProcess[str], str], str | None]) -> None:
    before = files_under(fleet.root)
    procs = run_all([[*fleet.argv(command), option, v] for v in values], cwd=fleet.root)
    bad = {v: f"{reason}; stderr: {p.stderr[-600:]!r}" for v, p in zip(values, procs, strict=True)
           if (reason := why(p, shown(v)))}
    assert not bad, "\n".join(f"{command} {option} {v}: {r}" for v, r in bad.items())
    assert files_under(fleet.root) == before, f"{command} {option}: files written or changed"


@pytest.mark.parametrize("command, option", FLOAT_OPTIONS, ids=[f"{c}{o}" for c, o in FLOAT_OPTIONS])
def test_a_float_option_takes_only_a_finite_number_in_its_range(fleet: Fleet, command: str, option: str) -> None:
    check(fleet, command, option, VALUES, lambda v: repr(float(v)),
          lambda p, shown: refused_in_one_line(p, option, shown))


@pytest.mark.parametrize("command, option", INT_OPTIONS, ids=[f"{c}{o}" for c, o in INT_OPTIONS])
def test_an_int_option_takes_only_a_whole_number_in_its_range(fleet: Fleet, command: str, option: str) -> None:
    extra = ["1025", "100000"] if option == "--num-servers" else []  # past the cap, and past the ports
    check(fleet, command, option, [HUGE, "-1", *extra], str, lambda p, shown: refused_in_one_line(p, option, shown))


@pytest.mark.parametrize("command, option", INT_OPTIONS[:1] + INT_OPTIONS[3:4],
                         ids=[f"{c}{o}" for c, o in INT_OPTIONS[:1] + INT_OPTIONS[3:4]])
def test_an_int_option_refuses_what_is_no_integer(fleet: Fleet, command: str, option: str) -> None:
    """nan, inf and 1e308 for a whole-number option: typer's own parse error, said by fdngx.cli on one line
    (exit 2, naming the option)."""

    def why(p: subprocess.CompletedProcess[str], shown: str) -> str | None:
        if p.returncode != 2 or "Traceback" in p.stderr or p.stdout.strip():
            return f"exit {p.returncode}"
        lines = p.stderr.splitlines()
        return None if len(lines) == 1 and option in lines[0] else f"not one line naming {option}: {lines}"

    check(fleet, command, option, ["nan", "inf", "-inf", "1e308"], str, why)


def test_the_values_at_the_edges_of_each_range_are_taken(fleet: Fleet) -> None:
    """The ranges are not too tight: the documented extremes pass (launch prints its plan, status its table)."""
    launch = fleet.argv("launch")
    argvs = [
        [*launch, "--grace", "3600", "--timeout", "86400", "--unhealthy-after", "86400"],
        [*launch, "--grace", "0", "--timeout", "1", "--unhealthy-after", "0"],
        [*fleet.argv("launch-n"), "-n", "2", "--base-port", str(fleet.ports[2]), "--metrics-base-port", "65534"],
        [*fleet.argv("status"), "--timeout", "0.05"],
        [*fleet.argv("status-watch"), "--interval", "0.2", "--history", "10000", "--timeout", "600"],
    ]
    for proc in run_all(argvs, cwd=fleet.root):
        assert proc.returncode == 0 and "Traceback" not in proc.stderr, (proc.args, proc.stderr[-1000:])


def test_a_sidecar_at_the_edges_runs_its_cycle(fleet: Fleet) -> None:
    argv = [*fleet.argv("sidecar"), "--interval", "3600", "--debounce", "0", "--min-hold", "3600", "--ramp", "3600",
            "--refused-grace", "0", "--stale-after", "0.05", "--registry-grace", "86400", "--scale", "10000",
            "--max-reloads-per-minute", "10000", "--fail-threshold", "10000", "--recover-threshold", "1"]
    [proc] = run_all([argv], cwd=fleet.root)
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr[-1000:]
    conf = (fleet.out / "up.conf").read_text()
    assert "weight=10000" in conf
    assert "weight 10000" in proc.stderr and HUGE not in proc.stderr


def test_a_refused_grace_leaves_no_launch_behind(fleet: Fleet) -> None:
    """--grace 7200 was taken by the plan and refused by the pidfile: the replicas started, then were torn down
    and the pidfile was left. Now the sim is never started (no --dry-run here: the refusal comes first)."""
    inventory = fleet.out / "fdngx.json"
    argv = ["launch", "--engine", "sim", "-n", "1", "-i", str(inventory), "--ports", str(fleet.ports[2]),
            "--metrics-ports", str(fleet.ports[3]), "--timeout", "10", "--grace", "7200"]
    try:
        [proc] = run_all([argv], cwd=fleet.root, timeout=15)
        assert refused_in_one_line(proc, "--grace", "7200.0") is None, proc.stderr[-2000:]
        assert not any(fleet.out.iterdir()), list(fleet.out.iterdir())
    finally:
        _stop_started(inventory)


def _stop_started(inventory: Path) -> None:
    """A launch that was not refused (an older fdngx) may leave its sim behind: stop it by the pid the inventory
    gives, if that process is still an fdngx simulator."""
    try:
        pids = {i["pid"] for i in json.loads(inventory.read_text())["instances"] if isinstance(i.get("pid"), int)}
    except (OSError, ValueError, KeyError, TypeError):
        return
    for pid in pids:
        try:
            if b"fdngx" in Path(f"/proc/{pid}/cmdline").read_bytes():
                os.kill(pid, signal.SIGKILL)
        except OSError:
            pass


# -- properties: any float, through the CLI's own parsing (launch) and the policy the sidecar builds ----------

number_text = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
    st.integers(-(10**25), 10**25).map(str),
    st.sampled_from(["NaN", "-nan", "+inf", "Infinity", "-0", "0.0", "1e-320", "3600.0000001", "86400.5", "1e400"]),
    st.floats(-10, 90_000).map(lambda x: f"{x:.3f}"),
)


def in_range(text: str, low: float, high: float) -> bool:
    value = float(text)
    return math.isfinite(value) and low <= value <= high


@functools.cache
def launch_app() -> Any:
    from fdngx.cli import make_app

    return make_app(["launch"])


@scaled(60)
@given(grace=number_text, timeout=number_text)
def test_launch_takes_a_grace_and_timeout_only_in_range(grace: str, timeout: str,
                                                       tmp_path_factory: pytest.TempPathFactory) -> None:
    """In process (typer's CliRunner, the same parsing as the command line): --dry-run, nothing started."""
    from typer.testing import CliRunner

    from fdngx.errors import UsageError

    out = tmp_path_factory.mktemp("launch")
    p1, p2 = free_ports(2)
    result = CliRunner().invoke(launch_app(), [
        "launch", "--engine", "sim", "--dry-run", "-n", "1", "-i", str(out / "fdngx.json"), "--ports", str(p1),
        "--metrics-ports", str(p2), f"--grace={grace}", f"--timeout={timeout}"])
    good_grace, good_timeout = in_range(grace, 0, 3600), in_range(timeout, 1, 86400)
    if good_grace and good_timeout:
        assert result.exit_code == 0 and "# engine: sim" in result.output, (result.output, result.exception)
    else:
        assert isinstance(result.exception, UsageError), (grace, timeout, result.exit_code, result.output)
        message = str(result.exception)
        assert "\n" not in message and ("--grace" if not good_grace else "--timeout") in message, message
    assert not any(out.iterdir())


POLICY_OPTIONS = {  # PolicyConfig field: (option, low, high)
    "interval": ("--interval", 0.05, 3600), "min_hold": ("--min-hold", 0, 3600), "ramp_duration": ("--ramp", 0, 3600),
    "refused_grace": ("--refused-grace", 0, 3600), "stale_after": ("--stale-after", 0.05, 3600),
}


@PROPERTY
@given(field=st.sampled_from(sorted(POLICY_OPTIONS)), text=number_text,
       flavor=st.sampled_from(["nginx", "openresty"]))
def test_the_sidecar_policy_names_the_option_it_refuses(field: str, text: str, flavor: str) -> None:
    """What `fdngx sidecar` builds from its options (config_for_flavor): in range or a one-line UsageError that
    names the option, for both flavors (openresty overrides --min-hold: a NaN there was never looked at)."""
    from fdngx.errors import UsageError
    from fdngx.weights.settings import config_for_flavor

    option, low, high = POLICY_OPTIONS[field]
    value = float(text)
    if in_range(text, low, high):
        config_for_flavor(flavor, **{field: value})
        return
    with pytest.raises(UsageError) as info:
        config_for_flavor(flavor, **{field: value})
    assert "\n" not in str(info.value) and option in str(info.value), str(info.value)
