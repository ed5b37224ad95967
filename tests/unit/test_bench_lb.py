"""The load-balancing benchmark's pure parts: statistics, the schedule, capacity, target ratios."""

from __future__ import annotations

import json
import math
import random

import pytest

from bench.lb import report
from bench.lb.stats import (
    Record,
    bootstrap_tails,
    cpu_busy,
    median_spread,
    percentile,
    ratio_interval,
    share_over_time,
    summarize,
    tail_blocks,
    verdict,
)
from bench.lb.workload import (
    BATCH_COST,
    PREFILL_RATE,
    TOKEN_RATE,
    Mix,
    ReplicaSpec,
    make_schedule,
    prompt_text,
    replica_capacity,
)
from fdngx.sim.model import ModelParams, ReplicaModel, SimRequest


def test_percentile_matches_linear_interpolation() -> None:
    xs = [5.0, 1.0, 3.0, 2.0, 4.0]
    assert percentile(xs, 0) == 1.0
    assert percentile(xs, 50) == 3.0
    assert percentile(xs, 100) == 5.0
    assert percentile(xs, 90) == pytest.approx(4.6)
    assert math.isnan(percentile([], 99))
    with pytest.raises(ValueError):
        percentile(xs, 101)


def test_summarize_counts_errors_and_shares() -> None:
    recs = [
        Record(0, 0.1, 0, 200, "", 0.1, 1.0, 0),
        Record(1, 0.2, 0, 200, "", 0.3, 2.0, 1),
        Record(2, 0.3, 0, 502, "http_502", math.nan, math.nan, -1),
        Record(3, 0.4, 0, 200, "killed", 0.2, math.nan, 1),
    ]
    s = summarize(recs, duration=2.0, n_replicas=2)
    assert s["completed"] == 2
    assert s["throughput"] == 1.0
    assert s["errors"] == 2
    assert s["unexpected_errors"] == 1  # the killed stream is expected
    assert s["share"] == pytest.approx([1 / 3, 2 / 3])
    assert s["ttft_p50"] == pytest.approx(0.2)


def test_share_over_time_bins_by_send_time() -> None:
    recs = [Record(i, t, 0, 200, "", 0.1, 0.2, rep) for i, (t, rep) in enumerate([(0.1, 0), (0.5, 1), (1.5, 1)])]
    assert share_over_time(recs, 2, 1.0, 0.0, 2.0) == [[0.5, 0.5], [0.0, 1.0]]


def test_median_spread_and_cpu_busy() -> None:
    assert median_spread([3.0, 1.0, math.nan, 2.0]) == (2.0, 1.0, 3.0)
    assert all(math.isnan(x) for x in median_spread([math.nan]))
    # user nice system idle iowait ...: 30 busy ticks of 100
    assert cpu_busy([0, 0, 0, 0, 0], [20, 0, 10, 60, 10]) == pytest.approx(0.3)


def test_schedule_is_deterministic_and_measured_part_ignores_warmup() -> None:
    kw = {"rate": 40.0, "measure": 10.0, "cooldown": 5.0, "mix": Mix(), "n_frontends": 2, "p_external": 0.25}
    a = make_schedule(warmup=3.0, seed=7, **kw)
    b = make_schedule(warmup=3.0, seed=7, **kw)
    c = make_schedule(warmup=15.0, seed=7, **kw)
    assert a == b
    ma, mc = a.measured(), c.measured()
    assert [(round(r.t - 3.0, 9), r.prompt_tokens, r.max_tokens, r.route) for r in ma] == \
        [(round(r.t - 15.0, 9), r.prompt_tokens, r.max_tokens, r.route) for r in mc]
    assert make_schedule(warmup=3.0, seed=8, **kw).measured() != ma
    assert all(3.0 <= r.t < 13.0 for r in ma)
    assert [r.t for r in a.reqs] == sorted(r.t for r in a.reqs)


def test_window_k_of_a_multi_window_schedule_equals_a_fresh_schedule_seeded_seed_plus_k() -> None:
    kw = {"rate": 30.0, "measure": 5.0, "cooldown": 2.0, "mix": Mix()}
    multi = make_schedule(warmup=2.0, seed=10, windows=3, **kw)
    for k in range(3):
        single = make_schedule(warmup=9.0, seed=10 + k, **kw)
        assert [(round(r.t - multi.window_start(k), 9), r.max_tokens) for r in multi.measured(k)] == \
            [(round(r.t - 9.0, 9), r.max_tokens) for r in single.measured(0)]
        assert all(multi.window_start(k) <= r.t < multi.window_start(k + 1) for r in multi.measured(k))


