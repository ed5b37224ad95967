"""Options the commands share: one definition, one help text, one way to build what they describe."""

from __future__ import annotations

from pathlib import Path

import typer

from fdngx.domain import Balancer, Flavor, Mode
from fdngx.nginx.render import RenderOptions
from fdngx.nginx.target import TargetSpec

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
    help="nginx: weights in the config (a weight change = a reload). openresty: a Lua balancer whose weights "
    "the sidecar (or cron) pushes into nginx's shared memory, never a reload.",
)
ListenOpt = typer.Option("127.0.0.1:8080", help="site/standalone: ADDR:PORT (or PORT) nginx listens on.")
PrefixOpt = typer.Option(
    None, help="nginx prefix (-p). standalone: pid, logs and temp files go here (default: --out's directory)."
)
NginxConfOpt = typer.Option(
    None, help="The main nginx.conf for `nginx -t -c` (default: nginx's own; standalone: --out)."
)
NginxBinOpt = typer.Option(None, help="nginx binary (default: nginx on PATH, then /usr/sbin/nginx).")
ReloadCmdOpt = typer.Option(
    None, help="Reload with this command instead of `nginx -s reload`, e.g. 'systemctl reload nginx'."
)
TemplateDirOpt = typer.Option(
    None, help="Directory whose templates override the built-in ones (same file names, e.g. _proxy.j2)."
)
MaxFailsOpt = typer.Option(3, help="Per-server max_fails (passive health: failures within fail-timeout).")
FailTimeoutOpt = typer.Option(3, help="Per-server fail_timeout in seconds.")
KeepaliveOpt = typer.Option(64, help="Idle keepalive connections to the replicas per worker (0: off).")
AdminListenOpt = typer.Option(
    "127.0.0.1:9401", help="openresty: ADDR:PORT of the loopback admin server that takes weight pushes."
)
AdminTokenFileOpt = typer.Option(
    None,
    help="openresty: admin token file, created (0600) if missing (default: .<out name>.fdngx-admin-token beside "
    "--out).",
)
BalancerOpt = typer.Option(
    Balancer.LEAST, help="openresty: least = least (in-flight + scraped external load) / weight over all replicas; "
    "p2c = the better of two random replicas (less herding with several frontends)."
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
    "standalone, /var/log/nginx/<upstream>.access.log for site)."
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
) -> RenderOptions:
    template_dir = _absolute(template_dir)
    return RenderOptions(
        mode=mode, flavor=flavor, listen=listen, template_dir=template_dir, max_fails=max_fails,  # type: ignore[arg-type]
        fail_timeout=fail_timeout, keepalive=keepalive, access_log=access_log, admin_listen=admin_listen,  # type: ignore[arg-type]
        balancer_mode=balancer,
    ).validated()


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
) -> TargetSpec:
    # Absolute: errors then name files that mean something from cron, and nginx -p/-c get paths it cannot
    # resolve against its own compiled-in prefix instead of the directory fdngx was started in.
    return TargetSpec(opts, _absolute(out), _absolute(prefix), _absolute(nginx_conf), nginx_bin, reload_cmd, reload,
                      _absolute(admin_token_file)).validated()


def _absolute(path: Path | None) -> Path | None:
    return None if path is None else Path(path).absolute()
