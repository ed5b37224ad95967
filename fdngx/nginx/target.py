"""The nginx config fdngx owns: where it lives, how it is rendered, tested, reloaded, or pushed to.

`TargetSpec` is what the user asked for (render's and the sidecar's shared options); `open_target` turns
it into a `Target` once, preparing what the machine must provide (a standalone prefix, the OpenResty
admin token, the Lua modules). The controller (fdngx.weights.controller) renders and applies through
the Target; nothing else writes nginx config.
"""

from __future__ import annotations

import logging
import os
import shlex
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from fdngx.domain import Flavor, Inventory, LoadSample, Mode, ServerState
from fdngx.errors import ApplyError, FdngxError, UsageError, os_error_line, shown
from fdngx.inventory import in_rotation
from fdngx.nginx import admin as admin_client
from fdngx.nginx import frontdoor, generation, keymap, openresty, shape
from fdngx.nginx.admin import TokenFile
from fdngx.nginx.apply import ApplyResult, safe_apply
from fdngx.nginx.build import nginx_build
from fdngx.nginx.control import NginxControl, find_nginx, prepare_prefix
from fdngx.nginx.fanout import Fanout, PushOutcome
from fdngx.nginx.guards import check_replaceable, included_by, standalone_refusal
from fdngx.nginx.pushfile import FrontendSpec
from fdngx.nginx.render import RenderOptions, check_fleet, render
from fdngx.nginx.shape import front_of
from fdngx.system.files import identity, read_bytes_or_none, real_target, writable_by_others

log = logging.getLogger("fdngx.target")


@dataclass(frozen=True)
class TargetSpec:
    opts: RenderOptions
    out: Path | None = None  # None: stdout
    prefix: Path | None = None
    nginx_conf: Path | None = None
    nginx_bin: str | None = None
    reload_cmd: str | None = None
    reload: bool = False
    admin_token_file: Path | None = None
    pid_file: Path | None = None  # the nginx master's pid file, when nginx's own default and nginx.conf miss it
    force: bool = False  # replace an --out fdngx did not write (kept as .NAME.fdngx-orig)
    # Controller mode (fdngx.nginx.fanout): push every snapshot to these frontends' admin locations too.
    controller: bool = False
    frontends: tuple[FrontendSpec, ...] = ()
    push_timeout: float = 0.5

    def validated(self) -> TargetSpec:
        self.opts.validated()
        if self.reload and self.out is None:
            raise UsageError("--reload needs --out PATH (the file nginx reads)")
        if self.controller and self.opts.flavor is not Flavor.OPENRESTY:
            raise UsageError("--push-to/--push-to-file push to OpenResty frontends: add --flavor openresty")
        return self

    @property
    def standalone_prefix(self) -> Path | None:
        if self.opts.mode is not Mode.STANDALONE or self.prefix is not None:
            return self.prefix
        return self.out.absolute().parent if self.out is not None else None


