"""Inventory (+ optional per-instance weights from the policy) -> nginx config text, from jinja2 templates.

Rendering is deterministic: servers sorted by name, integer weights, no timestamps, no absolute paths
that differ between runs. So "same text" means "nothing to reload", and golden files stay stable.
The generation id is a hash of the rendered text itself, served back by site/standalone configs so a
reload can be confirmed.

Input never becomes code: every value a template prints goes through the filter of its output syntax
(fdngx.nginx.escape): `arg` for an nginx directive argument, `nginx_string` for a quoted one (a user's
path, an error body), `lua` for a Lua literal. StrictUndefined turns a missing value into an error
instead of an empty string.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jinja2

from fdngx import __version__
from fdngx.domain import (
    Balancer,
    Flavor,
    Instance,
    Inventory,
    Listen,
    Mode,
    Role,
    ServerState,
    hostport,
    is_ip,
    natural_key,
)
from fdngx.errors import RenderError, UsageError
from fdngx.inventory import all_drained
from fdngx.nginx import frontdoor, luacode, openresty
from fdngx.nginx.build import HASH_SAFE_UPSTREAM
from fdngx.nginx.escape import EscapeError, lua_literal, nginx_arg, nginx_string
from fdngx.nginx.frontdoor import LOOPBACK_ALLOW, admin_allow_list
from fdngx.nginx.local import takes
from fdngx.nginx.shape import front_of
from fdngx.nginx.stamp import GENERATION_TOKEN, stamp_generation

MAX_WEIGHT = 10_000  # the same bound as the inventory's static weights
DEFAULT_LISTEN = Listen("127.0.0.1", 8080)
DEFAULT_ADMIN_LISTEN = Listen("127.0.0.1", 9401)
def _listen(value: Listen | str, what: str) -> Listen:
    if isinstance(value, Listen):
        return value
    try:
        return Listen.parse(value, what)
    except ValueError as exc:
        raise UsageError(str(exc)) from None


@dataclass(frozen=True)
class RenderOptions:
    """How to render. Strings given for the typed fields are parsed (and refused) at construction."""

    mode: Mode = Mode.UPSTREAM
    flavor: Flavor = Flavor.NGINX
    listen: Listen = DEFAULT_LISTEN
    template_dir: Path | None = None
    max_fails: int = 3
    # nginx tries a server it holds out again after this many seconds (whole seconds: 1 means 1-2 s); the
    # sidecar leaves a refused replica to this check, so it decides how soon a restarted one is used again.
    fail_timeout: int = 1
    keepalive: int = 64
    worker_processes: str = "auto"
    # Old workers keep serving open streams after a reload; this bounds how long they may linger.
    worker_shutdown_timeout: str = "10m"
    read_timeout: str = "1h"
    connect_timeout: str = "5s"
    client_max_body_size: str = "64m"
    # A prompt up to this size stays in memory (larger ones go to a temp file, one write per request).
    client_body_buffer_size: str = "1m"
    # OpenResty flavor: where the sidecar pushes weights, the token it must show, how the Lua picks.
    admin_listen: Listen = DEFAULT_ADMIN_LISTEN
    admin_allow: tuple[str, ...] = LOOPBACK_ALLOW
    admin_token_file: str = ""
    # The replicas reach the Lua balancer as data: this file (written beside the config) at start and
    # reload, then pushes. The Lua modules load from lua_dir (default: the ones shipped with fdngx).
    peers_file: str = ""
    lua_dir: str = ""
    balancer_mode: Balancer = Balancer.LEAST
    # The Lua balancer's shared dict (fdngx.pool): the snapshot in force and the one being pushed, and a few
    # keys a replica plus one per worker with requests open on it. A full one refuses a push whole (507) and
    # leaves requests uncounted, never evicting; a new size takes effect at a reload, with a fresh dict.
    lua_dict_size: str = "16m"
    # standalone + openresty on Debian's nginx: the dynamic modules to load (OpenResty has them built in).
    lua_modules: tuple[str, ...] = ()
    # None: logs/access.log under the prefix (standalone) or /var/log/nginx/<upstream>.access.log (site).
    access_log: str | None = None
    access_log_format: frontdoor.AccessLogFormat = frontdoor.AccessLogFormat.TEXT
    # The front door (site/standalone; fdngx.nginx.frontdoor): TLS with HTTP/2, API keys, rate limits.
    tls_cert: str = ""
    tls_key: str = ""
    # The keys file the user wrote; the 0600 key map beside the config (written by fdngx) and its version.
    api_keys_file: str = ""
    api_keys_map: str = ""
    api_keys_version: str = ""
    api_keys_forward: bool = True
    rate_limit: str = ""  # nginx's `10r/s` or `600r/m`; '' = off
    rate_burst: int | None = None  # None: one second's worth
    # No instances is a fleet, not a mistake: the registry fills it (`fdngx sidecar --registry-listen`). The
    # upstream then holds one placeholder server marked down, so nginx answers 503 + Retry-After until the first
    # instance registers. Otherwise an empty inventory is refused (a config without replicas is never useful).
    allow_empty: bool = False

    def __post_init__(self) -> None:
        def coerce(name: str, kind: type, what: str) -> None:
            value = getattr(self, name)
            try:
                object.__setattr__(self, name, kind(value))
            except ValueError:
                allowed = ", ".join(m.value for m in kind)  # type: ignore[attr-defined]
                raise UsageError(f"{what} {value!r} is not one of {allowed}") from None

        coerce("mode", Mode, "--mode")
        coerce("flavor", Flavor, "--flavor")
        coerce("balancer_mode", Balancer, "--balancer")
        coerce("access_log_format", frontdoor.AccessLogFormat, "--access-log-format")
        object.__setattr__(self, "rate_limit", frontdoor.rate(self.rate_limit))
        object.__setattr__(self, "listen", _listen(self.listen, "--listen"))
        object.__setattr__(self, "admin_listen", _listen(self.admin_listen, "--admin-listen"))
        object.__setattr__(self, "admin_allow", admin_allow_list(self.admin_allow))

    def validated(self) -> RenderOptions:
        """Every value that lands in the config, checked as nginx reads it (fdngx.nginx.frontdoor, escape); raises
        UsageError naming the option and the value."""
        frontdoor.check_upstream(self.max_fails, self.fail_timeout, self.keepalive, self.worker_processes)
        for what, value in (("worker_shutdown_timeout", self.worker_shutdown_timeout),
                            ("--read-timeout", self.read_timeout), ("--connect-timeout", self.connect_timeout)):
            frontdoor.check_time(what, value)
        frontdoor.check_size("--client-max-body-size", self.client_max_body_size, units="kmg")
        frontdoor.check_size("--client-body-buffer-size", self.client_body_buffer_size, least=1,
                             most=frontdoor.MAX_BODY_BUFFER)
        frontdoor.check_access_log(self.access_log)
        frontdoor.check_size("--lua-dict-size", self.lua_dict_size, least=frontdoor.MIN_LUA_DICT,
                             most=frontdoor.MAX_LUA_DICT)
        for what, value in (("--admin-token-file", self.admin_token_file),
                            ("peers file", self.peers_file), ("Lua module directory", self.lua_dir),
                            *(("lua module", m) for m in self.lua_modules)):
            frontdoor.check_plain_path(what, value)
        self._validate_front_door()
        served = self.mode is not Mode.UPSTREAM
        if self.flavor is Flavor.OPENRESTY and served and self.listen.overlaps(self.admin_listen):
            # nginx -t only warns ("conflicting server name"); the reload then answers clients from the admin
            # server (404) until the apply's confirmation rolls back
            raise UsageError(f"--admin-listen {self.admin_listen} and --listen {self.listen} share a port: give "
                             "the balancer's admin endpoint a port of its own")
        return self

    def listeners(self) -> list[tuple[str, Listen]]:
        """What nginx binds for this config, by option: its server (not in upstream mode), the balancer's admin."""
        return ([("--listen", self.listen)] if self.mode is not Mode.UPSTREAM else []) + (
            [("--admin-listen", self.admin_listen)] if self.flavor is Flavor.OPENRESTY else [])

    def _validate_front_door(self) -> None:
        frontdoor.check_tls(self.tls_cert, self.tls_key)
        frontdoor.check_path("--tls-cert", self.tls_cert)
        frontdoor.check_path("--tls-key", self.tls_key)
        frontdoor.check_path("--api-keys-file", self.api_keys_file)
        frontdoor.check_path("API key map", self.api_keys_map, include=True)
        frontdoor.check_version(self.api_keys_version)
        frontdoor.check_rate(self.rate_limit, self.rate_burst)
        if not isinstance(self.api_keys_forward, bool):
            raise UsageError("--api-keys-forward is a flag")
        if self.mode is Mode.UPSTREAM:
            given = [name for name, on in (("--tls-cert", self.tls_cert), ("--api-keys-file", self.api_keys_file),
                                           ("--rate-limit", self.rate_limit)) if on]
            if given:
                raise UsageError(f"{', '.join(given)}: only for --mode site or standalone (an upstream block has "
                                 "no server to guard)")


