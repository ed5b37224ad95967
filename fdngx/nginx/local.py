"""Is an address this machine's own (fdngx.nginx.render: a --listen on a local replica's address)."""

from __future__ import annotations

import ipaddress
import socket

from fdngx.domain import address_key, is_ip


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
