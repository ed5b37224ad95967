"""Controller mode: one scrape, the same snapshot pushed to N OpenResty frontends (`fdngx sidecar --push-to`).

Every cycle the controller builds ONE snapshot text (one generation, fdngx.nginx.openresty.snapshot) and
POSTs those exact bytes to every frontend's admin location at once, one worker thread per frontend:

- each push has its own timeout (connect and read, `--push-timeout`); the cycle waits at most that long,
  so a dead or black-holed frontend costs the others nothing and the cycle at most one timeout;
- a frontend whose previous push is still in flight (black-holed) is skipped, not queued behind itself;
- a frontend's failure is logged once when it starts and once when it ends (not every cycle), and counted
  per frontend in the sidecar's telemetry;
- a 409 (the frontend holds a newer generation, from a second controller running side by side) is an
  answer, not a failure: logged once per change, counted as `stale`; at WARNING when the generation in
  force there is further ahead of this host's clock than a frontend takes from any pusher (this host's
  clock is behind, fdngx.nginx.generation), at INFO otherwise.

Tokens: one shared token file (`--push-token-file`, the same token on every frontend), or per frontend a
token file named after its URL in the push file (`URL TOKEN_FILE`). Each is read like the frontends read
theirs: a regular file of ours, private (0600).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterable
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path

from fdngx.errors import ApplyError, FdngxError, UsageError
from fdngx.nginx.generation import PushState, say_change
from fdngx.nginx.openresty import Admin, parse_admin_url, read_token
from fdngx.system.files import check_private, read_regular_file

log = logging.getLogger("fdngx.fanout")
MAX_FRONTENDS = 1024
MAX_PUSH_FILE = 1 << 20
_MIN_TOKEN = 16  # fdngx.balancer refuses a shorter one


@dataclass(frozen=True)
class FrontendSpec:
    """One frontend to push to: its admin URL and the file holding its token."""

    url: str
    token_file: Path

    @property
    def label(self) -> str:
        """HOST:PORT, for logs and the `frontend` label."""
        listen, _path = parse_admin_url(self.url)
        return str(listen)


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

    @property
    def accepted(self) -> bool:
        return self.status in ("ok", "unchanged")

    @property
    def answered(self) -> bool:
        """The frontend took part: it took the snapshot or holds a newer one."""
        return self.accepted or self.status == "stale"


def load_token(path: Path) -> str:
    """A push token: a private regular file of ours holding at least 16 characters. Raises FdngxError."""
    check_private(path, "openresty admin token", secret=True)
    token = read_token(path)
    if len(token) < _MIN_TOKEN:
        raise UsageError(f"{path}: the admin token is shorter than {_MIN_TOKEN} characters (the frontends refuse it)")
    return token


def frontend_specs(urls: Iterable[str], token_file: Path | None, what: str = "--push-to") -> list[FrontendSpec]:
    """URLs (each may be `URL` or `URL TOKEN_FILE`) -> specs; every frontend needs a token file."""
    specs: list[FrontendSpec] = []
    seen: set[str] = set()
    for entry in urls:
        parts = entry.split()
        if not parts:
            continue
        if len(parts) > 2:
            raise UsageError(f"{what} {entry!r}: want URL or URL TOKEN_FILE")
        try:
            listen, _path = parse_admin_url(parts[0])
        except ValueError as exc:
            raise UsageError(f"{what}: {exc}") from None
        own = Path(parts[1]).absolute() if len(parts) == 2 else None
        token = own or token_file
        if token is None:
            raise UsageError(f"{what} {parts[0]}: no token file (give --push-token-file, or URL TOKEN_FILE)")
        url = listen.url("/fdngx/peers")
        if url in seen:
            raise UsageError(f"{what}: {parts[0]} is listed twice")
        seen.add(url)
        specs.append(FrontendSpec(url, token.absolute()))
    if len(specs) > MAX_FRONTENDS:
        raise UsageError(f"{what}: more than {MAX_FRONTENDS} frontends")
    return specs


def read_push_file(path: Path, token_file: Path | None) -> list[FrontendSpec]:
    """The push file: one admin URL per line, optionally followed by that frontend's token file; `#`
    comments and blank lines ignored. Raises FdngxError naming the file and line."""
    try:
        text = read_regular_file(path, MAX_PUSH_FILE).decode("utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise UsageError(f"{path}: cannot read the push file ({getattr(exc, 'strerror', None) or exc})") from None
    entries = []
    for n, line in enumerate(text.splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if line:
            entries.append((n, line))
    specs: list[FrontendSpec] = []
    for n, line in entries:
        specs.extend(frontend_specs([line], token_file, what=f"{path}:{n}"))
    urls = [s.url for s in specs]
    if len(urls) != len(set(urls)):
        raise UsageError(f"{path}: a frontend is listed twice")
    if len(specs) > MAX_FRONTENDS:
        raise UsageError(f"{path}: more than {MAX_FRONTENDS} frontends")
    return specs


@dataclass
class _Frontend:
    spec: FrontendSpec
    admin: Admin
    label: str
    inflight: Future[PushOutcome] | None = None
    state: PushState | None = None  # last logged


class Fanout:
    """Pushes one snapshot text to every frontend concurrently. Thread-safe for one caller (the sidecar's
    cycle); `set_frontends` may run between pushes (the push file changed)."""

    def __init__(self, specs: Iterable[FrontendSpec], timeout: float = 0.5) -> None:
        if timeout <= 0:
            raise UsageError("--push-timeout must be > 0")
        self.timeout = timeout
        self._frontends: dict[str, _Frontend] = {}
        self._pool: ThreadPoolExecutor | None = None
        self._lock = threading.Lock()
        self.set_frontends(specs)

    @property
    def labels(self) -> list[str]:
        return [f.label for f in self._frontends.values()]

    def set_frontends(self, specs: Iterable[FrontendSpec]) -> None:
        """Replace the list; a frontend whose URL and token file stay keeps its connection. Tokens are read
        now: a missing or unsafe token file raises (FdngxError) and nothing changes."""
        specs = list(specs)
        new: dict[str, _Frontend] = {}
        tokens: dict[Path, str] = {}
        for spec in specs:
            old = self._frontends.get(spec.url)
            if spec.token_file not in tokens:
                tokens[spec.token_file] = load_token(spec.token_file)
            if old is not None and old.spec == spec and old.admin.token == tokens[spec.token_file]:
                new[spec.url] = old
                continue
            admin = Admin.from_url(spec.url, tokens[spec.token_file], timeout=self.timeout)
            new[spec.url] = _Frontend(spec, admin, spec.label)
        with self._lock:
            gone = [f for url, f in self._frontends.items() if url not in new or new[url] is not f]
            added = [f.label for url, f in new.items() if url not in self._frontends]
            self._frontends = new
            if self._pool is None:
                # Threads start on demand (one per frontend pushed to at once) and stay for the next cycle.
                self._pool = ThreadPoolExecutor(MAX_FRONTENDS, thread_name_prefix="fdngx-push")
        for f in gone:
            if f.inflight is None or f.inflight.done():
                f.admin.close()
        if gone or added:
            log.info("pushing to %d frontend(s)%s%s", len(new), f"; added {', '.join(added)}" if added else "",
                     f"; removed {', '.join(f.label for f in gone)}" if gone else "")

    def push(self, text: str) -> tuple[PushOutcome, ...]:
        """POST `text` to every frontend at once; returns one outcome per frontend, in list order, after at
        most about `timeout` seconds (a push still running then is reported as `timeout`)."""
        with self._lock:
            frontends = list(self._frontends.values())
            pool = self._pool
        assert pool is not None
        started = time.monotonic()
        futures: dict[str, Future[PushOutcome]] = {}
        for f in frontends:
            if f.inflight is not None and not f.inflight.done():
                continue  # the last push to it still hangs: do not queue another behind it
            f.inflight = futures[f.label] = pool.submit(_push_one, f, text)
        if futures:
            # Each push bounds itself (connect and read timeouts); this bounds the cycle even if one does not.
            wait(futures.values(), timeout=self.timeout + 0.25)
        outcomes = []
        for f in frontends:
            fut = futures.get(f.label)
            if fut is None:
                outcome = PushOutcome(f.label, "busy", error="the previous push has not returned yet")
            elif fut.done():
                outcome = fut.result()
            else:
                outcome = PushOutcome(f.label, "timeout", time.monotonic() - started,
                                      error=f"no answer within {self.timeout:g} s")
            self._note(f, outcome)
            outcomes.append(outcome)
        return tuple(outcomes)

    def _note(self, f: _Frontend, o: PushOutcome) -> None:
        """Log a frontend's state only when it changes: failing, working again, another controller ahead, this
        host's clock behind (fdngx.nginx.generation.say_change)."""
        state = PushState.of(o.status, o.current)
        if state is PushState.FAILED and f.state is not PushState.FAILED:
            log.warning("%s: push failed: %s (the other frontends are unaffected; said again when it works)",
                        f.spec.url, o.error)
        elif state is PushState.OK and f.state is PushState.FAILED:
            log.warning("%s: push works again (%d peers)", f.spec.url, o.peers)
        else:
            say_change(log, f.spec.url, f.state, state, o.generation, o.current, pusher="this controller")
        f.state = state

    def close(self) -> None:
        with self._lock:
            frontends, self._frontends = list(self._frontends.values()), {}
            pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=False, cancel_futures=True)
        for f in frontends:
            f.admin.close()


def _push_one(f: _Frontend, text: str) -> PushOutcome:
    t0 = time.monotonic()
    try:
        result = f.admin.push(text)
    except FdngxError as exc:  # AdminUnreachable included
        return PushOutcome(f.label, "failed", time.monotonic() - t0, error=_short(exc))
    except Exception as exc:  # a bug in one push must not take the cycle down
        return PushOutcome(f.label, "failed", time.monotonic() - t0, error=_short(ApplyError(repr(exc))))
    return PushOutcome(f.label, result.status, time.monotonic() - t0, result.peers, current=result.current,
                       generation=result.generation, url=f.spec.url)


def _short(exc: Exception) -> str:
    """requests' long texts ("HTTPConnectionPool(...): Max retries exceeded ...") cut to what happened."""
    text = str(exc)
    for needle, short in (("Connection refused", "connection refused"), ("timed out", "timed out"),
                          ("Name or service not known", "name does not resolve"), ("No route to host", "no route")):
        if needle in text:
            return short
    return text[:300]
