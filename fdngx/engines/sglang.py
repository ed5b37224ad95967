"""SGLang: metrics on the API port (with --enable-metrics)."""

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
# SGLang sizes its batch from free memory when --max-running-requests is not given; this is the
# capacity fdngx assumes then (the sidecar's weights only use it relative to the other replicas).
DEFAULT_MAX_NUM_SEQS = 256
MODULE = "sglang.launch_server"


def build_launch(req: LaunchRequest) -> Launched:
    """One `python -m sglang.launch_server` per replica with its GPU slice; metrics on the API port."""
    args = list(req.extra_args)
    forbid(args, "fdngx gives each replica its own port; use --ports/--base-port", "--port")
    forbid(args, "fdngx runs --num-servers independent replicas instead", "--dp-size", "--data-parallel-size", "--dp")
    model, user_model = resolve_model(req, "--model-path", "--model")
    tp = int_flag(args, "--tp-size", "--tensor-parallel-size", "--tp") or 1
    max_num_seqs = int_flag(args, "--max-running-requests") or DEFAULT_MAX_NUM_SEQS
    ports = plan_ports(req, metrics_on_api_port=True)
    slices = gpu_slices(req, tp, required=req.num_servers > 1)
    ours = [] if user_model else ["--model-path", model]
    if not find_flag(args, "--host"):
        ours += ["--host", req.host]
    # Without --enable-metrics SGLang serves no /metrics and the sidecar would see no load.
    metrics = [] if "--enable-metrics" in args else ["--enable-metrics"]
    procs, logs = [], []
    for i in range(req.num_servers):
        name = f"dp{i}"
        log = str(req.log_dir / f"{name}.log")
        argv = [req.python, "-m", MODULE, *ours, "--port", str(ports.api[i]), *metrics, *args]
        env = {"CUDA_VISIBLE_DEVICES": slices[i]} if slices[i] is not None else {}
        procs.append(ProcSpec(name, argv, env, log, [name]))
        logs.append(log)
    return Launched(procs, make_instances(req, ports, max_num_seqs, logs), [], False)


SPEC = EngineSpec(
    name=Engine.SGLANG,
    build_launch=build_launch,
    module="sglang",
    metrics=MetricNames(
        running=("sglang:num_running_reqs",),
        queued=("sglang:num_queue_reqs",),
        kv_usage=("sglang:token_usage",),
        tpot=("sglang:inter_token_latency_seconds", "sglang:time_per_output_token_seconds"),
    ),
    metrics_on_api_port=True,
)
