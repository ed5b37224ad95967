"""Which address the replicas listen on, which one the inventory names, and FastDeploy's router self-check.

A FastDeploy instance started with `--router URL` registers itself only after its own health check
passes, and that check does not use the address it listens on: it GETs
`http://{gethostbyname(gethostname())}:{port}/health` (fastdeploy/engine/register_manager.py,
`_register_to_router`; the address is RouterConfig.api_server_host = utils.get_host_ip() in
fastdeploy/config.py and fastdeploy/utils.py). An instance bound to 127.0.0.1 on a host whose name resolves
to 127.0.1.1 (Debian's default) or a LAN address never passes it, and never registers. So with --router
fdngx listens on every address by default and names the resolved address in the inventory.

Pure: the resolver is passed in, so the decision is tested without touching the network.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Callable
from dataclasses import dataclass
from urllib.parse import urlsplit

from fdngx.domain import is_ip, valid_host
from fdngx.errors import UsageError

WILDCARDS = ("0.0.0.0", "::")
DEFAULT_HOST = "127.0.0.1"


@dataclass(frozen=True)
class SelfName:
    """This machine's name and what FastDeploy resolves it to (None when it does not resolve)."""

    name: str
    address: str | None
    error: str | None = None


Resolver = Callable[[], SelfName]


def resolve_self() -> SelfName:
    """FastDeploy's get_host_ip(): socket.gethostbyname(socket.gethostname()) (fastdeploy/utils.py)."""
    name = socket.gethostname()
    try:
        return SelfName(name, socket.gethostbyname(name))
    except OSError as exc:
        return SelfName(name, None, getattr(exc, "strerror", None) or str(exc))


@dataclass(frozen=True)
class Binding:
    bind: str  # --host given to the engine: where the replicas listen
    advertise: str  # the inventory's host: where nginx and other nodes connect
    warnings: tuple[str, ...] = ()


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    return is_ip(host) and ipaddress.ip_address(host).is_loopback


def router_url(router: str) -> str:
    """The router URL as FastDeploy uses it: `http://` added when no scheme is given (RouterConfig)."""
    text = router.strip()
    if not text or any(c.isspace() for c in text):
        raise UsageError(f"--router {router!r} must be a URL like http://10.0.0.5:9000 or 10.0.0.5:9000")
    url = text if text.startswith(("http://", "https://")) else f"http://{text}"
    try:
        host = urlsplit(url).hostname
    except ValueError:
        host = None
    if not host:
        raise UsageError(f"--router {router!r} must be a URL like http://10.0.0.5:9000 or 10.0.0.5:9000")
    return url


def decide(host: str | None, advertise: str | None, router: str | None, resolve: Resolver) -> Binding:
    """Where to listen and what to advertise; warnings are one line each, for stderr before the launch."""
    for flag, value in (("--host", host), ("--advertise-host", advertise)):
        if value is not None and not valid_host(value):
            raise UsageError(f"{flag} {value!r} is not an IP address or RFC 1123 hostname")
    if advertise is not None and advertise in WILDCARDS:
        raise UsageError(f"--advertise-host {advertise}: the inventory needs an address others connect to, not a "
                         "wildcard; use --host for the listen address")
    if router is None:
        bind = host or DEFAULT_HOST
        warnings = []
        if advertise is not None and _loopback(bind) and not _loopback(advertise):
            warnings.append(f"--advertise-host {advertise} but the replicas listen on {bind} only: nothing but this "
                            f"machine can reach them (use --host 0.0.0.0 or --host {advertise})")
        return Binding(bind, advertise or bind, tuple(warnings))

    url = router_url(router)
    me = resolve()
    if me.address is None:
        raise UsageError(
            f"--router: FastDeploy registers this machine by gethostbyname(gethostname()), and {me.name!r} does not "
            f"resolve ({me.error}): add it to /etc/hosts"
        )
    bind = host or "0.0.0.0"
    warnings = []
    if bind not in WILDCARDS and is_ip(bind) and bind != me.address:
        warnings.append(
            f"--host {bind}: FastDeploy checks http://{me.address}:PORT/health before it registers with the router "
            f"({me.name} resolves to {me.address}) and that address does not reach a server bound to {bind}, so no "
            f"replica will ever register: use --host 0.0.0.0 or --host {me.address}"
        )
    router_host = urlsplit(url).hostname or ""
    if _loopback(me.address) and not _loopback(router_host):
        warnings.append(
            f"--router {router}: FastDeploy registers host_ip {me.address} ({me.name} resolves to a loopback "
            f"address), which FastDeploy's own router on {router_host} cannot reach (fdngx's registry uses the "
            f"address a registration comes from instead): map {me.name} to this machine's LAN address in /etc/hosts"
        )
    chosen = advertise or (bind if bind not in WILDCARDS else me.address)
    return Binding(bind, chosen, tuple(warnings))
