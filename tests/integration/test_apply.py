"""Render + safe apply against a real nginx under a temp prefix, proxying to real local backends."""

from __future__ import annotations

import collections
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import requests

from fdngx.nginx.control import find_nginx, generation_in
from tests.support import (
    REPO,
    Backends,
    Nginx,
    Site,
    fdngx,
    free_ports,
    instances,
    stop_process_group,
    wait_for,
    write_inventory,
)

pytestmark = pytest.mark.nginx


@pytest.mark.parametrize("mode", ["upstream", "site", "standalone"])
def test_nginx_accepts_every_mode(tmp_path: Path, mode: str) -> None:
    """Real `nginx -t` on each mode's output, wrapped the way a sysadmin would include it."""
    prefix = tmp_path / "p"
    out = prefix / ("nginx.conf" if mode == "standalone" else "fdngx.conf")
    prefix.mkdir()
    extra = [] if mode != "site" else ["--access-log", "logs/access.log"]
    fdngx("render", "-i", str(REPO / "examples" / "fdngx.json"), "--mode", mode, "--out", str(out), *extra,
          check=True)
    main = out
    if mode != "standalone":
        main = prefix / "nginx.conf"
        server = "" if mode == "site" else "server { listen 127.0.0.1:1; location / { proxy_pass http://fastdeploy; } }"
        main.write_text(f"pid logs/nginx.pid; events {{}} http {{ include fdngx.conf; {server} }}\n")
    nginx = Nginx(prefix, main)
    proc = nginx.test()
    assert proc.returncode == 0, proc.stderr


def test_split_follows_weights_and_reload_shifts_it_without_errors(site: Site) -> None:
    counts = site.split(200)
    assert 0.62 <= counts["b1"] / 200 <= 0.88, counts  # weights 1:3 -> 75 % to b1

    errors: list[str] = []
    served = collections.Counter()
    stop = threading.Event()

    def traffic() -> None:
        # A fresh connection per request: an idle keep-alive connection that the old worker closes just
        # as a client reuses it is HTTP's own race (clients such as openai's retry those), not a reload bug.
        while not stop.is_set():
            try:
                r = requests.post(f"{site.url}/v1/completions", json={}, timeout=10)
                served[r.status_code] += 1
                if r.status_code != 200:
                    errors.append(str(r.status_code))
            except requests.RequestException as exc:
                errors.append(repr(exc))

    threads = [threading.Thread(target=traffic) for _ in range(4)]
    for t in threads:
        t.start()
    try:
        before = site.generation()
        site.set_weights([4, 1])
        proc = site.apply()
        assert proc.returncode == 0, proc.stderr
        assert "applied and reloaded" in proc.stderr
        assert site.generation() != before
        wait_for(lambda: sum(served.values()) > 50, 30, what="traffic during the reload")
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=30)
    assert not errors, errors[:5]
    counts = site.split(200)
    assert 0.62 <= counts["b0"] / 200 <= 0.88, counts  # now 4:1 -> 80 % to b0


def test_unchanged_render_does_not_reload(site: Site) -> None:
    workers = site.nginx.worker_pids()
    proc = site.apply()
    assert proc.returncode == 0 and "unchanged" in proc.stderr
    assert site.nginx.worker_pids() == workers


def test_broken_template_leaves_file_and_nginx_untouched(site: Site, tmp_path: Path) -> None:
    before_bytes = site.conf.read_bytes()
    before_gen = site.generation()
    bad = tmp_path / "tpl"
    bad.mkdir()
    (bad / "_upstream.j2").write_text("upstream {{ upstream }} {\n{% for s in servers %}\n")
    site.set_weights([2, 2])
    proc = site.apply("--template-dir", str(bad))
    assert proc.returncode == 1
    assert proc.stderr.count("\n") == 1 and "_upstream.j2" in proc.stderr, proc.stderr
    assert site.conf.read_bytes() == before_bytes
    assert site.generation() == before_gen
    assert site.split(4)


def test_config_nginx_rejects_is_rolled_back_with_nginx_message(site: Site, tmp_path: Path) -> None:
    before_bytes = site.conf.read_bytes()
    before_gen = site.generation()
    workers = site.nginx.worker_pids()
    bad = tmp_path / "tpl"
    bad.mkdir()
    (bad / "_proxy.j2").write_text("        proxy_pass http://{{ upstream }};\n        proxy_bogus_directive on;\n")
    site.set_weights([2, 2])
    proc = site.apply("--template-dir", str(bad))
    assert proc.returncode == 1
    assert "nginx -t (candidate) failed" in proc.stderr and 'unknown directive "proxy_bogus_directive"' in proc.stderr
    assert "the live file was not touched" in proc.stderr
    assert proc.stderr.count("\n") == 1
    assert site.conf.read_bytes() == before_bytes
    assert site.generation() == before_gen and site.nginx.worker_pids() == workers


def test_reload_that_nginx_cannot_take_is_rolled_back(site: Site) -> None:
    """nginx -t passes but the reload fails (the new listen port is taken): file and nginx stay as before."""
    import socket

    before_bytes = site.conf.read_bytes()
    blocker = socket.socket()
    blocker.bind(("127.0.0.1", 0))
    blocker.listen()
    try:
        taken = blocker.getsockname()[1]
        args = [a if not a.startswith("127.0.0.1:") else f"127.0.0.1:{taken}" for a in site.args]
        proc = fdngx("render", *args, "--reload", timeout=120)
    finally:
        blocker.close()
    assert proc.returncode == 1, proc.stderr
    assert "restored the previous file" in proc.stderr
    # What really happened: nginx refused the new listen and kept the old config; no second reload failed.
    assert "nginx refused the new config and keeps running the old one" in proc.stderr, proc.stderr
    assert "bind()" in proc.stderr and "failed too" not in proc.stderr and "also failed" not in proc.stderr
    assert site.conf.read_bytes() == before_bytes
    assert site.split(4)


