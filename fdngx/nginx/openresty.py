"""The OpenResty flavor's side channel: the peers file, the snapshot it and every push carry, Lua module
discovery. The admin location's token and its client: fdngx.nginx.admin.

With this flavor nginx's config only changes when an option does: the replicas themselves (membership,
addresses, capacity), their weights, down states and scraped load reach the Lua balancer
(templates/lua/fdngx/) as DATA, in one line format that one validating parser (fdngx.peers) reads:

    generation <n>
    upstream <name>             (the frontend refuses a snapshot for another upstream: 409)
    frontends <n>               (a controller's: how many frontends take this snapshot; 1 when not said)
    peer <name> <host> <port> <weight> <down 0|1> <capacity> <load>
    empty                       (instead of any peer: no replica yet, nginx answers 503; registry mode)

- the peers file `.<config>.fdngx-peers` beside the config: the inventory's replicas with capacity
  weights, read by init_by_lua when nginx starts or reloads; rewritten (atomically) only when the
  inventory's replicas change;
- the admin push: the same lines with the policy's weights, down flags and scraped load, POSTed to the
  loopback admin location every cycle; a whole snapshot, so a replica added or removed needs no reload.

Generations (fdngx.nginx.generation): the pusher's wall clock in ms; a frontend keeps the newest, and takes an
older one when the newest was not pushed again for fdngx.store.SILENT_AFTER (its pusher went silent).

The `upstream` line is new (2026-12-07): a frontend rendered by an older fdngx (0.3.0 before it) refuses a
snapshot carrying it (400 "unknown line"), so frontends are upgraded before their controllers
(docs/controller.md); a snapshot without it (an older pusher's, an older peers file) is taken unchecked. So
is the `frontends` line (2026-12-07, written only by a controller pushing to more than one frontend)."""

from __future__ import annotations

import ipaddress
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from fdngx.domain import Instance, Inventory, LoadSample, ServerState, group_address, is_ip, natural_key
from fdngx.errors import ApplyError
from fdngx.nginx.generation import from_the_future, next_generation
from fdngx.nginx.pushfile import MAX_FRONTENDS  # fdngx.peers' MAX_FRONTENDS too
from fdngx.system.files import atomic_write, check_private, read_bytes_or_none, real_target

DEBIAN_MODULES = (
    Path("/usr/lib/nginx/modules/ndk_http_module.so"),
    Path("/usr/lib/nginx/modules/ngx_http_lua_module.so"),
)
MAX_WEIGHT = 10_000
MAX_LOAD = 1e6  # requests on one replica; anything above is a broken scrape, not load
MAX_CAPACITY = 1_000_000
# The capacity weight of the biggest replica in the peers file: the policy's default scale
# (fdngx.weights.settings.PolicyConfig.scale, base weights in fdngx.weights.policy.base_weights), so the
# first push after a start moves no weight when the load is neutral.
SCALE = 20
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:@-]{0,127}")  # fdngx.inventory.NAME, checked again here
_UPSTREAM = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,63}")  # fdngx.inventory.UPSTREAM, checked again here
MAX_GENERATION = 2**53 - 1  # the largest the Lua balancer reads exactly (fdngx.peers)


def balancer_host(host: str) -> bool:
    """Whether the Lua balancer takes `host` as a peer's (fdngx.peers.valid_host): an IP literal of a server,
    not an unspecified ("this host": 0.0.0.0/8, ::), multicast or broadcast address."""
    if not is_ip(host) or group_address(host) is not None:
        return False
    ip = ipaddress.ip_address(host)
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return not (ip.is_unspecified or (ip.version == 4 and ip.packed[0] == 0))


def host_refusal(name: str, host: str) -> str | None:
    """Why the Lua balancer cannot take instance `name` at `host` (fdngx.nginx.render.check_fleet refuses the
    inventory with it, as a controller keeps the one in force), or None."""
    if not is_ip(host):
        return f"instance '{name}': the openresty flavor needs an IP address, not host '{host}'"
    if not balancer_host(host):
        return (f"instance '{name}': host '{host}' is no server's address (unspecified, multicast or broadcast): "
                "the openresty balancer refuses it")
    return None


def lua_modules(binary: str | None) -> tuple[str, ...]:
    """Debian's nginx needs the Lua modules loaded by a standalone config; OpenResty has them built in."""
    if (binary and "openresty" in binary) or not all(p.exists() for p in DEBIAN_MODULES):
        return ()
    return tuple(str(p) for p in DEBIAN_MODULES)


def peers_path(out: Path | None) -> Path:
    """The peers file lives beside the config as a dot-file (hidden from include globs), like the token."""
    if out is None:
        return Path(".fdngx-peers").absolute()
    target = real_target(out)
    return target.with_name(f".{target.name}.fdngx-peers")


def loads_of(samples: Mapping[str, LoadSample]) -> dict[str, float]:
    """Scraped load of every healthy, readable replica (what the OpenResty balancer is told)."""
    return {name: s.load for name, s in samples.items() if s.ok and s.healthy}


