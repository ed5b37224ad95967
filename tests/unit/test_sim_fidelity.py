"""The simulator checked against FastDeploy's own source. Each test names the upstream file (and function) it
mirrors; the versions read are in tests/fixtures/upstream/README.md, and the fixtures there were written from
that source independently of the simulator's code. Pure tests: the same behaviours over real sockets are in
tests/integration/test_sim_fidelity.py.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from fdngx.sim.faults import validate_fault
from fdngx.sim.metrics import HTTP_EXCLUDED_PATHS, MULTIPROCESS_HELP, ReplicaMetrics
from fdngx.sim.model import ModelParams, ReplicaModel, SimRequest
from fdngx.sim.protocol import Formatter, dumps, models_body, too_many_requests_body
from fdngx.sim.validation import RequestError, parse_request

UPSTREAM = Path(__file__).resolve().parent.parent / "fixtures" / "upstream"
NO_JITTER = ModelParams(max_num_seqs=2, jitter=0.0)
# (legacy, fixture): the default shape has fastdeploy:num_requests_enqueued, the legacy shape (2.4/2.5) has not.
SHAPES = [
    pytest.param(False, "fastdeploy-metrics.prom", id="default"),
    pytest.param(True, "fastdeploy-metrics-legacy.prom", id="legacy"),
]


def upstream(name: str) -> str:
    return (UPSTREAM / name).read_text()


def families(text: str | bytes) -> dict[str, Any]:
    if isinstance(text, bytes):
        text = text.decode()
    return {f.name: f for f in text_string_to_metric_families(text)}


def value(text: bytes, name: str) -> float | None:
    for fam in text_string_to_metric_families(text.decode()):
        for s in fam.samples:
            if s.name == name:
                return s.value
    return None


def sim_page(legacy: bool, *, backlog: int = 0, http: bool = True) -> bytes:
    model = ReplicaModel(NO_JITTER)
    metrics = ReplicaMetrics(model, legacy=legacy)
    for i in range(NO_JITTER.max_num_seqs + backlog):
        model.submit(SimRequest(i, 10, 5, arrival=0.0))
    model.begin_step(0.0)
    if http:
        metrics.on_http("GET", "/v1/models", 200, 0.002)
    return metrics.render()


# -- /metrics: fastdeploy/metrics/metrics.py ---------------------------------------------------------------
@pytest.mark.parametrize(("legacy", "fixture"), SHAPES)
def test_metric_names_and_types_match_upstream(legacy: bool, fixture: str) -> None:
    """fastdeploy/metrics/metrics.py MetricsManager (GAUGE_METRICS, METRICS, SERVER_METRICS,
    set_cache_config_info) and metrics_middleware.py PrometheusMiddleware: exactly the same families, types
    and sample names as the upstream page, in both shapes."""
    ours, theirs = families(sim_page(legacy)), families(upstream(fixture))
    assert {n: f.type for n, f in ours.items()} == {n: f.type for n, f in theirs.items()}
    sample_names = {n: {s.name for s in f.samples} for n, f in theirs.items()}
    assert {n: {s.name for s in f.samples} for n, f in ours.items()} == sample_names
    assert ("fastdeploy:num_requests_enqueued" in ours) is not legacy


@pytest.mark.parametrize(("legacy", "fixture"), SHAPES)
def test_help_texts_labels_and_buckets_match_upstream(legacy: bool, fixture: str) -> None:
    """metrics.py get_filtered_metrics: gauges served from memory keep their descriptions, everything else goes
    through prometheus-client's multiprocess collector ("Multiprocess metric", no _created series); the
    histogram buckets and label names are the source's."""
    ours, theirs = families(sim_page(legacy)), families(upstream(fixture))
    assert {n: f.documentation for n, f in ours.items()} == {n: f.documentation for n, f in theirs.items()}
    assert ours["fastdeploy:requests_number"].documentation == MULTIPROCESS_HELP
    for name, fam in theirs.items():
        bounds = sorted({s.labels.get("le") for s in fam.samples if s.name.endswith("_bucket")}, key=float)
        assert (
            sorted({s.labels.get("le") for s in ours[name].samples if s.name.endswith("_bucket")}, key=float) == bounds
        )
        label_names = {k for s in fam.samples for k in s.labels if k != "le"}
        assert {k for s in ours[name].samples for k in s.labels if k != "le"} == label_names, name
    assert b"_created" not in sim_page(legacy)


