"""FastDeploy's router registration protocol, feeding the inventory (`fdngx sidecar --registry-listen`).

An instance started with `--router URL` checks its own /health and POSTs `{router}/register` every 5 s
(`fastdeploy/engine/register_manager.py`); the POST doubles as its heartbeat. Like FastDeploy's Go router
(`fastdeploy/golang_router/internal/manager/register.go`, `health.go`), fdngx answers
`{"code": 200, "msg": "Register success"}`, 400 with the reason for a bad body, 503 when the instance's
own /health is not 200, and drops instances that keep failing /health for `--registry-grace`, or that
stop heart-beating for the grace and whose /health does not pass either (a silent instance whose /health
passes is kept, said in a WARNING: fdngx.registry.liveness); the next heartbeat adds them back. Only mixed
instances are taken: prefill/decode (PD disaggregation) need FastDeploy's router, which pairs them.

What fdngx adds, because it writes what nginx will load: the address must be allowed
(`--registry-targets`; `peer` there: only the caller's own address), a name is resolved once and stored as
its address, a loopback address (sent as such or by a name) from another machine means that machine, a
registration that would duplicate an instance of any `-i` file is refused (409), and the metrics port is
found when the body has none (`--registry-metrics-port`, else /metrics on the API port, where FastDeploy's
load gauges may read 0: `"metrics_source": "api-port-suspect"` with one WARNING, else the instance is marked
`"metrics_source": "none"`: no load signal, with one WARNING).

What one registration stores is capped (body.MAX_INFO_BYTES), so is the number of registered instances
(`--registry-max-instances`: a new one beyond it is refused with 507, heartbeats still answer), and
inventory.save writes no file that inventory.load would refuse for its size (507 too): the file always
loads. Writes are atomic and under a lock; a heartbeat that changes nothing takes no lock, writes nothing
and parses no file, nor does a write parse what the registry itself wrote last (store.CachedLoad: each file
parsed once per content, also while it keeps changing; `python -m bench.registry`). No answer names a server
path (an inventory file's): the log has the detail."""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from fdngx import inventory as inv_mod
from fdngx.domain import Instance, Inventory, Role, hostport, valid_host
from fdngx.errors import FdngxError, InventoryError, InventoryTooLarge
from fdngx.registry.body import BodyError, Registration, parse_body, worker_info
from fdngx.registry.changes import Changes
from fdngx.registry.liveness import Liveness
from fdngx.registry.metrics_port import Key, MetricsPorts
from fdngx.registry.probe import HttpProbe, Probe, health_all, keep_only
from fdngx.registry.rules import NameCache, RegistrySettings, canonical_ip, never_registrable, reachable
from fdngx.registry.store import CachedLoad, editing

log = logging.getLogger("fdngx.registry")
OK = {"code": 200, "msg": "Register success"}  # register.go RegisterInstance
# A registration the file has no room for: 507 Insufficient Storage ("unable to store the representation
# needed to complete the request", RFC 4918), the server's condition. Not 429: that is this caller going too
# fast (the per-source rate limit answers it), and waiting does not help. Not 503: both FastDeploy routers
# mean "the instance is not healthy" by it. FastDeploy logs any non-2xx and posts again in 5 s.
FULL = 507
PD_REFUSED = (
    "only MIXED instances are allowed: fdngx balances mixed instances only; a {role} instance is half of "
    "a PD-disaggregated pair and needs FastDeploy's router started with --splitwise (see docs/fastdeploy.md)"
)


def answer(status: int, msg: str) -> tuple[int, dict[str, Any]]:
    """An error in both routers' shapes: the Go router's {code, msg} and the Python router's {detail}."""
    return status, {"code": status, "msg": msg, "detail": msg}


def instance_name(host: str, port: int) -> str:
    """`fd-HOST-PORT` for a stored (canonical) address, an IPv6 one with its colons as dots: one name per
    server (an IPv4-mapped address is named as its IPv4 one, which it is). A name already on disk is kept on
    every update: IPv4 names are what they always were; IPv6 names used to fold '..' to '.', so fd00:1::2
    and fd00::1:2 shared one (fd-fd00.1.2-PORT). Now '::' stays '..'."""
    ip = canonical_ip(host)
    return f"fd-{(str(ip) if ip is not None else host).replace(':', '.')}-{port}"


