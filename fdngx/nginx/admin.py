"""The OpenResty balancer's admin location, from this side: its token and the client that pushes to it.

The token lives beside the config it guards (a 0600 dot-file; the config names the file, never the token) and
goes in the X-Fdngx-Token header of every call. `Admin` POSTs one whole snapshot (fdngx.nginx.openresty) and
reads the balancer's view; whatever listens on the admin port is not trusted until it answers as the balancer
does: no redirect followed, the answer bounded, one deadline per call (`Admin.deadline`, or the fan-out's own
in controller mode: fdngx.nginx.fanout).
"""

from __future__ import annotations

import contextlib
import logging
import re
import secrets
import socket
import threading
import weakref
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple
from urllib.parse import urlsplit

from fdngx.domain import Listen, valid_host
from fdngx.errors import ApplyError, FdngxError, UsageError
from fdngx.nginx.generation import generation_in
from fdngx.nginx.networds import in_words
from fdngx.system.files import Identity, atomic_write, check_private, identity, read_regular_file, real_target

if TYPE_CHECKING:
    import requests


class AdminError(ApplyError):
    """What an admin location did not do, said as "openresty admin URL: REASON"; `reason` alone is for a line
    that names the frontend already (controller mode's "URL: push failed: REASON", fdngx.nginx.fanout)."""

    def __init__(self, url: str, reason: str) -> None:
        super().__init__(f"openresty admin {url}: {reason}")
        self.reason = reason


class AdminUnreachable(AdminError):
    """No answer from the admin location: nginx is not running, or not (yet) with this config."""


def token_path(out: Path | None) -> Path:
    """The admin token lives beside the config it guards as a dot-file (hidden from include globs), or in
    the working directory when the config goes to stdout."""
    if out is None:
        return Path(".fdngx-admin-token").absolute()
    target = real_target(out)
    return target.with_name(f".{target.name}.fdngx-admin-token")


def ensure_token(path: Path) -> str:
    """Read the token, creating a random one (mode 0600) the first time: stable, so renders stay identical.

    A token file another account could have planted or can read is refused (UnsafeFileError)."""
    check_private(path, "openresty admin token", secret=True)
    try:
        token = read_token(path)
        if token:
            return token
    except ApplyError:
        if path.exists():
            raise
    token = secrets.token_urlsafe(24)
    atomic_write(path, token + "\n", mode=0o600, private=True)
    return token


@dataclass(frozen=True)
class PushResult:
    """What a frontend said to a push: applied, the same generation again, or refused as older."""

    status: str  # "ok", "unchanged" or "stale"
    generation: int
    peers: int = 0
    added: tuple[str, ...] = ()
    removed: tuple[str, ...] = ()
    current: int | None = None  # stale: the generation in force there

    @property
    def accepted(self) -> bool:
        return self.status in ("ok", "unchanged")


def _fields(text: str) -> dict[str, str]:
    return dict(part.split("=", 1) for part in text.split() if "=" in part)


ADMIN_PATH = "/fdngx/peers"
MAX_ANSWER = 8 * 1024 * 1024  # the view of 1,000 peers is ~200 KB


class _Answer(NamedTuple):
    status_code: int
    text: str


class Watch:
    """One Admin's sockets, so that another thread can end its request in flight: a shutdown wakes a blocked
    recv at once, where requests' timeout is per read (a frontend dripping bytes would hold it forever)."""

    def __init__(self) -> None:
        self.lock, self.aborted = threading.Lock(), False
        self.socks: weakref.WeakSet[socket.socket] = weakref.WeakSet()

    def opened(self, sock: socket.socket | None) -> None:
        """Note a connected socket (None: none); while aborted, shut every one down, this one included."""
        with self.lock:
            if sock is not None:
                self.socks.add(sock)
            for s in list(self.socks) if self.aborted else ():
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)


