"""A digest of the Lua balancer's modules, written into the OpenResty flavor's config.

nginx loads the Lua modules once per (re)load. A config whose text did not change is not reloaded, so an
fdngx upgraded in place under the same version string (the rendered text byte for byte the same) left nginx on
the old modules while the new sidecar pushed what only the new ones read: every push refused, weights and down
flags frozen (an outside review). With the modules' digest in the text, a change to any of them changes the
config and its generation, and the apply reloads nginx onto them.

Read once per process, like the templates (fdngx.nginx.render): a running sidecar keeps the digest of the
modules it started with, so nginx is reloaded onto new modules when the sidecar that speaks their format runs.
"""

from __future__ import annotations

import functools
import hashlib
from pathlib import Path


@functools.lru_cache(maxsize=8)
def digest(dirs: tuple[str, ...]) -> str:
    """12 hex digits over every `fdngx/*.lua` module `require` finds in `dirs` (the lua_package_path, in its
    order; the first dir holding a module is the one nginx loads), by name and bytes."""
    h = hashlib.sha256()
    seen: set[str] = set()
    for d in dirs:
        for path in sorted((Path(d) / "fdngx").glob("*.lua")):
            if path.name in seen:
                continue
            seen.add(path.name)
            h.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    return h.hexdigest()[:12]
