"""SGLang's scheduler ranks: copies of one batch count once, DP ranks add up (MetricNames.one_per).

Every SGLang scheduler labels its gauges with its tp_rank, pp_rank and moe_ep_rank (+ dp_rank with --dp-size).
Only attention-TP rank 0 sets them, unless --enable-metrics-for-all-schedulers: then every TP rank of one
batch repeats it. Pipeline stages each repeat the waiting queue (MetricNames.backlog_one_per). The pages
are in tests/fixtures/upstream (their headers name the SGLang source read).
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from prometheus_client.parser import text_string_to_metric_families

from fdngx.domain import Load
from fdngx.engines import REGISTRY, spec
from fdngx.weights import scrape
from fdngx.weights.promtext import Copies, Gathered, fast_values
from fdngx.weights.scrape import load_from_metrics, parse_metrics, relevant_lines, wanted_names
from tests.unit.test_fleet_parse import same

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
UPSTREAM = FIXTURES / "upstream"
SGLANG = spec("sglang")
NAMES = wanted_names(SGLANG)
RUNNING, QUEUED = "sglang:num_running_reqs", "sglang:num_queue_reqs"


def load(text: str) -> Load:
    """The load fdngx reads from an SGLang page; parsed whole or only the series it uses, the same."""
    got = load_from_metrics(parse_metrics(text, NAMES), SGLANG)
    assert load_from_metrics(parse_metrics(text), SGLANG) == got
    return got


def forced_to_the_parser(text: str) -> str:
    """The same page with one more label on every sample, `z="\\\\"`: outside the fast path's grammar (an
    escape), so prometheus_client reads it; the same label on every sample changes no grouping."""
    return "\n".join(line.replace("} ", ',z="\\\\"} ', 1) if line.startswith("sglang:") and "{" in line else line
                     for line in text.split("\n"))


# -- the pages SGLang prints -----------------------------------------------------------------------------


def test_tp_ranks_repeating_one_batch_count_it_once() -> None:
    """--tp-size 2 --enable-metrics-for-all-schedulers: both TP ranks report the one batch (11 running, 4
    waiting). Before: 22 and 8."""
    text = (UPSTREAM / "sglang-metrics-tp2-all-schedulers.prom").read_text()
    got = load(text)
    assert (got.running, got.queued, got.kv_usage) == (11.0, 4.0, 0.43)
    assert got.queue_time_sum == pytest.approx(0.5)  # each rank observed the same two waits
    assert fast_values(text, NAMES) is not None  # the usual page takes the fast path
    assert load_from_metrics(parse_metrics(forced_to_the_parser(text), NAMES), SGLANG) == got


def test_dp_attention_with_the_flag_adds_up_its_dp_ranks_once_each() -> None:
    """--tp-size 4 --dp-size 2 --enable-dp-attention --ep-size 4 + the flag: DP rank 0 (tp_rank 0, 1) runs 7
    with 1 waiting, DP rank 1 (tp_rank 2, 3) 5 with 3; every rank has its own moe_ep_rank. Before: 24 and 8."""
    text = (UPSTREAM / "sglang-metrics-dpa-all-schedulers.prom").read_text()
    got = load(text)
    assert (got.running, got.queued, got.kv_usage) == (12.0, 4.0, 0.30)
    assert got.queue_time_sum == pytest.approx(0.2 + 1.0)
    assert load_from_metrics(parse_metrics(forced_to_the_parser(text), NAMES), SGLANG) == got


def test_dp_attention_without_the_flag_adds_up_both_dp_ranks() -> None:
    """Without the flag each DP rank's attention-TP rank 0 exports (tp_rank 0 and 1, dp_rank 0 and 1): two
    batches, both counted (one tp_rank per batch: nothing to fold)."""
    got = load((UPSTREAM / "sglang-metrics-dpa.prom").read_text())
    assert (got.running, got.queued) == (12.0, 4.0)


def test_priority_scheduling_counts_the_total_not_total_plus_breakdown() -> None:
    """--enable-priority-scheduling: each request gauge's total under priority="" beside one series per
    priority class (11 running = 6 + 5, 4 waiting = 3 + 1). Before: 22 and 8, the replica starved as busy."""
    text = (UPSTREAM / "sglang-metrics-priority.prom").read_text()
    got = load(text)
    assert (got.running, got.queued, got.kv_usage) == (11.0, 4.0, 0.43)
    assert load_from_metrics(parse_metrics(forced_to_the_parser(text), NAMES), SGLANG) == got
    # DP ranks still add up, each with its own total and breakdown
    two = text + "".join(line.replace('tp_rank="0"', 'tp_rank="0",dp_rank="1"') + "\n"
                         for line in text.splitlines() if line.startswith(("sglang:num_running", "sglang:num_queue")))
    assert (load(two).running, load(two).queued) == (22.0, 8.0)


def test_pipeline_stages_hold_one_queue_and_share_the_running() -> None:
    """--pp-size 2: each stage reports the whole waiting queue (4) and observes each wait, but only the
    micro-batch it is on as running (6 and 5). Before: 8 waiting and both stages' waits added up."""
    text = (UPSTREAM / "sglang-metrics-pp2.prom").read_text()
    got = load(text)
    assert (got.running, got.queued, got.kv_usage) == (11.0, 4.0, 0.43)
    assert got.queue_time_sum == pytest.approx(0.6)  # the stages' copies, the largest
    assert fast_values(text, NAMES) is not None
    assert load_from_metrics(parse_metrics(forced_to_the_parser(text), NAMES), SGLANG) == got


