"""The inventory (`fdngx.json`): instances to balance over. Load, validate, merge, save atomically.

Everything in here ends up in nginx config text, so validation is strict and by full-string match: a
host is an IP literal (no scope id) or an RFC 1123 hostname whose last label has a letter, names are
plain tokens, and `version` is the integer 1. Unknown fields (launch adds `pid`, `log`) are kept through a
load/save round trip but never reach a config. Duplicates are found on canonical addresses (`::1` and
`0:0::1`, `127.0.0.1` and `::ffff:127.0.0.1`, `localhost` and `localhost.` are the same server).
"""

from __future__ import annotations

import errno
import json
import os
import re
from collections.abc import Iterable, Iterator, Mapping
from contextlib import AbstractContextManager, ExitStack, contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from fdngx.domain import Engine, Instance, Inventory, Role, address_key, group_address, is_ip, natural_key, valid_host
from fdngx.errors import InventoryError, InventoryTooLarge
from fdngx.system.files import atomic_write, file_lock, read_regular_file, real_target

VERSION = 1
DEFAULT_UPSTREAM = "fastdeploy"
DEFAULT_MAX_NUM_SEQS = 64
MAX_BYTES = 16 * 1024 * 1024  # ~50,000 instances; anything bigger is not an inventory
MAX_DEPTH = 32  # unknown fields round-trip, but not as a 100,000-deep structure
MAX_WEIGHT = 10_000  # nginx accepts up to 2^31-1, but anything beyond a few thousand is a mistake

NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:@-]{0,127}")
UPSTREAM = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,63}")
_KNOWN = ("name", "host", "port", "metrics_port", "engine", "max_num_seqs", "weight", "role", "drain")


def _int_field(raw: Mapping[str, Any], key: str, where: str, lo: int, hi: int, default: int | None = None) -> int:
    if key not in raw:
        if default is None:
            raise InventoryError(f"{where}: missing field '{key}'")
        return default
    value = raw[key]
    # bool is an int subclass in Python; `"port": true` is a mistake, not port 1.
    if type(value) is not int:
        raise InventoryError(f"{where}: field '{key}' must be an integer, got {_show(value)}")
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
        raise InventoryError(f"{where}: field '{key}' must be a string, got {_show(value)}")
    return value


def _bool_field(raw: Mapping[str, Any], key: str, where: str) -> bool:
    value = raw.get(key, False)
    if not isinstance(value, bool):  # `"drain": "yes"` or 1 is a mistake, not a guess at what was meant
        raise InventoryError(f"{where}: field '{key}' must be true or false, got {_show(value)}")
    return value


def _show(value: Any) -> str:
    """A value in an error message: JSON, cut short (one line, whatever the input)."""
    try:
        text = json.dumps(value, ensure_ascii=True)
    except (TypeError, ValueError, RecursionError):
        text = type(value).__name__
    return text if len(text) <= 80 else text[:77] + "..."


def _depth(value: Any, limit: int) -> int:
    """Nesting depth of a decoded JSON value, stopping once past `limit`."""
    stack = [(value, 1)]
    deepest = 0
    while stack:
        v, d = stack.pop()
        deepest = max(deepest, d)
        if deepest > limit:
            return deepest
        if isinstance(v, dict):
            stack.extend((x, d + 1) for x in v.values())
        elif isinstance(v, list):
            stack.extend((x, d + 1) for x in v)
    return deepest


def default_name(host: str, port: int) -> str:
    """`host:port`, or for an IPv6 host (whose colons a name may not start with) `ip6-<host>-<port>`."""
    name = f"{host}:{port}"
    return name if NAME.fullmatch(name) else "ip6-" + re.sub(r"[^A-Za-z0-9.]", "-", host).strip("-") + f"-{port}"