def test_schedule_rate_and_routing_fractions() -> None:
    s = make_schedule(rate=50.0, warmup=0.0, measure=200.0, cooldown=0.0, seed=1, mix=Mix(), n_frontends=2,
                      p_external=0.25)
    m = s.measured()
    assert len(m) / 200.0 == pytest.approx(50.0, rel=0.05)
    ext = sum(r.route == -1 for r in m) / len(m)
    assert ext == pytest.approx(0.25, abs=0.03)
    fe1 = sum(r.route == 1 for r in m) / sum(r.route >= 0 for r in m)
    assert fe1 == pytest.approx(0.5, abs=0.04)
    mean_out = sum(r.max_tokens for r in m) / len(m)
    assert mean_out == pytest.approx(Mix().mean_output(), rel=0.06)


def test_prompt_text_length() -> None:
    assert len(prompt_text(12, 100)) == 400
    assert prompt_text(1, 50) != prompt_text(2, 50)


@pytest.mark.parametrize("spec", [ReplicaSpec(), ReplicaSpec(slots=8), ReplicaSpec(speed=0.5)])
def test_capacity_formula_matches_the_simulators_model(spec: ReplicaSpec) -> None:
    """Drive the simulator's own queueing model, saturated, on a fake clock: completions per second must
    match replica_capacity (the number the arrival rate is derived from)."""
    mix = Mix()
    params = ModelParams(max_num_seqs=spec.slots, token_rate=TOKEN_RATE, batch_cost=BATCH_COST,
                         prefill_rate=PREFILL_RATE, jitter=0.0)
    model = ReplicaModel(params, speed=spec.speed)
    rng = random.Random(3)
    sched = make_schedule(rate=1000.0, warmup=0.0, measure=4.0, cooldown=0.0, seed=3, mix=mix)
    reqs = [SimRequest(i, r.prompt_tokens, r.max_tokens, 0.0) for i, r in enumerate(sched.reqs)]
    rng.shuffle(reqs)
    for r in reqs:
        model.submit(r)
    now, done, t_start = 0.0, 0, None
    while model.waiting and done < 2500:
        now += model.begin_step(now) or 0.0
        finished = [r for r in model.end_step(now) if r.finished is not None]
        if t_start is None and model.steps_total == 200:  # past the ramp-up
            t_start, done = now, 0
        elif t_start is not None:
            done += len(finished)
    measured = done / (now - t_start)
    assert measured == pytest.approx(replica_capacity(spec, mix), rel=0.06)


def _cell(p99: float, tput: float = 50.0, unexpected: int = 0) -> dict:
    return {"ttft_p99": (p99, p99, p99), "throughput": (tput, tput, tput), "unexpected_errors": [unexpected]}


def test_targets_judge_the_two_configurations_by_issue_12s_bounds() -> None:
    agg = {"external": {"oracle": _cell(0.30), "nginx-lc": _cell(1.0), "fdngx-default": _cell(0.44),
                        "fdngx-recommended": _cell(0.33), "sglang-p2": _cell(2.0), "sglang-ca": _cell(0.5)}}
    lines = {(t["best_fdngx"], t["target"]): t for t in report.targets(agg)}
    rec, dflt = "fdngx-recommended", "fdngx-default"
    assert lines[(rec, "p99 TTFT vs oracle")]["value"] == pytest.approx(0.33 / 0.30)
    vs_oracle = lines[(rec, "p99 TTFT vs oracle")]
    assert vs_oracle["bound"] == 1.15 and vs_oracle["result"] == "PASS"
    assert lines[(rec, "p99 TTFT vs nginx-lc")]["bound"] == 0.5, "external: half of least_conn"
    assert lines[(rec, "p99 TTFT vs sglang-ca (best sglang)")]["result"] == "PASS"
    dflt_oracle = lines[(dflt, "p99 TTFT vs oracle")]
    assert dflt_oracle["bound"] == 1.5 and dflt_oracle["result"] == "PASS"
    assert lines[(dflt, "p99 TTFT vs nginx-lc")]["bound"] == 1.0
    assert (dflt, "unexpected errors (max over runs)") not in lines, "the error and sglang bounds are the recommended's"
    agg["external"]["fdngx-recommended"] = _cell(0.6, unexpected=2)
    agg["external-legacy"] = {"oracle": _cell(0.30), "nginx-lc": _cell(1.0), "fdngx-recommended": _cell(0.6)}
    lines = {(t["scenario"], t["best_fdngx"], t["target"]): t for t in report.targets(agg)}
    assert lines[("external", rec, "p99 TTFT vs nginx-lc")]["result"] == "MISS"
    assert lines[("external", rec, "unexpected errors (max over runs)")]["result"] == "MISS"
    assert lines[("external-legacy", rec, "p99 TTFT vs nginx-lc")]["bound"] == 0.5, "the legacy shape too"


