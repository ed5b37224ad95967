"""The --config file itself and where its top-level keys go (fdngx/config.py):

- only a regular file of at most 1 MiB is read: a FIFO hung the run, /dev/null was taken as an empty file, a
  huge file was read whole;
- a top-level key whose meaning differs between commands (timeout, interval) is refused there, with the
  tables to use (`timeout = 900` for launch became status's scrape timeout);
- a top-level `out` (examples/fdngx.toml has one, for render, sidecar and status) reaches drain only with
  --wait (drain refuses --out without it: the shipped settings file made every drain exit 2); FDNGX_OUT too,
  and FDNGX_TIMEOUT/FDNGX_INTERVAL are refused like the top-level keys;
- true/false only for flags (`max-fails = true` rendered max_fails=1), one key never given twice in two
  spellings (`max-fails` and `max_fails`: the last one won).

Inventories name 127.0.0.1 ports nothing listens on; every run is the real CLI in a subprocess, except where
click's parsing of drain's options is looked at in-process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import typer

from fdngx import config
from fdngx.cli import make_app
from tests.support import REPO, free_ports

PY = sys.executable
SETTINGS = REPO / "examples" / "fdngx.toml"


def fdngx(*args: str, cwd: Path | None = None, timeout: float = 60,
          env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("FDNGX_") and k != "JOURNAL_STREAM"}
    return subprocess.run([PY, "-m", "fdngx", *args], capture_output=True, text=True, timeout=timeout,
                          env={**clean, **(env or {})}, cwd=cwd, stdin=subprocess.DEVNULL)


def inventory(path: Path) -> Path:
    ports = free_ports(4)
    path.write_text(json.dumps({"version": 1, "upstream": "fastdeploy", "instances": [
        {"name": f"dp{i}", "host": "127.0.0.1", "port": ports[2 * i], "metrics_port": ports[2 * i + 1]}
        for i in range(2)
    ]}))
    return path


def shipped_settings(tmp_path: Path) -> tuple[Path, Path, Path]:
    """examples/fdngx.toml with its inventory and out in `tmp_path`: (settings, inventory, out)."""
    inv, out = inventory(tmp_path / "fdngx.json"), tmp_path / "site.conf"
    text = SETTINGS.read_text()
    assert '"/etc/fdngx/fdngx.json"' in text and '"/etc/nginx/fdngx/site.conf"' in text
    conf = tmp_path / "fdngx.toml"
    conf.write_text(text.replace('"/etc/fdngx/fdngx.json"', json.dumps(str(inv)))
                    .replace('"/etc/nginx/fdngx/site.conf"', json.dumps(str(out))))
    return conf, inv, out


def one_error_line(proc: subprocess.CompletedProcess[str], conf: Path, *expected: str) -> None:
    assert proc.returncode == 1, (proc.returncode, proc.stderr)
    assert proc.stderr.startswith(f"fdngx: error: {conf}: "), proc.stderr
    assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr, proc.stderr
    for text in expected:
        assert text in proc.stderr, proc.stderr


# --- the file ----------------------------------------------------------------------------------------------------

def test_a_fifo_is_refused_not_waited_on(tmp_path: Path) -> None:
    fifo = tmp_path / "fdngx.toml"
    os.mkfifo(fifo)
    try:
        proc = fdngx("--config", str(fifo), "status", timeout=20)
    except subprocess.TimeoutExpired:
        pytest.fail("fdngx --config FIFO hung, waiting for a writer")
    one_error_line(proc, fifo, "not a regular file")


def test_a_device_is_refused(tmp_path: Path) -> None:
    # /dev/null only: /dev/zero takes the same path (a character device), without its risk to the test host
    one_error_line(fdngx("--config", "/dev/null", "status", cwd=tmp_path), Path("/dev/null"), "not a regular file")


def test_a_file_over_1_mib_is_refused(tmp_path: Path) -> None:
    big = tmp_path / "fdngx.toml"
    big.write_text(("#" * 1023 + "\n") * 1025)  # valid TOML (comments only), just over 1 MiB
    one_error_line(fdngx("--config", str(big), "status", cwd=tmp_path), big, "larger than 1 MiB")


def test_a_regular_file_through_a_symlink_is_read(tmp_path: Path) -> None:
    conf, _, out = shipped_settings(tmp_path)
    link = tmp_path / "link.toml"
    link.symlink_to(conf)
    proc = fdngx("--config", str(link), "render", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "listen 0.0.0.0:8080" in out.read_text()


def test_a_file_that_is_not_utf8_is_named(tmp_path: Path) -> None:
    conf = tmp_path / "fdngx.toml"
    conf.write_bytes(b'mode = "\xff"\n')
    one_error_line(fdngx("--config", str(conf), "status", cwd=tmp_path), conf, "not valid TOML")


# --- where top-level keys go -------------------------------------------------------------------------------------

def test_the_shipped_settings_file_drains_and_undrains(tmp_path: Path) -> None:
    """`out` at the top level (for render, sidecar, status) used to reach drain: exit 2, nothing drained."""
    conf, inv, _ = shipped_settings(tmp_path)
    proc = fdngx("--config", str(conf), "drain", "dp1", "-i", str(inv), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "dp1: drained in" in proc.stdout, proc.stdout
    assert [i.get("drain", False) for i in json.loads(inv.read_text())["instances"]] == [False, True]
    proc = fdngx("--config", str(conf), "drain", "dp1", "--undo", cwd=tmp_path)  # inventory from the file too
    assert proc.returncode == 0 and "back in rotation" in proc.stdout, proc.stderr
    assert not any(i.get("drain", False) for i in json.loads(inv.read_text())["instances"])


def drain_params(tmp_path: Path, text: str, *argv: str) -> dict[str, object]:
    """drain's options as click parses `argv` with the settings in `text` (out and state: absolute paths; a
    settings file's value is still the text here, made a Path by typer as it calls the command)."""
    conf = tmp_path / "fdngx.toml"
    conf.write_text(text)
    group = typer.main.get_command(make_app())
    ctx = group.make_context("fdngx", ["drain", *argv])
    root = {"log-format": next(p for p in group.params if p.name == "log_format")}
    ctx.default_map = config.load_settings(ctx, conf, group, root).default_map
    with ctx:
        return group.commands["drain"].make_context("drain", list(argv), parent=ctx).params


