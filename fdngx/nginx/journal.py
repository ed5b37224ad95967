"""An apply in progress, and the recovery that finishes one a crash interrupted (certbot's recovery_routine).

Safe apply (fdngx.nginx.apply) writes a journal (fsync'd) before it swaps the candidate in and removes it once
nginx confirmed the new file or the previous one is back. A journal found at the next apply means it was
interrupted (SIGKILL, power loss) between the two: `recover` puts the previous file back (its backup) and
nginx on it. Every file beside the live one is a dot-file: `.NAME.fdngx-journal`, `.NAME.fdngx-bak`.
"""

from __future__ import annotations

import contextlib
import fnmatch
import hashlib
import json
import logging
import os
import re
import stat
import time
from dataclasses import dataclass
from pathlib import Path

from fdngx.errors import ApplyError
from fdngx.nginx.control import NginxControl, NginxNotRunning, generation_in
from fdngx.system.files import (
    TEMP_SUFFIX,
    atomic_write,
    check_private,
    read_bytes_or_none,
    remove,
    restore_by_rename,
    temp_glob,
)

log = logging.getLogger("fdngx.apply")


def aside(path: Path, what: str) -> Path:
    """A file fdngx keeps beside `path`: hidden from include globs (a dot-file)."""
    return path.with_name(f".{path.name}.fdngx-{what}")


def sha(data: bytes | None) -> str | None:
    return hashlib.sha256(data).hexdigest() if data is not None else None


def owners_of(target: Path) -> set[int]:
    """Whose files beside `target` fdngx may move or delete: ours, and the live file's owner (a candidate gets
    the live file's owner). A file another account planted is not fdngx's to touch."""
    try:
        return {os.geteuid(), os.stat(target).st_uid}
    except OSError:
        return {os.geteuid()}


@dataclass(frozen=True)
class Journal:
    """An apply in progress: written (fsync'd) before the swap, removed once confirmed or rolled back."""

    path: str
    had_old: bool  # False: there was no live file before (rollback removes it)
    old_sha256: str | None
    new_sha256: str
    pid: int
    started: float

    def to_json(self) -> str:
        return json.dumps(self.__dict__, sort_keys=True) + "\n"

    @classmethod
    def read(cls, path: Path) -> Journal | None:
        data = read_bytes_or_none(path, 64 * 1024)
        if data is None:
            return None
        try:
            raw = json.loads(data)
            return cls(str(raw["path"]), bool(raw["had_old"]), raw["old_sha256"], str(raw["new_sha256"]),
                       int(raw["pid"]), float(raw["started"]))
        except (ValueError, KeyError, TypeError):
            return cls("", False, None, "", 0, 0.0)  # unreadable: treated as "interrupted, unknown"


# A temp file of a dot-file beside the config (`..NAME.fdngx-<what>.<8>.fdngx-tmp`: the key map, the state,
# the peers file, the journal, the backup's copy) that a killed write left. Some are written outside the apply
# lock (a key map, the state), so only one this old is removed: a write lasts milliseconds.
STALE_TEMP_AFTER = 600.0


def _sweep_temps(target: Path, owners: set[int], now: float) -> int:
    """Remove the temp files interrupted writes left beside `target` (call under the lock): the candidate's,
    and those of its dot-files once STALE_TEMP_AFTER old (one may hold API keys since revoked). Ours only."""
    siblings = re.compile(r"\.\." + re.escape(target.name) + r"\.fdngx-[A-Za-z0-9._-]+\.[a-z0-9_]{8}"
                          + re.escape(TEMP_SUFFIX))
    removed = 0
    for stale in target.parent.glob(f".*{TEMP_SUFFIX}"):
        candidate = fnmatch.fnmatchcase(stale.name, temp_glob(target))
        if not candidate and not siblings.fullmatch(stale.name):
            continue
        # A candidate an interrupted apply never swapped in (we hold the lock: nobody else writes one).
        removed += _remove_if(stale, owners, None if candidate else now) and not candidate
    return removed


