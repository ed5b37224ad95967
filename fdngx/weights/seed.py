"""A replica with no policy memory starts from what nginx's config gives it, not from neutral.

The state beside --out is the policy's memory: lost (deleted, damaged, moved with --state, one from a newer
fdngx after a roll back), every replica started from neutral while nginx ran the weights the last policy
decided. An outside day-two review: nginx held dp0 as `backup` (traffic from elsewhere filled it) and the
restarted sidecar's first cycle gave it full weight 20, reloaded, then put it back to backup and reloaded again
2 s later. Seeded from the config fdngx wrote (fdngx.nginx.served: the nginx flavor's server lines), a replica
nginx holds out (`down`, `backup`) stays out (with its weight; the file's time as the last change, so min-hold
counts from it) and the policy moves on from there. Only those: a weight alone may be the inventory's static
one (a plain `fdngx render`), which is no memory of the policy's; starting it from neutral costs reloads while
the policy learns the load again (as before), never a replica nginx kept out put back in. A replica the file
does not list at its address (a new one, or moved) starts from neutral as before; the OpenResty flavor keeps no
weights in its file.
"""

from __future__ import annotations

import logging
import time
from dataclasses import replace

from fdngx.domain import Flavor, Inventory, address_key, canonical_hostport, hostport
from fdngx.nginx import served
from fdngx.nginx.target import Target
from fdngx.weights.state import InstanceState, PolicyState

log = logging.getLogger("fdngx.sidecar")


def seeded(state: PolicyState, inv: Inventory, target: Target) -> PolicyState:
    """`state` with a memory, from the live config, for each replica of `inv` it has none of (the file read
    only when one has none)."""
    if target.out is None or target.opts.flavor is not Flavor.NGINX:
        return state
    missing = [i for i in inv.instances if i.name not in state.instances]
    if not missing:
        return state
    got = served.read(target.out, inv.upstream)
    if got.kind is not served.Kind.WEIGHTS:
        return state
    found: dict[str, InstanceState] = {}
    now = time.time()  # a file time ahead of the clock (a clock stepped back) is now, not the future
    for inst in missing:
        server = got.servers.get(inst.name)
        address = hostport(*address_key(inst.host, inst.port))
        if server is None or not (server.down or server.backup) or canonical_hostport(server.address) != address:
            continue
        found[inst.name] = InstanceState(weight=server.weight, down=server.down, backup=server.backup,
                                         overflow=server.backup, address=address,
                                         last_change_at=min(got.written_at or now, now))
    if not found:
        return state
    log.info("%d replica(s) without policy memory stay as %s gives them to nginx, not put back at neutral: %s",
             len(found), target.out, ", ".join(
                 f"{n} {'down' if s.down else 'backup'} (weight {s.weight})"
                 for n, s in list(found.items())[:6]) + (f" and {len(found) - 6} more" if len(found) > 6 else ""))
    return replace(state, instances={**state.instances, **found})
