"""A directory other accounts can write to (issue 10): symlinks planted beside --out, an --out that is a
symlink (Debian's sites-enabled -> sites-available), owners and modes of rewritten files, and token and
state files planted by another account.

The applies here run `nginx -t` for real against a small wrapper nginx.conf under a temp dir (nginx itself
is not running unless a test starts it): /etc/nginx is never touched.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import stat
from pathlib import Path

import pytest

from fdngx.nginx.control import find_nginx
from tests.security.conftest import NOBODY, assert_refused, cli, needs_root, write

pytestmark = pytest.mark.nginx


def _inventory(path: Path, port: int = 8001) -> Path:
    return write(path, json.dumps({"version": 1, "instances": [{"name": "dp0", "host": "127.0.0.1", "port": port}]}))


def _wrapper(tmp: Path, include: str) -> Path:
    """A main nginx.conf that includes the fdngx snippet(s) the way a distribution's does."""
    return write(tmp / "nginx.conf", (
        f"pid {tmp}/nginx.pid;\nerror_log {tmp}/error.log;\nevents {{}}\n"
        f"http {{\n    include {include};\n}}\n"
    ))


def _apply(inv: Path, out: Path, conf: Path, *extra: str) -> None:
    proc = cli("render", "-i", str(inv), "--out", str(out), "--reload", "--nginx-conf", str(conf),
               "--prefix", str(conf.parent), *extra)
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr


def _victim(path: Path, text: str) -> Path:
    write(path, text)
    path.chmod(0o600)
    return path


def test_symlinks_planted_beside_out_are_never_followed(tmp_path: Path) -> None:
    """Backup and backup-temp names (today's and the original's) planted as symlinks to files elsewhere:
    two applies later every target still has its bytes and mode (the links are replaced)."""
    shared = tmp_path / "conf.d"
    shared.mkdir()
    elsewhere = tmp_path / "root-only"
    elsewhere.mkdir(mode=0o700)
    out = shared / "fdngx.conf"
    conf = _wrapper(tmp_path, f"{shared}/*.conf")
    inv = _inventory(tmp_path / "fdngx.json")
    _apply(inv, out, conf)
    victims = {}
    for n, name in enumerate([".fdngx.conf.fdngx-bak", "fdngx.conf.fdngx-bak", "fdngx.conf.fdngx-bak.tmp",
                              ".fdngx.conf.fdngx-bak.tmp"]):
        victim = _victim(elsewhere / f"secret{n}", f"secret {n}\n")
        (shared / name).symlink_to(victim)
        victims[victim] = f"secret {n}\n"
    for port in (8002, 8003):
        _inventory(inv, port)
        _apply(inv, out, conf)
        assert f"127.0.0.1:{port}" in out.read_text()
    for victim, text in victims.items():
        assert victim.read_text() == text, f"{victim} was overwritten through a planted symlink"
        assert stat.S_IMODE(victim.stat().st_mode) == 0o600


def test_a_planted_journal_symlink_is_refused_and_its_target_untouched(tmp_path: Path) -> None:
    """A journal drives recovery ("restore the backup"): one fdngx did not write is refused, never read
    through or written through."""
    shared = tmp_path / "conf.d"
    shared.mkdir()
    out = shared / "fdngx.conf"
    conf = _wrapper(tmp_path, f"{shared}/*.conf")
    inv = _inventory(tmp_path / "fdngx.json")
    _apply(inv, out, conf)
    victim = _victim(tmp_path / "secret", "secret\n")
    (shared / ".fdngx.conf.fdngx-journal").symlink_to(victim)
    _inventory(inv, 8002)
    proc = cli("render", "-i", str(inv), "--out", str(out), "--reload", "--nginx-conf", str(conf),
               "--prefix", str(tmp_path))
    assert victim.read_text() == "secret\n" and stat.S_IMODE(victim.stat().st_mode) == 0o600
    assert_refused(proc, "journal", codes=(1,))
    assert "127.0.0.1:8001" in out.read_text()


def test_a_planted_lock_symlink_creates_no_file_elsewhere(tmp_path: Path) -> None:
    shared = tmp_path / "conf.d"
    shared.mkdir()
    target = tmp_path / "elsewhere" / "created-by-root"
    target.parent.mkdir()
    (shared / ".fdngx.conf.fdngx-lock").symlink_to(target)  # today's lock name
    (shared / ".fdngx.conf.fdngx.lock").symlink_to(target)  # the original's
    out = shared / "fdngx.conf"
    inv = _inventory(tmp_path / "fdngx.json")
    proc = cli("render", "-i", str(inv), "--out", str(out), "--reload", "--nginx-conf",
               str(_wrapper(tmp_path, f"{shared}/*.conf")), "--prefix", str(tmp_path))
    assert not target.exists(), "root created a file through a planted lock symlink"
    assert_refused(proc, "lock", codes=(1,))


