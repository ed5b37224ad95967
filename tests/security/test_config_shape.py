"""The config-shape property (issue 10, "Done when"): no input can make a rendered config contain a
directive or a Lua statement the inventory did not ask for.

Over property-generated inventories (valid and hostile documents, parsed the way `fdngx render` does) and
hostile CLI values, for every mode and flavor: render, parse the result with crossplane, and compare its
shape (directive names, block structure, argument counts) with a benign render of an inventory of the same
size with the same options. The Lua in every `*_by_lua_block` is tokenised and compared the same way,
string and number literals standing for data. Input that validation refuses never renders (that is a
clean refusal, counted as such).
"""

from __future__ import annotations

import contextlib
import functools
import re
import tempfile
from dataclasses import replace
from pathlib import Path
from typing import Any

import crossplane
import pytest
from hypothesis import event, given
from hypothesis import strategies as st
from hypothesis.errors import InvalidArgument

from fdngx.domain import Flavor, Instance, Inventory, Mode, ServerState
from fdngx.errors import FdngxError
from fdngx.inventory import parse_text
from fdngx.nginx.render import RenderOptions, natural_key, render
from tests.security.conftest import scaled
from tests.security.strategies import access_log, inventory_text, ip_text, listen, plain_path

TOKEN_FILE = "/etc/fdngx/.fdngx.conf.fdngx-admin-token"
LUA_MODULES = ("/usr/lib/nginx/modules/ndk_http_module.so", "/usr/lib/nginx/modules/ngx_http_lua_module.so")

# -- nginx shape ---------------------------------------------------------------------------------------------


def nginx_shape(text: str) -> list[Any]:
    """Directive names, argument counts and blocks of a rendered config (comments dropped); the Lua of a
    *_by_lua_block is replaced by its token shape."""
    with tempfile.TemporaryDirectory(prefix="fdngx-shape-") as tmp:
        path = Path(tmp) / "fdngx.conf"
        path.write_text(text)
        parsed = crossplane.parse(str(path), single=True, strict=False, check_ctx=False, check_args=False,
                                  comments=False)
    assert parsed["status"] == "ok", parsed["errors"]
    return _shape(parsed["config"][0]["parsed"])


def _shape(block: list[dict[str, Any]]) -> list[Any]:
    out: list[Any] = []
    for d in block:
        if d["directive"].endswith("_by_lua_block"):
            out.append((d["directive"], tuple(lua_shape(a) for a in d["args"])))
        elif "block" in d:
            out.append((d["directive"], len(d["args"]), _shape(d["block"])))
        else:
            out.append((d["directive"], len(d["args"])))
    return out


# -- Lua shape -----------------------------------------------------------------------------------------------

_LUA_TOKEN = re.compile(r"""
    (?P<ws>\s+)
  | (?P<comment>--\[(?P<ceq>=*)\[.*?\](?P=ceq)\]|--[^\n]*)
  | (?P<long>\[(?P<leq>=*)\[.*?\](?P=leq)\])
  | (?P<str>"(?:\\.|\\\n|[^"\\\n])*"|'(?:\\.|\\\n|[^'\\\n])*')
  | (?P<num>0[xX][0-9A-Fa-f]+(?:\.[0-9A-Fa-f]*)?(?:[pP][+-]?\d+)?|(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?)
  | (?P<name>[A-Za-z_][A-Za-z0-9_]*)
  | (?P<op>\.\.\.|\.\.|==|~=|<=|>=|::|//|<<|>>|[-+*/%^#&~|<>=(){}\[\];:,.])
""", re.X | re.S)


