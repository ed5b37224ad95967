"""The simulator's pure parts: queueing model, option checks, fault checks, request parsing, metric text."""

from __future__ import annotations

import json

import pytest
from prometheus_client.parser import text_string_to_metric_families

from fdngx.errors import UsageError
from fdngx.sim.config import build_config
from fdngx.sim.faults import validate_fault
from fdngx.sim.metrics import GARBAGE_METRICS, ReplicaMetrics, build_1_2_5_buckets
from fdngx.sim.model import ModelParams, ReplicaModel, SimRequest
from fdngx.sim.protocol import Formatter
from fdngx.sim.server import is_loopback
from fdngx.sim.validation import RequestError, parse_request

NO_JITTER = ModelParams(max_num_seqs=2, jitter=0.0)


def make(n: int, *, prompt: int = 10, max_tokens: int = 5, start: int = 0) -> list[SimRequest]:
    return [SimRequest(start + i, prompt, max_tokens, arrival=0.0) for i in range(n)]


def run_until_idle(model: ReplicaModel, now: float = 0.0, limit: int = 10_000) -> float:
    for _ in range(limit):
        d = model.begin_step(now)
        if d is None:
            return now
        now += d
        model.end_step(now)
    raise AssertionError("model never went idle")


def test_slots_fill_then_fifo_queue() -> None:
    model = ReplicaModel(NO_JITTER)
    reqs = make(5)
    for r in reqs:
        model.submit(r)
    model.begin_step(0.0)
    assert model.num_running == 2 and model.num_waiting == 3
    assert [r.rid for r in model.waiting] == [2, 3, 4]
    assert reqs[0].admitted == 0.0 and reqs[2].admitted is None


def test_first_token_after_one_step_and_finish_after_max_tokens() -> None:
    model = ReplicaModel(NO_JITTER)
    (req,) = make(1, max_tokens=3)
    model.submit(req)
    d = model.begin_step(0.0)
    assert d == pytest.approx(1 / 30 + 10 / 10000)
    model.end_step(d)
    assert req.first_token == pytest.approx(d) and req.generated == 1 and not req.done
    end = run_until_idle(model, d)
    assert req.generated == 3 and req.finished == pytest.approx(end)
    assert model.success_total == 1 and model.generation_tokens_total == 3
    assert model.reserved_blocks == 0


def test_fifo_order_of_admission() -> None:
    model = ReplicaModel(NO_JITTER)
    reqs = make(6, max_tokens=2)
    for r in reqs:
        model.submit(r)
    run_until_idle(model)
    admitted = [r.admitted for r in reqs]
    assert admitted == sorted(admitted)
    assert admitted[0] == admitted[1] < admitted[2] == admitted[3] < admitted[4]


def test_decode_step_grows_with_batch() -> None:
    params = ModelParams(max_num_seqs=64, jitter=0.0, prefill_rate=1e12)
    one, many = ReplicaModel(params), ReplicaModel(params)
    one.submit(make(1)[0])
    for r in make(64):
        many.submit(r)
    d1, d64 = one.begin_step(0.0), many.begin_step(0.0)
    assert d1 == pytest.approx(1 / 30, rel=1e-6)
    assert d64 == pytest.approx((1 / 30) * (1 + 0.01 * 63), rel=1e-6)


def test_prefill_time_grows_with_prompt_tokens() -> None:
    small, big = ReplicaModel(NO_JITTER), ReplicaModel(NO_JITTER)
    small.submit(make(1, prompt=100)[0])
    big.submit(make(1, prompt=5000)[0])
    assert big.begin_step(0.0) - small.begin_step(0.0) == pytest.approx(4900 / 10000)


def test_prefill_budget_spreads_admission_over_steps() -> None:
    model = ReplicaModel(ModelParams(max_num_seqs=8, jitter=0.0, max_prefill_tokens=2500))
    for r in make(4, prompt=1000):
        model.submit(r)
    model.begin_step(0.0)
    assert model.num_running == 2 and model.num_waiting == 2


def test_speed_divides_step_time() -> None:
    fast, slow = ReplicaModel(NO_JITTER), ReplicaModel(NO_JITTER, speed=0.5)
    fast.submit(make(1)[0])
    slow.submit(make(1)[0])
    assert slow.begin_step(0.0) == pytest.approx(2 * fast.begin_step(0.0))


