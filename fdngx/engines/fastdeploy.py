"""FastDeploy: metric names from fastdeploy/metrics/metrics.py (see shared/reference/fastdeploy.md)."""

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
    parse_ports,
    plan_ports,
    resolve_model,
)
from fdngx.engines.base import EngineSpec, Launched, MetricNames
from fdngx.errors import UsageError

# -- launch ----------------------------------------------------------------------------------------------
# The builders below turn a LaunchRequest into exact command lines; see shared/reference/fastdeploy.md.

MULTI_MODULE = "fastdeploy.entrypoints.openai.multi_api_server"
SERVER_MODULE = "fastdeploy.entrypoints.openai.api_server"
# FastDeploy's own default when --max-num-seqs is not given.
DEFAULT_MAX_NUM_SEQS = 8
# Engine worker queue ports: one per rank, a fixed offset above the API ports (see _queue_ports).
QUEUE_OFFSET = 2000


def build_launch(req: LaunchRequest) -> Launched:
    """multi_api_server (one process group, ranks fail together) or, with --per-instance, one api_server each."""
    args = list(req.extra_args)
    if "--args" in args:
        raise UsageError("engine argument --args after -- conflicts with fdngx: fdngx builds multi_api_server's --args")
    forbid(args, "fdngx sets it per replica; use --ports/--base-port and --metrics-ports/--metrics-base-port",
           "--port", "--metrics-port", "--controller-port", "--local-data-parallel-id")
    forbid(args, "it is an fdngx launch option (before --), not an api_server flag",
           "--ports", "--metrics-ports", "--num-servers", "--controller-ports")
    model, user_model = resolve_model(req, "--model")
    tp = int_flag(args, "--tensor-parallel-size") or 1
    dp = int_flag(args, "--data-parallel-size")
    max_num_seqs = int_flag(args, "--max-num-seqs") or DEFAULT_MAX_NUM_SEQS
    if not req.per_instance and dp is not None and dp != req.num_servers:
        raise UsageError(
            f"engine argument --data-parallel-size {dp} after -- conflicts with --num-servers {req.num_servers}"
        )
    ports = plan_ports(req, metrics_on_api_port=False)
    queue = _queue_ports(req, args, ports.api)
    # FastDeploy refuses to start on CUDA without CUDA_VISIBLE_DEVICES, so fdngx never guesses.
    slices = gpu_slices(req, tp, required=True)
    fd_log_dir = str(req.log_dir / "fastdeploy")

    ours: list[str] = []
    if not user_model:
        ours += ["--model", model]
    if find_flag(args, "--host") is None:
        ours += ["--host", req.host]

    if not req.per_instance:
        if dp is None:
            ours += ["--data-parallel-size", str(req.num_servers)]
        if find_flag(args, "--engine-worker-queue-port") is None:
            ours += ["--engine-worker-queue-port", ",".join(map(str, queue))]
        log = str(req.log_dir / "multi_api_server.log")
        argv = [
            req.python, "-m", MULTI_MODULE,
            "--num-servers", str(req.num_servers),
            "--ports", ",".join(map(str, ports.api)),
            # Without metrics ports the children serve /metrics from a forked web worker whose gauges read 0.
            "--metrics-ports", ",".join(map(str, ports.metrics)),
            # --args must be last: multi_api_server hands every token after it to each child verbatim.
            "--args", *args, *ours,
        ]
        env = {
            "CUDA_VISIBLE_DEVICES": ",".join(req.gpus or []),
            "FD_LOG_DIR": fd_log_dir,
            "FD_ENABLE_MULTI_API_SERVER": "1",
        }
        names = [f"dp{i}" for i in range(req.num_servers)]
        proc = ProcSpec("multi_api_server", argv, env, log, names, stop_signal="SIGINT")
        extra = [{"fd_log_dir": f"{fd_log_dir}/log_{i}"} for i in range(req.num_servers)]
        instances = make_instances(req, ports, max_num_seqs, [log] * req.num_servers, extra)
        return Launched([proc], instances, queue, True)

    if dp not in (None, 1):
        raise UsageError(
            f"engine argument --data-parallel-size {dp} after -- conflicts with --per-instance "
            "(independent replicas; --num-servers sets how many)"
        )
    if find_flag(args, "--engine-worker-queue-port") is not None:
        raise UsageError(
            "engine argument --engine-worker-queue-port after -- conflicts with --per-instance: fdngx gives each "
            f"replica its own (API port + {QUEUE_OFFSET})"
        )
    procs, logs = [], []
    for i in range(req.num_servers):
        name = f"dp{i}"
        log = str(req.log_dir / f"{name}.log")
        argv = [
            req.python, "-m", SERVER_MODULE, *args, *ours,
            "--port", str(ports.api[i]),
            "--metrics-port", str(ports.metrics[i]),
            "--engine-worker-queue-port", str(queue[i]),
        ]
        env = {"CUDA_VISIBLE_DEVICES": slices[i] or "", "FD_LOG_DIR": f"{fd_log_dir}/{name}"}
        procs.append(ProcSpec(name, argv, env, log, [name]))
        logs.append(log)
    return Launched(procs, make_instances(req, ports, max_num_seqs, logs), queue, False)


def _queue_ports(req: LaunchRequest, args: list[str], api: list[int]) -> list[int]:
    """Engine worker queue ports: the user's list (one per rank) or API port + QUEUE_OFFSET.

    Old multi_api_server builds crash when the flag is missing, newer ones pick free ports; fdngx always
    passes it so the ports are known, checked free beforehand, and stable across restarts.
    """
    user = find_flag(args, "--engine-worker-queue-port")
    if user is not None:
        ports = parse_ports(user[1], "engine argument --engine-worker-queue-port")
        if len(ports) != req.num_servers:
            raise UsageError(
                f"engine argument --engine-worker-queue-port lists {len(ports)} port(s) but --num-servers is "
                f"{req.num_servers}"
            )
        return ports
    ports = [p + QUEUE_OFFSET for p in api]
    for p in ports:
        if p > 65535:
            raise UsageError(f"engine worker queue port {p} is out of range: pass --engine-worker-queue-port after --")
    return ports


SPEC = EngineSpec(
    name=Engine.FASTDEPLOY,
    build_launch=build_launch,
    module="fastdeploy",
    metrics=MetricNames(
        running=("fastdeploy:num_requests_running",),
        queued=("fastdeploy:num_requests_waiting", "fastdeploy:num_requests_queuing"),
        kv_usage=("fastdeploy:gpu_cache_usage_perc",),
        capacity=("fastdeploy:max_batch_size",),
        tpot=("fastdeploy:time_per_output_token_seconds",),
        queued_marker="fastdeploy:num_requests_queuing",
    ),
)
