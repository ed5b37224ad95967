"""Frontends side by side in one run: the numbers a results README cites, from the run's own records.

    python -m bench.lb.compare bench/results/external-variants/margin --against oracle,fdngx-recommended

DIR is a `python -m bench.lb --out` directory (or its runs/); several DIRs (whole runs of the same code, e.g.
two full grids) are pooled as one run with more repeats, each directory's repeats numbered after the last's,
so their blocks stay apart in the resamples. Per scenario, one line per frontend, lowest
pooled p99 first: p99 TTFT as the median of the repeats, pooled (all repeats' requests together) and per
window; the pooled ratio to each --against frontend with its 95 % interval (the same paired block resamples
as the report's targets, so cells sent the same requests stay paired); with --where, the frontend's share of
its requests per replica and how many of its slowest 1 % each replica served (where a tail comes from: the
replica clients load directly, or the others).
"""

from __future__ import annotations

import argparse
from collections import Counter
from pathlib import Path
from typing import Any

from bench.lb.report import _group, aggregate, load_runs, tails
from bench.lb.stats import ratio, ratio_interval


def load_dirs(paths: list[Path]) -> list[dict[str, Any]]:
    """The runs of several directories as one: each directory's repeats renumbered after the previous one's
    highest, so no two windows share a repeat number (the resamples draw whole seconds of one repeat)."""
    out: list[dict[str, Any]] = []
    for path in paths:
        runs = load_runs(path)
        base = max((r.get("rep", 0) for r in out), default=-1) + 1
        out += [r | {"rep": base + r.get("rep", 0)} for r in runs]
    return out


def where(runs: list[dict[str, Any]], top: float = 0.01) -> tuple[list[float], list[int]]:
    """The frontend's completed requests over all repeats: its share per replica, and per replica how many of
    the slowest `top` of them it served."""
    rows = [r for run in runs for r in run["records"]["rows"] if r[1] >= 0 and not r[3] and r[4] is not None]
    if not rows:
        return [], []
    n_replicas = max(int(r[6]) for r in rows) + 1
    rows.sort(key=lambda r: r[4])
    slow = rows[int(len(rows) * (1 - top)):]
    served, tail = Counter(int(r[6]) for r in rows), Counter(int(r[6]) for r in slow)
    return [served[i] / len(rows) for i in range(n_replicas)], [tail[i] for i in range(n_replicas)]


def compare(results: list[dict[str, Any]], against: list[str], with_where: bool = False) -> str:
    """The comparison as text, one block per scenario: the report's own aggregates (median and pooled p99) and
    paired resamples (report.tails), side by side."""
    agg, boots, groups = aggregate(results), tails(results), _group(results)
    out: list[str] = []
    for scenario, row in agg.items():
        out.append(f"## {scenario}")
        for f in sorted(row, key=lambda f: (row[f]["ttft_p99_pooled"], f)):
            runs = sorted(groups[scenario][f], key=lambda r: r.get("rep", 0))
            pooled = row[f]["ttft_p99_pooled"]
            windows = " ".join(f"{r['frontend_summary']['ttft_p99'] * 1000:.0f}" for r in runs)
            parts = [f"{f:28s} n={len(runs)} median {row[f]['ttft_p99'][0] * 1000:5.0f} pooled {pooled * 1000:5.0f} ms"
                     f" | windows {windows}"]
            for ref in against:
                if ref in row and ref != f:
                    lo, hi = ratio_interval(boots[scenario][f], boots[scenario][ref])
                    parts.append(f"vs {ref} {ratio(pooled, row[ref]['ttft_p99_pooled']):.2f} [{lo:.2f}-{hi:.2f}]")
            if with_where:
                share, tail = where(runs)
                parts.append("share " + " ".join(f"{s:.3f}" for s in share) + " | slowest 1 % "
                             + " ".join(str(t) for t in tail))
            out.append(" | ".join(parts))
    return "\n".join(out)


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m bench.lb.compare", description=__doc__.split("\n\n")[0])
    p.add_argument("dirs", type=Path, nargs="+", metavar="DIR",
                   help="a bench.lb --out directory, or its runs/; several are pooled as one run")
    p.add_argument("--against", default="oracle,nginx-lc,sglang-ca",
                   help="frontends every other one is compared with (comma list; those not in the run are skipped)")
    p.add_argument("--where", action="store_true",
                   help="also each frontend's share per replica and where its slowest 1 %% of requests were served")
    args = p.parse_args()
    print(compare(load_dirs(args.dirs), [a for a in args.against.split(",") if a], args.where))


if __name__ == "__main__":
    main()