def test_kv_budget_blocks_admission_and_usage_tracks_tokens() -> None:
    # 10 blocks of 16 tokens; each request reserves ceil((40 + 40) / 16) = 5 blocks.
    model = ReplicaModel(ModelParams(max_num_seqs=8, kv_blocks=10, block_size=16, jitter=0.0))
    for r in make(3, prompt=40, max_tokens=40):
        model.submit(r)
    model.begin_step(0.0)
    assert model.num_running == 2 and model.num_waiting == 1
    assert model.used_blocks() == 2 * 3  # ceil(40 / 16) each before any output
    model.end_step(0.1)
    u1 = model.cache_usage()
    for i in range(20):
        model.begin_step(0.2 + i)
        model.end_step(0.3 + i)
    assert model.cache_usage() > u1


def test_cancel_frees_slot_and_queue_place() -> None:
    model = ReplicaModel(NO_JITTER)
    reqs = make(4)
    for r in reqs:
        model.submit(r)
    model.begin_step(0.0)
    model.cancel(reqs[0])
    model.cancel(reqs[3])
    assert model.num_running == 1 and [r.rid for r in model.waiting] == [2]
    assert reqs[0].done and reqs[0].finished is None
    model.end_step(0.1)
    model.begin_step(0.1)
    assert model.num_running == 2


def test_seeded_jitter_is_reproducible() -> None:
    params = ModelParams(max_num_seqs=2, jitter=0.2)

    def durations(seed: int) -> list[float]:
        model = ReplicaModel(params, seed=seed)
        model.submit(make(1, max_tokens=10)[0])
        out = []
        now = 0.0
        while (d := model.begin_step(now)) is not None:
            out.append(d)
            now += d
            model.end_step(now)
        return out

    assert durations(1) == durations(1) != durations(2)
    assert all(0.8 / 30 <= d <= 1.2 * (1 / 30 + 0.001) for d in durations(3))


# -- options ---------------------------------------------------------------------------------------
def test_build_config_spreads_single_values_and_lists() -> None:
    cfg = build_config(ports="1001,1002", metrics_ports="2001,2002", speed="1.0,0.5", max_num_seqs="8")
    assert [r.speed for r in cfg.replicas] == [1.0, 0.5]
    assert [r.max_num_seqs for r in cfg.replicas] == [8, 8]
    assert [r.max_concurrency for r in cfg.replicas] == [32, 32]


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        ({"ports": "1001,1002", "metrics_ports": "2001"}, "--metrics-ports has 1"),
        ({"ports": "0", "metrics_ports": "2001"}, "out of range"),
        ({"ports": "1001", "metrics_ports": "70000"}, "out of range"),
        ({"ports": "1001,1001", "metrics_ports": "2001,2002"}, "given twice"),
        ({"ports": "1001", "metrics_ports": "1001"}, "given twice"),
        ({"ports": "a,b", "metrics_ports": "2001,2002"}, "--ports must be"),
        ({"ports": "1001,1002", "metrics_ports": "2001,2002", "speed": "1,2,3"}, "--speed has 3 values"),
        ({"ports": "1001", "metrics_ports": "2001", "speed": "0"}, "--speed must be positive"),
        ({"ports": "1001", "metrics_ports": "2001", "max_num_seqs": "0"}, "--max-num-seqs"),
        ({"ports": "", "metrics_ports": ""}, "at least one port"),
    ],
)
def test_build_config_rejects(kwargs: dict, needle: str) -> None:
    with pytest.raises(UsageError, match=needle.replace("(", r"\(")):
        build_config(**kwargs)


def test_validate_fault() -> None:
    assert validate_fault({"error_rate": 0.5, "hang": True}) == {"error_rate": 0.5, "hang": True}
    for bad in ({}, [], {"error_rate": 2}, {"speed": 0}, {"hang": "yes"}, {"explode": True}, {"metrics_delay": -1}):
        with pytest.raises(UsageError):
            validate_fault(bad)


def test_is_loopback() -> None:
    assert is_loopback("127.0.0.1") and is_loopback("127.9.9.9") and is_loopback("::1")
    assert is_loopback("::ffff:127.0.0.1")
    assert not is_loopback("10.0.0.1") and not is_loopback("::ffff:10.0.0.1") and not is_loopback(None)


