"""`fdngx render`: inventory -> nginx config, printed, written, or safely applied."""

from __future__ import annotations

from pathlib import Path

import typer

from fdngx.apply import RenderJob, run_render
from fdngx.cli import InventoryOpt, app, inventory_paths
from fdngx.render import RenderOptions

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
    mode: str = typer.Option(
        "upstream",
        "--mode",
        "-m",
        help="upstream: the `upstream {}` block to include from your own config; site: upstream + a "
        "`server {}` for the OpenAI routes (include inside http {}); standalone: a complete nginx.conf "
        "that runs without root under --prefix.",
    ),
    flavor: str = typer.Option("nginx", help="nginx: weights in the config (a weight change = a reload); "
                               "openresty: a Lua balancer whose weights the sidecar updates with no reload."),
    out: str = typer.Option("-", "--out", "-o", help="Where to write: a file path, or - for stdout."),
    listen: str = typer.Option("127.0.0.1:8080", help="site/standalone: ADDR:PORT (or PORT) nginx listens on."),
    prefix: Path | None = typer.Option(
        None, help="nginx prefix (-p). standalone: pid, logs and temp files go here (default: --out's directory)."
    ),
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
    nginx_conf: Path | None = typer.Option(
        None, help="The main nginx.conf for `nginx -t -c` (default: nginx's own; standalone: --out)."
    ),
    nginx_bin: str | None = typer.Option(None, help="nginx binary (default: nginx on PATH, then /usr/sbin/nginx)."),
    reload_cmd: str | None = typer.Option(
        None, help="Reload with this command instead of `nginx -s reload`, e.g. 'systemctl reload nginx'."
    ),
    template_dir: Path | None = typer.Option(
        None, help="Directory whose templates override the built-in ones (same file names, e.g. _proxy.j2)."
    ),
    max_fails: int = typer.Option(3, help="Per-server max_fails (passive health: failures within fail-timeout)."),
    fail_timeout: int = typer.Option(10, help="Per-server fail_timeout in seconds."),
    keepalive: int = typer.Option(64, help="Idle keepalive connections to the replicas per worker (0: off)."),
    admin_listen: str = typer.Option(
        "127.0.0.1:9401", help="openresty: ADDR:PORT of the loopback admin server the sidecar pushes weights to."
    ),
    admin_token_file: Path | None = typer.Option(
        None, help="openresty: admin token file, created (0600) if missing (default: fdngx-admin.token beside --out)."
    ),
    balancer: str = typer.Option(
        "least", help="openresty: least = least (in-flight + scraped external load) / weight over all replicas; "
        "p2c = the better of two random replicas (less herding with several frontends)."
    ),
    access_log: str | None = typer.Option(
        None, help="site/standalone access log path or 'off' (default: logs/access.log under the prefix "
        "for standalone, /var/log/nginx/<upstream>.access.log for site)."
    ),
) -> None:
    """Render the nginx config for the inventory; with --reload, apply it safely.

    Deterministic: the same inventory (and weights) always gives the same bytes, so an unchanged
    render never reloads nginx. This is the command to run from cron.
    """
    opts = RenderOptions(
        mode=mode,
        flavor=flavor,
        listen=listen,
        template_dir=template_dir,
        max_fails=max_fails,
        fail_timeout=fail_timeout,
        keepalive=keepalive,
        access_log=access_log,
        admin_listen=admin_listen,
        balancer_mode=balancer,
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
