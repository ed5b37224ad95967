"""Fleet benchmark (issue 12 item 2): one controller (`fdngx sidecar` in controller mode, 2 s interval) in
front of 256 and 1,000 simulated replicas and 1, 4 and 8 OpenResty frontends, all on 127.0.0.1.

    python -m bench.fleet                                   # the whole grid (~15 min on 2 cores)
    python -m bench.fleet --replicas 64 --frontends 2 --window 10 --out /tmp/fleet   # a smoke run

Per cell: the scrape + policy wall time of each cycle (p50/p99, from the controller's own cycle log), the
controller's CPU (utime + stime from /proc over the window, % of one core) and RSS, each push's time per
frontend (POST + validate + install), weight agreement (every frontend's admin view at one generation:
identical weights and down flags), reloads (nginx master and worker pids over the window), and the CPU of
everything else (simulators, nginx, the rest of the machine). Targets (issue 12): cycle < 1 s, sidecar
< 50 % of a core at 2 s, push < 50 ms, identical weights, 0 reloads/min. Prints numbers; asserts nothing.
Every process it starts is stopped by process group, also on errors and Ctrl-C.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from bench.fleet.cluster import Controller, Frontends, Replicas, StaticReplicas, make_token
from bench.fleet.measure import window
from bench.fleet.report import write_report
from bench.lb import procs


def cell(replicas: Replicas, count: int, workdir: Path, token: Path, args: argparse.Namespace) -> dict[str, Any]:
    d = workdir / f"r{replicas.n}-f{count}{'-static' if isinstance(replicas, StaticReplicas) else ''}"
    d.mkdir()
    frontends = controller = None
    # Other users' jobs on the same 2 cores distort a window: wait (at most a minute) for a quiet second.
    busy = procs.wait_quiet(max_busy=0.3, window=1.0, max_wait=args.quiet_wait)
    started = time.monotonic()
    try:
        frontends = Frontends(count, replicas, d, token)
        controller = Controller(replicas, frontends.urls, d, token, interval=args.interval)
        # Warm-up: keep-alive connections open, the unhealthy replicas' 3 failed checks, first weights.
        controller.wait_cycles(args.warmup_cycles, timeout=args.warmup_cycles * args.interval * 3 + 60)
        result = window(replicas, frontends, controller, args.window)
    finally:
        if controller is not None:
            controller.stop()
        if frontends is not None:
            frontends.stop()
    result.update({"replicas": replicas.n, "frontends": count, "sims": len(replicas.sims),
                   "unhealthy": len(replicas.unhealthy), "interval_s": args.interval,
                   "cell_seconds": round(time.monotonic() - started, 1), "busy_before": round(busy, 3)})
    return result


def line(r: dict[str, Any]) -> str:
    a = r["agreement"]
    return (f"{r['replicas']:>5} replicas x {r['frontends']} frontend(s): scrape+policy p50 "
            f"{r['scrape_policy_ms']['p50']} ms p99 {r['scrape_policy_ms']['p99']} ms; sidecar "
            f"{r['sidecar_cpu_percent']} % of a core, RSS {r['sidecar_rss_mb']['max']} MB; push p50 "
            f"{r['push_ms']['p50']} ms p99 {r['push_ms']['p99']} ms; "
            f"identical {a['identical']}/{a['same_generation']}; "
            f"reloads/min {r['reloads_per_minute']}; cores busy {r['cpu_cores']['machine_busy']} (sims "
            f"{r['cpu_cores']['sims']}, nginx {r['cpu_cores']['nginx']}, other {r['cpu_cores']['bench_and_other']})")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--replicas", default="256,1000", help="replica counts (default 256,1000)")
    ap.add_argument("--frontends", default="1,4,8", help="frontend counts (default 1,4,8)")
    ap.add_argument("--sims", type=int, default=8, help="fdngx sim processes the replicas share (default 8)")
    ap.add_argument("--interval", type=float, default=2.0, help="controller interval in s (default 2)")
    ap.add_argument("--window", type=float, default=60.0, help="steady-state seconds measured per cell (default 60)")
    ap.add_argument("--warmup-cycles", type=int, default=6, help="cycles before the window (default 6)")
    ap.add_argument("--quiet-wait", type=float, default=60.0, help="seconds to wait for a quiet machine before "
                    "each cell (default 60)")
    ap.add_argument("--unhealthy", type=float, default=0.01, help="share of replicas answering /health 404")
    ap.add_argument("--static-replicas", default="", help="replica counts (e.g. 1000) to run again with the "
                    "replicas answered by one nginx serving simulator-rendered pages: the controller's own cost, "
                    "without the simulators' CPU on the same cores (default: none)")
    ap.add_argument("--out", type=Path, default=Path("bench/results"), help="where fleet.md/.json go")
    args = ap.parse_args(argv)
    counts: list[tuple[int, bool]] = [(int(x), False) for x in args.replicas.split(",") if x]
    counts += [(int(x), True) for x in args.static_replicas.split(",") if x]
    fronts = [int(x) for x in args.frontends.split(",")]
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    began = datetime.now(timezone.utc)
    machine = procs.machine()
    machine["busy_before"] = round(procs.wait_quiet(max_busy=0.3, window=1.0, max_wait=20.0), 3)
    print(f"machine: {machine['nproc']} cores {machine['cpu_model']}, load {machine['loadavg_at_start']}, "
          f"busy {machine['busy_before']:.0%} before the run", flush=True)
    results: list[dict[str, Any]] = []
    try:
        with tempfile.TemporaryDirectory(prefix="fdngx-fleet-") as tmp:
            workdir = Path(tmp)
            token = make_token(workdir / "admin-token")
            for n, static in counts:
                rdir = workdir / f"replicas-{n}{'-static' if static else ''}"
                rdir.mkdir()
                t0 = time.monotonic()
                sick = round(n * args.unhealthy)
                replicas = (StaticReplicas(n, rdir, unhealthy=sick) if static
                            else Replicas(n, min(args.sims, n), rdir, unhealthy=sick))
                where = "one static nginx" if static else f"{len(replicas.sims)} sim processes"
                print(f"{n} replicas up in {where} ({time.monotonic() - t0:.1f} s)", flush=True)
                try:
                    for count in fronts:
                        r = cell(replicas, count, workdir, token, args)
                        r["replica_server"] = "static nginx" if static else "fdngx sim"
                        results.append(r)
                        print(line(r), flush=True)
                finally:
                    replicas.stop()
    finally:
        procs.stop_all()
    ended = datetime.now(timezone.utc)
    command = "python -m bench.fleet " + " ".join(argv if argv is not None else sys.argv[1:])
    meta = {"began": began.isoformat(timespec="seconds"), "ended": ended.isoformat(timespec="seconds"),
            "command": command.strip(), "machine": machine, "settings": vars(args) | {"out": str(args.out)}}
    md, js = write_report(args.out, meta, results)
    print(f"wrote {md} and {js}")
    print(json.dumps(results[-1] if results else {}, indent=None)[:2000])


if __name__ == "__main__":
    main()
