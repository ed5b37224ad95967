"""The Lua balancer's snapshot parser (templates/lua/fdngx/peers.lua) against fdngx's own Python validation,
on random and hostile peer lines (hypothesis).

A snapshot reaches the balancer as data, from the peers file or an admin POST, and the hand-written Lua
parser is all that stands between that text and `ngx.balancer`. Its grammar is fdngx's: a name the inventory
accepts (fdngx.inventory.NAME), a host Python's `ipaddress` reads as a literal without a scope id, of a server
(fdngx.nginx.openresty.balancer_host: the check the snapshot writer makes; no unspecified, multicast or
broadcast address, which the inventory refuses too), bounded decimal integers.
The property: the Lua parser accepts a one-peer snapshot exactly when that Python reference does, so a
host Python refuses is never dialled by nginx, and a line fdngx would write is never refused at a push.
IPv6 text is generated group by group (gaps, embedded IPv4, over-long groups, stray characters), and
written every legal way and one character off, where a hand-written parser is most likely to differ from a
maintained one. And two spellings of one address are one address, as the inventory counts them.
"""

from __future__ import annotations

import re
import subprocess
from collections.abc import Iterator

import pytest
from hypothesis import event, given
from hypothesis import strategies as st

from fdngx.inventory import NAME, address_key
from fdngx.nginx.openresty import balancer_host
from tests.security.conftest import scaled
from tests.security.strategies import META
from tests.support import NEEDS_LUAJIT, luajit_coprocess

pytestmark = NEEDS_LUAJIT

# A coprocess: reads "<length>\n<body>" and answers one line per body, "ok" or "err <reason>".
SERVER = r"""
local peers = require('fdngx.peers')
while true do
  local n = io.read('*l')
  if not n then break end
  local body = io.read(tonumber(n)) or ''
  local snap, err = peers.parse(body)
  if snap then
    local p = snap.peers[1]
    io.write(string.format('ok %s %s %d %d %d %.3f\n', p.addr, tostring(p.down), p.port, p.weight, p.capacity,
                           p.load))
  else
    io.write('err ', (err:gsub('\n', ' ')), '\n')
  end
  io.flush()
end
"""

MAX_LINE = 400  # peers.lua M.MAX_LINE, in bytes
INT = re.compile(r"0|[1-9][0-9]{0,15}")
LOAD = re.compile(r"[0-9]+(\.[0-9]{1,3})?")


def _int(s: str, lo: int, hi: int) -> bool:
    return INT.fullmatch(s) is not None and lo <= int(s) <= hi


def reference(line: str) -> bool:
    """Whether `generation 1` + this line is a snapshot fdngx would accept, by fdngx's Python rules."""
    raw = line.encode("utf-8", "surrogatepass")
    if b"\r" in raw or b"\0" in raw or len(raw) > MAX_LINE or not line.startswith("peer "):
        return False
    fields = line[5:].split(" ")
    if len(fields) != 7 or any(f == "" for f in fields):
        return False
    name, host, port, weight, down, capacity, load = fields
    return (NAME.fullmatch(name) is not None and balancer_host(host) and _int(port, 1, 65535)
            and _int(weight, 1, 10_000) and down in ("0", "1") and _int(capacity, 1, 1_000_000)
            and len(load) <= 12 and LOAD.fullmatch(load) is not None and float(load) <= 1_000_000)


@pytest.fixture(scope="module")
def lua_parser(tmp_path_factory: pytest.TempPathFactory) -> Iterator[subprocess.Popen[bytes]]:
    with luajit_coprocess(tmp_path_factory.mktemp("lua") / "serve.lua", SERVER) as proc:
        yield proc


def lua_parse(proc: subprocess.Popen[bytes], body: bytes) -> str:
    assert proc.stdin is not None and proc.stdout is not None
    proc.stdin.write(b"%d\n" % len(body) + body)
    proc.stdin.flush()
    return proc.stdout.readline().decode("utf-8", "replace").rstrip("\n")


# -- what a peer line is made of -----------------------------------------------------------------------------

def mostly(good: st.SearchStrategy[str], bad: list[str], one_in: int = 12) -> st.SearchStrategy[str]:
    """`good`, and one time in `one_in` a bad piece: a text with one flaw is the hard case for a parser."""
    return st.integers(1, one_in).flatmap(lambda k: st.sampled_from(bad) if k == 1 else good)


hexgroup = mostly(st.from_regex(r"[0-9A-Fa-f]{1,4}", fullmatch=True),
                  ["", "0", "00000", "12345", "fffff", "g", "-1", " ", "fFfF", "+1"])
octet = mostly(st.integers(0, 255).map(str), ["256", "01", "00", "0x7f", "-1", "1e2", "", "999", "0000"])
v4 = st.one_of(st.lists(octet, min_size=4, max_size=4), st.lists(octet, min_size=1, max_size=5)).map(".".join)


