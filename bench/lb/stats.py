"""Pure statistics for the benchmark: percentiles, one run's summary, medians and spread over repeats, and a
paired block bootstrap of pooled tails (how sure a ratio target is)."""

from __future__ import annotations

import math
import random
import statistics
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from itertools import chain
from typing import Any

# Errors a frontend cannot avoid: the stream was open on the replica when it was killed.
EXPECTED_ERRORS = frozenset({"killed"})


def percentile(values: Sequence[float], q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default); NaN for no values."""
    if not values:
        return math.nan
    if not 0 <= q <= 100:
        raise ValueError(f"percentile must be in [0, 100], got {q}")
    xs = sorted(values)
    pos = (len(xs) - 1) * q / 100
    lo = math.floor(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


@dataclass(frozen=True)
class Record:
    """One measured request as the load generator saw it (times in seconds)."""

    idx: int
    t: float  # planned send time, run clock
    route: int  # frontend index, -1 external
    status: int  # HTTP status, 0 when no response
    error: str  # "" when the stream completed
    ttft: float  # NaN without a first event
    e2e: float  # NaN unless completed
    replica: int  # index of the replica that answered, -1 unknown
    window: int = 0  # measured window (= repeat) it belongs to

    def ok(self) -> bool:
        return not self.error


def summarize(records: Sequence[Record], *, duration: float, n_replicas: int) -> dict[str, Any]:
    """Latency percentiles over completed requests; throughput = completed / measured window length.

    `records` are the requests of one route group (e.g. only those sent through the frontend).
    """
    ok = [r for r in records if r.ok()]
    ttft = [r.ttft for r in ok]
    e2e = [r.e2e for r in ok]
    errors: dict[str, int] = {}
    for r in records:
        if r.error:
            errors[r.error] = errors.get(r.error, 0) + 1
    served = [r.replica for r in records if r.replica >= 0]
    share = [served.count(i) / len(served) if served else 0.0 for i in range(n_replicas)]
    return {
        "requests": len(records),
        "completed": len(ok),
        "ttft_p50": percentile(ttft, 50),
        "ttft_p90": percentile(ttft, 90),
        "ttft_p99": percentile(ttft, 99),
        "ttft_mean": statistics.fmean(ttft) if ttft else math.nan,
        "e2e_p50": percentile(e2e, 50),
        "e2e_p99": percentile(e2e, 99),
        "throughput": len(ok) / duration if duration > 0 else math.nan,
        "errors": sum(errors.values()),
        "unexpected_errors": sum(n for k, n in errors.items() if k not in EXPECTED_ERRORS),
        "error_kinds": errors,
        "share": share,
    }


def share_over_time(records: Iterable[Record], n_replicas: int, bin_s: float, start: float,
                    end: float) -> list[list[float]]:
    """Per time bin, the fraction of requests (by planned send time) each replica served."""
    nbins = max(1, math.ceil((end - start) / bin_s))
    counts = [[0] * n_replicas for _ in range(nbins)]
    for r in records:
        if r.replica < 0 or not start <= r.t < end:
            continue
        counts[min(nbins - 1, int((r.t - start) / bin_s))][r.replica] += 1
    return [[c / sum(row) if sum(row) else 0.0 for c in row] for row in counts]


def median_spread(values: Iterable[float]) -> tuple[float, float, float]:
    """(median, min, max) over repeats, ignoring NaN; all NaN without values."""
    xs = [v for v in values if not math.isnan(v)]
    if not xs:
        return (math.nan, math.nan, math.nan)
    return (statistics.median(xs), min(xs), max(xs))


def ratio(a: float, b: float) -> float:
    return a / b if b and not math.isnan(a) and not math.isnan(b) else math.nan


def cpu_busy(before: Sequence[int], after: Sequence[int]) -> float:
    """Busy fraction of all CPUs between two /proc/stat 'cpu' lines (user..steal fields as ints)."""
    delta = [b - a for a, b in zip(before, after, strict=False)]
    total = sum(delta)
    if total <= 0:
        return math.nan
    idle = delta[3] + (delta[4] if len(delta) > 4 else 0)  # idle + iowait
    return 1.0 - idle / total


# A paired block bootstrap of pooled tails. Every frontend of a scenario is sent the same requests at the same
# planned times (workload.py), so second s of repeat r holds the same requests in every cell: resampling those
# blocks, with the same draws for every frontend, keeps the pairing. Whole seconds move together because
# queueing couples the requests sent close to one another; resampling single requests would understate the
# spread.
BLOCK_S = 1.0
BOOT_N = 400  # resamples: the interval's ends move by about 0.01 between seeds
Blocks = dict[tuple[int, int], list[float]]


def tail_blocks(runs: Iterable[tuple[int, Iterable[Sequence[Any]]]], block_s: float = BLOCK_S) -> Blocks:
    """TTFTs of completed requests sent through the frontend, by (repeat, second of the window).

    `runs`: (repeat, record rows as runner.py stores them: t, route, status, error, ttft, ...)."""
    blocks: Blocks = defaultdict(list)
    for rep, rows in runs:
        for row in rows:
            if row[1] >= 0 and not row[3] and row[4] is not None:
                blocks[(rep, math.floor(row[0] / block_s))].append(row[4])
    return dict(blocks)


def bootstrap_tails(cells: dict[str, Blocks], *, q: float = 99, n: int = BOOT_N,
                    seed: int = 0) -> dict[str, list[float]]:
    """Per frontend, the pooled q-th percentile of each of n resamples, drawn with the same blocks for all."""
    keys = sorted(set().union(*cells.values())) if cells else []
    rng = random.Random(seed)
    draws = [[rng.randrange(len(keys)) for _ in keys] for _ in range(n)] if keys else []
    return {f: [percentile(list(chain.from_iterable(blocks.get(keys[i], ()) for i in d)), q) for d in draws]
            for f, blocks in cells.items()}


def ratio_interval(a: Sequence[float], b: Sequence[float], level: float = 0.95) -> tuple[float, float]:
    """The central `level` interval of a/b over paired resamples (NaN, NaN without any)."""
    rs = [x / y for x, y in zip(a, b, strict=True) if y and not math.isnan(x) and not math.isnan(y)]
    tail = (1 - level) / 2 * 100
    return (percentile(rs, tail), percentile(rs, 100 - tail)) if rs else (math.nan, math.nan)


def verdict(interval: tuple[float, float], bound: float) -> str:
    """What the resamples say about `ratio <= bound`: holds, fails, or undecided (the interval spans it)."""
    lo, hi = interval
    if math.isnan(lo):
        return "n/a"
    return "holds" if hi <= bound else "fails" if lo > bound else "undecided"
