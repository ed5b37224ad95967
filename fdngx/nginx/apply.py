"""The one safe-apply path every write of nginx config goes through, crash-safe.

    lock -> recover an interrupted apply -> skip if identical (and served) -> write the candidate beside
    the live file -> `nginx -t` on the candidate -> journal + backup -> atomic swap -> `nginx -t` on the
    full config -> reload -> confirm the new generation serves -> clear the journal

At no moment is the live file a config that has not passed `nginx -t`: the candidate is tested before
the swap (standalone: the whole candidate config; an included snippet: a small wrapper config that
includes it), then the full config after it. On any failure the previous file is restored and nginx is
put back on it only if it took the new one; the message says what really happened, in nginx's words.
The backup is the previous file itself, kept by a second hard link before the swap and renamed back on a
rollback, so a rollback needs no disk space (a private copy instead when the live file is another
account's or writable by others, or the file system has no hard links).

A crash (SIGKILL, power loss) between the swap and the confirmation leaves a journal. The next apply
(cron's next run, or the sidecar at start) rolls the interrupted apply back before doing anything else
and says so; the render that follows applies the change again through the whole path.

Every file beside the live one is a dot-file (nginx's `include dir/*` does not match them) created
exclusively, never through a symlink: `.NAME.fdngx-lock`, `.NAME.fdngx-bak`, `.NAME.fdngx-journal`.

What is not fdngx's is not replaced: a live file without fdngx's header (a hand-written site, Debian's
`sites-enabled/default`) is refused unless the caller says `replace_foreign` (`--force`), and then kept for
good as `.NAME.fdngx-orig` (the backup holds only the last version). fdngx's own file edited by hand since it
was rendered (its generation stamp no longer matches its text) is replaced and the edit kept as
`.NAME.fdngx-edit` (the newest 10). A file nginx does not read (no `include` matches it) is not applied:
`nginx -T` lists what it read. A standalone config (a whole nginx.conf) that the system's own nginx.conf
includes is taken back before it breaks that nginx's next reload (fdngx.nginx.guards). The journal and the
recovery from a crash: fdngx.nginx.journal.
"""

from __future__ import annotations

import contextlib
import difflib
import logging
import os
import re
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from fdngx import __version__
from fdngx.errors import ApplyError, Interrupted, os_error_line
from fdngx.nginx import guards, journal, shape
from fdngx.nginx.control import NginxControl, NginxNotRunning, ReloadError, ReloadInterrupted, generation_in
from fdngx.nginx.escape import EscapeError, nginx_string
from fdngx.nginx.journal import aside
from fdngx.nginx.shape import Front
from fdngx.system.files import (
    LockWaitStopped,
    atomic_write,
    file_lock,
    link_backup,
    read_bytes_or_none,
    real_target,
    remove,
    write_beside,
)

__all__ = ["ApplyResult", "ApplyStopped", "InputsChanged", "ReloadFailed", "aside", "lock_path", "recover",
           "safe_apply", "unified_diff"]

log = logging.getLogger("fdngx.apply")
PAUSE_ENV = "FDNGX_TEST_PAUSE_AT"  # tests: pause at a step (name) so a test can SIGKILL the apply there
_stopping = threading.local()  # .event: this thread's applies stop waiting for the lock once it is set


@contextlib.contextmanager
def lock_waits_end_on(stop: threading.Event) -> Iterator[None]:
    """Within the block, an apply in this thread that waits for the lock gives up once `stop` is set (the
    sidecar's SIGTERM): ApplyError, nothing written. An apply holding the lock runs to its end."""
    before = getattr(_stopping, "event", None)
    _stopping.event = stop
    try:
        yield
    finally:
        _stopping.event = before


def lock_path(path: Path) -> Path:
    return aside(real_target(path), "lock")


def recover(target: Path, control: NginxControl | None, reload: bool) -> str:
    """What an earlier fdngx left beside `target`, put right before anything else (call under the lock): an
    interrupted apply rolled back (fdngx.nginx.journal), an older fdngx's visible backup moved out of nginx's
    include globs. Returns what was done, '' when there was nothing to do."""
    return "\n".join(m for m in (guards.tidy_legacy(target), journal.recover(target, control, reload)) if m)


class ApplyStopped(ApplyError):
    """The apply waited for the lock and the caller stopped meanwhile (lock_waits_end_on): nothing written."""


