"""The inventory (`fdngx.json`): instances to balance over. Load, validate, merge, save atomically.

Everything in here ends up in nginx config text, so validation is strict: a host is an IP literal or an
RFC 1123 hostname and nothing else, and names are plain tokens. Unknown fields (launch adds `pid`, `log`)
are kept through a load/save round trip.
"""

from __future__ import annotations

import ipaddress
import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fdngx.errors import InventoryError
from fdngx.fsutil import atomic_write

VERSION = 1
ENGINES = ("fastdeploy", "vllm", "sglang", "sim")
ROLES = ("mixed", "prefill", "decode")
DEFAULT_UPSTREAM = "fastdeploy"
DEFAULT_MAX_NUM_SEQS = 64

_LABEL = re.compile(r"^(?!-)[A-Za-z0-9-]{1,63}(?<!-)$")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:@-]{0,127}$")
_UPSTREAM = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,63}$")
_KNOWN = ("name", "host", "port", "metrics_port", "engine", "max_num_seqs", "weight", "role")


def valid_host(host: str) -> bool:
    """True for an IPv4/IPv6 literal or an RFC 1123 hostname: the only things safe in nginx config."""
    try:
        ipaddress.ip_address(host)
        return True
    except ValueError:
        pass
    if not host or len(host) > 253:
        return False
    labels = host[:-1].split(".") if host.endswith(".") else host.split(".")
    return all(_LABEL.match(label) for label in labels)


