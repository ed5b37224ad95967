"""The OpenResty flavor's side channel: the admin token, Lua module discovery, and weight pushes.

With this flavor nginx's config only changes when the inventory does; weights, down states and scraped
load go to the Lua balancer's shared dict through a loopback-only, token-protected admin location.
"""

from __future__ import annotations

import secrets
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import requests

from fdngx.errors import ApplyError
from fdngx.fsutil import atomic_write
from fdngx.render import ServerState, parse_listen

DEBIAN_MODULES = (
    Path("/usr/lib/nginx/modules/ndk_http_module.so"),
    Path("/usr/lib/nginx/modules/ngx_http_lua_module.so"),
)


def token_path(out: Path | None) -> Path:
    """The admin token lives beside the config it guards (or in the working directory for stdout)."""
    base = out.parent if out is not None else Path(".")
    return base / "fdngx-admin.token"


def ensure_token(path: Path) -> str:
    """Read the token, creating a random one (mode 0600) the first time: stable, so renders stay identical."""
    try:
        token = path.read_text().strip()
        if token:
            return token
    except FileNotFoundError:
        pass
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


@dataclass(frozen=True)
class Admin:
    """Client for the Lua balancer's admin location."""

    listen: str
    token: str
    timeout: float = 2.0

    @property
    def url(self) -> str:
        host, port = parse_listen(self.listen)
        return f"http://{'[' + host + ']' if ':' in host else host}:{port}/fdngx/peers"

    def push(self, states: Mapping[str, ServerState], loads: Mapping[str, float] | None = None,
             session: requests.Session | None = None) -> int:
        """Send weights, down flags and scraped load (running + queued); returns how many peers took it."""
        loads = loads or {}
        body = "".join(
            f"{name} {max(1, int(s.weight))} {1 if s.down else 0} {max(0.0, float(loads.get(name, 0.0))):.3f}\n"
            for name, s in sorted(states.items())
        )
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

    def peers(self) -> dict[str, dict[str, float]]:
        """What the balancer holds now: weight, down, in-flight, score per peer."""
        try:
            resp = requests.get(self.url, headers={"X-Fdngx-Token": self.token}, timeout=self.timeout)
        except requests.RequestException as exc:
            raise ApplyError(f"openresty admin {self.url}: {exc}") from None
        if resp.status_code != 200:
            raise ApplyError(f"openresty admin {self.url}: HTTP {resp.status_code}")
        out: dict[str, dict[str, float]] = {}
        for line in resp.text.splitlines():
            name, weight, down, inflight, score = line.split()
            out[name] = {"weight": float(weight), "down": float(down), "inflight": float(inflight),
                         "score": float(score)}
        return out


def read_token(path: Path) -> str:
    try:
        return path.read_text().strip()
    except OSError as exc:
        raise ApplyError(f"{path}: cannot read the openresty admin token ({exc.strerror}); "
                         "render with --flavor openresty first") from None