@st.composite
def v6(draw: st.DrawFn) -> str:
    """IPv6-like text built group by group: a gap (::) anywhere or twice, a trailing dotted quad, odd counts."""
    groups = draw(st.lists(hexgroup, min_size=0, max_size=9) if draw(st.booleans()) else
                  st.lists(hexgroup, min_size=5, max_size=8))
    gaps = draw(st.lists(st.integers(0, len(groups)), max_size=2))
    parts: list[str] = list(groups)
    for at in sorted(gaps, reverse=True):
        parts.insert(at, "")  # joined by ':', an empty part between two makes '::'
    text = ":".join(parts)
    if draw(st.booleans()):
        text += ":" + draw(v4)
    if draw(st.integers(0, 9)) == 0:
        at = draw(st.integers(0, len(text)))
        text = text[:at] + draw(st.sampled_from(["%eth0", ":", ".", "::", "[", "]", "\t", "\uff11", "1"])) + text[at:]
    return text


v6_groups = st.lists(st.one_of(st.just(0), st.integers(0, 0xFFFF)), min_size=8, max_size=8)


@st.composite
def spelled(draw: st.DrawFn, groups: list[int]) -> str:
    """IPv6 `groups` written any way RFC 4291 allows: each group padded or not, upper or lower case, any one
    run of zero groups (not only the longest) as '::', the last 32 bits as a dotted quad or not."""
    cells = [f"{g:04x}" if draw(st.booleans()) else f"{g:x}" for g in groups]
    if draw(st.booleans()):
        cells = [c.upper() if draw(st.booleans()) else c for c in cells]
    quad = draw(st.booleans())
    if quad:
        cells[6:8] = [".".join(str(b) for b in groups[6].to_bytes(2, "big") + groups[7].to_bytes(2, "big"))]
    zero_runs = [(i, j) for i in range(len(cells)) for j in range(i + 1, len(cells) + 1)
                 if all(groups[k] == 0 for k in range(i, j)) and not (quad and j > 6)]
    if zero_runs and draw(st.booleans()):
        i, j = draw(st.sampled_from(zero_runs))
        return ":".join(cells[:i]) + "::" + ":".join(cells[j:])
    return ":".join(cells)


def v6_written() -> st.SearchStrategy[str]:
    return v6_groups.flatmap(spelled)


@st.composite
def one_flaw(draw: st.DrawFn, base: st.SearchStrategy[str]) -> str:
    """`base` with one character inserted, deleted or replaced: the neighbours of a valid text."""
    text = draw(base)
    at = draw(st.integers(0, len(text)))
    ch = draw(st.sampled_from([*"0123456789aAfFgG:.%[] ", "\uff11"]))
    how = draw(st.sampled_from(["insert", "delete", "replace"]))
    if how == "insert" or not text:
        return text[:at] + ch + text[at:]
    at = min(at, len(text) - 1)
    return text[:at] + ("" if how == "delete" else ch) + text[at + 1:]


host = st.one_of(st.ip_addresses(v=4).map(str), st.ip_addresses(v=6).map(str),
                 st.ip_addresses(v=6).map(lambda a: a.exploded), v4, v6(), v6(), v6(),
                 st.sampled_from(["::", "::1", "::ffff:1.2.3.4", "1::1.2.3.4", "localhost", "[::1]", ""]))
name = st.one_of(st.from_regex(r"[A-Za-z0-9][A-Za-z0-9._:@-]{0,20}", fullmatch=True), st.just("n" * 128),
                 st.just("n" * 129), st.text(max_size=12))


some_host = st.one_of(v6_written(), one_flaw(v6_written()), one_flaw(one_flaw(v6_written())),
                      st.ip_addresses(v=4).map(str), one_flaw(st.ip_addresses(v=4).map(str)), v6(), v4)


def count(lo: int, hi: int) -> st.SearchStrategy[str]:
    return st.one_of(st.integers(lo - 2, hi + 2).map(str), st.sampled_from([str(lo), str(hi), str(hi + 1)]),
                     st.integers(0, 99).map(lambda n: f"0{n}"), st.sampled_from(["", "+1", "1.0", "1e3", "\uff11",
                                                                                 "9" * 17, "0x10", "-0"]))


load = st.one_of(st.decimals(0, 1_000_001, places=3).map(str), st.integers(0, 1_000_002).map(str),
                 st.sampled_from(["0.", ".5", "1.2345", "1e3", "nan", "inf", "-1", "0001.500", "1000000.001", ""]))


@st.composite
def peer_line(draw: st.DrawFn) -> str:
    fields = [draw(name), draw(host), draw(count(1, 65535)), draw(count(1, 10_000)),
              draw(st.sampled_from(["0", "1", "2", "", "true"])), draw(count(1, 1_000_000)), draw(load)]
    seps = [draw(st.sampled_from([" "] * 12 + ["  ", "\t", ""])) for _ in fields]
    line = "peer" + "".join(s + f for s, f in zip(seps, fields, strict=True))
    if draw(st.integers(0, 7)) == 0:  # a hostile piece anywhere
        at = draw(st.integers(0, len(line)))
        line = line[:at] + draw(st.sampled_from([m for m in META if m != "\n"])) + line[at:]
    return line


