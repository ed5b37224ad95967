"""SGLang: metrics on the API port (with --enable-metrics); capacity from GET /get_server_info."""

from __future__ import annotations

from dataclasses import replace

from fdngx.domain import Engine
from fdngx.engines.argv import (
    DpMode,
    LaunchRequest,
    ProcSpec,
    bind_host,
    find_flag,
    forbid,
    gpu_slices,
    int_flag,
    make_instances,
    plan_ports,
    refuse_controller_ports,
    resolve_model,
)
from fdngx.engines.base import EngineSpec, Launched, MetricNames
from fdngx.errors import UsageError

# -- launch ----------------------------------------------------------------------------------------------
# SGLang sizes its batch from free memory when --max-running-requests is not given; this is the
# capacity fdngx writes then, marked guessed: the scraper reads the real one from /get_server_info.
DEFAULT_MAX_NUM_SEQS = 256
MODULE = "sglang.launch_server"
# python/sglang/srt/server_args.py: --tp-size/--tp and --dp-size/--dp (--data-parallel-size in some builds).
TP = ("--tp-size", "--tensor-parallel-size", "--tp")
DP = ("--dp-size", "--data-parallel-size", "--dp")
DPA = "--enable-dp-attention"


def build_launch(req: LaunchRequest) -> Launched:
    """One `python -m sglang.launch_server` per replica with its GPU slice; metrics on the API port.

    That is how sglang_router's launch_server.py runs data parallelism (sgl-router/py_src/sglang_router/
    launch_server.py: one server per rank with dp_size=1, its own port and GPUs). --dp-mode moe is DP
    attention instead (docs/advanced_features/dp_dpa_router_guide.md): ONE server with `--dp-size N
    --enable-dp-attention`, whose ranks share one endpoint and are balanced by SGLang's own scheduler.
    """
    args = list(req.extra_args)
    refuse_controller_ports(req)
    forbid(args, "fdngx gives each replica its own port; use --ports/--base-port", "--port")
    model, user_model = resolve_model(req, "--model-path", "--model")
    if req.dp_mode is DpMode.MOE:
        return _dp_attention(req, args, model, user_model)
    forbid(args, "fdngx runs --num-servers independent replicas instead; for DP attention (one server, its ranks "
           "behind one endpoint) use --dp-mode moe", *DP)
    if DPA in args:
        raise UsageError(f"engine argument {DPA} after -- needs --dp-size, which fdngx sets with --dp-mode moe "
                         "(SGLang refuses DP attention with dp-size 1)")
    tp = int_flag(args, *TP) or 1
    user_seqs = int_flag(args, "--max-running-requests")
    ports = plan_ports(req, metrics_on_api_port=True)
    slices = gpu_slices(req, tp, required=req.num_servers > 1)
    ours = _ours(req, args, model, user_model)
    procs, logs = [], []
    for i in range(req.num_servers):
        name = f"dp{i}"
        log = str(req.log_dir / f"{name}.log")
        argv = [req.python, "-m", MODULE, *ours, "--port", str(ports.api[i]), *_metrics(args), *args]
        env = {"CUDA_VISIBLE_DEVICES": slices[i]} if slices[i] is not None else {}
        procs.append(ProcSpec(name, argv, env, log, [name]))
        logs.append(log)
    instances = make_instances(req, ports, user_seqs or DEFAULT_MAX_NUM_SEQS, logs, guessed=user_seqs is None)
    return Launched(procs, instances, [], False)


