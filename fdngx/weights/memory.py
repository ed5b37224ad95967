"""What a scrape session learns about each replica beyond one page: its capacity (stated by the engine, or a
floor from the running peaks when the inventory's number is a guess, trusted only within bounds) and its
backlog where the engine does not report it (from its request counters, else from the growth of its
queue-time histogram)."""

from __future__ import annotations

import json
import math
import threading
import time
import weakref
from collections.abc import Iterable
from dataclasses import dataclass, replace

from fdngx.domain import Instance, Load, QueueEstimate
from fdngx.weights.fetch import Client, Fetch

MAX_REQUESTS = 1_000_000.0  # running or queued on one replica
CAPACITY_TRUST = 8.0  # below the inventory (a replica claiming fewer slots only lowers its own weight)
# Above it, a stated capacity is trusted this far: a replica that lies about max_batch_size cannot take the
# fleet's traffic. A guessed inventory capacity (`capacity_guessed`: vLLM's 256 vs 1024) gets CAPACITY_TRUST.
CAPACITY_ABOVE = 2.0


def clamp(v: float, lo: float, hi: float) -> float:
    return min(hi, max(lo, v))


def capacity_from_server_info(body: bytes) -> float | None:
    """Slots an SGLang server states in GET /server_info (/get_server_info before), or None (never raises).

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


@dataclass
class _Replica:
    """What PeakRunning remembers of one replica."""

    peak: float = 0.0  # the highest running count seen
    queue_time: tuple[float, float] | None = None  # (queue-time sum, when read) at the previous scrape
    lost: float | None = None  # requests the counters hold that are neither running nor waiting; None: not yet
    last_free: float | None = None  # unfinished - running at the previous scrape, if a slot was free then
    info_path: int = 0  # which of the engine's info pages to ask (the next one after a 404)
    info_paths: int = 1
    info_at: float | None = None  # when the info page was last read (time.monotonic())
    info_capacity: float | None = None  # the slots it stated then


class PeakRunning:
    """What a scrape session remembers per replica between scrapes. Bounded (the oldest replica goes past
    LIMIT); a replica that refuses connections (restarted, maybe with other settings) starts over.

    - the highest running count seen: a floor under a guessed capacity;
    - where the engine does not report its backlog (FastDeploy without num_requests_enqueued):
      * its request counters: received - finished - running is the backlog at the scrape plus the requests
        the engine lost without a success (aborted, failed), which only grow; that count is calibrated
        whenever a slot is free (no backlog then) and never above what the counters hold;
      * else the queue-time histogram's sum and when it was read: its growth per second is the average
        number of requests that waited over the interval (Little's law: the sum of their waits divided by
        the time), which trails a backlog that builds up by the length of the waits."""

    LIMIT = 4096
    # The slots an engine states on its info page change only with a restart (which makes the replica start
    # over here): read it once a minute, not every cycle. SGLang's answer asks every DP scheduler for its
    # state, and newer SGLang logs a deprecation WARNING for each GET of the old path.
    INFO_EVERY = 60.0

    def __init__(self) -> None:
        self._replicas: dict[tuple[str, str, int], _Replica] = {}
        self._lock = threading.Lock()

    def _of(self, inst: Instance) -> _Replica:
        """This replica's memory (under the lock), made on first sight."""
        key = (inst.name, inst.host, inst.port)
        st = self._replicas.get(key)
        if st is None:
            if len(self._replicas) >= self.LIMIT:
                self._replicas.pop(next(iter(self._replicas)))
            st = self._replicas[key] = _Replica()
        return st

    def backlog(self, inst: Instance, unfinished: float, running: float, slots: float) -> float | None:
        """Requests waiting at the scrape from the engine's counters, or None (not calibrated yet).

        A slot is free: no backlog (the engine admits within a step), so what the counters hold beyond `running`
        was lost; taken as the lower of two such scrapes in a row, so one request caught between its arrival
        and its admission does not count as lost. Every slot taken: the counters less the lost ones, and the
        lost ones are never more than the counters hold (a restart starts the counters over)."""
        hidden = unfinished - running
        with self._lock:
            st = self._of(inst)
            if running < slots:
                if st.last_free is not None:
                    st.lost = min(hidden, st.last_free)
                else:
                    st.lost = hidden if st.lost is None else min(st.lost, hidden)
                st.last_free = hidden
                return 0.0
            st.last_free = None
            if st.lost is None:
                return None
            st.lost = min(st.lost, hidden)
            return hidden - st.lost

    def queue_rate(self, inst: Instance, queue_time_sum: float, at: float) -> float | None:
        """Average requests waiting since the last read, or None (first read, counter reset, no time)."""
        with self._lock:
            st = self._of(inst)
            last, st.queue_time = st.queue_time, (queue_time_sum, at)
        if last is None or at - last[1] < 0.2 or queue_time_sum < last[0]:
            return None
        return min(MAX_REQUESTS, (queue_time_sum - last[0]) / (at - last[1]))

    def info_path(self, inst: Instance, paths: tuple[str, ...], now: float) -> str | None:
        """The info page to GET this cycle (of `paths`, newest first), or None: read less than INFO_EVERY ago."""
        with self._lock:
            st = self._of(inst)
            if st.info_at is not None and now - st.info_at < self.INFO_EVERY:
                return None
            st.info_paths = len(paths)
            return paths[st.info_path % len(paths)]

    def stated(self, inst: Instance, info: Fetch | None, now: float) -> float | None:
        """The slots the replica's info page states: from `info` when it was read this cycle, else as last read.
        A 404 moves on to the next path (an older or newer engine); a round of them waits INFO_EVERY. A page
        that fails otherwise is asked again next cycle."""
        with self._lock:
            st = self._of(inst)
            if info is not None and info.error is None:
                if info.status == 404:
                    st.info_path += 1
                    if st.info_path % st.info_paths == 0:
                        st.info_at = now
                elif info.status == 200:
                    st.info_capacity, st.info_at = capacity_from_server_info(info.body), now
            return st.info_capacity

    def see(self, inst: Instance, running: float) -> float:
        with self._lock:
            st = self._of(inst)
            st.peak = max(st.peak, running)
            return st.peak

    def forget(self, inst: Instance) -> None:
        with self._lock:
            self._replicas.pop((inst.name, inst.host, inst.port), None)

    def keep_only(self, insts: Iterable[Instance]) -> None:
        """Forget every replica but `insts` (a cycle's whole inventory): one that left the inventory alive is
        never refused, so it was kept until LIMIT pushed out the oldest, which may be the ones still serving."""
        keep = {(i.name, i.host, i.port) for i in insts}
        with self._lock:
            for key in [k for k in self._replicas if k not in keep]:
                del self._replicas[key]

    def remembered(self) -> int:
        """How many replicas are remembered. (Not __len__: an empty memory is still a memory, never falsy.)"""
        return len(self._replicas)


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