def lua_shape(source: str) -> tuple[str, ...]:
    """Lua source as tokens: names, keywords and operators as they are, every string and number literal as
    STR/NUM. Raises AssertionError on text that is not Lua tokens (an unterminated string, ...)."""
    tokens, pos = [], 0
    while pos < len(source):
        m = _LUA_TOKEN.match(source, pos)
        assert m is not None, f"not Lua at {pos}: {source[pos:pos + 60]!r}"
        kind = m.lastgroup
        if kind in ("str", "long"):
            tokens.append("STR")
        elif kind == "num":
            tokens.append("NUM")
        elif kind in ("name", "op"):
            tokens.append(m.group(kind))
        pos = m.end()
    return tuple(tokens)


def test_lua_shape_sees_an_injected_statement() -> None:
    """The comparison is not blind: a closed string followed by a call changes the shape."""
    benign = 'fdngx.add_pool("a", { name = "dp0", port = 1 })'
    hostile = 'fdngx.add_pool("a", { name = "x"..(os.execute("id") and "").."", port = 1 })'
    escaped = 'fdngx.add_pool("a", { name = "x\\034..(os.execute(\\034id\\034))", port = 1 })'
    assert lua_shape(benign) != lua_shape(hostile)
    assert lua_shape(benign) == lua_shape(escaped)


def test_nginx_shape_sees_an_injected_directive() -> None:
    benign = "server { listen 8080; access_log /var/log/a.log fdngx; }\n"
    hostile = "server { listen 8080; access_log x; } server { listen 1; access_log /var/log/a.log fdngx; }\n"
    assert nginx_shape(benign) != nginx_shape(hostile)
    assert nginx_shape(benign) == nginx_shape("server { listen [::1]:9; access_log /x fdngx; }\n")


def _note(what: str) -> None:
    with contextlib.suppress(InvalidArgument):  # InvalidArgument: called from a plain test
        event(what)


# -- the property --------------------------------------------------------------------------------------------


def _benign(n: int, listen_port: int) -> Inventory:
    """n plain replicas on this host, on ports clear of --listen's (a replica there is refused: nginx would
    proxy to itself; hypothesis found --listen 127.0.0.1:10000 against the first one)."""
    base = 10_000 if not 10_000 <= listen_port < 10_000 + n else 20_000
    return Inventory([Instance(f"dp{i}", "127.0.0.1", base + i, base + i) for i in range(n)])


def _states(inv: Inventory, plan: list[tuple[int, bool]]) -> dict[str, ServerState]:
    """The same weights and down flags, by sorted position, for any inventory of the same size."""
    ordered = sorted(inv.instances, key=lambda i: natural_key(i.name))
    return {inst.name: ServerState(w, down) for inst, (w, down) in zip(ordered, plan, strict=True)}


@functools.lru_cache(maxsize=512)
def _benign_shape(n: int, opts: RenderOptions, plan: tuple[tuple[int, bool], ...]) -> Any:
    inv = _benign(n, opts.listen.port)
    return nginx_shape(render(inv, opts, _states(inv, list(plan))))


def _options(mode: Mode, flavor: Flavor, log: str | None, listen_at: str) -> RenderOptions | None:
    try:
        return RenderOptions(mode=mode, flavor=flavor, listen=listen_at, access_log=log,  # type: ignore[arg-type]
                             admin_token_file=TOKEN_FILE,
                             lua_modules=LUA_MODULES if flavor is Flavor.OPENRESTY else ()).validated()
    except FdngxError:
        return None  # a hostile CLI value: refused with a usage error, never rendered


