"""The queueing model of one simulated FastDeploy replica. Pure: no I/O, no asyncio, the clock is passed in.

One replica is a continuous-batching engine:

- `max_num_seqs` decode slots; requests beyond them wait in one FIFO queue.
- The engine runs in steps. At the start of a step it admits queued requests (FIFO, no overtaking) while a
  slot is free, their KV blocks fit and the step's prefill token budget (`max_prefill_tokens`) holds; a
  step that admits requests also runs their prefill, which costs `prompt_tokens / prefill_rate` seconds.
- A step costs `(1 / token_rate) * (1 + batch_cost * (running - 1))`: a bigger batch makes every step
  slower, as on a GPU. At the end of the step every running request has one more token; the ones admitted
  in this step get their first token (so TTFT = queue time + the step that prefilled them).
- KV cache: `kv_blocks` blocks of `block_size` tokens. Admission reserves a request's worst case
  (prompt + max_tokens) so a running request never has to be preempted; `gpu_cache_usage_perc` reports
  the blocks actually filled so far. A simplification, not FastDeploy's behaviour: its v1 KV scheduler
  (engine/sched/resource_manager_v1.py) grows a request's blocks as it decodes and, when a step cannot get
  them, preempts running requests (`_trigger_preempt`, last in first out) back to the waiting queue. Here KV
  pressure shows as admission waits instead of preempted requests; the load signals fdngx reads (running,
  backlog, cache usage) move the same way, the timing of a preempted request's tokens does not.
- Every step time is divided by the replica's `speed` (0.5 = half as fast) and multiplied by a seeded
  jitter factor in [1 - jitter, 1 + jitter].
"""

from __future__ import annotations

import contextlib
import math
import random
from collections import deque
from dataclasses import dataclass, field
from typing import Any

# Defaults, also quoted by `fdngx sim --help`.
DEFAULT_MAX_NUM_SEQS = 64
DEFAULT_TOKEN_RATE = 30.0  # tokens/s of one stream at batch 1 (a 33 ms decode step)
DEFAULT_BATCH_COST = 0.01  # each extra running sequence makes a step 1 % slower (batch 64: 54 ms)
DEFAULT_PREFILL_RATE = 10000.0  # prompt tokens/s
DEFAULT_MAX_PREFILL_TOKENS = 8192  # prompt tokens prefilled per step at most (chunked-prefill budget)
DEFAULT_KV_BLOCKS = 2048
DEFAULT_BLOCK_SIZE = 64
DEFAULT_JITTER = 0.05
DEFAULT_MAX_TOKENS = 128


@dataclass(frozen=True)
class ModelParams:
    max_num_seqs: int = DEFAULT_MAX_NUM_SEQS
    token_rate: float = DEFAULT_TOKEN_RATE
    batch_cost: float = DEFAULT_BATCH_COST
    prefill_rate: float = DEFAULT_PREFILL_RATE
    max_prefill_tokens: int = DEFAULT_MAX_PREFILL_TOKENS
    kv_blocks: int = DEFAULT_KV_BLOCKS
    block_size: int = DEFAULT_BLOCK_SIZE
    jitter: float = DEFAULT_JITTER


@dataclass(eq=False)
class SimRequest:
    """One request's life in the engine. Times are in the caller's clock (seconds)."""

    rid: int
    prompt_tokens: int
    max_tokens: int
    arrival: float
    admitted: float | None = None
    first_token: float | None = None
    finished: float | None = None
    generated: int = 0
    # The gap since this request's previous token, set on every token after the first: FastDeploy observes
    # time_per_output_token_seconds once per decode step per request (output/token_processor.py,
    # TokenProcessor._record_metrics: current_time - task.last_token_time).
    last_token: float | None = None
    token_gap: float | None = None
    blocks: int = 0  # KV blocks reserved at admission
    cancelled: bool = False
    # The server hangs its wake-up handle here; the model never touches it.
    waiter: Any = field(default=None, repr=False)

    @property
    def done(self) -> bool:
        return self.finished is not None or self.cancelled