def _dp_attention(req: LaunchRequest, args: list[str], model: str, user_model: bool) -> Launched:
    n = req.num_servers
    # python/sglang/srt/server_args.py, DP attention: "Please set a dp-size > 1 ... 1 < dp-size <= tp-size"
    # and `assert self.tp_size % self.dp_size == 0`.
    if n < 2:
        raise UsageError("--dp-mode moe needs --num-servers 2 or more: SGLang's DP attention needs dp-size > 1")
    dp = int_flag(args, *DP)
    if dp is not None and dp != n:
        raise UsageError(f"engine argument --dp-size {dp} after -- conflicts with --num-servers {n} "
                         "(--dp-mode moe: the DP-attention size)")
    tp = int_flag(args, *TP) or n
    if tp % n:
        raise UsageError(f"--dp-mode moe: SGLang needs --tp-size ({tp}) to be a multiple of the DP size "
                         f"(--num-servers {n}); its ranks share the --tp-size GPUs")
    one = replace(req, num_servers=1)
    if req.ports is not None and len(req.ports) != 1:
        raise UsageError(f"--dp-mode moe with --engine sglang serves its {n} ranks behind one endpoint: give one port "
                         f"in --ports, got {len(req.ports)}")
    ports = plan_ports(one, metrics_on_api_port=True)
    gpus = gpu_slices(one, tp, required=False)[0]
    user_seqs = int_flag(args, "--max-running-requests")
    mine = [] if find_flag(args, *TP) else ["--tp-size", str(tp)]
    mine += [] if dp is not None else ["--dp-size", str(n)]
    mine += [] if DPA in args else [DPA]
    log = str(req.log_dir / "dp0.log")
    argv = [req.python, "-m", MODULE, *_ours(req, args, model, user_model), "--port", str(ports.api[0]), *mine,
            *_metrics(args), *args]
    env = {"CUDA_VISIBLE_DEVICES": gpus} if gpus is not None else {}
    proc = ProcSpec("dp0", argv, env, log, ["dp0"])
    # SGLang balances its own ranks behind this one endpoint: the inventory has one instance for the group.
    instances = make_instances(one, ports, user_seqs or DEFAULT_MAX_NUM_SEQS, [log], [{"dp_ranks": n}],
                               guessed=user_seqs is None)
    return Launched([proc], instances, [], True)


def _ours(req: LaunchRequest, args: list[str], model: str, user_model: bool) -> list[str]:
    ours = [] if user_model else ["--model-path", model]
    if not find_flag(args, "--host"):
        ours += ["--host", bind_host(req)]
    return ours


def _metrics(args: list[str]) -> list[str]:
    # Without --enable-metrics SGLang serves no /metrics and the sidecar would see no load.
    return [] if "--enable-metrics" in args else ["--enable-metrics"]


SPEC = EngineSpec(
    name=Engine.SGLANG,
    build_launch=build_launch,
    module="sglang",
    metrics=MetricNames(
        running=("sglang:num_running_reqs",),
        queued=("sglang:num_queue_reqs",),
        kv_usage=("sglang:token_usage",),
        tpot=("sglang:inter_token_latency_seconds", "sglang:time_per_output_token_seconds"),
        queue_time=("sglang:queue_time_seconds",),
        # Each scheduler labels its gauges model_name, engine_type, tp_rank, pp_rank, moe_ep_rank (+ dp_rank with
        # --dp-size; observability/scheduler_metrics_mixin.py init_metrics). Only attn_tp_rank 0 sets the gauges
        # (every rank observes queue_time_seconds), unless --enable-metrics-for-all-schedulers (server_args.py):
        # then every TP rank of one batch (plain TP, or one DP-attention rank's attention-TP group) repeats it
        # under its own tp_rank and moe_ep_rank, as every attention-CP rank does without the flag (sglang#31896).
        # DP ranks (dp_rank) keep their own batches.
        one_per=("tp_rank", "moe_ep_rank"),
        # Pipeline stages (--pp-size, label pp_rank) are schedulers too, each with an attention-TP rank 0: every
        # stage gets every request from the one before it and queues and admits it in the same order
        # (managers/scheduler_pp_mixin.py event_loop_pp @ 00ff98d3), so each reports the whole waiting queue
        # and observes each wait once more; but running is len(self.running_batch.reqs) of the micro-batch
        # the stage is on (running_mbs[mb_id]), one share of the requests each: those add up.
        backlog_one_per=("pp_rank",),
        # --enable-priority-scheduling adds a `priority` label: each request gauge's total under priority=""
        # beside one series per priority class (observability/metrics_collector.py @ 016d8605,
        # SchedulerMetricsCollector._log_gauge_queue_count): the total is counted, not total + breakdown.
        gauge_one_per=("priority",),
    ),
    metrics_on_api_port=True,
    # http_server.py: /server_info; /get_server_info before it, now a deprecated alias that logs a WARNING
    # (served by every version: what a one-off scrape asks).
    capacity_info_paths=("/server_info", "/get_server_info"),
)
