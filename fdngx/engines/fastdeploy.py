"""FastDeploy: metric names from fastdeploy/metrics/metrics.py (see shared/reference/fastdeploy.md)."""

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
    int_flag,
    make_instances,
    parse_ports,
    plan_ports,
    resolve_model,
    two_token,
)
from fdngx.engines.base import EngineSpec, Launched, MetricNames
from fdngx.errors import UsageError

# -- launch ----------------------------------------------------------------------------------------------
# The builders below turn a LaunchRequest into exact command lines; see shared/reference/fastdeploy.md.

MULTI_MODULE = "fastdeploy.entrypoints.openai.multi_api_server"
SERVER_MODULE = "fastdeploy.entrypoints.openai.api_server"
# FastDeploy's own default when --max-num-seqs is not given.
DEFAULT_MAX_NUM_SEQS = 8
# Engine worker queue ports: one per rank, a fixed offset above the API ports (see _offset_ports).
QUEUE_OFFSET = 2000
# --per-instance: each api_server's cache queue port, a fixed offset above its API port. Older FastDeploy
# defaults every server to the same one (fastdeploy/engine/args_utils.py, EngineArgs: `cache_queue_port: int =
# 8003`; newer builds: "0", a free port), so a second replica with prefix caching on could not start.
CACHE_QUEUE_OFFSET = 3000
# Every flag fdngx reads or adds. multi_api_server finds --engine-worker-queue-port by its exact token
# (fastdeploy/entrypoints/openai/multi_api_server.py, start_servers: `server_args[i] ==
# "--engine-worker-queue-port"`; newer builds treat --cache-queue-port and --pd-comm-port alike), so the
# `--flag=value` form would slip past it: fdngx passes all of them as two tokens. `-tp` is FastDeploy's
# alias of --tensor-parallel-size (fastdeploy/engine/args_utils.py).
READ = (
    "--model", "--host", "--tensor-parallel-size", "-tp", "--data-parallel-size", "--max-num-seqs",
    "--engine-worker-queue-port", "--cache-queue-port", "--pd-comm-port", "--rdma-comm-ports", "--router",
)
# Comma lists with one port per rank inside multi_api_server's --args (each child takes its own entry).
PER_RANK_PORTS = ("--cache-queue-port", "--pd-comm-port")
# One port per GPU of every rank: rank i takes entries i*tp .. (i+1)*tp - 1 (fastdeploy/config.py
# postprocess: local_rdma_comm_ports; FastDeploy's config test gives rank 2 of dp 4 x tp 2 the 5th and 6th).
PER_GPU_PORTS = ("--rdma-comm-ports",)