@dataclass(frozen=True)
class Admin:
    """Client for the Lua balancer's admin location (`listen`: where this machine reaches it)."""

    listen: Listen
    token: str = field(repr=False)
    timeout: float = 2.0
    path: str = ADMIN_PATH
    _watch: Watch = field(default_factory=Watch, repr=False, compare=False)
    _session: requests.Session = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        from fdngx.nginx.admin_http import direct_session  # requests on first use (admin_http)

        object.__setattr__(self, "_session", direct_session(self._watch))

    @classmethod
    def from_url(cls, url: str, token: str, timeout: float = 2.0) -> Admin:
        """`http://HOST:PORT[/fdngx/peers]` (a frontend's --admin-listen, as the controller reaches it)."""
        listen, path = parse_admin_url(url)
        return cls(listen, token, timeout, path)

    @property
    def url(self) -> str:
        return self.listen.url(self.path)

    def _request(self, method: str, body: str | None = None) -> _Answer:
        """One call to the admin location. Never follows a redirect (the token goes to this address only)
        and reads at most MAX_ANSWER bytes of the answer: whatever listens on the admin port is not trusted
        until it answers as the balancer does. `abort` (another thread) ends it at once."""
        import requests  # loaded already (admin_http, at __post_init__)
        import urllib3
        headers = {"X-Fdngx-Token": self.token, "Accept-Encoding": "identity"}
        self._check_aborted()  # its deadline passed before it started (every worker thread was busy)
        for attempt in (1, 2):
            try:
                resp = self._session.request(method, self.url, data=body, headers=headers, timeout=self.timeout,
                                             allow_redirects=False, stream=True)
                with resp:
                    raw = resp.raw.read(MAX_ANSWER + 1, decode_content=False)
                self._check_aborted()  # a read ended by the shutdown may look like a short answer
                if len(raw) > MAX_ANSWER:
                    raise AdminError(self.url, f"answer over {MAX_ANSWER} bytes")
                return _Answer(resp.status_code, raw.decode("utf-8", "replace"))
            except requests.exceptions.InvalidHeader:
                # Its text holds the header's value: the token. (load_token and read_token refuse such a token.)
                raise AdminError(self.url, "the admin token is not a valid HTTP header value "
                                 "(a line break or a space inside?)") from None
            except requests.ConnectionError as exc:
                self._check_aborted()
                # A kept-alive connection that nginx closed (a reload ends idle ones): once more on a fresh
                # one. Safe: a snapshot sent twice carries the same generation ("unchanged").
                if attempt == 2 or isinstance(exc, requests.ConnectTimeout):
                    raise AdminUnreachable(self.url, in_words(exc)) from None
            except (requests.RequestException, urllib3.exceptions.HTTPError, OSError) as exc:
                self._check_aborted()
                raise AdminError(self.url, in_words(exc)) from None
        raise AssertionError("unreachable")

    def _check_aborted(self) -> None:
        if self._watch.aborted:
            raise AdminError(self.url, "ended at its deadline, connection closed") from None

    @contextlib.contextmanager
    def deadline(self, seconds: float) -> Iterator[None]:
        """What this client sends inside has `seconds` in all (connect, send, answer), then its connection is
        shut down and it raises ApplyError: requests' timeout is per read, and whatever listens on the admin
        port may drip a byte at a time. (The fan-out ends its pushes itself: fdngx.nginx.fanout.)"""
        self.abort(False)  # a timer that fired just as the last request returned
        timer = threading.Timer(seconds, self.abort)
        timer.daemon = True
        timer.start()
        try:
            yield
        finally:
            timer.cancel()
            self.abort(False)

    def abort(self, aborted: bool = True) -> None:
        """End the request in flight from another thread (its connection is shut down, it raises ApplyError),
        and every later one until abort(False)."""
        self._watch.aborted = aborted
        self._watch.opened(None)

    def push(self, body: str) -> PushResult:
        """POST one whole snapshot. A refused older generation is a result (another controller is ahead),
        not an error; anything else that is not applied raises ApplyError with the balancer's reason (a 409 for
        another upstream's snapshot included: "HTTP 409 snapshot for upstream A; this frontend's pool is B"). A 200
        counts only as the balancer says it: `ok` or `unchanged`, with the generation sent."""
        resp = self._request("POST", body)
        text = resp.text.strip()
        fields = _fields(text)
        try:
            if resp.status_code == 409 and text.startswith("stale "):
                return PushResult("stale", int(fields["generation"]), current=int(fields["current"]))
            if resp.status_code == 200:
                status, generation = text.split()[0], int(fields["generation"])
                if status not in ("ok", "unchanged") or generation != generation_in(body):
                    raise ValueError(status)
                added, removed = fields.get("added", ""), fields.get("removed", "")
                return PushResult(status, generation, int(fields["peers"]),
                                  tuple(filter(None, added.split(","))), tuple(filter(None, removed.split(","))))
        except (KeyError, ValueError, IndexError):
            raise AdminError(self.url, f"unexpected answer {text[:200]!r}") from None
        raise AdminError(self.url, f"HTTP {resp.status_code} {_one_line(text, 300)}")

    def view(self) -> tuple[dict[str, str], dict[str, dict[str, str]]]:
        """The balancer's view: (pool fields, {peer name: its fields}) from GET on the admin location."""
        resp = self._request("GET")
        if resp.status_code != 200:
            raise AdminError(self.url, f"HTTP {resp.status_code} {_one_line(resp.text, 200)}")
        lines = resp.text.strip().splitlines()
        peers = {f["peer"]: f for f in map(_fields, lines[1:]) if "peer" in f}
        return _fields(lines[0]) if lines else {}, peers

    def close(self) -> None:
        self._session.close()


