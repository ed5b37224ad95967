"""Turning one replica's scrape into its policy state: health counts, believed load, decode speed. Pure.

A sample that cannot be believed (a value outside sane ranges, an arithmetic error) stays with its
replica: the state keeps its last good values and says why ("metrics invalid: ..."); the cycle goes on
for the others.
"""

from __future__ import annotations

import math
from dataclasses import fields, replace

from fdngx.domain import Instance, LoadSample
from fdngx.weights.settings import PolicyConfig
from fdngx.weights.state import InstanceState


def sample_load(s: LoadSample, cap: float, config: PolicyConfig) -> float:
    # On FastDeploy builds without num_requests_enqueued, `waiting` reads ~0 under backlog: running (against
    # slots, a full replica counted as queueing as many again) and KV usage there.
    load = s.requests(cap) / cap
    if s.kv_usage is not None and s.kv_usage > config.kv_threshold:
        load += config.kv_gain * (s.kv_usage - config.kv_threshold) / (1.0 - config.kv_threshold)
    return load


def describe(s: LoadSample | None, st: InstanceState, fleet: float | None) -> str:
    if st.load is None:
        return "no metrics yet"
    if s is None or not s.ok or (st.last_error or "").startswith(INVALID):
        return f"load {st.load:.2f}/slot (this scrape failed: {st.last_error})"
    kv = f", KV {s.kv_usage:.0%}" if s.kv_usage is not None else ""
    if s.queue_estimate is not None:
        queue = f"queue ~{s.queued:.0f} (from {s.queue_estimate.value})"
    else:
        queue = f"queue {s.queued:.0f}" if s.queued_reliable else "queue unknown (old FastDeploy)"
    vs = f" vs fleet {fleet:.2f}" if fleet is not None else ""
    tpot = f" (TPOT {st.tpot * 1000:.0f} ms)" if st.tpot is not None else ""  # a saved state may hold a speed alone
    speed = f"; decodes at {st.speed:.2f}x the fleet's speed{tpot}" if st.speed != 1 else ""
    return f"load {st.load:.2f}/slot{vs} (running {s.running:.0f}, {queue}{kv}){speed}"


def fold_health(st: InstanceState, s: LoadSample | None, now: float) -> None:
    if s is not None and s.healthy:
        st.oks, st.fails, st.health_error, st.failing_since, st.refused = st.oks + 1, 0, None, None, False
    else:
        if st.fails == 0:
            st.failing_since, st.refused = now, True
        st.refused = st.refused and s is not None and s.refused
        st.fails, st.oks = st.fails + 1, 0
        st.health_error = "not scraped" if s is None else (s.health_error or "not 200")


# Sane ranges of what a sample may say; anything outside makes that replica's sample "metrics invalid".
_MAX_REQUESTS = 1e6
_MAX_COUNTER = 1e15
INVALID = "metrics invalid"


def _invalid(s: LoadSample) -> str | None:
    """Why a usable-looking sample cannot be believed, or None. The scraper clamps; this guards the policy
    against any caller, whatever it passes."""
    checks = (
        ("running", s.running, 0.0, _MAX_REQUESTS), ("queued", s.queued, 0.0, _MAX_REQUESTS),
        ("kv_usage", s.kv_usage, 0.0, 1.5), ("capacity", s.capacity, 1.0, _MAX_REQUESTS),
        ("tpot_sum", s.tpot_sum, 0.0, _MAX_COUNTER), ("tpot_count", s.tpot_count, 0.0, _MAX_COUNTER),
    )
    for name, v, lo, hi in checks:
        if v is None and name in ("kv_usage", "capacity", "tpot_sum", "tpot_count"):
            continue
        if not isinstance(v, int | float) or not math.isfinite(v) or not lo <= v <= hi:
            return f"{INVALID}: {name} = {v!r} outside {lo:g}..{hi:g}"
    return None


def fold_metrics(st: InstanceState, s: LoadSample | None, inst: Instance, now: float, config: PolicyConfig) -> None:
    """Fold one sample into the replica's state. A sample that cannot be believed, or any error turning it
    into a load, stays with this replica: it keeps its last good state and says why."""
    if s is None or not s.ok:
        st.last_error = "not scraped" if s is None else s.error
        return
    why = _invalid(s)
    if why is not None:
        st.last_error = why
        return
    before = replace(st)
    try:
        _fold(st, s, inst, now, config)
    except (ArithmeticError, ValueError, TypeError) as exc:
        for f in fields(st):
            setattr(st, f.name, getattr(before, f.name))
        st.last_error = f"{INVALID}: {type(exc).__name__}"


def _fold(st: InstanceState, s: LoadSample, inst: Instance, now: float, config: PolicyConfig) -> None:
    if s.capacity:
        st.capacity = s.capacity
    cap = st.capacity or float(inst.max_num_seqs)
    u = sample_load(s, cap, config)
    st.load = u if st.load is None else config.alpha * u + (1 - config.alpha) * st.load
    restarted = st.tpot_count is not None and s.tpot_count is not None and s.tpot_count < st.tpot_count
    if st.last_ok_at is not None and (st.last_error is not None or restarted):
        st.resumed_at = now
    st.last_ok_at, st.last_error = now, None
    _tpot(st, s, config)


def _tpot(st: InstanceState, s: LoadSample, config: PolicyConfig) -> None:
    """Mean time per output token since the last update, once enough tokens (or requests) were observed."""
    if s.tpot_sum is None or s.tpot_count is None:
        return
    if st.tpot_sum is None or st.tpot_count is None or s.tpot_count < st.tpot_count or s.tpot_sum < st.tpot_sum:
        st.tpot_sum, st.tpot_count = s.tpot_sum, s.tpot_count  # first sight, or the engine restarted
        return
    n = s.tpot_count - st.tpot_count
    if n < config.speed_min_tokens:
        return  # keep the baseline: the next scrapes add to this interval
    mean = (s.tpot_sum - st.tpot_sum) / n
    st.tpot = mean if st.tpot is None else config.alpha * mean + (1 - config.alpha) * st.tpot
    st.tpot_sum, st.tpot_count = s.tpot_sum, s.tpot_count
