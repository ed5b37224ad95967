"""The metrics fast path (fdngx.weights.promtext) reads every page exactly as prometheus_client's parser does,
or hands it over: a differential test over hostile pages and the engines' real samples."""

from __future__ import annotations

import math
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from prometheus_client.parser import text_string_to_metric_families

from fdngx.domain import Engine
from fdngx.engines import spec
from fdngx.weights.promtext import NO_COPIES, Copies, Gathered, before_eof, fast_values
from fdngx.weights.scrape import parse_metrics, relevant_lines, wanted_names
from tests.security.test_properties import metrics_page

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"


def parser(text: str, names: frozenset[str], copies: Copies = NO_COPIES) -> dict[str, list[float]] | BaseException:
    """What fdngx read before the fast path: prometheus_client over the relevant lines of the page up to any
    `# EOF`, gathered as scrape.parse_metrics gathers them (a label set repeated: ValueError)."""
    values = Gathered(copies)
    try:
        for family in text_string_to_metric_families(relevant_lines(before_eof(text), names)):
            for sample in family.samples:
                values.add(sample.name, float(sample.value), dict.items, sample.labels)
    except Exception as exc:
        return exc
    return values.values


def same(a: dict[str, list[float]], b: dict[str, list[float]]) -> bool:
    return a.keys() == b.keys() and all(
        len(a[k]) == len(b[k]) and all(x == y or (math.isnan(x) and math.isnan(y)) for x, y in zip(a[k], b[k],
                                                                                                       strict=True))
        for k in a)


@settings(max_examples=400, deadline=None, suppress_health_check=list(HealthCheck))
@given(metrics_page())
def test_the_fast_path_reads_what_the_parser_reads_or_steps_aside(page: tuple[Engine, str]) -> None:
    engine, text = page
    names = wanted_names(spec(engine))
    try:
        fast = fast_values(text, names)
    except (OverflowError, ValueError) as exc:  # ValueError: a label set repeated
        fast = exc  # type: ignore[assignment]
    if fast is None:
        return  # outside the strict grammar: prometheus_client decides, as before
    slow = parser(text, names)
    if isinstance(fast, BaseException) or isinstance(slow, BaseException):
        assert type(fast) is type(slow), (text, fast, slow)
    else:
        assert same(fast, slow), (text, fast, slow)


def test_real_pages_take_the_fast_path_with_the_same_values() -> None:
    for sample in ("fastdeploy-metrics-sample.prom", "vllm-metrics-sample.prom", "sglang-metrics-sample.prom"):
        text = (FIXTURES / sample).read_text()
        for engine in ("fastdeploy", "vllm", "sglang"):
            names = wanted_names(spec(engine))
            fast = fast_values(text, names)
            slow = parser(text, names)
            assert fast is not None and not isinstance(slow, BaseException) and same(fast, slow), (sample, engine)


def test_pages_outside_the_grammar_go_to_the_parser() -> None:
    names = wanted_names(spec("fastdeploy"))
    for line in ('fastdeploy:num_requests_running{a="x\\"y"} 3',  # an escaped quote
                 'fastdeploy:num_requests_running{a="1",a="2"} 3',  # a repeated label: the parser refuses
                 "fastdeploy:num_requests_running\t3",
                 "fastdeploy:num_requests_running 3 4 5",
                 "# TYPE fastdeploy:num_requests_running counter",  # a counter renames its samples
                 "fastdeploy:num_requests_running 0x10"):
        page = f"{line}\nfastdeploy:num_requests_waiting 1\n"
        assert fast_values(page, names) is None, line
    assert parse_metrics('fastdeploy:num_requests_running{a="x\\"y"} 3\n', names) == {
        "fastdeploy:num_requests_running": [3.0]}