def parse_instance(raw: Any, source: str, index: int) -> Instance:
    """Validate one instance object; errors name the file, the instance (by name, else #index), the field."""
    where = f"{source} instance #{index}"
    if not isinstance(raw, dict):
        raise InventoryError(f"{where}: an instance must be a JSON object, got {type(raw).__name__}")
    if isinstance(raw.get("name"), str) and NAME.fullmatch(raw["name"]):
        where = f"{source} instance '{raw['name']}'"
    host = _str_field(raw, "host", where)
    if is_ip(host) and (group := group_address(host)) is not None:
        raise InventoryError(f"{where}: field 'host' = {_show(host)} is a {group} address, not a server's")
    if not valid_host(host):
        raise InventoryError(
            f"{where}: field 'host' = {_show(host)} is not an IP address or RFC 1123 hostname "
            "(no IPv6 scope ids, no numeric names such as 999 or 0x7f000001)"
        )
    port = _int_field(raw, "port", where, 1, 65535)
    metrics_port = _int_field(raw, "metrics_port", where, 1, 65535, default=port)
    name = _str_field(raw, "name", where, default=default_name(host, port))
    if not NAME.fullmatch(name):
        raise InventoryError(
            f"{where}: field 'name' = {_show(name)} must be letters, digits and . _ : @ - (max 128)"
        )
    where = f"{source} instance '{name}'"
    engine = _str_field(raw, "engine", where, default=Engine.FASTDEPLOY.value)
    if engine not in Engine.values():
        raise InventoryError(f"{where}: field 'engine' = {_show(engine)} is not one of {', '.join(Engine.values())}")
    role = _str_field(raw, "role", where, default=Role.MIXED.value)
    if role not in Role.values():
        raise InventoryError(f"{where}: field 'role' = {_show(role)} is not one of {', '.join(Role.values())}")
    max_num_seqs = _int_field(raw, "max_num_seqs", where, 1, 1_000_000, default=DEFAULT_MAX_NUM_SEQS)
    weight = _int_field(raw, "weight", where, 1, MAX_WEIGHT, default=1)
    drain = _bool_field(raw, "drain", where)
    extra = {k: v for k, v in raw.items() if k not in _KNOWN}
    return Instance(name, host, port, metrics_port, Engine(engine), max_num_seqs, weight, Role(role), extra, drain)


