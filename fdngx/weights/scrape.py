"""Concurrent scrape of every instance's `/metrics` and `/health` into one LoadSample per instance.

Never raises for one instance: a refused connection, garbage, NaN, a missing series, a huge page or a
server that drips bytes all become a sample with `error` set, and no instance can hold the others past
the total deadline. The policy then decides what a bad sample means (stale, down, ...).

Capacity (slots) comes from where the engine states it: FastDeploy's `fastdeploy:max_batch_size` gauge,
SGLang's GET /server_info (or /get_server_info on older builds; an optional extra GET once a minute, bounded
like the others; its failure is no error),
and vLLM nowhere (its metrics carry no scheduler setting). When the inventory's max_num_seqs is a guess
(`capacity_guessed: true`, written by `fdngx launch`) and the engine states nothing, the highest running
count seen is a floor under it: a replica that ran 600 requests at once has at least 600 slots.
"""

from __future__ import annotations

import functools
import math
import re
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import replace
from typing import Any

from fdngx.domain import Instance, Load, LoadSample
from fdngx.engines import REGISTRY, EngineSpec, spec
from fdngx.weights.batch import BatchClient, Job
from fdngx.weights.fetch import Client, Fetch, run_all
from fdngx.weights.memory import (
    MAX_REQUESTS,
    PeakRunning,
    clamp,
    estimate_queue,
    learn_capacity,
    peaks_for,
)
from fdngx.weights.promtext import Copies, Gathered, before_eof, fast_values

CONNECT_TIMEOUT = 0.5
READ_TIMEOUT = 1.0
DEADLINE = 1.5
MAX_BYTES = 2 * 1024 * 1024  # a FastDeploy page is ~20 KB; vLLM with many labels a few hundred KB
_HEALTH_BYTES = 64 * 1024
# SGLang's /server_info: every server argument plus one small entry per DP rank (a few KB to ~100 KB).
_INFO_BYTES = 1024 * 1024
# Sane ranges: a value outside is clamped before the policy sees it (a buggy build can report anything).
# A scraped capacity (slots) is trusted within this factor of the inventory's max_num_seqs: enough to
# correct a guess (vLLM's 256 vs 1024), not enough for one replica to claim the fleet's traffic.
MAX_COUNTER = 1e15  # histogram counters (seconds, observations): far beyond any engine's uptime
# What a page that fails the fast path (fdngx.weights.promtext) may hand prometheus_client's parser, which is
# quadratic in a line's escaped characters: one 1 MB label value of backslash-quotes costs it ~25 s of CPU.
# A kept line is ~100 bytes (a FastDeploy gauge) to a few hundred (vLLM's labels); within these bounds the
# worst page parses in tens of milliseconds.
MAX_PARSED_LINE = 4096
MAX_PARSED_BYTES = 64 * 1024


def make_client() -> Client:
    """The default client: every GET of a cycle on one thread (fdngx.weights.batch), keep-alive connections
    kept between cycles. Keep one for the life of a loop and close it."""
    return BatchClient()


def wanted_names(engine: EngineSpec) -> frozenset[str]:
    m = engine.metrics
    tpot = [f"{n}{suffix}" for n in m.tpot for suffix in ("_sum", "_count")]
    queue_time = [f"{n}_sum" for n in m.queue_time]
    return frozenset((*m.running, *m.queued, *m.kv_usage, *m.capacity, *m.scheduler_queue, *tpot, *queue_time,
                      *m.received, *m.finished))


@functools.lru_cache(maxsize=16)
def _line_filter(names: frozenset[str]) -> re.Pattern[str]:
    alternatives = "|".join(re.escape(n) for n in sorted(names, key=len, reverse=True))
    return re.compile(rf"^(?:#[ \t]+(?:TYPE|HELP)[ \t]+)?(?:{alternatives})(?:[{{ \t].*)?$", re.M)


def relevant_lines(text: str, names: frozenset[str]) -> str:
    """Only the lines (samples and their # TYPE/# HELP) of the series we use.

    A FastDeploy page is ~300 lines, mostly histogram buckets; the pure-Python parser costs ~2.5 ms on it,
    which made the sidecar's CPU budget impossible at 1 s x 16 replicas. One regex pass (in C) keeps the
    few lines we need; they are still parsed, and rejected if broken. Garbage elsewhere on the page does
    not concern the load signal.
    """
    return "\n".join(m.group(0) for m in _line_filter(names).finditer(text)) + "\n"


