"""Two page rules both metrics paths keep (fdngx.weights.promtext's fast path and prometheus_client's parser
behind scrape.parse_metrics): a label set repeated exactly, for a series whose values add up, is a bad page
(Prometheus refuses it too; before, `running 5` twice read 10), and nothing after an OpenMetrics `# EOF` line
is read (before, it was). The paths must keep agreeing on every page: a property test over generated pages
with repeats and `# EOF` lines (and near misses) compares both with an oracle written here."""

from __future__ import annotations

import math
import re

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from prometheus_client.parser import text_string_to_metric_families

from fdngx.engines import spec
from fdngx.weights import scrape
from fdngx.weights.promtext import Gathered, fast_values
from fdngx.weights.scrape import parse_metrics, relevant_lines, wanted_names

FD = wanted_names(spec("fastdeploy"))
RUNNING = "fastdeploy:num_requests_running"
OUTSIDE = 'fastdeploy:num_requests_enqueued{a="x\\"y"} 0\n'  # an escaped quote: the fast path steps aside


def page(*lines: str) -> str:
    return "\n".join((*lines, "fastdeploy:num_requests_waiting 1")) + "\n"


@pytest.mark.parametrize("text", [
    page(f"{RUNNING} 5", f"{RUNNING} 5"),
    page(f'{RUNNING}{{engine="0",x="1"}} 5', f'{RUNNING}{{x="1",engine="0"}} 5'),  # the same set, reordered
    page(f"{RUNNING} 5", f"{RUNNING}{{}} 5"),  # no labels, twice
], ids=["plain", "reordered", "braces"])
def test_a_label_set_repeated_is_refused_not_added_up(text: str) -> None:
    for either in (text, OUTSIDE + text):  # the fast path, then prometheus_client's
        with pytest.raises(ValueError, match="duplicate series fastdeploy:num_requests_running"):
            parse_metrics(either, FD)


def test_distinct_label_sets_still_add_up_and_copies_still_fold() -> None:
    text = page(f'{RUNNING}{{engine="0"}} 5', f'{RUNNING}{{engine="1"}} 5')
    assert parse_metrics(text, FD)[RUNNING] == [5.0, 5.0]
    assert parse_metrics(OUTSIDE + text, FD)[RUNNING] == [5.0, 5.0]
    # SGLang's TP ranks repeat one count (MetricNames.one_per): a repeat there is one more copy of it.
    sglang = wanted_names(spec("sglang"))
    ranks = 'sglang:num_running_reqs{tp_rank="0"} 5\nsglang:num_running_reqs{tp_rank="0"} 5\n'
    assert parse_metrics(ranks, sglang)["sglang:num_running_reqs"] == [5.0]


@pytest.mark.parametrize("eof", ["# EOF\n", "# EOF"], ids=["newline", "last-line"])
def test_nothing_after_an_openmetrics_eof_is_read(eof: str) -> None:
    after = f"{RUNNING} 99\nfastdeploy:num_requests_enqueued 7\n" if eof.endswith("\n") else ""
    text = f"{RUNNING} 3\nfastdeploy:num_requests_waiting 1\n{eof}{after}"
    want = {RUNNING: [3.0], "fastdeploy:num_requests_waiting": [1.0]}
    assert parse_metrics(text, FD) == want
    assert parse_metrics(text) == want  # the whole page, through the parser
    forced = parse_metrics(OUTSIDE + text, FD)
    assert forced == {"fastdeploy:num_requests_enqueued": [0.0], **want}


def test_a_line_that_only_looks_like_eof_ends_nothing() -> None:
    for near in ("# EOF ", "#EOF", "# EOF\r", "# eof", "# EOFX"):
        text = f"{RUNNING} 3\n{near}\nfastdeploy:num_requests_waiting 1\n"
        assert parse_metrics(text, FD)["fastdeploy:num_requests_waiting"] == [1.0], near


# -- the two paths agree with an oracle on generated pages -------------------------------------------------

