"""Open-loop load generator: sends a Schedule's streaming chat completions on time, whatever the answers.

Also the oracle (join the shortest queue per slot on exact in-flight counts: the generator itself counts
every request it has open on each replica, external ones included), a /sim/state sampler for the
share/queue plots, and an event-loop lag probe (a late generator would inflate every latency).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp

from bench.lb.cluster import Cluster
from bench.lb.stats import Record, percentile
from bench.lb.workload import Req, Schedule, prompt_text

PATH = "/v1/chat/completions"
MODEL = "fdngx-sim"
EXTERNAL_REPLICA = 0  # the replica external clients hit directly
ORACLE_DOWN_S = 0.5  # after a refused connection the oracle avoids that replica this long
KILL_GRACE_S = 1.0  # a request open at the kill that fails within this much is counted as "killed"


@dataclass
class Event:
    at: float  # run clock, seconds
    name: str
    action: Callable[[], None]  # blocking; runs in a thread


@dataclass
class RunOutput:
    records: list[Record]
    lateness_p99: float
    lag_p99: float
    lag_max: float
    samples: list[dict[str, Any]] = field(default_factory=list)
    events: list[tuple[float, str]] = field(default_factory=list)


class LoadGen:
    def __init__(self, schedule: Schedule, cluster: Cluster, urls: list[str], *, oracle: bool, seed: int,
                 events: list[Event] | None = None, on_measure: Callable[[str], None] | None = None,
                 request_timeout: float = 30.0) -> None:
        self.schedule = schedule
        self.cluster = cluster
        self.urls = urls
        self.oracle = oracle
        self.rng = random.Random(seed)
        self.events = events or []
        self.on_measure = on_measure
        self.timeout = aiohttp.ClientTimeout(total=request_timeout, sock_connect=5)
        self.in_flight = [0] * cluster.n
        self.down_until = [0.0] * cluster.n
        self.kills: list[tuple[float, int]] = []  # (run clock, replica)
        self.t0 = 0.0
        self.lateness: list[float] = []
        self.lag: list[float] = []
        self.records: dict[int, Record] = {}
        self.pending_measured = 0
        self.all_measured_done = asyncio.Event()
        self.event_log: list[tuple[float, str]] = []

    def now(self) -> float:
        return time.monotonic() - self.t0

    # -- routing -------------------------------------------------------------------------------------
    def pick(self) -> int:
        """The oracle: least (in-flight + 1) / slots over replicas not known to be down."""
        now = self.now()
        live = [i for i in range(self.cluster.n) if self.down_until[i] <= now] or list(range(self.cluster.n))
        score = {i: (self.in_flight[i] + 1) / self.cluster.specs[i].slots for i in live}
        best = min(score.values())
        return self.rng.choice([i for i in live if score[i] == best])

    # -- one request ---------------------------------------------------------------------------------
    async def send(self, session: aiohttp.ClientSession, req: Req) -> None:
        body = json.dumps({"model": MODEL, "messages": [{"role": "user", "content": prompt_text(req.idx,
                           req.prompt_tokens)}], "stream": True, "max_tokens": req.max_tokens}).encode()
        t_send = self.now()
        self.lateness.append(t_send - req.t)
        status, error, ttft, e2e, replica = 0, "", math.nan, math.nan, -1
        tries = 4 if self.oracle else 1
        for attempt in range(tries):
            direct = req.route < 0 or self.oracle
            target = (EXTERNAL_REPLICA if req.route < 0 else self.pick()) if direct else -1
            url = self.cluster.url(target) if direct else self.urls[req.route]
            if target >= 0:
                self.in_flight[target] += 1
            try:
                status, error, ttft, e2e, replica = await self._stream(session, url, body, t_send)
            finally:
                if target >= 0:
                    self.in_flight[target] -= 1
            if error == "connect" and self.oracle and req.route >= 0 and attempt + 1 < tries:
                # Refused before anything was sent: safe to retry, as nginx would.
                self.down_until[target] = self.now() + ORACLE_DOWN_S
                continue
            if replica < 0 and direct:
                replica = target
            break
        if error and self._killed_under(t_send, replica):
            error = "killed"
        self.records[req.idx] = Record(req.idx, req.t, req.route, status, error, ttft, e2e, replica, req.window)
        if req.phase == "meas":
            self.pending_measured -= 1
            if self.pending_measured == 0:
                self.all_measured_done.set()

    def _killed_under(self, t_send: float, replica: int) -> bool:
        now = self.now()
        return any(t_send <= at <= now <= at + KILL_GRACE_S and replica in (idx, -1) for at, idx in self.kills)

    async def _stream(self, session: aiohttp.ClientSession, url: str, body: bytes,
                      t_send: float) -> tuple[int, str, float, float, int]:
        ttft = math.nan
        status, replica = 0, -1
        try:
            async with session.post(url + PATH, data=body, timeout=self.timeout,
                                    headers={"Content-Type": "application/json"}) as resp:
                status = resp.status
                replica = self.cluster.index_of(resp.headers.get("X-Fdngx-Replica"))
                if status != 200:
                    await resp.read()
                    return status, f"http_{status}", ttft, math.nan, replica
                done = False
                async for line in resp.content:
                    if line.startswith(b"data:"):
                        if math.isnan(ttft):
                            ttft = self.now() - t_send
                        if line.startswith(b"data: [DONE]"):
                            done = True
                if not done:
                    return status, "truncated", ttft, math.nan, replica
                return status, "", ttft, self.now() - t_send, replica
        except aiohttp.ClientConnectorError:
            return status, "connect", ttft, math.nan, replica
        except (aiohttp.ServerDisconnectedError, aiohttp.ClientPayloadError, aiohttp.ClientOSError):
            return status, "cut", ttft, math.nan, replica
        except asyncio.TimeoutError:
            return status, "timeout", ttft, math.nan, replica

    # -- background probes ---------------------------------------------------------------------------
    async def _lag_probe(self) -> None:
        while True:
            t = time.monotonic()
            await asyncio.sleep(0.02)
            sched = self.schedule
            if sched.warmup <= self.now() <= sched.window_start(sched.windows):
                self.lag.append(time.monotonic() - t - 0.02)

    async def _sampler(self, session: aiohttp.ClientSession, out: list[dict[str, Any]]) -> None:
        timeout = aiohttp.ClientTimeout(total=0.5)

        async def one(i: int) -> dict[str, Any] | None:
            try:
                async with session.get(self.cluster.metrics_url(i) + "/sim/state", timeout=timeout) as r:
                    return await r.json()
            except (aiohttp.ClientError, asyncio.TimeoutError):
                return None

        while True:
            t = self.now()
            states = await asyncio.gather(*(one(i) for i in range(self.cluster.n)))
            out.append({"t": round(t, 3),
                        "running": [s["running"] if s else None for s in states],
                        "waiting": [s["waiting"] if s else None for s in states]})
            await asyncio.sleep(max(0.0, 0.5 - (self.now() - t)))

    async def _event(self, ev: Event, session: aiohttp.ClientSession) -> None:
        await asyncio.sleep(max(0.0, ev.at - self.now()))
        self.event_log.append((round(self.now(), 3), ev.name))
        if ev.name.startswith("kill"):
            self.kills.append((self.now(), int(ev.name.split()[-1])))
        await asyncio.get_running_loop().run_in_executor(None, ev.action)
        self.event_log.append((round(self.now(), 3), ev.name + " done"))
        if ev.name.startswith("kill"):
            await self._first_health(session, int(ev.name.split()[-1]))

    async def _first_health(self, session: aiohttp.ClientSession, i: int) -> None:
        """After a kill: poll the replica's /health every 20 ms and log the first 200 ("health i 200"), the
        moment a balancer could know it is back (the recovery time is measured from there)."""
        timeout = aiohttp.ClientTimeout(total=0.2)
        while True:
            with contextlib.suppress(aiohttp.ClientError, asyncio.TimeoutError):
                async with session.get(self.cluster.url(i) + "/health", timeout=timeout) as r:
                    if r.status == 200:
                        self.event_log.append((round(self.now(), 3), f"health {i} 200"))
                        return
            await asyncio.sleep(0.02)

    # -- the run -------------------------------------------------------------------------------------
    async def run(self) -> RunOutput:
        sched = self.schedule
        self.pending_measured = len(sched.measured())
        connector = aiohttp.TCPConnector(limit=0, enable_cleanup_closed=True)
        samples: list[dict[str, Any]] = []
        tasks: set[asyncio.Task[None]] = set()
        async with aiohttp.ClientSession(connector=connector, trust_env=False) as session:
            self.t0 = time.monotonic()
            bg = [asyncio.create_task(self._lag_probe()), asyncio.create_task(self._sampler(session, samples))]
            bg += [asyncio.create_task(self._event(ev, session)) for ev in self.events]
            label = "warm"
            try:
                for req in sched.reqs:
                    delay = req.t - self.now()
                    if delay > 0:
                        await asyncio.sleep(delay)
                    now_label = f"meas{req.window}" if req.phase == "meas" else req.phase
                    if now_label != label:
                        # Window boundaries: CPU snapshots and counters (cheap, synchronous).
                        label = now_label
                        if self.on_measure:
                            self.on_measure(label)
                    if req.phase == "cool" and self.all_measured_done.is_set():
                        break
                    task = asyncio.create_task(self.send(session, req))
                    tasks.add(task)
                    task.add_done_callback(tasks.discard)
                if not self.all_measured_done.is_set() and self.pending_measured:
                    with contextlib.suppress(asyncio.TimeoutError):
                        await asyncio.wait_for(self.all_measured_done.wait(), timeout=sched.cooldown)
            finally:
                for t in [*tasks, *bg]:
                    t.cancel()
                await asyncio.gather(*tasks, *bg, return_exceptions=True)
        measured = [self.records.get(r.idx) or Record(r.idx, r.t, r.route, 0, "unfinished", math.nan, math.nan, -1,
                                                      r.window) for r in sched.measured()]
        return RunOutput(
            records=measured,
            lateness_p99=percentile(self.lateness, 99),
            lag_p99=percentile(self.lag, 99),
            lag_max=max(self.lag, default=math.nan),
            samples=samples,
            events=self.event_log,
        )
