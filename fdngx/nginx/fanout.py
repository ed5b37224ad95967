"""Controller mode: one scrape, the same snapshot pushed to N OpenResty frontends (`fdngx sidecar --push-to`).

Every cycle the controller builds ONE snapshot text (one generation, fdngx.nginx.openresty.snapshot) and
POSTs those exact bytes to every frontend's admin location at once, one worker thread per frontend:

- one number bounds a push and the cycle (`--push-timeout`): a push's whole request (connect, send, answer)
  gets that long, then its connection is shut down and it counts as `timeout`; the cycle waits no longer.
  So a dead, black-holed or byte-dripping frontend costs the others nothing and the cycle one timeout;
- a frontend whose previous push is still in flight is skipped (`busy`), not queued behind itself;
- the workers are daemon threads: exit (SIGTERM) never waits on a push;
- a frontend's failure is logged once when it starts and once when it ends (not every cycle), and counted
  per frontend in the sidecar's telemetry;
- a frontend of another upstream refuses the snapshot (409 "snapshot for upstream A; this frontend's pool is
  B", fdngx.admin): a failure of that frontend, said with its message, as is a frontend whose older fdngx
  cannot take the snapshot's upstream line (upgrade the frontends first);
- a 409 stale (the frontend holds a newer generation, from a second controller running side by side) is an
  answer, not a failure: logged once per change, counted as `stale`; at WARNING when the generation in
  force there is further ahead of this host's clock than a frontend takes from any pusher (this host's
  clock is behind, fdngx.nginx.generation), at INFO otherwise; at WARNING too when every frontend that
  answers has refused this controller's pushes for ALL_STALE_S (a clock set back here, or another
  controller's clock ahead).
- a frontend whose answers say replicas were added or removed, FOREIGN_AFTER pushes in a row, while this
  controller's fleet stayed the same, holds another fleet between its pushes: a second controller or a
  sidecar reading another inventory. Said once at WARNING (the frontends flip between the two fleets: a
  replica drained in one inventory is still picked from the other's snapshots), and when it stops.

Tokens (which file for which frontend: fdngx.nginx.pushfile) are read like the frontends read theirs: a
regular file of ours, private (0600), one word. A token file that changes (rotation: its inode, size or
mtime) is read again before the next push.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Iterable
from concurrent.futures import Future, wait
from dataclasses import dataclass
from pathlib import Path

from fdngx.errors import FdngxError, UsageError
from fdngx.nginx.admin import Admin, AdminError, TokenFile
from fdngx.nginx.generation import PushState, say_change
from fdngx.nginx.pushfile import MAX_FRONTENDS, FrontendSpec

log = logging.getLogger("fdngx.fanout")
# --push-timeout: a whole push (connect, send, answer) to one frontend. A minute is far beyond any healthy
# push; each cycle waits up to this long, and a wait past threading.TIMEOUT_MAX (~9.2e9 s) is an OverflowError.
MIN_PUSH_TIMEOUT, MAX_PUSH_TIMEOUT = 0.05, 60.0
ALL_STALE_S = 30.0  # every frontend refusing this controller's pushes as older for this long: said at WARNING
FOREIGN_AFTER = 3  # pushes in a row a frontend took with replicas added or removed, this fleet the same
NO_FRONTENDS = "no frontend to push to (the push file lists none?): nothing was pushed"


@dataclass(frozen=True)
class PushOutcome:
    """What one frontend did with one snapshot."""

    frontend: str  # HOST:PORT
    status: str  # ok | unchanged | stale (a newer generation is in force there) | failed | timeout | busy
    seconds: float = 0.0
    peers: int = 0
    error: str | None = None
    current: int | None = None  # stale: the generation in force there
    generation: int | None = None  # the generation pushed
    url: str | None = None  # the frontend's admin URL (for people: the messages that name it)
    added: tuple[str, ...] = ()  # accepted: replicas the frontend did not have before this push
    removed: tuple[str, ...] = ()

    @property
    def accepted(self) -> bool:
        return self.status in ("ok", "unchanged")

    @property
    def answered(self) -> bool:
        """The frontend took part: it took the snapshot or holds a newer one."""
        return self.accepted or self.status == "stale"


@dataclass
class _Frontend:
    spec: FrontendSpec
    admin: Admin
    label: str
    inflight: Future[PushOutcome] | None = None
    state: PushState | None = None  # last logged
    members: frozenset[str] | None = None  # the replicas of the last push it took
    foreign: int = 0  # pushes in a row it took with replicas added or removed while `members` stayed the same

    @property
    def busy(self) -> bool:
        return self.inflight is not None and not self.inflight.done()


class _Workers:
    """Daemon threads, started on demand (one per push in flight, at most `limit`) and kept for the next
    cycle: exit never waits on a push (concurrent.futures joins its threads at exit, hung ones included)."""

    def __init__(self, limit: int) -> None:
        self._jobs: queue.SimpleQueue[tuple[Future[PushOutcome], _Frontend, str] | None] = queue.SimpleQueue()
        self._idle = threading.Semaphore(0)
        self._threads = 0
        self._limit = limit

    def submit(self, f: _Frontend, text: str) -> Future[PushOutcome]:
        future: Future[PushOutcome] = Future()
        self._jobs.put((future, f, text))
        if not self._idle.acquire(blocking=False) and self._threads < self._limit:
            self._threads += 1
            threading.Thread(target=self._work, name=f"fdngx-push-{self._threads}", daemon=True).start()
        return future

    def _work(self) -> None:
        while (job := self._jobs.get()) is not None:
            future, f, text = job
            if future.set_running_or_notify_cancel():
                future.set_result(_push_one(f, text))
            del job, future, f, text
            self._idle.release()

    def close(self) -> None:
        for _ in range(self._threads):
            self._jobs.put(None)


class Fanout:
    """Pushes one snapshot text to every frontend concurrently. For one caller (the sidecar's cycle);
    `set_frontends` runs between pushes (the push file changed)."""

    def __init__(self, specs: Iterable[FrontendSpec], timeout: float = 0.5) -> None:
        if isinstance(timeout, bool) or not MIN_PUSH_TIMEOUT <= timeout <= MAX_PUSH_TIMEOUT:  # NaN too
            raise UsageError(f"--push-timeout {timeout!r}: want a number {MIN_PUSH_TIMEOUT:g}..{MAX_PUSH_TIMEOUT:g} "
                             "(seconds)")
        self.timeout = timeout
        self._frontends: dict[str, _Frontend] = {}
        self._tokens: dict[Path, TokenFile] = {}
        self._workers = _Workers(MAX_FRONTENDS)
        self._lock = threading.Lock()
        self._stale_since: float | None = None  # since when every frontend answering says stale
        self._said_stale = False
        self.set_frontends(specs)

    @property
    def labels(self) -> list[str]:
        return [f.label for f in self._frontends.values()]

    @property
    def serving(self) -> int:
        """How many frontends a snapshot tells each frontend there are (`frontends N`, fdngx.pick.others): those
        whose last push did not fail (one that is dead or cut off takes no traffic either, as far as this
        controller can tell), every one before its first push; at least 1."""
        with self._lock:
            frontends = list(self._frontends.values())
        return max(1, sum(1 for f in frontends if f.state is not PushState.FAILED))

    def set_frontends(self, specs: Iterable[FrontendSpec]) -> None:
        """Replace the list; a frontend whose URL, token file and token stay keeps its connection. Tokens are
        read now: a missing or unsafe token file raises (FdngxError) and nothing changes."""
        specs = list(specs)
        tokens: dict[Path, TokenFile] = {}
        for spec in specs:
            if spec.token_file not in tokens:
                tokens[spec.token_file] = TokenFile(spec.token_file)
        new: dict[str, _Frontend] = {}
        renewed = []
        for spec in specs:
            old, token = self._frontends.get(spec.url), tokens[spec.token_file].token
            if old is not None and old.spec == spec and old.admin.token == token:
                new[spec.url] = old
                continue
            new[spec.url] = _Frontend(spec, Admin.from_url(spec.url, token, timeout=self.timeout), spec.label)
            if old is not None:
                renewed.append(spec.label)
        with self._lock:
            gone = [f for url, f in self._frontends.items() if new.get(url) is not f]
            added = [f.label for url, f in new.items() if url not in self._frontends]
            self._frontends, self._tokens = new, tokens
        for f in gone:
            f.admin.abort()  # a push still in flight there ends now: its connection is shut down
            f.admin.close()
        removed = [f.label for f in gone if f.spec.url not in new]
        if added or removed or renewed:
            log.info("pushing to %d frontend(s)%s%s%s", len(new), f"; added {', '.join(added)}" if added else "",
                     f"; removed {', '.join(removed)}" if removed else "",
                     f"; new admin token for {', '.join(renewed)}" if renewed else "")

    def _renew_tokens(self, frontends: list[_Frontend]) -> None:
        """Read a token file again when it changed (a rotation); a frontend not busy takes the new token."""
        tokens = {path: file.current() for path, file in self._tokens.items()}
        for f in frontends:
            token = tokens[f.spec.token_file]
            if f.admin.token != token and not f.busy:
                old, f.admin = f.admin, Admin.from_url(f.spec.url, token, timeout=self.timeout)
                old.close()

    def push(self, text: str, members: frozenset[str] | None = None) -> tuple[PushOutcome, ...]:
        """POST `text` to every frontend at once; returns one outcome per frontend, in list order, after at
        most `timeout` seconds: a push still running then is ended (its connection shut down) and reported
        as `timeout`. No frontend at all: no outcome (the controller makes that the cycle's error, NO_FRONTENDS).
        `members`: the snapshot's replica names, to tell when a frontend holds another fleet between pushes."""
        with self._lock:
            frontends = list(self._frontends.values())
        if not frontends:
            return ()
        self._renew_tokens(frontends)
        started = time.monotonic()
        futures: dict[str, Future[PushOutcome]] = {}
        for f in frontends:
            if f.busy:
                continue  # the last push to it has not returned: do not queue another behind it
            f.admin.abort(False)
            f.inflight = futures[f.label] = self._workers.submit(f, text)
        if futures:
            wait(futures.values(), timeout=max(0.0, started + self.timeout - time.monotonic()))
        outcomes = []
        for f in frontends:
            fut = futures.get(f.label)
            if fut is None:
                outcome = PushOutcome(f.label, "busy", error="the previous push has not returned yet")
            elif fut.done():
                outcome = fut.result()
            else:
                f.admin.abort()  # its thread returns now, its connection closed
                outcome = PushOutcome(f.label, "timeout", time.monotonic() - started,
                                      error=f"no whole answer within {self.timeout:g} s (--push-timeout)")
            self._note(f, outcome)
            if members is not None and outcome.accepted:
                _note_members(f, outcome, members)
            outcomes.append(outcome)
        self._note_all_stale(outcomes)
        return tuple(outcomes)

    def _note(self, f: _Frontend, o: PushOutcome) -> None:
        """Log a frontend's state only when it changes: failing, working again, another controller ahead, this
        host's clock behind (fdngx.nginx.generation.say_change)."""
        state = PushState.of(o.status, o.current)
        if state is PushState.FAILED and f.state is not PushState.FAILED:
            log.warning("%s: push failed: %s (the other frontends are unaffected; said again when it works)",
                        f.spec.url, o.error)
        elif state is PushState.OK and f.state is PushState.FAILED:
            log.info("%s: push works again (%d peers)", f.spec.url, o.peers)
        else:
            say_change(log, f.spec.url, f.state, state, o.generation, o.current, pusher="this controller")
        f.state = state

    def _note_all_stale(self, outcomes: list[PushOutcome]) -> None:
        """Every frontend that answers refusing this controller's pushes as older, for ALL_STALE_S: at WARNING,
        once until one takes a push again. One frontend at a time is said at INFO (a second controller), but
        all of them for this long is rather this host's clock set back (a restart after that included)."""
        answered = [o for o in outcomes if o.answered]
        if not answered or any(o.accepted for o in answered):
            self._stale_since, self._said_stale = None, False
            return
        now = time.monotonic()
        self._stale_since = now if self._stale_since is None else self._stale_since
        if not self._said_stale and now - self._stale_since >= ALL_STALE_S:
            ahead = max((o.current or 0) - (o.generation or 0) for o in answered) / 1000
            log.warning("every frontend that answers has refused this controller's pushes as older for %.0f s (up "
                        "to %.1f s newer in force): this host's clock may have been set back, or another "
                        "controller's clock runs ahead; check both (NTP) (said once until one takes a push)",
                        now - self._stale_since, ahead)
            self._said_stale = True

    def close(self) -> None:
        with self._lock:
            frontends, self._frontends = list(self._frontends.values()), {}
        for f in frontends:
            f.admin.abort()
            f.admin.close()
        self._workers.close()


# A frontend whose Lua parser predates the snapshot's `upstream` or `frontends` line (fdngx.nginx.openresty)
# refuses it whole, naming the line.
_NEWER_LINES = ("upstream", "frontends")


def _push_one(f: _Frontend, text: str) -> PushOutcome:
    t0 = time.monotonic()
    try:
        result = f.admin.push(text)
    except FdngxError as exc:  # AdminUnreachable included; a frontend of another upstream (409) too
        error = _short(exc)
        if (line := next((w for w in _NEWER_LINES if f'unknown line "{w} ' in error), None)) is not None:
            error += (f" (this frontend runs an fdngx older than this controller's, which cannot take the {line} "
                      "line: upgrade the frontends first, then re-render and reload them: docs/controller.md)")
        return PushOutcome(f.label, "failed", time.monotonic() - t0, error=error, url=f.spec.url)
    except Exception as exc:  # a bug in one push must not take the cycle down
        return PushOutcome(f.label, "failed", time.monotonic() - t0, error=f"a bug in fdngx: {exc!r}"[:300])
    return PushOutcome(f.label, result.status, time.monotonic() - t0, result.peers, current=result.current,
                       generation=result.generation, url=f.spec.url, added=result.added, removed=result.removed)


def _note_members(f: _Frontend, o: PushOutcome, members: frozenset[str]) -> None:
    """A frontend that keeps answering "added / removed" to the same fleet is given another one in between."""
    changed = o.added or o.removed
    if f.members == members and changed:
        f.foreign += 1
        if f.foreign == FOREIGN_AFTER:
            log.warning("%s: %d pushes in a row changed its replicas (added %s; removed %s) while this controller's "
                        "fleet stayed the same: another pusher gives it another fleet in between (a second "
                        "controller or a sidecar reading another inventory); every pusher of one frontend must read "
                        "the same inventory (said again when it stops)", f.spec.url, f.foreign,
                        ", ".join(o.added) or "none", ", ".join(o.removed) or "none")
    elif f.members == members:
        if f.foreign >= FOREIGN_AFTER:
            log.info("%s: its replicas stay this controller's fleet again", f.spec.url)
        f.foreign = 0
    else:
        f.foreign = 0  # this controller's own fleet changed: its added/removed are this push's
    f.members = members


def _short(exc: Exception) -> str:
    """What went wrong, without the frontend's URL (the line that says it names the frontend already)."""
    return exc.reason if isinstance(exc, AdminError) else str(exc)[:300]