def _one_line(text: str, limit: int) -> str:
    """Another program's text in our log line, bounded: it can neither cut the line nor forge the next one."""
    return "".join(c if c.isprintable() else f"\\x{ord(c):02x}" for c in " ".join(text[:limit].split()))


def parse_admin_url(url: str) -> tuple[Listen, str]:
    """`http://HOST:PORT[/path]` -> (where, path). Plain HTTP only (the admin server speaks nothing else); a
    path other than the admin location's is refused. Raises ValueError naming the URL."""
    parts = urlsplit(url.strip())
    try:
        port = parts.port
    except ValueError:
        port = None
    host = parts.hostname or ""
    path = parts.path if parts.path not in ("", "/") else ADMIN_PATH
    if (parts.scheme != "http" or not port or not valid_host(host) or parts.query or parts.fragment
            or parts.username or parts.password or path not in (ADMIN_PATH, ADMIN_PATH + "/")):
        raise ValueError(f"admin URL {url!r}: want http://HOST:PORT or http://HOST:PORT{ADMIN_PATH} (a frontend's "
                         "--admin-listen as this host reaches it)")
    return Listen(host, port), ADMIN_PATH


def read_token(path: Path) -> str:
    """The token in `path` ("" for an empty file): one word of printable ASCII, never said in a message."""
    try:
        token = read_regular_file(path, 4096).decode("utf-8", "replace").strip()
    except OSError as exc:
        raise ApplyError(f"{path}: cannot read the openresty admin token ({exc.strerror or exc}); "
                         "render with --flavor openresty first") from None
    if token and not re.fullmatch(r"[\x21-\x7e]+", token):
        raise ApplyError(f"{path}: the openresty admin token must be one word of printable ASCII (a line break, a "
                         "space or another character inside); write the one token alone in the file")
    return token


log = logging.getLogger("fdngx.admin")
_MIN_TOKEN = 16  # fdngx.balancer refuses a shorter one


def load_token(path: Path) -> str:
    """A push token: a private regular file of ours holding one word of at least 16 printable ASCII characters.
    Raises FdngxError naming the file, never the token."""
    check_private(path, "openresty admin token", secret=True)
    token = read_token(path)
    if len(token) < _MIN_TOKEN:
        raise UsageError(f"{path}: the admin token is shorter than {_MIN_TOKEN} characters (the frontends refuse it)")
    return token


def _identity(path: Path) -> Identity | None:
    return identity(path, follow_symlinks=False)


class TokenFile:
    """An admin token file and the token read from it, read again when the file changed (a rotation: a
    frontend's nginx takes the new one at its next reload). A file that cannot be read then keeps the token in
    use, said once, and is tried again at its next change (a rewrite in progress, a bad edit)."""

    def __init__(self, path: Path, token: str | None = None) -> None:
        self.path = path
        self._seen = _identity(path)  # before the read: a change after it is seen at the next current()
        self.token = load_token(path) if token is None else token

    def current(self) -> str:
        now = _identity(self.path)
        if now == self._seen:
            return self.token
        self._seen = now
        try:
            token = load_token(self.path)
        except FdngxError as exc:
            log.warning("%s: admin token not read again, pushing with the one in use: %s", self.path, exc)
            return self.token
        if token != self.token:
            log.info("%s: admin token changed: pushing with the new one", self.path)
        self.token = token
        return token