@pytest.mark.parametrize("legacy", [False, True], ids=["default", "legacy"])
def test_backlog_shows_only_in_the_default_shape(legacy: bool) -> None:
    """The two shapes differ only in the backlog: the default splits it between num_requests_waiting (what the
    resource manager pulled, up to a batch) and num_requests_enqueued; on 2.4/2.5 builds (metrics.py as read)
    num_requests_waiting stays 0 and the backlog is invisible. Everything else reads the same."""
    page = sim_page(legacy, backlog=5)
    assert value(page, "fastdeploy:num_requests_running") == 2
    assert value(page, "fastdeploy:batch_size") == 2
    assert value(page, "fastdeploy:max_batch_size") == 2
    assert (value(page, "fastdeploy:gpu_cache_usage_perc") or 0) > 0
    if legacy:
        assert value(page, "fastdeploy:num_requests_waiting") == 0
        assert value(page, "fastdeploy:num_requests_enqueued") is None
    else:
        assert value(page, "fastdeploy:num_requests_waiting") == 2
        assert value(page, "fastdeploy:num_requests_enqueued") == 3


def test_http_metrics_skip_the_paths_upstream_excludes() -> None:
    """metrics_middleware.py EXCLUDE_PATHS: health, ping, load, metrics and the completion routes are not
    counted, so a replica that only serves traffic shows no http_* series at all."""
    assert {"/health", "/ping", "/v1/chat/completions", "/v1/completions"} <= HTTP_EXCLUDED_PATHS
    model = ReplicaModel(NO_JITTER)
    metrics = ReplicaMetrics(model)
    for path in ("/health", "/ping", "/v1/chat/completions", "/v1/completions"):
        metrics.on_http("POST", path, 200, 0.01)
    assert b"http_requests_total" not in metrics.render()
    metrics.on_http("GET", "/v1/models", 304, 0.01)
    assert value(metrics.render(), "http_requests_total") == 1
    assert b'status_code="304"' in metrics.render()


def drive(model: ReplicaModel, metrics: ReplicaMetrics) -> None:
    """Step until idle, feeding the metrics as fdngx.sim.server.Replica._step_loop does."""
    now = 0.0
    while (d := model.begin_step(now)) is not None:
        now += d
        progressed = model.end_step(now)
        metrics.on_step(len(progressed))
        for req in progressed:
            if req.generated == 1:
                metrics.on_first_token(req)
            else:
                metrics.on_token(req)
            if req.finished is not None:
                metrics.on_finish(req)


def test_tpot_is_observed_every_decode_step() -> None:
    """output/token_processor.py TokenProcessor._record_metrics: every step, for every request that got a token
    after its first, time_per_output_token_seconds observes now - task.last_token_time (not once per finished
    request); generation_tokens_total grows by the tokens of the step."""
    model = ReplicaModel(ModelParams(max_num_seqs=4, jitter=0.0, prefill_rate=1e12, batch_cost=0.0))
    metrics = ReplicaMetrics(model)
    for rid, tokens in ((1, 5), (2, 3)):
        model.submit(SimRequest(rid, 10, tokens, arrival=0.0))
    drive(model, metrics)
    page = metrics.render()
    assert value(page, "fastdeploy:time_per_output_token_seconds_count") == (5 - 1) + (3 - 1)
    assert value(page, "fastdeploy:time_per_output_token_seconds_sum") == pytest.approx(6 / 30)
    assert value(page, "fastdeploy:generation_tokens_total") == 8
    assert value(page, "fastdeploy:request_success_total") == 2
    assert value(page, "fastdeploy:time_to_first_token_seconds_count") == 2


