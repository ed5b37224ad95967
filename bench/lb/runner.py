"""One run (scenario x frontend x repeat): fresh replicas, the frontend, the schedule, measurements."""

from __future__ import annotations

import asyncio
import dataclasses
import math
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.lb import procs
from bench.lb.cluster import Cluster
from bench.lb.frontends import FRONTENDS
from bench.lb.loadgen import EXTERNAL_REPLICA, Event, LoadGen, RunOutput
from bench.lb.scenarios import ODD, Scenario
from bench.lb.stats import cpu_busy, share_over_time, summarize
from bench.lb.workload import Schedule, make_schedule

SATURATED_BUSY = 0.90  # whole-machine busy fraction over the window
SATURATED_SIM = 0.80  # one replica process using this much of a core: the sim may lag its model
SATURATED_LAG = 0.020  # p99 event-loop lag of the load generator, seconds
FOREIGN_CORES = 0.25  # CPU used by processes outside this run: its timings are suspect
NCPU = os.cpu_count() or 1


@dataclasses.dataclass(frozen=True)
class Timing:
    warmup: float = 2.0
    # 20 s: the p99 of a 10 s window (about 5 requests beyond it) moved by up to 40 % between windows of
    # one frontend; at 20 s the same cells' medians settle within about 10 % (docs/benchmarks.md, Noise).
    measure: float = 20.0
    cooldown: float = 15.0  # at most this long after the window for measured requests to finish


class Snapshots:
    """CPU counters at the start and end of the measured window (called from the load generator)."""

    def __init__(self, cluster: Cluster, fe_pgids: list[int], reloads: Any) -> None:
        self.cluster = cluster
        self.fe_pgids = fe_pgids
        self.reloads = reloads
        self.at: dict[str, dict[str, Any]] = {}

    def __call__(self, phase: str) -> None:
        sims = self.cluster.pgids()
        self.at[phase] = {"t": time.monotonic(), "stat": procs.proc_stat_cpu(), "sims": sims,
                          "groups": procs.group_cpu_seconds(sims + self.fe_pgids),
                          "self": procs.self_cpu_seconds(), "reloads": self.reloads()}

    def result(self, k: int) -> dict[str, Any]:
        """CPU use over measured window k (from its start to the next window's or the cool-down's)."""
        a, b = self.at.get(f"meas{k}"), self.at.get(f"meas{k + 1}") or self.at.get("cool")
        if not a or not b:
            return {}
        dt = b["t"] - a["t"]
        # A replica killed and restarted in between has a new process: count those alive at both ends.
        sims = [(b["groups"][p] - a["groups"][p]) / dt for p in a["sims"] if p in b["sims"]]
        fe = sum(b["groups"].get(p, 0.0) - a["groups"].get(p, 0.0) for p in self.fe_pgids) / dt
        reloads = None if a["reloads"] is None or b["reloads"] is None else b["reloads"] - a["reloads"]
        busy = cpu_busy(a["stat"], b["stat"])
        own = (b["self"] - a["self"]) / dt
        # Whatever else ran on the machine meanwhile (other users, tests): it competes for the same 2 cores.
        other = busy * NCPU - sum(sims) - fe - own
        return {"busy": busy, "sim_cores": sims, "frontend_cores": fe, "loadgen_cores": own,
                "other_cores": other, "reloads": reloads}


def run_cell(scenario: Scenario, frontend: str, *, seed: int, timing: Timing, windows: int = 1,
             keep: Path | None = None, keep_always: bool = False) -> list[dict[str, Any]]:
    """Fresh replicas and frontend, one warm-up, then `windows` measured windows back to back (window k's
    requests are seeded by seed + k). Returns one result per window."""
    fe = FRONTENDS[frontend]()
    work = Path(tempfile.mkdtemp(prefix=f"fdngx-lb-{scenario.name}-{frontend}-"))
    cluster = Cluster(scenario.specs, work / "sim", seed, legacy=scenario.legacy)
    ok = False
    try:
        t_setup = time.monotonic()
        cluster.start()
        urls = fe.start(cluster, work, 1 if fe.oracle else scenario.n_frontends)
        setup_s = time.monotonic() - t_setup
        warm = timing.warmup + fe.extra_warmup
        sched = make_schedule(rate=scenario.rate(), warmup=warm, measure=timing.measure, cooldown=timing.cooldown,
                              seed=seed, mix=scenario.mix, n_frontends=scenario.n_frontends,
                              p_external=scenario.p_external, windows=windows)
        events = []
        for k in range(windows if scenario.kill else 0):
            at = sched.window_start(k)
            events += [Event(at + scenario.kill[0], f"kill {ODD}", lambda: cluster.kill(ODD)),
                       Event(at + scenario.kill[1], f"restart {ODD}", lambda: cluster.restart(ODD))]
        snaps = Snapshots(cluster, fe.pgids(), fe.reloads)
        gen = LoadGen(sched, cluster, urls, oracle=fe.oracle, seed=seed, events=events, on_measure=snaps)
        out = asyncio.run(gen.run())
        ok = True
    finally:
        fe.stop()
        cluster.stop()
        if (keep_always or not ok) and keep is not None:
            keep.mkdir(parents=True, exist_ok=True)
            shutil.copytree(work, keep / work.name, dirs_exist_ok=True)
        shutil.rmtree(work, ignore_errors=True)
    return [_window_result(scenario, frontend, seed + k, k, sched, out, snaps.result(k), timing, setup_s)
            for k in range(windows)]