class ReloadFailed(ApplyError):
    """The reload failed (nginx refused it, or took it and was reloaded back): each try signals nginx, so a
    loop must not retry the same config every cycle (fdngx.weights.controller holds it back)."""


class InputsChanged(ApplyError):
    """The render's inputs (the inventory) changed after it read them: nothing was written; render again."""


def unified_diff(old: bytes | None, new: str, path: Path) -> str:
    old_lines = (old or b"").decode("utf-8", "replace").splitlines(keepends=True)
    return "".join(
        difflib.unified_diff(old_lines, new.splitlines(keepends=True), f"{path} (on disk)", f"{path} (rendered)")
    )


def _pause(step: str) -> None:
    """Test hook: with FDNGX_TEST_PAUSE_AT=<step>, say so on stderr and wait to be killed (at most 60 s)."""
    if os.environ.get(PAUSE_ENV) == step:
        print(f"fdngx: test hook: paused at {step}", file=sys.stderr, flush=True)
        time.sleep(60)


# A diff's removed header line (the header of every config fdngx renders): which fdngx wrote the old file.
_OLD_HEADER = re.compile(r"^-# Generated by fdngx (\S+?):", re.M)


@dataclass(frozen=True)
class ApplyResult:
    path: Path
    changed: bool
    reloaded: bool
    diff: str
    generation: str | None
    note: str = ""  # something the user must hear although the apply succeeded (nginx down, ...)
    nginx_running: bool | None = None  # None: not asked (no reload requested)
    recovered: str = ""  # what recovery did about an interrupted earlier apply
    reload_seconds: float = 0.0

    @property
    def summary(self) -> str:
        """What this apply did, one line (what recovery did before it is `recovered`, said on its own)."""
        if not self.changed:
            return f"{self.path}: unchanged" + (f"; {self.note}" if self.note else "")
        gen = f" (generation {self.generation})" if self.generation else ""
        note = f"; {self.note}" if self.note else ""
        if (m := _OLD_HEADER.search(self.diff)) and m.group(1) != __version__:  # the first apply after an update
            note += f"; the previous file was written by fdngx {m.group(1)}"
        took = f" in {self.reload_seconds:.2f}s" if self.reloaded else ""
        return f"{self.path}: {'applied and reloaded' if self.reloaded else 'written'}{gen}{took}{note}"

def _test_candidate(candidate: Path, control: NginxControl, standalone: bool, wrapper_head: str) -> None:
    """`nginx -t` on the candidate before it goes live: a standalone config as itself (same prefix), a
    snippet through a wrapper config that includes it inside http {}."""
    if standalone:
        control.test(conf=candidate, what="nginx -t (candidate)")
        return
    with tempfile.TemporaryDirectory(prefix="fdngx-test-") as tmp:
        wrapper = Path(tmp) / "nginx.conf"
        try:  # paths, not inventory data, but a path with `;` or a space must not change the wrapper
            pid, include = nginx_string(f"{tmp}/nginx.pid"), nginx_string(str(candidate))
        except EscapeError as exc:
            raise ApplyError(f"cannot test the candidate in a wrapper config: {exc}") from None
        try:
            wrapper.write_text(
                f"{wrapper_head}pid {pid};\nerror_log stderr;\nevents {{}}\n"
                # the user's http {} may set a bigger variables hash for a long upstream name: so does this
                # one (fdngx.nginx.build.HASH_SAFE_UPSTREAM); the full nginx -t after the swap judges theirs
                f"http {{\n{_bucket(candidate)}    include {include};\n}}\n"
            )
        except OSError as exc:  # a full /tmp: the error names no file
            raise ApplyError(f"cannot write the test wrapper config {wrapper}: {exc.strerror or exc}; nothing "
                             "was applied") from None
        control.test(conf=wrapper, prefix=Path(tmp), what="nginx -t (candidate in a test wrapper)")


def _bucket(candidate: Path) -> str:
    """The wrapper's variables hash line: none when the candidate sets its own (a --template-dir site)."""
    try:
        own = b"variables_hash_bucket_size" in candidate.read_bytes()
    except OSError:
        own = False
    return "" if own else "    variables_hash_bucket_size 128;\n"