def test_an_out_that_is_a_symlink_keeps_its_link_and_its_target_is_replaced(tmp_path: Path) -> None:
    """Debian: sites-enabled/fdngx -> ../sites-available/fdngx. The link stays; the target gets the config."""
    available, enabled = tmp_path / "sites-available", tmp_path / "sites-enabled"
    available.mkdir()
    enabled.mkdir()
    inv = _inventory(tmp_path / "fdngx.json")
    write(available / "fdngx", "# placeholder\n")
    (enabled / "fdngx").symlink_to("../sites-available/fdngx")
    conf = _wrapper(tmp_path, f"{enabled}/*")
    for port in (8001, 8002):
        _inventory(inv, port)
        _apply(inv, enabled / "fdngx", conf, "--access-log", "off")
        assert (enabled / "fdngx").is_symlink(), "the sites-enabled symlink was replaced by a regular file"
        assert os.readlink(enabled / "fdngx") == "../sites-available/fdngx"
        assert f"127.0.0.1:{port}" in (available / "fdngx").read_text()
    assert sorted(Path(p).name for p in glob.glob(f"{enabled}/*")) == ["fdngx"]  # glob(3), as nginx


@needs_root
@pytest.mark.parametrize("reload", [False, True])
def test_a_rewritten_file_keeps_its_owner_group_and_mode(tmp_path: Path, reload: bool) -> None:
    shared = tmp_path / "conf.d"
    shared.mkdir()
    out = shared / "fdngx.conf"
    inv = _inventory(tmp_path / "fdngx.json")
    write(out, "# placeholder\n")
    os.chown(out, NOBODY, NOBODY)
    out.chmod(0o640)
    _inventory(inv, 8002)
    if reload:
        _apply(inv, out, _wrapper(tmp_path, f"{shared}/*.conf"))
    else:
        proc = cli("render", "-i", str(inv), "--out", str(out))
        assert proc.returncode == 0, proc.stderr
    st = out.stat()
    assert "127.0.0.1:8002" in out.read_text()
    assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (NOBODY, NOBODY, 0o640)


def test_an_out_directory_writable_by_other_accounts_is_warned_about(tmp_path: Path) -> None:
    shared = tmp_path / "conf.d"
    shared.mkdir()
    shared.chmod(0o777)
    proc = cli("render", "-i", str(_inventory(tmp_path / "fdngx.json")), "--out", str(shared / "fdngx.conf"))
    assert proc.returncode == 0, proc.stderr
    assert "writable by other accounts" in proc.stderr


# -- token and state files ---------------------------------------------------------------------------


def _plant(path: Path, text: str, uid: int, mode: int) -> Path:
    write(path, text)
    os.chown(path, uid, uid)
    path.chmod(mode)
    return path


@needs_root
@pytest.mark.parametrize("owner, mode", [(NOBODY, 0o644), (NOBODY, 0o600), (0, 0o664), (0, 0o666), (0, 0o644),
                                         (0, 0o640)])
def test_an_admin_token_planted_or_writable_by_another_account_is_refused(tmp_path: Path, owner: int,
                                                                           mode: int) -> None:
    shared = tmp_path / "conf.d"
    shared.mkdir()
    known = "known-to-the-attacker-0123456789"
    # Today's name (a dot-file beside --out) and the original's (fdngx-admin.token in the directory).
    for name in (".fdngx.conf.fdngx-admin-token", "fdngx-admin.token"):
        _plant(shared / name, known + "\n", owner, mode)
    out = shared / "fdngx.conf"
    proc = cli("render", "-i", str(_inventory(tmp_path / "fdngx.json")), "--flavor", "openresty",
               "--out", str(out))
    assert_refused(proc, "token", codes=(1,))
    assert not out.exists()


def _state_doc(weight: int) -> str:
    return json.dumps({"version": 1, "updated_at": None, "config": {}, "reloads": [],
                       "instances": {"dp0": {"weight": weight}}})


@needs_root
@pytest.mark.parametrize("owner, mode", [(NOBODY, 0o644), (NOBODY, 0o600), (0, 0o666), (0, 0o620)])
def test_a_state_file_planted_or_writable_by_another_account_is_refused(tmp_path: Path, owner: int,
                                                                         mode: int) -> None:
    out = tmp_path / "fdngx.conf"
    for name in (".fdngx.conf.fdngx-state.json", "fdngx.conf.state.json"):
        _plant(tmp_path / name, _state_doc(77), owner, mode)
    proc = cli("render", "-i", str(_inventory(tmp_path / "fdngx.json")), "--out", str(out), "--scrape")
    assert_refused(proc, "state", codes=(1,))
    assert not out.exists() or "weight=77" not in out.read_text()