def test_the_noise_floor_compares_nginx_lc_with_its_twin_and_judges_nothing() -> None:
    twin, lc = _cell(0.275), _cell(0.25)
    twin["ttft_p99_pooled"], lc["ttft_p99_pooled"] = 0.30, 0.32
    agg = {"homogeneous": {"nginx-lc": lc, "nginx-lc-twin": twin, "fdngx-recommended": _cell(0.25)},
           "external": {"nginx-lc": _cell(1.0)}}
    lines = report.noise_floor(agg)
    assert "| homogeneous | 1.10 | 0.94 |  |" in lines and not any(ln.startswith("| external") for ln in lines)
    assert not any(t["best_fdngx"] == "nginx-lc-twin" for t in report.targets(agg))
    assert report.noise_floor({"external": {"nginx-lc": _cell(1.0)}}) == []


def test_recovery_is_measured_from_the_first_health_200() -> None:
    from bench.lb.loadgen import RunOutput
    from bench.lb.runner import recovery
    from bench.lb.stats import Record

    # Replica 3 answers /health at t=6.2; requests every 0.05 s; it gets its first ones from t=6.6.
    recs = [Record(k, 5.0 + 0.05 * k, 0, 200, "", 0.1, 1.0, 3 if 5.0 + 0.05 * k >= 6.6 and k % 3 == 0 else k % 3)
            for k in range(80)]
    out = RunOutput(recs, 0.0, 0.0, 0.0, events=[(3.0, "kill 3"), (6.2, "health 3 200")])
    back = recovery(out, start=0.0, measure=10.0, n=4)
    assert back is not None and 0.4 <= back <= 0.5, back  # its first request, at 6.65
    assert recovery(RunOutput(recs, 0.0, 0.0, 0.0, events=[]), start=0.0, measure=10.0, n=4) is None


def _rows(rng: random.Random, seconds: int, *, slow_every: int = 0) -> list[list]:
    """Record rows as runner.py stores them (t, route, status, error, ttft, e2e, replica), 30 per second."""
    rows = []
    for sec in range(seconds):
        slow = slow_every and sec % slow_every == 0
        for k in range(30):
            rows.append([sec + k / 30, 0, 200, "", rng.uniform(0.05, 0.1) + (2.0 if slow else 0.0), 1.0, 0])
    return rows


def test_tail_blocks_group_completed_frontend_requests_by_repeat_and_second() -> None:
    rows = [[0.2, 0, 200, "", 0.1, 1.0, 0], [0.9, 1, 200, "", 0.2, 1.0, 1], [1.5, 0, 200, "", 0.3, 1.0, 0],
            [1.6, -1, 200, "", 9.0, 9.0, 0], [1.7, 0, 0, "connect", None, None, -1], [1.8, 0, 200, "", None, None, 0]]
    assert tail_blocks([(0, rows), (2, rows[:1])]) == {(0, 0): [0.1, 0.2], (0, 1): [0.3], (2, 0): [0.1]}


def test_paired_resamples_see_a_steady_ratio_through_noisy_seconds() -> None:
    # The same requests in both cells: b is a's latency x 1.1, and a few seconds are 20x slower than the rest.
    # Drawn alike, every resample shows 1.1; drawn apart, the slow seconds would swing the ratio both ways.
    rows = _rows(random.Random(1), 60, slow_every=7)
    a = tail_blocks([(0, rows)])
    b = {k: [x * 1.1 for x in v] for k, v in a.items()}
    boot = bootstrap_tails({"a": a, "b": b}, n=200)
    lo, hi = ratio_interval(boot["b"], boot["a"])
    assert lo == pytest.approx(1.1) and hi == pytest.approx(1.1)
    assert verdict((lo, hi), 1.0) == "fails" and verdict((lo, hi), 1.15) == "holds"


def test_two_cells_of_the_same_distribution_are_undecided_at_one() -> None:
    a = tail_blocks([(0, _rows(random.Random(2), 60, slow_every=9))])
    b = tail_blocks([(0, _rows(random.Random(3), 60, slow_every=11))])
    boot = bootstrap_tails({"a": a, "b": b}, n=200)
    interval = ratio_interval(boot["a"], boot["b"])
    assert interval[0] < 1.0 < interval[1] and verdict(interval, 1.0) == "undecided"
    assert bootstrap_tails({"a": a, "b": b}, n=50) == bootstrap_tails({"a": a, "b": b}, n=50), "a report is stable"
    assert verdict((math.nan, math.nan), 1.0) == "n/a"