def parse_inventory(data: Any, source: str = "<inventory>") -> Inventory:
    """Validate a decoded inventory document."""
    if not isinstance(data, dict):
        raise InventoryError(f"{source}: the inventory must be a JSON object with an 'instances' list")
    if _depth(data, MAX_DEPTH) > MAX_DEPTH:
        raise InventoryError(f"{source}: nested more than {MAX_DEPTH} levels deep: not an fdngx inventory")
    version = data.get("version", VERSION)
    if type(version) is not int or version != VERSION:
        raise InventoryError(f"{source}: field 'version' = {_show(version)} is not supported (expected {VERSION})")
    upstream = data.get("upstream", DEFAULT_UPSTREAM)
    if not isinstance(upstream, str) or not UPSTREAM.fullmatch(upstream):
        raise InventoryError(
            f"{source}: field 'upstream' = {_show(upstream)} must be a name of letters, digits and _ (max 64)"
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
    """Canonical (host, port) and names must be unique: nginx would send twice the traffic to a duplicate."""
    seen_addr: dict[tuple[str, int], str] = {}
    seen_name: set[str] = set()
    for inst in instances:
        key = address_key(inst.host, inst.port)
        if key in seen_addr:
            raise InventoryError(
                f"{source} instance '{inst.name}': {inst.address} is already listed as '{seen_addr[key]}'"
            )
        if inst.name in seen_name:
            raise InventoryError(f"{source} instance '{inst.name}': the name is used twice")
        seen_addr[key] = inst.name
        seen_name.add(inst.name)


_LONG_DIGITS = re.compile(r"[0-9]{4000,}")


def _huge_number(text: str | bytes) -> str | None:
    """Where a number too long for Python's int() is (json.loads refuses it with a bare ValueError)."""
    doc = text.decode("utf-8", "replace") if isinstance(text, bytes) else text
    m = _LONG_DIGITS.search(doc)
    if m is None:
        return None
    line = doc.count("\n", 0, m.start()) + 1
    column = m.start() - (doc.rfind("\n", 0, m.start()) + 1) + 1
    return f"a number of {len(m.group(0))} digits at line {line} column {column}: not an fdngx inventory"


def parse_text(text: str | bytes, source: str) -> Inventory:
    """Decode and validate an inventory document; errors name `source`."""
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise InventoryError(f"{source}: invalid JSON at line {exc.lineno} column {exc.colno}: {exc.msg}") from None
    except (RecursionError, UnicodeDecodeError) as exc:
        raise InventoryError(f"{source}: not an fdngx inventory ({type(exc).__name__})") from None
    except ValueError as exc:  # int() refuses over 4,300 digits
        raise InventoryError(f"{source}: {_huge_number(text) or f'not an fdngx inventory ({type(exc).__name__})'}") \
            from None
    return parse_inventory(data, source)


def read(path: str | Path) -> bytes:
    """The bytes of one inventory file (a regular file, at most MAX_BYTES), as `load` reads them; errors as
    `load` words them."""
    p = Path(path).absolute()
    try:
        return read_regular_file(p, MAX_BYTES)
    except FileNotFoundError:
        raise InventoryError(f"{p}: inventory file not found (run 'fdngx launch' or pass --inventory)") from None
    except OSError as exc:
        raise InventoryError(f"{p}: cannot read inventory: {exc.strerror or exc}") from None


def load(path: str | Path) -> Inventory:
    """Read and validate one inventory file (a regular file, at most MAX_BYTES)."""
    return parse_text(read(path), str(Path(path).absolute()))


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


def load_many(paths: Iterable[str | Path]) -> Inventory:
    return merge([load(p) for p in paths])


def to_json(inv: Inventory) -> str:
    return json.dumps(inv.to_dict(), indent=2, sort_keys=False) + "\n"


def save(inv: Inventory, path: str | Path) -> bytes:
    """Write atomically (temp file in the same directory, fsync, rename; a symlinked path keeps its link);
    returns the bytes written. A file load() would refuse for its size is not written (InventoryError; the
    old file stays as it was)."""
    data = to_json(inv).encode("utf-8")
    if len(data) > MAX_BYTES:
        raise InventoryTooLarge(f"{Path(path).absolute()}: not written: the inventory would be {len(data)} bytes, over "
                                f"the {MAX_BYTES}-byte limit of an inventory file")
    atomic_write(Path(path), data)
    return data


def lock_path(path: str | Path) -> Path:
    """The lock every read-modify-write of an inventory takes (registry, launch supervisor, `fdngx drain`, older
    fdngx too), beside the file a write lands in (a symlink's target: where writers using the real path lock)."""
    p = real_target(Path(path))
    return p.with_name(f".{p.name}.registry.lock")


def lock(path: str | Path, timeout: float = 60.0) -> AbstractContextManager[None]:
    """The inventory lock of `path`, shared by the inventory's owner (`fdngx launch`'s account: a systemd
    DynamicUser) and root (a sysadmin's `fdngx drain`). A lock file of root's or the owner's is accepted: it is
    only flock'ed, never read or written through, and both can rewrite the inventory itself anyway. Anyone
    else's is refused (they could hold it and stall every writer), a symlink or special file always is. One
    root makes goes to the inventory's owner and group, still 0600: root opens any file, the owner its own,
    and the group (which may only read the inventory) cannot take it to stall the writers, as with 0660."""
    target = real_target(Path(path))
    try:
        st = os.stat(target)
    except OSError:  # no inventory yet (the registry's first write): the lock is ours
        return file_lock(lock_path(target), timeout, owners=(0,))
    return file_lock(lock_path(target), timeout, owners=(0, st.st_uid), give_to=(st.st_uid, st.st_gid))


@contextmanager
def editing(path: str | Path) -> Iterator[Inventory]:
    """Load `path` under its lock; what the caller changes in the yielded inventory is saved atomically on a
    normal exit, unless the document is unchanged (no write at all). An exception saves nothing."""
    p = Path(path).absolute()
    with lock(p):
        inv = load(p)
        before = to_json(inv)
        yield inv
        if to_json(inv) != before:
            save(inv, p)


def _names(instances: Iterable[Instance], most: int = 20) -> str:
    """Instance names for a message, in natural order, cut short after `most`."""
    names = sorted((i.name for i in instances), key=natural_key)
    return ", ".join(names[:most]) + (f", ... ({len(names)} in all)" if len(names) > most else "") or "none"


def all_drained(inv: Inventory) -> str | None:
    """Why `inv` cannot be served (every instance drained), or None. An empty inventory is not this case."""
    if not inv.instances or any(not i.drain for i in inv.instances):
        return None
    where = " + ".join(inv.sources) or "inventory"
    return (f"{where}: every instance is drained ({_names(inv.instances, 8)}): nginx would have no replica to "
            "send requests to; put one back with 'fdngx drain NAME --undo' first")


def in_rotation(inv: Inventory) -> Inventory:
    """The instances that take new requests (all but drained ones); refuses an inventory with every one drained."""
    why = all_drained(inv)
    if why is not None:
        raise InventoryError(why)
    return replace(inv, instances=[i for i in inv.instances if not i.drain])


@dataclass(frozen=True)
class DrainResult:
    name: str
    path: Path  # the file that lists the instance (and was edited, if `changed`)
    drain: bool  # the flag as it is now
    changed: bool
    instance: Instance  # as written


def _lock_all(stack: ExitStack, paths: list[Path]) -> dict[str, OSError]:
    """Every file's inventory lock, by real path order (no two runs each hold one the other waits for), but one
    we may not open (a read-only file of another account: its writers take ours too). Returns those skipped."""
    skipped: dict[str, OSError] = {}
    for key, p in sorted({os.path.realpath(lock_path(p)): p for p in paths}.items()):
        try:
            stack.enter_context(lock(p))
        except OSError as exc:
            if not isinstance(exc, PermissionError) and exc.errno != errno.EROFS:
                raise
            skipped[key] = exc
    return skipped


def set_drain(paths: list[Path], name: str, drain: bool) -> DrainResult:
    """Set or clear one instance's `drain` in whichever of `paths` lists it, atomically; refuses an unknown name
    and the last instance in rotation, every file read under all their locks (two drains cannot both pass)."""
    paths = [Path(p).absolute() for p in paths]
    with ExitStack() as stack:
        skipped = _lock_all(stack, paths)
        inventories = [load(p) for p in paths]
        merged = merge(inventories)  # the same checks a render makes, so the edit cannot break the merged view
        at = next((n for n, inv in enumerate(inventories) if any(i.name == name for i in inv.instances)), None)
        if at is None:
            raise InventoryError(f"{' + '.join(merged.sources)}: no instance named {_show(name)}; "
                                 f"known: {_names(merged.instances)}")
        owner, inv = paths[at], inventories[at]
        if os.path.realpath(lock_path(owner)) in skipped:  # the file to edit: never without its lock
            raise skipped[os.path.realpath(lock_path(owner))]
        inst = next(i for i in inv.instances if i.name == name)
        changed = inst.drain != drain
        if drain and changed and all(i.drain or i is inst for other in inventories for i in other.instances):
            raise InventoryError(f"{owner}: not drained: {name} is the last instance in rotation (nginx would have "
                                 "no replica left); put another one back first with 'fdngx drain NAME --undo'")
        inst.drain = drain
        if changed:
            save(inv, owner)
    return DrainResult(name, owner, drain, changed, inst)
