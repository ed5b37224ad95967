"""`fdngx render` as users run it: bad inputs, help, and an installed (non-editable) wheel."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from tests.support import REPO, fdngx

GOOD = {"name": "dp0", "host": "127.0.0.1", "port": 8001, "metrics_port": 9001}


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        (json.dumps({"instances": [{**GOOD, "host": "10.0.0.1 10.0.0.2"}]}), "field 'host'"),
        (json.dumps({"instances": [{**GOOD, "host": "127.0.0.1:1; } server { listen 1"}]}), "field 'host'"),
        (json.dumps({"instances": [{**GOOD, "host": "a\nb"}]}), "field 'host'"),
        (json.dumps({"instances": [{**GOOD, "port": 0}]}), "field 'port' = 0 is out of range"),
        (json.dumps({"instances": [{**GOOD, "port": 70000}]}), "field 'port' = 70000 is out of range"),
        (json.dumps({"instances": [GOOD, {**GOOD, "name": "dp1"}]}), "127.0.0.1:8001 is already listed as 'dp0'"),
        (json.dumps({"instances": [{"name": "dp0", "port": 8001}]}), "missing field 'host'"),
        ('{"instances": [', "invalid JSON at line 1"),
        (json.dumps({"upstream": "x;y", "instances": [GOOD]}), "field 'upstream'"),
    ],
)
def test_rejected_inventory_one_line_error_and_nothing_written(tmp_path: Path, content: str, expected: str) -> None:
    inv = tmp_path / "bad.json"
    inv.write_text(content)
    out = tmp_path / "upstream.conf"
    out.write_text("# the live config\n")
    proc = fdngx("render", "-i", str(inv), "--out", str(out), "--reload", "--nginx-bin", "/bin/false")
    assert proc.returncode == 1
    assert proc.stderr.startswith("fdngx: error: ") and proc.stderr.count("\n") == 1, proc.stderr
    assert str(inv) in proc.stderr and expected in proc.stderr
    assert out.read_text() == "# the live config\n"
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith(".")) == ["bad.json", "upstream.conf"]


def test_usage_errors_exit_2(tmp_path: Path) -> None:
    inv = REPO / "examples" / "fdngx.json"
    assert fdngx("render", "-i", str(inv), "--mode", "bogus").returncode == 2
    assert fdngx("render", "-i", str(inv), "--listen", "x:y", "--mode", "site").returncode == 2
    proc = fdngx("render", "-i", str(inv), "--reload")
    assert proc.returncode == 2 and "--out" in proc.stderr
    assert fdngx("render", "--no-such-flag").returncode == 2


@pytest.mark.parametrize(("args", "names"), [
    (["render", "--mode", "bogus"], ["--mode", "'bogus'"]),
    (["render", "--max-fails", "1e3"], ["--max-fails", "'1e3' is not a valid int"]),
    (["render", "--no-such-flag"], ["--no-such-flag"]),
    (["drain"], ["Missing argument"]),
    (["status", "--timout", "3"], ["--timout", "--timeout"]),
    (["no-such-command"], ["no-such-command"]),
])
def test_click_usage_errors_are_one_line_naming_the_option(args: list[str], names: list[str]) -> None:
    """typer drew a box of several lines around click's words (and named the option's variables as a Python
    list); fdngx's own errors are one line: so are these, exit 2."""
    proc = fdngx(*args)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.count("\n") == 1 and proc.stderr.startswith("fdngx: error: "), proc.stderr
    assert all(n in proc.stderr for n in names) and "['FDNGX" not in proc.stderr, proc.stderr


def test_missing_inventory_names_the_file(tmp_path: Path) -> None:
    proc = fdngx("render", cwd=tmp_path)
    assert proc.returncode == 1 and "fdngx.json: inventory file not found" in proc.stderr


def test_render_help_explains_every_option() -> None:
    proc = fdngx("render", "--help")
    assert proc.returncode == 0
    for opt in ("--inventory", "--mode", "--flavor", "--out", "--listen", "--prefix", "--reload", "--check",
                "--diff", "--nginx-conf", "--template-dir", "--reload-cmd", "Exit codes"):
        assert opt in proc.stdout, opt


