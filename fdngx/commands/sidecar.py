"""`fdngx sidecar`: the control loop that keeps nginx's weights in line with each replica's load."""

from __future__ import annotations

import contextlib
import logging
import signal
from dataclasses import replace
from pathlib import Path
from types import FrameType

import typer

from fdngx.commands.helptext import examples
from fdngx.commands.options import (
    AccessLogFormatOpt,
    AccessLogOpt,
    AdminAllowOpt,
    AdminListenOpt,
    AdminTokenFileOpt,
    ApiKeysFileOpt,
    ApiKeysForwardOpt,
    BalancerOpt,
    ClientBodyBufferSizeOpt,
    ConnectTimeoutOpt,
    FailTimeoutOpt,
    FlavorOpt,
    ForceOpt,
    InventoryOpt,
    KeepaliveOpt,
    ListenOpt,
    LuaDictSizeOpt,
    MaxFailsOpt,
    ModeOpt,
    NginxBinOpt,
    NginxConfOpt,
    PidFileOpt,
    PrefixOpt,
    RateBurstOpt,
    RateLimitOpt,
    ReadTimeoutOpt,
    ReloadCmdOpt,
    SpeedAwareOpt,
    TemplateDirOpt,
    TlsCertOpt,
    TlsKeyOpt,
    inventory_paths,
    render_options,
    target_spec,
)
from fdngx.domain import Balancer, Flavor, Listen, Mode
from fdngx.errors import UsageError, check_number
from fdngx.nginx import admin
from fdngx.nginx.fanout import MAX_PUSH_TIMEOUT, MIN_PUSH_TIMEOUT
from fdngx.nginx.frontdoor import AccessLogFormat
from fdngx.nginx.pushfile import FrontendSpec, frontend_specs
from fdngx.nginx.render import RenderOptions
from fdngx.nginx.target import TargetSpec, open_target
from fdngx.registry.core import Registry, RegistrySettings
from fdngx.registry.http import RegistryServer, server_options
from fdngx.registry.rules import DEFAULT_MAX_INSTANCES
from fdngx.system import hups
from fdngx.weights import owner
from fdngx.weights.dial import raise_fd_limit
from fdngx.weights.settings import MAX_SECONDS, PolicyConfig, config_for_flavor
from fdngx.weights.sidecar import Sidecar, SidecarConfig
from fdngx.weights.telemetry import DEFAULT_LISTEN, Telemetry

log = logging.getLogger("fdngx.sidecar")
MAX_REGISTRY_GRACE = 86400.0  # --registry-grace: a day without a heartbeat is gone, not late
ONCE_WAIT = 120.0  # a --once run waits this long for another one on the same config (cron runs take turns)

EPILOG = (
    examples(
        ("system nginx, upstream block", "fdngx sidecar --out /etc/nginx/fdngx/upstream.conf"),
        ("private nginx under /srv/fdngx",
         "fdngx sidecar --mode standalone --out /srv/fdngx/nginx.conf --listen 8080"),
        ("controller: one scrape, N OpenResty frontends (docs/controller.md)",
         "fdngx sidecar --flavor openresty --push-to-file /etc/fdngx/frontends \n"
         "--push-token-file /etc/fdngx/admin-token"),
    ) +
    "upstream/site modes: nginx.conf must include --out before the first cycle (write it once with `fdngx render` "
    "and the same options, no --reload, then add the include): an apply of a file nginx does not read fails, "
    "and the file is removed.\n\n"
    "Signals: SIGHUP re-reads the inventory now (one during the start: once the loop runs); SIGTERM/SIGINT "
    "stop after the current cycle (a cycle waiting "
    "for another run's apply lock gives that apply up at once, nothing written).\n\n"
    "The inventory is watched through symlinks (a ConfigMap's ..data, a release's current -> releases/N) and "
    "looked at every cycle too: re-read when a file changed, never because one was read.\n\n"
    "Logs one line per change with its reason. Policy state lives beside --out (.<name>.fdngx-state.json).\n\n"
    "Exit codes: 0 stopped by SIGTERM/SIGINT (--once: applied or unchanged), 1 error (e.g. a missing or bad "
    "inventory, another sidecar manages this config, a --metrics-listen or --registry-listen that cannot "
    "listen; --once: the apply failed), 2 usage."
)


