"""The front door of site and standalone configs: what nginx itself answers (errors in OpenAI's JSON shape),
TLS, API keys, rate limits. The values are checked here; fdngx.nginx.render puts them in its context and the
templates print them through the escaping filters.

API keys are secrets and the config is world-readable (configs are 0644 under a 0755 /etc/nginx, and get
pasted into bug reports), so the keys never enter it. They go into a separate file beside the config,
`.<config name>.fdngx-api-keys`, mode 0600, owned by fdngx's account (root beside a system nginx, whose master
reads it as root when it loads the config), written atomically without following a link planted at its name;
the config `include`s it inside a `map`. Plain nginx cannot hash, so the file holds the keys themselves: it is
protected like ssh keys are, by its mode. (The alternative, a 0600 config, would also hide the rest of the
config from the people who debug nginx, and `fdngx render --out -` or `--diff` would print the keys.)

Each key is one regex entry matching the whole `Authorization: Bearer <key>` header, case-sensitively (a map's
plain strings are matched case-insensitively, and would also need a larger map_hash_bucket_size in the
http {} of a config that is not ours). A request tries them in order: with 5,000 keys, measured, a request
took 0.2-0.4 ms longer than with one. The map's value names the key by its line in the keys file (`L3`):
the access log and the per-key rate limit use it, and the key itself never reaches a log.

The config carries the key map's version (a random token written into the key file whenever its keys change),
not a hash of the keys: a changed keys file changes the config, so `fdngx render --reload` reloads nginx, and
nothing in the world-readable config can be used to test a guessed key.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import logging
import math
import os
import re
import stat
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from fdngx.domain import StrEnum
from fdngx.errors import UsageError, check_number, shown
from fdngx.nginx.escape import (
    MAX_NGINX_INT,
    EscapeError,
    check_path_length,
    nginx_arg,
    nginx_bytes,
    nginx_msec,
    nginx_string,
)
from fdngx.system.files import read_regular_file

log = logging.getLogger("fdngx.frontdoor")

API_KEY = re.compile(r"[A-Za-z0-9._~+/=-]{8,256}")
API_KEY_CHARS = "8-256 characters from A-Z a-z 0-9 . _ ~ + / = -"
MAX_KEYS_FILE = 1 << 20
MAX_KEYS = 10_000
_RATE = re.compile(r"(?P<n>[1-9][0-9]{0,5})(?:r?/(?P<unit>[sm]))?")
_NGINX_RATE = re.compile(r"[1-9][0-9]{0,5}r/[sm]")
_VERSION = re.compile(r"[0-9a-f]{16}|unwritten")
_GLOB = frozenset("*?[")
# limit_req's burst= must be at least 1 (ngx_http_limit_req_module.c: `burst <= 0` is "invalid burst value").
MAX_BURST = 100_000
# Bounds on the upstream's numbers. nginx takes max_fails and fail_timeout up to 2^63-1, but past these they
# mean nothing more. keepalive N: nginx allocates N cache slots (~76 bytes each) per upstream when it loads the
# config (N = 2^31: "malloc() failed"), and a worker never holds more connections than worker_connections.
MAX_FAILS = 100_000
MAX_FAIL_TIMEOUT = 86_400
MAX_KEEPALIVE = 65_535
# client_body_buffer_size is memory per request being read: 1024m is beyond any prompt.
MAX_BODY_BUFFER = 1 << 30
# The Lua balancer's shared dict (--lua-dict-size): below 1m it cannot hold a fleet's snapshot twice (a push of
# 1,000 replicas is ~200 KB); 4096m is far past 10,000 replicas (fdngx.peers.MAX_PEERS) on 512 workers.
MIN_LUA_DICT = 1 << 20
MAX_LUA_DICT = 4 << 30
# nginx runs at most 1024 processes (NGX_MAX_PROCESSES), old and new workers side by side during a reload.
MAX_WORKERS = 512


class AccessLogFormat(StrEnum):
    TEXT = "text"
    JSON = "json"


# -- nginx's own answers -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ErrorPage:
    """One status nginx itself may answer with, as an OpenAI error object."""

    status: int
    type: str
    code: str
    message: str
    retry_after: int = 0  # seconds; 0: no Retry-After header

    def body(self) -> str:
        return json.dumps({"error": {"message": self.message, "type": self.type, "param": None, "code": self.code}},
                          separators=(",", ":"))


# Who may reach the openresty admin location (nginx `allow`; everything else is denied). Remote pushes
# (`fdngx sidecar --push-to`, controller mode) need the controllers' addresses here; the token still applies.
LOOPBACK_ALLOW = ("127.0.0.1", "::1")


def admin_allow_list(value: str | tuple[str, ...] | list[str]) -> tuple[str, ...]:
    """`--admin-allow`: comma-separated IP addresses or CIDRs, or `loopback`, as nginx `allow` arguments
    (an address alone stays an address: `127.0.0.1`, not `127.0.0.1/32`). Raises UsageError."""
    parts = value.split(",") if isinstance(value, str) else list(value)
    out: list[str] = []
    for raw in (p.strip() for p in parts):
        if not raw:
            continue
        if raw == "loopback":
            entries = list(LOOPBACK_ALLOW)
        else:
            try:
                net = ipaddress.ip_network(raw, strict=False)
                if "%" in raw:  # a scope id: nginx's allow takes none
                    raise ValueError(raw)
            except ValueError:
                raise UsageError(f"--admin-allow {raw!r}: want IP addresses or CIDRs (10.0.0.0/8, fd00::/8) "
                                 "or 'loopback', comma-separated") from None
            full = net.prefixlen == net.max_prefixlen
            if full and net.version == 4 and net.network_address.packed == b"\xff" * 4:
                raise UsageError(f"--admin-allow {raw!r}: the broadcast address is no client (nginx refuses it)")
            entries = [str(net.network_address) if full else str(net)]
        out.extend(e for e in entries if e not in out)
    if not out:
        raise UsageError("--admin-allow: name at least one address, CIDR or 'loopback'")
    return tuple(out)


def error_pages(client_max_body_size: str) -> list[ErrorPage]:
    """Every status nginx answers by itself in these configs (a replica's own answers pass through untouched)."""
    bad = "invalid_request_error"
    return [
        ErrorPage(400, bad, "bad_request", "Bad request: nginx could not parse it."),
        ErrorPage(401, bad, "invalid_api_key", "Incorrect API key provided. Send a valid key as "
                  "'Authorization: Bearer <key>'."),
        ErrorPage(403, bad, "forbidden", "Forbidden."),
        ErrorPage(404, bad, "not_found", "Not found: fdngx serves /v1/ and /health."),
        ErrorPage(405, bad, "method_not_allowed", "Method not allowed."),
        ErrorPage(413, bad, "request_too_large", f"Request body too large: the limit is {client_max_body_size}."),
        ErrorPage(414, bad, "uri_too_long", "Request URI too long."),
        ErrorPage(429, "rate_limit_error", "rate_limit_exceeded", "Rate limit reached: too many requests, "
                  "retry after a moment.", retry_after=1),
        ErrorPage(494, bad, "header_too_large", "Request header too large."),
        ErrorPage(500, "server_error", "internal_error", "Internal error in the proxy (nginx)."),
        ErrorPage(502, "server_error", "bad_gateway", "No replica answered: the connection to it failed or broke "
                  "before a response."),
        ErrorPage(503, "server_error", "service_unavailable", "No replica can take the request now: every replica "
                  "is busy or failing. Retry after a moment.", retry_after=1),
        ErrorPage(504, "server_error", "gateway_timeout", "The replica did not answer in time."),
    ]


PLAIN_HTTP = ErrorPage(400, "invalid_request_error", "https_required",
                       "This port speaks HTTPS: the request was sent as plain HTTP.")


# -- option values -------------------------------------------------------------------------------------------


def rate(value: str | None) -> str:
    """`--rate-limit`: 10, 10/s, 10r/s or 600r/m -> nginx's `10r/s` / `600r/m`; '', 0 or 'off' -> ''."""
    if value is not None and not isinstance(value, str):
        raise UsageError(f"--rate-limit {value!r}: want text such as 10r/s")
    text = (value or "").strip()
    if text in ("", "0", "off"):
        return ""
    m = _RATE.fullmatch(text)
    if not m:
        raise UsageError(f"--rate-limit {text!r}: want requests per second (10, 10r/s) or per minute (600r/m), "
                         "1..999999")
    return f"{m.group('n')}r/{m.group('unit') or 's'}"


def default_burst(nginx_rate: str) -> int:
    """One second's worth of requests (at least 1): a client may send that many at once."""
    n, unit = nginx_rate.split("r/")
    return max(1, math.ceil(int(n) / (60 if unit == "m" else 1)))


def check_rate(nginx_rate: str, burst: int | None) -> None:
    if nginx_rate and not _NGINX_RATE.fullmatch(nginx_rate):
        raise UsageError(f"--rate-limit {nginx_rate!r} is not a valid nginx rate")
    if burst is not None:
        check_number("--rate-burst", burst, 1, MAX_BURST, "nginx takes no burst of 0", whole=True)
    if burst is not None and not nginx_rate:
        raise UsageError("--rate-burst needs --rate-limit")


def check_upstream(max_fails: object, fail_timeout: object, keepalive: object, workers: object) -> None:
    """The upstream's numbers and worker_processes, within the bounds above; UsageError naming the one option."""
    check_number("--max-fails", max_fails, 0, MAX_FAILS, "0: never hold a failing replica out", whole=True)
    check_number("--fail-timeout", fail_timeout, 1, MAX_FAIL_TIMEOUT, whole=True)
    check_number("--keepalive", keepalive, 0, MAX_KEEPALIVE, "0: off", whole=True)
    text = workers if isinstance(workers, str) else ""
    digits = text.isascii() and text.isdigit() and len(text) <= 4
    if text != "auto" and not (digits and 1 <= int(text) <= MAX_WORKERS):
        raise UsageError(f"--worker-processes {shown(workers)}: want auto or a whole number 1..{MAX_WORKERS}")


@contextlib.contextmanager
def _naming(what: str, value: object) -> Iterator[None]:
    """An EscapeError inside said as a UsageError naming the option and its value, on one line."""
    try:
        yield
    except EscapeError as exc:
        raise UsageError(f"{what} {shown(value)}: {exc}") from None


def check_time(what: str, value: object) -> None:
    """An nginx time for a millisecond directive (escape.nginx_msec); UsageError naming `what` and the value."""
    with _naming(what, value):
        nginx_msec(value)


def check_size(what: str, value: object, *, units: str = "km", least: int = 0, most: int = MAX_NGINX_INT) -> None:
    """An nginx size (escape.nginx_bytes): k or m (`units` adds g where nginx takes it); UsageError naming `what`."""
    with _naming(what, value):
        nginx_bytes(value, units=units, least=least, most=most)


def check_plain_path(what: str, value: str | None) -> None:
    """A path printed bare (access_log, load_module, the Lua balancer's files): allow-listed characters only,
    and a length nginx can read and open."""
    if not value:
        return
    try:
        nginx_arg(value)
    except EscapeError:
        raise UsageError(f"{what} {shown(value)}: use a plain path (letters, digits, . _ / - : @ +), no spaces or "
                         "quotes") from None
    with _naming(what, value):
        check_path_length(value)


def check_access_log(value: str | None) -> None:
    """`--access-log`: a file (nginx reads `syslog:server=...` as a server to send every request line to)."""
    check_plain_path("--access-log", value)
    if value and value.lower().startswith("syslog:"):
        raise UsageError(f"--access-log {shown(value)}: a file path, please (nginx would send every request line "
                         "to that syslog server)")


def check_path(what: str, value: str, *, include: bool = False) -> None:
    """A path printed as an nginx string: absolute, no `$` (nginx would read a variable), no control
    characters, a length nginx can read and open; an `include`d one also no glob characters (nginx would
    include what they match)."""
    if not value:
        return
    try:
        nginx_string(value)
    except EscapeError:
        raise UsageError(f"{what} {value[:80]!r}: a path without '$', control characters or bytes that are not "
                         "UTF-8, please") from None
    with _naming(what, value):
        check_path_length(value)
    if not value.startswith("/"):
        raise UsageError(f"{what} {value!r}: want an absolute path")
    if include and _GLOB & set(value):
        raise UsageError(f"{what} {value!r}: a path without * ? [ (nginx would read it as a pattern)")


def check_version(value: str) -> None:
    if value and not _VERSION.fullmatch(value):
        raise UsageError(f"API key map version {value!r} is not one fdngx writes")


def check_readable(what: str, path: str) -> None:
    """--tls-cert, --tls-key: a regular file this account can read (nginx's master reads it as root)."""
    p = Path(path)
    if not p.is_file():
        raise UsageError(f"{what} {path}: no such file")
    if not os.access(p, os.R_OK):
        raise UsageError(f"{what} {path}: not readable")


def check_tls(cert: str, key: str) -> None:
    if bool(cert) != bool(key):
        raise UsageError("--tls-cert and --tls-key go together (the certificate chain and its private key)")


# -- API keys ------------------------------------------------------------------------------------------------


def load_api_keys(path: Path) -> list[tuple[int, str]]:
    """(line number, key) for every key in the file: one a line, blank lines and `#` comments ignored.
    Raises UsageError naming the file and the line, never the value (it is a secret)."""
    try:
        data = read_regular_file(path, MAX_KEYS_FILE)
    except FileNotFoundError:
        raise UsageError(f"--api-keys-file {path}: no such file") from None
    except OSError as exc:
        raise UsageError(f"--api-keys-file {path}: {exc.strerror or exc}") from None
    try:
        text = data.decode("ascii")
    except UnicodeDecodeError:
        raise UsageError(f"--api-keys-file {path}: not ASCII text (keys are {API_KEY_CHARS})") from None
    keys: list[tuple[int, str]] = []
    seen: set[str] = set()
    for number, line in enumerate(text.splitlines(), 1):
        value = line.split("#", 1)[0].strip()
        if not value:
            continue
        if not API_KEY.fullmatch(value):
            raise UsageError(f"--api-keys-file {path}:{number}: not a valid API key ({API_KEY_CHARS}; the value "
                             "is not shown)")
        if value not in seen:
            seen.add(value)
            keys.append((number, value))
    if not keys:
        raise UsageError(f"--api-keys-file {path}: no keys in it (one a line; # starts a comment)")
    if len(keys) > MAX_KEYS:
        raise UsageError(f"--api-keys-file {path}: {len(keys)} keys, at most {MAX_KEYS}")
    mode = os.stat(path).st_mode
    if mode & 0o077:
        log.warning("%s: the API keys file is readable or writable by group or others (mode %04o); chmod 600 it",
                    path, stat.S_IMODE(mode))
    return keys