def test_top_level_out_and_state_reach_drain_only_with_wait(tmp_path: Path) -> None:
    out, state = tmp_path / "site.conf", tmp_path / "state.json"
    text = f'out = "{out}"\nstate = "{state}"\n'
    params = drain_params(tmp_path, text, "dp1")
    assert params["out"] is None and params["state"] is None, params
    params = drain_params(tmp_path, text, "dp1", "--wait", "60")
    assert Path(params["out"]) == out and Path(params["state"]) == state, params
    params = drain_params(tmp_path, text + "[drain]\nwait = 60\n", "dp1")  # --wait from the file counts too
    assert Path(params["out"]) == out and Path(params["state"]) == state, params
    params = drain_params(tmp_path, text, "dp1", "--out", "mine.conf")  # the command line still wins
    assert Path(params["out"]) == Path("mine.conf") and params["state"] is None, params


def test_fdngx_out_reaches_drain_only_with_wait(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """FDNGX_OUT, like a top-level out, is for every command that has --out: drain only with --wait."""
    out = tmp_path / "site.conf"
    for var in [v for v in os.environ if v.startswith("FDNGX_")]:
        monkeypatch.delenv(var)
    monkeypatch.setenv("FDNGX_OUT", str(out))
    group = typer.main.get_command(make_app())
    ctx = group.make_context("fdngx", ["drain", "dp1"])
    ctx.default_map = config.attach_envvars(group, "drain")
    with ctx:
        drain = group.commands["drain"]
        assert drain.make_context("drain", ["dp1"], parent=ctx).params["out"] is None
        assert Path(drain.make_context("drain", ["dp1", "--wait", "9"], parent=ctx).params["out"]) == out
    inv = inventory(tmp_path / "fdngx.json")
    proc = fdngx("drain", "dp1", "-i", str(inv), env={"FDNGX_OUT": str(out)}, cwd=tmp_path)
    assert proc.returncode == 0 and "dp1: drained in" in proc.stdout, proc.stderr


def test_drain_wait_with_the_shipped_settings_file_runs(tmp_path: Path) -> None:
    conf, _, _ = shipped_settings(tmp_path)
    proc = fdngx("--config", str(conf), "drain", "dp1", "--wait", "5", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "nothing listens at 127.0.0.1:" in proc.stdout, proc.stdout  # its closed port: nothing in flight


@pytest.mark.parametrize(("text", "tables"), [
    ("timeout = 900\n", "[launch] or [status]"),
    ("interval = 0.1\n", "[sidecar] or [status] or [demo]"),
    ("max_fails = 3\ninterval = 5\n", "[sidecar] or [status] or [demo]"),
])
def test_keys_that_mean_different_things_are_refused_at_the_top_level(tmp_path: Path, text: str,
                                                                      tables: str) -> None:
    conf = tmp_path / "fdngx.toml"
    conf.write_text(text)
    key = text.splitlines()[-1].split(" ")[0]
    proc = fdngx("--config", str(conf), "status", cwd=tmp_path)
    one_error_line(proc, conf, f"'{key}' means different things to different commands", f"put it in {tables}")
    # A command without the option runs: an upgraded host's cron `render` (or a `drain`) is not stopped by a
    # key an older settings file had at the top level.
    inv = inventory(tmp_path / "fdngx.json")
    proc = fdngx("--config", str(conf), "render", "-i", str(inv), cwd=tmp_path)
    assert proc.returncode == 0 and "upstream" in proc.stdout, proc.stderr


def test_the_same_keys_in_a_table_are_for_that_command(tmp_path: Path) -> None:
    conf, _, _ = shipped_settings(tmp_path)
    conf.write_text(conf.read_text().replace("[sidecar]", "[launch]\ntimeout = 900\n\n[status]\ntimeout = 0.5\n"
                                             "interval = 1\n\n[sidecar]\ninterval = 0.5"))
    proc = fdngx("--config", str(conf), "status", "--json", cwd=tmp_path, timeout=30)
    assert proc.returncode == 0, proc.stderr
    assert {i["name"] for i in json.loads(proc.stdout)["instances"]} == {"dp0", "dp1"}


def test_fdngx_timeout_and_interval_variables_are_refused_by_commands_that_have_them(tmp_path: Path) -> None:
    inv = inventory(tmp_path / "fdngx.json")
    proc = fdngx("status", "-i", str(inv), env={"FDNGX_TIMEOUT": "900"}, cwd=tmp_path)
    assert proc.returncode == 1 and proc.stderr.count("\n") == 1, proc.stderr
    assert proc.stderr.startswith("fdngx: error: FDNGX_TIMEOUT: means different things to different commands"), \
        proc.stderr
    assert "set FDNGX_STATUS_TIMEOUT instead" in proc.stderr, proc.stderr
    proc = fdngx("status", "-i", str(inv), "--watch", env={"FDNGX_INTERVAL": "0.1"}, cwd=tmp_path)
    assert proc.returncode == 1 and "FDNGX_INTERVAL: " in proc.stderr and "FDNGX_STATUS_INTERVAL" in proc.stderr
    # the command's own variable is read; a command without the option runs
    proc = fdngx("status", "-i", str(inv), "--json", env={"FDNGX_STATUS_TIMEOUT": "0.5"}, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    proc = fdngx("status", "-i", str(inv), "--json", env={"FDNGX_STATUS_TIMEOUT": "fast"}, cwd=tmp_path)
    assert proc.returncode == 2 and "FDNGX_STATUS_TIMEOUT" in proc.stderr, proc.stderr
    proc = fdngx("render", "-i", str(inv), env={"FDNGX_TIMEOUT": "900"}, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr


def test_every_option_that_commands_share_means_the_same_to_them_or_is_per_command() -> None:
    """A new option shared by two commands must be looked at: the same meaning (a top-level key for both), or a
    different one (config.PER_COMMAND)."""
    same_meaning = {
        # render and sidecar: the same config, rendered
        "access-log", "access-log-format", "admin-allow", "admin-listen", "admin-token-file", "api-keys-file",
        "api-keys-forward", "balancer", "client-body-buffer-size", "connect-timeout", "fail-timeout", "flavor",
        "force", "keepalive", "listen", "lua-dict-size", "max-fails", "mode", "nginx-bin", "nginx-conf", "pid-file",
        "prefix", "rate-burst", "rate-limit", "read-timeout", "reload-cmd", "speed-aware", "template-dir", "tls-cert",
        "tls-key",
        # the same files: the inventory; the config, its policy state (drain: only with --wait, ONLY_WITH)
        "inventory", "out", "state",
        # launch and sim (the replicas it starts, the simulated ones), launch and stop, sim and demo
        "host", "model", "ports", "metrics-ports", "grace", "max-num-seqs",
    }
    group = typer.main.get_command(make_app())
    takers: dict[str, list[str]] = {}
    for name, command in group.commands.items():
        for key in config.settings_of(command):
            takers.setdefault(key, []).append(name)
    shared = {key for key, names in takers.items() if len(names) > 1}
    unlooked = shared - same_meaning - set(config.PER_COMMAND)
    assert not unlooked, f"options shared by commands, meaning the same or not? {sorted(unlooked)}"
    for (command, key), other in config.ONLY_WITH.items():
        params = {p.name for p in group.commands[command].params}
        assert key in config.settings_of(group.commands[command]) and other in params, (command, key, other)


# --- values ------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize(("text", "expected"), [
    ("max-fails = true\n", "max-fails: expected a value for --max-fails, not true"),
    ("[render]\nmax_fails = false\n", "[render] max_fails: expected a value for --max-fails, not false"),
    ("[render]\nlisten = true\n", "[render] listen: expected a value for --listen, not true"),
    ("inventory = [\"a.json\", true]\n", "inventory: expected a value for --inventory, not true"),
    ("[render]\nquiet = 1\n", "[render] quiet: expected true or false, got 1"),
])
def test_true_and_false_only_for_flags(tmp_path: Path, text: str, expected: str) -> None:
    conf = tmp_path / "fdngx.toml"
    conf.write_text(text)
    one_error_line(fdngx("--config", str(conf), "render", cwd=tmp_path), conf, expected)


@pytest.mark.parametrize(("text", "expected"), [
    ("max-fails = 1\nmax_fails = 7\n", "'max-fails' and 'max_fails' are the same key"),
    ("[render]\nmax_fails = 1\nmode = \"site\"\nmax-fails = 7\n", "[render] 'max_fails' and 'max-fails' are the same"),
    ("log-format = \"json\"\nlog_format = \"text\"\n", "'log-format' and 'log_format' are the same key"),
])
def test_one_key_in_two_spellings_is_refused(tmp_path: Path, text: str, expected: str) -> None:
    conf = tmp_path / "fdngx.toml"
    conf.write_text(text)
    one_error_line(fdngx("--config", str(conf), "render", cwd=tmp_path), conf, expected, "given twice")
