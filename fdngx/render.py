"""Inventory (+ optional per-instance weights from the policy) -> nginx config text, from jinja2 templates.

Rendering is deterministic: servers sorted by name, integer weights, no timestamps, no absolute paths
that differ between runs. So "same text" means "nothing to reload", and golden files stay stable.
The generation id is a hash of the rendered text itself, served back by site/standalone configs so a
reload can be confirmed.
"""

from __future__ import annotations

import functools
import hashlib
import ipaddress
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jinja2

from fdngx import __version__
from fdngx.errors import RenderError, UsageError
from fdngx.inventory import Instance, Inventory

MODES = ("upstream", "site", "standalone")
FLAVORS = ("nginx", "openresty")
GENERATION_TOKEN = "@@FDNGX_GENERATION@@"
_LISTEN = re.compile(r"^(?:(?P<host>\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9.-]+):)?(?P<port>\d{1,5})$")


@dataclass(frozen=True)
class ServerState:
    """What the policy decided for one instance: overrides the inventory's static weight."""

    weight: int
    down: bool = False


@dataclass(frozen=True)
class RenderOptions:
    mode: str = "upstream"
    flavor: str = "nginx"
    listen: str = "127.0.0.1:8080"
    template_dir: Path | None = None
    max_fails: int = 3
    fail_timeout: int = 3
    keepalive: int = 64
    worker_processes: str = "auto"
    # Old workers keep serving open streams after a reload; this bounds how long they may linger.
    worker_shutdown_timeout: str = "10m"
    read_timeout: str = "1h"
    client_max_body_size: str = "64m"
    # OpenResty flavor: where the sidecar pushes weights, the token it must show, how the Lua picks.
    admin_listen: str = "127.0.0.1:9401"
    admin_token_file: str = ""
    balancer_mode: str = "least"
    # standalone + openresty on Debian's nginx: the dynamic modules to load (OpenResty has them built in).
    lua_modules: tuple[str, ...] = ()
    # None: logs/access.log under the prefix (standalone) or /var/log/nginx/<upstream>.access.log (site).
    access_log: str | None = None
    extra: Mapping[str, Any] = field(default_factory=dict)

    def validated(self) -> RenderOptions:
        if self.mode not in MODES:
            raise UsageError(f"--mode '{self.mode}' is not one of {', '.join(MODES)}")
        if self.flavor not in FLAVORS:
            raise UsageError(f"--flavor '{self.flavor}' is not one of {', '.join(FLAVORS)}")
        parse_listen(self.listen)
        if self.flavor == "openresty":
            parse_listen(self.admin_listen)
            if self.admin_token_file and not re.fullmatch(r"[A-Za-z0-9_./@:+-]+", self.admin_token_file):
                raise UsageError(f"--admin-token-file '{self.admin_token_file}': use a plain path, no spaces or quotes")
            if self.balancer_mode not in ("least", "p2c"):
                raise UsageError(f"--balancer '{self.balancer_mode}' is not one of least, p2c")
        if self.max_fails < 0 or self.fail_timeout < 1 or self.keepalive < 0:
            raise UsageError("--max-fails >= 0, --fail-timeout >= 1 and --keepalive >= 0 are required")
        return self


def parse_listen(listen: str) -> tuple[str, int]:
    """`ADDR:PORT` or `PORT` -> (host to reach it from this machine, port)."""
    m = _LISTEN.match(listen.strip())
    port = int(m.group("port")) if m else 0
    if not m or not 1 <= port <= 65535:
        raise UsageError(f"--listen '{listen}' must be ADDR:PORT or PORT (e.g. 127.0.0.1:8080)")
    host = (m.group("host") or "127.0.0.1").strip("[]")
    if host in ("0.0.0.0", "*"):
        host = "127.0.0.1"
    elif host == "::":
        host = "::1"
    return host, port


def default_access_log(mode: str, upstream: str) -> str:
    return "logs/access.log" if mode == "standalone" else f"/var/log/nginx/{upstream}.access.log"