def sidecar_cmd(
    inventory: list[Path] | None = InventoryOpt,
    out: Path | None = typer.Option(
        None, "--out", "-o", help="The config file nginx reads; rewritten only when it changes. Required unless "
        "--push-to/--push-to-file (controller mode: then only for an nginx on this host too)."
    ),
    interval: float = typer.Option(2.0, help="Seconds between scrape + policy cycles (0.05 to 3600)."),
    mode: Mode = ModeOpt,
    flavor: Flavor = FlavorOpt,
    admin_listen: str = AdminListenOpt,
    admin_allow: str = AdminAllowOpt,
    admin_token_file: Path | None = AdminTokenFileOpt,
    push_to: list[str] | None = typer.Option(
        None, "--push-to", help="Controller mode (openresty): also push every snapshot to these frontends' admin "
        "servers, http://HOST:PORT (their --admin-listen), comma-separated or repeated. One scrape, the same "
        "snapshot and generation everywhere; this host renders and reloads nothing unless --out is given."
    ),
    push_to_file: Path | None = typer.Option(
        None, "--push-to-file", help="Controller mode: a file with one frontend admin URL per line (optionally "
        "followed by its own token file), re-read when it changes."
    ),
    push_token_file: Path | None = typer.Option(
        None, "--push-token-file", help="Controller mode: the admin token the frontends share (each renders with "
        "--admin-token-file pointing at a copy of it; 0600, at least 16 characters). Default: the local "
        "--admin-token-file with --out."
    ),
    push_timeout: float = typer.Option(
        0.5, help="Controller mode: seconds one whole push may take (connect, send and answer; 0.05 to 60); then its "
        "connection is closed and the cycle waits no longer: a slow or dead frontend never delays the others."
    ),
    balancer: Balancer = BalancerOpt,
    listen: str = ListenOpt,
    prefix: Path | None = PrefixOpt,
    nginx_conf: Path | None = NginxConfOpt,
    nginx_bin: str | None = NginxBinOpt,
    reload_cmd: str | None = ReloadCmdOpt,
    pid_file: Path | None = PidFileOpt,
    force: bool = ForceOpt,
    no_reload: bool = typer.Option(False, "--no-reload", help="Only write --out; something else reloads nginx."),
    once: bool = typer.Option(
        False, "--once", help="Run one cycle (scrape, decide, render, apply) and exit, 1 if the apply failed: the "
        "config a new nginx starts with, with every option the sidecar will run with (docker/gateway.sh). Under "
        "the policy state's lock, like render --scrape: overlapping runs (cron) take turns."
    ),
    metrics_listen: str = typer.Option(
        DEFAULT_LISTEN, help="ADDR:PORT for the sidecar's own Prometheus /metrics; 'off' to disable."
    ),
    state: Path | None = typer.Option(None, help="Policy state file (default: .<out name>.fdngx-state.json)."),
    debounce: float = typer.Option(
        1.0, help="Seconds of quiet after an inventory file changes before re-reading it (only when it changed: "
        "another inode, size or mtime; 0 to 3600)."
    ),
    max_reloads_per_minute: int = typer.Option(4, help="Reload budget: weight changes beyond it wait, "
                                              "and a replica leaving the inventory waits until 60/N s after the "
                                              "last membership change (1 to 10000)."),
    min_hold: float = typer.Option(10.0, help="Seconds a weight stays before it may move again (0 to 3600)."),
    fail_threshold: int = typer.Option(
        3, help="Consecutive failed /health checks (anything but 200) before `down` (1 to 10000)."
    ),
    recover_threshold: int = typer.Option(
        2, help="Consecutive /health 200 before a down replica is back (1 to 10000)."
    ),
    ramp: float = typer.Option(
        0.0, help="Seconds a recovered replica takes to ramp back to full weight (0: at once, which a fleet that "
        "needs the replica wants; at most 3600)."
    ),
    refused_grace: float = typer.Option(
        30.0, help="Seconds a replica whose /health is refused (nothing listens) stays in the config before `down`: "
        "nginx's passive check (max_fails/fail_timeout) covers it meanwhile, with no reload (0 to 3600)."
    ),
    stale_after: float = typer.Option(
        10.0, help="Seconds after which old metrics stop steering a weight (0.05 to 3600)."
    ),
    scale: int = typer.Option(20, help="nginx weight of the biggest replica at neutral load (1 to 10000)."),
    speed_aware: bool | None = SpeedAwareOpt,
    max_fails: int = MaxFailsOpt,
    fail_timeout: int = FailTimeoutOpt,
    keepalive: int = KeepaliveOpt,
    template_dir: Path | None = TemplateDirOpt,
    access_log: str | None = AccessLogOpt,
    read_timeout: str = ReadTimeoutOpt,
    connect_timeout: str = ConnectTimeoutOpt,
    client_body_buffer_size: str = ClientBodyBufferSizeOpt,
    lua_dict_size: str = LuaDictSizeOpt,
    access_log_format: AccessLogFormat = AccessLogFormatOpt,
    tls_cert: Path | None = TlsCertOpt,
    tls_key: Path | None = TlsKeyOpt,
    api_keys_file: Path | None = ApiKeysFileOpt,
    api_keys_forward: bool = ApiKeysForwardOpt,
    rate_limit: str | None = RateLimitOpt,
    rate_burst: int | None = RateBurstOpt,
    registry_listen: str | None = typer.Option(
        None, help="ADDR:PORT for a FastDeploy-compatible POST /register (instances started with "
        "--router http://ADDR:PORT add themselves to the first --inventory). Unauthenticated, like "
        "FastDeploy's routers: bind it to a private interface. Default: off."
    ),
    registry_allow: str = typer.Option(
        "loopback,private", help="Who may use --registry-listen: CIDRs, 'loopback', 'private' (RFC 1918, fc00::/7)."
    ),
    registry_targets: str = typer.Option(
        "loopback,private", help="Addresses instances may register (CIDRs, 'loopback', 'private'; 'peer': only "
        "the address the registration comes from, the hardened setting); link-local and multicast never."
    ),
    registry_grace: float = typer.Option(
        30.0, help="Seconds a registered instance may fail /health, or send no heartbeat (FastDeploy posts every "
        "5 s) while its /health does not pass, before it is removed; its next registration adds it back. A "
        "silent instance whose /health passes is kept (one WARNING). 0: never remove; at most 86400."
    ),
    registry_metrics_port: str | None = typer.Option(
        None, help="Metrics port of a registered instance whose registration has none: a port (9001), an offset "
        "from the API port (+1000), or a JSON table file {\"8001\": 9001, \"10.0.0.5:8002\": 9102}. It wins over "
        "/metrics on the API port, where FastDeploy's load gauges may read 0; without either, the instance is "
        "balanced with no load signal."
    ),
    registry_max_instances: int = typer.Option(
        DEFAULT_MAX_INSTANCES, help="Registered instances the registry keeps (>= 1). A new registration beyond "
        "it is refused (HTTP 507) until one leaves; heartbeats of registered instances still answer."
    ),
) -> None:
    """Keep nginx's weights in line with each replica's real load (scrape -> policy -> safe apply).

    Weights start from capacity (max_batch_size, else max_num_seqs, times the inventory weight) and move only when a replica carries more load per slot than the fleet (traffic nginx cannot see, KV pressure). A replica failing /health is marked down and ramps back after recovery. nginx's least_conn still picks each request.
    """  # noqa: E501 (one line per paragraph: the help formatter re-wraps it)
    # Every number first, each named with its value: nothing is written (the API key map, the admin token,
    # an empty inventory) for a run that is refused.
    check_number("--debounce", debounce, 0.0, MAX_SECONDS)
    check_number("--push-timeout", push_timeout, MIN_PUSH_TIMEOUT, MAX_PUSH_TIMEOUT)
    check_number("--registry-grace", registry_grace, 0.0, MAX_REGISTRY_GRACE)
    policy = config_for_flavor(  # names --interval, --scale, --min-hold, ... with the value it refuses
        flavor,
        interval=interval,
        max_reloads_per_minute=max_reloads_per_minute,
        min_hold=min_hold,
        fail_threshold=fail_threshold,
        recover_threshold=recover_threshold,
        ramp_duration=ramp,
        refused_grace=refused_grace,
        stale_after=stale_after,
        speed_aware=speed_aware,
        scale=scale,
        max_weight=max(100, scale),
    )
    controller = bool(push_to) or push_to_file is not None
    if out is None and not controller:
        raise UsageError("--out is required (or --push-to/--push-to-file: controller mode)")
    opts = render_options(
        mode=mode, flavor=flavor, listen=listen, template_dir=template_dir, max_fails=max_fails,
        fail_timeout=fail_timeout, keepalive=keepalive, access_log=access_log, admin_listen=admin_listen,
        balancer=balancer, admin_allow=admin_allow,
        read_timeout=read_timeout, connect_timeout=connect_timeout, client_body_buffer_size=client_body_buffer_size,
        lua_dict_size=lua_dict_size,
        access_log_format=access_log_format, tls_cert=tls_cert, tls_key=tls_key, api_keys_file=api_keys_file,
        api_keys_forward=api_keys_forward, rate_limit=rate_limit, rate_burst=rate_burst,
        allow_empty=bool(registry_listen),  # instances register later: until then nginx answers 503
    )
    token_file = push_token_file.absolute() if push_token_file else None
    if token_file is None and out is not None and controller:
        token_file = (admin_token_file or admin.token_path(out.absolute())).absolute()
    urls = [u for entry in push_to or () for u in entry.split(",") if u.strip()]
    frontends = tuple(frontend_specs(urls, token_file)) if controller else ()

    def spec_of(dry: bool) -> TargetSpec:  # dry: every check, nothing written (the API key map)
        return replace(target_spec(opts, out=out, prefix=prefix, nginx_conf=nginx_conf, nginx_bin=nginx_bin,
                                   reload_cmd=reload_cmd, reload=not no_reload and out is not None,
                                   admin_token_file=admin_token_file, pid_file=pid_file, force=force, dry=dry),
                       controller=controller, frontends=frontends, push_timeout=push_timeout).validated()

    spec_of(dry=True)
    inventories = inventory_paths(inventory)
    settings = None
    if registry_listen:
        settings = RegistrySettings.from_options(registry_grace, registry_targets, registry_metrics_port,
                                                 registry_max_instances)
        server_options(registry_listen, registry_allow)
    # Every option checked (exit 2); now the listeners, before anything is written (the key map, the token, an
    # empty inventory): a port that is taken or an address not up yet is exit 1 (ListenError: systemd tries
    # again), and leaves nothing behind.
    if out is not None and not once and owner.held(out):  # (--once waits for it, and listens nowhere)
        owner.hold(out).close()  # raises, naming the sidecar that runs: a clearer word than its taken port
    telemetry = Telemetry(flavor=flavor.value)
    with contextlib.ExitStack() as listening:
        metrics_at = None
        if not once and metrics_listen.lower() != "off":
            host, port = telemetry.serve(metrics_listen)
            listening.callback(telemetry.close)
            log.info("own metrics on http://%s:%d/metrics", host, port)
            metrics_at = Listen(host, port)
        server = None
        if registry_listen and not once:  # one cycle serves no registrations
            server = RegistryServer(registry_listen, allow=registry_allow)
            listening.callback(server.stop)
        spec = spec_of(dry=False)
        if settings is not None:
            settings = replace(settings, own=own_listeners(opts, out, server, metrics_at))
            # Before the sidecar loads the inventory: the registry creates it (empty) when missing.
            registered = Registry(inventories[0], inventories[1:], settings=settings)
            if server is not None:
                server.start(registered)
                log.info("registry: FastDeploy instances may POST http://%s/register", registry_listen)
        sidecar = _sidecar(spec, inventories, policy, state, debounce, interval, frontends, push_to_file,
                           token_file, once, telemetry)
        if once:
            if sidecar.once().error is not None:
                raise typer.Exit(1)  # the controller logged why; nginx keeps what it had
            return
        _run(sidecar, out, no_reload, interval, server is not None, registry_listen)


