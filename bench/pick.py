"""What a pick costs a request as the fleet grows (python -m bench.pick): the OpenResty flavor's `least` over
N replicas, with the large-pool sampling as shipped (fdngx.pick: above SAMPLE_ABOVE usable replicas, least
among SAMPLE drawn at random) and, side by side in the same run, the same balancer made to read every
replica's load (the shipped pick.lua with SAMPLE_ABOVE set past any pool, given to `render --template-dir`).

A frontend per balancer (real nginx + the Lua module, rendered by `fdngx render`), both running at once in
front of the same N replicas, which one static nginx answers at once (bench.fleet.StaticReplicas: a 404 for
the request, which the balancer counts as no failure), so what grows with N is the frontends' own work. One
client sends sequential keep-alive requests to each in turns of BLOCK requests; per cell the median and p99
of a request's wall time, and the median's excess over N = 2 of the same balancer.
Target (issue 12, fleet): a request at 1,000 replicas costs under 0.2 ms more than at 2.
Prints numbers; asserts nothing. Every process it starts is stopped by process group, also on errors.

    python -m bench.pick                       # N = 2, 64, 1,000, 2,000; 5,000 requests per cell (~2 min)
    python -m bench.pick --sizes 2,1000 --requests 1000
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import statistics
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import requests

from bench.fleet.cluster import Frontends, StaticReplicas, make_token
from bench.lb import procs
from fdngx.nginx.render import builtin_template_dir

SHIPPED, FULL = "sampled (as shipped)", "every replica read"


def full_scan_templates(root: Path) -> Path:
    """A --template-dir whose lua/fdngx/pick.lua is the shipped one with SAMPLE_ABOVE past any pool."""
    text = (builtin_template_dir() / "lua" / "fdngx" / "pick.lua").read_text()
    patched, n = re.subn(r"^M\.SAMPLE_ABOVE = \d+$", "M.SAMPLE_ABOVE = math.huge", text, flags=re.M)
    if n != 1:
        raise SystemExit("bench.pick: pick.lua has no `M.SAMPLE_ABOVE = <n>` line to patch")
    d = root / "full-scan"
    (d / "lua" / "fdngx").mkdir(parents=True)
    (d / "lua" / "fdngx" / "pick.lua").write_text(patched)
    return d


MAX_SIZE = 3000  # 2 listening ports per replica in one nginx (bench.fleet.STATIC_CONF: 8192 connections)
BLOCK = 250  # requests to one frontend before the other takes its turn


def timed(session: requests.Session, url: str, count: int) -> list[float]:
    """Wall seconds of `count` sequential GETs on one keep-alive session."""
    out: list[float] = []
    for _ in range(count):
        t0 = time.perf_counter()
        r = session.get(url, timeout=10)
        out.append(time.perf_counter() - t0)
        if r.status_code != 404:  # the replicas' own 404, through the pick (no replica: 503)
            raise SystemExit(f"bench.pick: {url} answered {r.status_code}, expected the replica's 404")
    return out


def cell(n: int, variants: dict[str, tuple[str, ...]], count: int, workdir: Path) -> list[dict[str, Any]]:
    """Both balancers running at once in front of the same replicas, measured in turns of BLOCK requests
    (so a busy moment of the machine falls on both alike)."""
    d = workdir / f"n{n}"
    d.mkdir()
    token = make_token(d / "token")
    replicas = StaticReplicas(n, d)
    running: dict[str, Frontends] = {}
    sessions: dict[str, requests.Session] = {}
    rows = []
    try:
        for label, args in variants.items():
            fd = d / re.sub(r"\W+", "-", label)
            fd.mkdir()
            running[label] = Frontends(1, replicas, fd, token, render_args=args)
        sessions.update((label, requests.Session()) for label in running)
        urls = {label: f.site_urls[0] + "/v1/models" for label, f in running.items()}
        times: dict[str, list[float]] = {label: [] for label in running}
        for label in running:
            timed(sessions[label], urls[label], 50)  # warm: connections, the workers' copies
        while any(len(t) < count for t in times.values()):
            for label in running:
                times[label] += timed(sessions[label], urls[label], min(BLOCK, count - len(times[label])))
        for label, t in times.items():
            q = statistics.quantiles(t, n=100)
            rows.append({"replicas": n, "balancer": label, "requests": count,
                         "p50_ms": statistics.median(t) * 1000, "p99_ms": q[98] * 1000})
            print(f"{n:5d} replicas, {label:20s}: p50 {rows[-1]['p50_ms']:.3f} ms, p99 {rows[-1]['p99_ms']:.3f} ms",
                  flush=True)
    finally:
        for s in sessions.values():
            s.close()
        for f in running.values():
            f.stop()
        replicas.stop()
    return rows


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="2,64,1000,2000", help="replica counts (comma list; default %(default)s)")
    ap.add_argument("--requests", type=int, default=5000, help="measured requests per cell (default %(default)s)")
    ap.add_argument("--out", type=Path, default=Path("bench/results"), help="where pick.json goes")
    args = ap.parse_args(argv)
    try:
        sizes = sorted({int(x) for x in args.sizes.split(",")})
    except ValueError:
        ap.error(f"--sizes {args.sizes!r}: replica counts, comma-separated (e.g. 2,1000)")
    if not sizes or min(sizes) < 1 or max(sizes) > MAX_SIZE:
        ap.error(f"--sizes {args.sizes!r}: each from 1 to {MAX_SIZE} (the static replicas' nginx listens on 2 ports "
                 "per replica)")
    if args.requests < 100:
        ap.error(f"--requests {args.requests}: at least 100")
    started = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
    workdir = Path(tempfile.mkdtemp(prefix="fdngx-bench-pick-"))
    try:
        variants = {SHIPPED: (), FULL: ("--template-dir", str(full_scan_templates(workdir)))}
        rows = [r for n in sizes for r in cell(n, variants, args.requests, workdir)]
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    base = {r["balancer"]: r["p50_ms"] for r in rows if r["replicas"] == min(sizes)}
    print(f"\nA request's p50 over N = {min(sizes)} of the same balancer (target at 1,000: < +0.2 ms, sampled):")
    for r in rows:
        r["extra_ms"] = r["p50_ms"] - base[r["balancer"]]
        print(f"  {r['replicas']:5d} replicas, {r['balancer']:20s}: {r['extra_ms']:+.3f} ms")
    for n in sizes:
        by = {r["balancer"]: r["p50_ms"] for r in rows if r["replicas"] == n}
        print(f"  {n:5d} replicas: sampled / every replica read = {by[SHIPPED] / by[FULL]:.2f}")
    args.out.mkdir(parents=True, exist_ok=True)
    command = " ".join(["python -m bench.pick", *(argv if argv is not None else sys.argv[1:])])
    meta = {"started": started, "command": command, "machine": procs.machine()}
    (args.out / "pick.json").write_text(json.dumps({"meta": meta, "rows": rows, "sizes": sizes}, indent=1) + "\n")


if __name__ == "__main__":
    main()
