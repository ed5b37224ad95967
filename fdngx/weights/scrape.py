"""Concurrent scrape of every instance's `/metrics` and `/health` into one LoadSample per instance.

Never raises for one instance: a refused connection, garbage, NaN, a missing series, a huge page or a
server that drips bytes all become a sample with `error` set, and no instance can hold the others past
the total deadline. The policy then decides what a bad sample means (stale, down, ...).

Capacity (slots) comes from where the engine states it: FastDeploy's `fastdeploy:max_batch_size` gauge,
SGLang's GET /get_server_info (an optional extra GET, bounded like the others; its failure is no error),
and vLLM nowhere (its metrics carry no scheduler setting). When the inventory's max_num_seqs is a guess
(`capacity_guessed: true`, written by `fdngx launch`) and the engine states nothing, the highest running
count seen is a floor under it: a replica that ran 600 requests at once has at least 600 slots.
"""

from __future__ import annotations

import functools
import json
import math
import re
import threading
import time
import weakref
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import ALL_COMPLETED, Future, wait
from dataclasses import replace

from prometheus_client.parser import text_string_to_metric_families

from fdngx.domain import Instance, Load, LoadSample
from fdngx.engines import EngineSpec, spec
from fdngx.weights.fetch import Client, Fetch, HttpClient

CONNECT_TIMEOUT = 0.5
READ_TIMEOUT = 1.0
DEADLINE = 1.5
MAX_BYTES = 2 * 1024 * 1024  # a FastDeploy page is ~20 KB; vLLM with many labels a few hundred KB
_HEALTH_BYTES = 64 * 1024
# SGLang's /get_server_info: every server argument plus one small entry per DP rank (a few KB to ~100 KB).
_INFO_BYTES = 1024 * 1024
# Sane ranges: a value outside is clamped before the policy sees it (a buggy build can report anything).
MAX_REQUESTS = 1_000_000.0  # running or queued on one replica
# A scraped capacity (slots) is trusted within this factor of the inventory's max_num_seqs: enough to
# correct a guess (vLLM's 256 vs 1024), not enough for one replica to claim the fleet's traffic.
CAPACITY_TRUST = 8.0  # below the inventory (a replica claiming fewer slots only lowers its own weight)
# Above it, a stated capacity is trusted this far: a replica that lies about max_batch_size cannot take the
# fleet's traffic. A guessed inventory capacity (`capacity_guessed`: vLLM's 256 vs 1024) gets CAPACITY_TRUST.
CAPACITY_ABOVE = 2.0
MAX_COUNTER = 1e15  # histogram counters (seconds, observations): far beyond any engine's uptime


def make_client() -> Client:
    """The default client (http.client keep-alive pool). Keep one for the life of a loop and close it."""
    return HttpClient()


def wanted_names(engine: EngineSpec) -> frozenset[str]:
    m = engine.metrics
    marker = (m.queued_marker,) if m.queued_marker else ()
    tpot = [f"{n}{suffix}" for n in m.tpot for suffix in ("_sum", "_count")]
    return frozenset((*m.running, *m.queued, *m.kv_usage, *m.capacity, *marker, *tpot))


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


def parse_metrics(text: str, names: frozenset[str] | None = None) -> dict[str, list[float]]:
    """Sample name -> values (one per label set), only for `names` when given. Raises ValueError on
    anything unparsable."""
    if names is not None:
        text = relevant_lines(text, names)
    values: dict[str, list[float]] = {}
    # The parser is a generator that raises part way through bad input; consume it all here.
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            values.setdefault(sample.name, []).append(float(sample.value))
    return values


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


def _clamp(v: float, lo: float, hi: float) -> float:
    return min(hi, max(lo, v))


def load_from_metrics(values: Mapping[str, list[float]], engine: EngineSpec) -> Load:
    """Map parsed samples to load signals, clamped to sane ranges. Raises ValueError naming what is
    missing or wrong (a non-finite or negative value)."""
    names = engine.metrics
    running = _pick(values, names.running)
    if running is None:
        raise ValueError(f"missing series {names.running[0]}")
    # Counts add up over label sets (vLLM labels per engine); queued names add up too (waiting + queuing).
    run_total = _clamp(sum(_finite(names.running[0], running)), 0.0, MAX_REQUESTS)
    queued_total = 0.0
    seen_queued = False
    for qname in names.queued:
        if qname in values:
            seen_queued = True
            queued_total += sum(_finite(qname, values[qname]))
    if not seen_queued:
        raise ValueError(f"missing series {names.queued[0]}")
    queued_total = _clamp(queued_total, 0.0, MAX_REQUESTS)
    reliable = names.queued_marker is None or names.queued_marker in values
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
        capacity = _clamp(total, 1.0, MAX_REQUESTS) if total >= 1 else None  # 0 slots means "not reported"
    tpot_sum = tpot_count = None
    for hname in names.tpot:  # optional: without it the policy simply has no speed signal
        if f"{hname}_sum" in values and f"{hname}_count" in values:
            tpot_sum = _clamp(sum(_finite(f"{hname}_sum", values[f"{hname}_sum"])), 0.0, MAX_COUNTER)
            tpot_count = _clamp(sum(_finite(f"{hname}_count", values[f"{hname}_count"])), 0.0, MAX_COUNTER)
            break
    return Load(run_total, queued_total, kv_usage, capacity, reliable, tpot_sum, tpot_count)