def _parser_bounds(text: str) -> None:
    """Refuse, before prometheus_client's parser sees them, lines it would spend seconds on."""
    if len(text) > MAX_PARSED_BYTES:
        raise ValueError(f"{len(text)} bytes of lines for the series fdngx reads (at most {MAX_PARSED_BYTES} "
                         "outside the plain format)")
    longest = max(map(len, text.split("\n")))
    if longest > MAX_PARSED_LINE:
        raise ValueError(f"a line of {longest} bytes for a series fdngx reads (at most {MAX_PARSED_LINE})")


def copies_rule(engine: EngineSpec, name: str) -> frozenset[str]:
    """The labels in which copies of one count of `name` differ for `engine` (MetricNames.one_per, plus
    backlog_one_per for its backlog series); empty: every label set is its own count."""
    m = engine.metrics
    backlog = {*m.queued, *m.scheduler_queue, *(f"{n}_sum" for n in m.queue_time)}
    gauges = {*m.running, *m.queued, *m.scheduler_queue}
    return (frozenset(m.one_per) | (frozenset(m.backlog_one_per) if name in backlog else frozenset())
            | (frozenset(m.gauge_one_per) if name in gauges else frozenset()))


@functools.cache
def _copies() -> Copies:
    """Sample name -> the labels its copies differ in (copies_rule), for every name that has copies.
    By sample name, not by engine: the names are the engines' own (`sglang:...`), and a page parsed whole
    (`names` None) reads as the same page parsed for one engine."""
    return {n: rule for e in REGISTRY.values() for n in wanted_names(e) if (rule := copies_rule(e, n))}


def parse_metrics(text: str, names: frozenset[str] | None = None) -> dict[str, list[float]]:
    """Sample name -> values (one per label set, copies of one count as one: MetricNames.one_per), only for
    `names` when given. Raises ValueError on anything unparsable, and on lines too long or too many for the
    parser (MAX_PARSED_LINE, MAX_PARSED_BYTES), and on a label set repeated; reads up to `# EOF` (promtext)."""
    if names is not None:
        fast = fast_values(text, names, _copies())  # the usual page, read as the parser would read it
        if fast is not None:
            return fast
    text = before_eof(text)
    if names is not None:
        text = relevant_lines(text, names)
    _parser_bounds(text)
    values = Gathered(_copies())
    # Here, not at the top: the usual page takes the fast path, and a render or status that scrapes nothing
    # does not pay the parser's import (40 ms of every start).
    from prometheus_client.parser import text_string_to_metric_families

    # The parser is a generator that raises part way through bad input; consume it all here.
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            values.add(sample.name, float(sample.value), dict.items, sample.labels)
    return values.values


def _pick(values: Mapping[str, list[float]], names: Iterable[str]) -> list[float] | None:
    for name in names:
        if name in values:
            return values[name]
    return None


def _finite(name: str, vals: list[float]) -> list[float]:
    for v in vals:
        if not math.isfinite(v):
            raise ValueError(f"non-finite value {v} for {name}")
        if v < 0:
            raise ValueError(f"negative value {v} for {name}")
    return vals