@dataclass(frozen=True)
class Target:
    out: Path | None
    opts: RenderOptions
    control: NginxControl | None  # None: write the file only (someone else reloads)
    reload: bool
    admin: admin_client.Admin | None  # openresty flavor: weights go here, not into the config
    peers_file: Path | None = None  # openresty flavor: the replicas as data, beside the config
    # Controller mode: every frontend (a local one from --out included) gets the same snapshot through this.
    fanout: Fanout | None = None
    local: FrontendSpec | None = None  # controller mode with --out: this host's nginx, always pushed to
    force: bool = False  # replace an --out fdngx did not write
    # What files were as last read: "keys", the --api-keys-file (keyed_opts); "token", the admin token (push)
    _seen: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)  # what changed files were

    @property
    def pushing(self) -> bool:
        return self.admin is not None or self.fanout is not None

    @property
    def renders(self) -> bool:
        """False for a controller with no nginx of its own (no --out): it only pushes."""
        return self.fanout is None or self.out is not None

    def dry(self) -> Target:
        """The same render, going nowhere: no write, no reload, no push."""
        return replace(self, out=None, control=None, reload=False, admin=None, peers_file=None, fanout=None)

    def render(self, inv: Inventory, states: Mapping[str, ServerState] | None) -> str:
        """The config text; the openresty flavor's carries no weights (they are pushed)."""
        return render(inv, self.keyed_opts(), None if self.opts.flavor is Flavor.OPENRESTY else states)

    def check(self, inv: Inventory) -> None:
        """What this target cannot give nginx of `inv` (RenderError): a sidecar keeps the inventory in force
        rather than take it (a controller's push would empty or stop every frontend at once)."""
        check_fleet(inv, self.opts, local=self.renders)

    def keyed_opts(self) -> RenderOptions:
        """The options with the key map of the --api-keys-file as it is now: a sidecar reads it again whenever
        it changed (identity), so a key revoked in the file is gone from its next config, and a `render` of
        the new keys is not undone by the sidecar putting its older map back. A file that cannot be read or
        holds a bad line fails the cycle (nginx keeps the keys it has)."""
        if not self.opts.api_keys_file or self.out is None:
            return self.opts  # no keys; or a dry render, which uses the map target_spec found
        seen = identity(Path(self.opts.api_keys_file))
        last = self._seen.get("keys")
        if last is not None and last[0] == seen and seen is not None:
            return last[1]
        opts = keymap.applied(self.opts, self.out, write=True)
        if last is not None and last[1].api_keys_version != opts.api_keys_version:
            log.info("%s: API keys changed: key map version %s", self.opts.api_keys_file, opts.api_keys_version)
        self._seen["keys"] = (seen, opts)
        return opts

    def write_peers(self, inv: Inventory) -> None:
        """openresty: the replicas as data beside the config (only rewritten when one changed). Before the
        config's apply: the start or reload that may cause reads the replicas from this file."""
        if self.peers_file is not None:
            try:
                openresty.write_peers_file(self.peers_file, in_rotation(inv))
            except OSError as exc:  # a full disk: the cycle's error (counted, said), and the push still goes
                raise ApplyError(f"cannot write the peers file: {os_error_line(exc)}") from None

    def apply(self, text: str, guard: Callable[[], str | None] | None = None) -> ApplyResult:
        """The safe apply of `text` to --out; `guard`: why `text` is out of date, asked under the apply lock."""
        assert self.out is not None
        return safe_apply(
            self.out, text, self.control, reload=self.reload and self.control is not None,
            standalone=self.opts.mode is Mode.STANDALONE, wrapper_head=self._wrapper_head(),
            replace_foreign=self.force, guard=guard,
        )

    def push(self, inv: Inventory, states: Mapping[str, ServerState] | None,
             samples: Mapping[str, LoadSample]) -> admin_client.PushResult | None:
        """Send the balancer a whole snapshot; returns what it said (applied, unchanged, or stale: another
        controller's is newer), None when no nginx took it: a static snapshot's push is best effort, the
        policy's waits only for an nginx that is not running.

        With policy states: their weights, down flags and the scraped load, under a new generation. Without
        (a render with no scrape): the peers file as written, under its own generation, so re-sending it is
        a no-op and never undoes a newer push. That one is best effort: an nginx that is not running reads
        the file when it starts."""
        assert self.admin is not None
        self._renew_token()
        # A drained replica is left out of the snapshot, not sent as `down`: the balancer may still pick a
        # peer the sidecar holds down (its own probe saw it come back, or every other one failed), and must
        # never pick one under maintenance. Requests already on it finish: a peer's in-flight count outlives
        # its removal (fdngx.pool).
        inv = in_rotation(inv)
        if states is None:
            body = read_bytes_or_none(self.peers_file) if self.peers_file is not None else None
            text = body.decode("utf-8") if body else openresty.snapshot(
                generation.next_generation(), openresty.initial_peers(inv), inv.upstream)
        else:
            peers = openresty.live_peers(inv, states, samples)
            text = openresty.snapshot(generation.next_generation(), peers, inv.upstream)
        try:
            with self.admin.deadline(self.admin.timeout):  # the whole push, not each read
                result = self.admin.push(text)
        except admin_client.AdminUnreachable as exc:
            # A static snapshot is best effort. The policy's waits only for an nginx that is not running: it
            # reads the replicas from the peers file when it starts, and the next cycle's push (a whole
            # snapshot, every cycle) carries the weights.
            if states is not None and (self.control is None or self.control.running()):
                raise
            log.debug("no push: %s (nginx reads %s when it starts)", exc, self.peers_file)
            return None
        if not result.accepted:
            # Static: a sidecar's newer snapshot is in force, as it should be. The policy's: two controllers side
            # by side, the other one's snapshot is newer, and this one's next push wins again; or a clock is
            # wrong. The caller says which (fdngx.weights.controller): the sidecar as normal, render as an error.
            return result
        if result.added or result.removed:
            log.info("%s: replicas added %s, removed %s (no reload)", self.admin.url,
                     ", ".join(result.added) or "none", ", ".join(result.removed) or "none")
        return result

    def _renew_token(self) -> None:
        """The admin token file, read again when it changed (fdngx.nginx.admin.TokenFile). The sidecar read
        it once, at its start: after a rotation and a reload every push got 403 until it was restarted."""
        path = Path(self.opts.admin_token_file) if self.opts.admin_token_file else None
        if path is None or not isinstance(self.admin, admin_client.Admin):
            return
        file = self._seen.get("token")
        if not isinstance(file, TokenFile):
            self._seen["token"] = TokenFile(path, self.admin.token)
            return
        if (token := file.current()) != self.admin.token:
            old = self.admin
            object.__setattr__(self, "admin", admin_client.Admin(old.listen, token, old.timeout, old.path))
            old.close()

    def push_all(self, inv: Inventory, states: Mapping[str, ServerState] | None,
                 samples: Mapping[str, LoadSample]) -> tuple[PushOutcome, ...]:
        """Controller mode: ONE snapshot (one generation, the same bytes) to every frontend at once."""
        assert self.fanout is not None
        inv = in_rotation(inv)  # as in push()
        peers = openresty.live_peers(inv, states, samples) if states is not None else openresty.initial_peers(inv)
        text = openresty.snapshot(generation.next_generation(), peers, inv.upstream, self.fanout.serving)
        return self.fanout.push(text, frozenset(p.name for p in peers))

    def set_frontends(self, specs: list[FrontendSpec]) -> None:
        """Controller mode: a new frontend list (the push file changed); this host's nginx stays in it."""
        assert self.fanout is not None
        self.fanout.set_frontends(_unique([self.local, *specs] if self.local is not None else specs))

    def close(self) -> None:
        if self.fanout is not None:
            self.fanout.close()

    def _wrapper_head(self) -> str:
        """What a snippet needs before http {} to be tested alone: the Lua modules for openresty."""
        if self.opts.flavor is not Flavor.OPENRESTY:
            return ""
        binary = self.control.binary if self.control is not None else None
        return "".join(f"load_module {m};\n" for m in openresty.lua_modules(binary))