def default_access_log(mode: Mode, upstream: str) -> str:
    return "logs/access.log" if mode is Mode.STANDALONE else f"/var/log/nginx/{upstream}.access.log"


def builtin_template_dir() -> Path:
    """templates/ ships inside the wheel as fdngx/templates; in a source checkout it sits beside fdngx/."""
    here = Path(__file__).resolve().parent.parent
    for candidate in (here / "templates", here.parent / "templates"):
        if (candidate / "upstream.conf.j2").is_file():
            return candidate
    raise RenderError(f"built-in templates not found next to {here} (broken install? reinstall fdngx)")


def default_peers_file(token_file: str) -> str:
    """The peers file beside the admin token: `.NAME.fdngx-admin-token` -> `.NAME.fdngx-peers` (fdngx render
    names both after --out and passes both; this serves a caller that gives only the token file)."""
    stem = token_file.removesuffix("-admin-token")
    return f"{stem}-peers" if stem != token_file else f"{token_file}.fdngx-peers"


def lua_path(opts: RenderOptions) -> list[str]:
    """Where `require("fdngx.balancer")` looks, in order: a --template-dir's lua/ (to override a module),
    then opts.lua_dir or the modules shipped with fdngx."""
    dirs: list[str] = []
    if opts.template_dir is not None and (Path(opts.template_dir) / "lua").is_dir():
        dirs.append(str((Path(opts.template_dir) / "lua").absolute()))
    dirs.append(opts.lua_dir or str(builtin_template_dir() / "lua"))
    return dirs