def recovery(out: RunOutput, start: float, measure: float, n: int, span: float = 0.5) -> float | None:
    """Seconds from the restarted replica's first /health 200 until it takes its share of new requests: the
    first request sent to it through the frontend that starts a `span`-second stretch in which it got at
    least half of a fair share (1 / 2n). None without a restart in the window; +inf when it never did."""
    back = [(t, int(name.split()[1])) for t, name in out.events if name.endswith(" 200") and name.startswith("health")]
    back = [(t, i) for t, i in back if start <= t < start + measure]
    if not back:
        return None
    t0, i = back[0]
    sent = sorted((r.t, r.replica == i) for r in out.records if r.route >= 0 and r.t >= t0 and r.status)
    for k, (t, hit) in enumerate(sent):
        if t + span > start + measure:
            break
        stretch = [h for u, h in sent[k:] if u < t + span]
        if hit and sum(stretch) / len(stretch) >= 1 / (2 * n):
            return round(t - t0, 3)
    return math.inf


def _window_result(scenario: Scenario, frontend: str, seed: int, k: int, sched: Schedule, out: RunOutput,
                   cpu: dict[str, Any], timing: Timing, setup_s: float) -> dict[str, Any]:
    start = sched.window_start(k)
    recs = [r for r in out.records if r.window == k]
    through = [r for r in recs if r.route >= 0]
    external = [r for r in recs if r.route < 0]
    n = len(scenario.specs)
    flags = []
    if cpu.get("busy", 0) > SATURATED_BUSY:
        flags.append(f"machine {cpu['busy']:.0%} busy")
    if cpu.get("other_cores", 0) > FOREIGN_CORES:
        flags.append(f"other processes used {cpu['other_cores']:.2f} cores")
    if any(c > SATURATED_SIM for c in cpu.get("sim_cores", [])):
        flags.append("a replica process above 80 % of a core")
    if not math.isnan(out.lag_p99) and out.lag_p99 > SATURATED_LAG:
        flags.append(f"load generator lag p99 {out.lag_p99 * 1000:.0f} ms")
    return {
        "scenario": scenario.name,
        "frontend": frontend,
        "seed": seed,
        "window": k,
        "rate": scenario.rate(),
        "capacity": scenario.capacity(),
        "timing": {**dataclasses.asdict(timing), "warmup_used": sched.warmup, "window_start": start,
                   "setup_s": round(setup_s, 2)},
        "frontend_summary": summarize(through, duration=timing.measure, n_replicas=n),
        "external_summary": summarize(external, duration=timing.measure, n_replicas=n) if external else None,
        "all_summary": summarize(recs, duration=timing.measure, n_replicas=n),
        "share_over_time": share_over_time(recs, n, 1.0, start, start + timing.measure),
        "external_replica": EXTERNAL_REPLICA if external else None,
        "cpu": cpu,
        "loadgen": {"lateness_p99": out.lateness_p99, "lag_p99": out.lag_p99, "lag_max": out.lag_max},
        "saturation": flags,
        "events": [e for e in out.events if start <= e[0] < start + timing.measure + 2],
        "recovery_s": recovery(out, start, timing.measure, n),
        "samples": [x for x in out.samples if start <= x["t"] < start + timing.measure],
        "records": {
            "fields": ["t", "route", "status", "error", "ttft", "e2e", "replica"],
            "rows": [[round(r.t - start, 4), r.route, r.status, r.error,
                      None if math.isnan(r.ttft) else round(r.ttft, 5),
                      None if math.isnan(r.e2e) else round(r.e2e, 5), r.replica] for r in recs],
        },
    }
