"""`fdngx launch` and `fdngx stop`: option parsing only; the work is in fdngx.plan / launch / supervise."""

from __future__ import annotations

import sys
from pathlib import Path

import typer

from fdngx import engines
from fdngx.commands.helptext import examples
from fdngx.commands.options import DEFAULT_INVENTORY
from fdngx.domain import Engine, Restart
from fdngx.engines.argv import (
    DEFAULT_BASE_PORT,
    MAX_SERVERS,
    METRICS_OFFSET,
    UNHEALTHY_AFTER,
    DpMode,
    LaunchRequest,
    parse_list,
    parse_ports,
)
from fdngx.launch import run as core
from fdngx.launch.plan import build_plan, check_grace

TIMEOUTS = ", ".join(f"{e.value} {engines.spec(e).default_timeout:.0f}" for e in Engine)
EPILOG = (
    examples(
        ("8 FastDeploy API servers, one per GPU; engine arguments after --",
         "fdngx launch --engine fastdeploy --num-servers 8 --gpus 0,1,2,3,4,5,6,7 \n--model M -- --max-num-seqs 64"),
        ("4 simulated replicas in the background (then fdngx render; fdngx stop)",
         "fdngx launch --engine sim --num-servers 4 --detach"),
    ).rstrip()
)
STOP_EPILOG = (
    examples(
        ("the supervisor and every replica it started", "fdngx stop -i /etc/fdngx/fdngx.json"),
        ("60 s between the stop signal and SIGKILL", "fdngx stop -i /etc/fdngx/fdngx.json --grace 60"),
    ) +
    "The pidfile is <inventory>.pid, beside the file a symlinked inventory points to; when there is none, the "
    "one an older fdngx wrote beside the link's own name (said). A supervisor that is not running any more "
    "(killed; `fdngx status` says so): the processes it started that still run are stopped, its replicas marked "
    "stopped (or exited) in the inventory, its pidfile removed.\n\n"
    "Exit codes: 0 stopped (or nothing to stop: no pidfile beside the inventory), 1 error (e.g. no such "
    "inventory and no pidfile), 2 usage."
)


