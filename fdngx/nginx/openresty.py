"""The OpenResty flavor's side channel: the admin token, Lua module discovery, and weight pushes.

With this flavor nginx's config only changes when the inventory does; weights, down states and scraped
load go to the Lua balancer's shared dict through a loopback-only, token-protected admin location.
"""

from __future__ import annotations

import math
import secrets
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import requests

from fdngx.domain import Listen, LoadSample, ServerState
from fdngx.errors import ApplyError
from fdngx.system.files import atomic_write, check_private, read_regular_file, real_target

DEBIAN_MODULES = (
    Path("/usr/lib/nginx/modules/ndk_http_module.so"),
    Path("/usr/lib/nginx/modules/ngx_http_lua_module.so"),
)
MAX_WEIGHT = 10_000
MAX_LOAD = 1e6  # requests on one replica; anything above is a broken scrape, not load


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
    check_private(path, "openresty admin token")
    try:
        token = read_token(path)
        if token:
            return token
    except ApplyError:
        if path.exists():
            raise
    token = secrets.token_urlsafe(24)
    atomic_write(path, token + "\n", mode=0o600)
    return token


def lua_modules(binary: str | None) -> tuple[str, ...]:
    """Debian's nginx needs the Lua modules loaded by a standalone config; OpenResty has them built in."""
    if binary and "openresty" in binary:
        return ()
    if all(p.exists() for p in DEBIAN_MODULES):
        return tuple(str(p) for p in DEBIAN_MODULES)
    return ()


def loads_of(samples: Mapping[str, LoadSample]) -> dict[str, float]:
    """Scraped load of every healthy, readable replica (what the OpenResty balancer is told)."""
    return {name: s.load for name, s in samples.items() if s.ok and s.healthy}


def push_body(states: Mapping[str, ServerState], loads: Mapping[str, float]) -> str:
    """The admin POST body: one `name weight down load` line per peer, every value bounded."""
    lines = []
    for name, s in sorted(states.items()):
        weight = max(1, min(MAX_WEIGHT, int(s.weight)))
        load = float(loads.get(name, 0.0))
        load = min(MAX_LOAD, load) if math.isfinite(load) and load > 0 else 0.0
        lines.append(f"{name} {weight} {1 if s.down else 0} {load:.3f}\n")
    return "".join(lines)


@dataclass(frozen=True)
class Admin:
    """Client for the Lua balancer's admin location."""

    listen: Listen
    token: str
    timeout: float = 2.0

    @property
    def url(self) -> str:
        return self.listen.url("/fdngx/peers")

    def push(self, states: Mapping[str, ServerState], loads: Mapping[str, float] | None = None,
             session: requests.Session | None = None) -> int:
        """Send weights, down flags and scraped load (running + queued); returns how many peers took it."""
        body = push_body(states, loads or {})
        http = session or requests
        try:
            resp = http.post(self.url, data=body, headers={"X-Fdngx-Token": self.token}, timeout=self.timeout)
        except requests.RequestException as exc:
            raise ApplyError(f"openresty admin {self.url}: {exc}") from None
        if resp.status_code != 200:
            raise ApplyError(f"openresty admin {self.url}: HTTP {resp.status_code} {resp.text.strip()[:200]}")
        try:
            return int(resp.text.split()[1])
        except (IndexError, ValueError):
            raise ApplyError(f"openresty admin {self.url}: unexpected answer {resp.text[:200]!r}") from None


def read_token(path: Path) -> str:
    try:
        return read_regular_file(path, 4096).decode("utf-8", "replace").strip()
    except OSError as exc:
        raise ApplyError(f"{path}: cannot read the openresty admin token ({exc.strerror or exc}); "
                         "render with --flavor openresty first") from None
