"""Options the commands share: one definition, one help text, one way to build what they describe."""

from __future__ import annotations

from pathlib import Path

import typer

from fdngx.domain import Balancer, Flavor, Mode
from fdngx.nginx import frontdoor, keymap
from fdngx.nginx.frontdoor import AccessLogFormat
from fdngx.nginx.render import RenderOptions
from fdngx.nginx.target import TargetSpec, check_out

DEFAULT_INVENTORY = Path("fdngx.json")
InventoryOpt = typer.Option(
    None,
    "--inventory",
    "-i",
    help="Inventory file (repeat to merge several, e.g. one per node). Default: ./fdngx.json.",
)


def inventory_paths(paths: list[Path] | None) -> list[Path]:
    """The inventories to read, as absolute paths (errors then name a file that means something in cron)."""
    return [p.absolute() for p in (paths or [DEFAULT_INVENTORY])]


ModeOpt = typer.Option(
    Mode.UPSTREAM, "--mode", "-m",
    help="upstream: the `upstream {}` block to include from your own config; site: upstream + a `server {}` "
    "for the OpenAI routes (include inside http {}); standalone: a complete nginx.conf that runs without "
    "root under --prefix.",
)
FlavorOpt = typer.Option(
    Flavor.NGINX,
    help="nginx (the default; needs no Lua module): least_conn with weights in the config (a weight change = a "
    "safe reload). openresty (recommended for production): a Lua balancer whose weights, health and members "
    "the sidecar (or cron) pushes into nginx's shared memory, never a reload.",
)
ListenOpt = typer.Option(
    "127.0.0.1:8080", help="site/standalone: ADDR:PORT (or PORT) nginx listens on: an address of this host "
    "(not multicast, broadcast or IPv4-mapped), not the address of a replica on this host."
)
PrefixOpt = typer.Option(
    None, help="nginx prefix (-p). standalone: pid, logs and temp files go here (default: --out's directory)."
)
NginxConfOpt = typer.Option(
    None, help="The main nginx.conf for `nginx -t -c` (default: nginx's own; standalone: --out)."
)
NginxBinOpt = typer.Option(None, help="nginx binary (default: nginx on PATH, then /usr/sbin/nginx, then "
                           "/usr/local/openresty/nginx/sbin/nginx).")
ReloadCmdOpt = typer.Option(
    None, help="Reload with this command instead of fdngx's own SIGHUP to the master, e.g. 'systemctl reload "
    "nginx'. fdngx still finds the master (its pid file) to prove the reload took."
)
PidFileOpt = typer.Option(
    None, "--pid-file", help="The nginx master's pid file (default: the `pid` in the main nginx.conf, else the "
    "one nginx -V was built with, e.g. /run/nginx.pid on Debian, logs/nginx.pid under OpenResty's prefix)."
)
ForceOpt = typer.Option(
    False, "--force", help="Replace an --out fdngx did not write (no fdngx header: a hand-written site, Debian's "
    "sites-enabled/default); it is kept as .NAME.fdngx-orig beside it. Also: change an fdngx config's --mode, "
    "or turn its TLS, API keys or the Lua balancer (--flavor openresty) off (a run that left an option out). "
    "Without it both are refused."
)
TemplateDirOpt = typer.Option(
    None, help="Directory whose templates override the built-in ones (same file names, e.g. _proxy.j2)."
)
MaxFailsOpt = typer.Option(
    3, help="Per-server max_fails (passive health: failures within fail-timeout), 0..100000; 0: never hold a "
    "failing replica out.")
FailTimeoutOpt = typer.Option(
    1, help="Per-server fail_timeout in seconds: how long nginx holds out a failing replica before it tries it "
    "again, so how soon a restarted one is used (nginx counts whole seconds: 1 means 1-2 s); 1..86400.")
KeepaliveOpt = typer.Option(64, help="Idle keepalive connections to the replicas per worker, 0..65535 (0: off); "
                            "each kept 4 s, below the engines' own 5 s.")