def nginx_control(spec: TargetSpec) -> NginxControl:
    """How to test/reload the nginx that reads `spec.out`, derived from the mode and options."""
    binary = find_nginx(spec.nginx_bin)
    reload_cmd = shlex.split(spec.reload_cmd) if spec.reload_cmd else None
    verify_url = None
    if spec.opts.mode in (Mode.SITE, Mode.STANDALONE):
        verify_url = spec.opts.listen.url("/fdngx/generation")
    if spec.opts.mode is Mode.STANDALONE:
        conf = spec.nginx_conf or (real_target(spec.out) if spec.out else None)
        return NginxControl(binary, conf, spec.standalone_prefix, "logs/error.log", reload_cmd, spec.pid_file,
                            verify_url=verify_url)
    return NginxControl(binary, spec.nginx_conf, spec.prefix, None, reload_cmd, spec.pid_file, verify_url=verify_url)


def check_out(spec: TargetSpec) -> None:
    """The refusals of the file at --out, before anything is written: not a file fdngx wrote, or a run that would
    change what it serves (fdngx.nginx.shape). A sidecar refuses to start, not to apply every cycle; safe_apply
    asks again under the lock."""
    if spec.out is None:
        return
    live = read_bytes_or_none(real_target(spec.out))
    check_replaceable(spec.out, live, spec.force)
    shape.check(spec.out, live, front_of(spec.opts), spec.force)