_EOF = re.compile(r"^# EOF$", re.M)
LABEL_SETS = [{}, {"engine": "0"}, {"engine": "1"}, {"tp_rank": "0"}, {"tp_rank": "1"}, {"tp_rank": "0", "engine": "0"},
              {"model_name": "m", "engine": "0", "pp_rank": "0"}, {"model_name": "m", "engine": "0", "pp_rank": "1"}]
EOF_LINES = ["# EOF", "# EOF ", "#EOF", "# EOF\r", "# eof", "x # EOF", "# EOF # EOF"]


@st.composite
def pages(draw: st.DrawFn) -> tuple[frozenset[str], str]:
    """A page of an engine's series under a few label sets (so exact repeats are common, in any label
    order), with `# EOF` lines and near misses anywhere, TYPE lines, and lines the fast path steps aside for."""
    names = wanted_names(spec(draw(st.sampled_from(["fastdeploy", "vllm", "sglang"]))))
    lines = []
    for _ in range(draw(st.integers(1, 14))):
        kind = draw(st.integers(0, 11))
        name = draw(st.sampled_from(sorted(names)))
        if kind == 0:
            lines.append(draw(st.sampled_from(EOF_LINES)))
        elif kind == 1:
            lines.append(f"# TYPE {name} {draw(st.sampled_from(['gauge', 'untyped', 'counter']))}")
        elif kind == 2:
            lines.append(f'{name}{{a="x\\"y"}} 1')
        else:
            pairs = [f'{k}="{v}"' for k, v in draw(st.sampled_from(LABEL_SETS)).items()]
            draw(st.randoms()).shuffle(pairs)
            labels = "{" + ",".join(pairs) + "}" if pairs or draw(st.booleans()) else ""
            lines.append(f"{name}{labels} {draw(st.sampled_from(['0', '1', '2.5', '7', 'NaN', '-1', '+Inf']))}")
    return names, "\n".join(lines) + draw(st.sampled_from(["\n", "", "\n# EOF\n", "\n# EOF"]))


def oracle(text: str, names: frozenset[str]) -> dict[str, list[float]] | BaseException:
    """prometheus_client over the relevant lines of the page before its first `# EOF` line, refusing an exact
    repeat of a label set of a series without copies, gathered as parse_metrics gathers."""
    copies = scrape._copies()
    values, seen = Gathered(copies), set()
    try:
        for family in text_string_to_metric_families(relevant_lines(_EOF.split(text, 1)[0], names)):
            for sample in family.samples:
                key = (sample.name, frozenset(sample.labels.items()))
                if sample.name not in copies and key in seen:
                    raise ValueError(f"duplicate series {sample.name}")
                seen.add(key)
                values.add(sample.name, float(sample.value), dict.items, sample.labels)
    except Exception as exc:
        return exc
    return values.values


def outcome(read: object) -> dict[str, list[float]] | BaseException | None:
    try:
        return read()  # type: ignore[operator,no-any-return]
    except Exception as exc:
        return exc


def agree(a: dict[str, list[float]] | BaseException | None, b: dict[str, list[float]] | BaseException) -> bool:
    if isinstance(a, BaseException) or isinstance(b, BaseException):
        return type(a) is type(b)
    assert a is not None
    return a.keys() == b.keys() and all(
        len(a[k]) == len(b[k]) and all(x == y or (math.isnan(x) and math.isnan(y)) for x, y in zip(a[k], b[k],
                                                                                                       strict=True))
        for k in a)


@settings(max_examples=500, deadline=None, suppress_health_check=list(HealthCheck))
@given(pages())
def test_property_both_paths_read_repeats_and_eof_as_the_oracle(generated: tuple[frozenset[str], str]) -> None:
    names, text = generated
    want = oracle(text, names)
    fast = outcome(lambda: fast_values(text, names, scrape._copies()))
    if fast is not None:  # None: outside the fast path's grammar, the parser reads it
        assert agree(fast, want), (text, fast, want)
    assert agree(outcome(lambda: parse_metrics(text, names)), want), text
