"""The workload: simulator parameters, request mix, capacity, and the seeded open-loop schedule. Pure.

Everything a run sends is decided here from (scenario, seed) before any frontend starts, so every frontend
gets byte-for-byte the same measured requests at the same offsets.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field

from fdngx.sim import model as simmodel

# The simulator runs time-scaled (token_rate 50 instead of 30, prefill twice as fast): requests finish
# sooner, so a 12 s window holds ~600 requests and the whole grid fits the time budget. CPU cost grows
# with requests x output tokens, not with the token rate, so this does not load the 2 cores more.
TOKEN_RATE = 50.0
PREFILL_RATE = 20000.0
BATCH_COST = simmodel.DEFAULT_BATCH_COST
# 16 slots, not the default 64: at 64 slots and 80 % load nothing ever queues and every balancer looks
# the same; with 16 the slots bind and the request rate stays within what one Python load generator
# can drive on 2 cores.
SLOTS = 16


@dataclass(frozen=True)
class Mix:
    """Short/long prompts and outputs, drawn independently (tokens; 4 characters per prompt token)."""

    p_long_prompt: float = 0.2
    short_prompt: tuple[int, int] = (32, 256)
    long_prompt: tuple[int, int] = (1024, 2048)
    p_long_output: float = 0.25
    short_output: tuple[int, int] = (4, 32)
    long_output: tuple[int, int] = (32, 96)

    def mean_prompt(self) -> float:
        return _mix_mean(self.p_long_prompt, self.short_prompt, self.long_prompt)

    def mean_output(self) -> float:
        return _mix_mean(self.p_long_output, self.short_output, self.long_output)


def _mix_mean(p_long: float, short: tuple[int, int], long: tuple[int, int]) -> float:
    return (1 - p_long) * sum(short) / 2 + p_long * sum(long) / 2


@dataclass(frozen=True)
class ReplicaSpec:
    slots: int = SLOTS
    speed: float = 1.0


def step_time(running: int, token_rate: float = TOKEN_RATE, batch_cost: float = BATCH_COST) -> float:
    """The simulator's decode step at a given batch (fdngx/sim/model.py: begin_step)."""
    return (1.0 / token_rate) * (1.0 + batch_cost * (running - 1))


def replica_capacity(spec: ReplicaSpec, mix: Mix) -> float:
    """Requests/s one replica completes with every slot busy.

    Per request the replica spends mean_output decode steps shared by `slots` requests, plus its prefill
    (which stalls the whole batch, so it is not shared); all divided by speed.
    """
    per_request = mix.mean_output() * step_time(spec.slots) / spec.slots + mix.mean_prompt() / PREFILL_RATE
    return spec.speed / per_request


def total_capacity(specs: list[ReplicaSpec], mix: Mix) -> float:
    return sum(replica_capacity(s, mix) for s in specs)


@dataclass(frozen=True)
class Req:
    idx: int
    t: float  # seconds after the run's start
    phase: str  # warm | meas | cool: only `meas` is reported
    prompt_tokens: int
    max_tokens: int
    route: int  # >= 0: frontend instance index; -1: straight to the external replica
    window: int = -1  # measured window (= repeat) index; -1 outside the measured windows


@dataclass(frozen=True)
class Schedule:
    rate: float
    warmup: float
    measure: float
    cooldown: float
    reqs: list[Req] = field(default_factory=list)

    windows: int = 1

    def measured(self, window: int | None = None) -> list[Req]:
        return [r for r in self.reqs if r.phase == "meas" and (window is None or r.window == window)]

    def window_start(self, k: int) -> float:
        return self.warmup + k * self.measure


def _phase(rng: random.Random, rate: float, start: float, length: float, phase: str, mix: Mix,
           n_frontends: int, p_external: float) -> list[tuple[float, str, int, int, int]]:
    out = []
    t = start
    while True:
        t += rng.expovariate(rate)
        if t >= start + length:
            return out
        lo, hi = mix.long_prompt if rng.random() < mix.p_long_prompt else mix.short_prompt
        prompt = rng.randint(lo, hi)
        lo, hi = mix.long_output if rng.random() < mix.p_long_output else mix.short_output
        output = rng.randint(lo, hi)
        # Draw both every time so the stream of draws (and so every later request) does not depend on
        # the scenario's routing options.
        ext = rng.random() < p_external
        fe = rng.randrange(2)
        route = -1 if ext else (fe if n_frontends > 1 else 0)
        out.append((t, phase, prompt, output, route))


def make_schedule(*, rate: float, warmup: float, measure: float, cooldown: float, seed: int, mix: Mix,
                  n_frontends: int = 1, p_external: float = 0.0, windows: int = 1) -> Schedule:
    """Poisson arrivals: a warm-up, `windows` measured windows back to back, a cool-down.

    Measured window k is drawn from its own stream seeded by seed + k, from 0, then shifted to its place:
    its requests depend only on (seed + k, rate, measure, mix, routing), so a frontend given a longer
    warm-up (a control loop, to converge) gets exactly the same measured requests as every other one.
    """
    rows: list[tuple[float, str, int, int, int, int]] = []
    for phase, start, length, salt in (("warm", 0.0, warmup, 1), ("cool", warmup + windows * measure, cooldown, 3)):
        rng = random.Random(seed * 1000 + salt)
        rows += [(*row, -1) for row in _phase(rng, rate, start, length, phase, mix, n_frontends, p_external)]
    for k in range(windows):
        rng = random.Random((seed + k) * 1000 + 2)
        shift = warmup + k * measure
        rows += [(t + shift, *rest, k) for t, *rest in _phase(rng, rate, 0.0, measure, "meas", mix, n_frontends,
                                                              p_external)]
    rows.sort(key=lambda row: row[0])
    reqs = [Req(i, t, ph, p, o, r, w) for i, (t, ph, p, o, r, w) in enumerate(rows)]
    return Schedule(rate, warmup, measure, cooldown, reqs, windows)


def prompt_text(idx: int, tokens: int) -> str:
    """tokens x 4 characters; unique per request so no prefix is shared (the simulator has no prefix
    cache, so affinity could only cost balance, never gain hits)."""
    head = f"request {idx}: "
    body = "lorem ipsum dolor sit amet " * math.ceil(tokens * 4 / 27 + 1)
    return (head + body)[: max(len(head), tokens * 4)]
