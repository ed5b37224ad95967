"""What a config file fdngx rendered gives nginx, read back from the file: each replica's weight, `backup` and
`down` (its server line, as templates/_upstream.j2 writes it), the file's generation and when it was written,
and, for a site or standalone config, where nginx answers `GET /fdngx/generation`.

`fdngx status` shows these as the current weights: the policy state records what fdngx applied, and
someone else may have written the file since (a plain `fdngx render --reload`, a restore).

Only fdngx's own format is read, line by line as the templates write it: a file without fdngx's header is not
parsed at all (FOREIGN); in fdngx's file, only the `upstream NAME {` block of the inventory's upstream and the
`listen` of the server block that serves /fdngx/generation. The OpenResty flavor keeps its weights out of
the file (the sidecar pushes them to the Lua balancer): OPENRESTY, no servers.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from fdngx.domain import Listen, StrEnum
from fdngx.errors import os_error_line
from fdngx.nginx.guards import fdngx_wrote
from fdngx.nginx.networds import get_generation
from fdngx.nginx.stamp import edited_by_hand, generation_in
from fdngx.system.files import read_regular_file, real_target

MAX_BYTES = 16 << 20  # fdngx's configs are kilobytes; a few thousand replicas stay far below this


class Kind(StrEnum):
    WEIGHTS = "weights"  # fdngx's nginx-flavor config: its server lines read
    OPENRESTY = "openresty"  # fdngx's OpenResty-flavor config: no weights in it (pushed to the balancer)
    MISSING = "missing"  # no file at the path
    FOREIGN = "foreign"  # no fdngx header (hand-written, another tool's) or empty
    UNREADABLE = "unreadable"  # cannot be read (permissions, not a regular file)
    UNPARSED = "unparsed"  # fdngx's header, but no upstream block of that name, or a server line it cannot read


@dataclass(frozen=True)
class Server:
    address: str
    weight: int
    down: bool = False
    backup: bool = False


@dataclass(frozen=True)
class Served:
    path: Path
    kind: Kind
    servers: Mapping[str, Server] = field(default_factory=dict)  # by replica name (the line's comment)
    generation: str | None = None
    written_at: float | None = None  # the file's mtime: an apply replaces it whole
    verify_url: str | None = None  # site/standalone: where nginx answers GET /fdngx/generation
    error: str | None = None  # UNREADABLE, UNPARSED: why
    edited: bool = False  # changed since fdngx rendered it (fdngx.nginx.stamp): the next apply replaces it


def read(out: Path, upstream: str) -> Served:
    """What the config at `out` gives nginx for the upstream `upstream` (never raises for the file's sake)."""
    path = Path(out).absolute()
    target = real_target(path)
    try:
        data = read_regular_file(target, MAX_BYTES)
        written_at = os.stat(target).st_mtime
    except FileNotFoundError:
        return Served(path, Kind.MISSING)
    except OSError as exc:
        return Served(path, Kind.UNREADABLE, error=os_error_line(exc))
    if not data.strip() or not fdngx_wrote(data):
        return Served(path, Kind.FOREIGN, written_at=written_at)
    text = data.decode("utf-8", "replace")
    generation = generation_in(text[:4096])
    try:
        kind, servers = parse(text, upstream)
    except ValueError as exc:
        return Served(path, Kind.UNPARSED, generation=generation, written_at=written_at, error=str(exc))
    return Served(path, kind, servers, generation, written_at, verify_url(text), edited=edited_by_hand(data))


def parse(text: str, upstream: str) -> tuple[Kind, dict[str, Server]]:
    """The server lines of `upstream NAME {` ... `}` by replica name. ValueError (naming the line) when there
    is no such block or a server line is not as fdngx writes it."""
    servers: dict[str, Server] = {}
    inside = found = lua = False
    for number, line in enumerate(text.splitlines(), 1):
        words = line.split()
        if not inside:
            if words == ["upstream", upstream, "{"]:
                inside = found = True
            continue
        if words == ["}"]:
            inside = False
            continue
        if words and words[0] == "balancer_by_lua_block":
            lua = True
        elif words and words[0] == "server":
            got = _server(line, number)
            if got is not None:
                if got[0] in servers:
                    raise ValueError(f"line {number}: a second server line for {got[0]}")
                servers[got[0]] = got[1]
    if not found:
        raise ValueError(f"no `upstream {upstream} {{` block (rendered for another upstream name?)")
    if inside:
        raise ValueError(f"the `upstream {upstream}` block has no end")
    return (Kind.OPENRESTY, {}) if lua else (Kind.WEIGHTS, servers)


def _server(line: str, number: int) -> tuple[str, Server] | None:
    """One `server ADDRESS weight=W max_fails=N fail_timeout=Ts[ down| backup];  # NAME` line; None for a line
    that names no replica (the placeholder of an empty fleet, `server 127.0.0.1:9 down;`)."""
    body, semicolon, comment = line.partition(";")
    name = comment.strip().removeprefix("#").strip()
    if not semicolon or not comment.strip().startswith("#") or not name or len(name.split()) != 1:
        return None
    words = body.split()
    if len(words) < 2:
        raise ValueError(f"line {number}: a server line without an address")
    weight, flags = 1, set()
    for word in words[2:]:
        key, eq, value = word.partition("=")
        if eq and key == "weight":
            if not value.isdigit() or not 1 <= int(value) <= 1_000_000:
                raise ValueError(f"line {number}: weight {value[:20]!r} is not a weight")
            weight = int(value)
        elif not eq:
            flags.add(word)
    return name, Server(words[1], weight, "down" in flags, "backup" in flags)


def verify_url(text: str) -> str | None:
    """Where this host reaches `GET /fdngx/generation` of a site or standalone config: the `listen` of the
    server block that has that location (over plain HTTP, on a TLS port too: the template answers it); None
    for an upstream block (no server of its own)."""
    listen = None
    for line in text.splitlines():
        words = line.strip().rstrip(";").split()
        if words == ["server", "{"]:
            listen = None
        elif words[:1] == ["listen"] and len(words) >= 2 and listen is None:
            listen = words[1]
        elif words == ["location", "=", "/fdngx/generation", "{"] and listen is not None:
            try:
                return Listen.parse(listen, "listen").url("/fdngx/generation")
            except ValueError:
                return None
    return None


def served_generation(url: str, timeout: float) -> tuple[str | None, str]:
    """What nginx answers at `url` now: (the generation, None when it gave none; what happened, in words)."""
    body, words = get_generation(url, timeout)
    if body is None:
        return None, words
    return body[:64], f"answered generation {body[:64]}"