def test_a_rollback_on_a_full_disk_puts_the_previous_file_back(tmp_path: Path, two_backends: Backends) -> None:
    """nginx refuses the new config (its port is taken) and the disk filled up after the swap: the rollback
    renames the backup (the previous file itself, a hard link) back and writes nothing. Before, it wrote
    the old bytes to a new temp file, failed with ENOSPC, said 'the file is unchanged' and left the refused
    config live. nginx's logs and pid file live on another disk (it must log why it refused)."""
    import socket

    from tests.integration.test_full_disk import fill, leftovers, tmpfs

    with tmpfs(tmp_path / "mnt", "1m") as mnt:
        (mnt / "nginx").mkdir()
        (tmp_path / "logs").mkdir()
        (mnt / "nginx" / "logs").symlink_to(tmp_path / "logs")
        site = Site(mnt, two_backends, [1, 3])
        blocker = socket.socket()
        filler: Path | None = None
        try:
            before = site.conf.read_bytes()
            blocker.bind(("127.0.0.1", 0))
            blocker.listen()
            taken = f"127.0.0.1:{blocker.getsockname()[1]}"
            args = [taken if a.startswith("127.0.0.1:") else a for a in site.args]
            proc = subprocess.Popen([sys.executable, "-m", "fdngx", "render", *args, "--reload"],
                                    stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                                    start_new_session=True)
            try:
                wait_for(lambda: f"listen {taken};" in site.conf.read_text(), 60, what="the swap")
                filler = fill(mnt)
                _out, err = proc.communicate(timeout=120)
            finally:
                stop_process_group(proc)
            assert proc.returncode == 1, err
            assert "nginx refused the new config" in err and "restored the previous file" in err, err
            assert "No space left" not in err, err
            assert site.conf.read_bytes() == before
            assert leftovers(site.conf.parent) == []
            assert set(site.split(4)) == {"b0", "b1"}, "nginx still serves the old config"
        finally:
            blocker.close()
            site.nginx.stop()
            if filler is not None:
                filler.unlink()


def test_concurrent_applies_leave_one_valid_config(site: Site) -> None:
    def one(w: int) -> subprocess.CompletedProcess[str]:
        # Each run renders its own inventory (same file name would race on the inventory itself).
        inv = write_inventory(site.tmp / f"inv{w}.json", instances(site.backends.ports, [w, 11 - w]))
        args = [str(inv) if a == str(site.inv) else a for a in site.args]
        return fdngx("render", *args, "--reload", timeout=240)

    with ThreadPoolExecutor(10) as pool:
        results = list(pool.map(one, range(1, 11)))
    assert all(r.returncode == 0 for r in results), [r.stderr for r in results if r.returncode]
    text = site.conf.read_text()
    assert generation_in(text) == site.generation()
    assert Nginx(site.conf.parent).test().returncode == 0
    assert not list(site.conf.parent.glob(".nginx.conf.*.fdngx-tmp"))
    assert not (site.conf.parent / ".nginx.conf.fdngx-journal").exists()


def test_check_and_diff(site: Site) -> None:
    assert site.apply().returncode == 0
    check = fdngx("render", *site.args, "--check")
    assert check.returncode == 0 and "current" in check.stderr
    site.set_weights([5, 1])
    before = site.conf.read_bytes()
    check = fdngx("render", *site.args, "--check")
    assert check.returncode == 1 and "stale" in check.stderr
    diff = fdngx("render", *site.args, "--diff")
    assert diff.returncode == 1, "like diff(1): 1 when there is a difference"
    lines = diff.stdout.splitlines()
    assert any(ln.startswith("-") and "server 127.0.0.1:" in ln and "weight=1" in ln for ln in lines), diff.stdout
    assert any(ln.startswith("+") and "server 127.0.0.1:" in ln and "weight=5" in ln for ln in lines), diff.stdout
    assert site.conf.read_bytes() == before  # --diff alone changes nothing
    assert site.apply().returncode == 0
    assert fdngx("render", *site.args, "--diff").returncode == 0, "no difference: 0"


def test_nginx_binary_is_found() -> None:
    assert Path(find_nginx()).name == "nginx"


def test_reload_with_nginx_not_running_keeps_the_tested_file(tmp_path: Path) -> None:
    """At boot cron may run before nginx: a config that passes `nginx -t` is kept, nothing to reload."""
    conf = tmp_path / "p" / "nginx.conf"
    args = ["render", "-i", str(REPO / "examples" / "fdngx.json"), "--mode", "standalone", "--out", str(conf),
            "--listen", str(free_ports(1)[0])]
    proc = fdngx(*args, "--reload")
    assert proc.returncode == 0, proc.stderr
    assert "written" in proc.stderr and "nginx is not running" in proc.stderr
    assert Nginx(conf.parent).test().returncode == 0
    bad = tmp_path / "tpl"
    bad.mkdir()
    (bad / "_proxy.j2").write_text("        proxy_pass http://{{ upstream }};\n        bogus_directive on;\n")
    before = conf.read_bytes()
    proc = fdngx(*args, "--reload", "--template-dir", str(bad), "--keepalive", "8")
    assert proc.returncode == 1 and "nginx -t (candidate) failed" in proc.stderr
    assert conf.read_bytes() == before
