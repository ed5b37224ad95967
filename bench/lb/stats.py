"""Pure statistics for the benchmark: percentiles, one run's summary, medians and spread over repeats."""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
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