def _environment(template_dir: Path | None) -> jinja2.Environment:
    loaders: list[jinja2.BaseLoader] = []
    if template_dir is not None:
        if not Path(template_dir).is_dir():
            raise UsageError(f"--template-dir {Path(template_dir).absolute()}: not a directory")
        loaders.append(jinja2.FileSystemLoader(str(template_dir)))
    loaders.append(jinja2.FileSystemLoader(str(builtin_template_dir())))
    env = jinja2.Environment(
        loader=jinja2.ChoiceLoader(loaders),
        undefined=jinja2.StrictUndefined,
        autoescape=False,
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
        # Ours are read once: a running sidecar keeps rendering with the templates of its own version while a
        # newer fdngx is installed under it (a new template could need a value the old code never passes).
        auto_reload=template_dir is not None,
    )
    env.filters["arg"] = nginx_arg
    env.filters["lua"] = lua_literal
    env.filters["nginx_string"] = nginx_string
    return env


@functools.cache
def _builtin_environment() -> jinja2.Environment:
    return _environment(None)


def environment(template_dir: Path | None) -> jinja2.Environment:
    # A user's template dir is re-read on every render (the sidecar must pick up edits); ours are read once.
    return _environment(template_dir) if template_dir is not None else _builtin_environment()


def _server(inst: Instance, state: ServerState | None) -> dict[str, Any]:
    weight = state.weight if state is not None else inst.weight
    # A drained replica is held out like one the sidecar holds out: `down` keeps it in the config, so the
    # old workers' streams on it finish through the graceful reload; no new request goes there.
    down = inst.drain or (bool(state.down) if state is not None else False)
    return {
        "name": inst.name,
        "address": inst.address,
        "host": inst.host,
        "port": inst.port,
        "weight": max(1, min(MAX_WEIGHT, int(weight))),
        "down": down,
        "backup": bool(state.backup) if state is not None and not down else False,
        "max_num_seqs": inst.max_num_seqs,
        "engine": inst.engine.value,
        "role": inst.role.value,
    }