def test_tpot_buckets_see_a_slow_step() -> None:
    """token_processor.py _record_metrics: a per-step observation shows one slow step in its bucket, which a
    per-request average would have smoothed away."""
    model = ReplicaModel(ModelParams(max_num_seqs=1, jitter=0.0, prefill_rate=1e12))
    metrics = ReplicaMetrics(model)
    model.submit(SimRequest(1, 10, 6, arrival=0.0))
    now = 0.0
    for step in range(6):
        d = model.begin_step(now)
        assert d is not None
        now += d * (20 if step == 3 else 1)  # one 0.67 s stall
        for req in model.end_step(now):
            metrics.on_token(req)
    page = metrics.render()
    assert value(page, "fastdeploy:time_per_output_token_seconds_count") == 5
    buckets = {
        s.labels["le"]: s.value
        for f in text_string_to_metric_families(page.decode())
        if f.name == "fastdeploy:time_per_output_token_seconds"
        for s in f.samples
        if s.name.endswith("_bucket")
    }
    assert buckets["0.05"] == 4 and buckets["0.5"] == 4 and buckets["0.75"] == 5


# -- 429, 400, 500: api_server.py, utils.py ExceptionHandler, serving handlers ----------------------------
def test_429_body_is_fastdeploys() -> None:
    """api_server.py connection_manager(): HTTPException(429, "Too many requests,current max concurrency is N")
    answered as JSONResponse({"detail": ...}) by create_chat_completion / create_completion."""
    fixture = upstream("fastdeploy-429.json").strip()
    assert dumps(too_many_requests_body(512)).decode() == fixture
    assert too_many_requests_body(7) == {"detail": "Too many requests,current max concurrency is 7"}


def rejected(body: object, chat: bool = True) -> RequestError:
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    with pytest.raises(RequestError) as err:
        parse_request(raw, chat=chat, default_max_tokens=16)
    return err.value


HI = [{"role": "user", "content": "hi"}]


@pytest.mark.parametrize(
    ("body", "chat", "status", "type_", "code", "param"),
    [
        # utils.py ExceptionHandler.handle_request_validation_exception: 400, string codes
        ({}, True, 400, "invalid_request_error", "missing_required_parameter", "messages"),
        ({"messages": HI, "max_tokens": "x"}, True, 400, "invalid_request_error", "invalid_value", "max_tokens"),
        ({"messages": HI, "max_tokens": 1.5}, True, 400, "invalid_request_error", "invalid_value", "max_tokens"),
        ({"messages": HI, "stream": "maybe"}, True, 400, "invalid_request_error", "invalid_value", "stream"),
        ({"messages": HI, "model": 3}, True, 400, "invalid_request_error", "invalid_value", "model"),
        ({"messages": "hi"}, True, 400, "invalid_request_error", "invalid_value", "list[any]"),
        ({}, False, 400, "invalid_request_error", "invalid_value", "prompt"),
        # protocol.py validate_stream_options (model validator): location is the body itself
        (
            {"messages": HI, "stream_options": {"include_usage": True}},
            True,
            400,
            "invalid_request_error",
            "invalid_value",
            "body",
        ),
        # utils.py ExceptionHandler.handle_exception: anything else, 500 internal_error, code null
        (b"[1]", True, 500, "internal_error", None, None),
        (b"{not json", True, 500, "internal_error", None, None),
        ({"prompt": [1, "a"]}, False, 500, "internal_error", None, None),
        # serving_chat.py create_chat_completion: the handler's ErrorResponse, which api_server.py sends as 500
        ({"messages": []}, True, 500, "invalid_request_error", None, None),
        ({"messages": HI, "max_tokens": 0}, True, 500, "invalid_request_error", None, "max_tokens"),
        ({"messages": HI, "max_completion_tokens": 8192}, True, 500, "invalid_request_error", None, "max_tokens"),
        ({"messages": HI, "n": 2}, True, 500, "invalid_request_error", None, "n"),
        # serving_completion.py create_completion: its ParameterError branch has its own type and code "400"
        ({"prompt": "hi", "max_tokens": -1}, False, 500, "invalid_request", "400", "max_tokens"),
    ],
)
def test_error_status_and_body(
    body: object, chat: bool, status: int, type_: str, code: str | None, param: str | None
) -> None:
    """fastdeploy/utils.py ExceptionHandler, api_server.py (ErrorResponse -> 500), serving_chat.py /
    serving_completion.py create_*: which request gets which status, type, string code and param."""
    err = rejected(body, chat)
    assert err.status == status
    assert list(err.body) == ["error"] and list(err.body["error"]) == ["message", "type", "param", "code"]
    e = err.body["error"]
    assert (e["type"], e["code"], e["param"]) == (type_, code, param)
    assert isinstance(e["message"], str) and e["message"]