def launch_cmd(
    ctx: typer.Context,
    engine: Engine | None = typer.Option(
        None, "--engine", "-e",
        help="Default: fastdeploy when it is importable here, else sim (said on stderr).",
    ),
    num_servers: int = typer.Option(
        ..., "--num-servers", "-n", help=f"How many data-parallel replicas: 1 to {MAX_SERVERS}."
    ),
    model: str | None = typer.Option(
        None, "--model", "-m", help="Model name or path (required for fastdeploy, vllm, sglang; ignored by sim)."
    ),
    gpus: str | None = typer.Option(
        None, "--gpus",
        help="GPU ids, e.g. 0,1,2,3. FastDeploy multi_api_server: the first --tensor-parallel-size x N are "
        "CUDA_VISIBLE_DEVICES for all ranks (required); --per-instance, vllm, sglang: consecutive slices of "
        "--tensor-parallel-size GPUs per replica.",
    ),
    host: str | None = typer.Option(
        None, "--host",
        help="Address the replicas listen on. Default: 127.0.0.1; with --router 0.0.0.0 (all addresses), so "
        "FastDeploy's own pre-registration health check on this machine's resolved address passes. The "
        "engine's own --host after -- is the same option (fdngx probes there and names it in the inventory).",
    ),
    advertise_host: str | None = typer.Option(
        None, "--advertise-host",
        help="Address the inventory names (nginx and other nodes connect to it). Default: --host; with --router "
        "and a wildcard --host, this machine's resolved address (gethostbyname(gethostname())).",
    ),
    router: str | None = typer.Option(
        None, "--router",
        help="fastdeploy: register every replica with this router (FastDeploy's --router URL, e.g. "
        "http://10.0.0.5:9000 or fdngx sidecar --registry-listen).",
    ),
    base_port: int | None = typer.Option(
        None, "--base-port",
        help=f"First API port; replica i gets base+i. Default: {DEFAULT_BASE_PORT}. Excludes --ports.",
    ),
    ports: str | None = typer.Option(
        None, "--ports", help="API ports, one per replica: 8001,8002,... Excludes --base-port."
    ),
    metrics_base_port: int | None = typer.Option(
        None, "--metrics-base-port",
        help=f"First metrics port (fastdeploy, sim). Default: each API port + {METRICS_OFFSET}. "
        "vllm/sglang serve metrics on the API port.",
    ),
    metrics_ports: str | None = typer.Option(
        None, "--metrics-ports", help="Metrics ports, one per replica. Excludes --metrics-base-port."
    ),
    controller_ports: str | None = typer.Option(
        None, "--controller-ports",
        help="fastdeploy: controller ports, one per replica (multi_api_server --controller-ports; "
        "--per-instance: each api_server's --controller-port). Default: none.",
    ),
    inventory: Path = typer.Option(
        DEFAULT_INVENTORY, "--inventory", "-i",
        help="Inventory file to write (atomically, once every replica is healthy); its pidfile is <file>.pid.",
    ),
    log_dir: Path | None = typer.Option(
        None, "--log-dir", help="Where each process's output goes. Default: fdngx-logs/ next to the inventory."
    ),
    timeout: float | None = typer.Option(
        None, "--timeout",
        help="Seconds to wait for every GET /health == 200 (1 to 86400). Default: "
        + TIMEOUTS + " (FastDeploy loads for minutes).",
    ),
    detach: bool = typer.Option(
        False, "--detach", "-d",
        help="Return once healthy; a supervisor keeps running (pidfile next to the inventory). Stop: fdngx stop.",
    ),
    dry_run: bool = typer.Option(
        False, "--dry-run", help="Print the exact command lines, environment and inventory; start nothing."
    ),
    per_instance: bool = typer.Option(
        False, "--per-instance",
        help="fastdeploy/sim: one independent server process per replica instead of one multi-server process group "
        "(the same as --dp-mode independent).",
    ),
    dp_mode: DpMode | None = typer.Option(
        None, "--dp-mode",
        help="independent: replicas that share nothing. moe: the ranks of ONE data-parallel group of a MoE model "
        "(vllm: one `vllm serve --data-parallel-size N --data-parallel-rank i` per rank; sglang: one server with "
        "--dp-size N --enable-dp-attention; fastdeploy/sim: one multi-server group). Default: fastdeploy and sim "
        "run one multi-server group, vllm and sglang independent replicas.",
    ),
    restart: Restart = typer.Option(
        Restart.NO, "--restart",
        help="no | on-failure: restart a process that fails (killed by a signal, a non-zero exit status, a rank "
        "that stops listening or answers /health with an error for --unhealthy-after), with backoff 1,2,4..60 s "
        "(a multi-server group restarts as a whole, since its ranks fail together). As systemd's on-failure: a "
        "process that exits 0 (a server stopped cleanly, e.g. on SIGTERM) is not restarted; but FastDeploy's "
        "api_server (--per-instance), which exits 0 when its engine fails to load or its GPU worker dies, is.",
    ),
    unhealthy_after: float = typer.Option(
        UNHEALTHY_AFTER, "--unhealthy-after",
        help="Seconds (0 to 86400; 0: never). A running replica whose /health has answered an error status "
        "(4xx/5xx) on every probe for this long is lost: said, marked down in the inventory, and with --restart "
        "on-failure its process restarted. FastDeploy's api_server outlives its GPU workers, answering 404 "
        "'Worker Service Not Healthy' for ever without exiting. Not counted: 304 (weights cleared for an "
        "update) and probes that time out (too busy to answer).",
    ),
    name_prefix: str = typer.Option(
        "", "--name-prefix", help="Prepended to every instance name (node1- gives node1-dp0, node1-dp1, ...): "
        "with one launch per node, the nodes' inventories merge (render -i a.json -i b.json) without clashing."
    ),
    grace: float = typer.Option(
        15.0, "--grace", help="Seconds between the stop signal and SIGKILL when stopping a process group (0 to "
        "3600)."
    ),
) -> None:
    """Start data-parallel replicas, wait until each /health is 200, write the inventory, supervise them.

    Engine arguments go after `--` and are passed through unchanged (flags fdngx reads, such as --engine-worker-queue-port=a,b, as two tokens); fdngx adds only what they lack (--model, --host, --data-parallel-size, --engine-worker-queue-port, --router) and refuses flags it sets per replica (--port, ...).

    Foreground by default: Ctrl-C or SIGTERM stops every process it started, no orphans. With --detach a supervisor keeps them running; `fdngx stop` ends it.
    """  # noqa: E501
    if engine is None:
        engine = Engine.FASTDEPLOY if core.fastdeploy_installed() else Engine.SIM
        why = "FastDeploy is importable here" if engine is Engine.FASTDEPLOY else "FastDeploy is not installed here"
        typer.echo(f"fdngx: no --engine given and {why}: using --engine {engine}", err=True)
    req = LaunchRequest(
        engine=engine,
        num_servers=num_servers,
        model=model,
        gpus=parse_list(gpus, "--gpus") if gpus is not None else None,
        host=host,
        advertise_host=advertise_host,
        router=router,
        controller_ports=parse_ports(controller_ports, "--controller-ports") if controller_ports is not None else None,
        dp_mode=dp_mode,
        ports=parse_ports(ports, "--ports") if ports is not None else None,
        metrics_ports=parse_ports(metrics_ports, "--metrics-ports") if metrics_ports is not None else None,
        base_port=base_port,
        metrics_base_port=metrics_base_port,
        extra_args=list(ctx.args),
        per_instance=per_instance,
        inventory=inventory,
        log_dir=log_dir,
        timeout=timeout,
        restart=restart,
        grace=grace,
        unhealthy_after=unhealthy_after,
        name_prefix=name_prefix,
    )
    plan = build_plan(req)
    for warning in plan.warnings:
        typer.echo(f"fdngx: warning: {warning}", err=True)
    if dry_run:
        sys.stdout.write(plan.describe())
        return
    code = core.launch(plan, detach=detach)
    if code:
        raise typer.Exit(code)


def stop_cmd(
    inventory: Path = typer.Option(
        DEFAULT_INVENTORY, "--inventory", "-i", help="Inventory written by `fdngx launch`; its pidfile is <file>.pid."
    ),
    grace: float | None = typer.Option(
        None, "--grace", help="Seconds before SIGKILL (0 to 3600). Default: the --grace the launch used (15)."
    ),
) -> None:
    """Stop a launch (a detached one, or a foreground one from another shell): its supervisor and every process it started; say what was stopped."""  # noqa: E501
    if grace is not None:
        check_grace(grace)
    for line in core.stop(inventory, grace=grace):
        typer.echo(f"fdngx: {line}")


def register(app: typer.Typer) -> None:
    # Extra engine arguments only after `--`: unknown options before it stay errors, so a typo such as
    # --gpu is reported instead of being handed to the engine.
    app.command(
        "launch", context_settings={"allow_extra_args": True}, options_metavar="[OPTIONS] [-- ENGINE_ARGS...]",
        epilog=EPILOG, short_help="Start the replicas, wait for each /health, write the inventory.",
    )(launch_cmd)
    app.command("stop", epilog=STOP_EPILOG,
                short_help="Stop a launch: its supervisor and every process it started.")(stop_cmd)
