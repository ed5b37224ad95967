"""One render job, as `fdngx render` (and cron) runs it: inventory -> text -> stdout, file, or safe apply.

The sidecar uses the same pieces (`nginx_control`, `nginx.safe_apply`), so there is one write path.
"""

from __future__ import annotations

import shlex
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from fdngx import inventory as inv_mod
from fdngx import openresty
from fdngx.cycle import CycleResult, run_cycle, state_path_for
from fdngx.errors import UsageError
from fdngx.nginx import ApplyResult, NginxControl, find_nginx, prepare_prefix, safe_apply, unified_diff
from fdngx.policy import config_for_flavor
from fdngx.render import RenderOptions, parse_listen, render
from fdngx.scrape import loads_of


@dataclass(frozen=True)
class RenderJob:
    inventories: Sequence[Path]
    opts: RenderOptions
    out: Path | None = None  # None: stdout
    prefix: Path | None = None
    nginx_conf: Path | None = None
    nginx_bin: str | None = None
    reload_cmd: str | None = None
    reload: bool = False
    check: bool = False
    diff: bool = False
    admin_token_file: Path | None = None
    scrape: bool = False  # cron mode: weights from one scrape + policy cycle, state beside --out
    speed_aware: bool | None = None  # cron mode: None = the flavor's default

    def validated(self) -> RenderJob:
        self.opts.validated()
        if (self.reload or self.check) and self.out is None:
            raise UsageError("--reload and --check need --out PATH (the file nginx reads)")
        if self.reload and self.check:
            raise UsageError("--check only compares; it cannot be combined with --reload")
        return self


@dataclass(frozen=True)
class RenderOutcome:
    text: str
    result: ApplyResult | None = None
    current: bool | None = None  # --check: is the file on disk up to date?
    diff: str = ""
    cycle: CycleResult | None = None  # --scrape: what the policy saw and decided


def standalone_prefix(job: RenderJob) -> Path | None:
    if job.opts.mode != "standalone":
        return job.prefix
    if job.prefix is not None:
        return job.prefix
    return job.out.parent.resolve() if job.out is not None else None


def nginx_control(job: RenderJob) -> NginxControl:
    """How to test/reload the nginx that reads `job.out`, derived from the mode and options."""
    binary = find_nginx(job.nginx_bin)
    reload_cmd = shlex.split(job.reload_cmd) if job.reload_cmd else None
    verify_url = None
    if job.opts.mode in ("site", "standalone"):
        host, port = parse_listen(job.opts.listen)
        verify_url = f"http://{'[' + host + ']' if ':' in host else host}:{port}/fdngx/generation"
    if job.opts.mode == "standalone":
        prefix = standalone_prefix(job)
        conf = job.nginx_conf or (job.out.resolve() if job.out else None)
        return NginxControl(binary, conf, prefix, "logs/error.log", reload_cmd, verify_url=verify_url)
    return NginxControl(binary, job.nginx_conf, job.prefix, None, reload_cmd, verify_url=verify_url)


def finalize_options(job: RenderJob) -> RenderOptions:
    """Fill in what the openresty flavor needs from the machine: the admin token and Lua modules."""
    opts = job.opts
    if opts.flavor != "openresty":
        return opts
    token_file = (job.admin_token_file or openresty.token_path(job.out)).resolve()
    openresty.ensure_token(token_file)
    modules = openresty.lua_modules(job.nginx_bin) if opts.mode == "standalone" else ()
    return replace(opts, admin_token_file=str(token_file), lua_modules=opts.lua_modules or modules)


def run_render(job: RenderJob) -> RenderOutcome:
    """Render once; write/apply per the job (with --scrape, weights from one policy cycle)."""
    job = job.validated()
    prefix = standalone_prefix(job)
    if prefix is not None and job.opts.mode == "standalone" and not (job.check or job.diff):
        prepare_prefix(prefix)  # before the token file, which lives there too
    job = replace(job, opts=finalize_options(job)).validated()
    dry = job.out is None or job.check or (job.diff and not job.reload)
    cycles: list[CycleResult] = []

    def content() -> str:
        inv = inv_mod.load_many(list(job.inventories))
        states = None
        if job.scrape:
            # Runs under safe_apply's lock: overlapping cron runs see each other's state in order.
            with tempfile.TemporaryDirectory() as scratch:
                state_path = state_path_for(job.out) if job.out is not None else Path(scratch) / "state.json"
                config = config_for_flavor(job.opts.flavor, speed_aware=job.speed_aware)
                cycles.append(run_cycle(inv, state_path=state_path, config=config, save=not dry))
            states = cycles[-1].states
        return render(inv, job.opts, states)

    if job.out is None:
        text = content()
        return RenderOutcome(text, cycle=cycles[-1] if cycles else None)
    if dry:
        text = content()
        try:
            old: bytes | None = job.out.read_bytes()
        except FileNotFoundError:
            old = None
        current = old == text.encode("utf-8")
        return RenderOutcome(text, None, current, unified_diff(old, text, job.out), cycles[-1] if cycles else None)
    control = nginx_control(job) if job.reload else None
    result = safe_apply(job.out, content, control, reload=job.reload)
    cycle = cycles[-1] if cycles else None
    if cycle is not None and job.opts.flavor == "openresty" and job.reload:
        # The config holds no weights in this flavor: they go to the balancer's shared memory.
        token_file = Path(job.opts.admin_token_file)
        openresty.Admin(job.opts.admin_listen, openresty.read_token(token_file)).push(
            cycle.states, loads_of(cycle.samples)
        )
    return RenderOutcome("", result, None, result.diff, cycle)
