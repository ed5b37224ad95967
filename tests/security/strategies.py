"""Hypothesis strategies for hostile input, shared by the property tests and the config-shape test."""

from __future__ import annotations

import json
import math
from typing import Any

from hypothesis import strategies as st

from fdngx.domain import Engine

# -- hostile text ----------------------------------------------------------------------------------------

META = ["", ";", "{", "}", "#", "$", "'", '"', "\\", "\n", "\r", "\t", " ", "\x00", "%", "%eth0", "%lo;x", "/",
        "..", "${x}", "]]", "--", "\u2028", "\uff1b", "\U0001f600", ")..os.execute('id')..(", '"..x.."']
HOSTILE_HOSTS = [
    "999", "0x7f000001", "127.1", "1.0x7f", "0177.0.0.1", "fe80::1%eth0", '::1%"..(os.execute("id") and "").."',
    "127.0.0.1 backup", "10.0.0.1; include /etc/passwd", "localhost\n", "[::1]", "a_b.example", "-a.example",
    "a-.example", "a..b", ".", "", "x" * 254, ("a" * 64) + ".example", "::ffff:127.0.0.1", "0:0::1", "LOCALHOST.",
]


def _mangle(base: st.SearchStrategy[str]) -> st.SearchStrategy[str]:
    """`base` with hostile pieces stuck before, after or inside."""
    return st.tuples(base, st.sampled_from(META), st.sampled_from(META), st.booleans()).map(
        lambda t: (t[1] + t[0] + t[2]) if t[3] else (t[0][: len(t[0]) // 2] + t[1] + t[0][len(t[0]) // 2:]))


label = st.from_regex(r"[a-z0-9]([a-z0-9-]{0,8}[a-z0-9])?", fullmatch=True)
tld = st.from_regex(r"[a-z]([a-z0-9-]{0,6}[a-z0-9])?", fullmatch=True).filter(lambda t: not t.startswith("0x"))
hostname = st.tuples(st.lists(label, max_size=3), tld).map(lambda t: ".".join([*t[0], t[1]]))
ip_text = st.one_of(st.ip_addresses(v=4).map(str), st.ip_addresses(v=6).map(str),
                    st.ip_addresses(v=6).map(lambda a: a.exploded))
host = st.one_of(ip_text, hostname, st.sampled_from(HOSTILE_HOSTS), _mangle(st.one_of(ip_text, hostname)),
                 st.text(max_size=40))
name = st.one_of(st.from_regex(r"[A-Za-z0-9][A-Za-z0-9._:@-]{0,20}", fullmatch=True),
                 _mangle(st.from_regex(r"dp[0-9]{1,3}", fullmatch=True)), st.text(max_size=30))
number = st.one_of(st.integers(-10, 70_000), st.sampled_from([True, False, 1.0, 8001.5, "8001", None, 2**64, -0.0,
                                                              math.inf, math.nan]))
json_leaf = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False), st.text(max_size=10))
json_any = st.recursive(json_leaf, lambda c: st.one_of(st.lists(c, max_size=3),
                                                       st.dictionaries(st.text(max_size=5), c, max_size=3)),
                        max_leaves=12)


@st.composite
def deep(draw: st.DrawFn) -> Any:
    depth = draw(st.integers(1, 60))
    value: Any = draw(json_leaf)
    for _ in range(depth):
        value = [value] if draw(st.booleans()) else {"k": value}
    return value


valid_name = st.from_regex(r"[A-Za-z0-9][A-Za-z0-9._:@-]{0,20}", fullmatch=True)
valid_host_text = st.one_of(ip_text, hostname)


@st.composite
def instance_doc(draw: st.DrawFn, n: int, valid: bool, hosts: st.SearchStrategy[str] = valid_host_text) -> Any:
    """Instance number `n`: valid fields (unique name and port), then, unless `valid`, some hostile ones."""
    if not valid and draw(st.integers(0, 20)) == 0:
        return draw(json_any)
    doc: dict[str, Any] = {"name": f"{draw(valid_name)}-{n}", "host": draw(hosts), "port": 1000 + n}
    for key, strat in (("metrics_port", st.integers(1, 65535)), ("weight", st.integers(1, 10_000)),
                       ("max_num_seqs", st.integers(1, 1_000_000)), ("engine", st.sampled_from(Engine.values())),
                       ("pid", json_any), ("drain", st.booleans())):
        if draw(st.booleans()):
            doc[key] = draw(strat)
    if valid:
        return doc
    for _ in range(draw(st.integers(1, 3))):
        key = draw(st.sampled_from(["name", "host", "host", "port", "metrics_port", "weight", "max_num_seqs",
                                    "engine", "role", "drain", "extra", "drop"]))
        if key == "drop":
            doc.pop(draw(st.sampled_from(["name", "host", "port"])), None)
        elif key == "name":
            doc[key] = draw(name)
        elif key == "host":
            doc[key] = draw(host)
        elif key == "drain":
            doc[key] = draw(st.one_of(json_any, st.sampled_from(["true", 1, 0, None])))
        elif key in ("engine", "role"):
            doc[key] = draw(st.one_of(name, st.sampled_from(["mixed", "prefill", "mixed\n", "vllm "])))
        elif key == "extra":
            doc[key] = draw(deep())
        else:
            doc[key] = draw(number)
    return doc


@st.composite
def inventory_text(draw: st.DrawFn, hosts: st.SearchStrategy[str] = valid_host_text,
                   hostile_rate: float = 0.5) -> str | bytes:
    """An inventory document: mostly a JSON object whose instances are valid but for (with `hostile_rate`)
    one hostile instance or field; sometimes bytes, text or any JSON."""
    kind = draw(st.integers(0, 40))
    if kind == 0:
        return draw(st.binary(max_size=200))
    if kind == 1:
        return draw(st.text(max_size=200))
    if kind == 2:
        return json.dumps(draw(json_any))
    hostile = draw(st.floats(0, 1)) < hostile_rate
    count = draw(st.integers(0, 12))
    bad = draw(st.integers(0, max(0, count - 1))) if hostile else -1
    doc: dict[str, Any] = {"instances": [draw(instance_doc(n, n != bad, hosts)) for n in range(count)]}
    if hostile and draw(st.integers(0, 3)) == 0:
        doc["version"] = draw(st.sampled_from([True, 1.0, "1", 0, 2, None, [1]]))
    elif draw(st.booleans()):
        doc["version"] = 1
    if draw(st.booleans()):
        good_upstream = st.from_regex(r"[A-Za-z_][A-Za-z0-9_]{0,20}", fullmatch=True)
        doc["upstream"] = draw(st.one_of(good_upstream, name) if hostile else good_upstream)
    if hostile and draw(st.integers(0, 4)) == 0:
        doc["x"] = draw(deep())
    if hostile and draw(st.integers(0, 4)) == 0 and doc["instances"]:  # a duplicate address in another spelling
        first = doc["instances"][0]
        if isinstance(first, dict) and isinstance(first.get("host"), str):
            twin = dict(first, name="twin")
            twin["host"] = draw(st.sampled_from([first["host"].upper(), first["host"] + ".", first["host"]]))
            doc["instances"].append(twin)
    text = json.dumps(doc)
    if hostile and draw(st.integers(0, 10)) == 0:  # a cut, or junk at the end
        cut = draw(st.integers(0, len(text)))
        text = text[:cut] + draw(st.sampled_from(["", "}", "\x00", "[" * 3000]))
    return text


# -- CLI values that land in a config ------------------------------------------------------------------------

plain_path = st.from_regex(r"/[a-z0-9_.-]{1,12}(/[a-z0-9_.-]{1,12}){0,3}", fullmatch=True)
access_log = st.one_of(st.none(), st.just("off"), plain_path, _mangle(plain_path), st.text(max_size=30))
listen = st.one_of(
    st.integers(1, 65535).map(str),
    st.tuples(ip_text, st.integers(1, 65535)).map(lambda t: f"[{t[0]}]:{t[1]}" if ":" in t[0] else f"{t[0]}:{t[1]}"),
    st.tuples(hostname, st.integers(1, 65535)).map(lambda t: f"{t[0]}:{t[1]}"),
    _mangle(st.just("127.0.0.1:8080")), st.sampled_from(["*:8080", "0x7f000001:80", "[fe80::1%eth0]:80", "8080 ssl"]),
)