def own_listeners(opts: RenderOptions, out: Path | None, server: RegistryServer | None,
                  metrics_at: Listen | None) -> tuple[tuple[str, Listen], ...]:
    """fdngx's own listeners on this host, which the registry never takes for a replica: nginx's (a config
    this sidecar writes serves there), its admin server's, the registry's and the metrics'."""
    own = opts.listeners() if out is not None else []
    if server is not None:
        own.append(("--registry-listen", server.address))
    if metrics_at is not None:
        own.append(("--metrics-listen", metrics_at))
    # fdngx's own servers on [::] take IPv4 too (no IPV6_V6ONLY; nginx's `listen [::]` does not).
    own += [(o, Listen("0.0.0.0", at.port)) for o, at in list(own)
            if o in ("--registry-listen", "--metrics-listen") and at.host == "::"]
    return tuple(own)


def _sidecar(spec: TargetSpec, inventories: list[Path], policy: PolicyConfig, state: Path | None, debounce: float,
             interval: float, frontends: tuple[FrontendSpec, ...], push_to_file: Path | None,
             token_file: Path | None, once: bool, telemetry: Telemetry) -> Sidecar:
    """The loop, set up: the target opened (its prefix, token and key map made), this config's sidecar lock taken."""
    config = SidecarConfig(
        inventories=tuple(inventories),
        target=open_target(spec),
        policy=policy,
        state_path=state,
        debounce=debounce,
        scrape_deadline=min(1.5, max(0.2, interval * 0.75)),
        frontends=frontends,
        push_file=push_to_file.absolute() if push_to_file else None,
        push_token_file=token_file,
        owner_wait=ONCE_WAIT if once else 0.0,
    )
    return Sidecar(config, telemetry=telemetry)


