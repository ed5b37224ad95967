"""What every engine's launch builder shares: the request, the process spec, and argv/port helpers.

Pure: nothing here starts a process or binds a port. An engine module (fdngx.engines.<engine>) turns a
LaunchRequest into ProcSpecs and inventory instances with these; fdngx.launch.plan asks it to.
"""

from __future__ import annotations

import shlex
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fdngx.domain import Engine, Instance, Restart, StrEnum
from fdngx.errors import UsageError, check_number

DEFAULT_BASE_PORT = 8001
DEFAULT_HOST = "127.0.0.1"
# Metrics ports sit a fixed offset above the API ports, so `8003` and `9003` are visibly the same replica.
METRICS_OFFSET = 1000
# --num-servers: replicas one launch plans (the registry's default --registry-max-instances is the same). Each
# needs its own API port and, for fastdeploy and sim, a metrics port: the port space alone stops below 32768,
# and far fewer server processes fit on one host. Checked before any engine builds a list per replica (-n 1e20
# built a list of that length: a MemoryError, or OOM-killed at 24 GB).
MAX_SERVERS = 1024


# Environment a rank must not inherit from fdngx's: shared by every rank, it mixes their state. With
# PROMETHEUS_MULTIPROC_DIR set, prometheus_client sums the counters of every process writing to that
# directory: N ranks sharing one would each report the sum, and the request counters fdngx reads a backlog
# from would be N ranks' worth. Unset, every engine makes a private one per server (FastDeploy:
# fastdeploy/metrics/prometheus_multiprocess_setup.py setup_multiprocess_prometheus; vLLM's
# setup_multiprocess_prometheus, which asks to "Unset the variable"; SGLang a temporary one per server).
RANK_PRIVATE_ENV = ("PROMETHEUS_MULTIPROC_DIR",)


class DpMode(StrEnum):
    """independent: replicas that share nothing (any model); moe: the ranks of ONE data-parallel group of a
    MoE model (attention data-parallel, experts shared across ranks), which fail together."""

    INDEPENDENT = "independent"
    MOE = "moe"


# Seconds of error answers to /health (4xx/5xx) before a running instance counts as lost (fdngx.launch.ranks).
UNHEALTHY_AFTER = 120.0


@dataclass
class LaunchRequest:
    """What the user asked for, already parsed (the CLI fills it, tests build it directly)."""

    engine: Engine
    num_servers: int
    model: str | None = None
    gpus: list[str] | None = None
    # None: not given (the plan picks 127.0.0.1, or 0.0.0.0 with --router); the builders see the decision.
    host: str | None = None
    # The address the inventory names (nginx and other nodes connect to it); None: the plan decides.
    advertise_host: str | None = None
    router: str | None = None
    controller_ports: list[int] | None = None
    # None: the engine's own default (fastdeploy: multi_api_server, a moe group; the others: independent).
    dp_mode: DpMode | None = None
    ports: list[int] | None = None
    metrics_ports: list[int] | None = None
    base_port: int | None = None
    metrics_base_port: int | None = None
    extra_args: list[str] = field(default_factory=list)
    per_instance: bool = False
    inventory: Path = Path("fdngx.json")
    log_dir: Path | None = None
    timeout: float | None = None
    restart: Restart = Restart.NO
    grace: float = 15.0
    unhealthy_after: float = UNHEALTHY_AFTER
    # Prepended to every instance name (dp0 -> node1-dp0): one launch per node, merged inventories stay unique.
    name_prefix: str = ""
    # The interpreter for `python -m ...` engines: the one running fdngx, so its packages are the engine's.
    python: str = sys.executable


