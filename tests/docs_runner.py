"""Run the shell blocks of a document the way a reader would: `python -m tests.docs_runner docs/guide.md`.

The convention (stated for readers at the top of docs/README.md):

    ```sh                                  run: in document order, one bash session per document
    ```sh title="not run: <why>"           shown only (needs root, systemd, GPUs, a real fleet, ...)
    ```sh title="cleanup"                  run at the end, always, also after a failed block
    ```sh expect="<regex>"                 (run or cleanup) the block's output must match (re.search, multiline)

Every other fence is not shell and never runs (text, json, nginx, toml, yaml, ini, promql, python, ...).
Refused, so that no command can hide from the test: ```bash, ```shell, ```console, ```zsh, a fence with no
language, an `sh` fence with any other title or attribute, and indented code blocks.

A document's run blocks form one script (`set -euo pipefail`), run from the repository's top directory with
the sandbox variables (SANDBOX_VARS: FDNGX_HOME and free 127.0.0.1 ports) in the environment; the docs give
each a default (`${FDNGX_HOME:-$HOME/fdngx-guide}`), so a reader runs the very same text. The runner is a
child subreaper: whatever the document starts (nginx's daemon, a detached `fdngx launch`, a sidecar put in
the background) stays its descendant. After the cleanup blocks it reports what is still running (the
document's cleanup missed it), then stops it, by PID.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from markdown_it import MarkdownIt

from fdngx.sim.process import free_ports
from fdngx.system import procs

REPO = Path(__file__).resolve().parent.parent
SHELL_LANGS = {"bash", "shell", "console", "zsh", "shell-session", "sh-session", "shellsession", "ksh", "fish"}
NOT_RUN = "not run: "
CLEANUP = "cleanup"
MARK = "@@fdngx-docs-block"
# Variables the runner sets for a sandboxed run: a private directory and free ports on 127.0.0.1 (the
# *_BASE_PORT ones start a run of BASE_RUN free consecutive ports). None of them is an FDNGX_<OPTION>
# setting of any command (tests/integration/test_docs.py checks it), so they cannot change fdngx's options.
PORT_VARS = ("NGINX_PORT", "OPENRESTY_PORT", "ADMIN_PORT", "SIDECAR_METRICS_PORT", "PROMETHEUS_PORT")
BASE_PORT_VARS = ("API_BASE_PORT", "METRICS_BASE_PORT")
BASE_RUN = 4
SANDBOX_VARS = ("FDNGX_HOME", *PORT_VARS, *BASE_PORT_VARS)


class DocError(Exception):
    """A code block the convention cannot classify."""


@dataclass
class Block:
    index: int
    line: int  # 1-based line of the opening fence
    lang: str
    kind: str  # run | cleanup | not-run | other
    text: str
    expect: str | None = None
    reason: str = ""
    attrs: dict[str, str] = field(default_factory=dict)


@dataclass
class Outcome:
    index: int
    line: int
    kind: str
    status: str = "not reached"  # ok | failed | expect failed | not reached
    seconds: float = 0.0
    output: str = ""
    expect: str | None = None


@dataclass
class Report:
    document: str
    ok: bool = False
    seconds: float = 0.0
    blocks: list[Outcome] = field(default_factory=list)
    leftovers: list[dict[str, Any]] = field(default_factory=list)
    error: str = ""

    def failures(self) -> list[Outcome]:
        return [b for b in self.blocks if b.status not in ("ok", "not reached")]


def _attributes(info: str, where: str) -> tuple[str, dict[str, str]]:
    try:
        words = shlex.split(info)
    except ValueError as exc:
        raise DocError(f"{where}: cannot read the fence's info string {info!r}: {exc}") from None
    if not words:
        return "", {}
    attrs: dict[str, str] = {}
    for word in words[1:]:
        key, eq, value = word.partition("=")
        if not eq:
            raise DocError(f"{where}: {word!r} in the fence's info string is not key=\"value\"")
        attrs[key] = value
    return words[0], attrs


def classify(lang: str, attrs: dict[str, str], where: str) -> tuple[str, str]:
    """(kind, reason) of a fence; DocError when the convention does not cover it."""
    if lang == "":
        raise DocError(f"{where}: a fence without a language; write ```sh (runs), ```sh title=\"not run: why\" "
                       "or ```text")
    if lang.lower() in SHELL_LANGS:
        raise DocError(f"{where}: ```{lang} is not part of the convention; shell commands are ```sh blocks")
    if lang != "sh":
        return "other", ""
    unknown = set(attrs) - {"title", "expect"}
    if unknown:
        raise DocError(f"{where}: unknown attribute(s) {sorted(unknown)} on a ```sh block (title, expect)")
    title = attrs.get("title")
    if title is None:
        return "run", ""
    if title == CLEANUP:
        return "cleanup", ""
    if title.startswith(NOT_RUN) and title[len(NOT_RUN):].strip():
        if "expect" in attrs:
            raise DocError(f"{where}: expect= on a block that does not run")
        return "not-run", title[len(NOT_RUN):].strip()
    raise DocError(f"{where}: ```sh title={title!r}: a shell block is run (no title), "
                   f"title=\"{NOT_RUN}<why>\" or title=\"{CLEANUP}\"")


def parse(path: Path) -> list[Block]:
    """Every code block of a markdown file, classified; DocError for one the convention does not cover."""
    text = path.read_text(encoding="utf-8")
    blocks: list[Block] = []
    for tok in MarkdownIt("commonmark").parse(text):
        line = tok.map[0] + 1 if tok.map else 0
        where = f"{path.name}:{line}"
        if tok.type == "code_block":
            raise DocError(f"{where}: an indented code block; fence it (```sh, ```sh title=\"not run: why\", "
                           "```text, ...) so the docs test can classify it")
        if tok.type != "fence":
            continue
        lang, attrs = _attributes(tok.info, where)
        kind, reason = classify(lang, attrs, where)
        expect = attrs.get("expect")
        if expect is not None:
            try:
                re.compile(expect)
            except re.error as exc:
                raise DocError(f"{where}: expect={expect!r} is not a regular expression: {exc}") from None
        blocks.append(Block(len(blocks), line, lang, kind, tok.content, expect, reason, attrs))
    return blocks


def bash_syntax_errors(blocks: list[Block]) -> list[str]:
    """`bash -n` on every sh block (run or not): a typo in a command nobody runs is still a typo."""
    errors = []
    for b in blocks:
        if b.lang != "sh":
            continue
        proc = subprocess.run(["bash", "-n"], input=b.text, capture_output=True, text=True, timeout=30)
        if proc.returncode != 0:
            errors.append(f"line {b.line}: {proc.stderr.strip()}")
    return errors


# --- sandbox ----------------------------------------------------------------------------------------------

def sandbox_env(home: Path) -> dict[str, str]:
    """The environment of a sandboxed run: no FDNGX_* setting from outside, the venv's tools first on PATH,
    a private HOME and FDNGX_HOME, and free ports."""
    # Not under the journal either: a reader's terminal has no $JOURNAL_STREAM (fdngx would log in its format).
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("FDNGX_") and k not in SANDBOX_VARS and k != "JOURNAL_STREAM"}
    env.update(dict(zip(PORT_VARS, map(str, free_ports(len(PORT_VARS))), strict=True)))
    env.update({var: str(free_ports(BASE_RUN, consecutive=True)[0]) for var in BASE_PORT_VARS})
    (home / "home").mkdir(parents=True, exist_ok=True)
    env["HOME"] = str(home / "home")
    env["FDNGX_HOME"] = str(home / "fdngx")
    venv_bin = str(Path(sys.executable).parent)
    env["PATH"] = os.pathsep.join([venv_bin, env.get("PATH", ""), "/usr/local/sbin", "/usr/sbin", "/sbin"])
    env.setdefault("LC_ALL", "C.UTF-8")
    env["COLUMNS"] = "160"
    env["PYTHONUNBUFFERED"] = "1"
    return env


# --- running ----------------------------------------------------------------------------------------------

def _script(blocks: list[Block], errexit: bool) -> str:
    head = "set -euo pipefail\n" if errexit else "set -uo pipefail\n"
    parts = [head]
    for b in blocks:
        parts.append(f"printf '\\n{MARK} {b.index} %s@@\\n' \"$(date +%s.%N)\"\n")
        parts.append(b.text if b.text.endswith("\n") else b.text + "\n")
    parts.append(f"printf '\\n{MARK} end %s@@\\n' \"$(date +%s.%N)\"\n")
    return "".join(parts)


def _run_script(script: str, env: dict[str, str], work: Path, name: str, timeout: float) -> tuple[int | None, str]:
    """Run one script with bash; (exit status or None on timeout, its merged output)."""
    path = work / f"{name}.sh"
    path.write_text(script)
    out = work / f"{name}.out"
    with out.open("wb") as fh:
        proc = subprocess.Popen(["bash", str(path)], cwd=REPO, env=env, stdout=fh, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)
        try:
            rc: int | None = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            rc = None
            # The script and what it left in its process group (background jobs without a session of
            # their own); daemons are caught below as descendants.
            procs.stop_popen_group(proc, grace=5.0)
    return rc, out.read_text(errors="replace")


def _split(output: str) -> dict[str, tuple[float, str]]:
    """Block index -> (start time, its output), from the markers."""
    found: dict[str, tuple[float, str]] = {}
    pattern = re.compile(rf"^{re.escape(MARK)} (\S+) ([0-9.]+)@@$", re.M)
    marks = list(pattern.finditer(output))
    for k, m in enumerate(marks):
        end = marks[k + 1].start() if k + 1 < len(marks) else len(output)
        found[m.group(1)] = (float(m.group(2)), output[m.end():end].strip("\n"))
    return found


def _record(blocks: list[Block], output: str, rc: int | None, outcomes: dict[int, Outcome]) -> None:
    parts = _split(output)
    times = sorted((t, key) for key, (t, _) in parts.items())
    for b in blocks:
        key = str(b.index)
        o = outcomes[b.index]
        if key not in parts:
            continue
        start, text = parts[key]
        later = [t for t, _ in times if t > start]
        o.seconds = round((later[0] if later else time.time()) - start, 2)
        o.output = text[-6000:]
        reached_next = any(t > start for t, k in times if k != key)
        if not reached_next:
            o.status = "failed" if rc != 0 else "ok"
            if rc is None:
                o.output += "\n[timed out]"
        else:
            o.status = "ok"
        if o.status == "ok" and b.expect and not re.search(b.expect, text, re.M):
            o.status = "expect failed"


def _descendants() -> dict[int, int]:
    return procs.descendants(os.getpid())


def _reap() -> None:
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return


def _settle(seconds: float) -> dict[int, int]:
    """Wait (reaping orphans) until no descendant is left, at most `seconds`; what is still there."""
    deadline = time.monotonic() + seconds
    while True:
        _reap()
        left = _descendants()
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(0.1)


def _stop(left: dict[int, int]) -> None:
    for pid, start in left.items():
        procs.signal_pid(pid, start, signal.SIGTERM)
    left = _settle(5.0)
    for pid, start in left.items():
        procs.signal_pid(pid, start, signal.SIGKILL)
    _settle(5.0)


def run_document(path: Path, env: dict[str, str], timeout: float = 300.0, settle: float = 10.0) -> Report:
    """Run a document's blocks (run blocks, then cleanup blocks) in the sandbox `env`; never leaves a
    process behind."""
    started = time.monotonic()
    report = Report(str(path))
    blocks = parse(path)
    outcomes = {b.index: Outcome(b.index, b.line, b.kind, expect=b.expect) for b in blocks
                if b.kind in ("run", "cleanup")}
    report.blocks = list(outcomes.values())
    runs = [b for b in blocks if b.kind == "run"]
    cleanups = [b for b in blocks if b.kind == "cleanup"]
    procs.become_subreaper()
    Path(env["FDNGX_HOME"]).parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="fdngx-docs-") as tmp:
        work = Path(tmp)
        rc: int | None = 0
        try:
            if runs:
                rc, output = _run_script(_script(runs, True), env, work, "blocks", timeout)
                _record(runs, output, rc, outcomes)
        finally:
            if cleanups:
                crc, coutput = _run_script(_script(cleanups, rc == 0), env, work, "cleanup", 120.0)
                _record(cleanups, coutput, crc, outcomes)
            left = _settle(settle)
            report.leftovers = [{"pid": pid, "cmdline": procs.cmdline(pid)} for pid in sorted(left)]
            if left:
                _stop(left)
    report.ok = rc == 0 and not report.failures() and not report.leftovers
    report.seconds = round(time.monotonic() - started, 1)
    return report


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tests.docs_runner", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("document", type=Path)
    p.add_argument("--timeout", type=float, default=300.0, help="seconds for the run blocks together")
    p.add_argument("--json", type=Path, help="write the report here")
    p.add_argument("--home", type=Path, help="sandbox directory (default: a new temporary one, kept)")
    args = p.parse_args(argv)
    home = args.home or Path(tempfile.mkdtemp(prefix="fdngx-docs-home-"))
    env = sandbox_env(home)
    report = run_document(args.document.resolve(), env, args.timeout)
    if args.json:
        args.json.write_text(json.dumps(asdict(report), indent=1))
    for b in report.blocks:
        print(f"{args.document}:{b.line} [{b.kind}] {b.status} ({b.seconds:.1f}s)")
        if b.status not in ("ok", "not reached"):
            print("    " + "\n    ".join(b.output.splitlines()[-40:]))
            if b.expect:
                print(f"    expected to match: {b.expect}")
    for left in report.leftovers:
        print(f"left running after the cleanup blocks (stopped now): pid {left['pid']}: {left['cmdline']}")
    print(f"{'ok' if report.ok else 'FAILED'} in {report.seconds:.0f}s; sandbox {home}")
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
