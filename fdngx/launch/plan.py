"""Launch planning: a LaunchRequest -> exact processes (argv, env, log) and the inventory they will serve.

Pure: nothing here starts a process, binds a port or writes to the file system (pidfile_for only reads where a
symlinked inventory points), so `--dry-run` and the unit tests see exactly what a real launch runs. The
engine's registry entry builds its own command lines (fdngx.engines.<engine>.build_launch); this module
validates the request and assembles the Plan.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from fdngx import engines
from fdngx.domain import Engine, Instance, Inventory, Restart
from fdngx.engines.argv import (
    DEFAULT_HOST,
    UNHEALTHY_AFTER,
    DpMode,
    LaunchRequest,
    ProcSpec,
    check_distinct,
    check_num_servers,
    find_flag,
)
from fdngx.errors import UsageError, check_number
from fdngx.inventory import NAME, check_unique, parse_inventory, to_json
from fdngx.launch.hosts import Resolver, decide, resolve_self
from fdngx.system.files import real_target

MAX_GRACE = 3600.0  # --grace: what fdngx.launch.pidfile accepts
MAX_TIMEOUT = 86400.0  # --timeout: a day for every /health to pass (FastDeploy loads for minutes; default 1800)


@dataclass
class Plan:
    engine: Engine
    procs: list[ProcSpec]
    inventory: Inventory
    inventory_path: str
    log_dir: str
    ports: list[int]
    timeout: float
    restart: Restart
    grace: float
    # True when every instance lives in one process (multi_api_server, one sim): they fail and restart together.
    grouped: bool
    # Separate processes that are ranks of one data-parallel group: stopped and restarted together.
    coupled: bool = False
    # Where the replicas listen (the engines' --host); the supervisor probes /health there. The inventory's
    # host is the advertised address, which may not be reachable from here (NAT, another interface).
    bind_host: str = DEFAULT_HOST
    # One line each, for stderr before anything starts (e.g. FastDeploy's router self-check would fail).
    warnings: list[str] = field(default_factory=list)
    # The supervisor's pidfile (pidfile_for), fixed when the plan is made: an inventory symlink re-pointed
    # while the launch runs does not move it away from where `fdngx stop` found it.
    pidfile: str = ""
    # A running instance whose /health answers an error status (4xx/5xx) on every probe for this long is lost
    # (fdngx.launch.ranks); 0: never.
    unhealthy_after: float = UNHEALTHY_AFTER

    def __post_init__(self) -> None:
        self.pidfile = self.pidfile or pidfile_for(self.inventory_path)

    def to_dict(self) -> dict[str, Any]:
        return {
            "engine": self.engine.value,
            "procs": [vars(p) for p in self.procs],
            "inventory": self.inventory.to_dict(),
            "inventory_path": self.inventory_path,
            "log_dir": self.log_dir,
            "ports": self.ports,
            "timeout": self.timeout,
            "restart": self.restart.value,
            "grace": self.grace,
            "grouped": self.grouped,
            "coupled": self.coupled,
            "bind_host": self.bind_host,
            "warnings": self.warnings,
            "pidfile": self.pidfile,
            "unhealthy_after": self.unhealthy_after,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Plan:
        return cls(
            engine=Engine(data["engine"]),
            procs=[ProcSpec(**p) for p in data["procs"]],
            inventory=parse_inventory(data["inventory"], "<launch plan>"),
            inventory_path=data["inventory_path"],
            log_dir=data["log_dir"],
            ports=list(data["ports"]),
            timeout=float(data["timeout"]),
            restart=Restart(data["restart"]),
            grace=float(data["grace"]),
            grouped=bool(data["grouped"]),
            coupled=bool(data.get("coupled", False)),
            bind_host=str(data.get("bind_host", DEFAULT_HOST)),
            warnings=[str(w) for w in data.get("warnings", [])],
            pidfile=str(data.get("pidfile", "")),
            unhealthy_after=float(data.get("unhealthy_after", UNHEALTHY_AFTER)),
        )

    def describe(self) -> str:
        """The dry-run text: every command line with its environment, then the inventory."""
        lines = [f"# engine: {self.engine}; {len(self.procs)} process(es), each in its own process group"]
        if self.coupled:
            lines.append("# the processes are ranks of one data-parallel group: they stop and restart together")
        for p in self.procs:
            lines.append(f"# {p.name}: serves {', '.join(p.instances)}; output -> {p.log}")
            lines.append(p.command_line())
        lines.append(f"# ports that must be free: {','.join(map(str, self.ports))}")
        lines.append(f"# inventory -> {self.inventory_path} (pid per instance added once started):")
        lines.append(to_json(self.inventory).rstrip("\n"))
        return "\n".join(lines) + "\n"


def check_grace(grace: float) -> None:
    """--grace (launch and stop): the range the pidfile keeps (fdngx.launch.pidfile), so a launch the pidfile
    would refuse is refused before anything starts (--grace 7200 started the replicas, then tore them down)."""
    check_number("--grace", grace, 0.0, MAX_GRACE)


def pidfile_for(inventory_path: str | Path) -> str:
    """The supervisor's pidfile sits next to the inventory it serves: `fdngx.json` -> `fdngx.json.pid`; for a
    symlinked inventory, next to the file it points to, so that every name of one inventory finds it (the one
    look at the file system here: where the link points)."""
    return str(real_target(Path(inventory_path))) + ".pid"


def build_plan(req: LaunchRequest, resolve: Resolver | None = None) -> Plan:
    """Validate the request and ask the engine's registry entry for its processes.

    `resolve` says what this machine's name resolves to; it is asked only with --router (FastDeploy's
    registration self-check, see fdngx.launch.hosts)."""
    check_num_servers(req.num_servers)  # before any engine builds a list per replica
    check_grace(req.grace)
    check_number("--unhealthy-after", req.unhealthy_after, 0.0, MAX_TIMEOUT)
    if req.restart not in Restart.values():
        raise UsageError(f"--restart must be one of {', '.join(Restart.values())}, got {req.restart!r}")
    if req.dp_mode is not None and req.dp_mode not in DpMode.values():
        raise UsageError(f"--dp-mode must be one of {', '.join(DpMode.values())}, got {req.dp_mode!r}")
    engine = engines.spec(req.engine)
    timeout = engine.default_timeout if req.timeout is None else req.timeout
    if isinstance(timeout, bool) or not 1 <= timeout <= MAX_TIMEOUT:  # NaN too
        raise UsageError(f"--timeout {timeout!r}: want a number 1..{MAX_TIMEOUT:g} (seconds)")
    router = _router(req, engine.registers)
    # `--host` after -- is where the engine listens: where fdngx probes and what the inventory names, too.
    binding = decide(_said_once(req, "--host", req.host), req.advertise_host, router, resolve or resolve_self)
    inventory_path = Path(req.inventory).absolute()
    log_dir = Path(req.log_dir).absolute() if req.log_dir else inventory_path.parent / "fdngx-logs"
    req = replace(req, engine=Engine(req.engine), restart=Restart(req.restart), inventory=inventory_path,
                  log_dir=log_dir, host=binding.bind, advertise_host=binding.advertise, router=router,
                  dp_mode=None if req.dp_mode is None else DpMode(req.dp_mode))
    launched = engine.build_launch(req)
    instances, procs = _prefixed(req.name_prefix, launched.instances, launched.procs)
    check_unique(instances, "launch plan")
    ports = [i.port for i in instances] + [i.metrics_port for i in instances if i.metrics_port != i.port]
    ports += launched.extra_ports
    check_distinct(ports, "API, metrics and engine ports together")
    return Plan(
        engine=req.engine,
        procs=procs,
        inventory=Inventory(instances, upstream="fastdeploy"),
        inventory_path=str(inventory_path),
        log_dir=str(log_dir),
        ports=ports,
        timeout=timeout,
        restart=req.restart,
        grace=req.grace,
        grouped=launched.grouped,
        coupled=launched.coupled,
        bind_host=binding.bind,
        warnings=list(binding.warnings),
        unhealthy_after=req.unhealthy_after,
    )


def _prefixed(prefix: str, instances: list[Instance], procs: list[ProcSpec]) -> tuple[list[Instance], list[ProcSpec]]:
    """--name-prefix: node1-dp0, node1-dp1, ... in the inventory and in what each process serves."""
    if not prefix:
        return instances, procs
    if not NAME.fullmatch(prefix + "dp0"):
        raise UsageError(f"--name-prefix {prefix!r}: instance names are letters, digits and . _ : @ - (starting "
                         "with a letter or digit, at most 128 characters)")
    return ([replace(i, name=prefix + i.name) for i in instances],
            [replace(p, instances=[prefix + n for n in p.instances]) for p in procs])


def _router(req: LaunchRequest, registers: bool) -> str | None:
    """--router (fdngx's option) or `--router` after -- (FastDeploy's own flag): the same thing, said once."""
    if not registers:
        if req.router is not None:
            raise UsageError(f"--router: --engine {req.engine} does not register with a router (FastDeploy's "
                             "--router); put its replicas in the inventory instead")
        return None
    return _said_once(req, "--router", req.router)


def _said_once(req: LaunchRequest, flag: str, ours: str | None) -> str | None:
    """fdngx's option `flag` or the engine's own flag of that name after --: one setting, said either way (both,
    and different: refused)."""
    user = find_flag(req.extra_args, flag)
    if user is not None and ours is not None and user[1] != ours:
        raise UsageError(f"{flag} {ours} conflicts with engine argument {flag} {user[1]} after --")
    return ours if ours is not None else (user[1] if user else None)