def load_from_metrics(values: Mapping[str, list[float]], engine: EngineSpec) -> Load:
    """Map parsed samples to load signals, clamped to sane ranges. Raises ValueError naming what is
    missing or wrong (a non-finite or negative value)."""
    names = engine.metrics
    running = _pick(values, names.running)
    if running is None:
        raise ValueError(f"missing series {names.running[0]}")
    # Counts add up over label sets (vLLM labels per engine); queued names add up too (FastDeploy: waiting, and
    # the scheduler's queue under the first of its names present).
    run_total = clamp(sum(_finite(names.running[0], running)), 0.0, MAX_REQUESTS)
    queued_total = 0.0
    seen_queued = False
    for qname in names.queued:
        if qname in values:
            seen_queued = True
            queued_total += sum(_finite(qname, values[qname]))
    if not seen_queued:
        raise ValueError(f"missing series {names.queued[0]}")
    scheduler = next((q for q in names.scheduler_queue if q in values), None)
    if scheduler is not None:
        queued_total += sum(_finite(scheduler, values[scheduler]))
    queued_total = clamp(queued_total, 0.0, MAX_REQUESTS)
    reliable = not names.scheduler_queue or scheduler is not None
    kv = _pick(values, names.kv_usage)
    kv_usage: float | None = None
    if kv:
        kv_usage = max(_finite(names.kv_usage[0], kv))
        if kv_usage > 1.5:  # some builds report percent, not a fraction
            kv_usage /= 100.0
        kv_usage = min(kv_usage, 1.0)
    cap = _pick(values, names.capacity) if names.capacity else None
    capacity: float | None = None
    if cap:
        total = sum(_finite(names.capacity[0], cap))
        capacity = clamp(total, 1.0, MAX_REQUESTS) if total >= 1 else None  # 0 slots means "not reported"
    tpot_sum = tpot_count = None
    for hname in names.tpot:  # optional: without it the policy simply has no speed signal
        if f"{hname}_sum" in values and f"{hname}_count" in values:
            tpot_sum = clamp(sum(_finite(f"{hname}_sum", values[f"{hname}_sum"])), 0.0, MAX_COUNTER)
            tpot_count = clamp(sum(_finite(f"{hname}_count", values[f"{hname}_count"])), 0.0, MAX_COUNTER)
            break
    queue_time_sum = None
    for hname in names.queue_time:
        if f"{hname}_sum" in values:
            queue_time_sum = clamp(sum(_finite(f"{hname}_sum", values[f"{hname}_sum"])), 0.0, MAX_COUNTER)
            break
    received, finished = _pick(values, names.received), _pick(values, names.finished)
    unfinished = None
    if received and finished:  # optional, both or nothing: requests taken and not finished yet
        r_total = clamp(sum(_finite(names.received[0], received)), 0.0, MAX_COUNTER)
        f_total = clamp(sum(_finite(names.finished[0], finished)), 0.0, MAX_COUNTER)
        unfinished = clamp(r_total - f_total, 0.0, MAX_REQUESTS)
    return Load(run_total, queued_total, kv_usage, capacity, reliable, tpot_sum, tpot_count, queue_time_sum,
                unfinished)


def printable(text: str) -> str:
    """`text` with every control character escaped (`\\x1b`). Error texts quote what a replica sent (the
    parser quotes the page, http.client the status line): no terminal escape from a replica may reach
    `fdngx status`, the logs or telemetry."""
    return text if text.isprintable() else "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


NO_LOAD_SIGNAL = "no load signal (registered without a metrics port; see --registry-metrics-port)"


def no_load_signal(inst: Instance) -> bool:
    """The registry found no metrics port for this instance: its health is checked, its load is not read."""
    return inst.extra.get("metrics_source") == "none"


def _metrics_url(inst: Instance, engine: EngineSpec) -> str:
    return f"{inst.base_url}/metrics" if engine.metrics_on_api_port else inst.metrics_url


def _build(
    inst: Instance,
    engine: EngineSpec,
    metrics: Fetch | None,
    health: Fetch | None,
    at: float,
    info: Fetch | None = None,
    peaks: PeakRunning | None = None,
) -> LoadSample:
    healthy = health is not None and health.status == 200 and health.error is None
    if health is None:
        health_error: str | None = "no answer before the scrape deadline"
    elif health.error:
        health_error = printable(health.error)
    elif health.status != 200:
        health_error = str(health.status)
    else:
        health_error = None
    refused = health is not None and health.error == "connection refused"
    peaks = peaks or PeakRunning()
    if refused:
        peaks.forget(inst)
    if metrics is None:
        return LoadSample(
            inst.name,
            False,
            healthy,
            scraped_at=at,
            error=NO_LOAD_SIGNAL if no_load_signal(inst) else "no answer before the scrape deadline",
            health_error=health_error,
            refused=refused,
        )
    error = printable(metrics.error) if metrics.error is not None else None
    if error is None and metrics.status != 200:
        error = f"HTTP {metrics.status}"
    load: Load | None = None
    if error is None:
        try:
            text = metrics.body.decode("utf-8", "replace")
            values = metrics.values if metrics.values is not None else parse_metrics(text, wanted_names(engine))
            load = learn_capacity(load_from_metrics(values, engine), inst, info, peaks,
                                  info_page=bool(engine.capacity_info_paths))
            load = estimate_queue(load, inst, peaks, at)
        except Exception as exc:  # the parser raises ValueError and friends, never let one escape
            error = _bad_metrics(exc)
    if load is None:
        return LoadSample(
            inst.name, False, healthy, scraped_at=at, latency=metrics.latency, error=error, health_error=health_error,
            refused=refused,
        )
    return LoadSample.of(inst.name, healthy, load, scraped_at=at, latency=metrics.latency, health_error=health_error,
                         refused=refused)