def build_launch(req: LaunchRequest) -> Launched:
    """multi_api_server (one process group, ranks fail together) or, with --per-instance / --dp-mode
    independent, one api_server each."""
    args = two_token(req.extra_args, *READ)
    if "--args" in args:
        raise UsageError("engine argument --args after -- conflicts with fdngx: fdngx builds multi_api_server's --args")
    forbid(args, "fdngx sets it per replica; use --ports/--base-port, --metrics-ports/--metrics-base-port and "
           "--controller-ports", "--port", "--metrics-port", "--controller-port", "--local-data-parallel-id")
    forbid(args, "it is an fdngx launch option (before --), not an api_server flag",
           "--ports", "--metrics-ports", "--num-servers", "--controller-ports")
    if req.per_instance and req.dp_mode is DpMode.MOE:
        raise UsageError("--per-instance conflicts with --dp-mode moe: one multi_api_server runs the ranks of a "
                         "data-parallel group; --per-instance starts independent replicas")
    independent = req.per_instance or req.dp_mode is DpMode.INDEPENDENT
    model, user_model = resolve_model(req, "--model")
    tp = int_flag(args, "--tensor-parallel-size", "-tp") or 1
    dp = int_flag(args, "--data-parallel-size")
    max_num_seqs = int_flag(args, "--max-num-seqs") or DEFAULT_MAX_NUM_SEQS
    if not independent and dp is not None and dp != req.num_servers:
        raise UsageError(
            f"engine argument --data-parallel-size {dp} after -- conflicts with --num-servers {req.num_servers}"
        )
    if independent:
        _check_independent(args, dp)
    ports = plan_ports(req, metrics_on_api_port=False)
    controller = _controller_ports(req)
    queue = _rank_list(req, args, "--engine-worker-queue-port") or _offset_ports(
        ports.api, QUEUE_OFFSET, "--engine-worker-queue-port", "" if independent else ", or pass it after --")
    # FastDeploy refuses to start on CUDA without CUDA_VISIBLE_DEVICES, so fdngx never guesses.
    slices = gpu_slices(req, tp, required=True)
    fd_log_dir = str(req.log_dir / "fastdeploy")

    ours: list[str] = []
    if not user_model:
        ours += ["--model", model]
    if find_flag(args, "--host") is None:
        ours += ["--host", bind_host(req)]
    if req.router is not None and find_flag(args, "--router") is None:
        ours += ["--router", req.router]

    if not independent:
        if dp is None:
            ours += ["--data-parallel-size", str(req.num_servers)]
        if find_flag(args, "--engine-worker-queue-port") is None:
            ours += ["--engine-worker-queue-port", ",".join(map(str, queue))]
        more_ports = [p for flag in PER_RANK_PORTS for p in _rank_list(req, args, flag)]
        more_ports += [p for flag in PER_GPU_PORTS for p in _rank_list(req, args, flag, per_rank=tp)]
        log = str(req.log_dir / "multi_api_server.log")
        argv = [
            req.python, "-m", MULTI_MODULE,
            "--num-servers", str(req.num_servers),
            "--ports", ",".join(map(str, ports.api)),
            # Without metrics ports the children serve /metrics from a forked web worker whose gauges read 0.
            "--metrics-ports", ",".join(map(str, ports.metrics)),
            *(["--controller-ports", ",".join(map(str, controller))] if controller else []),
            # --args must be last: multi_api_server hands every token after it to each child verbatim.
            "--args", *args, *ours,
        ]
        env = {
            # Exactly tp x N GPUs: FastDeploy takes its ranks' devices from this list (child 0 starts every
            # rank's workers) and 2.x asserts its length is tp x dp; further --gpus stay free.
            "CUDA_VISIBLE_DEVICES": ",".join(s for s in slices if s),
            "FD_LOG_DIR": fd_log_dir,
            "FD_ENABLE_MULTI_API_SERVER": "1",
        }
        names = [f"dp{i}" for i in range(req.num_servers)]
        # It stops its ranks only on KeyboardInterrupt: SIGINT to stop it, and as its parent-death signal.
        # It starts each rank with subprocess.Popen and then only sleeps (multi_api_server.py, main): a rank
        # that dies is never noticed by it.
        proc = ProcSpec("multi_api_server", argv, env, log, names, stop_signal="SIGINT", unreaped_ranks=True)
        extra = [{"fd_log_dir": f"{fd_log_dir}/log_{i}", **_controller_extra(controller, i)}
                 for i in range(req.num_servers)]
        instances = make_instances(req, ports, max_num_seqs, [log] * req.num_servers, extra)
        return Launched([proc], instances, queue + controller + more_ports, True)

    cache = _offset_ports(ports.api, CACHE_QUEUE_OFFSET, "--cache-queue-port")
    procs, logs = [], []
    for i in range(req.num_servers):
        name = f"dp{i}"
        log = str(req.log_dir / f"{name}.log")
        argv = [
            req.python, "-m", SERVER_MODULE, *args, *ours,
            "--port", str(ports.api[i]),
            "--metrics-port", str(ports.metrics[i]),
            "--engine-worker-queue-port", str(queue[i]),
            "--cache-queue-port", str(cache[i]),
            *(["--controller-port", str(controller[i])] if controller else []),
        ]
        env = {"CUDA_VISIBLE_DEVICES": slices[i] or "", "FD_LOG_DIR": f"{fd_log_dir}/{name}"}
        # api_server.py's main() returns (status 0) when its engine fails to load, and its worker monitor sends
        # the server SIGINT (a clean uvicorn shutdown) when the GPU worker dies: an exit 0 is no clean stop here.
        procs.append(ProcSpec(name, argv, env, log, [name], exit_0_fails=True))
        logs.append(log)
    extra = [_controller_extra(controller, i) for i in range(req.num_servers)]
    return Launched(procs, make_instances(req, ports, max_num_seqs, logs, extra), queue + cache + controller,
                    False)


