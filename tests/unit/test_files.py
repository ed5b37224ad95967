"""files.py: the temp-file name shape and its cleanup pattern, and the hard-link backup and its restore."""

from __future__ import annotations

import fnmatch
import os
from pathlib import Path

from fdngx.nginx.apply import recover
from fdngx.system.files import atomic_write, link_backup, restore_by_rename, temp_glob, write_beside


def test_write_beside_names_match_the_cleanup_pattern(tmp_path: Path) -> None:
    target = tmp_path / "site.conf"
    temps = [write_beside(target, b"x", 0o644) for _ in range(20)]
    assert len(set(temps)) == 20
    for tmp in temps:
        assert tmp.parent == tmp_path and fnmatch.fnmatchcase(tmp.name, temp_glob(target)), tmp.name
    assert sorted(tmp_path.glob(temp_glob(target))) == sorted(temps)


def test_the_cleanup_pattern_does_not_match_a_siblings_temps(tmp_path: Path) -> None:
    """`site.conf` and `site.conf.bak` (or `site.conf.d`) in one directory: each run cleans its own only."""
    target = tmp_path / "site.conf"
    sibling_temps = [write_beside(tmp_path / name, b"x", 0o644).name for name in ("site.conf.bak", "site.conf.d")]
    # A sibling whose name is exactly ours plus a dot and eight [a-z0-9_] letters still does not match.
    sibling_temps.append(write_beside(tmp_path / "site.conf.abcdefgh", b"x", 0o644).name)
    for name in sibling_temps:
        assert not fnmatch.fnmatchcase(name, temp_glob(target)), name
    ours = write_beside(target, b"x", 0o644)
    assert [p.name for p in tmp_path.glob(temp_glob(target))] == [ours.name]


def test_the_cleanup_pattern_takes_names_with_glob_characters_literally(tmp_path: Path) -> None:
    odd = tmp_path / "a[1]*?.conf"
    other = write_beside(tmp_path / "a1xy.conf", b"x", 0o644)
    mine = write_beside(odd, b"x", 0o644)
    assert [p.name for p in tmp_path.glob(temp_glob(odd))] == [mine.name]
    assert other.exists()


def test_recovery_removes_its_own_stale_temps_and_leaves_a_siblings(tmp_path: Path) -> None:
    target = tmp_path / "site.conf"
    target.write_text("live\n")
    stale = write_beside(target, b"half-written candidate", 0o644)
    siblings = [write_beside(tmp_path / "site.conf.bak", b"x", 0o644),
                write_beside(tmp_path / "site.conf.d", b"x", 0o644)]
    assert recover(target, None, reload=False) == ""
    assert not stale.exists()
    assert all(s.exists() for s in siblings), "a sibling's temp file was deleted"


def test_link_backup_keeps_the_file_itself_and_replaces_a_planted_symlink(tmp_path: Path) -> None:
    live = tmp_path / "site.conf"
    live.write_bytes(b"previous\n")
    victim = tmp_path / "victim"
    victim.write_bytes(b"precious\n")
    backup = tmp_path / ".site.conf.fdngx-bak"
    backup.symlink_to(victim)
    assert link_backup(live, backup, b"previous\n")
    assert not backup.is_symlink() and backup.stat().st_ino == live.stat().st_ino
    assert victim.read_bytes() == b"precious\n"


def test_link_backup_declines_what_it_cannot_keep_safely(tmp_path: Path) -> None:
    live = tmp_path / "site.conf"
    live.write_bytes(b"previous\n")
    backup = tmp_path / ".site.conf.fdngx-bak"
    assert not link_backup(live, backup, b"other bytes\n"), "the file changed since it was read"
    assert not backup.exists()
    live.chmod(0o664)
    assert not link_backup(live, backup, b"previous\n"), "writable by the group: a private copy instead"
    assert not backup.exists()


def test_restore_by_rename_only_puts_back_the_previous_file(tmp_path: Path) -> None:
    target = tmp_path / "site.conf"
    backup = tmp_path / ".site.conf.fdngx-bak"
    target.write_bytes(b"previous\n")
    target.chmod(0o640)
    assert link_backup(target, backup, b"previous\n")
    inode = target.stat().st_ino
    atomic_write(target, b"candidate\n")  # the swap: same owner and mode, another file
    assert not restore_by_rename(backup, target, b"something else\n"), "not the bytes the journal names"
    assert restore_by_rename(backup, target, b"previous\n")
    assert target.read_bytes() == b"previous\n" and target.stat().st_ino == inode and not backup.exists()


def test_restore_by_rename_declines_a_backup_with_another_mode(tmp_path: Path) -> None:
    """A private 0600 copy (the backup of a live file that was not ours) must not change the live file's
    mode: the caller writes the bytes instead."""
    target = tmp_path / "site.conf"
    backup = tmp_path / ".site.conf.fdngx-bak"
    target.write_bytes(b"candidate\n")
    target.chmod(0o644)
    atomic_write(backup, b"previous\n", private=True)
    assert not restore_by_rename(backup, target, b"previous\n")
    assert target.read_bytes() == b"candidate\n" and backup.exists()
    assert os.stat(target).st_mode & 0o777 == 0o644
