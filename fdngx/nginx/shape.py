"""What a rendered config serves, in one header line (`# fdngx-front: mode=site tls=on api-keys=on
flavor=openresty`), and the check that a render does not take it away without being asked to.

Every run that writes a config (cron's `render --scrape`, a timer, a sidecar, an admin's render) must repeat
the options the config was first rendered with. One left out used to be applied without a word: a cron line
without `--mode site` wrote an upstream block over the site (its listener gone), one without
`--api-keys-file` turned API-key checks off while it said "applied and reloaded", one without `--flavor
openresty` (the settings file's `flavor` commented out, the option given by hand once) put plain least_conn
back in place of the Lua balancer. Now a render that changes the mode, or turns TLS, API keys or the Lua
balancer off, over a config fdngx rendered is refused unless `--force` says it is meant. Turning them on, and
anything else (listen address, weights, timeouts), needs no asking. A line without `flavor=` (an older fdngx
wrote it) is taken for the OpenResty flavor when the file has a `balancer_by_lua` (the first run after an
upgrade, cron's or the sidecar's, would otherwise decide it), else it refuses no flavor change.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Protocol

from fdngx.domain import Flavor, Mode
from fdngx.errors import ApplyError

_LINE = re.compile(rb"^# fdngx-front: mode=([a-z]+) tls=(on|off) api-keys=(on|off)(?: flavor=([a-z]+))?$", re.M)
_HEAD = 4096  # the header is the file's first lines


@dataclass(frozen=True)
class Front:
    mode: Mode
    tls: bool
    api_keys: bool
    flavor: Flavor | None = None  # None: the line did not say (an older fdngx wrote it)

    @property
    def line(self) -> str:
        """The header line (data from enums and booleans only: nothing a user typed)."""
        flavor = "" if self.flavor is None else f" flavor={self.flavor.value}"
        return f"mode={self.mode.value} tls={_on(self.tls)} api-keys={_on(self.api_keys)}{flavor}"

    @classmethod
    def of(cls, data: bytes | None) -> Front | None:
        """The front a rendered file declares; None: no such line (not fdngx's, or an older fdngx's)."""
        m = _LINE.search((data or b"")[:_HEAD])
        if m is None or m.group(1).decode() not in Mode._value2member_map_:
            return None
        flavor = (m.group(4) or b"").decode()
        if not flavor and data and b"balancer_by_lua" in data:  # an older fdngx's line: the body says it
            flavor = Flavor.OPENRESTY.value
        return cls(Mode(m.group(1).decode()), m.group(2) == b"on", m.group(3) == b"on",
                   Flavor(flavor) if flavor in Flavor._value2member_map_ else None)

    def taken_away(self, new: Front) -> list[str]:
        """What replacing a config of this front by one of `new` loses, for people (empty: nothing)."""
        lost = []
        if new.mode is not self.mode:
            lost.append(f"change its mode from {self.mode.value} to {new.mode.value}"
                        + (" (its server block and listener would go)" if new.mode is Mode.UPSTREAM else ""))
        if self.tls and not new.tls:
            lost.append("turn TLS off (no --tls-cert/--tls-key)")
        if self.api_keys and not new.api_keys:
            lost.append("turn API-key checks off (no --api-keys-file)")
        if self.flavor is Flavor.OPENRESTY and new.flavor is Flavor.NGINX:
            lost.append("turn the Lua balancer off (no --flavor openresty: plain least_conn would replace it)")
        return lost


class Options(Protocol):
    """What of the render's options (fdngx.nginx.render.RenderOptions) makes the front."""

    @property
    def mode(self) -> Mode: ...
    @property
    def flavor(self) -> Flavor: ...
    @property
    def tls_cert(self) -> str: ...
    @property
    def api_keys_file(self) -> str: ...
    @property
    def api_keys_map(self) -> str: ...


def front_of(opts: Options) -> Front:
    """The front a render with these options writes."""
    return Front(opts.mode, bool(opts.tls_cert), bool(opts.api_keys_file or opts.api_keys_map), opts.flavor)


def _on(flag: bool) -> str:
    return "on" if flag else "off"


def check(path: object, old: bytes | None, new: Front | None, force: bool) -> None:
    """Refuse to replace the config `old` (fdngx's, with a front line) by one that changes its mode or turns
    TLS, API keys or the Lua balancer off, unless `force`. Said before anything is written."""
    was = Front.of(old)
    if force or was is None or new is None:
        return
    lost = was.taken_away(new)
    if lost:
        raise ApplyError(
            f"{path}: refusing to {' and '.join(lost)}: was an option left out of this run? Give every "
            "run the options the config was rendered with (one settings file: fdngx --config FILE), or run "
            "fdngx render once with --force to make the change")