def context(inv: Inventory, opts: RenderOptions, states: Mapping[str, ServerState] | None = None) -> dict[str, Any]:
    states = states or {}
    servers = [_server(i, states.get(i.name)) for i in sorted(inv.instances, key=lambda i: natural_key(i.name))]
    return {
        "version": __version__,
        "upstream": inv.upstream,
        "long_upstream": len(inv.upstream) > HASH_SAFE_UPSTREAM,
        "servers": servers,
        # Shared-memory zone for least_conn/max_fails across workers: ~1 KiB a server is ample.
        "zone_kb": 256 + len(servers),
        "mode": opts.mode.value,
        "front": front_of(opts).line,  # the header line an apply compares (fdngx.nginx.shape)
        "flavor": opts.flavor.value,
        "listen": str(opts.listen),
        "listen_host": opts.listen.reach_host,
        # fdngx on this host reaches a specific listen address from that address, not from loopback.
        "listen_allow": (opts.listen.reach_host if is_ip(opts.listen.reach_host)
                         and opts.listen.reach_host not in ("127.0.0.1", "::1") else None),
        "listen_port": opts.listen.port,
        "max_fails": opts.max_fails,
        "fail_timeout": opts.fail_timeout,
        "keepalive": opts.keepalive,
        "worker_processes": opts.worker_processes,
        "worker_shutdown_timeout": opts.worker_shutdown_timeout,
        "read_timeout": opts.read_timeout,
        "connect_timeout": opts.connect_timeout,
        "client_max_body_size": opts.client_max_body_size,
        "client_body_buffer_size": opts.client_body_buffer_size,
        "admin_token_file": opts.admin_token_file,
        "peers_file": opts.peers_file or default_peers_file(opts.admin_token_file),
        "lua_path": lua_path(opts) if opts.flavor is Flavor.OPENRESTY else [],
        "lua_digest": luacode.digest(tuple(lua_path(opts))) if opts.flavor is Flavor.OPENRESTY else "",
        "admin_listen": str(opts.admin_listen),
        "admin_allow": list(opts.admin_allow),
        "balancer_mode": opts.balancer_mode.value,
        "lua_dict_size": opts.lua_dict_size,
        "lua_modules": list(opts.lua_modules) if opts.flavor is Flavor.OPENRESTY else [],
        "access_log": opts.access_log or default_access_log(opts.mode, inv.upstream),
        **front_door(opts),
        "generation": GENERATION_TOKEN,
    }


def front_door(opts: RenderOptions) -> dict[str, Any]:
    """What site and standalone configs answer themselves, and what guards them (fdngx.nginx.frontdoor)."""
    api_keys = None
    if opts.api_keys_map:
        api_keys = {"map": opts.api_keys_map, "version": opts.api_keys_version or "unwritten",
                    "forward": opts.api_keys_forward}
    rate_limit = None
    if opts.rate_limit:
        burst = opts.rate_burst if opts.rate_burst is not None else frontdoor.default_burst(opts.rate_limit)
        rate_limit = {"rate": opts.rate_limit, "burst": burst, "by_key": api_keys is not None}
    return {
        "access_log_format": opts.access_log_format.value,
        "tls": {"cert": opts.tls_cert, "key": opts.tls_key} if opts.tls_cert else None,
        "api_keys": api_keys,
        "rate_limit": rate_limit,
        "error_pages": [
            {"status": e.status, "body": e.body(), "retry_after": e.retry_after}
            for e in frontdoor.error_pages(opts.client_max_body_size)
        ],
        "plain_http": {"status": frontdoor.PLAIN_HTTP.status, "body": frontdoor.PLAIN_HTTP.body()},
    }


