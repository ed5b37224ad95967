"""Settings for every command from a TOML file (--config / FDNGX_CONFIG) and FDNGX_* variables, with the
precedence command line > FDNGX_<COMMAND>_<OPTION> > FDNGX_<OPTION> > [command] table > top-level key >
default; errors that name the file, the key, and absolute paths; completion on; the engine line only when
the engine was defaulted. Each case runs the real CLI in a subprocess."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

PY = sys.executable


def fdngx(*args: str, env: dict[str, str] | None = None, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("FDNGX_") and k != "JOURNAL_STREAM"}
    return subprocess.run([PY, "-m", "fdngx", *args], capture_output=True, text=True, timeout=60,
                          env={**clean, **(env or {})}, cwd=cwd)


def inventory(path: Path, *ports: int) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"version": 1, "upstream": "fastdeploy", "instances": [
        {"name": f"dp{i}", "host": "127.0.0.1", "port": p, "metrics_port": p + 1000} for i, p in enumerate(ports)
    ]}))
    return path


def listen_of(proc: subprocess.CompletedProcess[str]) -> str:
    assert proc.returncode == 0, proc.stderr
    found = re.findall(r"^\s*listen ([^;]+);", proc.stdout, re.M)
    assert found, proc.stdout[-2000:]
    return found[0]


def test_precedence_cli_then_command_env_then_env_then_table_then_top_level(tmp_path: Path) -> None:
    inv = inventory(tmp_path / "fdngx.json", 8001)
    conf = tmp_path / "fdngx.toml"
    conf.write_text(f'inventory = ["{inv}"]\nlisten = "127.0.0.1:1111"\n[render]\nmode = "standalone"\n')
    args = ["--config", str(conf), "render"]
    assert listen_of(fdngx(*args)) == "127.0.0.1:1111"  # top-level key (and [render] mode = standalone)
    conf.write_text(conf.read_text() + 'listen = "127.0.0.1:2222"\n')
    assert listen_of(fdngx(*args)) == "127.0.0.1:2222"  # [render] beats the top level
    env = {"FDNGX_LISTEN": "127.0.0.1:3333"}
    assert listen_of(fdngx(*args, env=env)) == "127.0.0.1:3333"  # FDNGX_<OPTION> beats the file
    env["FDNGX_RENDER_LISTEN"] = "127.0.0.1:4444"
    assert listen_of(fdngx(*args, env=env)) == "127.0.0.1:4444"  # FDNGX_<COMMAND>_<OPTION> beats FDNGX_<OPTION>
    assert listen_of(fdngx(*args, "--listen", "127.0.0.1:5555", env=env)) == "127.0.0.1:5555"  # the command line
    # and with nothing set, the built-in default
    assert listen_of(fdngx("render", "-i", str(inv), "--mode", "standalone")) == "127.0.0.1:8080"


def test_fdngx_config_variable_and_key_spellings(tmp_path: Path) -> None:
    inv = inventory(tmp_path / "fdngx.json", 8001)
    conf = tmp_path / "fdngx.toml"
    conf.write_text(f'[render]\ninventory = "{inv}"\nmode = "standalone"\nmax_fails = 7\nfail-timeout = 9\n')
    proc = fdngx("render", env={"FDNGX_CONFIG": str(conf)})
    assert proc.returncode == 0, proc.stderr
    assert "max_fails=7 fail_timeout=9" in proc.stdout, proc.stdout[-2000:]


def test_repeatable_options_from_the_environment_are_colon_separated(tmp_path: Path) -> None:
    a = inventory(tmp_path / "a" / "fdngx.json", 8001)
    b = inventory(tmp_path / "b" / "fdngx.json", 8002)
    b.write_text(b.read_text().replace('"dp0"', '"dp1"'))
    proc = fdngx("render", env={"FDNGX_INVENTORY": f"{a}{os.pathsep}{b}"})
    assert proc.returncode == 0, proc.stderr
    assert "127.0.0.1:8001" in proc.stdout and "127.0.0.1:8002" in proc.stdout


def test_flags_from_the_environment(tmp_path: Path) -> None:
    inv = inventory(tmp_path / "fdngx.json", 8001)
    out = tmp_path / "up.conf"
    assert fdngx("render", "-i", str(inv), "--out", str(out)).returncode == 0
    proc = fdngx("render", "-i", str(inv), "--out", str(out), env={"FDNGX_RENDER_QUIET": "true"})
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr
    proc = fdngx("render", "-i", str(inv), "--out", str(out), env={"FDNGX_RENDER_QUIET": "0"})
    assert proc.returncode == 0 and "unchanged" in proc.stderr, proc.stderr


def test_sidecar_takes_its_settings_from_the_file(tmp_path: Path) -> None:
    """fdngx/commands/sidecar.py knows nothing of the file: the required --out comes from [sidecar], and the
    missing inventory it names (from the file, relative there) is reported as an absolute path."""
    conf = tmp_path / "fdngx.toml"
    conf.write_text(f'inventory = "nodes/fdngx.json"\n[sidecar]\nout = "{tmp_path / "up.conf"}"\n'
                    'metrics-listen = "off"\ninterval = 0.5\n')
    proc = fdngx("--config", str(conf), "sidecar", cwd=tmp_path)
    assert proc.returncode == 1, proc.stderr
    assert "Missing option" not in proc.stderr
    assert f"{tmp_path / 'nodes' / 'fdngx.json'}: inventory file not found" in proc.stderr, proc.stderr


@pytest.mark.parametrize(("text", "expected"), [
    ("[render]\nlisten = \"8080\"\nlisen = \"8081\"\n", "[render] unknown key 'lisen' (render takes: "),
    ("colour = \"red\"\n", "unknown key 'colour': not an option of fdngx"),
    ("[rendr]\nmode = \"site\"\n", "unknown table [rendr] (commands: "),
    ("[sidecar]\ninterval = \"fast\"\n", "[sidecar] interval: "),
    ("[render]\nmode = \"everything\"\n", "[render] mode: "),
    ("[status]\njson = \"yes\"\n", "[status] json: expected true or false"),
    ("[render]\nlisten = [\"a\", \"b\"]\n", "[render] listen: expected one value, got a list"),
    ("render = 3\n", "'render' must be a table"),
    ("[render\n", "not valid TOML"),
])
def test_a_bad_config_file_is_an_error_naming_the_file_and_the_key(tmp_path: Path, text: str, expected: str) -> None:
    conf = tmp_path / "fdngx.toml"
    conf.write_text(text)
    proc = fdngx("--config", "fdngx.toml", "status", cwd=tmp_path)  # relative --config: shown absolute
    assert proc.returncode == 1, proc.stderr
    assert proc.stderr.startswith(f"fdngx: error: {conf}: "), proc.stderr
    assert expected in proc.stderr, proc.stderr
    assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr


def test_a_missing_config_file_is_named_with_its_absolute_path(tmp_path: Path) -> None:
    proc = fdngx("--config", "nope.toml", "status", cwd=tmp_path)
    assert proc.returncode == 1 and f"{tmp_path / 'nope.toml'}: config file not found" in proc.stderr, proc.stderr


def test_log_format_from_the_file_top_level(tmp_path: Path) -> None:
    conf = tmp_path / "fdngx.toml"
    conf.write_text('log-format = "json"\n')
    proc = fdngx("--config", str(conf), "render", "-i", "missing.json", cwd=tmp_path)
    doc = json.loads(proc.stderr)
    assert proc.returncode == 1 and doc["level"] == "error", proc.stderr
    # the command line beats the file
    proc = fdngx("--config", str(conf), "--log-format", "text", "render", "-i", "missing.json", cwd=tmp_path)
    assert proc.stderr.startswith("fdngx: error: "), proc.stderr


@pytest.mark.parametrize("command", [["render"], ["status"], ["sidecar", "--out", "up.conf", "--metrics-listen", "off"],
                                     ["render", "--scrape", "--out", "up.conf"]])
def test_missing_inventory_is_named_by_its_absolute_path_from_any_cwd(tmp_path: Path, command: list[str]) -> None:
    elsewhere = tmp_path / "cron-home"
    elsewhere.mkdir()
    proc = fdngx(*command, "-i", "etc/fdngx.json", cwd=elsewhere)
    assert proc.returncode == 1, proc.stderr
    assert f"fdngx: error: {elsewhere / 'etc' / 'fdngx.json'}: inventory file not found" in proc.stderr, proc.stderr
    proc = fdngx(*command, cwd=elsewhere)  # the default ./fdngx.json too
    assert f"{elsewhere / 'fdngx.json'}: inventory file not found" in proc.stderr, proc.stderr


def test_the_engine_line_only_when_the_engine_was_defaulted(tmp_path: Path) -> None:
    args = ["launch", "-n", "1", "--dry-run", "-i", str(tmp_path / "fdngx.json")]
    defaulted = fdngx(*args)
    assert defaulted.returncode == 0, defaulted.stderr
    assert "no --engine given" in defaulted.stderr and "using --engine" in defaulted.stderr
    for given in (fdngx(*args, "--engine", "sim"), fdngx(*args, env={"FDNGX_LAUNCH_ENGINE": "sim"})):
        assert given.returncode == 0 and "no --engine given" not in given.stderr, given.stderr
        assert "# engine: sim" in given.stdout


def test_shell_completion_is_on() -> None:
    assert "--install-completion" in fdngx("--help").stdout
    proc = fdngx(env={"_FDNGX_COMPLETE": "complete_bash", "COMP_WORDS": "fdngx sta", "COMP_CWORD": "1"})
    assert proc.stdout.split() == ["status"], proc.stdout + proc.stderr
    proc = fdngx(env={"_FDNGX_COMPLETE": "complete_bash", "COMP_WORDS": "fdngx render --fla", "COMP_CWORD": "2"})
    assert proc.stdout.split() == ["--flavor"], proc.stdout + proc.stderr


def test_a_refused_render_is_an_error_not_empty_output(tmp_path: Path) -> None:
    """The preview paths (stdout, --check, --diff) used to print nothing and exit 0 when the render failed."""
    inv = inventory(tmp_path / "fdngx.json", 8001)
    for extra in ([], ["--out", str(tmp_path / "up.conf"), "--check"], ["--out", str(tmp_path / "up.conf"), "--diff"]):
        proc = fdngx("render", "-i", str(inv), "--template-dir", "no-such-dir", *extra, cwd=tmp_path)
        assert proc.returncode == 1 and proc.stdout == "", proc.stdout
        assert f"--template-dir {tmp_path / 'no-such-dir'}: not a directory" in proc.stderr, proc.stderr


def test_render_diff_exits_1_when_different_and_0_when_current(tmp_path: Path) -> None:
    inv = inventory(tmp_path / "fdngx.json", 8001)
    out = tmp_path / "up.conf"
    stale = "# Generated by fdngx 0.0: do not edit.\nstale;\n"  # an earlier render
    out.write_text(stale)
    proc = fdngx("render", "-i", str(inv), "--out", str(out), "--diff")
    assert proc.returncode == 1 and "-stale" in proc.stdout and out.read_text() == stale, proc.stderr
    assert fdngx("render", "-i", str(inv), "--out", str(out)).returncode == 0
    proc = fdngx("render", "-i", str(inv), "--out", str(out), "--diff")
    assert proc.returncode == 0 and proc.stdout == "", proc.stdout


@pytest.mark.parametrize("where", ["table", "top-level", "command-env", "env"])
def test_a_refused_value_names_the_file_or_variable_it_came_from(tmp_path: Path, where: str) -> None:
    """A value refused from a settings file or a variable was said as if typed ('--listen ...'): a sysadmin
    grepped the cron line for an option that was not there."""
    inv = inventory(tmp_path / "inv.json", 18001)
    bad = "127.0.0.1:99999"
    toml = tmp_path / "fdngx.toml"
    toml.write_text({"table": f'[render]\nlisten = "{bad}"\n', "top-level": f'listen = "{bad}"\n'}.get(where, ""))
    env = {"command-env": {"FDNGX_RENDER_LISTEN": bad}, "env": {"FDNGX_LISTEN": bad}}.get(where, {})
    proc = fdngx("--config", str(toml), "render", "-i", str(inv), "--mode", "site", "--out", "-", env=env)
    assert proc.returncode == 2
    line = proc.stderr.strip()
    assert "\n" not in line and line.startswith("fdngx: error: --listen '127.0.0.1:99999' must be"), line
    source = {"table": f"(from {toml}, key 'listen')", "top-level": f"(from {toml}, key 'listen')",
              "command-env": "(from FDNGX_RENDER_LISTEN)", "env": "(from FDNGX_LISTEN)"}[where]
    assert line.endswith(source), line
    typed = fdngx("--config", str(toml), "render", "-i", str(inv), "--mode", "site", "--out", "-",
                  "--listen", bad, env=env)
    assert typed.returncode == 2 and "(from" not in typed.stderr, typed.stderr


@pytest.mark.parametrize(("typed", "from_file"), [
    (["-o", "{bad}"], False),
    (["-o{bad}"], False),
    (["--out={bad}"], False),
    (["-qo", "{bad}"], False),  # combined short flags: typed
    (["--access-log", "-ops.log"], True),  # another value starting with -o: the file's `out` was refused
])
def test_a_refused_value_is_said_as_typed_or_as_the_files(tmp_path: Path, typed: list[str], from_file: bool) -> None:
    """The run's own -o/--out (however spelled) won over the settings file's `out` and was refused: said as
    typed, not '(from FILE, key 'out')'; a value that only starts with -o leaves the file's `out` refused, said as
    the file's. Reviews of the source line: `-qo X` read as the file's, `--access-log -ops.log` as typing -o."""
    inv = inventory(tmp_path / "inv.json", 18001)
    (tmp_path / "sp ace").mkdir()
    bad = str(tmp_path / "sp ace" / "site.conf")
    toml = tmp_path / "fdngx.toml"
    toml.write_text(f'[render]\nout = "{bad if from_file else tmp_path / "good.conf"}"\n')
    proc = fdngx("--config", str(toml), "render", "-i", str(inv), "--mode", "site", "--flavor", "openresty",
                 *(t.format(bad=bad) for t in typed))
    assert proc.returncode == 2 and "--out" in proc.stderr and "names the files it keeps" in proc.stderr, proc.stderr
    assert ("(from" in proc.stderr) is from_file, proc.stderr
    assert (f"(from {toml}, key 'out')" in proc.stderr) is from_file, proc.stderr


def test_no_command_option_has_a_callback() -> None:
    """cli._typed re-parses a command's words to say where a refused value came from; a parameter callback
    would run again there (a side effect, twice). The root's eager --version/--install-completion are not re-parsed."""
    import typer

    from fdngx.cli import make_app

    def params(cmd: typer.core.TyperCommand, path: str) -> list[tuple[str, str]]:  # typer's own click
        found = [(path, p.name or "") for p in cmd.params if p.callback is not None]
        for name, sub in getattr(cmd, "commands", {}).items():
            found += params(sub, f"{path} {name}")
        return found

    root = typer.main.get_command(make_app())
    assert len(getattr(root, "commands", {})) > 5
    assert [p for cmd in root.commands.values() for p in params(cmd, cmd.name or "")] == []


def test_ctrl_c_while_the_root_options_are_parsed_is_said(monkeypatch: pytest.MonkeyPatch,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    """typer parses the root's options before any command's invoke (building its validators there, tens of ms):
    a Ctrl-C in that moment exited 130 in silence (an ops review); it is said like one anywhere else."""
    from fdngx import cli

    def interrupted(*args: object, **kwargs: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(cli._Group, "parse_args", interrupted)
    monkeypatch.setattr(sys, "argv", ["fdngx", "render", "-i", "x.json"])
    with pytest.raises(SystemExit) as done:
        cli.main()
    assert done.value.code == 130
    assert capsys.readouterr().err.strip() == "fdngx: interrupted"