def _check_shapes(flavor: Flavor, text: str | bytes, log: str | None, listen_at: str,
                  plan_draw: list[tuple[int, bool]]) -> None:
    try:
        inv = parse_text(text, "/etc/fdngx/fdngx.json")
    except FdngxError:
        _note("inventory refused")
        return
    if not inv.instances:
        _note("empty inventory")
        return
    plan = tuple((plan_draw * len(inv.instances))[: len(inv.instances)])
    # A drained replica is rendered `down` whatever the policy says: that flag, and nothing else, may differ.
    ordered = sorted(inv.instances, key=lambda i: natural_key(i.name))
    plan = tuple((w, down or inst.drain) for inst, (w, down) in zip(ordered, plan, strict=True))
    for mode in Mode:
        opts = _options(mode, flavor, log, listen_at)
        if opts is None:
            _note("option refused")
            return
        try:
            rendered = render(inv, opts, _states(inv, list(plan)))
        except FdngxError:
            _note(f"{mode}: render refused")  # e.g. a hostname in the openresty flavor
            continue
        benign_opts = replace(opts, access_log="off" if opts.access_log == "off" else None)
        assert nginx_shape(rendered) == _benign_shape(len(inv.instances), benign_opts, plan), (
            f"{mode}/{flavor}: the config's shape changed\n{rendered}")
        _note(f"{mode}: same shape")
    if flavor is Flavor.OPENRESTY:
        _check_peers_data(inv)


def _check_peers_data(inv: Inventory) -> None:
    """The OpenResty flavor's replicas reach the Lua balancer as data (the peers file, then pushes): one
    `peer` line of fixed fields per replica, whatever the inventory holds."""
    try:
        from fdngx.nginx.openresty import initial_peers, snapshot
    except ImportError:  # before the Lua balancer rebuild, the replicas were in the Lua source (checked above)
        return
    try:
        text = snapshot(1, initial_peers(inv), inv.upstream)
    except FdngxError:
        _note("peers refused")
        return
    lines = text.splitlines()
    peers = [ln for ln in lines if ln.startswith("peer ")]
    # the comment, the generation and the upstream (as data: fdngx.peers), then one line per replica
    assert lines[1:3] == ["generation 1", f"upstream {inv.upstream}"], text
    assert len(lines) == 3 + len(inv.instances) and len(peers) == len(inv.instances), text
    assert all(len(ln.split()) == 8 for ln in peers), text
    assert sorted(ln.split()[1] for ln in peers) == sorted(i.name for i in inv.instances), text


plan_strategy = st.lists(st.tuples(st.integers(-5, 20_000), st.booleans()), min_size=1, max_size=4)
# Mostly values that pass (so most examples render), hostile ones often enough.
some_log = st.one_of(plain_path, st.just("off"), st.none(), access_log)
some_listen = st.one_of(st.integers(1024, 65535).map(lambda p: f"127.0.0.1:{p}"), st.just("[::1]:8080"), listen)


@scaled(30)
@given(inventory_text(hostile_rate=0.3), some_log, some_listen, plan_strategy)
def test_property_config_shape_nginx_flavor(text: str | bytes, log: str | None, listen_at: str,
                                            plan: list[tuple[int, bool]]) -> None:
    _check_shapes(Flavor.NGINX, text, log, listen_at, plan)


@scaled(20)
@given(inventory_text(hosts=ip_text, hostile_rate=0.3), some_log, some_listen, plan_strategy)
def test_property_config_shape_openresty_flavor(text: str | bytes, log: str | None, listen_at: str,
                                                plan: list[tuple[int, bool]]) -> None:
    _check_shapes(Flavor.OPENRESTY, text, log, listen_at, plan)


@pytest.mark.parametrize("flavor", list(Flavor))
def test_config_shape_of_the_issue_payloads(flavor: Flavor) -> None:
    """The payloads of issue 10, one by one: refused, or (if validation ever let one through) harmless."""
    import json

    payloads = ['::1%"..(os.execute("id > PWNED") and "").."', "fe80::1%eth0;x", "999", "0x7f000001",
                "127.0.0.1; include /etc/passwd", "localhost\n"]
    for host in payloads:
        doc = json.dumps({"version": 1, "instances": [{"name": "dp0", "host": host, "port": 8001}]})
        _check_shapes(flavor, doc, "x; } server { listen 1; }", "127.0.0.1:8080", [(1, False)])
        _check_shapes(flavor, doc, None, "127.0.0.1:8080", [(1, False)])