def _write_candidate(target: Path, content: bytes, like: Path) -> Path:
    """The candidate: an exclusive temp file beside the target, with the live file's owner and mode."""
    try:
        st = os.stat(like)
    except FileNotFoundError:
        return write_beside(target, content, 0o644)
    return write_beside(target, content, st.st_mode & 0o7777, (st.st_uid, st.st_gid))


# -- safe apply --------------------------------------------------------------------------------------


def safe_apply(
    path: Path,
    content: str,
    control: NginxControl | None,
    *,
    reload: bool,
    standalone: bool = False,
    wrapper_head: str = "",
    lock_timeout: float = 120.0,
    replace_foreign: bool = False,
    guard: Callable[[], str | None] | None = None,
) -> ApplyResult:
    """Write `content` to `path` the safe way (see module doc). `control=None`: write only, no nginx.

    `standalone`: `content` is a whole nginx.conf (tested as itself), else a snippet (tested in a wrapper,
    `wrapper_head` = lines it needs first, e.g. load_module for the Lua module). `replace_foreign`: replace
    a file fdngx did not write (kept as `.NAME.fdngx-orig`). `guard`, asked under the lock: why the content
    is out of date (its inputs changed since it was rendered), or None; out of date raises InputsChanged.
    """
    path = Path(path)
    target = real_target(path)
    if not target.parent.is_dir():
        raise ApplyError(f"{path}: directory {target.parent} does not exist")
    how = _How(standalone, wrapper_head, replace_foreign, guard)
    try:
        return _apply_locked(path, target, content, control, reload, how, lock_timeout)
    except LockWaitStopped:
        raise ApplyStopped(f"{path}: stopping: the apply waited for the lock and was not made") from None
    except OSError as exc:  # a full disk, a file size limit, a permission: what failed, as an apply error
        raise ApplyError(os_error_line(exc)) from None


@dataclass(frozen=True)
class _How:
    standalone: bool
    wrapper_head: str
    replace_foreign: bool
    guard: Callable[[], str | None] | None


def _apply_locked(path: Path, target: Path, content: str, control: NginxControl | None, reload: bool, how: _How,
                  lock_timeout: float) -> ApplyResult:
    with file_lock(lock_path(path), timeout=lock_timeout, stop=getattr(_stopping, "event", None)):
        _pause("locked")
        recovered = recover(target, control, reload)
        try:
            return _apply_recovered(path, target, content, control, reload, how, recovered)
        except BaseException:
            if recovered:  # the result that carries it never comes: said here, once
                log.warning("%s", recovered)
            raise


def _apply_recovered(path: Path, target: Path, content: str, control: NginxControl | None, reload: bool, how: _How,
                     recovered: str) -> ApplyResult:
    """The apply proper, under the lock, after recovery (`recovered`: what it did, for the result)."""
    data = content.encode("utf-8")
    generation = generation_in(content)
    stale = how.guard() if how.guard is not None else None
    if stale:
        raise InputsChanged(f"{path}: not applied: {stale}")
    old = read_bytes_or_none(target)
    if old == data:
        return _unchanged(path, control, reload, generation, recovered)
    guards.check_replaceable(path, old, how.replace_foreign)
    shape.check(path, old, Front.of(data), how.replace_foreign)  # a mode, TLS, API keys or flavor left out
    guards.keep_original(path, target, old)  # --force: kept for good, not only until the next apply
    edit = guards.keep_edit(target, old)  # kept before the file goes; said once it went
    diff = unified_diff(old, content, path)
    if control is None:
        atomic_write(target, data)
        _edit_replaced(path, edit)
        return ApplyResult(path, True, False, diff, generation, recovered=recovered)
    candidate = _write_candidate(target, data, target)
    try:
        try:
            _test_candidate(candidate, control, how.standalone, how.wrapper_head)
        except ApplyError as exc:  # nginx names the temp file: name the file the user knows
            why = str(exc).replace(str(candidate), f"{path} (candidate)")
            raise ApplyError(f"{path}: {why}; the live file was not touched") from None
        _pause("candidate-tested")
        jfile = aside(target, "journal")
        backup = aside(target, "bak")
        if old is not None and not link_backup(target, backup, old):
            atomic_write(backup, old, private=True)
        entry = journal.Journal(str(target), old is not None, journal.sha(old), journal.sha(data) or "",
                                os.getpid(), time.time())
        atomic_write(jfile, entry.to_json(), private=True)
        os.replace(candidate, target)
    except KeyboardInterrupt:
        remove(candidate)
        raise Interrupted(f"{path}: not applied, the live file was not touched") from None
    except BaseException:
        remove(candidate)
        raise
    _pause("swapped")
    result = _finish(path, target, old, diff, generation, control, reload, recovered, how.standalone)
    _edit_replaced(path, edit)
    return result