def test_the_plain_page_reads_as_before() -> None:
    """One scheduler (the default, TP 1 or the flag off): its one sample per series."""
    got = load((UPSTREAM / "sglang-metrics.prom").read_text())
    assert (got.running, got.queued, got.kv_usage) == (11.0, 4.0, 0.43)


# -- copies that disagree --------------------------------------------------------------------------------

LABELS = 'engine_type="unified",model_name="m",moe_ep_rank="{r}",pp_rank="0",tp_rank="{r}"'


def page(*values: str) -> str:
    lines = [f"# TYPE {RUNNING} gauge"]
    lines += [f"{RUNNING}{{{LABELS.format(r=r)}}} {v}" for r, v in enumerate(values)]
    lines += [f"# TYPE {QUEUED} gauge", f"{QUEUED}{{{LABELS.format(r=0)}}} 0"]
    return "\n".join(lines) + "\n"


def test_copies_read_at_different_moments_give_the_largest() -> None:
    """Each rank sets its gauge when it logs; a scrape between two ranks' logs sees 10 and 11."""
    for values in (("10", "11"), ("11", "10"), ("11", "11", "9", "10")):
        text = page(*values)
        assert load(text).running == 11.0
        assert parse_metrics(forced_to_the_parser(text), NAMES)[RUNNING] == [11.0]


@pytest.mark.parametrize("bad", ["NaN", "-1", "+Inf"])
def test_a_copy_no_count_can_be_still_makes_the_page_invalid(bad: str) -> None:
    """As when every copy added up: a NaN, negative or infinite copy is not hidden behind a good one."""
    for text in (page("11", bad), page(bad, "11")):
        for parsed in (parse_metrics(text, NAMES), parse_metrics(forced_to_the_parser(text), NAMES)):
            with pytest.raises(ValueError, match="value"):
                load_from_metrics(parsed, SGLANG)


def test_only_the_engines_that_say_so_fold_copies() -> None:
    """vLLM and FastDeploy declare no copies: every label set still adds up, as before."""
    folded = scrape._copies()
    assert folded and all(name.startswith("sglang:") for name in folded)
    ranks = frozenset({"tp_rank", "moe_ep_rank"})
    assert set(folded.values()) == {ranks, ranks | {"priority"}, ranks | {"pp_rank", "priority"}, ranks | {"pp_rank"}}
    assert {n for n, rule in folded.items() if "pp_rank" in rule} == {QUEUED, "sglang:queue_time_seconds_sum"}
    assert {n for n, rule in folded.items() if "priority" in rule} == {RUNNING, QUEUED}  # gauges with a total
    vllm = spec("vllm")
    text = ('vllm:num_requests_running{engine="0",tp_rank="0"} 3\nvllm:num_requests_running{engine="0",tp_rank="1"} 3\n'
            'vllm:num_requests_waiting{engine="0"} 1\n')
    assert load_from_metrics(parse_metrics(text, wanted_names(vllm)), vllm).running == 6.0


