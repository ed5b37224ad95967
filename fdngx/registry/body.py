"""A FastDeploy registration body, checked the way FastDeploy's Go router checks it.

Mirrors `fastdeploy/golang_router/internal/manager/instance.go` (PaddlePaddle/FastDeploy @ 171b4d3f):
`InstanceInfo` with `Role` (an int 0..2 or a case-insensitive string), `Port` (an int or a numeric string:
`port`, `metrics_port`, `connector_port`, `engine_worker_queue_port`), `IntToStringList` (`rdma_ports`,
`device_ids`: strings or integral numbers) and `NewInstanceInfo`'s checks (role and host_ip required, port
1..65535, transfer_protocol in {ipc, rdma}). Where the Go router and the Python router
(`fastdeploy/router/utils.py` `InstanceInfo`) differ, fdngx takes the more forgiving reading: a missing
role means mixed, and `metrics_port` absent, null, "" or 0 means "not sent" (the Python router's default
is 0; the Go router would refuse 0). The body of `fastdeploy/config.py` `init_cache_info` (`register_info`)
and what `fastdeploy/engine/register_manager.py` adds (`is_paused`, `version`, `connected_decodes`) pass.

What is stored is what was sent, or the registration is refused (400 naming the field): no string is cut
short or dropped while the answer says 200, and none holds a lone surrogate (JSON's "\\ud800" decodes to
one; no UTF-8 file can hold it, and strict JSON readers refuse the escape the inventory would carry).
`version` is kept whole, as long as it is (neither router reads it, so neither limits it: refusing a long one
would keep a healthy instance out of nginx over a field nothing uses); MAX_INFO_BYTES bounds it.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from typing import Any

from fdngx.domain import Instance, Role

ROLES = (Role.MIXED, Role.PREFILL, Role.DECODE)  # instance.go: MIXED = iota, PREFILL, DECODE
PROTOCOLS = ("ipc", "rdma")
MAX_LIST = 64  # device ids / RDMA ports of one instance: one per GPU (8 or 16 per node), never hundreds
MAX_TEXT = 128  # characters of connector_port, engine_worker_queue_port, and of each rdma_ports/device_ids entry
MAX_HOST = 253  # characters of an RFC 1123 host name (host_ip, after any http:// prefix)
# What one registration stores (`info`, the JSON of the fields under "fastdeploy" in the inventory, compact,
# as ASCII like the file): a real 8-GPU instance needs ~200 bytes. Bounds the file with
# --registry-max-instances: 1024 of the largest entries stay far below inventory.MAX_BYTES (tested).
MAX_INFO_BYTES = 4096
_DIGITS = re.compile(r"[0-9]{1,10}")


class BodyError(ValueError):
    """A registration body FastDeploy's router would refuse too (400, with this message)."""


@dataclass(frozen=True)
class Registration:
    """What one registration says, checked: the host as sent, the role, the ports, FastDeploy's extras."""

    host_ip: str
    port: int
    role: Role
    metrics_port: int | None  # None: not sent (absent, null, "", 0)
    info: dict[str, Any] = field(default_factory=dict)  # FastDeploy fields kept for GET /registered


def _show(value: Any) -> str:
    try:
        text = json.dumps(value)
    except (TypeError, ValueError):
        text = type(value).__name__
    return text if len(text) <= 60 else text[:57] + "..."


