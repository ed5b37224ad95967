"""vLLM: metrics on the API port; KV usage was renamed in v1."""

from __future__ import annotations

from fdngx.domain import Engine
from fdngx.engines.argv import (
    DpMode,
    LaunchRequest,
    ProcSpec,
    bind_host,
    find_flag,
    forbid,
    gpu_slices,
    has_flag,
    int_flag,
    make_instances,
    plan_ports,
    refuse_controller_ports,
    resolve_model,
)
from fdngx.engines.base import EngineSpec, Launched, MetricNames
from fdngx.errors import UsageError

# -- launch ----------------------------------------------------------------------------------------------
# vLLM's --max-num-seqs default depends on the GPU (vllm/engine/arg_utils.py, get_batch_defaults: 1024 on
# GPUs with >= 70 GiB other than A100, else 256) and fdngx cannot see the GPU when it plans: it writes the
# lower value and marks it guessed; the scraper learns better from the running replica (fdngx.weights.scrape).
DEFAULT_MAX_NUM_SEQS = 256
# vLLM's data-parallel flags and their short aliases (vllm/engine/arg_utils.py, ParallelConfig group).
TP = ("--tensor-parallel-size", "-tp")
DP_SIZE = ("--data-parallel-size", "-dp")
DP_RANK = ("--data-parallel-rank", "-dpn")
# Flags of vLLM's internal and hybrid load-balancing layouts: one API server in front of several ranks.
# fdngx balances the ranks itself (external load balancing), so these cannot be combined with it.
INTERNAL_LB = ("--data-parallel-start-rank", "-dpr", "--headless", "--data-parallel-hybrid-lb", "-dph")
# Ranks per `vllm serve`: 1 is external load balancing itself (vLLM's own external-LB tests pass
# `--data-parallel-size-local 1` beside `--data-parallel-rank`); more is an internal or hybrid layout.
DP_LOCAL = ("--data-parallel-size-local", "-dpl")
# ParallelConfig.data_parallel_rpc_port: rank 0's coordinator listens here when ranks share a host.
DEFAULT_DP_RPC_PORT = 29550
DP_RPC = ("--data-parallel-rpc-port", "-dpp")


def build_launch(req: LaunchRequest) -> Launched:
    """One `vllm serve` per replica, each with its own GPU slice and port; metrics on the API port.

    --dp-mode moe: the ranks of one data-parallel group of a MoE model, as vLLM's "External Load Balancing"
    describes (docs/serving/data_parallel_deployment.md): one `vllm serve` per rank with
    `--data-parallel-size N --data-parallel-rank i` and its own port, CUDA_VISIBLE_DEVICES per rank.
    """
    args = list(req.extra_args)
    refuse_controller_ports(req)
    forbid(args, "fdngx gives each replica its own port; use --ports/--base-port", "--port")
    moe = req.dp_mode is DpMode.MOE
    if not moe:
        forbid(args, "fdngx runs --num-servers independent replicas; for the ranks of one MoE data-parallel group "
               "use --dp-mode moe", *DP_SIZE)
    forbid(args, "fdngx gives each rank its own (--dp-mode moe)", *DP_RANK)
    local = find_flag(args, *DP_LOCAL)
    for flag in (*INTERNAL_LB, *([local[0]] if local and int_flag(args, *DP_LOCAL) != 1 else [])):
        if has_flag(args, flag):
            raise UsageError(f"engine argument {flag} after -- conflicts with fdngx: fdngx balances the ranks itself "
                             "(vLLM's external load balancing, --dp-mode moe), not vLLM's internal or hybrid load "
                             "balancer")
    model, user_model = resolve_model(req, "--model")
    tp = int_flag(args, *TP) or 1
    dp = int_flag(args, *DP_SIZE)
    if moe and dp is not None and dp != req.num_servers:
        raise UsageError(f"engine argument --data-parallel-size {dp} after -- conflicts with --num-servers "
                         f"{req.num_servers} (--dp-mode moe: one rank per server)")
    if moe and req.num_servers < 2:
        raise UsageError("--dp-mode moe needs --num-servers 2 or more (the data-parallel size)")
    user_seqs = int_flag(args, "--max-num-seqs")
    ports = plan_ports(req, metrics_on_api_port=True)
    slices = gpu_slices(req, tp, required=req.num_servers > 1)
    host = [] if find_flag(args, "--host") else ["--host", bind_host(req)]
    procs, logs = [], []
    for i in range(req.num_servers):
        name = f"dp{i}"
        log = str(req.log_dir / f"{name}.log")
        head = ["vllm", "serve"] if user_model else ["vllm", "serve", model]
        rank = []
        if moe:
            rank = ([] if dp is not None else ["--data-parallel-size", str(req.num_servers)])
            rank += ["--data-parallel-rank", str(i)]
        argv = [*head, *host, "--port", str(ports.api[i]), *rank, *args]
        env = {"CUDA_VISIBLE_DEVICES": slices[i]} if slices[i] is not None else {}
        procs.append(ProcSpec(name, argv, env, log, [name]))
        logs.append(log)
    # --max-num-seqs applies per DP rank (the same doc), so each rank's capacity is the same either way.
    instances = make_instances(req, ports, user_seqs or DEFAULT_MAX_NUM_SEQS, logs, guessed=user_seqs is None)
    # Every rank runs here, rank 0 included: its data-parallel RPC port must be free too.
    extra = [int_flag(args, *DP_RPC) or DEFAULT_DP_RPC_PORT] if moe else []
    return Launched(procs, instances, extra, False, coupled=moe)


SPEC = EngineSpec(
    name=Engine.VLLM,
    build_launch=build_launch,
    command="vllm",
    metrics=MetricNames(
        running=("vllm:num_requests_running",),
        queued=("vllm:num_requests_waiting",),
        kv_usage=("vllm:kv_cache_usage_perc", "vllm:gpu_cache_usage_perc"),
        # vLLM's metrics carry no scheduler capacity: vllm/v1/metrics/loggers.py exports only
        # vllm:cache_config_info (CacheConfig fields: block_size, num_gpu_blocks, ...), and max_num_seqs is
        # a SchedulerConfig field. A guessed capacity is corrected by the observed peak of running requests.
        tpot=("vllm:inter_token_latency_seconds", "vllm:time_per_output_token_seconds"),
        queue_time=("vllm:request_queue_time_seconds",),
    ),
    metrics_on_api_port=True,
)