AdminListenOpt = typer.Option(
    "127.0.0.1:9401", help="openresty: ADDR:PORT of the loopback admin server that takes weight pushes; a port "
    "of its own (not --listen's)."
)
AdminAllowOpt = typer.Option(
    "loopback", help="openresty: who may reach the admin server (nginx `allow`, all else denied): IP addresses or "
    "CIDRs, comma-separated, or 'loopback'. Name the controllers' addresses when `fdngx sidecar --push-to` "
    "pushes from another host (the token is still required).",
)
AdminTokenFileOpt = typer.Option(
    None,
    help="openresty: admin token file, created (0600) if missing (default: .<out name>.fdngx-admin-token beside "
    "--out).",
)
BalancerOpt = typer.Option(
    Balancer.LEAST, help="openresty: least = least (in-flight + scraped external load) / weight over all replicas "
    "(over 16 drawn at random when more than 64 are usable); "
    "p2c = the better of two weight-drawn random replicas (measured: no better than least with 2 frontends, "
    "worse with 4; docs/benchmarks.md)."
)
SpeedAwareOpt = typer.Option(
    None,
    "--speed-aware/--no-speed-aware",
    help="Scale a replica's weight by its decode speed (time per output token against the fleet's median) "
    "when it differs by more than ~20 %: cuts p99 end-to-end latency, but through nginx's least_conn it "
    "raised p99 TTFT in the benchmark. Default: on for --flavor openresty, off for nginx.",
    show_default=False,
)
AccessLogOpt = typer.Option(
    None, help="site/standalone access log path or 'off' (default: logs/access.log under the prefix for "
    "standalone, /var/log/nginx/<upstream>.access.log for site); a plain file path of at most 1024 bytes (no "
    "syslog: targets)."
)

# -- the front door (site/standalone): fdngx.nginx.frontdoor --
ReadTimeoutOpt = typer.Option(
    "1h", help="site/standalone: how long nginx waits for a replica between two reads or writes "
    "(proxy_read_timeout, proxy_send_timeout): a stream silent for longer is cut. nginx time: 90s, 10m, 1h30m "
    "(units w d h m s ms, each once, largest first), 1ms..24d."
)
ConnectTimeoutOpt = typer.Option(
    "5s", help="site/standalone: how long nginx waits for a replica to accept a connection before it tries "
    "the next one (proxy_connect_timeout; an nginx time such as 5s, 1ms..24d)."
)
ClientBodyBufferSizeOpt = typer.Option(
    "1m", help="site/standalone: request bodies (prompts) up to this size stay in memory instead of a temp "
    "file (client_body_buffer_size; memory per request being read). nginx size: 512k, 1m (k or m: no g "
    "here), 1 byte..1024m."
)
LuaDictSizeOpt = typer.Option(
    "16m", help="openresty: size of the Lua balancer's shared dict (lua_shared_dict; nginx size, k or m, "
    "1m..4096m). 16m holds about 60,000 keys: a few per replica plus one per worker with requests open on "
    "it, and two snapshots of the fleet. A full one refuses pushes (HTTP 507) and says so; a new size takes "
    "effect at the next reload, with a fresh dict."
)
AccessLogFormatOpt = typer.Option(
    AccessLogFormat.TEXT, help="site/standalone access log lines: text (key=value) or json (one object a line, "
    "escape=json). Both carry the replica's time to first byte (upstream_header_time) and the request length."
)
TlsCertOpt = typer.Option(
    None, "--tls-cert", help="site/standalone: serve HTTPS with HTTP/2 on --listen with this certificate chain "
    "(PEM; with --tls-key). TLSv1.2 and TLSv1.3 only. Default: plain HTTP.", dir_okay=False,
)
TlsKeyOpt = typer.Option(None, "--tls-key", help="site/standalone: the private key of --tls-cert (PEM).",
                         dir_okay=False)