def _run(sidecar: Sidecar, out: Path | None, no_reload: bool, interval: float, registering: bool,
         registry_listen: str | None) -> None:
    """The loop, with its signals: SIGTERM/SIGINT stop it after the cycle, SIGHUP re-reads the inventory (one
    that came during the set-up too: held since the start, fdngx.system.hups)."""

    def on_term(signum: int, frame: FrameType | None) -> None:
        sidecar.stop()

    def on_hup(signum: int, frame: FrameType | None) -> None:
        sidecar.inventory_changed(immediate=True)

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, on_term)
    if hups.hand_over(on_hup):
        log.info("SIGHUP during start-up: the inventory is read again as the loop starts")
        sidecar.inventory_changed(immediate=True)
    sidecar.watch()
    target = sidecar.config.target
    if target.fanout is not None:
        where = f"writing {out} and " if out is not None else ""
        how = f"{where}pushing to {len(target.fanout.labels)} frontend(s): {', '.join(target.fanout.labels[:8])}"
    else:
        how = f"writing {out}" + (f" and pushing weights to {target.admin.url}" if target.admin
                                  else ("" if no_reload else " and reloading nginx"))
    raise_fd_limit(2 * len(sidecar.inventory.instances))  # its scrape: /metrics and /health per replica
    log.info("sidecar: %d instance(s), every %.1fs, %s", len(sidecar.inventory.instances), interval, how)
    if registering and not sidecar.inventory.instances:
        log.info("no instance yet: nginx answers 503 (Retry-After: 1) until one registers at http://%s/register",
                 registry_listen)
    sidecar.run()


def register(app: typer.Typer) -> None:
    app.command("sidecar", epilog=EPILOG,
                short_help="Keep the weights in line with each replica's real load.")(sidecar_cmd)