def prompt_tokens_of(text: str) -> int:
    """About four characters per token, as a tokenizer gives for English text."""
    return max(1, len(text) // 4)


class ReplicaModel:
    def __init__(self, params: ModelParams, *, speed: float = 1.0, seed: int = 0) -> None:
        if params.max_num_seqs < 1:
            raise ValueError("max_num_seqs must be at least 1")
        if speed <= 0:
            raise ValueError("speed must be positive")
        self.params = params
        self.speed = speed
        self._rng = random.Random(seed)
        self.waiting: deque[SimRequest] = deque()
        self.running: dict[int, SimRequest] = {}
        self._admitted_now: list[SimRequest] = []
        self.reserved_blocks = 0
        # Monotonic totals for the Prometheus counters.
        self.requests_total = 0
        self.success_total = 0
        self.prompt_tokens_total = 0
        self.generation_tokens_total = 0
        self.steps_total = 0
        self.last_step_s = 0.0

    # -- requests ----------------------------------------------------------------------------------
    def submit(self, req: SimRequest) -> None:
        self.requests_total += 1
        self.prompt_tokens_total += req.prompt_tokens
        self.waiting.append(req)

    def cancel(self, req: SimRequest) -> None:
        """The client went away: free its slot and KV blocks (no-op once it has finished)."""
        if req.done:
            return
        if self.running.pop(req.rid, None) is not None:
            self.reserved_blocks -= req.blocks
        else:
            with contextlib.suppress(ValueError):
                self.waiting.remove(req)
        req.cancelled = True

    # -- stepping ----------------------------------------------------------------------------------
    def blocks_for(self, tokens: int) -> int:
        return math.ceil(tokens / self.params.block_size)

    def begin_step(self, now: float) -> float | None:
        """Admit what fits and return how long this step takes, or None when there is nothing to do."""
        p = self.params
        budget = p.max_prefill_tokens
        prefill_tokens = 0
        admitted: list[SimRequest] = []
        while self.waiting and len(self.running) < p.max_num_seqs:
            req = self.waiting[0]
            need = self.blocks_for(req.prompt_tokens + req.max_tokens)
            if self.reserved_blocks + need > p.kv_blocks and self.running:
                break  # wait for KV to free up; a lone request always runs, even if it cannot fit
            if admitted and prefill_tokens + req.prompt_tokens > budget:
                break
            self.waiting.popleft()
            req.admitted = now
            req.blocks = need
            self.reserved_blocks += need
            self.running[req.rid] = req
            admitted.append(req)
            prefill_tokens += req.prompt_tokens
        self._admitted_now = admitted
        if not self.running:
            return None
        duration = (1.0 / p.token_rate) * (1.0 + p.batch_cost * (len(self.running) - 1))
        duration += prefill_tokens / p.prefill_rate
        if p.jitter:
            duration *= 1.0 + self._rng.uniform(-p.jitter, p.jitter)
        duration /= self.speed
        self.last_step_s = duration
        return duration

    def end_step(self, now: float) -> list[SimRequest]:
        """Every running request gains a token; finished ones leave. Returns the requests that progressed."""
        progressed = list(self.running.values())
        self.steps_total += 1
        self.generation_tokens_total += len(progressed)
        for req in progressed:
            req.generated += 1
            if req.first_token is None:
                req.first_token = now
            req.token_gap = None if req.last_token is None else now - req.last_token
            req.last_token = now
            if req.generated >= req.max_tokens:
                req.finished = now
                del self.running[req.rid]
                self.reserved_blocks -= req.blocks
                self.success_total += 1
        self._admitted_now = []
        return progressed

    # -- what the metrics report -------------------------------------------------------------------
    @property
    def num_running(self) -> int:
        return len(self.running)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    def used_blocks(self) -> int:
        bs = self.params.block_size
        return sum(-(-(r.prompt_tokens + r.generated) // bs) for r in self.running.values())

    def cache_usage(self) -> float:
        return min(1.0, self.used_blocks() / self.params.kv_blocks)
