"""The simulator (`fdngx sim`): it speaks FastDeploy's API and metric names; here are its launch command lines."""

from __future__ import annotations

from fdngx.domain import Engine
from fdngx.engines.argv import (
    DpMode,
    LaunchRequest,
    ProcSpec,
    bind_host,
    check_num_servers,
    find_flag,
    forbid,
    make_instances,
    parse_list,
    plan_ports,
    refuse_controller_ports,
)
from fdngx.engines.base import EngineSpec, Launched
from fdngx.engines.fastdeploy import SPEC as FASTDEPLOY
from fdngx.errors import UsageError

# `fdngx sim --max-num-seqs` default.
DEFAULT_MAX_NUM_SEQS = 64
# sim options that take one value or one per replica.
PER_REPLICA = ("--max-num-seqs", "--speed", "--max-concurrency")


def build_launch(req: LaunchRequest) -> Launched:
    """One `fdngx sim` hosting every replica (like multi_api_server; --dp-mode moe says so explicitly), or one
    per replica with --per-instance / --dp-mode independent.

    Run through `python -m fdngx.cli` so it works without the `fdngx` console script on PATH.
    """
    check_num_servers(req.num_servers)  # before the per-replica lists below
    args = list(req.extra_args)
    refuse_controller_ports(req)
    if req.per_instance and req.dp_mode is DpMode.MOE:
        raise UsageError("--per-instance conflicts with --dp-mode moe: the simulator runs the ranks of one group in "
                         "one process, like multi_api_server")
    independent = req.per_instance or req.dp_mode is DpMode.INDEPENDENT
    forbid(args, "fdngx plans the ports; use --ports/--base-port and --metrics-ports/--metrics-base-port",
           "--ports", "--metrics-ports")
    per_replica = {flag: _per_replica(args, flag, req.num_servers) for flag in PER_REPLICA}
    seqs = per_replica["--max-num-seqs"] or [str(DEFAULT_MAX_NUM_SEQS)] * req.num_servers
    max_num_seqs = [_positive(v, "--max-num-seqs") for v in seqs]
    ports = plan_ports(req, metrics_on_api_port=False)
    head = [req.python, "-m", "fdngx.cli", "sim"]
    host = [] if find_flag(args, "--host") else ["--host", bind_host(req)]
    if not independent:
        log = str(req.log_dir / "sim.log")
        argv = [*head, *host, "--ports", _csv(ports.api), "--metrics-ports", _csv(ports.metrics), *args]
        names = [f"dp{i}" for i in range(req.num_servers)]
        instances = make_instances(req, ports, max_num_seqs, [log] * req.num_servers)
        return Launched([ProcSpec("sim", argv, {}, log, names)], instances, [], True)
    procs, logs = [], []
    for i in range(req.num_servers):
        name = f"dp{i}"
        log = str(req.log_dir / f"{name}.log")
        mine = list(args)
        for flag, values in per_replica.items():
            if values and len(set(values)) > 1:
                mine = [*_without(mine, flag), flag, values[i]]
        argv = [*head, *host, "--ports", str(ports.api[i]), "--metrics-ports", str(ports.metrics[i]), *mine]
        procs.append(ProcSpec(name, argv, {}, log, [name]))
        logs.append(log)
    return Launched(procs, make_instances(req, ports, max_num_seqs, logs), [], False)


def _csv(ports: list[int]) -> str:
    return ",".join(map(str, ports))


def _per_replica(args: list[str], flag: str, n: int) -> list[str] | None:
    """`--speed 1.0,0.5`: one value for all or one per replica; with --per-instance each process gets its own."""
    hit = find_flag(args, flag)
    if hit is None:
        return None
    values = parse_list(hit[1], f"engine argument {flag}")
    if len(values) == 1:
        return values * n
    if len(values) != n:
        raise UsageError(f"engine argument {flag} lists {len(values)} values but --num-servers is {n}")
    return values


def _positive(text: str, flag: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise UsageError(f"engine argument {flag} must be a positive integer, got {text!r}")
    return int(text)


def _without(args: list[str], flag: str) -> list[str]:
    out, skip = [], False
    for tok in args:
        if skip:
            skip = False
        elif tok == flag:
            skip = True
        elif not tok.startswith(flag + "="):
            out.append(tok)
    return out


# The simulator speaks FastDeploy's API and metric names exactly; it starts in seconds, not minutes.
SPEC = EngineSpec(
    name=Engine.SIM,
    metrics=FASTDEPLOY.metrics,
    build_launch=build_launch,
    default_timeout=60.0,
    health_path=FASTDEPLOY.health_path,
)
