"""Is an address this machine's own; would a listener of fdngx's take a replica's address (render: a --listen on
a local replica's port; the registry: a registration at one of fdngx's own listeners)."""

from __future__ import annotations

import ipaddress
import socket

from fdngx.domain import Listen, address_key, is_ip


def on_this_host(host: str) -> bool:
    """Is `host` an address of this machine: `localhost`, a loopback or wildcard address, or one the routing
    table says is local (a UDP socket `connect()`ed to it takes it as its own source address; nothing is
    sent); a second address of a subnet (routed from its first) is asked of bind(), but only where
    ip_nonlocal_bind is 0: with it on (VRRP front doors) any address binds, so such an address is not taken as
    local. Asked each time (addresses come and go under a long-running sidecar). Other names are not looked
    up: False."""
    if not is_ip(host):
        return host.lower().rstrip(".") == "localhost"
    ip = ipaddress.ip_address(address_key(host, 0)[0])
    if ip.is_loopback or ip.is_unspecified:
        return True
    family = socket.AF_INET6 if ip.version == 6 else socket.AF_INET
    try:
        with socket.socket(family, socket.SOCK_DGRAM) as s:
            s.connect((str(ip), 9))
            if ipaddress.ip_address(s.getsockname()[0]) == ip:
                return True
    except (OSError, ValueError):
        return False
    # A second address of a subnet is routed from its first: ask bind(), which is exact unless any address binds
    try:
        with open(f"/proc/sys/net/ipv{ip.version}/ip_nonlocal_bind", "rb") as fh:
            if fh.read().strip() != b"0":
                return False
        with socket.socket(family, socket.SOCK_DGRAM) as s:
            s.bind((str(ip), 0))
    except OSError:
        return False
    return True


def takes(listen: Listen, host: str, port: int) -> bool:
    """Would `listen`, on this machine, take the server at `host:port` (nginx would proxy to itself): the same
    port, the same address or a wildcard of its family (Listen.overlaps), and an address of this machine. A
    name on either side stands for the addresses /etc/hosts gives it (`--listen vm:8080` with vm at 127.0.0.1
    takes 127.0.0.1:8080; nginx resolves a listen name at load); looked up only when the ports match."""
    if listen.port != port:
        return False
    return any(Listen(a, port).overlaps(Listen(b, port)) and on_this_host(b)
               for a in _addresses(listen.bind_host) for b in _addresses(host))


def _addresses(host: str, hosts_file: str = "/etc/hosts") -> tuple[str, ...]:
    """`host`'s addresses: an address (or `localhost`) as it is; a name as /etc/hosts lists it, else as it is.
    Only that file, never DNS: a check of a render must not send queries off this host, nor wait on a resolver
    (a name of this host is in /etc/hosts; one only DNS knows is another host's, as far as render can tell)."""
    if is_ip(host) or address_key(host, 0)[0] == "127.0.0.1":
        return (host,)
    name = host.lower().rstrip(".")
    try:
        with open(hosts_file, encoding="utf-8", errors="replace") as fh:
            lines = fh.read(1 << 20).splitlines()
    except OSError:
        return (host,)
    found = [words[0].partition("%")[0] for words in (ln.split("#", 1)[0].split() for ln in lines)
             if len(words) >= 2 and is_ip(words[0].partition("%")[0])
             and name in (w.lower().rstrip(".") for w in words[1:])]
    return tuple(dict.fromkeys(found)) or (host,)