def _check_independent(args: list[str], dp: int | None) -> None:
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
    for flag in (*PER_RANK_PORTS, *PER_GPU_PORTS):
        if find_flag(args, flag) is not None:
            raise UsageError(f"engine argument {flag} after -- conflicts with --per-instance: every replica would "
                             "get the same port; leave it out (fdngx gives each replica its own cache queue port, "
                             "and FastDeploy picks the others)")


def _controller_ports(req: LaunchRequest) -> list[int]:
    """--controller-ports: one per server (multi_api_server's own option, which hands child i
    `--controller-port C_i`); [] when not given (multi_api_server's default -1: no controller)."""
    if req.controller_ports is None:
        return []
    if len(req.controller_ports) != req.num_servers:
        raise UsageError(f"--controller-ports lists {len(req.controller_ports)} port(s) but --num-servers is "
                         f"{req.num_servers}")
    return list(req.controller_ports)


def _controller_extra(controller: list[int], i: int) -> dict[str, int]:
    return {"controller_port": controller[i]} if controller else {}


def _rank_list(req: LaunchRequest, args: list[str], flag: str, per_rank: int = 1) -> list[int]:
    """A user's per-rank port list (`per_rank` entries per server): checked and returned, so it is pre-checked
    free."""
    hit = find_flag(args, flag)
    if hit is None:
        return []
    ports = parse_ports(hit[1], f"engine argument {flag}")
    if len(ports) != req.num_servers * per_rank:
        each = f" x --tensor-parallel-size {per_rank}" if per_rank > 1 else ""
        raise UsageError(f"engine argument {flag} lists {len(ports)} port(s) but --num-servers is "
                         f"{req.num_servers}{each}")
    return ports


def _offset_ports(api: list[int], offset: int, flag: str, hint: str = "") -> list[int]:
    """One port per replica at a fixed offset above its API port: known, checked free beforehand, and stable
    across restarts (old multi_api_server builds crash without --engine-worker-queue-port, newer ones pick
    free ports)."""
    ports = [p + offset for p in api]
    for p in ports:
        if p > 65535:
            raise UsageError(f"{flag} {p} (API port + {offset}) is out of range: lower --ports/--base-port{hint}")
    return ports


SPEC = EngineSpec(
    name=Engine.FASTDEPLOY,
    build_launch=build_launch,
    module="fastdeploy",
    registers=True,
    metrics=MetricNames(
        running=("fastdeploy:num_requests_running",),
        queued=("fastdeploy:num_requests_waiting",),
        kv_usage=("fastdeploy:gpu_cache_usage_perc",),
        capacity=("fastdeploy:max_batch_size",),
        tpot=("fastdeploy:time_per_output_token_seconds",),
        queue_time=("fastdeploy:request_queue_time_seconds",),
        # common_engine.py _insert_zmq_task_to_scheduler: requests_number.inc() as the engine takes a request;
        # output/token_processor.py _record_completion_metrics: request_success_total.inc() as one finishes.
        received=("fastdeploy:requests_number_total",),
        finished=("fastdeploy:request_success_total",),
        # PaddlePaddle/FastDeploy PR #5798 (fastdeploy/metrics/metrics.py): num_requests_enqueued, the requests
        # in the local scheduler not yet taken by the engine; its CI test tests/ci_use/metrics/test_metrics.py
        # asserts enqueued + waiting == the requests not running. `num_requests_queuing` is the name a 2026-04
        # pull request gave it (in no source read): read where a build serves it instead.
        scheduler_queue=("fastdeploy:num_requests_enqueued", "fastdeploy:num_requests_queuing"),
    ),
)
