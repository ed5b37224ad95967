"""`fdngx render`: inventory -> nginx config, printed, written, or safely applied; with --scrape, one
controller cycle (what cron runs)."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path

import typer

from fdngx import inventory as inv_mod
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
from fdngx.commands.status_served import fresh
from fdngx.domain import Balancer, Flavor, Inventory, Mode
from fdngx.errors import FdngxError, UsageError
from fdngx.logs import say
from fdngx.nginx.apply import unified_diff
from fdngx.nginx.frontdoor import AccessLogFormat
from fdngx.nginx.stamp import edited_by_hand
from fdngx.nginx.target import Target, open_target
from fdngx.system.files import Identity, identity, lock_waits_said_at, read_bytes_or_none, real_target
from fdngx.weights import owner
from fdngx.weights.controller import Controller, CycleResult
from fdngx.weights.settings import PolicyConfig, config_for_flavor
from fdngx.weights.store import StateStore, store_for

EPILOG = (
    examples(
        ("print the upstream block", "fdngx render --out -"),
        ("first time: write only; then include it from nginx.conf",
         "fdngx render --out /etc/nginx/fdngx/upstream.conf"),
        ("safe apply", "fdngx render --out /etc/nginx/fdngx/upstream.conf --reload"),
        ("cron, weights from load", "fdngx render --out /etc/nginx/fdngx/upstream.conf --reload --scrape"),
        ("a complete nginx.conf for a private nginx",
         "fdngx render --mode standalone --out /srv/fdngx/nginx.conf \n--listen 0.0.0.0:8080"),
        ("crontab: mail only on change or failure",
         "fdngx render --out /etc/nginx/fdngx/upstream.conf --reload --scrape \n--quiet"),
    ) +
    "upstream/site: --reload applies only a file nginx reads (`nginx -T` lists it; else it fails and a new file "
    "is removed): render a new --out once without --reload, include it from nginx.conf and reload nginx, then "
    "use --reload. "
    "Keep --out in a directory of its own (/etc/nginx/fdngx/): fdngx keeps its lock, backup and state beside it "
    "as dot-files.\n\n"
    "Exit codes: 0 applied or unchanged (--check: file is current), 1 error (openresty --scrape: also when the "
    "balancer holds a newer snapshot, from another controller or a clock ahead, so these weights were not "
    "applied) or (--check, --diff) file is stale, 2 usage."
)


def render_cmd(
    inventory: list[Path] | None = InventoryOpt,
    mode: Mode = ModeOpt,
    flavor: Flavor = FlavorOpt,
    out: str = typer.Option("-", "--out", "-o", help="Where to write: a file path, or - for stdout."),
    listen: str = ListenOpt,
    prefix: Path | None = PrefixOpt,
    scrape: bool = typer.Option(
        False, "--scrape", help="Cron mode: weights from one metrics scrape + the sidecar's policy; its state "
        "(smoothing, hold times, failure counts) persists beside --out (.<name>.fdngx-state.json) between runs."
    ),
    reload: bool = typer.Option(
        False, "--reload", help="Safe apply: lock, test the candidate, swap, `nginx -t`, reload, confirm, roll back "
        "on failure."
    ),
    check: bool = typer.Option(
        False, "--check", help="Only compare: exit 0 if --out is current, 1 if a render would change it (this "
        "render: without --scrape, the inventory's static weights; over a config whose weights a cron job or "
        "sidecar keeps, it says so: --check --scrape compares with what their next cycle writes)."
    ),
    diff: bool = typer.Option(False, "--diff", help="Show a unified diff against --out (alone: change nothing)."),
    nginx_conf: Path | None = NginxConfOpt,
    nginx_bin: str | None = NginxBinOpt,
    reload_cmd: str | None = ReloadCmdOpt,
    pid_file: Path | None = PidFileOpt,
    force: bool = ForceOpt,
    template_dir: Path | None = TemplateDirOpt,
    max_fails: int = MaxFailsOpt,
    fail_timeout: int = FailTimeoutOpt,
    keepalive: int = KeepaliveOpt,
    admin_listen: str = AdminListenOpt,
    admin_allow: str = AdminAllowOpt,
    admin_token_file: Path | None = AdminTokenFileOpt,
    balancer: Balancer = BalancerOpt,
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
    speed_aware: bool | None = SpeedAwareOpt,
    quiet: bool = typer.Option(
        False, "--quiet", "-q", help="For cron: print nothing unless something changed or failed (errors still go "
        "to stderr, exit 1); no 'unchanged' or 'current' line.",
    ),
) -> None:
    """Render the nginx config for the inventory; with --reload, apply it safely.

    Deterministic: the same inventory (and weights) always gives the same bytes, so an unchanged
    render never reloads nginx. This is the command to run from cron.
    """
    out_path = None if out == "-" else Path(out).absolute()  # errors and summaries name it as cron can use it
    if (reload or check) and out_path is None:
        raise UsageError("--reload and --check need --out PATH (the file nginx reads)")
    if reload and check:
        raise UsageError("--check only compares; it cannot be combined with --reload")
    opts = render_options(
        mode=mode, flavor=flavor, listen=listen, template_dir=template_dir, max_fails=max_fails,
        fail_timeout=fail_timeout, keepalive=keepalive, access_log=access_log, admin_listen=admin_listen,
        balancer=balancer, admin_allow=admin_allow,
        read_timeout=read_timeout, connect_timeout=connect_timeout, client_body_buffer_size=client_body_buffer_size,
        lua_dict_size=lua_dict_size,
        access_log_format=access_log_format, tls_cert=tls_cert, tls_key=tls_key, api_keys_file=api_keys_file,
        api_keys_forward=api_keys_forward, rate_limit=rate_limit, rate_burst=rate_burst,
    )
    dry = out_path is None or check or (diff and not reload)
    paths = inventory_paths(inventory)
    seen = [identity(p) for p in paths]
    inv = inv_mod.load_many(paths)
    # Every instance drained: refused before a key map, prefix, token or peers file is made.
    inv_mod.in_rotation(inv)
    spec = target_spec(opts, out=out_path, prefix=prefix, nginx_conf=nginx_conf, nginx_bin=nginx_bin,
                       reload_cmd=reload_cmd, reload=reload and not dry, admin_token_file=admin_token_file,
                       dry=dry, pid_file=pid_file, force=force)
    target = open_target(spec, dry=dry)
    policy = config_for_flavor(flavor, speed_aware=speed_aware) if scrape else None
    store = store_for(out_path) if scrape and out_path is not None else None
    if dry:
        # Change nothing: no write, no push, no state saved.
        preview = Controller(target.dry(), policy, log_outcome=False).run_once(inv, store, save=False)
        if preview.error is not None:  # a template or option the render refused: nothing to show or compare
            say(f"fdngx: error: {preview.error}", logging.ERROR, color="red")
            raise typer.Exit(1)
        text = preview.text
        if out_path is None:
            typer.echo(text, nl=False)
            return
        old = read_bytes_or_none(real_target(out_path))
        if diff:
            typer.echo(unified_diff(old, text, out_path), nl=False)
        current = old == text.encode("utf-8")
        if (check or diff) and not scrape and not (quiet and current) and (kept := policy_keeps(out_path, flavor)):
            say(f"fdngx: note: compared with a render of the inventory's static weights: {kept}; --scrape compares "
                "with what its next cycle writes")
        if check and not (quiet and current):
            edited = " (edited by hand since fdngx wrote it: an apply keeps the edit beside it)" if (
                not current and edited_by_hand(old)) else ""
            say(f"{out_path}: {'current' if current else 'stale: a render would change it'}{edited}")
        if (check or diff) and not current:
            raise typer.Exit(1)
        return
    if out_path is not None and owner.held(out_path):
        say(f"fdngx: warning: a running fdngx sidecar manages {out_path}: its next cycle rewrites what this render "
            "writes (to change its options, restart it with them)", logging.WARNING, color="yellow")
    elif out_path is not None and not scrape and (kept := policy_keeps(out_path, flavor)):
        # A cron job's config: no sidecar lock to find, but its policy state says someone keeps the weights.
        say(f"fdngx: warning: {kept}: this render without --scrape resets them to the inventory's static weights "
            "(and takes `backup` off) until its next cycle; use --scrape to keep them", logging.WARNING,
            color="yellow")
    with lock_waits_said_at(logging.DEBUG if quiet else logging.INFO):  # --quiet: a wait alone is not news
        result = apply_fresh(target, policy, store, paths, seen, inv)
    if result.error is not None:
        say(f"fdngx: error: {result.error}", logging.ERROR, color="red")
        raise typer.Exit(1)
    if result.superseded is not None and result.decisions is not None:  # these weights were applied nowhere
        say(f"fdngx: error: not pushed: {result.superseded}", logging.ERROR, color="red")
        raise typer.Exit(1)
    if diff and result.applied is not None and result.applied.diff:
        typer.echo(result.applied.diff, nl=False)
    applied = result.applied
    # Quiet: an unchanged file is news only with a note (nginx not running).
    if applied is not None and (not quiet or applied.changed or applied.note):
        say(applied.summary, logging.WARNING if applied.note else logging.INFO)
    if result.pushed is not None and not (quiet and not result.changed):
        if result.superseded is not None:  # static: the peers file re-sent, and a sidecar's newer snapshot kept
            say(f"peers file not applied: {result.superseded}")
        else:  # openresty: the weights went to the balancer, no reload
            say(f"pushed weights to {result.pushed} peer(s)")


def policy_keeps(out: Path, flavor: Flavor) -> str | None:
    """Whose weights a render without --scrape over `out` would replace, for people (None: nobody's): a cron
    job's or sidecar's, when the policy state beside it was written recently (fdngx.commands.status_served.fresh).
    The OpenResty flavor's static render replaces none: its file holds no weights, and the balancer keeps a
    newer pushed snapshot over its peers file."""
    if flavor is Flavor.OPENRESTY:
        return None
    store = store_for(out)
    if not store.path.is_file():
        return None
    try:
        state = store.load()
    except FdngxError:  # a state another account owns: the apply does not read it, and says nothing of it here
        return None
    if state.updated_at is None or not any(st.weight is not None for st in state.instances.values()):
        return None
    age = max(0.0, time.time() - state.updated_at)
    interval = state.config.get("interval")
    if not fresh(age, interval if isinstance(interval, int | float) else 0.0):
        return None
    return (f"a cron job or sidecar keeps the weights of {out} from the replicas' load (its policy state "
            f"{store.path}, written {age:.0f} s ago)")


RERUNS = 3  # a render whose inventory changed under it runs again at most this many times


def apply_fresh(target: Target, policy: PolicyConfig | None, store: StateStore | None, paths: list[Path],
                seen: list[Identity | None], inv: Inventory) -> CycleResult:
    """One cycle, applied only if the inventory is still what it read (asked under the apply lock). cron's
    `render --scrape` reads it, then scrapes for seconds: an admin who drained a replica and rendered meanwhile
    would see the drain undone. Then nothing is written; it reads the inventory again and runs again."""
    for attempt in range(RERUNS + 1):
        result = Controller(target, policy, log_outcome=False, inputs_changed=changed_since(paths, seen)).run_once(
            inv, store, save_stale=attempt == RERUNS)
        if result.applied is not None and result.applied.recovered:
            # What an earlier run left, put right first: said at once, even when quiet, and also when this
            # attempt then fails to push or runs again (an apply that fails says it itself: fdngx.nginx.apply).
            say(result.applied.recovered, logging.WARNING)
        if not result.stale_inputs or attempt == RERUNS:
            break
        say(f"fdngx: {result.error}; running again with the inventory as it is now", logging.WARNING)
        seen = [identity(p) for p in paths]
        inv = inv_mod.load_many(paths)
        inv_mod.in_rotation(inv)
    return result


def changed_since(paths: list[Path], seen: list[Identity | None]) -> Callable[[], str | None]:
    """Which inventory file changed since this run read it (None: none)."""
    def changed() -> str | None:
        moved = [str(p) for p, was in zip(paths, seen, strict=True) if identity(p) != was]
        return f"the inventory changed while this run worked ({', '.join(moved)})" if moved else None
    return changed


def register(app: typer.Typer) -> None:
    app.command("render", epilog=EPILOG,
                short_help="Render the nginx config; with --reload, apply it safely.")(render_cmd)
