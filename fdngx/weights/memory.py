"""What a scrape session learns about each replica beyond one page: its capacity (stated by the engine, or a
floor from the running peaks when the inventory's number is a guess, trusted only within bounds) and its
backlog where the engine does not report it (from the growth of its queue-time histogram)."""

from __future__ import annotations

import json
import math
import threading
import weakref
from dataclasses import replace

from fdngx.domain import Instance, Load
from fdngx.weights.fetch import Client, Fetch

MAX_REQUESTS = 1_000_000.0  # running or queued on one replica
CAPACITY_TRUST = 8.0  # below the inventory (a replica claiming fewer slots only lowers its own weight)
# Above it, a stated capacity is trusted this far: a replica that lies about max_batch_size cannot take the
# fleet's traffic. A guessed inventory capacity (`capacity_guessed`: vLLM's 256 vs 1024) gets CAPACITY_TRUST.
CAPACITY_ABOVE = 2.0


def clamp(v: float, lo: float, hi: float) -> float:
    return min(hi, max(lo, v))


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
            return clamp(float(sum(per_rank)), 1.0, MAX_REQUESTS)
    total = doc.get("max_running_requests")
    return clamp(float(total), 1.0, MAX_REQUESTS) if _slots(total) else None


def _slots(v: object) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v) and v >= 1


class PeakRunning:
    """What a scrape session remembers per replica between scrapes. Bounded; a replica that refuses
    connections (restarted, maybe with other settings) starts over.

    - the highest running count seen: a floor under a guessed capacity;
    - the queue-time histogram's sum and when it was read: where the engine does not report its backlog
      (FastDeploy without num_requests_queuing), its growth per second is the average number of requests
      that waited over the interval (Little's law: the sum of their waits divided by the time)."""

    LIMIT = 4096

    def __init__(self) -> None:
        self._peak: dict[tuple[str, str, int], float] = {}
        self._queue: dict[tuple[str, str, int], tuple[float, float]] = {}
        self._lock = threading.Lock()

    def queue_rate(self, inst: Instance, queue_time_sum: float, at: float) -> float | None:
        """Average requests waiting since the last read, or None (first read, counter reset, no time)."""
        key = (inst.name, inst.host, inst.port)
        with self._lock:
            last = self._queue.get(key)
            if key not in self._queue and len(self._queue) >= self.LIMIT:
                self._queue.pop(next(iter(self._queue)))
            self._queue[key] = (queue_time_sum, at)
        if last is None or at - last[1] < 0.2 or queue_time_sum < last[0]:
            return None
        return min(MAX_REQUESTS, (queue_time_sum - last[0]) / (at - last[1]))

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
            self._queue.pop((inst.name, inst.host, inst.port), None)


# One memory per scrape session: the sidecar keeps its client for its whole life, so peaks accumulate there;
# a one-off client (cron, status) sees only what its own scrape saw.
_PEAKS: weakref.WeakKeyDictionary[Client, PeakRunning] = weakref.WeakKeyDictionary()
_PEAKS_LOCK = threading.Lock()


def peaks_for(client: Client) -> PeakRunning:
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


def estimate_queue(load: Load, inst: Instance, memory: PeakRunning, at: float) -> Load:
    """Where the backlog is not reported reliably, the queue estimated from queue times (see PeakRunning)."""
    if load.queue_time_sum is None:
        return load
    rate = memory.queue_rate(inst, load.queue_time_sum, at)
    if load.queued_reliable or rate is None:
        return load
    return replace(load, queued=rate, queued_reliable=True, queued_estimated=True)


def trusted_capacity(load: Load, inst: Instance) -> Load:
    """The scraped capacity, within what the inventory says: down to 1/CAPACITY_TRUST, up to CAPACITY_ABOVE
    times (CAPACITY_TRUST when the inventory's number is a guess)."""
    if load.capacity is None:
        return load
    above = CAPACITY_TRUST if inst.extra.get("capacity_guessed") is True else CAPACITY_ABOVE
    lo, hi = inst.max_num_seqs / CAPACITY_TRUST, inst.max_num_seqs * above
    return replace(load, capacity=clamp(load.capacity, max(1.0, lo), hi))