def test_error_bodies_match_upstream_fixtures() -> None:
    """utils.py handle_request_validation_exception (400) and handle_exception (500), byte for byte."""
    assert dumps(rejected({}).body).decode() == upstream("fastdeploy-error-400.json").strip()
    assert dumps(rejected(b"[1]").body).decode() == upstream("fastdeploy-error-500.json").strip()
    assert (
        rejected({"messages": HI, "max_tokens": 0}).body["error"]["message"] == "max_tokens can be defined [1, 8192)."
    )


def test_undecodable_body_is_fastapis_400() -> None:
    """FastAPI (used by api_server.py) answers a body it cannot decode with HTTPException(400) -> {"detail": ...}."""
    err = rejected(b"\xff")
    assert (err.status, err.body) == (400, {"detail": "There was an error parsing the body"})


def test_request_ids_follow_upstream() -> None:
    """serving_chat.py / serving_completion.py: request_id (prefixed when needed), else <prefix>-<user>-<uuid>."""
    ok = parse_request(json.dumps({"messages": HI, "request_id": "abc"}).encode(), chat=True, default_max_tokens=4)
    assert ok.request_id == "chatcmpl-abc"
    ok = parse_request(json.dumps({"prompt": "x", "user": "u7"}).encode(), chat=False, default_max_tokens=4)
    assert re.fullmatch(r"cmpl-u7-[0-9a-f-]{36}", ok.request_id)


# -- streaming: serving_chat.py / serving_completion.py ----------------------------------------------------
def sse_events(raw: str) -> list[str]:
    """The `data:` payloads of an SSE text, in order (comment lines dropped)."""
    body = "\n".join(line for line in raw.split("\n") if not line.startswith(":"))
    return [e.removeprefix("data: ") for e in body.split("\n\n") if e.strip()]


def shape(obj: Any) -> Any:
    """Keys in order and value kinds, values blanked: two chunks of the same shape compare equal."""
    if isinstance(obj, dict):
        return [(k, shape(v)) for k, v in obj.items()]
    if isinstance(obj, list):
        return [shape(v) for v in obj]
    if obj is None or isinstance(obj, bool):
        return obj
    return type(obj).__name__


def sim_stream(body: dict, chat: bool, tokens: int) -> str:
    parsed = parse_request(json.dumps(body).encode(), chat=chat, default_max_tokens=tokens)
    fmt = Formatter(parsed, "baidu/ERNIE-4.5-0.3B-Paddle", salt=0)
    raw = fmt.first_event()
    for i in range(tokens):
        raw += fmt.token_events(i, i + 1, 0.04 * (i + 1), finished=i == tokens - 1)
    return (raw + fmt.final_events(tokens)).decode()