def natural_key(name: str) -> list[Any]:
    """dp2 sorts before dp10."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


def builtin_template_dir() -> Path:
    """templates/ ships inside the wheel as fdngx/templates; in a source checkout it sits beside fdngx/."""
    here = Path(__file__).resolve().parent
    for candidate in (here / "templates", here.parent / "templates"):
        if (candidate / "upstream.conf.j2").is_file():
            return candidate
    raise RenderError(f"built-in templates not found next to {here} (broken install? reinstall fdngx)")


def _environment(template_dir: Path | None) -> jinja2.Environment:
    loaders: list[jinja2.BaseLoader] = []
    if template_dir is not None:
        if not Path(template_dir).is_dir():
            raise UsageError(f"--template-dir {template_dir}: not a directory")
        loaders.append(jinja2.FileSystemLoader(str(template_dir)))
    loaders.append(jinja2.FileSystemLoader(str(builtin_template_dir())))
    return jinja2.Environment(
        loader=jinja2.ChoiceLoader(loaders),
        undefined=jinja2.StrictUndefined,
        autoescape=False,
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
    )


@functools.cache
def _builtin_environment() -> jinja2.Environment:
    return _environment(None)


def environment(template_dir: Path | None) -> jinja2.Environment:
    # A user's template dir is re-read on every render (the sidecar must pick up edits), ours is cached.
    return _environment(template_dir) if template_dir is not None else _builtin_environment()


def _server(inst: Instance, state: ServerState | None) -> dict[str, Any]:
    weight = state.weight if state is not None else inst.weight
    return {
        "name": inst.name,
        "address": inst.address,
        "host": inst.host,
        "port": inst.port,
        "weight": max(1, int(weight)),
        "down": bool(state.down) if state is not None else False,
        "max_num_seqs": inst.max_num_seqs,
        "engine": inst.engine,
        "role": inst.role,
    }


def context(inv: Inventory, opts: RenderOptions, states: Mapping[str, ServerState] | None = None) -> dict[str, Any]:
    states = states or {}
    servers = [_server(i, states.get(i.name)) for i in sorted(inv.instances, key=lambda i: natural_key(i.name))]
    listen_host, listen_port = parse_listen(opts.listen)
    return {
        "version": __version__,
        "upstream": inv.upstream,
        "servers": servers,
        # Shared-memory zone for least_conn/max_fails across workers: ~1 KiB a server is ample.
        "zone_kb": 256 + len(servers),
        "mode": opts.mode,
        "flavor": opts.flavor,
        "listen": opts.listen,
        "listen_host": listen_host,
        "listen_port": listen_port,
        "max_fails": opts.max_fails,
        "fail_timeout": opts.fail_timeout,
        "keepalive": opts.keepalive,
        "worker_processes": opts.worker_processes,
        "worker_shutdown_timeout": opts.worker_shutdown_timeout,
        "read_timeout": opts.read_timeout,
        "client_max_body_size": opts.client_max_body_size,
        "admin_token_file": opts.admin_token_file,
        "admin_listen": opts.admin_listen,
        "balancer_mode": opts.balancer_mode,
        "lua_modules": list(opts.lua_modules) if opts.flavor == "openresty" else [],
        "access_log": opts.access_log or default_access_log(opts.mode, inv.upstream),
        "generation": GENERATION_TOKEN,
        **dict(opts.extra),
    }


def render(inv: Inventory, opts: RenderOptions, states: Mapping[str, ServerState] | None = None) -> str:
    """Render the config for `opts.mode`; raises RenderError with the template's file and line."""
    opts = opts.validated()
    if not inv.instances:
        where = " + ".join(inv.sources) or "inventory"
        raise RenderError(f"{where}: no instances to render (nginx needs at least one server)")
    if opts.flavor == "openresty":
        if not opts.admin_token_file:
            raise RenderError("openresty flavor: no admin token file (fdngx render creates one beside --out)")
        # balancer_by_lua's set_current_peer takes addresses only; nginx resolves names at load time.
        for inst in inv.instances:
            try:
                ipaddress.ip_address(inst.host)
            except ValueError:
                raise RenderError(
                    f"instance '{inst.name}': the openresty flavor needs an IP address, not host '{inst.host}'"
                ) from None
    name = f"{opts.mode}.conf.j2"
    env = environment(opts.template_dir)
    try:
        text = env.get_template(name).render(context(inv, opts, states))
    except jinja2.TemplateSyntaxError as exc:
        raise RenderError(f"template {exc.filename or exc.name}:{exc.lineno}: {exc.message}") from None
    except jinja2.TemplateNotFound as exc:
        raise RenderError(f"template {exc.name} not found (template dir: {opts.template_dir or 'built-in'})") from None
    except jinja2.UndefinedError as exc:
        raise RenderError(f"template {name}: {exc.message}") from None
    return stamp_generation(text)


def stamp_generation(text: str) -> str:
    """Replace the generation placeholder by a hash of the text around it (so it is stable)."""
    return text.replace(GENERATION_TOKEN, generation_of(text))


def generation_of(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:12]
