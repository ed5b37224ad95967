"""Logging shapes: text, journald (sd-daemon priority prefixes, no timestamp) and JSON lines; only fdngx's
loggers below WARNING; render --quiet for cron. The CLI cases run the real command in a subprocess, with
stderr a real file so $JOURNAL_STREAM can name it the way systemd does."""

from __future__ import annotations

import json
import logging
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from fdngx import logs

PY = sys.executable
TIMESTAMP = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d")


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FDNGX_") and k != "JOURNAL_STREAM"}
    return {**env, **extra}


def run(args: list[str], tmp: Path, *, journal: bool = False, cwd: Path | None = None,
        env: dict[str, str] | None = None) -> tuple[int, str, str]:
    """Run `python -m fdngx ARGS` with stderr going to a file; journal=True: $JOURNAL_STREAM names that file,
    as systemd sets it for a unit whose stderr is the journal."""
    err_path = tmp / f"stderr-{len(list(tmp.glob('stderr-*')))}.txt"
    with err_path.open("w") as err:
        extra = dict(env or {})
        if journal:
            st = os.fstat(err.fileno())
            extra["JOURNAL_STREAM"] = f"{st.st_dev}:{st.st_ino}"
        proc = subprocess.run([PY, "-m", "fdngx", *args], stdout=subprocess.PIPE, stderr=err, text=True,
                              env=_env(**extra), cwd=cwd, timeout=60)
    return proc.returncode, proc.stdout, err_path.read_text()


@pytest.fixture()
def dead_fleet(tmp_path: Path) -> Path:
    """Two replicas on ports nothing listens on: `render --scrape` logs INFO per replica and a WARNING
    (failing open), and writes the config."""
    inv = tmp_path / "fdngx.json"
    inv.write_text(json.dumps({"version": 1, "upstream": "fastdeploy", "instances": [
        {"name": "dp0", "host": "127.0.0.1", "port": 1, "metrics_port": 2},
        {"name": "dp1", "host": "127.0.0.1", "port": 3, "metrics_port": 4},
    ]}))
    return inv


def scrape_args(inv: Path) -> list[str]:
    return ["render", "-i", str(inv), "--scrape", "--out", str(inv.parent / "up.conf")]


# -- formatters ---------------------------------------------------------------------------------------


def _record(level: int, msg: str, name: str = "fdngx.controller", **extra: object) -> logging.LogRecord:
    rec = logging.LogRecord(name, level, __file__, 1, msg, None, None)
    rec.__dict__.update(extra)
    return rec


@pytest.mark.parametrize(("level", "prio"), [
    (logging.CRITICAL, 2), (logging.ERROR, 3), (logging.WARNING, 4), (logging.INFO, 6), (logging.DEBUG, 7),
])
def test_journal_lines_carry_the_sd_daemon_priority_and_no_timestamp(level: int, prio: int) -> None:
    line = logs.JournalFormatter().format(_record(level, "dp1: down"))
    assert line == f"<{prio}>fdngx.controller: dp1: down"
    assert not TIMESTAMP.search(line)


def test_every_line_of_a_multi_line_journal_message_keeps_its_priority() -> None:
    text = logs.JournalFormatter().format(_record(logging.ERROR, "first\nsecond"))
    assert text.splitlines() == ["<3>fdngx.controller: first", "<3>  second"]


def test_json_lines_have_ts_level_logger_msg_and_the_structured_extras() -> None:
    rec = _record(logging.WARNING, "replica %s down", replica="dp1", fails=3)
    rec.args = ("dp1",)
    doc = json.loads(logs.JsonFormatter().format(rec))
    assert doc["level"] == "warning" and doc["logger"] == "fdngx.controller" and doc["msg"] == "replica dp1 down"
    assert doc["replica"] == "dp1" and doc["fails"] == 3
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}\+00:00", doc["ts"])


def test_journal_detection_needs_stderr_to_be_the_named_stream(tmp_path: Path) -> None:
    with (tmp_path / "a").open("w") as a, (tmp_path / "b").open("w") as b:
        st = os.fstat(a.fileno())
        named = {"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"}
        assert logs.under_journald(a, named)
        assert not logs.under_journald(b, named)  # inherited variable, stderr redirected elsewhere
        assert not logs.under_journald(a, {})
        assert not logs.under_journald(a, {"JOURNAL_STREAM": "garbage"})


# -- the real command line ------------------------------------------------------------------------------


