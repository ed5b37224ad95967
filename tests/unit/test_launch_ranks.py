"""fdngx.launch.ranks.Watch: when a running rank counts as lost, from the probes it has seen in a row."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from fdngx.launch.probe import Health, HealthState
from fdngx.launch.ranks import REFUSED_LIMIT, Watch

OK = Health(HealthState.HEALTHY, 200)
REFUSED = Health(HealthState.NOT_LISTENING)
TIMEOUT = Health(HealthState.TIMEOUT, detail="2s")

answers = st.one_of(
    st.just(OK), st.just(REFUSED), st.just(TIMEOUT), st.just(Health(HealthState.ERROR, detail="reset")),
    st.builds(lambda s: Health(HealthState.HTTP_STATUS, s), st.integers(100, 599)),
)


def failing(h: Health) -> bool:
    return h.state is HealthState.HTTP_STATUS and h.status is not None and h.status >= 400


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(answers, st.floats(0.0, 30.0)), max_size=40), st.sampled_from([0.0, 1.0, 10.0, 120.0]))
def test_lost_exactly_after_refusals_in_a_row_or_an_unbroken_run_of_error_answers(
        seen: list[tuple[Health, float]], after: float) -> None:
    """The model, said plainly: lost when the last REFUSED_LIMIT probes were all refused, or (with a limit) the
    trailing run of 4xx/5xx answers began at least `after` seconds ago."""
    w, now, times = Watch(), 0.0, []
    for h, gap in seen:
        now += gap
        times.append(now)
        w.see(h, now)
        history = [x for x, _ in seen[:len(times)]]
        refused_run = len(history) - next((i + 1 for i in range(len(history) - 1, -1, -1)
                                           if history[i].state is not HealthState.NOT_LISTENING), 0)
        start = len(history)
        while start > 0 and failing(history[start - 1]):
            start -= 1
        expect_refused = refused_run >= REFUSED_LIMIT
        expect_failing = after > 0 and start < len(history) and now - times[start] >= after
        why = w.lost(now, after)
        assert (why is not None) == (expect_refused or expect_failing), (history, why)
        if expect_refused:
            assert why is not None and why.startswith("stopped listening")
        elif expect_failing:
            assert why == (f"has answered HTTP {history[-1].status} to /health for {now - times[start]:.0f}s "
                           f"(--unhealthy-after {after:g})")


def test_fastdeploys_lasting_404_is_lost_and_its_304_and_timeouts_are_not() -> None:
    w = Watch()
    for t in range(0, 130, 2):
        w.see(Health(HealthState.HTTP_STATUS, 404), float(t))
    assert w.lost(128.0, 120.0) == "has answered HTTP 404 to /health for 128s (--unhealthy-after 120)"
    assert w.lost(128.0, 0.0) is None  # --unhealthy-after 0: never
    for h in (Health(HealthState.HTTP_STATUS, 304), TIMEOUT):  # weights cleared on purpose; too busy to answer
        w = Watch()
        for t in range(0, 600, 2):
            w.see(h, float(t))
        assert w.lost(600.0, 120.0) is None
    w = Watch()  # one 200 in the run starts it over
    for t, h in [(0, Health(HealthState.HTTP_STATUS, 503)), (100, OK), (110, Health(HealthState.HTTP_STATUS, 503))]:
        w.see(h, float(t))
    assert w.lost(200.0, 120.0) is None and w.lost(230.0, 120.0) is not None
    w.clear()
    assert w.lost(1000.0, 120.0) is None
