"""The docs say what the code does, and every shell command in them runs.

- Every code block of README.md, docs/*.md and bench/README.md is classified by the convention of
  docs/README.md (tests/docs_runner.py), and every `sh` block passes `bash -n`.
- Every page with runnable blocks is run in a sandbox (a temporary FDNGX_HOME, free 127.0.0.1 ports) by
  tests/docs_runner.py, in a process of its own: docs/guide.md's walk-through reaches nginx serving, weights
  kept by cron and the sidecar, a real Prometheus firing FdngxReplicaDown for a killed replica, and
  `fdngx status --watch` showing it; after the page's cleanup block nothing it started is left running.
- Every `fdngx` command line and option named in the docs exists in the CLI; every repository path they name
  exists; the messages troubleshooting.md quotes are fdngx's own; metrics.md lists every series the sidecar
  exports and every rule in examples/prometheus.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
from functools import cache
from pathlib import Path
from typing import Any

import click
import pytest
from markdown_it import MarkdownIt

from tests import docs_runner
from tests.support import REPO

DOCS = sorted([REPO / "README.md", REPO / "bench" / "README.md", *(REPO / "docs").glob("*.md")])
COMMANDS = ("launch", "stop", "render", "sidecar", "status", "drain", "sim", "demo")
# Options of other programs that the docs name alone in prose (FastDeploy, the benchmarks).
FOREIGN_OPTIONS = {
    "--metrics-port", "--splitwise", "--router", "--max-num-seqs", "--port",  # FastDeploy's own flags
    "--engine-worker-queue-port",  # FastDeploy's too (the guide's port planning)
    "--all-cells", "--keep-logs", "--quick", "--scenario", "--frontend", "--reps",  # python -m bench.lb
    "--against", "--where",  # python -m bench.lb.compare
    "--dp-size", "--enable-dp-attention", "--enable-metrics-for-all-schedulers", "--pp-size",  # SGLang (server_args.py)
    "--enable-priority-scheduling",  # SGLang too
}
ROOT_DIRS = ("docs", "examples", "tests", "bench", "fdngx", "templates", "docker")
REPO_PATH = re.compile(rf"(?:{'|'.join(ROOT_DIRS)})/[\w./-]+")


def rel(path: Path) -> str:
    return str(path.relative_to(REPO))


# --- the convention ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("doc", DOCS, ids=rel)
def test_every_code_block_is_classified_and_every_sh_block_parses(doc: Path) -> None:
    blocks = docs_runner.parse(doc)  # raises DocError, naming the line, for a block the convention does not cover
    errors = docs_runner.bash_syntax_errors(blocks)
    assert not errors, f"{rel(doc)}: bash -n: {errors}"


def test_the_convention_refuses_what_it_cannot_classify(tmp_path: Path) -> None:
    for bad in ("```bash\nls\n```\n", "```\nls\n```\n", "```console\n$ ls\n```\n", '```sh title="later"\nls\n```\n',
                '```sh run="yes"\nls\n```\n', "text\n\n    fdngx render\n", '```sh title="not run: "\nls\n```\n'):
        page = tmp_path / "page.md"
        page.write_text(bad)
        with pytest.raises(docs_runner.DocError):
            docs_runner.parse(page)
    page = tmp_path / "page.md"
    page.write_text('```sh\nls\n```\n```sh title="not run: needs root"\nrm -rf /\n```\n'
                    '```sh title="cleanup"\ntrue\n```\n```text\nanything\n```\n'
                    '```sh expect="a\\(b\\)"\necho "a(b)"\n```\n')
    kinds = [(b.kind, b.expect) for b in docs_runner.parse(page)]
    assert kinds == [("run", None), ("not-run", None), ("cleanup", None), ("other", None), ("run", r"a\(b\)")]


def test_sandbox_variables_are_not_fdngx_settings() -> None:
    """FDNGX_<OPTION> sets an option of every command that has it: a sandbox variable must never be one."""
    settings = set()
    for cmd in cli().commands.values():
        for p in cmd.params:
            for opt in getattr(p, "opts", []):
                if opt.startswith("--"):
                    name = opt[2:].upper().replace("-", "_")
                    settings |= {f"FDNGX_{name}", f"FDNGX_{cmd.name.upper()}_{name}"}
    assert settings and not settings & set(docs_runner.SANDBOX_VARS)


# --- running the pages ------------------------------------------------------------------------------------

def runnable_docs() -> list[Path]:
    found = []
    for d in DOCS:
        try:
            blocks = docs_runner.parse(d)
        except docs_runner.DocError:
            continue  # the classification test names the block
        if any(b.kind in ("run", "cleanup") for b in blocks):
            found.append(d)
    return found


def _prometheus_obtainable() -> bool:
    return bool(shutil.which("prometheus") or (Path(sys.executable).parent / "prometheus").exists()
                or (shutil.which("apt-get") and shutil.which("dpkg-deb")))


def _stop_leftovers(marker: str) -> None:
    """Last resort after a runner that timed out: stop, by PID, whatever still names the sandbox."""
    from fdngx.system import procs

    for pid in [int(d) for d in os.listdir("/proc") if d.isdigit()]:
        if pid != os.getpid() and marker in procs.cmdline(pid):
            procs.signal_pid(pid, procs.starttime(pid), signal.SIGKILL)


@pytest.mark.nginx
@pytest.mark.timeout(420)
@pytest.mark.parametrize("doc", runnable_docs(), ids=rel)
def test_every_runnable_page_runs_in_a_sandbox(doc: Path, tmp_path: Path) -> None:
    if rel(doc) == "docs/guide.md" and not _prometheus_obtainable():
        pytest.skip("the walk-through needs prometheus, or apt-get and dpkg-deb to take it out of Debian's package")
    sandbox = tmp_path / "sandbox"
    report_path = tmp_path / "report.json"
    runner = subprocess.Popen([sys.executable, "-m", "tests.docs_runner", str(doc), "--home", str(sandbox),
                               "--json", str(report_path), "--timeout", "240"],
                              cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        out, _ = runner.communicate(timeout=400)
    except BaseException as exc:  # out of time, or Ctrl-C on the suite: the runner and what it started go
        os.killpg(runner.pid, signal.SIGKILL)
        runner.communicate()
        _stop_leftovers(str(sandbox))
        if isinstance(exc, subprocess.TimeoutExpired):
            pytest.fail(f"{rel(doc)}: the docs runner did not finish in time")
        raise
    text = out.decode(errors="replace")
    assert report_path.exists(), text[-4000:]
    report = json.loads(report_path.read_text())
    failed = [b for b in report["blocks"] if b["status"] != "ok"]
    assert not failed, f"{rel(doc)}: block(s) failed\n{text[-6000:]}"
    assert not report["leftovers"], f"{rel(doc)}: still running after the cleanup block: {report['leftovers']}"
    print(f"{rel(doc)}: {len(report['blocks'])} blocks in {report['seconds']:.0f}s")
    if rel(doc) == "docs/guide.md":
        check_walkthrough(report, sandbox / "fdngx")
    shutil.rmtree(sandbox, ignore_errors=True)  # kept only when something failed (a Prometheus package is ~100 MB)


def check_walkthrough(report: dict[str, Any], home: Path) -> None:
    """What issue 13 asks the docs to reach, each step run: nginx serving, weights kept by cron and the
    sidecar, a Prometheus alert firing for the killed replica, and status --watch showing it."""
    outputs = "\n".join(b["output"] for b in report["blocks"])
    milestones = {
        "nginx serving a chat completion": r'"object":\s*"chat\.completion"',
        "a cron-style cycle applied weights": r"nginx\.conf: applied and reloaded",
        "the sidecar exporting weights": r'fdngx_replica_weight\{replica="dp0"\} 20',
        "the OpenResty flavor holding pushed weights": r"peer=dp0 .*weight=20 .*score=[0-9.]+ per_slot=",
        "the sidecar marking the killed replica down": r"WARNING dp1: down: ",
        "nginx told (down in the config)": r"down;\s+# dp1",
        "FdngxReplicaDown firing in Prometheus":
            r'ALERTS\{alertname="FdngxReplicaDown", alertstate="firing".*replica="dp1"',
        "status --watch showing it": r"frame 2\b[\s\S]*?\ndp1\s+NO\s",
    }
    missing = [what for what, pattern in milestones.items() if not re.search(pattern, outputs)]
    assert not missing, f"the walk-through no longer shows: {missing}"
    # The walk-through's rules differ from the shipped ones only in their `for:` durations.
    shipped = (REPO / "examples" / "prometheus" / "fdngx.rules.yml").read_text().splitlines()
    used = (home / "prometheus" / "fdngx.rules.yml").read_text().splitlines()
    assert len(shipped) == len(used)
    changed = [(a, b) for a, b in zip(shipped, used, strict=True) if a != b]
    assert changed and all(re.fullmatch(r"\s+for: \S+", a) and re.fullmatch(r"\s+for: 1s", b) for a, b in changed)


# --- names in the docs match the code ---------------------------------------------------------------------

@cache
def cli() -> click.Group:
    from typer.main import get_command

    from fdngx.cli import app

    return get_command(app)  # type: ignore[return-value]


def options_of(cmd: click.Command) -> set[str]:
    names = set()
    for p in cmd.params:
        names |= set(getattr(p, "opts", [])) | set(getattr(p, "secondary_opts", []))
    return names | {"--help", "-h"}


def code_texts(doc: Path) -> list[tuple[int, str]]:
    """(line, text) of every fenced block and inline code span of a page."""
    out = []
    for tok in MarkdownIt("commonmark").parse(doc.read_text()):
        line = tok.map[0] + 1 if tok.map else 0
        if tok.type in ("fence", "code_block"):
            out.append((line, tok.content))
        elif tok.type == "inline":
            out += [(line, c.content) for c in tok.children or [] if c.type == "code_inline"]
    return out


COMMAND_LINE = re.compile(r"(?:^|[\s;|&(`$/])fdngx((?:\s+(?:--config\s+\S+|--log-format\s+\S+|-v|--verbose))*)\s+"
                          r"(" + "|".join(COMMANDS) + r")\b([^\n;|&)`#]*)")


def command_lines(text: str) -> list[tuple[str, str, str]]:
    """(global options, command, its arguments) of each `fdngx CMD ...` in a text (continuation lines joined,
    engine arguments after a lone `--` dropped)."""
    joined = re.sub(r"\\\n\s*", " ", text)
    found = []
    for m in COMMAND_LINE.finditer(joined):
        args = re.split(r"\s--(?:\s|$)", m.group(3))[0]
        found.append((m.group(1), m.group(2), args))
    return found


@pytest.mark.parametrize("doc", DOCS, ids=rel)
def test_fdngx_command_lines_in_the_docs_use_real_options(doc: Path) -> None:
    root = cli()
    bad = []
    for line, text in code_texts(doc):
        for glob, name, args in command_lines(text):
            known = options_of(root.commands[name])  # type: ignore[attr-defined]
            for opt in re.findall(r"(?<![\w-])(--?[a-zA-Z][\w-]*)", args):
                if opt not in known and not re.fullmatch(r"-\d+", opt):
                    bad.append(f"line {line}: fdngx {name} {opt}")
            for opt in re.findall(r"(?<![\w-])(--?[a-zA-Z][\w-]*)", glob):
                if opt not in options_of(root):
                    bad.append(f"line {line}: fdngx {opt}")
    assert not bad, f"{rel(doc)}: options the CLI does not have: {bad}"


@pytest.mark.parametrize("doc", DOCS, ids=rel)
def test_lone_options_named_in_the_docs_exist(doc: Path) -> None:
    """An option named alone in prose (`--refused-grace`) is one of fdngx's, or a known other program's."""
    every = set().union(*(options_of(c) for c in cli().commands.values()), options_of(cli()))  # type: ignore[attr-defined]
    bad = []
    for line, text in code_texts(doc):
        m = re.fullmatch(r"(--[a-z][\w.-]*)(?:[ =].*)?", text.strip())
        if m and m.group(1) not in every and m.group(1) not in FOREIGN_OPTIONS:
            bad.append(f"line {line}: {m.group(1)}")
    assert not bad, f"{rel(doc)}: options no command has: {bad}"


def repo_paths(doc: Path) -> list[tuple[int, str, Path]]:
    """Repository paths a page names: relative links, and code spans like `examples/cron/fdngx`."""
    found = []
    for tok in MarkdownIt("commonmark").parse(doc.read_text()):
        line = tok.map[0] + 1 if tok.map else 0
        for child in tok.children or []:
            if child.type == "link_open":
                href = str(child.attrs.get("href", "")).split("#")[0]
                if href and not re.match(r"[a-z]+:", href):
                    found.append((line, href, (doc.parent / href).resolve()))
            elif child.type == "code_inline":
                text = child.content.strip()
                if REPO_PATH.fullmatch(text) and not re.search(r"[<*{]", text):
                    found.append((line, text, REPO / text.split("::")[0]))
    return found


@pytest.mark.parametrize("doc", DOCS, ids=rel)
def test_repository_paths_named_in_the_docs_exist(doc: Path) -> None:
    missing = [f"line {line}: {text}" for line, text, path in repo_paths(doc) if not path.exists()]
    assert not missing, f"{rel(doc)}: no such file or directory: {missing}"


def source_corpus() -> str:
    """fdngx's own text: Python and Lua sources, adjacent string literals joined (a message split over lines)."""
    parts = [p.read_text() for p in sorted((REPO / "fdngx").rglob("*.py"))]
    parts += [p.read_text() for p in sorted((REPO / "templates" / "lua").rglob("*.lua"))]
    text = "\n".join(parts)
    return re.sub(r"""["']\s*\n\s*(?:[rbfRBF]{1,2})?["']""", "", text)


