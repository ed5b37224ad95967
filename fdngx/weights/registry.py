"""A FastDeploy-compatible registration endpoint that feeds the inventory.

FastDeploy instances started with `--router http://HOST:PORT` POST their details to `/register` every
5 s (the POST doubles as a heartbeat; some builds post once, some in a tight loop). fdngx answers like
both FastDeploy routers (`{"status": "success", "code": 200, "msg": "Register success"}`), adds new
instances to the inventory file (atomically, under a lock), and writes nothing when a heartbeat changes
nothing, so a tight loop costs no disk writes and no reloads. The sidecar's watchdog sees the file change
and re-renders. Health stays the sidecar's job: a registered instance that dies is marked down by the
policy, not deleted (builds that register only once would never come back).

Like FastDeploy's routers it has no authentication: bind it to a private interface.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import socket
import threading
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from fdngx import inventory as inv_mod
from fdngx.domain import Inventory, Listen, Role
from fdngx.errors import FdngxError, InventoryError, UsageError
from fdngx.system.files import file_lock

log = logging.getLogger("fdngx.registry")
MAX_BODY = 64 * 1024


def _reachable_host(host_ip: str, peer: str | None) -> str:
    """FastDeploy takes host_ip from gethostbyname(gethostname()), which is 127.x on some hosts; a
    registration from another machine that claims loopback really means "the address you see me at"."""
    try:
        claimed = ipaddress.ip_address(host_ip)
        remote = ipaddress.ip_address(peer) if peer else None
    except ValueError:
        return host_ip
    if claimed.is_loopback and remote is not None and not remote.is_loopback:
        return str(remote)
    return host_ip


def instance_name(host: str, port: int) -> str:
    return f"fd-{host.replace(':', '.')}-{port}".replace("..", ".")


class Registry:
    """Registrations -> instances in one inventory file (created empty if missing)."""

    def __init__(self, path: Path, upstream: str = inv_mod.DEFAULT_UPSTREAM) -> None:
        self.path = Path(path)
        self.lock = self.path.with_name(f".{self.path.name}.registry.lock")
        with file_lock(self.lock):
            if not self.path.exists():
                inv_mod.save(Inventory([], upstream), self.path)

    def register(self, body: Any, peer: str | None = None) -> tuple[int, dict[str, Any]]:
        """Validate one registration and merge it; returns (HTTP status, JSON answer)."""
        try:
            raw = self._instance(body, peer)
            with file_lock(self.lock):
                inv = inv_mod.load(self.path)
                inst = inv_mod.parse_instance(raw, f"registration from {peer or '?'}", 0)
                current = {(i.host, i.port): n for n, i in enumerate(inv.instances)}
                key = (inst.host, inst.port)
                if key in current:
                    old = inv.instances[current[key]]
                    if (old.metrics_port, old.role) == (inst.metrics_port, inst.role):
                        return 200, _ok()
                    inst.name, inst.engine, inst.max_num_seqs = old.name, old.engine, old.max_num_seqs
                    inst.extra = {**old.extra, **inst.extra}
                    inv.instances[current[key]] = inst
                    log.info("registry: %s updated (metrics port %d, role %s)", inst.name, inst.metrics_port, inst.role)
                else:
                    inv.instances.append(inst)
                    log.info("registry: %s registered at %s (metrics port %d)", inst.name, inst.address,
                             inst.metrics_port)
                inv_mod.check_unique(inv.instances, str(self.path))
                inv_mod.save(inv, self.path)
        except InventoryError as exc:
            return 400, {"detail": str(exc), "code": 400, "msg": str(exc)}
        return 200, _ok()

    @staticmethod
    def _instance(body: Any, peer: str | None) -> dict[str, Any]:
        if not isinstance(body, dict):
            raise InventoryError("registration body must be a JSON object")
        host = body.get("host_ip")
        port = body.get("port")
        if not isinstance(host, str) or not isinstance(port, int) or isinstance(port, bool):
            raise InventoryError("registration needs 'host_ip' (string) and 'port' (integer)")
        host = _reachable_host(host, peer)
        metrics_port = body.get("metrics_port", port)
        role = body.get("role", "mixed")
        extra = {k: body[k] for k in ("version", "tp_size", "device_ids") if k in body}
        return {"name": instance_name(host, port), "host": host, "port": port, "metrics_port": metrics_port,
                "engine": "fastdeploy", "role": role, "registered": True, **extra}

    def registered(self) -> list[dict[str, Any]]:
        return [i.to_dict() for i in inv_mod.load(self.path).instances]

    def registered_number(self) -> dict[str, int]:
        counts = Counter(i.role for i in inv_mod.load(self.path).instances)
        return {role.value: counts.get(role, 0) for role in Role}


def _ok() -> dict[str, Any]:
    # Both FastDeploy routers' success shapes at once: the Python router's and the Go router's.
    return {"status": "success", "code": 200, "msg": "Register success"}


class _Handler(BaseHTTPRequestHandler):
    registry: Registry
    protocol_version = "HTTP/1.1"

    def log_message(self, fmt: str, *args: Any) -> None:
        log.debug("registry %s: " + fmt, self.client_address[0], *args)

    def _send(self, status: int, payload: Any) -> None:
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_POST(self) -> None:
        if self.path.rstrip("/") != "/register":
            return self._send(404, {"detail": "not found"})
        length = int(self.headers.get("Content-Length") or 0)
        if length > MAX_BODY:
            return self._send(413, {"detail": f"body over {MAX_BODY} bytes"})
        try:
            body = json.loads(self.rfile.read(length) or b"null")
        except ValueError:
            return self._send(400, {"detail": "body is not JSON", "code": 400, "msg": "body is not JSON"})
        try:
            status, answer = self.registry.register(body, self.client_address[0])
        except (FdngxError, OSError) as exc:
            log.error("registry: %s", exc)
            status, answer = 500, {"detail": str(exc)}
        self._send(status, answer)

    def do_GET(self) -> None:
        try:
            if self.path.rstrip("/") == "/registered":
                return self._send(200, self.registry.registered())
            if self.path.rstrip("/") == "/registered_number":
                return self._send(200, self.registry.registered_number())
        except FdngxError as exc:
            return self._send(500, {"detail": str(exc)})
        self._send(404, {"detail": "not found"})


class _V6Server(ThreadingHTTPServer):
    address_family = socket.AF_INET6


class RegistryServer:
    """The HTTP side, on its own thread (the sidecar runs it beside its loop)."""

    def __init__(self, listen: str, registry: Registry) -> None:
        try:
            where = Listen.parse(listen, "--registry-listen", allow_zero=True)
        except ValueError as exc:
            raise UsageError(str(exc)) from None
        handler = type("Handler", (_Handler,), {"registry": registry})
        server_class = _V6Server if ":" in where.bind_host else ThreadingHTTPServer
        self.httpd = server_class((where.bind_host, where.port), handler)
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, name="fdngx-registry", daemon=True)

    def start(self) -> RegistryServer:
        self.thread.start()
        return self

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