class Refused(Exception):
    def __init__(self, status: int, msg: str) -> None:
        super().__init__(msg)
        self.status = status


class Registry:
    """Registrations -> registry-owned instances (`"registered": true`) in the first inventory file
    (created empty if missing); `others` are the sidecar's other -i files, checked for duplicates."""

    def __init__(
        self,
        path: Path,
        others: Sequence[Path] = (),
        *,
        settings: RegistrySettings | None = None,
        probe: Probe | None = None,
        names: NameCache | None = None,
        clock: Callable[[], float] = time.monotonic,
        upstream: str | None = None,
    ) -> None:
        self.path = Path(path).absolute()
        self.others = [Path(p).absolute() for p in others if Path(p).absolute() != Path(path).absolute()]
        self.settings = settings or RegistrySettings()
        self._load = CachedLoad()  # read-only views of the files; every change goes through editing()
        self.probe = probe or HttpProbe()
        self.names = names or NameCache()
        self.clock = clock
        self.lock = inv_mod.lock_path(self.path)
        self._mu = threading.Lock()
        self.live = Liveness()  # heartbeats and /health answers, under _mu
        self.changes = Changes()  # updates of registered instances, said once per check; under _mu
        self.metrics_ports = MetricsPorts()
        self._full_mu = threading.Lock()
        self._full_said = False  # the registry is full (or the file at its limit): said once until room again
        with self._mu, inv_mod.lock(self.path):
            if not self.path.exists():
                name = upstream or next((i.upstream for i in self._load_others()), inv_mod.DEFAULT_UPSTREAM)
                inv_mod.save(Inventory([], name), self.path)
        now = clock()
        for inst in self._owned(self._load(self.path)):
            self.live.heartbeat(inv_mod.address_key(inst.host, inst.port), now)  # a fresh grace after a restart
        self.check(health=False)  # before the sidecar loads the files: drop what now conflicts

    # -- POST /register ----------------------------------------------------------------------------------

    def register(self, body: Any, peer: str | None = None) -> tuple[int, dict[str, Any]]:
        """Check one registration and merge it; returns (HTTP status, JSON answer). Never raises."""
        try:
            reg = parse_body(body)
            if reg.role is not Role.MIXED:
                return answer(400, PD_REFUSED.format(role=reg.role.value))
            host, asked = self._target(reg.host_ip, peer)
            if (own := self.settings.own_listener(host, reg.port)) is not None:
                return answer(400, f"host_ip {hostport(host, reg.port)} is {own}, not a replica; never registrable")
            key = inv_mod.address_key(host, reg.port)
            self._check_elsewhere(key, instance_name(host, reg.port))
            inv = self._load(self.path)
            current = self._find(inv, key)
            if current is not None and current.extra.get("registered") is not True:
                return 200, dict(OK)  # listed by hand in this file: already balanced, never touched
            if current is None:
                self._check_room(inv)  # before fdngx contacts it; checked again under the lock
            # register.go RegisterInstanceCore: CheckWorkerHealth before accepting; "not healthy" -> 503.
            why = self.probe.health(host, reg.port)
            if why is not None:
                return answer(503, f"service is not healthy: GET {hostport(host, reg.port)}/health: {why}")
            name = current.name if current is not None else instance_name(host, reg.port)
            with self.metrics_ports.registering(key):  # its state is not pruned before the write: keep_only
                metrics_port, source = self.metrics_ports.find(self.probe, self.settings, self.clock(), reg, host,
                                                               asked, current, key, name)
                self._save(reg, host, asked, metrics_port, source, key, current)
        except BodyError as exc:
            return answer(400, str(exc))
        except Refused as exc:
            return answer(exc.status, str(exc))
        except (FdngxError, OSError) as exc:  # the detail names files: the log has it, the answer does not
            log.error("registry: registration from %s not recorded: %s", peer, exc)
            return answer(500, "fdngx could not record the registration (the fdngx sidecar's log says why)")
        except Exception:  # a bug: say so in the log, answer the instance, keep serving the others
            log.exception("registry: registration from %s failed", peer)
            return answer(500, "fdngx could not record the registration (the fdngx sidecar's log says why)")
        return 200, dict(OK)

    def _target(self, host_ip: str, peer: str | None) -> tuple[str, str | None]:
        """The address to store for `host_ip` (a name resolved once), and the name it was given as (None when
        it is stored as the caller's address instead: the name meant loopback, seen from the caller)."""
        ip = canonical_ip(host_ip)
        asked = None
        if ip is None:
            if not valid_host(host_ip):
                raise Refused(400, f"invalid host_ip: {host_ip[:80]!r} (an IP address or an RFC 1123 host name)")
            found = [a for a in (canonical_ip(x) for x in self.names.resolve(host_ip)) if a is not None]
            if not found:
                raise Refused(400, f"host_ip {host_ip!r} does not resolve: nginx could not use it; send an address")
            ip, asked = found[0], host_ip
        remote = canonical_ip(peer or "")
        if reachable(ip, remote) != ip:
            ip, asked = reachable(ip, remote), None
        why = never_registrable(ip)
        if why is not None:
            raise Refused(400, f"host_ip {host_ip}: {why}; it can never be registered")
        targets = self.settings.targets
        if targets.peer and ip != remote:
            raise Refused(403, f"host_ip {host_ip} ({ip}) is not the address this registration came from "
                               f"({peer}): --registry-targets {targets.text} allows only that")
        if not targets.allows(ip):
            raise Refused(403, f"host_ip {host_ip} ({ip}) is not in --registry-targets {targets.text}")
        return ip.compressed, asked

    def _check_room(self, inv: Inventory) -> None:
        """Refuse a NEW instance when the registry already keeps --registry-max-instances (instances listed by
        hand do not count); a WARNING the first time, until there is room again."""
        cap, count = self.settings.max_instances, len(self._owned(inv))
        if count < cap:
            return
        self._say_full(f"registry: full: {count} registered instances (--registry-max-instances {cap}); new "
                       f"registrations are refused with {FULL} until one leaves; registered ones keep heart-beating")
        raise Refused(FULL, f"not registered: the registry is full ({count} instances, --registry-max-instances "
                            f"{cap}); try again after one leaves")

    def _say_full(self, text: str) -> None:
        with self._full_mu:
            said, self._full_said = self._full_said, True
        if not said:
            log.warning("%s", text)

    @staticmethod
    def _merged(old: dict[str, Any], new: dict[str, Any], asked: str | None) -> dict[str, Any]:
        merged = {**old, **new, "name": old["name"]}  # hand edits (weight, max_num_seqs) stay
        if not asked:
            merged.pop("registered_as", None)  # registered by address now: an old name no longer holds
        return merged

    def _save(self, reg: Registration, host: str, asked: str | None, metrics_port: int, source: str,
              key: Key, current: Instance | None = None) -> None:
        new = {"name": instance_name(host, reg.port), "host": host, "port": reg.port, "metrics_port": metrics_port,
               "engine": "fastdeploy", "role": reg.role.value, "registered": True, "metrics_source": source,
               "fastdeploy": reg.info}
        if asked:
            new["registered_as"] = asked
        if current is not None and current.extra.get("registered") is True:
            old = current.to_dict()
            if self._merged(old, new, asked) == old:  # a heartbeat (every 5 s each): no lock, no whole-file work
                with self._mu:
                    self.live.heartbeat(key, self.clock())
                return
        index: int | None = None
        with self._mu:
            try:
                with editing(self.path, self._load) as inv:  # saved on leaving, if changed; a Refused saves nothing
                    index = next((n for n, i in enumerate(inv.instances)
                                  if inv_mod.address_key(i.host, i.port) == key), None)
                    if index is not None:
                        old = inv.instances[index].to_dict()
                        if old.get("registered") is not True:
                            return
                        merged = self._merged(old, new, asked)
                        if merged == old:
                            self.live.heartbeat(key, self.clock())
                            return
                        inst = inv_mod.parse_instance(merged, str(self.path), index)
                        inv.instances[index] = inst
                    else:
                        self._check_room(inv)  # the authoritative check: concurrent registrations passed the early one
                        inst = inv_mod.parse_instance(new, f"registration of {hostport(host, reg.port)}", 0)
                        inv.instances.append(inst)
                    try:
                        inv_mod.check_unique(inv.instances, str(self.path))
                        inv_mod.merge([inv, *self._load_others()])  # one upstream, no duplicate across files
                    except InventoryError as exc:
                        log.debug("registry: %s not registered: %s", inst.address, exc)
                        if "already listed" in str(exc) or "used twice" in str(exc):
                            raise Refused(409, f"not registered: {inst.address} as '{inst.name}': its address or "
                                               "name is already listed in an -i file of the fdngx sidecar") from None
                        raise Refused(400, "not registered: the fdngx sidecar's -i files would not merge (its log "
                                           "says why)") from None
            except InventoryTooLarge as exc:  # a file load() would refuse for its size: nothing was written
                if index is not None:
                    self.live.heartbeat(key, self.clock())  # healthy and heart-beating; it stays as it was
                self._say_full(f"registry: {exc}; registrations that would grow it are refused with {FULL}")
                raise Refused(FULL, f"{'not updated' if index is not None else 'not registered'}: the inventory "
                                    f"would pass the {inv_mod.MAX_BYTES}-byte limit of an inventory file") from None
            if index is None:  # said once written: one refused on the way (409) joined nothing
                log.info("registry: %s registered at %s (metrics port %d from %s)", inst.name, inst.address,
                         metrics_port, source)
                with self._full_mu:
                    self._full_said = False  # there was room: say it again when full again
            else:
                self.changes.add(inst.name, old, merged, self.clock())  # said by check(), once for all
            self.live.heartbeat(key, self.clock())  # clears "failing since" too: its /health just passed

    # -- duplicates across -i files ------------------------------------------------------------------------

    def _load_others(self) -> list[Inventory]:
        """The other -i files as they are now; one that cannot be read is skipped here (the sidecar reports
        it) and checked again on every registration and every cycle of `check`."""
        out = []
        for p in self.others:
            try:
                out.append(self._load(p))
            except InventoryError as exc:
                log.debug("registry: %s", exc)
        return out

    def _check_elsewhere(self, key: Key, name: str) -> None:
        for other in self._load_others():
            for inst in other.instances:
                if inv_mod.address_key(inst.host, inst.port) == key or inst.name == name:
                    log.debug("registry: %s is already listed in %s as '%s'", inst.address, other.sources[0], inst.name)
                    raise Refused(409, f"{inst.address} is already listed as '{inst.name}' in another -i file of the "
                                       "fdngx sidecar: fdngx balances it from there; not registered twice")

    @staticmethod
    def _find(inv: Inventory, key: Key) -> Instance | None:
        return next((i for i in inv.instances if inv_mod.address_key(i.host, i.port) == key), None)

    @staticmethod
    def _owned(inv: Inventory) -> list[Instance]:
        return [i for i in inv.instances if i.extra.get("registered") is True]

    # -- the periodic check (health.go MonitorInstanceHealth) ------------------------------------------------

    def check(self, health: bool = True) -> list[str]:
        """Remove registry-owned instances another -i file now lists, at fdngx's own listeners (an older fdngx
        registered them), or that liveness.Liveness.judge finds gone (/health failing, or silent and not
        passing /health, for the grace). Returns the names removed. Never raises."""
        try:
            owned = self._owned(self._load(self.path))
        except InventoryError as exc:
            log.error("registry: %s", exc)
            return []
        now, grace = self.clock(), self.settings.grace
        results = health_all(self.probe, owned, self.settings.check_interval + 5) if health and owned else {}
        gone: dict[Key, tuple[str, float | None]] = {}  # why, and the heartbeat it was judged on
        kept: set[Key] | None = None  # the registered instances in the file after the judgements
        taken: dict[Key | str, str] = {}  # address keys and names the other -i files use
        for other in self._load_others():
            for inst in other.instances:
                taken[inv_mod.address_key(inst.host, inst.port)] = f"now listed in {other.sources[0]}"
                taken[inst.name] = f"its name is now used in {other.sources[0]}"
        with self._mu:
            for inst in owned:
                key = inv_mod.address_key(inst.host, inst.port)
                clash = taken.get(key) or taken.get(inst.name) or self.settings.own_listener(inst.host, inst.port)
                if clash:
                    gone[key] = clash, None
                elif why := self.live.judge(key, inst.name, now, grace, results if health else None, inst.drain):
                    gone[key] = why, self.live.seen[key]
            self.live.say_silent()
            self.changes.say(now)
            with contextlib.suppress(InventoryError):  # the file now, read under _mu as every registry write
                kept = {inv_mod.address_key(i.host, i.port) for i in self._owned(self._load(self.path))}
                self.live.keep_only(kept)
                self.metrics_ports.keep_only(kept)  # under _mu too: no registration writes between read and prune
        removed = self._remove(gone) if gone else []
        if kept is not None:  # the probe's idle connections to instances that left (this check's too) closed
            keep_only(self.probe, kept - gone.keys())
        return removed

    def _remove(self, gone: dict[Key, tuple[str, float | None]]) -> list[str]:
        removed = []
        try:
            with self._mu, editing(self.path, self._load) as inv:  # saved on leaving, if an instance went
                keep = []
                for inst in inv.instances:
                    key = inv_mod.address_key(inst.host, inst.port)
                    why, judged = gone.get(key, ("", None))
                    # A heartbeat since the judgement (it passed /health too) keeps the instance.
                    fresh = judged is not None and self.live.seen.get(key) != judged
                    if key in gone and inst.extra.get("registered") is True and not fresh:
                        removed.append(inst.name)
                        log.info("registry: %s removed: %s; its next registration adds it back", inst.name, why)
                        self.live.forget(key)
                        self.metrics_ports.forget(key)
                    else:
                        keep.append(inst)
                inv.instances = keep
        except (FdngxError, OSError) as exc:
            log.error("registry: could not remove %s: %s", ", ".join(removed) or "instances", exc)
            return []
        return removed

    # -- GET /registered, /registered_number, /health_generate -------------------------------------------

    def _balanced(self) -> list[Instance]:
        try:
            own = self._load(self.path).instances
        except InventoryError as exc:  # said, and a 500 (an empty list reads as "nothing registered")
            log.error("registry: %s", exc)
            raise
        return own + [i for inv in self._load_others() for i in inv.instances]

    def registered(self) -> dict[str, Any]:
        """register.go Registered: {code, msg, prefill[], decode[], mixed[]} of what nginx balances (all -i)."""
        out: dict[str, Any] = {"code": 200, "msg": "success", "prefill": [], "decode": [], "mixed": []}
        for inst in self._balanced():
            out[inst.role.value].append(worker_info(inst))
        return out

    def registered_number(self) -> dict[str, int]:
        """register.go RegisteredNumber / router.py registered_number: {mixed, prefill, decode}."""
        counts = {r.value: 0 for r in Role}
        for inst in self._balanced():
            counts[inst.role.value] += 1
        return {"mixed": counts["mixed"], "prefill": counts["prefill"], "decode": counts["decode"]}

    def health_generate(self) -> dict[str, Any]:
        """health.go HealthGenerate answers {code: 200, msg: "Health check complete"} after checking; fdngx
        reports what its last periodic check saw (a GET here makes no outbound call)."""
        with self._mu:
            failing = sorted(f"http://{hostport(h, p)}" for (h, p) in self.live.failing)
        return {"code": 200, "msg": "Health check complete", "unhealthy": failing}

    def close(self) -> None:
        with self._mu:
            self.changes.say(self.clock())  # the changes since the last check are not lost on stop
        self.probe.close()
        self.names.close()