@dataclass
class Instance:
    """One replica: an API port to proxy to and a metrics port to scrape."""

    name: str
    host: str
    port: int
    metrics_port: int
    engine: str = "fastdeploy"
    max_num_seqs: int = DEFAULT_MAX_NUM_SEQS
    weight: int = 1
    role: str = "mixed"
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def address(self) -> str:
        """`host:port` as nginx wants it (IPv6 in brackets)."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"

    @property
    def metrics_url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.metrics_port}/metrics"

    @property
    def base_url(self) -> str:
        return f"http://{self.address}"

    def to_dict(self) -> dict[str, Any]:
        known = {k: getattr(self, k) for k in _KNOWN}
        return {**known, **self.extra}


@dataclass
class Inventory:
    """The instances behind one nginx upstream."""

    instances: list[Instance]
    upstream: str = DEFAULT_UPSTREAM
    version: int = VERSION
    extra: dict[str, Any] = field(default_factory=dict)
    sources: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return {
            "version": self.version,
            "upstream": self.upstream,
            **self.extra,
            "instances": [i.to_dict() for i in self.instances],
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=False) + "\n"

    def by_name(self) -> dict[str, Instance]:
        return {i.name: i for i in self.instances}


def _int_field(raw: Mapping[str, Any], key: str, where: str, lo: int, hi: int, default: int | None = None) -> int:
    if key not in raw:
        if default is None:
            raise InventoryError(f"{where}: missing field '{key}'")
        return default
    value = raw[key]
    # bool is an int subclass in Python; `"port": true` is a mistake, not port 1.
    if isinstance(value, bool) or not isinstance(value, int):
        raise InventoryError(f"{where}: field '{key}' must be an integer, got {json.dumps(value)}")
    if not lo <= value <= hi:
        raise InventoryError(f"{where}: field '{key}' = {value} is out of range {lo}..{hi}")
    return value


def _str_field(raw: Mapping[str, Any], key: str, where: str, default: str | None = None) -> str:
    if key not in raw:
        if default is None:
            raise InventoryError(f"{where}: missing field '{key}'")
        return default
    value = raw[key]
    if not isinstance(value, str):
        raise InventoryError(f"{where}: field '{key}' must be a string, got {json.dumps(value)}")
    return value


def parse_instance(raw: Any, source: str, index: int) -> Instance:
    """Validate one instance object; errors name the file, the instance (by name, else #index), the field."""
    where = f"{source} instance #{index}"
    if not isinstance(raw, dict):
        raise InventoryError(f"{where}: an instance must be a JSON object, got {type(raw).__name__}")
    if isinstance(raw.get("name"), str) and _NAME.match(raw["name"]):
        where = f"{source} instance '{raw['name']}'"
    host = _str_field(raw, "host", where)
    if not valid_host(host):
        raise InventoryError(
            f"{where}: field 'host' = {json.dumps(host)} is not an IP address or RFC 1123 hostname"
        )
    port = _int_field(raw, "port", where, 1, 65535)
    metrics_port = _int_field(raw, "metrics_port", where, 1, 65535, default=port)
    default_name = f"{host}:{port}"
    name = _str_field(raw, "name", where, default=default_name)
    if not _NAME.match(name):
        raise InventoryError(
            f"{where}: field 'name' = {json.dumps(name)} must be letters, digits and . _ : @ - (max 128)"
        )
    where = f"{source} instance '{name}'"
    engine = _str_field(raw, "engine", where, default="fastdeploy")
    if engine not in ENGINES:
        raise InventoryError(f"{where}: field 'engine' = {json.dumps(engine)} is not one of {', '.join(ENGINES)}")
    role = _str_field(raw, "role", where, default="mixed")
    if role not in ROLES:
        raise InventoryError(f"{where}: field 'role' = {json.dumps(role)} is not one of {', '.join(ROLES)}")
    max_num_seqs = _int_field(raw, "max_num_seqs", where, 1, 1_000_000, default=DEFAULT_MAX_NUM_SEQS)
    # nginx accepts weights 1..(2^31-1) but anything beyond a few thousand is a mistake.
    weight = _int_field(raw, "weight", where, 1, 10_000, default=1)
    extra = {k: v for k, v in raw.items() if k not in _KNOWN}
    return Instance(name, host, port, metrics_port, engine, max_num_seqs, weight, role, extra)


def parse_inventory(data: Any, source: str = "<inventory>") -> Inventory:
    """Validate a decoded inventory document."""
    if not isinstance(data, dict):
        raise InventoryError(f"{source}: the inventory must be a JSON object with an 'instances' list")
    version = data.get("version", VERSION)
    if version != VERSION:
        raise InventoryError(f"{source}: field 'version' = {json.dumps(version)} is not supported (expected {VERSION})")
    upstream = data.get("upstream", DEFAULT_UPSTREAM)
    if not isinstance(upstream, str) or not _UPSTREAM.match(upstream):
        raise InventoryError(
            f"{source}: field 'upstream' = {json.dumps(upstream)} must be a name of letters, digits and _"
        )
    if "instances" not in data:
        raise InventoryError(f"{source}: missing field 'instances'")
    raw_instances = data["instances"]
    if not isinstance(raw_instances, list):
        raise InventoryError(f"{source}: field 'instances' must be a list")
    instances = [parse_instance(raw, source, n) for n, raw in enumerate(raw_instances)]
    extra = {k: v for k, v in data.items() if k not in ("version", "upstream", "instances")}
    inv = Inventory(instances, upstream, VERSION, extra, (source,))
    check_unique(inv.instances, source)
    return inv


def check_unique(instances: Iterable[Instance], source: str) -> None:
    """(host, port) and names must be unique: nginx would send twice the traffic to a duplicated server."""
    seen_addr: dict[tuple[str, int], str] = {}
    seen_name: set[str] = set()
    for inst in instances:
        key = (inst.host.lower(), inst.port)
        if key in seen_addr:
            raise InventoryError(
                f"{source} instance '{inst.name}': {inst.address} is already listed as '{seen_addr[key]}'"
            )
        if inst.name in seen_name:
            raise InventoryError(f"{source} instance '{inst.name}': the name is used twice")
        seen_addr[key] = inst.name
        seen_name.add(inst.name)


def load(path: str | Path) -> Inventory:
    """Read and validate one inventory file."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise InventoryError(f"{p}: inventory file not found (run 'fdngx launch' or pass --inventory)") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise InventoryError(f"{p}: cannot read inventory: {exc}") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise InventoryError(f"{p}: invalid JSON at line {exc.lineno} column {exc.colno}: {exc.msg}") from None
    return parse_inventory(data, str(p))


def merge(inventories: list[Inventory]) -> Inventory:
    """Merge several inventories (multi-node) into one upstream; they must agree on the upstream name."""
    if not inventories:
        raise InventoryError("no inventory given")
    if len(inventories) == 1:
        return inventories[0]
    names = {inv.upstream for inv in inventories}
    if len(names) > 1:
        raise InventoryError(f"inventories name different upstreams: {', '.join(sorted(names))}")
    instances = [i for inv in inventories for i in inv.instances]
    sources = tuple(s for inv in inventories for s in inv.sources)
    check_unique(instances, " + ".join(sources))
    return Inventory(instances, inventories[0].upstream, VERSION, dict(inventories[0].extra), sources)


def load_many(paths: list[str | Path]) -> Inventory:
    return merge([load(p) for p in paths])


def save(inv: Inventory, path: str | Path) -> None:
    """Write atomically (temp file in the same directory, fsync, rename)."""
    atomic_write(Path(path), inv.to_json())