def _bounded(value: float, lo: float, hi: float) -> float:
    return min(hi, max(lo, value)) if math.isfinite(value) else lo


@dataclass(frozen=True)
class Peer:
    """One `peer` line. Every value is bounded here as the Lua parser demands, so a line fdngx writes is
    never refused; name and host are checked again (they come from the validated inventory)."""

    name: str
    host: str
    port: int
    weight: int
    down: bool
    capacity: int
    load: float = 0.0

    def line(self) -> str:
        if not _NAME.fullmatch(self.name) or not balancer_host(self.host) or not 1 <= self.port <= 65535:
            raise ApplyError(f"instance '{self.name}': cannot go to the openresty balancer (name, IP host of a "
                             "server, port)")
        weight = int(_bounded(self.weight, 1, MAX_WEIGHT))
        capacity = int(_bounded(round(self.capacity), 1, MAX_CAPACITY))
        load = _bounded(self.load, 0.0, MAX_LOAD)
        return f"peer {self.name} {self.host} {self.port} {weight} {1 if self.down else 0} {capacity} {load:.3f}\n"


def snapshot(generation: int, peers: list[Peer], upstream: str = "", frontends: int = 1) -> str:
    """A whole snapshot: the text the peers file holds and the admin location takes. `upstream` (the
    inventory's) goes in as data: a frontend of another upstream refuses it (409) instead of routing its
    traffic to these replicas. `frontends`: how many frontends this same snapshot goes to (a controller's
    list); each counts the others' requests since the push from its own (fdngx.pick.others). Said only
    when more than one, so a single frontend's snapshot reads as before."""
    if type(generation) is not int or not 0 <= generation <= MAX_GENERATION:
        raise ApplyError(f"generation {generation!r}: the openresty balancer takes 0..2^53-1")
    if upstream and not _UPSTREAM.fullmatch(upstream):
        raise ApplyError(f"upstream {upstream[:80]!r}: cannot go to the openresty balancer (letters, digits and _)")
    if type(frontends) is not int or not 1 <= frontends <= MAX_FRONTENDS:
        raise ApplyError(f"frontends {frontends!r}: the openresty balancer takes 1..{MAX_FRONTENDS}")
    head = "# fdngx peers: replicas as data for the Lua balancer\n" + f"generation {generation}\n"
    head += f"upstream {upstream}\n" if upstream else ""
    head += f"frontends {frontends}\n" if frontends > 1 else ""
    # A snapshot with no peer says so: the parser refuses one that does not (a body cut short).
    return head + ("".join(p.line() for p in peers) or "empty\n")


def capacity_weights(inv: Inventory) -> dict[str, int]:
    """What the balancer uses before the first push: the biggest replica (slots x static weight) gets SCALE,
    the others in proportion, so a replica with half the slots takes half the requests from the first one."""
    raw = {i.name: i.max_num_seqs * i.weight for i in inv.instances}
    top = max(raw.values(), default=1) or 1
    return {name: max(1, min(MAX_WEIGHT, round(SCALE * v / top))) for name, v in raw.items()}


def _ordered(inv: Inventory) -> list[Instance]:
    return sorted(inv.instances, key=lambda i: natural_key(i.name))


def initial_peers(inv: Inventory) -> list[Peer]:
    weights = capacity_weights(inv)
    return [Peer(i.name, i.host, i.port, weights[i.name], False, i.max_num_seqs) for i in _ordered(inv)]


def live_peers(inv: Inventory, states: Mapping[str, ServerState], samples: Mapping[str, LoadSample]) -> list[Peer]:
    """The inventory's replicas with the policy's weights and down flags, scraped capacity and load."""
    weights = capacity_weights(inv)
    loads = loads_of(samples)
    peers = []
    for i in _ordered(inv):
        state = states.get(i.name)
        sample = samples.get(i.name)
        capacity = sample.capacity if sample is not None and sample.ok and sample.capacity else i.max_num_seqs
        peers.append(Peer(
            i.name, i.host, i.port, state.weight if state is not None else weights[i.name],
            bool(state.down) if state is not None else False, int(_bounded(capacity, 1, MAX_CAPACITY)),
            loads.get(i.name, 0.0),
        ))
    return peers


def _peer_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith("peer ")]


def write_peers_file(path: Path, inv: Inventory) -> str:
    """Make the peers file list the inventory's replicas; returns its text. Rewritten (atomically, with a
    new generation) only when a replica changed: weights and health live in pushes, not here."""
    new_lines = [p.line().rstrip("\n") for p in initial_peers(inv)]
    # nginx's master reads it as root: it must be ours, not a symlink someone planted beside the config.
    check_private(path, "openresty peers file")
    old = read_bytes_or_none(path, 8 << 20)
    old_text = old.decode("utf-8", "replace") if old is not None else None
    if old_text is not None and _peer_lines(old_text) == new_lines and not from_the_future(old_text):
        return old_text
    text = snapshot(next_generation(), initial_peers(inv), inv.upstream)
    atomic_write(path, text, mode=0o644, private=True)
    return text