# -- requests and bodies ---------------------------------------------------------------------------
# (Which error FastDeploy answers for which request, and the exact bodies: tests/unit/test_sim_fidelity.py.)
def parse(body: object, chat: bool = True) -> object:
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    return parse_request(raw, chat=chat, default_max_tokens=128)


def test_parse_request_fields() -> None:
    p = parse(
        {
            "messages": [{"role": "user", "content": "x" * 400}],
            "max_tokens": 7,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
    )
    assert (p.prompt_tokens, p.max_tokens, p.capped, p.stream, p.include_usage) == (103, 7, True, True, True)
    assert parse({"messages": [{"role": "user", "content": "hi"}], "max_completion_tokens": 9}).max_tokens == 9
    assert parse({"prompt": "y" * 80}, chat=False).prompt_tokens == 20
    uncapped = parse({"prompt": [1, 2, 3]}, chat=False)
    assert (uncapped.max_tokens, uncapped.capped, uncapped.prompt_tokens) == (128, False, 3)


@pytest.mark.parametrize(
    "body",
    [
        b"{not json",
        b"[1]",
        {"messages": []},
        {"messages": [{"content": "no role"}]},
        {"messages": [{"role": "user", "content": "x"}], "max_tokens": 0},
        {"messages": [{"role": "user", "content": "x"}], "stream": "maybe"},
        {"prompt": 5},
    ],
)
def test_parse_request_rejects(body: object) -> None:
    with pytest.raises(RequestError) as err:
        parse(body, chat=not (isinstance(body, dict) and "prompt" in body))
    assert err.value.status in (400, 500) and set(err.value.body["error"]) == {"message", "type", "param", "code"}


def test_stream_events_are_valid_openai_chunks() -> None:
    p = parse(
        {
            "messages": [{"role": "user", "content": "hi"}],
            "max_tokens": 3,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
    )
    fmt = Formatter(p, "m", salt=3)
    raw = fmt.first_event() + fmt.token_events(0, 2, 0.1, finished=False) + fmt.token_events(2, 3, 0.2, True)
    raw += fmt.final_events(3)
    events = [e[len(b"data: ") :] for e in raw.split(b"\n\n") if e]
    assert events[-1] == b"[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])
    assert len(text.split()) == 3
    assert chunks[-2]["choices"][0]["finish_reason"] == "length"
    assert chunks[-1]["usage"]["completion_tokens"] == 3 and chunks[-1]["choices"] == []


# -- metrics ---------------------------------------------------------------------------------------
def families(text: bytes) -> dict[str, object]:
    return {f.name: f for f in text_string_to_metric_families(text.decode())}


def sample(text: bytes, name: str) -> float:
    for fam in text_string_to_metric_families(text.decode()):
        for s in fam.samples:
            if s.name == name:
                return s.value
    raise KeyError(name)


@pytest.mark.parametrize("legacy", [False, True], ids=["default", "legacy"])
def test_metrics_names_types_and_values(legacy: bool) -> None:
    """Both shapes of fastdeploy/metrics/metrics.py; the full comparison with the upstream pages is in
    test_sim_fidelity.py."""
    model = ReplicaModel(NO_JITTER)
    metrics = ReplicaMetrics(model, legacy=legacy)
    for r in make(5):
        model.submit(r)
    model.begin_step(0.0)
    text = metrics.render()
    fams = families(text)
    assert fams["fastdeploy:num_requests_running"].type == "gauge"
    assert fams["fastdeploy:time_to_first_token_seconds"].type == "histogram"
    assert fams["fastdeploy:requests_number"].type == "counter"
    assert sample(text, "fastdeploy:num_requests_running") == 2
    if legacy:
        assert b"num_requests_enqueued" not in text
        assert sample(text, "fastdeploy:num_requests_waiting") == 0
    else:
        assert sample(text, "fastdeploy:num_requests_waiting") + sample(text, "fastdeploy:num_requests_enqueued") == 3
    assert sample(text, "fastdeploy:max_batch_size") == 2
    assert b"fastdeploy:requests_number_total" in text and b"_created" not in text
    assert b'fastdeploy:time_to_first_token_seconds_bucket{le="0.04"}' in text


def test_garbage_metrics_break_the_parser() -> None:
    with pytest.raises(ValueError):
        list(text_string_to_metric_families(GARBAGE_METRICS.decode(errors="replace")))


def test_1_2_5_buckets() -> None:
    assert build_1_2_5_buckets(100) == [1, 2, 5, 10, 20, 50, 100]
