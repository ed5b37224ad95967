"""Every value fdngx accepts is one nginx accepts (an outside review found times, sizes, numbers and paths that
fdngx wrote into a config and `nginx -t` then refused, naming nginx's directive instead of fdngx's option).

The reviewer's values are refused by the real CLI: exit 2, one line naming the option and the value, nothing
written. Then two properties against the real nginx (`nginx -t` under a temp prefix, one run an example):
values drawn from the grammar fdngx documents render a config nginx accepts, and values drawn from a broader
grammar (nginx's other units, repeated or unordered units, overflowing numbers, long names) are refused by
fdngx or accepted by nginx, never accepted by fdngx and refused by nginx.

The nginx rules fdngx mirrors (fdngx.nginx.escape, fdngx.nginx.frontdoor): ngx_parse_time(value, 0) for the
millisecond directives, ngx_parse_size (k, m) for client_body_buffer_size and ngx_parse_offset (k, m, g) for
client_max_body_size, limit_req's burst >= 1, ngx_atoi's 2^63-1, the upstream keepalive cache nginx allocates
when it loads the config, NGX_CONF_BUFFER and PATH_MAX/NAME_MAX for paths.
"""

from __future__ import annotations

import contextlib
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import event, given
from hypothesis import strategies as st

from fdngx.domain import Instance, Inventory, Mode
from fdngx.errors import UsageError
from fdngx.nginx.render import RenderOptions, render
from tests.security.conftest import scaled
from tests.support import UNUSED_PORT, Nginx, fdngx, free_ports, write_inventory

MAX_MSEC = 24 * 86_400_000  # 24d: within what every nginx takes (2^31-1 ms on 32-bit and older builds)
MSEC = {"w": 604_800_000, "d": 86_400_000, "h": 3_600_000, "m": 60_000, "s": 1_000, "ms": 1}
MAX_INT = (1 << 63) - 1
REPLICA = UNUSED_PORT  # in the inventory; nothing connects to it


# -- the reviewer's values, through the real CLI -------------------------------------------------------------

TIMES = ["1s1s", "30m1h", "1d1d", "1M", "1y", "99999999999999999999s", "999999999999d"]
REVIEWED = [
    ("--rate-burst", "0"),
    *(("--read-timeout", v) for v in TIMES),
    *(("--connect-timeout", v) for v in ("1s1s", "1y", "999999999999d")),
    ("--client-body-buffer-size", "1G"), ("--client-body-buffer-size", "99999999999999999999g"),
    ("--max-fails", "99999999999999999999"),
    ("--keepalive", "2147483648"), ("--keepalive", "4294967296"),
    ("--access-log", "/tmp/" + "a" * 4995),
    ("--lua-dict-size", "512k"), ("--lua-dict-size", "1g"), ("--lua-dict-size", "4097m"),
]


@pytest.mark.parametrize("option, value", REVIEWED, ids=[f"{o}={v[:24]}" for o, v in REVIEWED])
def test_values_nginx_refuses_are_refused_by_fdngx(tmp_path: Path, option: str, value: str) -> None:
    inv = write_inventory(tmp_path / "inv.json", [{"name": "dp0", "host": "127.0.0.1", "port": REPLICA}])
    out = tmp_path / "conf" / "fdngx.conf"
    out.parent.mkdir()
    extra = ["--rate-limit", "10"] if option == "--rate-burst" else []
    proc = fdngx("render", "-i", str(inv), "--mode", "site", "--listen", "127.0.0.1:8080", "--out", str(out),
                 *extra, f"{option}={value}")
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2, f"exit {proc.returncode}: {proc.stderr[-1000:]}"
    assert len(lines) == 1 and option in lines[0] and value[:40] in lines[0], proc.stderr[-1000:]
    assert "Traceback" not in proc.stderr and not proc.stdout
    assert not list(out.parent.iterdir()), "something was written"


