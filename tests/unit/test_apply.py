"""safe_apply's backup and rollback, with a stand-in nginx (no process): the rollback needs no disk space.

The backup is the previous file itself (a second hard link made before the swap) and a rollback renames it
back. Before, a rollback wrote the old bytes to a new temp file, so on a full disk the rollback failed too
and left the refused config live.
"""

from __future__ import annotations

import errno
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any, NoReturn

import pytest

from fdngx import cli
from fdngx.errors import ApplyError, FdngxError
from fdngx.nginx import apply, journal, target
from fdngx.nginx.apply import aside, recover, safe_apply
from fdngx.nginx.control import NginxControl, ReloadError
from fdngx.system import files
from tests.support import REPO

OLD = "# fdngx-generation: 0ld0\nevents {}\n"
NEW = "# fdngx-generation: 0e40\nevents {}\n"


def _disk_full(*_args: object, **_kwargs: object) -> NoReturn:
    raise OSError(errno.ENOSPC, "No space left on device")


class RefusingNginx(NginxControl):
    """Every `nginx -t` passes; the reload is refused, and from then on the disk is full."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        super().__init__("nginx")
        self.monkeypatch = monkeypatch

    def test(self, conf: Path | None = None, prefix: Path | None = None, what: str = "nginx -t") -> None:
        return None

    def reload(self, expect_generation: str | None = None) -> float:
        self.monkeypatch.setattr(files, "write_beside", _disk_full)
        raise ReloadError("nginx refused the new config and keeps running the old one: bind() failed", False)


class AcceptingNginx(NginxControl):
    def test(self, conf: Path | None = None, prefix: Path | None = None, what: str = "nginx -t") -> None:
        return None

    def reload(self, expect_generation: str | None = None) -> float:
        return 0.01


def _leftovers(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name.endswith(".fdngx-tmp") or "journal" in p.name)


def test_a_rollback_on_a_full_disk_puts_the_previous_file_back(tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    live = tmp_path / "nginx.conf"
    live.write_text(OLD)
    live.chmod(0o640)
    inode = live.stat().st_ino
    with pytest.raises(ApplyError) as err:
        safe_apply(live, NEW, RefusingNginx(monkeypatch), reload=True, standalone=True)
    assert "refused" in str(err.value) and "restored the previous file" in str(err.value), err.value
    assert live.read_text() == OLD
    st = live.stat()
    assert st.st_ino == inode and st.st_mode & 0o777 == 0o640, "the previous file itself is back"
    assert _leftovers(tmp_path) == []


def test_recovery_on_a_full_disk_puts_the_previous_file_back(tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """A crash right after the swap (the journal and the backup stay); the disk is full when recovery runs."""
    live = tmp_path / "nginx.conf"
    live.write_text(OLD)
    inode = live.stat().st_ino
    monkeypatch.setattr(apply, "_finish", lambda *_a: "crashed after the swap")
    assert safe_apply(live, NEW, AcceptingNginx("nginx"), reload=True, standalone=True) == "crashed after the swap"
    assert live.read_text() == NEW and aside(live, "journal").exists()
    monkeypatch.setattr(files, "write_beside", _disk_full)
    done = recover(live, None, reload=False)
    assert "restored the previous" in done, done
    assert live.read_text() == OLD and live.stat().st_ino == inode
    assert _leftovers(tmp_path) == []


def test_the_backup_is_the_previous_file_itself(tmp_path: Path) -> None:
    live = tmp_path / "nginx.conf"
    live.write_text(OLD)
    previous = live.stat()
    result = safe_apply(live, NEW, AcceptingNginx("nginx"), reload=True, standalone=True)
    assert result.reloaded and live.read_text() == NEW
    backup = aside(live, "bak")
    assert backup.read_text() == OLD and backup.stat().st_ino == previous.st_ino
    assert _leftovers(tmp_path) == []


def test_a_live_file_others_can_write_is_backed_up_by_a_private_copy(tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """A hard link would share the live file's mode (writable by others): a 0600 copy instead, and a
    rollback then writes the bytes back (keeping the live file's mode), as before."""
    live = tmp_path / "nginx.conf"
    live.write_text(OLD)
    live.chmod(0o666)
    inode = live.stat().st_ino

    class Refusing(AcceptingNginx):
        def reload(self, expect_generation: str | None = None) -> float:
            backup = aside(live, "bak")
            assert backup.stat().st_ino != inode and backup.stat().st_mode & 0o777 == 0o600
            raise ReloadError("refused", False)

    with pytest.raises(ApplyError, match="restored the previous file"):
        safe_apply(live, NEW, Refusing("nginx"), reload=True, standalone=True)
    assert live.read_text() == OLD and live.stat().st_mode & 0o777 == 0o666
    assert _leftovers(tmp_path) == []


def test_recovery_does_not_rename_a_backup_whose_bytes_changed(tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    live = tmp_path / "nginx.conf"
    live.write_text(OLD)
    monkeypatch.setattr(apply, "_finish", lambda *_a: "crashed after the swap")
    safe_apply(live, NEW, AcceptingNginx("nginx"), reload=True, standalone=True)
    backup = aside(live, "bak")
    backup.write_text("# changed behind fdngx's back\n")
    with pytest.raises(ApplyError, match=r"backup .* is missing or changed"):
        recover(live, None, reload=False)
    assert live.read_text() == NEW, "nothing restored from a backup that is not the previous file"
    assert os.path.exists(backup)


class TookNewButUnconfirmed(NginxControl):
    """nginx started workers on the new file, but the generation check never saw it (another server answers
    the verify address): ReloadError(took_new=True). Records the reloads asked for."""

    def __init__(self) -> None:
        super().__init__("nginx")
        self.reloads: list[str | None] = []

    def test(self, conf: Path | None = None, prefix: Path | None = None, what: str = "nginx -t") -> None:
        return None

    def reload(self, expect_generation: str | None = None) -> float:
        self.reloads.append(expect_generation)
        if expect_generation is not None:
            raise ReloadError("nginx did not take the new config within 15s: new workers started", True)
        return 0.01


def test_a_first_apply_nginx_took_but_did_not_confirm_reloads_nginx_back_without_it(tmp_path: Path) -> None:
    """No file before: the rollback removes it, and nginx, which runs it, must be reloaded off it too."""
    live = tmp_path / "fdngx.conf"
    nginx = TookNewButUnconfirmed()
    with pytest.raises(ApplyError) as err:
        safe_apply(live, NEW, nginx, reload=True)
    assert not live.exists()
    assert nginx.reloads == ["0e40", None], "nginx must be put back on the config without the file"
    assert "back on the previous config" in str(err.value) and "removed it" in str(err.value), err.value


def test_a_first_apply_crashed_after_the_swap_is_said_as_removed_not_restored(tmp_path: Path,
                                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    live = tmp_path / "fdngx.conf"
    monkeypatch.setattr(apply, "_finish", lambda *_a: "crashed after the swap")
    safe_apply(live, NEW, AcceptingNginx("nginx"), reload=True)
    done = recover(live, None, reload=False)
    assert f"removed {live} (there was none before)" in done and "restored" not in done, done
    assert not live.exists()
    aside(live, "journal").write_text("{ not a journal")  # damaged by hand: no apply writes one
    assert recover(live, None, reload=False) == (f"removed {aside(live, 'journal')}: not a readable apply journal; "
                                                 f"left {live} as it is")


def test_recovery_removes_the_temp_files_killed_writes_left_beside_the_config(tmp_path: Path) -> None:
    """A kill between a dot-file's temp write and its rename left the temp for good (a key map's held API keys
    since revoked). Recovery removes them once old (some are written outside the apply lock), ours only."""
    live = tmp_path / "nginx.conf"
    live.write_text(OLD)
    old = tmp_path / "..nginx.conf.fdngx-api-keys.0123456789abcdef.ab12cd34.fdngx-tmp"
    state = tmp_path / "..nginx.conf.fdngx-state.json.zz99yy88.fdngx-tmp"
    fresh = tmp_path / "..nginx.conf.fdngx-peers.qq11ww22.fdngx-tmp"
    candidate = tmp_path / ".nginx.conf.k3k3k3k3.fdngx-tmp"
    other = tmp_path / "..other.conf.fdngx-state.json.zz99yy88.fdngx-tmp"  # another config's, however old
    for f in (old, state, fresh, candidate, other):
        f.write_text('"~^(?i:bearer) +k3-revoked$" L1;\n')
    long_ago = time.time() - 2 * journal.STALE_TEMP_AFTER
    for f in (old, state, other):
        os.utime(f, (long_ago, long_ago))
    assert recover(live, None, reload=False) == ""
    assert not old.exists() and not state.exists() and not candidate.exists()
    assert fresh.exists(), "a write in progress (outside the lock) is left alone"
    assert other.exists(), "another config's files are not this recovery's"
    assert live.read_text() == OLD


def test_render_says_a_recovery_once_even_when_its_push_then_fails(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                   capsys: pytest.CaptureFixture[str]) -> None:
    """OpenResty flavor: the apply recovers an interrupted first apply and succeeds, the push fails (the
    balancer unreachable): render exits 1 and must still have said what recovery did (it said nothing)."""
    inv = tmp_path / "fdngx.json"
    shutil.copy(REPO / "examples" / "fdngx.json", inv)
    out = tmp_path / "fdngx.conf"
    args = ["render", "-i", str(inv), "--flavor", "openresty", "--out", str(out), "--admin-listen", "127.0.0.1:1"]

    def run() -> int:
        monkeypatch.setattr(sys, "argv", ["fdngx", *args])
        with pytest.raises(SystemExit) as done:
            cli.main()
        return int(done.value.code or 0)

    assert run() == 0 and out.exists()
    live = out.read_bytes()  # as if an apply of this first file was killed after its swap
    files.atomic_write(aside(out, "journal"), journal.Journal(str(out), False, None, journal.sha(live) or "", 4242,
                                                               time.time()).to_json(), private=True)

    def unreachable(*_a: object, **_k: object) -> NoReturn:
        raise ApplyError("balancer unreachable (simulated)")

    monkeypatch.setattr(target.Target, "push", unreachable)
    capsys.readouterr()
    assert run() == 1
    err = capsys.readouterr().err
    assert err.count("recovered an interrupted apply") == 1 and "balancer unreachable" in err, err


def test_an_apply_whose_inputs_changed_under_the_lock_writes_nothing(tmp_path: Path) -> None:
    live = tmp_path / "fdngx.conf"
    live.write_text(OLD)
    with pytest.raises(apply.InputsChanged, match="the inventory changed"):
        safe_apply(live, NEW, AcceptingNginx("nginx"), reload=True, guard=lambda: "the inventory changed")
    assert live.read_text() == OLD
    assert safe_apply(live, NEW, AcceptingNginx("nginx"), reload=True, guard=lambda: None).changed
    assert live.read_text() == NEW


def test_both_of_an_older_fdngxs_visible_files_are_kept_under_names_of_their_own(tmp_path: Path) -> None:
    live = tmp_path / "fdngx"
    live.write_text(OLD)
    (tmp_path / "fdngx.fdngx-bak").write_text(OLD)
    (tmp_path / "fdngx.fdngx-bak.tmp").write_text(OLD[:25])  # an older fdngx's copy, cut short
    done = recover(live, None, False)
    assert "fdngx.fdngx-bak to .fdngx.fdngx-bak-legacy" in done and ".fdngx.fdngx-bak-tmp-legacy" in done, done
    assert (tmp_path / ".fdngx.fdngx-bak-legacy").read_text() == OLD
    assert (tmp_path / ".fdngx.fdngx-bak-tmp-legacy").read_text() == OLD[:25]
    assert not (tmp_path / "fdngx.fdngx-bak").exists() and not (tmp_path / "fdngx.fdngx-bak.tmp").exists()


def test_force_keeps_every_distinct_hand_written_version(tmp_path: Path) -> None:
    live = tmp_path / "default"
    live.write_text("server { listen 80; }\n")
    safe_apply(live, NEW, None, reload=False, replace_foreign=True)
    live.write_text("server { listen 81; }\n")  # hand-written again
    safe_apply(live, OLD, None, reload=False, replace_foreign=True)
    assert (tmp_path / ".default.fdngx-orig").read_text() == "server { listen 80; }\n"
    assert (tmp_path / ".default.fdngx-orig.1").read_text() == "server { listen 81; }\n"
    live.write_text("server { listen 80; }\n")  # the first one again: already kept, no third copy
    safe_apply(live, NEW, None, reload=False, replace_foreign=True)
    assert not (tmp_path / ".default.fdngx-orig.2").exists()


def test_a_kept_original_planted_as_a_symlink_is_refused_and_the_file_stays(tmp_path: Path) -> None:
    live = tmp_path / "default"
    live.write_text("server { listen 80; }\n")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.write_text("not the original\n")
    (tmp_path / ".default.fdngx-orig").symlink_to(elsewhere)
    with pytest.raises(FdngxError, match="must be a regular file"):
        safe_apply(live, NEW, None, reload=False, replace_foreign=True)
    assert live.read_text() == "server { listen 80; }\n" and elsewhere.read_text() == "not the original\n"


def test_included_by_reads_include_patterns_as_nginx_globs_them(tmp_path: Path) -> None:
    from fdngx.nginx.guards import included_by

    (tmp_path / "conf.d").mkdir()
    (tmp_path / "real-sites").mkdir()
    (tmp_path / "sites").symlink_to(tmp_path / "real-sites")
    conf = tmp_path / "nginx.conf"
    conf.write_text("events {}\nhttp {\n  include conf.d/*.conf;\n  include sites/*;\n  include /srv/one.conf;\n}\n")
    assert included_by(conf, tmp_path / "conf.d" / "fdngx.conf")  # relative to nginx.conf's directory
    assert included_by(conf, tmp_path / "real-sites" / "fdngx")  # the same directory by its real name
    assert included_by(conf, Path("/srv/one.conf"))
    assert not included_by(conf, tmp_path / "conf.d" / "fdngx.txt")
    assert not included_by(conf, tmp_path / "conf.d" / "sub" / "fdngx.conf"), "* does not cross a /"
    assert not included_by(conf, tmp_path / "sites" / ".hidden"), "* does not match a leading dot"
    assert not included_by(tmp_path / "missing.conf", tmp_path / "conf.d" / "fdngx.conf")


def test_the_first_apply_after_an_update_says_which_fdngx_wrote_the_previous_file() -> None:
    """After an update only the header's version changes, and the apply's line said 'applied and reloaded' with
    no reason (an ops review); it names the version that wrote the file it replaced. Not when it is this one."""
    from fdngx import __version__

    def result(old_version: str) -> apply.ApplyResult:
        diff = (f"--- a (on disk)\n+++ a (rendered)\n@@ -1,2 +1,2 @@\n"
                f"-# Generated by fdngx {old_version}: do not edit.\n"
                f"+# Generated by fdngx {__version__}: do not edit.\n")
        return apply.ApplyResult(Path("/etc/nginx/fdngx.conf"), True, True, diff, "abc")

    assert result("0.2.0").summary.endswith("; the previous file was written by fdngx 0.2.0"), result("0.2.0").summary
    assert "previous file" not in result(__version__).summary
    assert "previous file" not in apply.ApplyResult(Path("/x"), True, True, "-upstream a {\n+upstream b {\n",
                                                    "abc").summary


def test_the_include_nginx_lacks_is_said_so_that_it_works_when_followed(tmp_path: Path) -> None:
    """'nginx does not read this file' names the fix; followed as said it must work (a review): a path with a
    space said bare is two arguments to nginx; a standalone config is a whole nginx.conf, no include."""
    import types

    from fdngx.nginx import guards

    control: Any = types.SimpleNamespace(main_conf="/etc/nginx/nginx.conf")
    listed = frozenset({"/etc/nginx/nginx.conf"})
    with pytest.raises(ApplyError, match=r"add `include /srv/fdngx/site\.conf;` inside http \{\} there"):
        guards.check_read(Path("/srv/fdngx/site.conf"), listed, control)
    with pytest.raises(ApplyError, match=r'add `include "/srv/my fdngx/site\.conf";`'):
        guards.check_read(Path("/srv/my fdngx/site.conf"), listed, control)
    with pytest.raises(ApplyError, match=r"run nginx with -c /srv/fdngx/nginx\.conf") as got:
        guards.check_read(Path("/srv/fdngx/nginx.conf"), listed, control, standalone=True)
    assert "include" not in str(got.value).split("this one);", 1)[1].split("or render")[0]


def _stamped(body: str) -> str:
    from fdngx.nginx.stamp import GENERATION_TOKEN, stamp_generation

    return stamp_generation(f"# Generated by fdngx 0.3.0: do not edit.\n# fdngx-generation: {GENERATION_TOKEN}\n{body}")


def test_hand_edits_of_fdngxs_file_keep_the_newest_ten_and_never_refuse_an_apply(tmp_path: Path,
                                                                                 caplog: pytest.LogCaptureFixture
                                                                                 ) -> None:
    """A sidecar must keep applying (weights, drains) whatever was edited by hand: past 10 kept edits the oldest
    goes. Each one is said once its file was replaced."""
    live = tmp_path / "upstream.conf"
    edits = []
    for n in range(12):
        live.write_text(_stamped(f"upstream llm {{ server 127.0.0.1:8000 weight={n + 2}; }}\n"))
        edited = live.read_text().replace("weight=", "weight=1")  # the hand edit: weight 12, 13, ...
        live.write_text(edited)
        edits.append(edited)
        os.utime(live, (1_000_000 + n, 1_000_000 + n))
        with caplog.at_level("WARNING", logger="fdngx.apply"):
            assert safe_apply(live, _stamped(f"upstream llm {{ server 127.0.0.1:8000 weight={n + 2}; }}\n"), None,
                              reload=False).changed
        assert "edited by hand since fdngx wrote it" in caplog.text
        caplog.clear()
        for kept in tmp_path.glob(".upstream.conf.fdngx-edit*"):  # mtimes in the order they were kept
            if kept.read_text() == edited:
                os.utime(kept, (2_000_000 + n, 2_000_000 + n))
    kept = sorted(p.read_text() for p in tmp_path.glob(".upstream.conf.fdngx-edit*"))
    assert kept == sorted(edits[2:]) and len(kept) == 10  # the first two went, the newest ten stay
    assert not any(p.name.startswith(".upstream.conf.fdngx-orig") for p in tmp_path.iterdir())


def test_an_edit_is_said_only_once_its_file_was_replaced(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """An apply whose nginx -t fails leaves the edited file live: it keeps the edit (nothing lost) but does not
    say it replaced it; a file as fdngx wrote it is replaced with nothing kept or said."""

    class FailingTest(AcceptingNginx):
        def test(self, conf: Path | None = None, prefix: Path | None = None, what: str = "nginx -t") -> None:
            raise ApplyError("nginx -t: unknown directive")

    live = tmp_path / "upstream.conf"
    edited = _stamped("upstream llm { server 127.0.0.1:8000; }\n").replace("8000", "8001")
    live.write_text(edited)
    with caplog.at_level("WARNING", logger="fdngx.apply"), pytest.raises(ApplyError, match="not touched"):
        safe_apply(live, _stamped("upstream llm { server 127.0.0.1:8002; }\n"), FailingTest("nginx"), reload=True)
    assert live.read_text() == edited and "edited by hand" not in caplog.text
    assert (tmp_path / ".upstream.conf.fdngx-edit").read_text() == edited
    live.write_text(_stamped("upstream llm { server 127.0.0.1:8003; }\n"))
    with caplog.at_level("WARNING", logger="fdngx.apply"):
        safe_apply(live, _stamped("upstream llm { server 127.0.0.1:8004; }\n"), AcceptingNginx("nginx"), reload=True)
    assert "edited by hand" not in caplog.text
    assert sorted(p.name for p in tmp_path.glob(".upstream.conf.fdngx-edit*")) == [".upstream.conf.fdngx-edit"]