@dataclass
class ProcSpec:
    """One process to start in its own session; it serves the inventory instances named in `instances`."""

    name: str
    argv: list[str]
    env: dict[str, str]
    log: str
    instances: list[str]
    # multi_api_server only stops its children on SIGINT (its Ctrl-C path); everything else takes SIGTERM.
    stop_signal: str = "SIGTERM"
    # Its ranks are child processes it never waits for (multi_api_server): a rank that exits stays a zombie,
    # the only sign of its death, while the launcher sleeps on.
    unreaped_ranks: bool = False
    # It exits 0 when it fails too (FastDeploy's api_server), so --restart on-failure restarts it after any exit
    # fdngx did not ask for.
    exit_0_fails: bool = False

    def command_line(self) -> str:
        env = " ".join(f"{k}={shlex.quote(v)}" for k, v in self.env.items())
        return f"{env} {shlex.join(self.argv)}" if env else shlex.join(self.argv)


def bind_host(req: LaunchRequest) -> str:
    return req.host or DEFAULT_HOST


def two_token(args: Sequence[str], *names: str) -> list[str]:
    """`--flag=value` -> `--flag value` for `names` (before any `--`). Some launchers match a flag by its exact
    token (multi_api_server's --engine-worker-queue-port): the = form would pass by them unseen."""
    out: list[str] = []
    for i, tok in enumerate(args):
        if tok == "--":
            return out + list(args[i:])
        flag, eq, value = tok.partition("=")
        out += [flag, value] if eq and flag in names else [tok]
    return out


def check_num_servers(n: int) -> None:
    check_number("--num-servers", n, 1, MAX_SERVERS, "replicas", whole=True)


def parse_list(text: str, what: str) -> list[str]:
    items = [s.strip() for s in text.split(",")]
    if not text.strip() or any(not s for s in items):
        raise UsageError(f"{what} must be a comma-separated list like 0,1,2, got {text!r}")
    return items


def parse_ports(text: str, what: str) -> list[int]:
    ports = []
    for item in parse_list(text, what):
        if not item.isdigit() or not 1 <= int(item) <= 65535:
            raise UsageError(f"{what}: {item!r} is not a port number 1..65535")
        ports.append(int(item))
    return ports


def find_flag(args: Sequence[str], *names: str) -> tuple[str, str] | None:
    """The (flag, value) the user passed for any of `names` (`--x v` or `--x=v`); the last one wins, as in argparse."""
    found = None
    for i, tok in enumerate(args):
        if tok == "--":
            break
        for name in names:
            if tok == name:
                if i + 1 >= len(args):
                    raise UsageError(f"engine argument {name} after -- has no value")
                found = (name, args[i + 1])
            elif tok.startswith(name + "="):
                found = (name, tok[len(name) + 1 :])
    return found


def has_flag(args: Sequence[str], *names: str) -> bool:
    """Is any of `names` (a flag with or without a value) among the engine arguments before any `--`?"""
    for tok in args:
        if tok == "--":
            return False
        if tok.split("=", 1)[0] in names:
            return True
    return False


def int_flag(args: Sequence[str], *names: str) -> int | None:
    hit = find_flag(args, *names)
    if hit is None:
        return None
    try:
        return int(hit[1])
    except ValueError:
        raise UsageError(f"engine argument {hit[0]} after -- must be an integer, got {hit[1]!r}") from None


def forbid(args: Sequence[str], why: str, *names: str) -> None:
    """Flags fdngx sets per replica: a user value would silently fight ours, so refuse it by name."""
    for name in names:
        if find_flag(args, name) is not None:
            raise UsageError(f"engine argument {name} after -- conflicts with fdngx: {why}")


def resolve_model(req: LaunchRequest, *user_flags: str) -> tuple[str, bool]:
    """(model, user_passed_it): --model and a model flag after -- must agree; one of them is required."""
    user = find_flag(req.extra_args, *user_flags)
    if user and req.model and user[1] != req.model:
        raise UsageError(f"--model {req.model} conflicts with engine argument {user[0]} {user[1]} after --")
    model = req.model or (user[1] if user else None)
    if not model:
        raise UsageError(f"--model is required for --engine {req.engine}")
    return model, user is not None