def remove_stale_temps(path: Path, now: float) -> int:
    """Remove the temp files interrupted writes of `path` (fdngx.system.files.atomic_write) left, once
    STALE_TEMP_AFTER old: for a file written outside any apply lock (a controller's state beside its
    inventory). Ours only. Returns how many went."""
    owners = {os.geteuid()}
    return sum(_remove_if(stale, owners, now) for stale in path.parent.glob(temp_glob(path)))


def _remove_if(path: Path, owners: set[int], now: float | None) -> bool:
    """Remove `path` if one of `owners` owns it and (`now` given) it is a regular file STALE_TEMP_AFTER old."""
    with contextlib.suppress(OSError):
        st = os.lstat(path)
        if st.st_uid in owners and (now is None or (stat.S_ISREG(st.st_mode)
                                                    and now - st.st_mtime > STALE_TEMP_AFTER)):
            remove(path)
            return True
    return False


def recover(target: Path, control: NginxControl | None, reload: bool) -> str:
    """Finish what an interrupted apply left (call under the lock): roll back to the backup when the live
    file is the untested/unconfirmed candidate. Returns what was done, '' when there was nothing to do (the
    caller says it: once, also when its own apply then fails)."""
    swept = _sweep_temps(target, owners_of(target), time.time())
    if swept:
        log.info("removed %d temp file(s) that interrupted writes left beside %s", swept, target)
    jpath = aside(target, "journal")
    backup = aside(target, "bak")
    # A journal (and backup) planted by another account would make us "restore" their bytes as the config.
    check_private(jpath, "apply journal")
    journal = Journal.read(jpath)
    if journal is None:
        return ""
    if not journal.new_sha256:  # not a journal any apply writes (fsync'd before the rename): damaged by hand
        remove(jpath)
        return f"removed {jpath}: not a readable apply journal; left {target} as it is"
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(journal.started)) if journal.started else "?"
    what = f"an interrupted apply of {target} (pid {journal.pid}, started {when})"
    live = read_bytes_or_none(target)
    if sha(live) != journal.new_sha256:
        remove(jpath)
        if sha(live) != journal.old_sha256:
            return f"recovered {what}: the live file has changed since; left it as it is"
        # Before the swap nginx never saw the new file; after a rollback's rename it may still run it (the
        # reload back was not reached): reloading on the previous file is right either way.
        return (f"recovered {what}: it stopped before the swap, or after putting the previous file back; the "
                f"live file is the previous one{_reload_onto(control, reload, live)}")
    if journal.had_old:
        check_private(backup, "apply backup")
    saved = read_bytes_or_none(backup) if journal.had_old else None
    if journal.had_old and (saved is None or sha(saved) != journal.old_sha256):
        remove(jpath)
        raise ApplyError(f"{what} left {target} unconfirmed and its backup {backup} is missing or changed; "
                         f"check the file with nginx -t and remove {jpath}")
    restore(target, saved)
    put = f"restored the previous {target}" if journal.had_old else f"removed {target} (there was none before)"
    done = f"recovered {what}: {put}{_reload_onto(control, reload, saved)}"
    remove(jpath)
    return done


def _reload_onto(control: NginxControl | None, reload: bool, text: bytes | None) -> str:
    """Reload nginx on the file as it is now, `text` (recovery), unless nginx serves its generation already
    (stopped before the reload, nginx never saw the new file: a reload then only spent the reload budget, an
    outside review); what happened, to append to the message."""
    if control is None or not reload:
        return ""
    generation = generation_in(text.decode("utf-8", "replace")) if text is not None else None
    if generation is not None and control.verify_url and control.served_generation() == generation:
        return f"; nginx serves it already (generation {generation}): not reloaded"
    try:
        control.reload(None)
        return "; nginx reloaded on it"
    except NginxNotRunning:
        return "; nginx is not running"
    except ApplyError as exc:
        return f"; reloading nginx on it failed: {exc}"


def restore(target: Path, saved: bytes | None) -> None:
    """Put the previous file back: its backup renamed over the live file when the backup is that file (kept
    by a hard link: no disk space needed, a rollback must work on a full disk), else its bytes written."""
    if saved is None:
        remove(target)
    elif not restore_by_rename(aside(target, "bak"), target, saved):
        atomic_write(target, saved)