def test_under_journald_the_cli_prints_priorities_and_no_timestamps(tmp_path: Path, dead_fleet: Path) -> None:
    code, _, err = run(scrape_args(dead_fleet), tmp_path, journal=True)
    assert code == 0, err
    lines = err.splitlines()
    assert "<4>fdngx.controller: failing open: no replica has fresh metrics" in lines, err
    assert any(line.startswith("<6>fdngx.controller: dp0: ") for line in lines), err
    assert any(line.startswith("<6>") and "up.conf: written" in line for line in lines), err
    assert all(re.match(r"<[0-7]>", line) for line in lines), err
    assert not TIMESTAMP.search(err), err
    # an error: priority 3, exit 1
    code, _, err = run(["render", "-i", str(tmp_path / "missing.json")], tmp_path, journal=True)
    assert code == 1 and err.startswith("<3>fdngx: error: ") and err.count("\n") == 1, err


def test_outside_journald_the_cli_logs_timestamped_text(tmp_path: Path, dead_fleet: Path) -> None:
    # JOURNAL_STREAM inherited but stderr is another file: not the journal
    code, _, err = run(scrape_args(dead_fleet), tmp_path, env={"JOURNAL_STREAM": "1:1"})
    assert code == 0, err
    assert re.search(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d fdngx WARNING failing open", err, re.M), err
    assert "<4>" not in err and "<6>" not in err


def test_log_format_json_prints_one_object_per_line_errors_included(tmp_path: Path, dead_fleet: Path) -> None:
    code, _, err = run(["--log-format", "json", *scrape_args(dead_fleet)], tmp_path)
    assert code == 0, err
    docs = [json.loads(line) for line in err.splitlines()]
    assert all({"ts", "level", "logger", "msg"} <= d.keys() for d in docs), docs
    warnings = [(d["logger"], d["msg"]) for d in docs if d["level"] == "warning"]
    assert ("fdngx.controller", "failing open: no replica has fresh metrics") in warnings, warnings
    assert any(msg.endswith("metrics scrape failing: connection refused") for _, msg in warnings), warnings
    code, _, err = run(["render", "-i", str(tmp_path / "missing.json")], tmp_path,
                       env={"FDNGX_LOG_FORMAT": "json"})
    doc = json.loads(err)
    assert code == 1 and doc["level"] == "error" and "missing.json: inventory file not found" in doc["msg"], err


def test_json_under_journald_keeps_the_priority_prefix_for_journald_to_strip(tmp_path: Path, dead_fleet: Path) -> None:
    code, _, err = run(["--log-format", "json", *scrape_args(dead_fleet)], tmp_path, journal=True)
    assert code == 0, err
    parsed = [(int(line[1]), json.loads(line[3:])) for line in err.splitlines()]
    assert all(line.startswith("<") and line[2:4] == ">{" for line in err.splitlines()), err
    assert (4, "warning") in {(prio, doc["level"]) for prio, doc in parsed}
    assert (6, "info") in {(prio, doc["level"]) for prio, doc in parsed}


def test_only_fdngx_loggers_go_below_warning(tmp_path: Path) -> None:
    """-v turns up fdngx's loggers only: watchdog's and urllib3's debug/info never print, their warnings do."""
    code = (
        "from fdngx.logs import setup_logging; import logging\n"
        "setup_logging(True, 'text')\n"
        "logging.getLogger('watchdog.observers.inotify_buffer').debug('in-event')\n"
        "logging.getLogger('urllib3.connectionpool').info('starting new connection')\n"
        "logging.getLogger('urllib3.connectionpool').warning('retrying')\n"
        "logging.getLogger('fdngx.sidecar').debug('cycle 1')\n"
    )
    proc = subprocess.run([PY, "-c", code], capture_output=True, text=True, env=_env(), timeout=30)
    assert proc.returncode == 0, proc.stderr
    assert "in-event" not in proc.stderr and "starting new connection" not in proc.stderr
    assert "WARNING retrying" in proc.stderr and "DEBUG cycle 1" in proc.stderr


def test_render_quiet_prints_nothing_unless_something_changed_or_failed(tmp_path: Path, dead_fleet: Path) -> None:
    out = tmp_path / "up.conf"
    base = ["render", "-i", str(dead_fleet), "--out", str(out), "--quiet"]
    code, stdout, err = run(base, tmp_path)
    assert code == 0 and "written" in err, err  # a change is news
    code, stdout, err = run(base, tmp_path)
    assert code == 0 and stdout == "" and err == "", err  # unchanged: silent
    code, _, err = run(base[:-1], tmp_path)
    assert code == 0 and "unchanged" in err, err  # without --quiet it says so
    code, _, err = run([*base, "--check"], tmp_path)
    assert code == 0 and err == "", err
    code, _, err = run(["render", "-i", str(tmp_path / "missing.json"), "--out", str(out), "--quiet"], tmp_path)
    assert code == 1 and "inventory file not found" in err, err  # errors still on stderr, exit 1
    code, _, err = run([*base, "--scrape"], tmp_path)  # weights change the file: said, even quiet
    assert code == 0 and "written" in err and "failing open" in err, err
    code, _, err = run([*base, "--scrape"], tmp_path)
    assert code == 0 and err == "", err