def _edit_replaced(path: Path, kept: Path | None) -> None:
    if kept is not None:
        log.warning("%s: it was edited by hand since fdngx wrote it (its text no longer matched its fdngx-generation "
                    "stamp) and is now replaced; the edited file is kept as %s (lasting changes go in the inventory, "
                    "a --template-dir or your own nginx.conf)", path, kept)


def _unchanged(path: Path, control: NginxControl | None, reload: bool, generation: str | None,
               recovered: str) -> ApplyResult:
    """Identical bytes: nothing to write. Still say when nginx is down, and reload when nginx serves
    another generation than the file's (a crash after an earlier swap, or someone reverted nginx)."""
    if control is None or not reload:
        return ApplyResult(path, False, False, "", generation, recovered=recovered)
    if not control.running():
        return ApplyResult(path, False, False, "", generation, "nginx is not running", False, recovered)
    served = control.served_generation()
    if generation and control.verify_url and served != generation:
        try:
            took = control.reload(generation)
        except ReloadError as exc:
            raise ReloadFailed(f"{path}: unchanged, but nginx serves generation {served or 'unknown'}: {exc}") from None
        note = f"nginx served generation {served or 'unknown'}: reloaded"
        return ApplyResult(path, False, True, "", generation, note, True, recovered, took)
    return ApplyResult(path, False, False, "", generation, "", True, recovered)


def _finish(path: Path, target: Path, old: bytes | None, diff: str, generation: str | None,
            control: NginxControl, reload: bool, recovered: str, standalone: bool) -> ApplyResult:
    """After the swap: full `nginx -t`, reload, confirm; on failure restore and say what happened."""
    jpath = aside(target, "journal")
    took_new = told = False
    try:
        guards.check_read(target, control.test(), control, standalone)
        if standalone:  # is it where the system's nginx.conf reads? (a placeholder, an older fdngx's file)
            guards.check_not_in_system_conf(target, control)
        _pause("tested")
        if not reload:
            remove(jpath)
            return ApplyResult(path, True, False, diff, generation, recovered=recovered)
        seconds = control.reload(generation)
        told = True
        _pause("reloaded")
    except NginxNotRunning as exc:
        # At boot, cron or the sidecar may run before nginx: the file passed `nginx -t`, keep it.
        remove(jpath)
        return ApplyResult(path, True, False, diff, generation, str(exc), False, recovered)
    except KeyboardInterrupt as exc:
        if told or isinstance(exc, ReloadInterrupted):
            # Ctrl-C once nginx was told to reload: it loads the new file (which passed nginx -T). Putting the
            # old file back would leave nginx on a config no file holds (the next outside reload would move it
            # back silently); the new one stays, as nginx runs it.
            remove(jpath)
            raise Interrupted(f"{path}: applied; nginx was told to reload onto it ('fdngx render --check' "
                              "says whether it serves it)") from None
        journal.restore(target, old)
        remove(jpath)
        undone = "restored the previous file" if old is not None else "removed it (there was no file before)"
        raise Interrupted(f"{path}: {undone}") from None
    except BaseException as exc:
        took_new = isinstance(exc, ReloadError) and exc.took_new
        journal.restore(target, old)
        reason = str(exc) if isinstance(exc, ApplyError) else f"{type(exc).__name__}: {exc}"
        if took_new:
            # nginx started workers on the bad file; put it back on the old one (proof: new workers only,
            # the generation URL belongs to the config we just gave up on). A first apply too: nginx then
            # runs without the file again.
            try:
                control.reload(None)
                reason += "; nginx is back on the previous config" + ("" if old is not None else " (without it)")
            except ApplyError as again:
                reason += f"; putting nginx back on the previous config failed too: {again}"
        remove(jpath)
        undone = "restored the previous file" if old is not None else "removed it (there was no file before)"
        if not isinstance(exc, Exception):
            raise
        raise (ReloadFailed if isinstance(exc, ReloadError) else ApplyError)(f"{path}: {reason}; {undone}") from None
    remove(jpath)
    return ApplyResult(path, True, True, diff, generation, "", True, recovered, seconds)

