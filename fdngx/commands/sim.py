"""`fdngx sim`: simulated FastDeploy data-parallel replicas (wiring only; the model is fdngx.sim)."""

from __future__ import annotations

import typer

from fdngx.logs import setup_logging
from fdngx.sim import model as m


def sim(
    ports: str = typer.Option(..., "--ports", help="API ports, comma-separated, one per replica."),
    metrics_ports: str = typer.Option(..., "--metrics-ports", help="Metrics ports, one per replica."),
    host: str = typer.Option("127.0.0.1", "--host", help="Address to listen on."),
    max_num_seqs: str = typer.Option(
        str(m.DEFAULT_MAX_NUM_SEQS), "--max-num-seqs", help="Decode slots: one value or one per replica."
    ),
    speed: str = typer.Option(
        "1.0", "--speed", help="Speed factor (0.5 = half as fast): one value or one per replica."
    ),
    max_concurrency: str = typer.Option(
        None, "--max-concurrency", help="Requests in flight before 429 (default 4 x max-num-seqs); one or per replica."
    ),
    seed: int = typer.Option(0, "--seed", help="Seed for step jitter and error-rate draws."),
    model: str = typer.Option("fdngx-sim", "--model", help="Model name served by /v1/models."),
    token_rate: float = typer.Option(
        m.DEFAULT_TOKEN_RATE, "--token-rate", help="Tokens/s of one stream at batch 1 (decode step = 1/rate)."
    ),
    batch_cost: float = typer.Option(
        m.DEFAULT_BATCH_COST, "--batch-cost", help="Step slowdown per extra running sequence (0.01 = 1 %)."
    ),
    prefill_rate: float = typer.Option(m.DEFAULT_PREFILL_RATE, "--prefill-rate", help="Prompt tokens/s of prefill."),
    max_prefill_tokens: int = typer.Option(
        m.DEFAULT_MAX_PREFILL_TOKENS, "--max-prefill-tokens", help="Prompt tokens prefilled per step at most."
    ),
    kv_blocks: int = typer.Option(m.DEFAULT_KV_BLOCKS, "--kv-blocks", help="KV-cache blocks per replica."),
    block_size: int = typer.Option(m.DEFAULT_BLOCK_SIZE, "--block-size", help="Tokens per KV block."),
    jitter: float = typer.Option(m.DEFAULT_JITTER, "--jitter", help="Step time jitter, +/- this fraction."),
    default_max_tokens: int = typer.Option(
        m.DEFAULT_MAX_TOKENS, "--default-max-tokens", help="Output tokens when a request gives no max_tokens."
    ),
    legacy_metrics: bool = typer.Option(
        False, "--legacy-metrics", help="FastDeploy 2.4/2.5: no num_requests_enqueued series, waiting stays 0."
    ),
    unhealthy: bool = typer.Option(False, "--unhealthy", help="Fault: /health and /ping answer 404."),
    no_weights: bool = typer.Option(
        False, "--no-weights", help="Fault: /health, /ping, completions and /v1/models answer 304 (weights cleared)."
    ),
    error_rate: float = typer.Option(0.0, "--error-rate", help="Fault: share of completions answered 500 at once."),
    hang: bool = typer.Option(False, "--hang", help="Fault: accept completions and never answer."),
    metrics_delay: float = typer.Option(0.0, "--metrics-delay", help="Fault: /metrics answers after this many s."),
    garbage_metrics: bool = typer.Option(False, "--garbage-metrics", help="Fault: /metrics answers unparsable text."),
    crash_after: float = typer.Option(
        None, "--crash-after", help="Fault: every replica closes its ports after this many s; the process exits 1."
    ),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Debug logging."),
) -> None:
    """Simulated FastDeploy data-parallel replicas: same endpoints, metric names and failure modes.

    \b
    One process hosts every replica on one asyncio loop. Replica i
    listens on the i-th API port and the i-th metrics port and tags
    each API answer with the header X-Fdngx-Replica: <API port>.

    \b
    Queueing model of one replica (defaults in brackets):
    - max-num-seqs decode slots [64]; more requests wait FIFO;
      past max-concurrency [4 x max-num-seqs] in flight: 429 at once.
    - The engine runs in steps. A step admits waiting requests
      (slot free, KV fits, <= max-prefill-tokens [8192] prompt tokens)
      and prefills them: prompt tokens / prefill-rate [10000/s].
    - Decode step: (1 / token-rate [30/s])
      x (1 + batch-cost [0.01] x (running - 1)):
      33 ms at batch 1, 54 ms at batch 64; one token per request.
    - Step times are divided by speed [1.0] and jittered
      by +/- jitter [0.05], seeded by seed [0].
    - KV: kv-blocks [2048] x block-size [64] tokens; admission
      reserves prompt + max_tokens; gpu_cache_usage_perc reports
      the blocks filled so far.
    - Prompt tokens = characters / 4; output length = max_tokens
      or max_completion_tokens, else default-max-tokens [128].
    - num_requests_waiting = backlog up to max-num-seqs,
      num_requests_enqueued = the rest of the backlog.

    \b
    API port: POST /v1/chat/completions, /v1/completions (SSE when
    stream=true), GET /v1/models, /health, /ping, and SGLang gateway
    probes /get_model_info, /get_server_info, /health_generate, /get_load.
    Metrics port: GET /metrics, /config-info, and loopback-only control:
    GET /sim/state; POST /sim/fault {"unhealthy": true},
    {"error_rate": 0.5}, {"hang": true}, {"metrics_delay": 3},
    {"garbage_metrics": true}, {"speed": 0.5} or {"crash": true}.
    Crash closes that replica's sockets for good (connection refused);
    once all replicas crashed the process exits 1.
    Fault flags apply to every replica. SIGTERM/Ctrl-C: exit 0 at once.
    """
    from fdngx.sim.config import build_config
    from fdngx.sim.faults import Faults, validate_fault
    from fdngx.sim.runtime import run

    setup_logging(verbose)
    checked = validate_fault(
        {
            "unhealthy": unhealthy,
            "no_weights": no_weights,
            "error_rate": error_rate,
            "hang": hang,
            "metrics_delay": metrics_delay,
            "garbage_metrics": garbage_metrics,
        },
        cli=True,
    )
    cfg = build_config(
        ports=ports,
        metrics_ports=metrics_ports,
        host=host,
        max_num_seqs=max_num_seqs,
        speed=speed,
        max_concurrency=max_concurrency,
        seed=seed,
        model_name=model,
        token_rate=token_rate,
        batch_cost=batch_cost,
        prefill_rate=prefill_rate,
        max_prefill_tokens=max_prefill_tokens,
        kv_blocks=kv_blocks,
        block_size=block_size,
        jitter=jitter,
        default_max_tokens=default_max_tokens,
        legacy_metrics=legacy_metrics,
        faults=Faults(**checked),
        crash_after=crash_after,
    )
    code = run(cfg)
    if code:
        raise typer.Exit(code)


def register(app: typer.Typer) -> None:
    app.command("sim",
                short_help="Simulated FastDeploy replicas: its endpoints, metrics and faults.")(sim)