def test_a_sample_name_has_one_rule_across_engines() -> None:
    """_copies is keyed by sample name: no two engines may read one name with different rules."""
    rules: dict[str, frozenset[str]] = {}
    for engine in REGISTRY.values():
        for name in wanted_names(engine):
            rule = scrape.copies_rule(engine, name)
            assert rules.setdefault(name, rule) == rule, name


def plain_parser(text: str, names: frozenset[str]) -> dict[str, list[float]]:
    """What fdngx read before: every label set one value."""
    values: dict[str, list[float]] = {}
    for family in text_string_to_metric_families(relevant_lines(text, names)):
        for sample in family.samples:
            values.setdefault(sample.name, []).append(float(sample.value))
    return values


def test_vllm_and_fastdeploy_pages_read_exactly_as_before() -> None:
    pages = [*FIXTURES.glob("*.prom"), *UPSTREAM.glob("*.prom")]
    for engine in ("fastdeploy", "vllm", "sim"):
        names = wanted_names(spec(engine))
        for path in pages:
            text = path.read_text()
            assert parse_metrics(text, names) == plain_parser(text, names), (engine, path.name)


# -- the two paths agree on any label sets -----------------------------------------------------------------

VALUES = st.one_of(st.integers(0, 40).map(str), st.sampled_from(["2.5", "0.0", "1e1", "NaN", "-1", "+Inf"]))


@st.composite
def rank_page(draw: st.DrawFn) -> str:
    """Samples of the two gauges under random rank label sets (some repeated, some without a rank label),
    label order shuffled, in any order."""
    lines = []
    for name in (RUNNING, QUEUED):
        for _ in range(draw(st.integers(1, 8))):
            labels = {"model_name": draw(st.sampled_from(["m", "n"]))}
            for label, top in (("tp_rank", 3), ("moe_ep_rank", 3), ("dp_rank", 2), ("pp_rank", 1), ("x", 1)):
                if draw(st.booleans()):
                    labels[label] = str(draw(st.integers(0, top)))
            pairs = [f'{k}="{v}"' for k, v in labels.items()]
            draw(st.randoms()).shuffle(pairs)
            lines.append(f"{name}{{{','.join(pairs)}}} {draw(VALUES)}")
    draw(st.randoms()).shuffle(lines)
    return "\n".join(lines) + "\n"


def oracle(text: str) -> dict[str, dict[frozenset[tuple[str, str]], float]]:
    """Sample name -> (labels less tp_rank and moe_ep_rank, and pp_rank for the queue) -> the largest finite
    copy, any bad one winning."""
    out: dict[str, dict[frozenset[tuple[str, str]], float]] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            copies = ("tp_rank", "moe_ep_rank", *(("pp_rank",) if s.name == QUEUED else ()))
            key = frozenset((k, v) for k, v in s.labels.items() if k not in copies)
            old = out.setdefault(s.name, {}).get(key)
            bad = not 0 <= s.value < math.inf
            if old is None or bad or (0 <= old < math.inf and s.value > old):
                out[s.name][key] = s.value
    return out


def parser_values(text: str, copies: Copies) -> dict[str, list[float]]:
    """prometheus_client's reading of the lines, gathered as scrape.parse_metrics' fallback gathers them."""
    values = Gathered(copies)
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            values.add(sample.name, float(sample.value), dict.items, sample.labels)
    return values.values


@settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))
@given(rank_page())
def test_the_fast_path_and_the_parser_fold_copies_alike(text: str) -> None:
    folded = scrape._copies()
    fast = fast_values(text, NAMES, folded)
    assert fast is not None
    slow = parser_values(relevant_lines(text, NAMES), folded)
    assert same(fast, slow), (text, fast, slow)
    # The whole scrape path, on the page and on the page the fast path must refuse.
    forced = forced_to_the_parser(text)
    assert fast_values(forced, NAMES, folded) is None
    assert same(parse_metrics(text, NAMES), fast) and same(parse_metrics(forced, NAMES), fast)
    # And what is kept: one value per batch, the largest copy (a bad one wins: the page is refused).
    want = oracle(text)
    for name, values in fast.items():
        bad = [v for v in want[name].values() if not 0 <= v < math.inf]
        assert len(values) == len(want[name])
        if not bad:
            assert sorted(values) == sorted(want[name].values())
        else:
            assert any(not 0 <= v < math.inf for v in values)
