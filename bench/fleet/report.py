"""fleet.md (a table against issue 12's targets, the machine, the command, the date) and fleet.json.

    python -m bench.fleet.report [--out bench/results]    # rebuild fleet.md from fleet.json
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

TARGETS = {"cycle_ms": 1000.0, "sidecar_cpu_percent": 50.0, "push_ms": 50.0, "reloads_per_minute": 0.0}


def _ok(value: float | None, limit: float, strict: bool = True) -> str:
    if value is None:
        return "n/a"
    good = value < limit if strict else value <= limit
    return "yes" if good else "**no**"


def verdicts(r: dict[str, Any]) -> dict[str, str]:
    a = r["agreement"]
    identical = a["fraction_identical"]
    return {
        "cycle": _ok(r["scrape_policy_ms"]["p99"], TARGETS["cycle_ms"]),
        "cpu": _ok(r["sidecar_cpu_percent"], TARGETS["sidecar_cpu_percent"]),
        "push": _ok(r["push_ms"]["p99"], TARGETS["push_ms"]),
        "agreement": "n/a" if identical is None else ("yes" if identical == 1.0 else "**no**"),
        "reloads": _ok(r["reloads_per_minute"], TARGETS["reloads_per_minute"], strict=False),
    }


def markdown(meta: dict[str, Any], results: list[dict[str, Any]]) -> str:
    m = meta["machine"]
    out = [
        "# Fleet benchmark (issue 12): one controller, N OpenResty frontends\n\n",
        f"`{meta['command']}`, {meta['began']} to {meta['ended']} (UTC).\n\n",
        f"Machine: {m['nproc']} cores ({m['cpu_model']}), {m['mem_total']}, Linux {m['kernel']}, Python "
        f"{m['python']}, nginx {m['nginx']} + libnginx-mod-http-lua; load average at start "
        f"{', '.join(f'{x:.2f}' for x in m['loadavg_at_start'])}, {m.get('busy_before', 0):.0%} busy just before.\n\n",
        "Everything on 127.0.0.1. Replicas: `fdngx sim` processes (idle; 8 processes, each hosting an eighth of "
        "the replicas; slots 16/32/48/64 in turn, so capacity weights 5/10/15/20; 1 % answering /health 404, so "
        "the controller marks them down), or (`static nginx` rows, `--static-replicas`) one nginx serving every "
        "replica's /metrics (a page rendered by the simulator's own metrics code) and /health, which takes the "
        "replicas' own CPU off the 2 cores the controller runs on, as a real fleet's replicas are on their own "
        "hosts. Frontends: standalone nginx with the Lua balancer (2 workers each), rendered by `fdngx render "
        "--flavor openresty`. Controller: `fdngx sidecar --flavor openresty --push-to-file F --push-token-file T "
        "--interval 2`. Times are from the controller's own cycle log (`--verbose --log-format json`); its CPU "
        "from /proc/<pid>/stat (utime + stime) over the window; agreement from every frontend's admin view (GET) "
        "at one generation; reloads from the nginx master and worker pids sampled through the window.\n\n",
        "| replicas (served by) | frontends | scrape+policy p50 / p90 / p99 ms | full cycle p99 ms | sidecar CPU % "
        "of a core | RSS MB | push p50 / p99 ms (worst frontend p99) | identical weights | reloads/min | cores busy: "
        "replicas / nginx frontends / other |\n",
        "|---|---|---|---|---|---|---|---|---|---|\n",
    ]
    for r in results:
        a, p, c, sp = r["agreement"], r["push_ms"], r["cpu_cores"], r["scrape_policy_ms"]
        out.append(
            f"| {r['replicas']} ({r.get('replica_server', 'fdngx sim')}) | {r['frontends']} | "
            f"{sp['p50']} / {sp.get('p90', '-')} / {sp['p99']} "
            f"| {r['cycle_ms']['p99']} | {r['sidecar_cpu_percent']} | {r['sidecar_rss_mb']['max']} | "
            f"{p['p50']} / {p['p99']} ({p['worst_frontend_p99']}) | {a['identical']}/{a['same_generation']} "
            f"({a['peers']} peers, {a['down']} down) | {r['reloads_per_minute']} | {c['sims']} / {c['nginx']} / "
            f"{c['bench_and_other']} |\n")
    out.append("\n## Against the targets\n\n| replicas (served by) | frontends | cycle < 1 s (p99) | sidecar < 50 % | "
               "push < 50 ms (p99) | identical | 0 reloads/min |\n|---|---|---|---|---|---|---|\n")
    for r in results:
        v = verdicts(r)
        out.append(f"| {r['replicas']} ({r.get('replica_server', 'fdngx sim')}) | {r['frontends']} | {v['cycle']} | "
                   f"{v['cpu']} | {v['push']} | {v['agreement']} | {v['reloads']} |\n")
    out.append(
        "\nCycle: the scrape of every replica's /metrics and /health plus the policy, over the window's cycles (30 at "
        "2 s in a 60 s window, so the p99 is the slowest one; the "
        "push follows it and is counted separately). Push: one POST of the whole snapshot to one frontend, "
        "answered after the Lua side validated and installed it; p50/p99 pooled over every frontend's pushes, and "
        "in brackets the slowest frontend's own p99 (its slowest push of 30). \"cores busy\": CPU cores in use "
        "during the "
        "window, by the replicas (simulators, or the static nginx), the frontends' nginx processes, and everything "
        "else on the machine (this benchmark's own sampling, and whatever else ran).\n")
    if meta.get("notes"):
        out.append("\n## Notes\n\n" + meta["notes"].strip() + "\n")
    return "".join(out)


def write_report(out: Path, meta: dict[str, Any], results: list[dict[str, Any]]) -> tuple[Path, Path]:
    out.mkdir(parents=True, exist_ok=True)
    md, js = out / "fleet.md", out / "fleet.json"
    md.write_text(markdown(meta, results))
    js.write_text(json.dumps({"meta": meta, "targets": TARGETS, "results": results}, indent=1) + "\n")
    return md, js


def main() -> None:
    import argparse

    ap = argparse.ArgumentParser(description="Rebuild fleet.md from fleet.json.")
    ap.add_argument("--out", type=Path, default=Path("bench/results"))
    ap.add_argument("--notes", type=Path, default=None, help="a markdown file appended as the Notes section")
    args = ap.parse_args()
    doc = json.loads((args.out / "fleet.json").read_text())
    if args.notes is not None:
        doc["meta"]["notes"] = args.notes.read_text()
    write_report(args.out, doc["meta"], doc["results"])
    print(f"wrote {args.out / 'fleet.md'}")


if __name__ == "__main__":
    main()