def test_the_bounds_themselves_are_accepted_by_fdngx_and_by_nginx(tmp_path: Path) -> None:
    """The largest (and smallest) value of each bound, rendered by the CLI, passes `nginx -t`."""
    prefix = tmp_path / "p"
    log = prefix / "logs"
    while 1024 - len(str(log)) - 1 > 255:  # directories, then a file name of 255 bytes at most
        log /= "d" * 200
    log.mkdir(parents=True)
    log /= "f" * (1024 - len(str(log)) - 1)
    assert len(str(log)) == 1024 and max(len(n) for n in log.parts) <= 255
    inv = write_inventory(tmp_path / "inv.json", [{"name": "dp0", "host": "127.0.0.1", "port": REPLICA}])
    for bounds in (["--rate-burst", "100000", "--read-timeout", "24d", "--connect-timeout", "3w3d",
                    "--client-body-buffer-size", "1024m", "--max-fails", "100000", "--fail-timeout", "86400",
                    "--keepalive", "65535", "--access-log", str(log)],
                   ["--rate-burst", "1", "--read-timeout", "1ms", "--connect-timeout", "2073600",
                    "--client-body-buffer-size", "1", "--max-fails", "0", "--fail-timeout", "1", "--keepalive", "0"]):
        proc = fdngx("render", "-i", str(inv), "--mode", "standalone", "--listen", f"127.0.0.1:{free_ports(1)[0]}",
                     "--prefix", str(prefix), "--out", str(prefix / "nginx.conf"), "--rate-limit", "10", *bounds)
        assert proc.returncode == 0, proc.stderr[-2000:]
        checked = Nginx(prefix).test()
        assert checked.returncode == 0, checked.stderr[-2000:]
    longer = fdngx("render", "-i", str(inv), "--mode", "standalone", "--out", "-", f"--access-log={log}x")
    assert longer.returncode == 2 and "--access-log" in longer.stderr and "1024" in longer.stderr, longer.stderr


# -- the properties, with the real nginx ---------------------------------------------------------------------

def _digits(big: bool) -> st.SearchStrategy[str]:
    numbers = st.integers(0, 10**22) if big else st.integers(0, 10**4)
    return st.tuples(numbers, st.integers(0, 2)).map(lambda t: "0" * t[1] + str(t[0]))