def test_a_state_file_that_is_a_symlink_is_refused_and_its_target_untouched(tmp_path: Path) -> None:
    victim = _victim(tmp_path / "victim", "precious\n")
    out = tmp_path / "fdngx.conf"
    (tmp_path / ".fdngx.conf.fdngx-state.json").symlink_to(victim)
    (tmp_path / "fdngx.conf.state.json").symlink_to(victim)
    proc = cli("render", "-i", str(_inventory(tmp_path / "fdngx.json")), "--out", str(out), "--scrape")
    assert_refused(proc, "state", codes=(1,))
    assert victim.read_text() == "precious\n"


def test_a_state_symlink_planted_while_the_sidecar_runs_is_replaced_not_followed(tmp_path: Path) -> None:
    """The sidecar loads its state once and saves it for days: a link planted after the load is replaced."""
    from fdngx.weights.state import PolicyState
    from fdngx.weights.store import store_for

    victim = _victim(tmp_path / "victim", "precious\n")
    store = store_for(tmp_path / "fdngx.conf")
    assert store.load().instances == {}
    store.path.symlink_to(victim)
    store.save(PolicyState(updated_at=1.0))
    assert victim.read_text() == "precious\n" and stat.S_IMODE(victim.stat().st_mode) == 0o600
    assert not store.path.is_symlink()
    assert stat.S_IMODE(store.path.stat().st_mode) == 0o600
    assert store.load().updated_at == 1.0


@needs_root
def test_a_journal_and_backup_planted_by_another_account_are_not_restored(tmp_path: Path) -> None:
    """In a sticky world-writable directory another account can add files but not replace ours. A journal
    claiming an interrupted apply plus a 'backup' of its choosing must not become the live config."""
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o1777)
    out = shared / "fdngx.conf"
    inv = _inventory(tmp_path / "fdngx.json")
    conf = _wrapper(tmp_path, f"{shared}/*.conf")
    _apply(inv, out, conf)
    live = out.read_bytes()
    evil = b"upstream evil { server 10.9.9.9:80; }\n"
    journal = {"path": str(out), "had_old": True, "old_sha256": hashlib.sha256(evil).hexdigest(),
               "new_sha256": hashlib.sha256(live).hexdigest(), "pid": 1, "started": 0.0}
    _plant(shared / ".fdngx.conf.fdngx-bak", evil.decode(), NOBODY, 0o644)
    _plant(shared / ".fdngx.conf.fdngx-journal", json.dumps(journal), NOBODY, 0o644)
    proc = cli("render", "-i", str(inv), "--out", str(out), "--reload", "--nginx-conf", str(conf),
               "--prefix", str(tmp_path))
    assert b"evil" not in out.read_bytes()
    assert_refused(proc, "journal", codes=(1,))


def test_nginx_accepts_the_wrapper_used_here(tmp_path: Path) -> None:
    """The wrapper above is a real nginx config (so the applies really ran `nginx -t`)."""
    import subprocess

    shared = tmp_path / "conf.d"
    shared.mkdir()
    conf = _wrapper(tmp_path, f"{shared}/*.conf")
    _apply(_inventory(tmp_path / "fdngx.json"), shared / "fdngx.conf", conf)
    proc = subprocess.run([find_nginx(), "-t", "-p", f"{tmp_path}/", "-c", str(conf)], capture_output=True,
                          text=True, timeout=30)
    assert proc.returncode == 0, proc.stderr


@pytest.mark.parametrize("dirname", ["conf d", 'x.conf; } load_module fdngx-evil.so; http { #', 'q"uote'])
def test_an_out_path_with_nginx_syntax_cannot_change_the_candidate_test_wrapper(tmp_path: Path,
                                                                                dirname: str) -> None:
    """The candidate is tested inside a wrapper config that includes it by path: the path is quoted, so a
    directory name with `;`, `}` or quotes stays a path (unquoted, `nginx -t`, as root, parsed the
    `load_module` in the directory name as a directive)."""
    shared = tmp_path / dirname
    shared.mkdir()
    write(tmp_path / "x.conf", "")  # so that an unquoted `include <tmp>/x.conf; } load_module ...` would parse on
    conf = write(tmp_path / "nginx.conf", f"pid {tmp_path}/nginx.pid;\nerror_log {tmp_path}/error.log;\n"
                 f"events {{}}\nhttp {{\n    include \"{tmp_path}/*/*.conf\";\n}}\n")
    proc = cli("render", "-i", str(_inventory(tmp_path / "fdngx.json")), "--out", str(shared / "fdngx.conf"),
               "--reload", "--nginx-conf", str(conf), "--prefix", str(tmp_path))
    assert "dlopen" not in proc.stderr and '"load_module"' not in proc.stderr, proc.stderr
    assert proc.returncode == 0, proc.stderr
    assert "127.0.0.1:8001" in (shared / "fdngx.conf").read_text()
