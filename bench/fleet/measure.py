"""One steady-state window of a fleet cell: the controller's cycles and CPU, the frontends' agreement and
reloads, and what else used the machine."""

from __future__ import annotations

import os
import statistics
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from bench.fleet.cluster import Controller, Frontends, Replicas
from bench.lb import procs

TICKS = procs.CLK_TCK


def pct(values: list[float], q: float) -> float | None:
    """Nearest-rank percentile (q in 0..100); None for no values."""
    if not values:
        return None
    s = sorted(values)
    return s[min(len(s) - 1, max(0, round(q / 100 * len(s) + 0.5) - 1))]


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def agreement(frontends: Frontends, tries: int = 6) -> dict[str, Any] | None:
    """GET every frontend's admin view at about the same moment; once all show the same generation (the
    same push), compare every peer's weight and down flag. None when no try saw one generation."""
    with ThreadPoolExecutor(len(frontends.admins)) as pool:
        for _ in range(tries):
            views = list(pool.map(lambda a: a.view(), frontends.admins))
            gens = {head.get("generation") for head, _peers in views}
            if len(gens) == 1:
                tables = [{n: (p["weight"], p["down"]) for n, p in peers.items()} for _head, peers in views]
                first = tables[0]
                return {
                    "generation": gens.pop(),
                    "identical": all(t == first for t in tables[1:]),
                    "peers": len(first),
                    "down": sum(1 for w, d in first.values() if d == "1"),
                    "distinct_weights": sorted({int(w) for w, _d in first.values()}),
                }
            time.sleep(0.15)
    return None


def window(replicas: Replicas, frontends: Frontends, controller: Controller, seconds: float,
           sample_every: float = 5.0) -> dict[str, Any]:
    """Measure `seconds` of steady state (the caller has warmed up)."""
    pid = controller.proc.pid
    before_cycles = len(controller.cycles())
    pids0 = frontends.pids()
    groups = {"sidecar": [pid], "sims": replicas.pgids(), "nginx": frontends.pgids()}
    g0 = {k: sum(procs.group_cpu_seconds(v).values()) for k, v in groups.items()}
    stat0 = procs.proc_stat_cpu()
    c0, t0 = cpu_seconds(pid), time.monotonic()
    samples: list[dict[str, Any] | None] = []
    rss: list[float] = []
    reload_events = 0
    last = pids0
    while time.monotonic() - t0 < seconds:
        time.sleep(min(sample_every, max(0.0, seconds - (time.monotonic() - t0))))
        if time.monotonic() - t0 >= seconds:
            break
        rss.append(rss_mb(pid))
        samples.append(agreement(frontends))
        now = frontends.pids()
        reload_events += sum(1 for a, b in zip(last, now, strict=True) if a != b)
        last = now
    c1, t1 = cpu_seconds(pid), time.monotonic()
    stat1 = procs.proc_stat_cpu()
    g1 = {k: sum(procs.group_cpu_seconds(v).values()) for k, v in groups.items()}
    rss.append(rss_mb(pid))
    pids1 = frontends.pids()
    reload_events += sum(1 for a, b in zip(last, pids1, strict=True) if a != b)
    elapsed = t1 - t0
    cycles = controller.cycles()[before_cycles:]
    # A cycle logged right after the window closed is outside it; the first may have started before: both fine.
    scrape = [float(c["scrape_policy_s"]) for c in cycles]
    whole = [float(c["cycle_s"]) for c in cycles]
    per_frontend: dict[str, list[float]] = {}
    statuses: dict[str, int] = {}
    for c in cycles:
        for fe, (status, secs) in c["pushes"].items():  # type: ignore[union-attr]
            statuses[status] = statuses.get(status, 0) + 1
            if status in ("ok", "unchanged"):
                per_frontend.setdefault(fe, []).append(float(secs))
    all_push = [s for v in per_frontend.values() for s in v]
    delta = [b - a for a, b in zip(stat0, stat1, strict=False)]
    total = max(1, sum(delta))
    busy_cores = (1.0 - (delta[3] + delta[4]) / total) * (os.cpu_count() or 1)
    ours = {k: (g1[k] - g0[k]) / elapsed for k in groups}
    seen = [s for s in samples if s is not None]
    return {
        "seconds": round(elapsed, 1),
        "cycles": len(cycles),
        "scrape_policy_ms": {"p50": _ms(pct(scrape, 50)), "p90": _ms(pct(scrape, 90)), "p99": _ms(pct(scrape, 99)),
                             "max": _ms(max(scrape, default=None)), "each": [_ms(x) for x in scrape]},
        "cycle_ms": {"p50": _ms(pct(whole, 50)), "p99": _ms(pct(whole, 99))},
        "sidecar_cpu_percent": round(100 * (c1 - c0) / elapsed, 1),
        "sidecar_rss_mb": {"end": round(rss[-1], 1), "max": round(max(rss), 1)},
        "push_ms": {"p50": _ms(pct(all_push, 50)), "p99": _ms(pct(all_push, 99)),
                    "max": _ms(max(all_push, default=None)),
                    "worst_frontend_p99": _ms(max((pct(v, 99) or 0.0 for v in per_frontend.values()), default=None)),
                    "per_frontend": {fe: {"p50": _ms(pct(v, 50)), "p99": _ms(pct(v, 99)), "n": len(v)}
                                     for fe, v in sorted(per_frontend.items())}},
        "push_statuses": statuses,
        "agreement": {
            "samples": len(samples),
            "same_generation": len(seen),
            "identical": sum(1 for s in seen if s["identical"]),
            "fraction_identical": round(sum(1 for s in seen if s["identical"]) / len(seen), 4) if seen else None,
            "peers": seen[-1]["peers"] if seen else None,
            "down": seen[-1]["down"] if seen else None,
            "distinct_weights": seen[-1]["distinct_weights"] if seen else None,
        },
        "reloads": reload_events,
        "reloads_per_minute": round(60 * reload_events / elapsed, 2),
        "frontend_pids_unchanged": pids0 == pids1,
        "cpu_cores": {
            "machine_busy": round(busy_cores, 2),
            "sidecar": round(ours["sidecar"], 3),
            "sims": round(ours["sims"], 3),
            "nginx": round(ours["nginx"], 3),
            "bench_and_other": round(max(0.0, busy_cores - sum(ours.values())), 3),
        },
        "loadavg_end": [round(x, 2) for x in os.getloadavg()],
    }


def _ms(v: float | None) -> float | None:
    return None if v is None else round(1000 * v, 1)


def median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None
