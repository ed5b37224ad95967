"""Files planted at an inventory's lock name (`.<inventory>.registry.lock`) when root drains an inventory another
account owns (fdngx-launch.service's DynamicUser): root then makes the lock for that account, so what sits at
the name must never be followed, nor changed hands. The lock is only flock'ed: a root-owned file planted there
(a hard link) is used as a lock and nothing else."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

from tests.security.conftest import NOBODY, assert_refused, cli, needs_root, write


def _inventory(path: Path) -> Path:
    write(path, json.dumps({"version": 1, "instances": [{"name": "dp0", "host": "127.0.0.1", "port": 8001},
                                                        {"name": "dp1", "host": "127.0.0.1", "port": 8002}]}))
    os.chown(path, NOBODY, NOBODY)
    os.chmod(path, 0o640)
    return path


@needs_root
def test_a_planted_inventory_lock_symlink_is_refused_and_creates_nothing(tmp_path: Path) -> None:
    inv = _inventory(tmp_path / "lib" / "fdngx.json")
    target = tmp_path / "elsewhere" / "made-by-root"
    target.parent.mkdir()
    (inv.parent / ".fdngx.json.registry.lock").symlink_to(target)
    before = inv.read_bytes()
    proc = cli("drain", "dp0", "-i", str(inv))
    assert_refused(proc, ".fdngx.json.registry.lock", "the lock file is a symlink", codes=(1,))
    assert not target.exists(), "root created a file through a planted lock symlink"
    assert inv.read_bytes() == before


@needs_root
def test_a_root_file_hard_linked_at_the_inventory_lock_name_is_never_given_away(tmp_path: Path) -> None:
    inv = _inventory(tmp_path / "lib" / "fdngx.json")
    victim = write(tmp_path / "lib" / "root-only", "secret\n")
    os.chmod(victim, 0o600)
    os.link(victim, inv.parent / ".fdngx.json.registry.lock")
    proc = cli("drain", "dp0", "-i", str(inv))
    assert proc.returncode == 0, proc.stderr  # root's file: only flock'ed
    st = victim.stat()
    assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (0, 0, 0o600)
    assert victim.read_text() == "secret\n"
    assert json.loads(inv.read_text())["instances"][0]["drain"] is True