def learn_capacity(load: Load, inst: Instance, info: Fetch | None, peaks: PeakRunning,
                   now: float | None = None, *, info_page: bool = True) -> Load:
    """The capacity the engine states (metrics first, then its info page: `info` if read this cycle, else as
    last read; `info_page` False: the engine has none, nothing to remember), else for a guessed inventory
    capacity the peak of running requests when it is above the guess. Clamped by trusted_capacity."""
    if load.capacity is None and info_page:
        stated = peaks.stated(inst, info, time.monotonic() if now is None else now)
        if stated is not None:
            load = replace(load, capacity=stated)
    if load.capacity is None and inst.extra.get("capacity_guessed") is True:
        peak = peaks.see(inst, load.running)
        if peak > inst.max_num_seqs:
            load = replace(load, capacity=peak)
    return trusted_capacity(load, inst)


def estimate_queue(load: Load, inst: Instance, memory: PeakRunning, at: float) -> Load:
    """Where the backlog is not reported reliably, the queue estimated from the request counters, else from
    queue times (see PeakRunning). Both memories are fed at every such scrape, so either is ready when needed;
    a replica that reports its backlog feeds neither."""
    if load.queued_reliable:
        return load
    counted = None
    if load.unfinished is not None:
        slots = load.capacity if load.capacity is not None else float(inst.max_num_seqs)
        counted = memory.backlog(inst, load.unfinished, load.running, slots)
    rate = memory.queue_rate(inst, load.queue_time_sum, at) if load.queue_time_sum is not None else None
    if counted is not None:
        return replace(load, queued=counted, queued_reliable=True, queue_estimate=QueueEstimate.COUNTERS)
    if rate is not None:
        return replace(load, queued=rate, queued_reliable=True, queue_estimate=QueueEstimate.QUEUE_TIMES)
    return load


def trusted_capacity(load: Load, inst: Instance) -> Load:
    """The scraped capacity, within what the inventory says: down to 1/CAPACITY_TRUST, up to CAPACITY_ABOVE
    times (CAPACITY_TRUST when the inventory's number is a guess)."""
    if load.capacity is None:
        return load
    above = CAPACITY_TRUST if inst.extra.get("capacity_guessed") is True else CAPACITY_ABOVE
    lo, hi = inst.max_num_seqs / CAPACITY_TRUST, inst.max_num_seqs * above
    return replace(load, capacity=clamp(load.capacity, max(1.0, lo), hi))