def open_target(spec: TargetSpec, *, dry: bool = False) -> Target:
    """Prepare the machine for `spec` (unless `dry`: --check/--diff/stdout change nothing) and return it."""
    spec = spec.validated()
    opts = spec.opts
    if spec.out is not None and not dry:
        check_out(spec)
    if spec.out is not None and not dry and writable_by_others(real_target(spec.out).parent):
        log.warning("%s: its directory is writable by other accounts; anyone there can replace what nginx reads",
                    real_target(spec.out).parent)
    if spec.out is not None and opts.mode is Mode.STANDALONE and not dry:
        _check_standalone_place(spec)  # before its prefix (logs/, tmp/) is made beside it
    prefix = spec.standalone_prefix
    if prefix is not None and opts.mode is Mode.STANDALONE and not dry:
        prepare_prefix(prefix)  # before the token file, which may live there too
    admin = None
    local_spec = None
    frontends = list(spec.frontends)
    local = spec.out is not None or not spec.controller  # controller mode alone renders no nginx of its own
    if opts.flavor is Flavor.OPENRESTY and local:
        token_file = (spec.admin_token_file or admin_client.token_path(spec.out)).absolute()
        peers_file = openresty.peers_path(spec.out)
        try:  # always beside --out: say so, not "peers file" or an --admin-token-file the user never gave
            frontdoor.check_plain_path("peers file", str(peers_file))
        except UsageError:
            raise UsageError(f"--out {shown(str(spec.out))}: the OpenResty flavor names the files it keeps beside "
                             "it in the config, bare: use a directory without spaces or quotes (letters, digits, "
                             ". _ / - : @ +)") from None
        modules = openresty.lua_modules(spec.nginx_bin) if opts.mode is Mode.STANDALONE else ()
        opts = replace(opts, admin_token_file=str(token_file), peers_file=str(peers_file),
                       lua_modules=opts.lua_modules or modules).validated()
        # The config names the token file, not the token: a dry run needs neither the token nor a push.
        admin = None if dry else admin_client.Admin(opts.admin_listen, admin_client.ensure_token(token_file))
        if admin is not None and spec.controller:
            # The local nginx is one more frontend: the same bytes as the others, in the same fan-out.
            local_spec = FrontendSpec(admin.url, token_file)
            frontends.insert(0, local_spec)
    control = nginx_control(spec) if spec.reload else None
    peers = Path(opts.peers_file) if admin is not None else None
    fanout = None
    if spec.controller and not dry:
        fanout = Fanout(_unique(frontends), spec.push_timeout)
        admin = None  # every push goes through the fan-out
    return Target(spec.out, opts, control, spec.reload, admin, peers, fanout, local_spec, spec.force)


def _check_standalone_place(spec: TargetSpec) -> None:
    """A standalone config (a whole nginx.conf) where the system's nginx.conf includes it (conf.d/) is refused
    before anything is written, with or without --reload; a sidecar refuses to start. No nginx here: no check."""
    assert spec.out is not None
    try:
        binary = find_nginx(spec.nginx_bin)
    except FdngxError:
        return
    system = nginx_build(binary).conf_path
    if system.is_file() and os.path.realpath(system) != os.path.realpath(spec.out) and included_by(system, spec.out):
        raise ApplyError(f"{spec.out}: {standalone_refusal(system, binary)}")


def _unique(specs: list[FrontendSpec]) -> list[FrontendSpec]:
    seen: dict[str, FrontendSpec] = {}
    for s in specs:
        seen.setdefault(s.url, s)
    return list(seen.values())
