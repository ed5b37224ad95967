"""`fdngx render`: inventory -> nginx config, printed, written, or safely applied."""

from __future__ import annotations

from pathlib import Path

import typer

from fdngx.apply import RenderJob, run_render
from fdngx.cli import InventoryOpt, app, inventory_paths
from fdngx.commands.options import (
    AccessLogOpt,
    AdminListenOpt,
    AdminTokenFileOpt,
    BalancerOpt,
    FailTimeoutOpt,
    FlavorOpt,
    KeepaliveOpt,
    ListenOpt,
    MaxFailsOpt,
    ModeOpt,
    NginxBinOpt,
    NginxConfOpt,
    PrefixOpt,
    ReloadCmdOpt,
    SpeedAwareOpt,
    TemplateDirOpt,
    render_options,
)

EPILOG = (
    "Examples:\n\n"
    "  fdngx render --out -                                   # print the upstream block\n\n"
    "  fdngx render --out /etc/nginx/conf.d/fdngx-upstream.conf --reload   # safe apply (cron)\n\n"
    "  fdngx render --mode standalone --out /srv/fdngx/nginx.conf --listen 0.0.0.0:8080\n\n"
    "Exit codes: 0 applied or unchanged (--check: file is current), 1 error or (--check) file is stale, 2 usage."
)


@app.command("render", epilog=EPILOG)
def render_cmd(
    inventory: list[Path] | None = InventoryOpt,
    mode: str = ModeOpt,
    flavor: str = FlavorOpt,
    out: str = typer.Option("-", "--out", "-o", help="Where to write: a file path, or - for stdout."),
    listen: str = ListenOpt,
    prefix: Path | None = PrefixOpt,
    scrape: bool = typer.Option(
        False, "--scrape", help="Cron mode: weights from one metrics scrape + the sidecar's policy; its state "
        "(smoothing, hold times, failure counts) persists in <out>.state.json between runs."
    ),
    reload: bool = typer.Option(
        False, "--reload", help="Safe apply: lock, write atomically, `nginx -t`, reload, confirm, roll back on failure."
    ),
    check: bool = typer.Option(
        False, "--check", help="Only compare: exit 0 if --out is current, 1 if a render would change it."
    ),
    diff: bool = typer.Option(False, "--diff", help="Show a unified diff against --out (alone: change nothing)."),
    nginx_conf: Path | None = NginxConfOpt,
    nginx_bin: str | None = NginxBinOpt,
    reload_cmd: str | None = ReloadCmdOpt,
    template_dir: Path | None = TemplateDirOpt,
    max_fails: int = MaxFailsOpt,
    fail_timeout: int = FailTimeoutOpt,
    keepalive: int = KeepaliveOpt,
    admin_listen: str = AdminListenOpt,
    admin_token_file: Path | None = AdminTokenFileOpt,
    balancer: str = BalancerOpt,
    access_log: str | None = AccessLogOpt,
    speed_aware: bool | None = SpeedAwareOpt,
) -> None:
    """Render the nginx config for the inventory; with --reload, apply it safely.

    Deterministic: the same inventory (and weights) always gives the same bytes, so an unchanged
    render never reloads nginx. This is the command to run from cron.
    """
    opts = render_options(
        mode=mode, flavor=flavor, listen=listen, template_dir=template_dir, max_fails=max_fails,
        fail_timeout=fail_timeout, keepalive=keepalive, access_log=access_log, admin_listen=admin_listen,
        balancer=balancer,
    )
    job = RenderJob(
        inventories=inventory_paths(inventory),
        opts=opts,
        out=None if out == "-" else Path(out),
        prefix=prefix,
        nginx_conf=nginx_conf,
        nginx_bin=nginx_bin,
        reload_cmd=reload_cmd,
        reload=reload,
        check=check,
        diff=diff,
        admin_token_file=admin_token_file,
        scrape=scrape,
        speed_aware=speed_aware,
    )
    outcome = run_render(job)
    if outcome.cycle is not None:
        for d in outcome.cycle.decisions:
            if d.changed:
                typer.echo(f"fdngx: {d.name}: {d.reason}", err=True)
    if job.out is None:
        typer.echo(outcome.text, nl=False)
        return
    if diff and outcome.diff:
        typer.echo(outcome.diff, nl=False)
    if outcome.result is not None:
        typer.echo(outcome.result.summary, err=True)
    elif check:
        typer.echo(f"{job.out}: {'current' if outcome.current else 'stale: a render would change it'}", err=True)
        if not outcome.current:
            raise typer.Exit(1)