def test_troubleshooting_quotes_fdngx_own_messages() -> None:
    """Every ```text title="message"``` line is fdngx's own: its fixed parts (between <placeholders>) are in
    the source. So a reworded message cannot leave a stale entry behind."""
    doc = REPO / "docs" / "troubleshooting.md"
    corpus = source_corpus()
    messages = [(b.line, ln) for b in docs_runner.parse(doc)
                if b.lang == "text" and b.attrs.get("title") == "message" for ln in b.text.splitlines() if ln.strip()]
    assert len(messages) >= 15
    bad = []
    for line, msg in messages:
        # Clauses between the <placeholders> and the punctuation that joins a message's parts.
        for clause in re.split(r"<[^>]*>|\.\.\.|[:;()='\"]", msg.removeprefix("fdngx: error: ")):
            clause = clause.strip(" ,")
            if len(clause) >= 8 and not composed(clause, corpus):
                bad.append(f"line {line}: {clause!r}")
    assert not bad, f"troubleshooting.md quotes text fdngx does not print: {bad}"


def composed(text: str, corpus: str, parts: int = 3) -> bool:
    """`text` is in the source, or is at most `parts` pieces of it joined where one of them is an f-string's
    placeholder ("is {how} by group" + "writable": "is writable by group")."""
    if text in corpus:
        return True
    if parts <= 1:
        return False
    for i in range(3, len(text) - 2):
        left, right = text[:i], text[i:]
        if left in corpus and (left + "{" in corpus or "}" + right in corpus or "}" + right.strip() in corpus) \
                and composed(right, corpus, parts - 1):
            return True
    return False