def test_wheel_ships_templates_and_renders_from_elsewhere(tmp_path: Path) -> None:
    """A non-editable install carries templates/: build the wheel, run it from another directory."""
    # Build from a clean copy: an in-tree build/ left by an earlier build would leak stale modules in.
    src = tmp_path / "src"
    shutil.copytree(REPO, src, ignore=shutil.ignore_patterns(".git", ".venv", "build", "*.egg-info", "__pycache__",
                                                            "bench", "tests", "demo-run"))
    build = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path),
         str(src)],
        capture_output=True, text=True, timeout=300,
    )
    assert build.returncode == 0, build.stderr
    wheel = next(tmp_path.glob("fdngx-*.whl"))
    site = tmp_path / "site"
    with zipfile.ZipFile(wheel) as zf:
        names = zf.namelist()
        assert "fdngx/templates/upstream.conf.j2" in names and "fdngx/templates/standalone.conf.j2" in names
        zf.extractall(site)
    work = tmp_path / "elsewhere"
    work.mkdir()
    (work / "fdngx.json").write_text((REPO / "examples" / "fdngx.json").read_text())
    proc = subprocess.run(
        [sys.executable, "-I", "-c", f"import sys; sys.path.insert(0, {str(site)!r}); "
         "import fdngx.cli, fdngx.nginx.render as r; assert r.__file__.startswith(sys.path[0]); "
         "sys.argv=['fdngx','render','--mode','standalone']; fdngx.cli.main()"],
        capture_output=True, text=True, cwd=work, timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    assert "upstream fastdeploy {" in proc.stdout and "worker_shutdown_timeout" in proc.stdout


def test_a_hand_edit_of_fdngxs_file_is_kept_when_the_next_render_replaces_it(tmp_path: Path) -> None:
    """The header says "do not edit", and the next change rewrites the file; the backup would hold the edit only
    until the apply after. An edit is seen (the file no longer matches its generation stamp), said, and kept
    beside the file; a file as fdngx wrote it is replaced with nothing kept; the newest 10 edits are kept and
    the oldest goes, so an apply is never refused for an edit."""
    inv = tmp_path / "fdngx.json"
    inv.write_text(json.dumps({"instances": [GOOD, {**GOOD, "name": "dp1", "port": 8002, "metrics_port": 9002}]}))
    out = tmp_path / "upstream.conf"
    fdngx("render", "-i", str(inv), "--out", str(out), check=True)
    rendered = out.read_text()
    edited = rendered.replace("server 127.0.0.1:8002 weight=1", "server 127.0.0.1:8002 weight=9")
    assert edited != rendered
    out.write_text(edited)
    check = fdngx("render", "-i", str(inv), "--out", str(out), "--check")
    assert check.returncode == 1 and "stale: a render would change it (edited by hand since fdngx wrote it" in (
        check.stderr), check.stderr
    proc = fdngx("render", "-i", str(inv), "--out", str(out), check=True)
    kept = tmp_path / ".upstream.conf.fdngx-edit"
    assert out.read_text() == rendered and kept.read_text() == edited
    assert "edited by hand since fdngx wrote it" in proc.stderr and str(kept) in proc.stderr, proc.stderr
    # a render over the file as fdngx wrote it (the inventory changed) keeps nothing and says nothing of an edit
    inv.write_text(json.dumps({"instances": [GOOD]}))
    proc = fdngx("render", "-i", str(inv), "--out", str(out), check=True)
    assert "edited by hand" not in proc.stderr and "dp1" not in out.read_text()
    assert sorted(p.name for p in tmp_path.iterdir() if "fdngx-edit" in p.name) == [kept.name]
    # the stamp line deleted with the edit is an edit too
    out.write_text("".join(ln for ln in out.read_text().splitlines(True) if "fdngx-generation" not in ln)
                   .replace("max_fails=3", "max_fails=7"))
    inv.write_text(json.dumps({"instances": [GOOD, {**GOOD, "name": "dp1", "port": 8002, "metrics_port": 9002}]}))
    proc = fdngx("render", "-i", str(inv), "--out", str(out), check=True)
    assert "edited by hand" in proc.stderr and "max_fails=7" in (tmp_path / ".upstream.conf.fdngx-edit.1").read_text()