def _fetch_parsed(client: Client, url: str, names: frozenset[str], **kwargs: Any) -> Fetch:
    return _with_values(client.get(url, **kwargs), names)


def _bad_metrics(exc: Exception) -> str:
    return printable(f"bad metrics: {exc}")[:200]


def _with_values(got: Fetch, names: frozenset[str]) -> Fetch:
    """A metrics page parsed where it was fetched (a pool worker, or the batch loop as it arrives), so parsing
    1,000 pages overlaps the fetches still waiting on the network. One that does not parse is parsed once:
    the reason is its error, which _build reports."""
    if got.error is None and got.status == 200:
        try:
            return replace(got, values=parse_metrics(got.body.decode("utf-8", "replace"), names))
        except Exception as exc:  # the parser raises ValueError and friends, never let one escape
            return replace(got, error=_bad_metrics(exc))
    return got


def scrape_all(
    instances: Iterable[Instance],
    *,
    session: Client | None = None,
    timeout: float = READ_TIMEOUT,
    connect_timeout: float = CONNECT_TIMEOUT,
    deadline: float = DEADLINE,
    max_bytes: int = MAX_BYTES,
    now: Callable[[], float] = time.time,
    peaks: PeakRunning | None = None,
) -> dict[str, LoadSample]:
    """Scrape metrics and health of every instance at once; returns a sample per instance name.

    The whole call returns within about `deadline` seconds whatever the replicas do. `session`: a
    Client from make_client() (reused across cycles), or None for a one-off client. `peaks`: the memory of
    running peaks (default: one per session).
    """
    insts = list(instances)
    if not insts:
        return {}
    client, own = (BatchClient(), True) if session is None else (session, False)
    one_off = own and peaks is None  # status, cron: no next cycle
    if peaks is None:
        peaks = PeakRunning() if own else peaks_for(client)
        peaks.keep_only(insts)  # a session's every scrape is of its whole inventory (sidecar, status --watch)
    started = time.monotonic()
    end = started + deadline
    common = {"connect_timeout": connect_timeout, "read_timeout": timeout, "deadline": end}
    jobs: list[tuple[tuple[int, str], Callable[..., Fetch], dict[str, Any]]] = []
    try:
        for n, inst in enumerate(insts):
            engine = spec(inst.engine)
            if not no_load_signal(inst):
                url = _metrics_url(inst, engine)
                jobs.append(((n, "m"), _fetch_parsed, {"client": client, "url": url, "names": wanted_names(engine),
                                                        "max_bytes": max_bytes, **common}))
            health = inst.base_url + engine.health_path
            jobs.append(((n, "h"), client.get, {"url": health, "max_bytes": _HEALTH_BYTES, "status_only": True,
                                                 **common}))
            # A one-off scrape has no next cycle to move on to after a 404: it asks the path every version serves.
            paths = engine.capacity_info_paths[-1:] if one_off else engine.capacity_info_paths
            path = peaks.info_path(inst, paths, started) if paths else None
            if path is not None:
                jobs.append(((n, "i"), client.get, {"url": inst.base_url + path, "max_bytes": _INFO_BYTES, **common}))
        if isinstance(client, BatchClient):
            # Fleet scale: every GET on one thread (fdngx.weights.batch), the same results and bounds.
            batch = [Job(key, kw["url"], kw["max_bytes"], kw.get("status_only", False),
                         functools.partial(_with_values, names=kw["names"]) if "names" in kw else None)
                     for key, _fn, kw in jobs]
            results: dict[tuple[int, str], Fetch] = client.get_many(  # type: ignore[assignment]
                batch, connect_timeout=connect_timeout, read_timeout=timeout, deadline=end)
        else:
            # Jobs still queued behind stuck workers at the deadline are dropped.
            results = run_all(client.executor(), jobs, end)  # type: ignore[assignment]
    finally:
        if own:
            client.close()
    at = now()
    return {
        inst.name: _build(inst, spec(inst.engine), results.get((n, "m")), results.get((n, "h")), at,
                          results.get((n, "i")), peaks)
        for n, inst in enumerate(insts)
    }
