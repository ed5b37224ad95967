"""A crash (SIGKILL) at every step of `render --reload`: the live file always passes `nginx -t`, and the
next run says what it found and finishes the job (real nginx, real processes, a test hook to pause)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest

from fdngx.nginx.apply import recover
from fdngx.nginx.control import NginxControl, generation_in
from tests.support import Nginx, Site, fdngx, wait_for

pytestmark = pytest.mark.nginx

STEPS = ["locked", "candidate-tested", "swapped", "tested", "reloaded"]
JOURNALED = {"swapped", "tested", "reloaded"}  # the steps after the swap: a journal is left behind


def kill_at(site: Site, step: str) -> None:
    """Start `render --reload` paused at `step`, then SIGKILL it there."""
    env = {**os.environ, "FDNGX_TEST_PAUSE_AT": step}
    proc = subprocess.Popen([sys.executable, "-m", "fdngx", "render", *site.args, "--reload"], env=env,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        assert proc.stderr is not None
        seen = []
        for line in proc.stderr:  # ends when the process does; the hook waits at most 60 s
            seen.append(line)
            if f"paused at {step}" in line:
                break
        assert any(f"paused at {step}" in ln for ln in seen), "".join(seen)
        os.killpg(proc.pid, signal.SIGKILL)
    finally:
        proc.wait(timeout=30)


@pytest.mark.parametrize("step", STEPS)
def test_sigkill_at_any_step_leaves_a_tested_file_and_the_next_run_completes(site: Site, step: str) -> None:
    old_bytes, old_gen = site.conf.read_bytes(), site.generation()
    site.set_weights([4, 1])
    kill_at(site, step)

    assert Nginx(site.conf.parent).test().returncode == 0, "the live file must always pass nginx -t"
    assert site.nginx.proc is not None and site.nginx.proc.poll() is None, "nginx keeps running"
    assert site.split(4), "and keeps serving"
    journal = site.conf.parent / ".nginx.conf.fdngx-journal"
    assert journal.exists() == (step in JOURNALED)
    if step not in JOURNALED:
        assert site.conf.read_bytes() == old_bytes, "killed before the swap: the live file was never touched"

    again = fdngx("render", *site.args, "--reload")
    assert again.returncode == 0, again.stderr
    if step in JOURNALED:
        assert again.stderr.count("recovered an interrupted apply") == 1, again.stderr  # said once
        assert "restored the previous" in again.stderr
    new_gen = generation_in(site.conf.read_text())
    assert new_gen and new_gen != old_gen
    wait_for(lambda: site.generation() == new_gen, 15, what="nginx serves the new generation")
    assert not journal.exists()
    assert not list(site.conf.parent.glob(".nginx.conf.*.fdngx-tmp")), "no stale candidate left behind"
    assert site.split(10)["b0"] >= 6, "weights 4:1 are live"


def test_identical_file_but_nginx_on_another_generation_is_reloaded(site: Site) -> None:
    """A crash after the swap whose journal was lost: the bytes match, nginx does not serve them."""
    site.set_weights([4, 1])
    kill_at(site, "swapped")
    (site.conf.parent / ".nginx.conf.fdngx-journal").unlink()  # as if the journal never made it to disk
    file_gen = generation_in(site.conf.read_text())
    assert site.generation() != file_gen
    again = fdngx("render", *site.args, "--reload")
    assert again.returncode == 0 and "reloaded" in again.stderr, again.stderr
    assert site.generation() == file_gen


def test_reload_while_nginx_is_down_says_so_every_run(site: Site) -> None:
    site.nginx.stop()
    for _ in range(2):  # unchanged or not, every run says nginx is down
        proc = fdngx("render", *site.args, "--reload")
        assert proc.returncode == 0 and "nginx is not running" in proc.stderr, proc.stderr


def test_a_crash_after_the_rollback_put_the_previous_file_back_reloads_nginx_onto_it(site: Site) -> None:
    """Killed between a rollback's rename (the previous file live again, the journal still there) and its
    reload back: nginx may still run the new config. Recovery reloads it onto the live file. Before: "the
    live file is the previous one", and nginx kept the config the apply had given up on (an upstream-mode
    include has no generation for the next run to compare)."""
    old_bytes, old_gen = site.conf.read_bytes(), site.generation()
    site.set_weights([4, 1])
    kill_at(site, "reloaded")  # nginx took the new config; the journal is there
    new_gen = generation_in(site.conf.read_text())
    wait_for(lambda: site.generation() == new_gen, 15, what="nginx on the new config")
    backup = site.conf.parent / ".nginx.conf.fdngx-bak"
    os.replace(backup, site.conf)  # what the rollback's rename does; then the kill
    assert site.conf.read_bytes() == old_bytes
    control = NginxControl(site.nginx.binary, site.conf, site.conf.parent, "logs/error.log", timeout=15)
    done = recover(site.conf, control, reload=True)
    assert "after putting the previous file back" in done and "nginx reloaded on it" in done, done
    assert site.generation() == old_gen
    assert not (site.conf.parent / ".nginx.conf.fdngx-journal").exists()


def test_a_crash_before_nginx_saw_the_new_file_is_recovered_without_a_reload(site: Site) -> None:
    """Killed after the swap, before any reload: nginx never saw the new file. Recovery put the previous file
    back and reloaded nginx onto the config it served all along: a reload for nothing, the reload budget spent
    ("reload budget exhausted" the next minute; an outside day-two review)."""
    old_gen = site.generation()
    site.set_weights([4, 1])
    kill_at(site, "swapped")
    workers = site.nginx.worker_pids()
    control = NginxControl(site.nginx.binary, site.conf, site.conf.parent, "logs/error.log", timeout=15,
                           verify_url=f"{site.url}/fdngx/generation")  # as render's, in site and standalone mode
    done = recover(site.conf, control, reload=True)
    assert f"nginx serves it already (generation {old_gen}): not reloaded" in done, done
    assert site.nginx.worker_pids() == workers, "no reload: the same workers"
    assert site.generation() == old_gen and generation_in(site.conf.read_text()) == old_gen


def interrupted_at(site: Site, step: str) -> str:
    """`render --reload` of the site, SIGINT when its apply reaches `step` (the test hook): what it said after,
    once it exited 130."""
    env = {**os.environ, "FDNGX_TEST_PAUSE_AT": step}
    proc = subprocess.Popen([sys.executable, "-m", "fdngx", "render", *site.args, "--reload"], env=env,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        assert proc.stderr is not None
        paused = proc.stderr.readline()
        assert f"paused at {step}" in paused, paused
        proc.send_signal(signal.SIGINT)
        rest = proc.stderr.read()
        assert proc.wait(timeout=30) == 130, rest
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
    return rest


@pytest.mark.parametrize(("step", "said"), [
    ("locked", "fdngx: interrupted"),  # before the apply did anything: the plain line
    ("candidate-tested", "fdngx: interrupted: {conf}: not applied, the live file was not touched"),
    ("tested", "fdngx: interrupted: {conf}: restored the previous file"),
])
def test_ctrl_c_during_an_apply_says_what_it_left_on_one_line_and_exits_130(site: Site, step: str,
                                                                           said: str) -> None:
    """Ctrl-C (SIGINT) to `render --reload` at a step of its apply: the live file is the old one (put back after
    the swap), and the run says so on one line, no traceback, exit 130 (typer alone exited 130 in silence)."""
    old_bytes = site.conf.read_bytes()
    site.set_weights([4, 1])
    rest = interrupted_at(site, step)
    assert rest == said.format(conf=site.conf) + "\n", rest
    assert site.conf.read_bytes() == old_bytes
    assert not (site.conf.parent / ".nginx.conf.fdngx-journal").exists()
    assert not list(site.conf.parent.glob(".nginx.conf.*.fdngx-tmp")), "no stale candidate left behind"


def test_ctrl_c_once_nginx_was_told_to_reload_keeps_the_file_nginx_loads(site: Site) -> None:
    """Ctrl-C after the reload signal (here: right after nginx confirmed it): the old file was put back while
    nginx served the new one, and the line said 'restored the previous file' (an ops review of the Ctrl-C
    line); the next outside reload would have moved nginx back in silence. The new file stays, as nginx runs
    it, and the line says so."""
    site.set_weights([4, 1])
    said = interrupted_at(site, "reloaded")
    assert said == f"fdngx: interrupted: {site.conf}: applied; nginx was told to reload onto it ('fdngx render " \
                   "--check' says whether it serves it)\n", said
    assert site.generation() == generation_in(site.conf.read_text())
    assert not (site.conf.parent / ".nginx.conf.fdngx-journal").exists()
