"""`fdngx ... --help` as a sysadmin reads it: in an 80-column terminal or piped to less.

The help was rich's boxed tables: at 80 columns the meaning column of render's options was 19 characters
wide (610 lines for `render --help`), env var names were cut with an ellipsis, and each example ran its
comment into the command and wrapped both. Now click's plain layout: every line fits, no text is cut, and each
example command stands whole on its own line(s), ready to copy.
"""

from __future__ import annotations

import itertools
import os
import subprocess
import sys

import pytest
import typer

from fdngx import cli

COMMANDS = ("launch", "stop", "render", "sidecar", "status", "drain", "sim", "demo")


def _help(*args: str, columns: int = 80) -> str:
    env = {**os.environ, "COLUMNS": str(columns)}
    proc = subprocess.run([sys.executable, "-m", "fdngx", *args, "--help"], capture_output=True, text=True,
                          env=env, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


@pytest.fixture(scope="module")
def helps() -> dict[str, str]:
    return {c: _help(*([c] if c else [])) for c in ("", *COMMANDS)}


def test_every_line_fits_80_columns_and_nothing_is_cut(helps: dict[str, str]) -> None:
    for cmd, text in helps.items():
        for line in text.splitlines():
            assert len(line) <= 80, f"fdngx {cmd} --help: {line!r}"
            assert "\u2026" not in line, f"fdngx {cmd} --help cuts text: {line!r}"
        assert "\\[" not in text, f"fdngx {cmd} --help shows a markup escape"


def test_no_line_breaks_inside_a_flag_or_a_file_name(helps: dict[str, str]) -> None:
    """click's wrapping broke lines after a hyphen inside a word: `--push-` / `to`, `.fdngx-` / `admin-token`
    (20 such breaks); copied, a wrong flag."""
    group = typer.main.get_command(cli.app)
    commands = [group, *group.commands.values()]  # type: ignore[attr-defined]
    source = " ".join(" ".join(str(s or "") for s in (c.help, c.epilog, *(getattr(p, "help", "") for p in c.params)))
                      for c in commands)
    for cmd, text in helps.items():
        for line, after in itertools.pairwise(text.splitlines()):
            if line.endswith("-") and line[-2:-1].isalnum() and after.split():
                # a hyphen the text has before a space ("node1- gives") may end a line; one inside a word not
                assert line.split()[-1] + after.split()[0] not in source, (cmd, line, after)
    flat = helps["sidecar"]
    assert "--push-to/--push-to-file" in flat and "--admin-token-file" in flat


def test_fdngx_alone_prints_its_help_on_stdout_and_exits_2() -> None:
    proc = subprocess.run([sys.executable, "-m", "fdngx"], capture_output=True, text=True, timeout=60,
                          stdin=subprocess.DEVNULL, env={**os.environ, "COLUMNS": "80"})
    assert proc.returncode == 2 and proc.stderr == "", proc.stderr[:300]
    assert proc.stdout.startswith("Usage: fdngx [OPTIONS] COMMAND [ARGS]...") and "Commands:" in proc.stdout


def test_env_var_names_are_whole(helps: dict[str, str]) -> None:
    flat = " ".join(helps["render"].split())
    for name in ("FDNGX_RENDER_INVENTORY", "FDNGX_RENDER_TEMPLATE_DIR", "FDNGX_RENDER_RELOAD_CMD"):
        assert name in flat


def test_examples_are_whole_commands_under_their_comment(helps: dict[str, str]) -> None:
    lines = [line.strip() for line in helps["render"].splitlines()]
    i = lines.index("# safe apply")
    assert lines[i + 1] == "fdngx render --out /etc/nginx/fdngx/upstream.conf --reload"
    # a long one continues with a shell's backslash, as it would be typed
    side = [line.strip() for line in helps["sidecar"].splitlines()]
    j = side.index("# controller: one scrape, N OpenResty frontends (docs/controller.md)")
    assert side[j + 1] == "fdngx sidecar --flavor openresty --push-to-file /etc/fdngx/frontends \\"
    assert side[j + 2] == "--push-token-file /etc/fdngx/admin-token"
    for cmd in ("launch", "stop", "render", "sidecar", "status", "drain"):
        text = helps[cmd]
        assert "Examples:" in text
        for k, line in enumerate(text.splitlines()):
            if line.strip().startswith("# "):
                assert text.splitlines()[k + 1].strip().startswith("fdngx "), (cmd, line)


def test_the_command_list_gives_each_command_a_whole_line(helps: dict[str, str]) -> None:
    listed = helps[""].split("Commands:\n", 1)[1].split("\n\n", 1)[0].splitlines()
    assert [line.split()[0] for line in listed] == list(COMMANDS)
    assert not any(line.rstrip().endswith("...") for line in listed), listed


def test_a_wide_terminal_gets_the_same_80_columns() -> None:
    # click caps its layout at 80 columns, so a help piped from a wide terminal reads as in a narrow one
    assert max(len(line) for line in _help("render", columns=200).splitlines()) <= 80