def _text(value: str, where: str, limit: int | None = MAX_TEXT) -> str:
    """A string field as sent, or BodyError naming it: text UTF-8 can encode, at most `limit` characters."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise BodyError(f"invalid {where}: a lone surrogate (\\u{ord(value[exc.start]):04x}) at character "
                        f"{exc.start}: not text, UTF-8 cannot encode it") from None
    if limit is not None and len(value) > limit:
        raise BodyError(f"invalid {where}: {len(value)} characters, over the limit of {limit}")
    return value


def parse_port(value: Any, name: str, *, required: bool = False, zero_is_none: bool = False) -> int | None:
    """instance.go `Port`: an int, or a string of digits; 1..65535. None when absent, null or ""."""
    if value is None or value == "":
        if required:
            raise BodyError(f"{name} is required")
        return None
    if type(value) is int:
        number = value
    elif isinstance(value, str) and _DIGITS.fullmatch(value):
        number = int(value)
    else:
        raise BodyError(f"invalid {name}: {_show(value)} (an integer or a string of digits)")
    if number == 0 and zero_is_none:
        return None
    if not 1 <= number <= 65535:
        raise BodyError(f"invalid {name}: {number} (1..65535)")
    return number


def parse_role(value: Any) -> Role:
    """instance.go `Role.parse`: an int 0..2, else a string matched case-insensitively."""
    if value is None:
        return Role.MIXED  # both routers require it; fdngx treats an instance that does not say as mixed
    if type(value) is int:
        if 0 <= value < len(ROLES):
            return ROLES[value]
        raise BodyError(f"invalid role integer: {value}")
    if isinstance(value, str):
        for role in ROLES:
            if value.lower() == role.value:
                return role
        raise BodyError(f"invalid role: {_show(value)}")
    raise BodyError(f"invalid role: {_show(value)} (mixed, prefill, decode or 0, 1, 2)")


def _string_list(value: Any, name: str) -> list[str]:
    """instance.go `IntToStringList`: strings or integral numbers, kept as strings."""
    if value is None:
        return []
    if not isinstance(value, list):
        raise BodyError(f"invalid {name}: {_show(value)} (a list)")
    if len(value) > MAX_LIST:
        raise BodyError(f"invalid {name}: {len(value)} entries (at most {MAX_LIST})")
    out = []
    for i, v in enumerate(value):
        if isinstance(v, str):
            out.append(_text(v, f"{name}: element {i}"))
        elif type(v) is int or (type(v) is float and v.is_integer() and abs(v) < 2**53):
            out.append(str(int(v)))
        else:
            raise BodyError(f"invalid {name}: element {i}: {_show(v)} is not an integer or a string")
    return out


def _port_text(value: Any, name: str) -> str:
    """connector_port / engine_worker_queue_port: kept as the Go router keeps them (a string, "" if unset).
    Only their type is checked: the Go router checks their range in splitwise mode only."""
    if value is None:
        return ""
    if isinstance(value, str):
        return _text(value, name)
    if type(value) is int:
        return str(value)
    raise BodyError(f"invalid {name}: {_show(value)} (an integer or a string)")


def parse_body(body: Any) -> Registration:
    """Check one decoded registration body; BodyError says what is wrong, in the Go router's words."""
    if not isinstance(body, dict):
        raise BodyError("Invalid InstanceInfo JSON format: the body must be a JSON object")
    role = parse_role(body.get("role"))
    host = body.get("host_ip")
    if host is None or host == "":
        raise BodyError("host_ip is required")
    if not isinstance(host, str):
        raise BodyError(f"invalid host_ip: {_show(host)} (an IP address or a host name)")
    # instance.go isValidIP strips a scheme; URL() then keeps "http://host:port".
    host = _text(host.removeprefix("http://"), "host_ip", MAX_HOST)
    port = parse_port(body.get("port"), "port", required=True)
    assert port is not None
    metrics_port = parse_port(body.get("metrics_port"), "metrics_port", zero_is_none=True)
    protocols = body.get("transfer_protocol")
    if protocols is not None:
        if not isinstance(protocols, list):
            raise BodyError(f"invalid transfer_protocol: {_show(protocols)} (a list)")
        if len(protocols) > MAX_LIST:
            raise BodyError(f"invalid transfer_protocol: {len(protocols)} entries (at most {MAX_LIST})")
        for proto in protocols:
            if proto not in PROTOCOLS:
                raise BodyError(f"invalid protocol: {_show(proto)}")
    info: dict[str, Any] = {
        "connector_port": _port_text(body.get("connector_port"), "connector_port"),
        "engine_worker_queue_port": _port_text(body.get("engine_worker_queue_port"), "engine_worker_queue_port"),
        "transfer_protocol": list(protocols or []),
        "rdma_ports": _string_list(body.get("rdma_ports"), "rdma_ports"),
        "device_ids": _string_list(body.get("device_ids"), "device_ids"),
    }
    # Newer builds: register_manager.py adds these three; config.py adds tp_size (not used by fdngx).
    version = body.get("version")  # model_config.version: null, or what the model's config says, kept whole
    if isinstance(version, str):
        info["version"] = _text(version, "version", None)
    elif type(version) is int or (type(version) is float and math.isfinite(version)):
        info["version"] = version
    elif version is not None:
        raise BodyError(f"invalid version: {_show(version)} (a string or a number)")
    if type(body.get("tp_size")) is int and 1 <= body["tp_size"] <= 65536:
        info["tp_size"] = body["tp_size"]
    if isinstance(body.get("is_paused"), bool):
        info["is_paused"] = body["is_paused"]
    _check_size(info)
    return Registration(host, port, role, metrics_port, info)


def _json_bytes(value: Any) -> int:
    return len(json.dumps(value, separators=(",", ":")))  # ensure_ascii, as inventory.to_json writes it


def _check_size(info: dict[str, Any]) -> None:
    """At most MAX_INFO_BYTES stored per registration; the message names the largest field."""
    size = _json_bytes(info)
    if size > MAX_INFO_BYTES:
        field, biggest = max(((k, _json_bytes(v)) for k, v in info.items()), key=lambda kv: kv[1])
        raise BodyError(
            f"registration too large: its FastDeploy fields are {size} bytes of JSON, over the {MAX_INFO_BYTES}-byte "
            f"limit (the largest, {field}, is {biggest} bytes; an 8-GPU instance needs about 200)"
        )


def worker_info(inst: Instance) -> dict[str, Any]:
    """One entry of GET /registered: the Go router's WorkerInfo (manager/handler.go; ports as strings,
    metrics_port as register.go records it), plus fdngx's name, registered and metrics_source."""
    fd = inst.extra.get("fastdeploy")
    fd = fd if isinstance(fd, dict) else {}
    return {
        "url": f"http://{inst.address}", "worker_type": inst.role.value,
        "connector_port": str(fd.get("connector_port", "")),
        "engine_worker_queue_port": str(fd.get("engine_worker_queue_port", "")),
        "transfer_protocol": list(fd.get("transfer_protocol", [])), "rdma_ports": list(fd.get("rdma_ports", [])),
        "device_ids": list(fd.get("device_ids", [])), "metrics_port": str(inst.metrics_port),
        "name": inst.name, "registered": inst.extra.get("registered") is True,
        "metrics_source": inst.extra.get("metrics_source", "inventory"),
    }