def test_targets_say_how_sure_a_ratio_is_when_given_resamples() -> None:
    agg = {"homogeneous": {"oracle": _cell(0.25), "nginx-lc": _cell(0.25), "fdngx-recommended": _cell(0.30)}}
    for v in agg["homogeneous"].values():
        v["ttft_p99_pooled"] = v["ttft_p99"][0]
    boot = {"homogeneous": {"oracle": [0.25, 0.25, 0.25], "nginx-lc": [0.2, 0.35, 0.25],
                            "fdngx-recommended": [0.30, 0.30, 0.30]}}
    lines = {t["target"]: t for t in report.targets(agg, boot)}
    vs_oracle = lines["p99 TTFT vs oracle"]
    assert vs_oracle["result"] == "MISS" and vs_oracle["verdict"] == "fails"
    assert vs_oracle["pooled"] == pytest.approx(1.2)
    assert lines["p99 TTFT vs nginx-lc"]["verdict"] == "undecided"
    assert "verdict" not in lines["throughput vs nginx-lc"]
    assert all("verdict" not in t for t in report.targets(agg)), "without resamples, the medians alone"


def _run(frontend: str, rep: int, rows: list[list]) -> dict:
    # the fields bench.lb.report.aggregate reads, as runner.py writes them
    ttfts = [r[4] for r in rows if r[1] >= 0 and r[4] is not None]
    summary = {"ttft_p50": percentile(ttfts, 50), "ttft_p99": percentile(ttfts, 99), "e2e_p99": 1.0,
               "throughput": 30.0, "errors": 0, "unexpected_errors": 0, "share": [1 / 3] * 3}
    return {"scenario": "external", "frontend": frontend, "rep": rep, "records": {"rows": rows},
            "frontend_summary": summary, "all_summary": {"share": [1 / 3] * 3}, "cpu": {}, "saturation": []}


def test_compare_pairs_the_cells_and_says_where_a_tail_was_served(tmp_path) -> None:
    # "b" is sent the same requests as "a" and answers each 1.2x slower; its slowest requests are the ones it
    # sent to replica 2 (every 10th of a second's 30), a's are spread. Client requests (route -1) count nowhere.
    from bench.lb import compare

    runs = []
    for rep in range(3):
        a = _rows(random.Random(rep), 20, slow_every=7)
        for i, row in enumerate(a):
            row[6] = i % 3
        b = [[*row[:4], row[4] * 1.2 + (5.0 if row[6] == 2 and i % 10 == 0 else 0.0), *row[5:]]
             for i, row in enumerate(a)]
        client = [[0.5, -1, 200, "", 60.0, 60.0, 0]]
        runs += [_run("a", rep, a + client), _run("b", rep, b + client)]
    text = compare.compare(runs, ["a"], with_where=True)
    lines = {line.split()[0]: line for line in text.splitlines()[1:]}
    assert text.splitlines()[0] == "## external" and list(lines) == ["a", "b"], text
    assert "vs a" in lines["b"] and "vs a" not in lines["a"]
    ratio = float(lines["b"].split("vs a ")[1].split()[0])
    assert ratio > 1.2, lines["b"]
    share, tail = compare.where([r for r in runs if r["frontend"] == "b"])
    assert share == pytest.approx([1 / 3] * 3, abs=0.01)
    assert tail[2] == sum(tail) == len([1 for r in runs for row in r["records"]["rows"]
                                        if r["frontend"] == "b" and row[1] >= 0]) // 100
    # a run directory as bench.lb writes it, and one with no runs
    (tmp_path / "runs").mkdir()
    for r in runs:
        (tmp_path / "runs" / f"{r['scenario']}__{r['frontend']}__r{r['rep']}.json").write_text(json.dumps(r))
    assert len(compare.load_runs(tmp_path)) == len(compare.load_runs(tmp_path / "runs")) == 6
    with pytest.raises(SystemExit, match="no run files"):
        compare.load_runs(tmp_path / "empty")
    # two directories pooled: the second one's repeats numbered after the first's, so six windows, not three
    pooled = compare.load_dirs([tmp_path, tmp_path / "runs"])
    assert sorted(r["rep"] for r in pooled if r["frontend"] == "a") == [0, 1, 2, 3, 4, 5]
    assert " n=6 " in compare.compare(pooled, ["a"]).splitlines()[1]
