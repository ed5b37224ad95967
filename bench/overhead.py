"""Proxy overhead: what a frontend adds per request, and whether it holds SSE back.

    python -m bench.overhead [--frontend direct,nginx-lc,fdngx-static,fdngx-openresty,sglang-p2] [--reps 3]

1. Tiny non-streaming chat completions (max_tokens 1) from 32 concurrent clients against 4 simulated replicas
   with a 0.2 ms step, direct (the client spreads requests over the replicas itself) vs through each
   frontend: req/s and p50/p99, paced (each client waits 20 ms between requests, machine not saturated: the
   added p50 is the proxy's latency) and CPU-bound (back to back: req/s shows what CPU the proxy takes on
   2 shared cores, and latency there is just concurrency / throughput).
2. Time to the first SSE byte of a streaming request (max_tokens 32 at 50 tokens/s), one at a time, the
   stream dropped after its first byte: a buffering proxy would hold it until the stream ends (~0.65 s).

Writes bench/results/overhead.json (with a markdown table that results.md quotes) and prints the table.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import aiohttp

from bench.lb import procs
from bench.lb.cluster import Cluster
from bench.lb.frontends import FRONTENDS
from bench.lb.stats import percentile
from bench.lb.workload import ReplicaSpec

CONCURRENCY = 32
FAST = 100.0  # replicas' speed factor for the tiny requests: a 0.2 ms step, so no step quantisation
THINK = 0.02  # paced variant: each of the 32 clients waits this long between requests
TINY = json.dumps({"model": "fdngx-sim", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}).encode()
SSE = json.dumps({"model": "fdngx-sim", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 32,
                  "stream": True}).encode()
HEADERS = {"Content-Type": "application/json"}
PATH = "/v1/chat/completions"


async def closed_loop(urls: list[str], duration: float, think: float = 0.0) -> dict[str, float]:
    """CONCURRENCY workers, each sending its next request `think` s after the last one was answered."""
    lat: list[float] = []
    errors = 0
    rr = itertools.cycle(urls)
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector, trust_env=False) as s:
        # Warm the connection pools before measuring.
        await asyncio.gather(*(s.post(u + PATH, data=TINY, headers=HEADERS) for u in urls * 4))
        stop = time.monotonic() + duration

        async def worker() -> None:
            nonlocal errors
            while time.monotonic() < stop:
                t = time.monotonic()
                try:
                    async with s.post(next(rr) + PATH, data=TINY, headers=HEADERS) as r:
                        await r.read()
                        if r.status != 200:
                            errors += 1
                            continue
                except aiohttp.ClientError:
                    errors += 1
                    continue
                lat.append(time.monotonic() - t)
                if think:
                    await asyncio.sleep(think)

        t0 = time.monotonic()
        await asyncio.gather(*(worker() for _ in range(CONCURRENCY)))
        wall = time.monotonic() - t0
    return {"rps": len(lat) / wall, "p50_ms": percentile(lat, 50) * 1000, "p99_ms": percentile(lat, 99) * 1000,
            "errors": errors}


async def first_byte(urls: list[str], n: int) -> dict[str, float]:
    ttfb: list[float] = []
    rr = itertools.cycle(urls)
    async with aiohttp.ClientSession(trust_env=False) as s:
        for _ in range(n):
            t = time.monotonic()
            async with s.post(next(rr) + PATH, data=SSE, headers=HEADERS) as r:
                await r.content.readany()
                ttfb.append(time.monotonic() - t)
                r.close()  # drop the rest: only the first byte matters here
    return {"p50_ms": percentile(ttfb, 50) * 1000, "p99_ms": percentile(ttfb, 99) * 1000}


def measure(frontend: str, work: Path, duration: float, sse_requests: int) -> dict[str, dict[str, float]]:
    """One replica set and one frontend for all three measurements (speed is changed at run time)."""
    cluster = Cluster([ReplicaSpec() for _ in range(4)], work / f"sim-{frontend}", 1)
    fe = None if frontend == "direct" else FRONTENDS[frontend]()
    out: dict[str, dict[str, float]] = {}
    try:
        cluster.start()
        urls = [cluster.url(i) for i in range(cluster.n)] if fe is None else fe.start(cluster, work, 1)
        out["sse"] = asyncio.run(first_byte(urls, sse_requests))
        for sim in cluster.sims:
            assert sim is not None
            sim.fault(0, speed=FAST)
        out["paced"] = asyncio.run(closed_loop(urls, duration, THINK))
        out["cpu_bound"] = asyncio.run(closed_loop(urls, duration))
        return out
    finally:
        if fe is not None:
            fe.stop()
        cluster.stop()


def _row(name: str, m: dict[str, float], base: dict[str, float] | None) -> str:
    add = f"{m['p50_ms'] - base['p50_ms']:+.2f}" if base else "n/a"
    return f"| {name} | {m['rps']:.0f} | {m['p50_ms']:.2f} | {m['p99_ms']:.2f} | {add} |"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(prog="python -m bench.overhead", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--frontend", default="direct,nginx-lc,fdngx-static,fdngx-openresty,sglang-p2")
    p.add_argument("--duration", type=float, default=6.0)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--sse-requests", type=int, default=100)
    p.add_argument("--out", type=Path, default=Path("bench/results"))
    args = p.parse_args(argv)
    fes = [f.strip() for f in args.frontend.split(",") if f.strip()]
    work = Path(tempfile.mkdtemp(prefix="fdngx-overhead-"))
    raw: dict[str, list[dict[str, dict[str, float]]]] = {}
    busy: list[float] = []
    try:
        for rep in range(args.reps):
            for f in fes:  # interleaved, so drift in machine load hits every frontend alike
                busy.append(procs.wait_quiet())
                r = measure(f, work, args.duration, args.sse_requests)
                raw.setdefault(f, []).append(r)
                print(f"rep {rep} {f:14s} paced {r['paced']['rps']:5.0f} req/s p50 {r['paced']['p50_ms']:.2f} ms; "
                      f"cpu-bound {r['cpu_bound']['rps']:5.0f} req/s p50 {r['cpu_bound']['p50_ms']:.2f} ms; "
                      f"first SSE byte p50 {r['sse']['p50_ms']:.2f} ms", flush=True)
    finally:
        procs.stop_all()
        shutil.rmtree(work, ignore_errors=True)
    med = {f: {mode: {k: statistics.median(x[mode][k] for x in runs) for k in runs[0][mode]}
               for mode in ("paced", "cpu_bound", "sse")} for f, runs in raw.items()}
    base = med.get("direct")
    lines = [f"Concurrency {CONCURRENCY}, tiny non-streaming chat completions (max_tokens 1), {args.duration:g} s "
             f"per cell, medians of {args.reps} repeats. Machine busy share before each cell (other users): max "
             f"{max(busy, default=0):.0%}.", "",
             f"**Paced** (32 clients, each waiting {THINK * 1000:.0f} ms between requests, replicas with a 0.2 ms "
             "step: "
             "the 2 cores are not saturated, so the difference is the proxy's own latency):", "",
             "| path | req/s | p50 ms | p99 ms | added p50 ms |", "|---|---|---|---|---|"]
    lines += [_row(f, m["paced"], base["paced"] if base else None) for f, m in med.items()]
    lines += ["", "**CPU-bound** (32 clients back to back: client, replicas and proxy saturate the 2 cores, so "
              "req/s shows the CPU a proxy takes from the rest; latency here is concurrency / throughput):", "",
              "| path | req/s | p50 ms | p99 ms | added p50 ms |", "|---|---|---|---|---|"]
    lines += [_row(f, m["cpu_bound"], base["cpu_bound"] if base else None) for f, m in med.items()]
    lines += ["", f"**First SSE byte** ({args.sse_requests} sequential streams, max_tokens 32 at 50 tokens/s: a "
              "buffering proxy would hold it for the whole ~0.65 s stream):", "",
              "| path | p50 ms | p99 ms | added p50 ms |", "|---|---|---|---|"]
    for f, m in med.items():
        add = f"{m['sse']['p50_ms'] - base['sse']['p50_ms']:+.2f}" if base else "n/a"
        lines.append(f"| {f} | {m['sse']['p50_ms']:.2f} | {m['sse']['p99_ms']:.2f} | {add} |")
    if base:
        lines.append("")
        for f, m in med.items():
            if f == "direct":
                continue
            added = m["paced"]["p50_ms"] - base["paced"]["p50_ms"]
            sse = m["sse"]["p50_ms"] - base["sse"]["p50_ms"]
            added_cpu = m["cpu_bound"]["p50_ms"] - base["cpu_bound"]["p50_ms"]
            verdict = f"(target < 1 ms: {'PASS' if added < 1 else 'MISS'}); CPU-bound adds {added_cpu:.2f} ms " \
                f"({'PASS' if added_cpu < 1 else 'MISS'})" if f.startswith(("nginx", "fdngx")) else ""
            sse_v = f"(target within 5 ms: {'PASS' if abs(sse) <= 5 else 'MISS'})" if f.startswith(("nginx", "fdngx")) \
                else ""
            lines.append(f"- {f}: adds {added:.2f} ms p50 paced {verdict}; first SSE byte {sse:+.2f} ms {sse_v}")
    md = "\n".join(lines)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "overhead.json").write_text(json.dumps(
        {"command": "python -m bench.overhead " + " ".join(argv), "machine": procs.machine(), "raw": raw,
         "median": med, "markdown": md}, indent=1))
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