def check_renderable(inv: Inventory, opts: RenderOptions) -> None:
    """What a valid inventory may still not do in this flavor; raises RenderError naming the instance."""
    check_fleet(inv, opts)
    if opts.api_keys_file and not opts.api_keys_map:
        # Never render an open door for a user who asked for keys: the key map is written before the render.
        raise RenderError("--api-keys-file: the key map was not prepared (fdngx render and sidecar write it "
                          "beside --out)")
    if opts.flavor is Flavor.OPENRESTY and not opts.admin_token_file:
        raise RenderError("openresty flavor: no admin token file (fdngx render creates one beside --out)")


def check_fleet(inv: Inventory, opts: RenderOptions, *, local: bool = True) -> None:
    """What nginx cannot be given of this inventory in this flavor, whether rendered or pushed (a controller
    checks a new inventory with it and keeps the one in force: one file must not empty or stop N frontends);
    `local`: an nginx of this host serves it (its --listen must not take a replica's port). RenderError names
    the instance."""
    if not inv.instances and not opts.allow_empty:
        where = " + ".join(inv.sources) or "inventory"
        raise RenderError(f"{where}: no instances to render (nginx needs at least one server; only a sidecar "
                          "with --registry-listen renders an empty fleet, which answers 503 until one registers)")
    if (drained := all_drained(inv)) is not None:
        raise RenderError(drained)
    if local:
        _check_listen_not_a_replica(inv, opts)
    for inst in inv.instances:
        if inst.role is not Role.MIXED:
            raise RenderError(
                f"instance '{inst.name}': role '{inst.role}' cannot share a plain upstream with mixed instances "
                "(a prefill- or decode-only instance must not get plain requests); see docs/fastdeploy.md"
            )
    if opts.flavor is Flavor.OPENRESTY:
        # balancer_by_lua's set_current_peer takes addresses only; nginx resolves names at load time.
        for inst in inv.instances:
            if (why := openresty.host_refusal(inst.name, inst.host)) is not None:
                raise RenderError(why)


def _check_listen_not_a_replica(inv: Inventory, opts: RenderOptions) -> None:
    """A --listen (or the balancer's --admin-listen) on a replica's own address or metrics address: nginx would
    proxy to itself, or be scraped as the replica, or one of them could not bind (the reload would fail)."""
    ours = opts.listeners()
    for inst in inv.instances:  # a replica on another host may well use the same port
        # a registration's metrics port is the registry's guess (--registry-metrics-port), never a reason to
        # stop every apply; its own port cannot be ours (the registry refuses it: RegistrySettings.own_listener)
        metrics = () if inst.extra.get("registered") is True else (("serves metrics at", inst.metrics_port),)
        for what, port in (("is at", inst.port), *metrics):
            for flag, listen in ours:
                if takes(listen, inst.host, port):
                    itself = " (and proxy to itself)" if flag == "--listen" and port == inst.port else ""
                    raise RenderError(f"instance '{inst.name}' {what} {hostport(inst.host, port)}, where {flag} "
                                      f"{listen} would have nginx take its port{itself}")


def render(inv: Inventory, opts: RenderOptions, states: Mapping[str, ServerState] | None = None) -> str:
    """Render the config for `opts.mode`; raises RenderError with the template's file and line."""
    opts = opts.validated()
    check_renderable(inv, opts)
    name = f"{opts.mode.value}.conf.j2"
    env = environment(opts.template_dir)
    try:
        text = env.get_template(name).render(context(inv, opts, states))
    except jinja2.TemplateSyntaxError as exc:
        raise RenderError(f"template {exc.filename or exc.name}:{exc.lineno}: {exc.message}") from None
    except jinja2.TemplateNotFound as exc:
        raise RenderError(f"template {exc.name} not found (template dir: {opts.template_dir or 'built-in'})") from None
    except jinja2.UndefinedError as exc:
        raise RenderError(f"template {name}: {exc.message}") from None
    except EscapeError as exc:
        raise RenderError(f"template {name}: {exc}") from None
    return stamp_generation(text)
