"""Options of one `fdngx sim` process, parsed and checked (UsageError names the bad option)."""

from __future__ import annotations

from dataclasses import dataclass, field

from fdngx.errors import UsageError
from fdngx.sim import model as m
from fdngx.sim.faults import Faults


@dataclass(frozen=True)
class ReplicaConfig:
    index: int
    port: int
    metrics_port: int
    max_num_seqs: int
    speed: float
    max_concurrency: int
    params: m.ModelParams

    @property
    def name(self) -> str:
        return str(self.port)


@dataclass
class SimConfig:
    host: str
    replicas: list[ReplicaConfig]
    seed: int = 0
    model_name: str = "fdngx-sim"
    default_max_tokens: int = m.DEFAULT_MAX_TOKENS
    legacy_metrics: bool = False
    faults: Faults = field(default_factory=Faults)
    crash_after: float | None = None


def parse_int_list(option: str, text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise UsageError(f"{option} must be a comma-separated list of integers, got {text!r}") from None


def parse_float_list(option: str, text: str) -> list[float]:
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise UsageError(f"{option} must be a comma-separated list of numbers, got {text!r}") from None


def _spread(option: str, values: list, n: int) -> list:
    """One value for every replica, or one per replica."""
    if len(values) == 1:
        return values * n
    if len(values) != n:
        raise UsageError(f"{option} has {len(values)} values for {n} replicas; give one value or {n}")
    return values


def _positive(option: str, value: float) -> None:
    if not value > 0:
        raise UsageError(f"{option} must be positive, got {value}")


def build_config(
    *,
    ports: str,
    metrics_ports: str,
    host: str = "127.0.0.1",
    max_num_seqs: str = str(m.DEFAULT_MAX_NUM_SEQS),
    speed: str = "1.0",
    max_concurrency: str | None = None,
    seed: int = 0,
    model_name: str = "fdngx-sim",
    token_rate: float = m.DEFAULT_TOKEN_RATE,
    batch_cost: float = m.DEFAULT_BATCH_COST,
    prefill_rate: float = m.DEFAULT_PREFILL_RATE,
    max_prefill_tokens: int = m.DEFAULT_MAX_PREFILL_TOKENS,
    kv_blocks: int = m.DEFAULT_KV_BLOCKS,
    block_size: int = m.DEFAULT_BLOCK_SIZE,
    jitter: float = m.DEFAULT_JITTER,
    default_max_tokens: int = m.DEFAULT_MAX_TOKENS,
    legacy_metrics: bool = False,
    faults: Faults | None = None,
    crash_after: float | None = None,
) -> SimConfig:
    api = parse_int_list("--ports", ports)
    met = parse_int_list("--metrics-ports", metrics_ports)
    if not api:
        raise UsageError("--ports needs at least one port")
    if len(api) != len(met):
        raise UsageError(f"--ports has {len(api)} ports but --metrics-ports has {len(met)}; give one each")
    for p in api + met:
        if not 1 <= p <= 65535:
            raise UsageError(f"port {p} is out of range 1..65535")
    seen: set[int] = set()
    for p in api + met:
        if p in seen:
            raise UsageError(f"port {p} is given twice; every API and metrics port must be distinct")
        seen.add(p)
    n = len(api)
    seqs = _spread("--max-num-seqs", parse_int_list("--max-num-seqs", max_num_seqs), n)
    speeds = _spread("--speed", parse_float_list("--speed", speed), n)
    # FastDeploy's per-worker semaphore; by default room for a few batches of backlog.
    if max_concurrency:
        caps = _spread("--max-concurrency", parse_int_list("--max-concurrency", max_concurrency), n)
    else:
        caps = [4 * s for s in seqs]
    for s in seqs:
        if not 1 <= s <= 4096:
            raise UsageError(f"--max-num-seqs must be in 1..4096, got {s}")
    for s in speeds:
        _positive("--speed", s)
    for c in caps:
        if c < 1:
            raise UsageError(f"--max-concurrency must be at least 1, got {c}")
    for name, value in (
        ("--token-rate", token_rate),
        ("--prefill-rate", prefill_rate),
        ("--max-prefill-tokens", max_prefill_tokens),
        ("--kv-blocks", kv_blocks),
        ("--block-size", block_size),
        ("--default-max-tokens", default_max_tokens),
    ):
        _positive(name, value)
    if batch_cost < 0:
        raise UsageError(f"--batch-cost must be 0 or more, got {batch_cost}")
    if not 0 <= jitter < 1:
        raise UsageError(f"--jitter must be in [0, 1), got {jitter}")
    if crash_after is not None and crash_after < 0:
        raise UsageError(f"--crash-after must be 0 or more seconds, got {crash_after}")
    replicas = []
    for i in range(n):
        params = m.ModelParams(
            max_num_seqs=seqs[i],
            token_rate=token_rate,
            batch_cost=batch_cost,
            prefill_rate=prefill_rate,
            max_prefill_tokens=max_prefill_tokens,
            kv_blocks=kv_blocks,
            block_size=block_size,
            jitter=jitter,
        )
        replicas.append(ReplicaConfig(i, api[i], met[i], seqs[i], speeds[i], caps[i], params))
    return SimConfig(
        host=host,
        replicas=replicas,
        seed=seed,
        model_name=model_name,
        default_max_tokens=default_max_tokens,
        legacy_metrics=legacy_metrics,
        faults=faults or Faults(),
        crash_after=crash_after,
    )
