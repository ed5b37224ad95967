"""A full disk (day two): an apply that cannot write says which file in one line, exits 1, and leaves the live
config, the running nginx and the directory as they were; the next apply, with room again, goes through.

Two ways to run out of room, both real: a file size limit (RLIMIT_FSIZE on the fdngx process: EFBIG, works
without privileges) and a real full filesystem (a 1 MiB tmpfs: ENOSPC; needs root to mount, as CI runs).
"""

from __future__ import annotations

import contextlib
import os
import resource
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from fdngx.sim.process import start_sim
from tests.support import Backends, Site, fdngx, free_ports, write_inventory

pytestmark = pytest.mark.nginx

LIMIT = 256  # bytes: below any config fdngx renders, above the empty lock file


def limited() -> None:
    resource.setrlimit(resource.RLIMIT_FSIZE, (LIMIT, LIMIT))


def run_fdngx(*args: str, limit: bool) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "fdngx", *args], capture_output=True, text=True, timeout=120,
                          preexec_fn=limited if limit else None)


def leftovers(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name.endswith(".fdngx-tmp") or "journal" in p.name)


@contextlib.contextmanager
def tmpfs(at: Path, size: str) -> Iterator[Path]:
    at.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root (CI runs as root)")
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0755", "tmpfs", str(at)],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {proc.stderr.strip()}")
    try:
        yield at
    finally:
        subprocess.run(["umount", "-l", str(at)], capture_output=True, check=False)


def fill(directory: Path) -> Path:
    """Take every free byte of `directory`'s filesystem; returns the filler file (remove it to free them)."""
    filler = directory / "filler"
    with contextlib.suppress(OSError), filler.open("wb", buffering=0) as fh:
        while True:
            fh.write(b"\0" * 4096)
    free = os.statvfs(directory)
    assert free.f_bavail == 0, "the filesystem still has room"
    return filler


def assert_untouched(site: Site, before: bytes, generation: str, proc: subprocess.CompletedProcess[str],
                     why: str) -> None:
    assert proc.returncode == 1, proc.stderr
    [line] = proc.stderr.splitlines()
    assert line.startswith(f"fdngx: error: {site.conf}: cannot write it: {why}") and "unchanged" in line, line
    assert "Traceback" not in proc.stderr
    assert site.conf.read_bytes() == before and site.generation() == generation
    assert leftovers(site.conf.parent) == [], "a temp file or a journal left behind"
    assert site.nginx.proc is not None and site.nginx.proc.poll() is None
    assert set(site.split(4)) == {"b0", "b1"}, "nginx still serves the old config"


def test_a_file_size_limit_leaves_the_live_config_and_nginx_untouched(tmp_path: Path) -> None:
    with Backends(free_ports(2), ["b0", "b1"]) as backends:
        site = Site(tmp_path, backends, [1, 3])
        try:
            before, generation = site.conf.read_bytes(), site.generation()
            site.set_weights([2, 2])
            proc = run_fdngx("render", *site.args, "--reload", limit=True)
            assert_untouched(site, before, generation, proc, "File too large")
            again = run_fdngx("render", *site.args, "--reload", limit=False)
            assert again.returncode == 0 and site.generation() != generation, again.stderr
        finally:
            site.nginx.stop()


def test_a_full_filesystem_leaves_the_live_config_and_nginx_untouched(tmp_path: Path) -> None:
    with tmpfs(tmp_path / "mnt", "1m") as mnt, Backends(free_ports(2), ["b0", "b1"]) as backends:
        site = Site(mnt, backends, [1, 3])
        try:
            before, generation = site.conf.read_bytes(), site.generation()
            site.set_weights([2, 2])  # the inventory is on that disk too: edit it before it fills
            filler = fill(mnt)
            proc = run_fdngx("render", *site.args, "--reload", limit=False)
            assert_untouched(site, before, generation, proc, "No space left on device")
            filler.unlink()
            again = run_fdngx("render", *site.args, "--reload", limit=False)
            assert again.returncode == 0 and site.generation() != generation, again.stderr
        finally:
            site.nginx.stop()


def test_the_sidecar_says_a_full_disk_in_one_line_and_exits_1_once(tmp_path: Path) -> None:
    """`sidecar --once`: the apply fails as an apply (the file named, exit 1), not as a crashed cycle."""
    api, met, port = free_ports(3)
    conf = tmp_path / "nginx" / "nginx.conf"
    conf.parent.mkdir()
    inv = write_inventory(tmp_path / "fdngx.json", [
        {"name": "dp0", "host": "127.0.0.1", "port": api, "metrics_port": met, "engine": "sim"}])
    with start_sim([api], [met], max_num_seqs=[8]):
        proc = run_fdngx("sidecar", "-i", str(inv), "--mode", "standalone", "--listen", f"127.0.0.1:{port}",
                         "--out", str(conf), "--once", limit=True)
    assert proc.returncode == 1, proc.stderr
    assert "Traceback" not in proc.stderr and "cycle failed" not in proc.stderr, proc.stderr
    said = [ln for ln in proc.stderr.splitlines() if f"{conf}: cannot write it: File too large" in ln]
    assert len(said) == 1, proc.stderr
    assert not conf.exists() and leftovers(conf.parent) == []


@pytest.mark.parametrize("flavor", ["nginx", "openresty"])
def test_a_missing_output_directory_is_named_not_a_temp_file(tmp_path: Path, flavor: str) -> None:
    """Before: 'fdngx: error: <dir>/..site.conf.fdngx-admin-token.k3j2.fdngx-tmp: No such file or directory',
    a random temp name nobody can act on."""
    inv = write_inventory(tmp_path / "fdngx.json", [{"name": "dp0", "host": "127.0.0.1", "port": 8001}])
    out = tmp_path / "missing" / "site.conf"
    proc = fdngx("render", "-i", str(inv), "--mode", "site", "--flavor", flavor, "--out", str(out))
    assert proc.returncode == 1, proc.stdout + proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "fdngx-tmp" not in lines[0], lines
    # The nginx flavor checks the directory first; the OpenResty one first writes its admin token there.
    assert (f"directory {out.parent} does not exist" in lines[0]
            or f"cannot write it in {out.parent}: no such directory" in lines[0]), lines[0]
    assert not out.parent.exists()