ApiKeysFileOpt = typer.Option(
    None, "--api-keys-file", help="site/standalone: nginx answers 401 (OpenAI's JSON) to /v1/ requests without "
    "'Authorization: Bearer <key>' for a key in this file: one a line (8-256 of A-Z a-z 0-9 . _ ~ + / = -), # "
    "comments. The keys go into a 0600 file beside --out (.<name>.fdngx-api-keys.<version>), never into the config; "
    "a running sidecar reads it again when it changes (its next cycle applies the new keys); without one, rerun "
    "render. /health stays open. Default: no keys.",
    dir_okay=False,
)
ApiKeysForwardOpt = typer.Option(
    True, "--api-keys-forward/--no-api-keys-forward", help="With --api-keys-file: pass the Authorization header "
    "on to the replica (for an engine that checks the key too, e.g. FastDeploy --api-key), or strip it."
)
RateLimitOpt = typer.Option(
    None, help="site/standalone: requests per client address (per API key with --api-keys-file) nginx passes "
    "on: 10 or 10r/s, 600r/m; more get 429 (OpenAI's JSON, Retry-After). Default: no limit."
)
RateBurstOpt = typer.Option(
    None, help="With --rate-limit: how many requests above the rate a client may send at once (passed on "
    "without delay), 1..100000 (nginx has no burst of 0). Default: one second's worth of the rate."
)


def render_options(
    *,
    mode: Mode,
    flavor: Flavor,
    listen: str,
    template_dir: Path | None,
    max_fails: int,
    fail_timeout: int,
    keepalive: int,
    access_log: str | None,
    admin_listen: str,
    balancer: Balancer,
    admin_allow: str = "loopback",
    read_timeout: str = "1h",
    connect_timeout: str = "5s",
    client_body_buffer_size: str = "1m",
    lua_dict_size: str = "16m",
    access_log_format: AccessLogFormat = AccessLogFormat.TEXT,
    tls_cert: Path | None = None,
    tls_key: Path | None = None,
    api_keys_file: Path | None = None,
    api_keys_forward: bool = True,
    rate_limit: str | None = None,
    rate_burst: int | None = None,
    allow_empty: bool = False,
) -> RenderOptions:
    template_dir = _absolute(template_dir)
    opts = RenderOptions(
        mode=mode, flavor=flavor, listen=listen, template_dir=template_dir, max_fails=max_fails,  # type: ignore[arg-type]
        fail_timeout=fail_timeout, keepalive=keepalive, access_log=access_log, admin_listen=admin_listen,  # type: ignore[arg-type]
        balancer_mode=balancer, admin_allow=admin_allow,  # type: ignore[arg-type]
        read_timeout=read_timeout, connect_timeout=connect_timeout, client_body_buffer_size=client_body_buffer_size,
        lua_dict_size=lua_dict_size, access_log_format=access_log_format, tls_cert=_path_text(tls_cert),
        tls_key=_path_text(tls_key),
        api_keys_file=_path_text(api_keys_file), api_keys_forward=api_keys_forward,
        rate_limit=rate_limit or "", rate_burst=rate_burst, allow_empty=allow_empty,  # type: ignore[arg-type]
    ).validated()
    # Files nginx's master will read: there and readable now, not at the reload.
    for what, path in (("--tls-cert", opts.tls_cert), ("--tls-key", opts.tls_key)):
        if path:
            frontdoor.check_readable(what, path)
    if opts.api_keys_file:
        frontdoor.load_api_keys(Path(opts.api_keys_file))  # refuses a bad file before anything is written
    return opts


def target_spec(
    opts: RenderOptions,
    *,
    out: Path | None,
    prefix: Path | None,
    nginx_conf: Path | None,
    nginx_bin: str | None,
    reload_cmd: str | None,
    reload: bool,
    admin_token_file: Path | None,
    dry: bool = False,
    pid_file: Path | None = None,
    force: bool = False,
) -> TargetSpec:
    # Absolute: errors then name files that mean something from cron, and nginx -p/-c get paths it cannot
    # resolve against its own compiled-in prefix instead of the directory fdngx was started in.
    out = _absolute(out)

    def spec(write: bool) -> TargetSpec:
        return TargetSpec(keymap.applied(opts, out, write=write), out, _absolute(prefix), _absolute(nginx_conf),
                          nginx_bin, reload_cmd, reload, _absolute(admin_token_file), _absolute(pid_file),
                          force).validated()

    checked = spec(False)  # every check of the options, and of the file at --out, first: a refused run writes
    if dry or out is None:  # no key map
        return checked
    check_out(checked)
    return spec(True)


def _absolute(path: Path | None) -> Path | None:
    return None if path is None else Path(path).absolute()


def _path_text(path: Path | None) -> str:
    return "" if path is None else str(_absolute(path))