def test_metrics_reference_lists_every_series_and_rule() -> None:
    from prometheus_client import generate_latest

    from fdngx.weights.telemetry import Telemetry

    doc = (REPO / "docs" / "metrics.md").read_text()
    exposition = generate_latest(Telemetry().registry).decode()
    exported = dict(re.findall(r"^# TYPE (\S+) (\S+)$", exposition, re.M))
    rows = {m.group(1): m.group(2) for m in re.finditer(r"^\| `(fdngx_[a-z_]+)(?:\{[^`]*\})?` \| (\w+) \|", doc, re.M)}
    assert set(exported) - set(rows) == set(), "exported but not in docs/metrics.md"
    assert set(rows) - set(exported) == set(), "in docs/metrics.md but not exported"
    wrong = {n: (rows[n], t) for n, t in exported.items() if rows[n] != t}
    assert not wrong, f"documented type differs from the exported one: {wrong}"
    yaml = pytest.importorskip("yaml", reason="PyYAML is not installed here (make ops-tools installs it)")
    rules = yaml.safe_load((REPO / "examples" / "prometheus" / "fdngx.rules.yml").read_text())
    names = [r.get("alert") or r["record"] for g in rules["groups"] for r in g["rules"]]
    assert [n for n in names if f"`{n}`" not in doc] == [], "alerts or recording rules missing from docs/metrics.md"


def test_the_readme_is_the_front_door() -> None:
    readme = (REPO / "README.md").read_text()
    assert "make demo" in readme and "make test" in readme
    assert "docs/README.md" in readme and "--flavor openresty" in readme
    index = (REPO / "docs" / "README.md").read_text()
    unlinked = [p.name for p in (REPO / "docs").glob("*.md") if p.name != "README.md" and f"]({p.name})" not in index]
    assert not unlinked, f"docs/README.md does not link {unlinked}"