def test_chat_stream_has_the_upstream_shape() -> None:
    """serving_chat.py chat_completion_stream_generator (chunks from protocol.py, dumped with exclude_unset):
    role chunk with content and reasoning_content and a space before the blank line, one chunk per token with
    finish_reason on the last one (no separate empty chunk), the usage chunk with token details, [DONE]."""
    fixture = upstream("fastdeploy-chat-stream.txt")
    body = {
        "messages": [{"role": "user", "content": "Hi"}],
        "max_tokens": 3,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    ours = sim_stream(body, chat=True, tokens=3)
    theirs_events, our_events = sse_events(fixture), sse_events(ours)
    assert len(our_events) == len(theirs_events) == 6 and our_events[-1] == theirs_events[-1] == "[DONE]"
    for mine, upstream_event in zip(our_events[:-1], theirs_events[:-1], strict=True):
        assert shape(json.loads(mine)) == shape(json.loads(upstream_event))
    assert ours.split("\n\n")[0].endswith("} ") and "\n} \n" not in ours
    first = json.loads(our_events[0])["choices"][0]["delta"]
    assert (first["role"], first["content"], first["reasoning_content"]) == ("assistant", "", "")
    last = json.loads(our_events[3])["choices"][0]
    assert last["finish_reason"] == "length" and last["delta"]["content"]
    usage = json.loads(our_events[4])["usage"]
    assert usage["completion_tokens"] == 3 and usage["prompt_tokens_details"] == {"cached_tokens": 0}
    assert usage["completion_tokens_details"] == {"reasoning_tokens": 0, "image_tokens": 0}


def test_completion_stream_has_the_upstream_shape() -> None:
    """serving_completion.py completion_stream_generator: no role chunk, chunks without `object`, finish_reason
    on the last token's chunk, the usage chunk, [DONE]."""
    body = {"prompt": "Once upon", "max_tokens": 2, "stream": True, "stream_options": {"include_usage": True}}
    ours, theirs = (
        sse_events(sim_stream(body, chat=False, tokens=2)),
        sse_events(upstream("fastdeploy-completion-stream.txt")),
    )
    assert len(ours) == len(theirs) == 4
    for mine, upstream_event in zip(ours[:-1], theirs[:-1], strict=True):
        assert shape(json.loads(mine)) == shape(json.loads(upstream_event))
    assert "object" not in json.loads(ours[0])


def test_uncapped_answer_ends_with_stop_on_the_eos_chunk() -> None:
    """serving_chat.py: finish_reason "stop" when the tokens did not reach max_tokens; the text processor's
    process_response_dict_streaming drops the EOS from the text (content "") but it still counts in usage."""
    body = {"messages": HI, "stream": True, "stream_options": {}}  # {} asks for usage: include_usage defaults true
    events = sse_events(sim_stream(body, chat=True, tokens=4))
    chunks = [json.loads(e) for e in events[:-1]]
    token_chunks = chunks[1:-1]
    assert len(token_chunks) == 4
    assert [c["choices"][0].get("finish_reason") for c in token_chunks] == [None, None, None, "stop"]
    assert token_chunks[-1]["choices"][0]["delta"]["content"] == ""
    assert chunks[-1]["usage"]["completion_tokens"] == 4
    no_usage = sse_events(sim_stream({"messages": HI, "stream": True}, chat=True, tokens=2))
    assert all("usage" not in json.loads(e) for e in no_usage[:-1])


def test_full_bodies_carry_every_field() -> None:
    """serving_chat.py chat_completion_full_generator / serving_completion.py request_output_to_completion_response,
    sent with model_dump(): every ChatMessage / CompletionResponseChoice field, full token details."""
    chat = parse_request(json.dumps({"messages": HI, "max_tokens": 2}).encode(), chat=True, default_max_tokens=4)
    body = Formatter(chat, "m", salt=0).full_body(2)
    assert (
        list(body) == ["id", "object", "created", "model", "choices", "usage"] and body["object"] == "chat.completion"
    )
    message = body["choices"][0]["message"]
    assert list(message) == [
        "role",
        "content",
        "multimodal_content",
        "reasoning_content",
        "tool_calls",
        "prompt_token_ids",
        "completion_token_ids",
        "prompt_tokens",
        "completion_tokens",
    ]
    assert body["choices"][0]["finish_reason"] == "length" and len(message["content"].split()) == 2
    assert body["usage"]["prompt_tokens_details"] == {"cached_tokens": 0, "image_tokens": 0, "video_tokens": 0}
    text = parse_request(b'{"prompt": "x"}', chat=False, default_max_tokens=3)
    tbody = Formatter(text, "m", salt=0).full_body(3)
    assert tbody["choices"][0]["finish_reason"] == "stop" and len(tbody["choices"][0]["text"].split()) == 2
    assert tbody["usage"]["prompt_tokens_details"] == {"cached_tokens": 0, "image_tokens": None, "video_tokens": None}


def test_models_body_matches_upstream() -> None:
    """serving_models.py list_models with protocol.py ModelInfo (owned_by "FastDeploy") and one ModelPermission."""
    ours, theirs = models_body("baidu/ERNIE-4.5-0.3B-Paddle"), json.loads(upstream("fastdeploy-models.json"))
    assert shape(ours) == shape(theirs)
    card = ours["data"][0]
    assert card["owned_by"] == "FastDeploy" and card["root"] == card["id"]
    assert re.fullmatch(r"modelperm-[0-9a-f]{32}", card["permission"][0]["id"])


def test_no_weights_fault_is_accepted() -> None:
    """The knob for api_server.py health()'s 304 ("No model weight enabled", engine_client is_workers_alive)."""
    assert validate_fault({"no_weights": True}) == {"no_weights": True}
    with pytest.raises(Exception, match="no_weights"):
        validate_fault({"no_weights": "yes"})


# -- the fixtures themselves ------------------------------------------------------------------------------
def test_every_upstream_fixture_names_its_source() -> None:
    """tests/fixtures/upstream/README.md: .prom files start with `# source:` lines, .txt with `: source:` SSE
    comments, each .json has a sibling .source; every source names a path and a commit (or index id)."""
    files = sorted(p for p in UPSTREAM.iterdir() if p.name != "README.md")
    assert len(files) >= 12
    commit = re.compile(r"(@ [0-9a-f]{40}|index id \d+)")
    for path in files:
        text = path.read_text()
        if path.suffix == ".prom":
            assert text.startswith("# source: ") and commit.search(text.split("\n# HELP")[0]), path.name
        elif path.suffix == ".txt":
            assert text.startswith(": source: ") and commit.search(text), path.name
        elif path.suffix == ".json":
            json.loads(text)
            source = path.with_suffix(".source")
            assert source.exists() and commit.search(source.read_text()), path.name
        else:
            assert path.suffix == ".source" and path.with_suffix(".json").exists(), path.name


@pytest.mark.parametrize(
    ("fixture", "needed"),
    [
        ("fastdeploy-metrics.prom", {"fastdeploy:num_requests_running", "fastdeploy:num_requests_enqueued"}),
        ("fastdeploy-metrics-legacy.prom", {"fastdeploy:num_requests_waiting", "fastdeploy:max_batch_size"}),
        ("vllm-metrics.prom", {"vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:kv_cache_usage_perc"}),
        ("sglang-metrics.prom", {"sglang:num_running_reqs", "sglang:num_queue_reqs", "sglang:token_usage"}),
    ],
)
def test_prom_fixtures_parse_completely(fixture: str, needed: set[str]) -> None:
    """Each page parses to the end with prometheus-client's parser and has the load series fdngx reads."""
    assert needed <= set(families(upstream(fixture)))


def test_register_body_has_the_fields_config_py_sends() -> None:
    """fastdeploy/config.py FDConfig.init_cache_info register_info + engine/register_manager.py
    _register_to_router (is_paused, version, connected_decodes): no metrics_port, no tp_size."""
    body = json.loads(upstream("fastdeploy-register-body.json"))
    assert list(body) == [
        "role",
        "host_ip",
        "port",
        "connector_port",
        "rdma_ports",
        "engine_worker_queue_port",
        "device_ids",
        "transfer_protocol",
        "is_paused",
        "version",
        "connected_decodes",
    ]
    assert body["role"] == "mixed" and isinstance(body["port"], int) and "metrics_port" not in body


def test_sglang_server_info_has_capacity_fields() -> None:
    """sglang http_server.py get_server_info: ServerArgs fields (max_running_requests) + scheduler_info."""
    info = json.loads(upstream("sglang-server-info.json"))
    assert isinstance(info["max_running_requests"], int) and isinstance(info["max_total_num_tokens"], int)
    assert isinstance(info["internal_states"], list)


@pytest.mark.parametrize(
    ("fixture", "engine", "expected"),
    [
        ("fastdeploy-metrics.prom", "fastdeploy", {"running": 8, "queued": 11, "capacity": 8, "queued_reliable": True}),
        (
            "fastdeploy-metrics-legacy.prom",
            "fastdeploy",
            {"running": 8, "queued": 0, "capacity": 8, "queued_reliable": False},
        ),
        ("vllm-metrics.prom", "vllm", {"running": 5, "queued": 2, "kv_usage": 0.42}),
        ("sglang-metrics.prom", "sglang", {"running": 11, "queued": 4, "kv_usage": 0.43}),
    ],
)
def test_fdngx_scraper_reads_the_upstream_pages(fixture: str, engine: str, expected: dict[str, Any]) -> None:
    """fdngx's own scraper on the reconstructed pages: the load it reads is the one the page states."""
    from fdngx.engines import spec
    from fdngx.weights.scrape import load_from_metrics, parse_metrics

    load = load_from_metrics(parse_metrics(upstream(fixture)), spec(engine))
    for key, want in expected.items():
        assert getattr(load, key) == (want if isinstance(want, bool) else pytest.approx(want)), key
    assert load.tpot_count and load.tpot_count > 0