@st.composite
def good_time(draw: st.DrawFn) -> str:
    """A time fdngx documents: units w d h m s ms, each once, largest first, 1ms..24d; or bare seconds."""
    if draw(st.booleans()):
        return str(draw(st.integers(1, MAX_MSEC // 1000)))
    units = [u for u in MSEC if draw(st.booleans())] or [draw(st.sampled_from(list(MSEC)))]
    parts, left = [], MAX_MSEC
    for i, unit in enumerate(units):
        n = draw(st.integers(1 if i == 0 else 0, max(1 if i == 0 else 0, left // MSEC[unit] // (len(units) - i))))
        left -= n * MSEC[unit]
        parts.append(f"{n}{unit}")
    return "".join(parts)


def broad_time() -> st.SearchStrategy[str]:
    """nginx's own units too (y M), in any order, repeated, bare numbers after units, huge numbers, spaces."""
    part = st.tuples(_digits(big=False) | _digits(big=True), st.sampled_from(["y", "M", *MSEC, "", " "]))
    return st.one_of(good_time(), st.sampled_from([*TIMES, "0", "24d1ms", "25d", "1h30", "1hs", "4w"]),
                     st.lists(part, min_size=1, max_size=4).map(lambda ps: "".join(n + u for n, u in ps)))


def good_size(most: int, units: str, least: int = 0) -> st.SearchStrategy[str]:
    scale = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30}
    return st.sampled_from(["", *units, *units.upper()]).flatmap(
        lambda u: st.integers(least, most // scale[u.lower()]).map(lambda n: f"{n}{u}"))


def broad_size() -> st.SearchStrategy[str]:
    unit = st.sampled_from(["", "k", "K", "m", "M", "g", "G", "t", "b", "kb"])
    return st.tuples(_digits(big=False) | _digits(big=True), unit).map("".join)


def broad_int() -> st.SearchStrategy[int]:
    edges = [2**31 - 1, 2**31, 2**32, MAX_INT, MAX_INT + 1, 10**20]
    return st.one_of(st.integers(-3, 300_000), st.sampled_from(edges), st.integers(0, 2**65))


def good_log(base: str) -> st.SearchStrategy[str]:
    name = st.text("abcdefghijklmnopqrstuvwxyz0123456789._-", min_size=0, max_size=254)
    return name.map(lambda n: f"{base}/a{n}")


def broad_log(base: str) -> st.SearchStrategy[str]:
    name = st.text("abcdefghijklmnopqrstuvwxyz0123456789._-", min_size=0, max_size=300)
    return name.map(lambda n: f"{base}/a{n}")


BASE = "logs"  # under the prefix: relative paths resolve against it


def good_values() -> st.SearchStrategy[dict[str, Any]]:
    return st.fixed_dictionaries({
        "read_timeout": good_time(), "connect_timeout": good_time(), "worker_shutdown_timeout": good_time(),
        "client_body_buffer_size": good_size(1 << 30, "km", least=1),
        "client_max_body_size": good_size(MAX_INT, "kmg"),
        "rate_burst": st.integers(1, 100_000), "keepalive": st.integers(0, 65_535),
        "max_fails": st.integers(0, 100_000), "fail_timeout": st.integers(1, 86_400),
        "worker_processes": st.one_of(st.just("auto"), st.integers(1, 512).map(str)),
        "access_log": good_log(BASE),
    })


BROAD: dict[str, st.SearchStrategy[Any]] = {
    "read_timeout": broad_time(), "connect_timeout": broad_time(), "worker_shutdown_timeout": broad_time(),
    "client_body_buffer_size": broad_size(), "client_max_body_size": broad_size(),
    "rate_burst": broad_int(), "keepalive": broad_int(), "max_fails": broad_int(), "fail_timeout": broad_int(),
    "worker_processes": st.one_of(st.just("auto"), broad_int().map(str), st.text("0123456789auto ", max_size=6)),
    "access_log": broad_log(BASE),
}


@contextlib.contextmanager
def _prefix() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="fdngx-values-") as tmp:
        yield Path(tmp)


def _nginx_takes(values: dict[str, Any]) -> tuple[bool, str]:
    """Render a standalone config with `values` (UsageError if fdngx refuses) and run `nginx -t` on it."""
    port = free_ports(1)[0]  # nginx -t binds it
    opts = RenderOptions(mode=Mode.STANDALONE, listen=f"127.0.0.1:{port}", rate_limit="10r/s",  # type: ignore[arg-type]
                         **values)
    text = render(Inventory([Instance("dp0", "127.0.0.1", REPLICA, REPLICA)]), opts)
    with _prefix() as prefix:
        (prefix / "nginx.conf").write_text(text)
        proc = Nginx(prefix).test()
    return proc.returncode == 0, proc.stderr.strip()[-600:]


@pytest.mark.nginx
@given(values=good_values())
@scaled(25)
def test_values_fdngx_documents_render_a_config_nginx_accepts(values: dict[str, Any]) -> None:
    ok, err = _nginx_takes(values)
    assert ok, f"nginx -t refused {values}: {err}"


@pytest.mark.nginx
@given(field_value=st.sampled_from(sorted(BROAD)).flatmap(lambda f: st.tuples(st.just(f), BROAD[f])))
@scaled(50)
def test_fdngx_never_accepts_a_value_nginx_refuses(field_value: tuple[str, Any]) -> None:
    field, value = field_value
    try:
        ok, err = _nginx_takes({field: value})
    except UsageError as exc:
        assert "\n" not in str(exc)
        event("refused by fdngx")
        return
    event("accepted by both")
    assert ok, f"fdngx accepted {field}={value!r} but nginx -t refused it: {err}"