def capacity_from_server_info(body: bytes) -> float | None:
    """Slots an SGLang server states in GET /get_server_info, or None (never raises).

    python/sglang/srt/entrypoints/http_server.py get_server_info() = server args + scheduler info +
    `internal_states` (one per DP rank). Newer schedulers put the effective per-rank limit in each state
    (`effective_max_running_requests_per_dp`, managers/scheduler.py get_internal_state): their sum is the
    server's. Else `max_running_requests`, the server argument (null unless the user set it).
    """
    try:
        doc = json.loads(body)
    except (ValueError, RecursionError):
        return None
    if not isinstance(doc, dict):
        return None
    states = doc.get("internal_states")
    if isinstance(states, list) and states and all(isinstance(st, dict) for st in states):
        per_rank = [st.get("effective_max_running_requests_per_dp") for st in states]
        if all(_slots(v) for v in per_rank):
            return _clamp(float(sum(per_rank)), 1.0, MAX_REQUESTS)
    total = doc.get("max_running_requests")
    return _clamp(float(total), 1.0, MAX_REQUESTS) if _slots(total) else None


def _slots(v: object) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v) and v >= 1


class PeakRunning:
    """The highest running count seen per replica: a floor under a guessed capacity. Bounded; a replica
    that refuses connections (restarted, maybe with other settings) starts over."""

    LIMIT = 4096

    def __init__(self) -> None:
        self._peak: dict[tuple[str, str, int], float] = {}
        self._lock = threading.Lock()

    def see(self, inst: Instance, running: float) -> float:
        key = (inst.name, inst.host, inst.port)
        with self._lock:
            if key not in self._peak and len(self._peak) >= self.LIMIT:
                self._peak.pop(next(iter(self._peak)))
            peak = max(self._peak.get(key, 0.0), running)
            self._peak[key] = peak
            return peak

    def forget(self, inst: Instance) -> None:
        with self._lock:
            self._peak.pop((inst.name, inst.host, inst.port), None)


# One memory per scrape session: the sidecar keeps its client for its whole life, so peaks accumulate there;
# a one-off client (cron, status) sees only what its own scrape saw.
_PEAKS: weakref.WeakKeyDictionary[Client, PeakRunning] = weakref.WeakKeyDictionary()
_PEAKS_LOCK = threading.Lock()


def _peaks_for(client: Client) -> PeakRunning:
    with _PEAKS_LOCK:
        peaks = _PEAKS.get(client)
        if peaks is None:
            peaks = _PEAKS[client] = PeakRunning()
        return peaks


def learn_capacity(load: Load, inst: Instance, info: Fetch | None, peaks: PeakRunning) -> Load:
    """The capacity the engine states (metrics first, then its info page), else for a guessed inventory
    capacity the peak of running requests when it is above the guess. Clamped by trusted_capacity."""
    if load.capacity is None and info is not None and info.error is None and info.status == 200:
        stated = capacity_from_server_info(info.body)
        if stated is not None:
            load = replace(load, capacity=stated)
    if load.capacity is None and inst.extra.get("capacity_guessed") is True:
        peak = peaks.see(inst, load.running)
        if peak > inst.max_num_seqs:
            load = replace(load, capacity=peak)
    return trusted_capacity(load, inst)


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
            load = learn_capacity(load_from_metrics(parse_metrics(text, wanted_names(engine)), engine), inst, info,
                                  peaks)
        except Exception as exc:  # the parser raises ValueError and friends, never let one escape
            error = printable(f"bad metrics: {exc}")[:200]
    if load is None:
        return LoadSample(
            inst.name, False, healthy, scraped_at=at, latency=metrics.latency, error=error, health_error=health_error,
            refused=refused,
        )
    return LoadSample.of(inst.name, healthy, load, scraped_at=at, latency=metrics.latency, health_error=health_error,
                         refused=refused)


def trusted_capacity(load: Load, inst: Instance) -> Load:
    """The scraped capacity, within what the inventory says: down to 1/CAPACITY_TRUST, up to CAPACITY_ABOVE
    times (CAPACITY_TRUST when the inventory's number is a guess)."""
    if load.capacity is None:
        return load
    above = CAPACITY_TRUST if inst.extra.get("capacity_guessed") is True else CAPACITY_ABOVE
    lo, hi = inst.max_num_seqs / CAPACITY_TRUST, inst.max_num_seqs * above
    return replace(load, capacity=_clamp(load.capacity, max(1.0, lo), hi))


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
    client, own = (HttpClient(), True) if session is None else (session, False)
    if peaks is None:
        peaks = PeakRunning() if own else _peaks_for(client)
    end = time.monotonic() + deadline
    common = {"connect_timeout": connect_timeout, "read_timeout": timeout, "deadline": end}
    jobs: dict[Future[Fetch], tuple[int, str]] = {}
    try:
        pool = client.executor()
        for n, inst in enumerate(insts):
            engine = spec(inst.engine)
            if not no_load_signal(inst):
                url = _metrics_url(inst, engine)
                jobs[pool.submit(client.get, url, max_bytes=max_bytes, **common)] = (n, "m")
            health = inst.base_url + engine.health_path
            jobs[pool.submit(client.get, health, max_bytes=_HEALTH_BYTES, status_only=True, **common)] = (n, "h")
            if engine.capacity_info_path is not None:
                info = inst.base_url + engine.capacity_info_path
                jobs[pool.submit(client.get, info, max_bytes=_INFO_BYTES, **common)] = (n, "i")
        wait(jobs, timeout=max(0.0, end - time.monotonic()) + 0.05, return_when=ALL_COMPLETED)
        results: dict[tuple[int, str], Fetch] = {}
        for fut, key in jobs.items():
            if fut.done() and not fut.cancelled():
                results[key] = fut.result()
            else:
                fut.cancel()  # still queued behind stuck workers: drop it
    finally:
        if own:
            client.close()
    at = now()
    return {
        inst.name: _build(inst, spec(inst.engine), results.get((n, "m")), results.get((n, "h")), at,
                          results.get((n, "i")), peaks)
        for n, inst in enumerate(insts)
    }
