"""Launch planning: a LaunchRequest -> exact processes (argv, env, log) and the inventory they will serve.

Pure: nothing here starts a process, binds a port or touches the file system, so `--dry-run` and the unit
tests see exactly what a real launch runs. The engine's registry entry builds its own command lines
(fdngx.engines.<engine>.build_launch); this module validates the request and assembles the Plan.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from fdngx import engines
from fdngx.domain import Engine, Inventory, Restart, valid_host
from fdngx.engines.argv import LaunchRequest, ProcSpec, check_distinct
from fdngx.errors import UsageError
from fdngx.inventory import check_unique, parse_inventory, to_json


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

    @property
    def pidfile(self) -> str:
        return pidfile_for(self.inventory_path)

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
        )

    def describe(self) -> str:
        """The dry-run text: every command line with its environment, then the inventory."""
        lines = [f"# engine: {self.engine}; {len(self.procs)} process(es), each in its own process group"]
        for p in self.procs:
            lines.append(f"# {p.name}: serves {', '.join(p.instances)}; output -> {p.log}")
            lines.append(p.command_line())
        lines.append(f"# ports that must be free: {','.join(map(str, self.ports))}")
        lines.append(f"# inventory -> {self.inventory_path} (pid per instance added once started):")
        lines.append(to_json(self.inventory).rstrip("\n"))
        return "\n".join(lines) + "\n"


def pidfile_for(inventory_path: str | Path) -> str:
    """The supervisor's pidfile sits next to the inventory it serves: `fdngx.json` -> `fdngx.json.pid`."""
    return str(inventory_path) + ".pid"


def build_plan(req: LaunchRequest) -> Plan:
    """Validate the request and ask the engine's registry entry for its processes."""
    if req.num_servers < 1:
        raise UsageError(f"--num-servers must be at least 1, got {req.num_servers}")
    if not valid_host(req.host):
        raise UsageError(f"--host {req.host!r} is not an IP address or RFC 1123 hostname")
    if req.grace < 0:
        raise UsageError(f"--grace must be 0 or more seconds, got {req.grace}")
    if req.restart not in Restart.values():
        raise UsageError(f"--restart must be one of {', '.join(Restart.values())}, got {req.restart!r}")
    engine = engines.spec(req.engine)
    inventory_path = Path(req.inventory).absolute()
    log_dir = Path(req.log_dir).absolute() if req.log_dir else inventory_path.parent / "fdngx-logs"
    req = replace(req, engine=Engine(req.engine), restart=Restart(req.restart), inventory=inventory_path,
                  log_dir=log_dir)
    launched = engine.build_launch(req)
    check_unique(launched.instances, "launch plan")
    instances = launched.instances
    ports = [i.port for i in instances] + [i.metrics_port for i in instances if i.metrics_port != i.port]
    ports += launched.extra_ports
    check_distinct(ports, "API, metrics and engine ports together")
    timeout = engine.default_timeout if req.timeout is None else req.timeout
    if timeout <= 0:
        raise UsageError(f"--timeout must be positive, got {timeout}")
    return Plan(
        engine=req.engine,
        procs=launched.procs,
        inventory=Inventory(instances, upstream="fastdeploy"),
        inventory_path=str(inventory_path),
        log_dir=str(log_dir),
        ports=ports,
        timeout=timeout,
        restart=req.restart,
        grace=req.grace,
        grouped=launched.grouped,
    )
