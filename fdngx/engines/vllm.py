"""vLLM: metrics on the API port; KV usage was renamed in v1."""

from __future__ import annotations

from fdngx.domain import Engine
from fdngx.engines.argv import (
    LaunchRequest,
    ProcSpec,
    find_flag,
    forbid,
    gpu_slices,
    int_flag,
    make_instances,
    plan_ports,
    resolve_model,
)
from fdngx.engines.base import EngineSpec, Launched, MetricNames

# -- launch ----------------------------------------------------------------------------------------------
# vLLM's scheduler default for the OpenAI server when --max-num-seqs is not given.
DEFAULT_MAX_NUM_SEQS = 256


def build_launch(req: LaunchRequest) -> Launched:
    """One `vllm serve` per replica, each with its own GPU slice and port; metrics on the API port."""
    args = list(req.extra_args)
    forbid(args, "fdngx gives each replica its own port; use --ports/--base-port", "--port")
    forbid(args, "fdngx runs --num-servers independent replicas instead", "--data-parallel-size", "-dp")
    model, user_model = resolve_model(req, "--model")
    tp = int_flag(args, "--tensor-parallel-size", "-tp") or 1
    max_num_seqs = int_flag(args, "--max-num-seqs") or DEFAULT_MAX_NUM_SEQS
    ports = plan_ports(req, metrics_on_api_port=True)
    slices = gpu_slices(req, tp, required=req.num_servers > 1)
    host = [] if find_flag(args, "--host") else ["--host", req.host]
    procs, logs = [], []
    for i in range(req.num_servers):
        name = f"dp{i}"
        log = str(req.log_dir / f"{name}.log")
        head = ["vllm", "serve"] if user_model else ["vllm", "serve", model]
        argv = [*head, *host, "--port", str(ports.api[i]), *args]
        env = {"CUDA_VISIBLE_DEVICES": slices[i]} if slices[i] is not None else {}
        procs.append(ProcSpec(name, argv, env, log, [name]))
        logs.append(log)
    return Launched(procs, make_instances(req, ports, max_num_seqs, logs), [], False)


SPEC = EngineSpec(
    name=Engine.VLLM,
    build_launch=build_launch,
    command="vllm",
    metrics=MetricNames(
        running=("vllm:num_requests_running",),
        queued=("vllm:num_requests_waiting",),
        kv_usage=("vllm:kv_cache_usage_perc", "vllm:gpu_cache_usage_perc"),
        tpot=("vllm:inter_token_latency_seconds", "vllm:time_per_output_token_seconds"),
    ),
    metrics_on_api_port=True,
)