@scaled(400)
@given(peer_line())
def test_property_the_lua_parser_accepts_a_peer_exactly_when_fdngx_would(lua_parser: subprocess.Popen[bytes],
                                                                         line: str) -> None:
    want = reference(line)
    got = lua_parse(lua_parser, b"generation 1\n" + line.encode("utf-8", "surrogatepass") + b"\n")
    event("accepted" if want else "refused")
    assert got.startswith("ok") == want, (line, got)
    if want:
        # what the balancer will dial: the same address Python reads, IPv6 in brackets
        _, addr, *_ = got.split(" ")
        h = line.split(" ")[2]
        assert addr == (f"[{h}]" if ":" in h else h), (line, got)


@scaled(1500)
@given(some_host)
def test_property_the_lua_parser_reads_a_host_exactly_as_python_does(lua_parser: subprocess.Popen[bytes],
                                                                    host: str) -> None:
    """Hosts alone (the other fields valid): IPv6 written every legal way, and one or two characters off."""
    line = f"peer dp0 {host} 8000 1 0 16 0"
    want = reference(line)
    event("accepted" if want else "refused")
    got = lua_parse(lua_parser, b"generation 1\n" + line.encode("utf-8", "surrogatepass") + b"\n")
    assert got.startswith("ok") == want, (host, got)


@st.composite
def two_hosts(draw: st.DrawFn) -> tuple[str, str]:
    """Two spellings of one address (IPv6 twice, or an IPv4 address and its IPv4-mapped IPv6 form), or of two
    addresses that differ in one group."""
    groups = draw(v6_groups)
    how = draw(st.sampled_from(["same", "mapped", "other"]))
    if how == "mapped":
        v4 = draw(st.ip_addresses(v=4))
        return str(v4), draw(spelled([0, 0, 0, 0, 0, 0xFFFF, int(v4) >> 16, int(v4) & 0xFFFF]))
    other = list(groups)
    if how == "other":
        k = draw(st.integers(0, 7))
        other[k] = (other[k] + draw(st.integers(1, 0xFFFF))) % 0x10000
    return draw(spelled(groups)), draw(spelled(other))


@scaled(400)
@given(two_hosts())
def test_property_two_spellings_of_one_address_are_one_address(lua_parser: subprocess.Popen[bytes],
                                                                hosts: tuple[str, str]) -> None:
    """The balancer's duplicate check counts an address as fdngx's inventory does (address_key): a snapshot
    cannot list one replica twice under two spellings and give it two shares."""
    a, b = hosts
    same = address_key(a, 8000) == address_key(b, 8000)
    got = lua_parse(lua_parser, f"generation 1\npeer a {a} 8000 1 0 16 0\npeer b {b} 8000 1 0 16 0\n".encode())
    if not (balancer_host(a) and balancer_host(b)):  # "::", "::ffff:0.1.2.3", "ff02::1": no server's address
        event("no server's address")
        assert "bad host" in got, (a, b, got)
        return
    event("same address" if same else "two addresses")
    assert ("duplicate address" in got) == same and (got.startswith("ok") != same), (a, b, got)


def test_the_reference_and_the_parser_agree_on_chosen_lines(lua_parser: subprocess.Popen[bytes]) -> None:
    """The generator's corners, kept as plain cases: what each side says about them is pinned here too."""
    lines = {
        "peer dp0 127.0.0.1 8000 1 0 16 0": True,
        "peer dp0 1:2:3:4:5:6:7:: 8000 1 0 16 0": True,
        "peer dp0 ::1.2.3.4 8000 1 0 16 0.125": True,
        "peer dp0 1:2:3:4:5:6::1.2.3.4 8000 1 0 16 0": False,  # 6 groups + a quad + a gap of none
        "peer dp0 fe80::1%eth0 8000 1 0 16 0": False,
        "peer dp0 ::\uff11 8000 1 0 16 0": False,
        "peer dp0 127.0.0.1 08000 1 0 16 0": False,
        "peer dp0 127.0.0.1 8000 1 0 16 1000000.001": False,
        "peer dp0 127.0.0.1  8000 1 0 16 0": False,
        "peer dp0 0000:0000:0000:0000:0000:ffff:255.255.254.255 8000 1 0 16 0": True,  # 45 bytes
        "peer dp0 0000:0000:0000:0000:0000:ffff:255.255.255.255 8000 1 0 16 0": False,  # broadcast, mapped
        "peer dp0 0.0.0.0 8000 1 0 16 0": False,  # "this host": an outside review, 2026-12-06
        "peer dp0 :: 8000 1 0 16 0": False,
        "peer dp0 224.0.0.1 8000 1 0 16 0": False,
        "peer dp0 ff02::1 8000 1 0 16 0": False,
        "peer dp0 ff::1 8000 1 0 16 0": True,  # 00ff: not multicast
        "peer dp0 1:2:3:4::5:6:7:8 8000 1 0 16 0": False,
        "peer dp0 12345:: 8000 1 0 16 0": False,
        "peer dp0 ::ffff:01.2.3.4 8000 1 0 16 0": False,
    }
    for line, want in lines.items():
        assert reference(line) == want, line
        got = lua_parse(lua_parser, b"generation 1\n" + line.encode() + b"\n")
        assert got.startswith("ok") == want, (line, got)