def gpu_slices(req: LaunchRequest, per_replica: int, required: bool) -> list[str | None]:
    """CUDA_VISIBLE_DEVICES per replica: consecutive slices of --gpus, `per_replica` GPUs each."""
    if not req.gpus:
        if required:
            raise UsageError(
                f"--gpus is required for --engine {req.engine} with {req.num_servers} replicas: "
                "each needs its own GPUs (e.g. --gpus 0,1,2,3)"
            )
        return [None] * req.num_servers
    need = per_replica * req.num_servers
    if len(req.gpus) < need:
        raise UsageError(
            f"--gpus lists {len(req.gpus)} GPU(s) but {req.num_servers} replicas x {per_replica} GPU(s) need {need}"
        )
    return [",".join(req.gpus[i * per_replica : (i + 1) * per_replica]) for i in range(req.num_servers)]


@dataclass
class Ports:
    api: list[int]
    metrics: list[int]


def plan_ports(req: LaunchRequest, metrics_on_api_port: bool) -> Ports:
    """API and metrics ports: explicit lists win, else consecutive ports from the base ports."""
    n = req.num_servers
    check_num_servers(n)
    for what, first in (("--base-port", req.base_port), ("--metrics-base-port", req.metrics_base_port)):
        if first is not None:
            check_number(what, first, 1, 65535, "a port", whole=True)
    if req.ports is not None and req.base_port is not None:
        raise UsageError("--ports and --base-port exclude each other: give one")
    if req.metrics_ports is not None and req.metrics_base_port is not None:
        raise UsageError("--metrics-ports and --metrics-base-port exclude each other: give one")
    if req.ports is not None:
        api = list(req.ports)
    else:
        base = DEFAULT_BASE_PORT if req.base_port is None else req.base_port
        api = [base + i for i in range(n)]
    if len(api) != n:
        raise UsageError(f"--ports lists {len(api)} port(s) but --num-servers is {n}")
    if metrics_on_api_port:
        if req.metrics_ports is not None or req.metrics_base_port is not None:
            raise UsageError(f"--engine {req.engine} serves metrics on its API port: drop --metrics-ports/-base-port")
        metrics = list(api)
    elif req.metrics_ports is not None:
        metrics = list(req.metrics_ports)
        if len(metrics) != n:
            raise UsageError(f"--metrics-ports lists {len(metrics)} port(s) but --num-servers is {n}")
    elif req.metrics_base_port is not None:
        metrics = [req.metrics_base_port + i for i in range(n)]
    else:
        metrics = [p + METRICS_OFFSET for p in api]
    for p in api + metrics:
        if not 1 <= p <= 65535:
            raise UsageError(f"port {p} is out of range 1..65535 (lower --base-port/--metrics-base-port)")
    check_distinct(api + (metrics if not metrics_on_api_port else []), "API and metrics ports together")
    return Ports(api, metrics)


def check_distinct(ports: list[int], what: str) -> None:
    seen: set[int] = set()
    for p in ports:
        if p in seen:
            raise UsageError(f"port {p} is planned twice ({what}): choose other --ports/--metrics-ports")
        seen.add(p)


def make_instances(
    req: LaunchRequest,
    ports: Ports,
    max_num_seqs: int | list[int],
    logs: list[str],
    extra: list[dict[str, Any]] | None = None,
    guessed: bool = False,
) -> list[Instance]:
    """The inventory entries: named by the advertised host. `guessed`: max_num_seqs is fdngx's guess, not the
    engine's known setting (the inventory says `capacity_guessed: true`; the scraper then trusts what the
    engine reports, or the peak of running requests it saw, over the guess)."""
    out = []
    seqs = max_num_seqs if isinstance(max_num_seqs, list) else [max_num_seqs] * req.num_servers
    host = req.advertise_host or bind_host(req)
    for i in range(req.num_servers):
        more = {"log": logs[i], **(extra[i] if extra else {})}
        if guessed:
            more["capacity_guessed"] = True
        out.append(Instance(f"dp{i}", host, ports.api[i], ports.metrics[i], req.engine, seqs[i], extra=more))
    return out


def refuse_controller_ports(req: LaunchRequest) -> None:
    if req.controller_ports is not None:
        raise UsageError(f"--controller-ports is a FastDeploy option; --engine {req.engine} has no controller port")


