"""Addresses and names fdngx accepted that nginx then refused, or took with another meaning (an outside review
of 2026-12-06, run against the real nginx): a multicast --listen passed `nginx -t` and the reload, and the front
door answered nothing for 15 s until the apply's confirmation rolled back; an --admin-listen on the --listen
port answered clients with the admin server's 404; `--access-log syslog:server=...` sent every request line to
a server; `localhost` and `127.0.0.1` on one port were two servers (twice the share); an upstream name over
27-29 characters overflowed nginx's variables hash; a path with a byte that is not UTF-8 ended in a traceback.

Each is refused up front now: one line naming the option or the inventory field, a non-zero exit, nothing
written. Then a property against the real `nginx -t` (OpenResty flavor, Lua modules loaded): an --admin-allow
value fdngx accepts is one nginx accepts.
"""

from __future__ import annotations

import collections
import os
import shutil
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import pytest
import requests
from hypothesis import event, given
from hypothesis import strategies as st

from fdngx.domain import Flavor, Instance, Inventory, Mode
from fdngx.errors import ApplyError, UsageError
from fdngx.nginx.control import NginxControl
from fdngx.nginx.frontdoor import admin_allow_list
from fdngx.nginx.render import RenderOptions, render
from tests.security.conftest import scaled
from tests.support import REPO, UNUSED_PORT, Nginx, Site, fdngx, find_nginx, free_ports, prepare_prefix, write_inventory

REPLICA = UNUSED_PORT  # in the inventories; nothing connects to it


def _inv(tmp: Path, hosts: list[tuple[str, int]], upstream: str = "fastdeploy") -> Path:
    return write_inventory(tmp / "fdngx.json", [{"name": f"r{i}", "host": h, "port": p, "metrics_port": p}
                                                for i, (h, p) in enumerate(hosts)], upstream)


def _refused(proc: subprocess.CompletedProcess[str], *names: str, code: int = 2) -> str:
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert proc.returncode == code, f"exit {proc.returncode}: {proc.stderr[-400:]}"
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    for name in names:
        assert name in lines[0], lines[0]
    return lines[0]


@pytest.mark.parametrize("addr, why", [
    ("224.0.0.1", "multicast"), ("[ff02::1]", "multicast"), ("255.255.255.255", "broadcast"),
    ("[::ffff:127.0.0.1]", "write 127.0.0.1"), ("[::ffff:7f00:1]", "write 127.0.0.1"), ("[fe80::1]", "scope id"),
])
@pytest.mark.parametrize("option", ["--listen", "--admin-listen"])
def test_a_listen_address_nginx_cannot_serve_on_is_refused(tmp_path: Path, option: str, addr: str, why: str) -> None:
    inv = _inv(tmp_path, [("127.0.0.1", REPLICA)])
    out = tmp_path / "site.conf"
    proc = fdngx("render", "-i", str(inv), "--mode", "site", "--flavor", "openresty", option, f"{addr}:8080",
                 "--out", str(out))
    _refused(proc, option, why)
    assert not out.exists() and not list(tmp_path.glob(".site.conf*"))


@pytest.mark.nginx
def test_a_multicast_listen_never_takes_the_front_door_down(site: Site) -> None:
    """The old answer: exit 1 after 15.6 s, 74 of 78 /health polls failed meanwhile. Now refused before any
    file is written or nginx signalled: every poll during the run answers 200."""
    seen: list[object] = []
    stop = threading.Event()

    def poll() -> None:
        while True:  # one poll at least, however quick the refusal
            try:
                seen.append(requests.get(f"{site.url}/health", timeout=2).status_code)
            except requests.RequestException as exc:
                seen.append(type(exc).__name__)
            if stop.wait(0.05):
                return

    before = site.conf.read_bytes()
    t = threading.Thread(target=poll)
    t.start()
    try:
        args = [f"224.0.0.1:{site.port}" if a == f"127.0.0.1:{site.port}" else a for a in site.args]
        assert args != list(site.args), "the site's --listen was replaced"
        proc = fdngx("render", *args, "--reload")
    finally:
        stop.set()
        t.join()
    _refused(proc, "--listen", "multicast")
    assert site.conf.read_bytes() == before
    assert seen and set(seen) == {200}, collections.Counter(map(str, seen))


@pytest.mark.parametrize("extra", [
    ["--listen", "127.0.0.1:9401"],  # the default --admin-listen
    ["--listen", "127.0.0.1:8080", "--admin-listen", "127.0.0.1:8080"],
    ["--listen", "127.0.0.1:8080", "--admin-listen", "8080"],  # every IPv4 address, this one too
    ["--listen", "[::]:8080", "--admin-listen", "[::1]:8080"],
])
def test_admin_listen_on_the_listen_port_is_refused_naming_both(tmp_path: Path, extra: list[str]) -> None:
    """nginx -t only warned ('conflicting server name'); the reload then answered /v1/ from the admin server
    (6 of 9 polls got its 404) until the apply's confirmation rolled back."""
    inv = _inv(tmp_path, [("127.0.0.1", REPLICA)])
    proc = fdngx("render", "-i", str(inv), "--mode", "site", "--flavor", "openresty", *extra,
                 "--admin-token-file", str(tmp_path / "tok"), "--out", "-")
    _refused(proc, "--admin-listen", "--listen")


def test_distinct_listen_and_admin_ports_still_render(tmp_path: Path) -> None:
    inv = _inv(tmp_path, [("127.0.0.1", REPLICA)])
    for extra in (["--listen", "127.0.0.1:8080", "--admin-listen", "127.0.0.2:8080"],
                  ["--listen", "[::1]:8080", "--admin-listen", "127.0.0.1:8080"],
                  ["--listen", "8080", "--admin-listen", "127.0.0.1:9401"]):
        proc = fdngx("render", "-i", str(inv), "--mode", "site", "--flavor", "openresty", *extra,
                     "--admin-token-file", str(tmp_path / "tok"), "--out", "-")
        assert proc.returncode == 0, (extra, proc.stderr)


@pytest.mark.parametrize("listen", ["127.0.0.1:{p}", "{p}", "localhost:{p}", "*:{p}"])
def test_listen_on_a_replicas_own_address_is_refused(tmp_path: Path, listen: str) -> None:
    """nginx -t accepts it; nginx then proxies to itself whenever it gets the port first."""
    inv = _inv(tmp_path, [("127.0.0.1", REPLICA + 1 if REPLICA < 65535 else 1), ("127.0.0.1", REPLICA)])
    proc = fdngx("render", "-i", str(inv), "--mode", "site", "--listen", listen.format(p=REPLICA), "--out", "-")
    if listen.startswith("localhost"):  # a name: fdngx does not resolve --listen; nginx -t does
        return
    _refused(proc, "--listen", "'r1'", code=1)


@pytest.mark.parametrize("mode", ["site", "upstream"])
@pytest.mark.parametrize("port_of", ["api", "metrics"])
def test_the_admin_listen_on_a_replicas_port_or_metrics_port_is_refused(tmp_path: Path, mode: str,
                                                                       port_of: str) -> None:
    """The balancer's admin server on a port a replica of this host serves on (its API or its /metrics): nginx -t
    passes (it binds nothing), and the reload then fails to bind, or takes the replica's scrapes."""
    other = REPLICA + 1 if REPLICA < 65535 else 1
    api, metrics = (REPLICA, other) if port_of == "api" else (other, REPLICA)
    inv = write_inventory(tmp_path / "fdngx.json", [{"name": "r0", "host": "127.0.0.1", "port": api,
                                                     "metrics_port": metrics}])
    proc = fdngx("render", "-i", str(inv), "--mode", mode, "--flavor", "openresty", "--admin-listen",
                 f"127.0.0.1:{REPLICA}", "--out", str(tmp_path / "out.conf"))
    line = _refused(proc, "--admin-listen", "'r0'", f"127.0.0.1:{REPLICA}", code=1)
    assert ("serves metrics at" in line) == (port_of == "metrics"), line
    assert not (tmp_path / "out.conf").exists()
    moved = fdngx("render", "-i", str(inv), "--mode", mode, "--flavor", "openresty", "--admin-listen",
                  f"127.0.0.1:{other + 1 if other < 65535 else 2}", "--out", str(tmp_path / "out.conf"))
    assert moved.returncode == 0, moved.stderr


@pytest.mark.parametrize("listen", ["8000", "*:8000", "0.0.0.0:8000"])
@pytest.mark.parametrize("host", ["192.0.2.11", "198.51.100.7", "gpu-node-1"])
def test_a_replica_on_another_host_at_the_listen_port_is_rendered(tmp_path: Path, host: str, listen: str) -> None:
    """The usual multi-node layout: every GPU node serves on 8000, and so does the front door (a review of the
    check above: it refused every such fleet, and a running sidecar failed every cycle). Render only: nothing
    connects to these addresses, and fdngx looks up no name."""
    proc = fdngx("render", "-i", str(_inv(tmp_path, [(host, 8000)])), "--mode", "site", "--listen", listen,
                 "--out", "-")
    assert proc.returncode == 0, proc.stderr


@pytest.mark.parametrize("value", ["255.255.255.255", "10.0.0.1,255.255.255.255", "fe80::1%eth0"])
def test_admin_allow_values_nginx_refuses_are_usage_errors(tmp_path: Path, value: str) -> None:
    inv = _inv(tmp_path, [("127.0.0.1", REPLICA)])
    proc = fdngx("render", "-i", str(inv), "--mode", "site", "--flavor", "openresty", "--admin-allow", value,
                 "--admin-token-file", str(tmp_path / "tok"), "--out", "-")
    _refused(proc, "--admin-allow")


@pytest.mark.parametrize("value", ["syslog:server=127.0.0.1:5514", "SYSLOG:server=unix:/dev/log"])
def test_access_log_is_a_file_not_a_syslog_server(tmp_path: Path, value: str) -> None:
    inv = _inv(tmp_path, [("127.0.0.1", REPLICA)])
    proc = fdngx("render", "-i", str(inv), "--mode", "site", "--access-log", value, "--out", "-")
    _refused(proc, "--access-log", "syslog")


@pytest.mark.parametrize("host, word", [("::ffff:255.255.255.255", "broadcast"), ("255.255.255.255", "broadcast"),
                                        ("239.1.2.3", "multicast"), ("ff05::2", "multicast")])
def test_an_inventory_host_that_is_no_server_is_refused(tmp_path: Path, host: str, word: str) -> None:
    proc = fdngx("render", "-i", str(_inv(tmp_path, [(host, REPLICA)])), "--out", "-")
    _refused(proc, "'host'", word, code=1)


def test_localhost_and_127_0_0_1_on_one_port_are_one_replica(tmp_path: Path) -> None:
    """Both passed nginx -t: two server lines for one replica, twice its share."""
    proc = fdngx("render", "-i", str(_inv(tmp_path, [("localhost", REPLICA), ("127.0.0.1", REPLICA)])), "--out", "-")
    _refused(proc, "already listed", code=1)


def test_a_path_that_is_not_utf8_is_one_line_not_a_traceback(tmp_path: Path) -> None:
    cert = Path(os.fsdecode(os.fsencode(tmp_path) + b"/c\xff.pem"))
    cert.write_text("x")
    inv = _inv(tmp_path, [("127.0.0.1", REPLICA)])
    proc = fdngx("render", "-i", str(inv), "--mode", "site", "--tls-cert", str(cert), "--tls-key", str(cert),
                 "--out", "-")
    _refused(proc, "--tls-cert", "UTF-8")


# -- upstream names: within nginx's variables hash, or refused naming the field -------------------------------

def _nginx_t(conf: Path, *, lua: bool, standalone: bool) -> subprocess.CompletedProcess[str]:
    prefix = conf.parent / "p"
    prepare_prefix(prefix)
    main = conf
    if not standalone:
        head = "".join(f"load_module modules/{m}.so;\n" for m in ("ndk_http_module", "ngx_http_lua_module")
                       ) if lua else ""
        main = prefix / "main.conf"
        main.write_text(f"{head}pid logs/nginx.pid;\nevents {{}}\nhttp {{ include {conf}; }}\n")
        if lua:
            (prefix / "modules").symlink_to("/usr/lib/nginx/modules")
    return subprocess.run([find_nginx(), "-t", "-p", f"{prefix}/", "-c", str(main), "-e", "logs/error.log"],
                          capture_output=True, text=True, timeout=30)


@pytest.mark.nginx
@pytest.mark.parametrize("flavor", ["nginx", "openresty"])
@pytest.mark.parametrize("length", [27, 28, 30, 64])
def test_a_standalone_config_takes_every_upstream_name_the_inventory_does(tmp_path: Path, flavor: str,
                                                                          length: int) -> None:
    """Its http {} is fdngx's: past 27 characters it sets variables_hash_bucket_size 128. Before: nginx -t said
    'could not build variables_hash, you should increase variables_hash_bucket_size: 64'."""
    inv = _inv(tmp_path, [("127.0.0.1", REPLICA)], upstream="u" * length)
    conf = tmp_path / "nginx.conf"
    proc = fdngx("render", "-i", str(inv), "--mode", "standalone", "--flavor", flavor, "--out", str(conf),
                 "--admin-token-file", str(tmp_path / "tok"), "--rate-limit", "1r/s",
                 "--listen", f"127.0.0.1:{free_ports(1)[0]}", "--admin-listen", f"127.0.0.1:{free_ports(1)[0]}")
    assert proc.returncode == 0, proc.stderr
    t = _nginx_t(conf, lua=flavor == "openresty", standalone=True)
    assert t.returncode == 0, t.stderr[-600:]


@pytest.mark.nginx
@pytest.mark.parametrize("mode, flavor", [("site", "nginx"), ("site", "openresty"), ("upstream", "openresty")])
def test_a_long_upstream_name_in_the_users_http_block_is_said_with_what_to_do(tmp_path: Path, mode: str,
                                                                             flavor: str) -> None:
    """A site or upstream config goes into the user's http {}, which may set variables_hash_bucket_size (then
    any name works: an outside review of an up-front refusal of these, which broke running sidecars). With
    nginx's default the test fails, and fdngx's error says which name and what to set."""
    inv = _inv(tmp_path, [("127.0.0.1", REPLICA)], upstream="u" * 40)
    conf = tmp_path / "site.conf"
    proc = fdngx("render", "-i", str(inv), "--mode", mode, "--flavor", flavor, "--out", str(conf),
                 "--admin-token-file", str(tmp_path / "tok"),
                 *(["--listen", f"127.0.0.1:{free_ports(1)[0]}"] if mode == "site" else []))
    assert proc.returncode == 0, proc.stderr
    if mode == "upstream":
        wrapped = tmp_path / "server.conf"
        wrapped.write_text(f"include {conf};\n")
        conf = wrapped
    prefix = conf.parent / "p"
    t = _nginx_t(conf, lua=flavor == "openresty", standalone=False)
    assert t.returncode != 0 and "variables_hash_bucket_size" in t.stderr
    with pytest.raises(ApplyError) as err:
        NginxControl(find_nginx(), prefix / "main.conf", prefix).test()
    assert "the inventory's 'upstream'" in str(err.value) and "variables_hash_bucket_size 128;" in str(err.value)
    main = prefix / "main.conf"
    main.write_text(main.read_text().replace("http {", "http { variables_hash_bucket_size 128;"))
    NginxControl(find_nginx(), main, prefix).test()  # the user's http {} set it: nginx takes the name


# -- --admin-allow against the real nginx ----------------------------------------------------------------------

def _networks() -> st.SearchStrategy[str]:
    v4 = st.tuples(st.ip_addresses(v=4), st.integers(0, 32)).map(lambda a: f"{a[0]}/{a[1]}")
    v6 = st.tuples(st.ip_addresses(v=6), st.integers(0, 128)).map(lambda a: f"{a[0]}/{a[1]}")
    edges = st.sampled_from(["255.255.255.255", "0.0.0.0", "::", "::ffff:255.255.255.255", "224.0.0.1",
                             "127.0.0.1/8", "::ffff:10.0.0.1", "fe80::1", "fe80::1%eth0", "10.0.0.1/33"])
    return st.one_of(st.ip_addresses().map(str), v4, v6, edges)


@pytest.mark.nginx
@given(value=_networks())
@scaled(60)
def test_an_admin_allow_value_fdngx_accepts_is_one_nginx_accepts(value: str) -> None:
    try:
        admin_allow_list(value)
    except UsageError as exc:
        assert "\n" not in str(exc) and "--admin-allow" in str(exc)
        event("refused by fdngx")
        return
    event("accepted by both")
    with tempfile.TemporaryDirectory(prefix="fdngx-allow-") as tmp:
        base = Path(tmp)
        conf = base / "site.conf"
        listen, admin = free_ports(2)
        opts = RenderOptions(mode=Mode.SITE, flavor=Flavor.OPENRESTY, admin_allow=value,  # type: ignore[arg-type]
                             listen=f"127.0.0.1:{listen}", admin_listen=f"127.0.0.1:{admin}",  # type: ignore[arg-type]
                             admin_token_file=str(base / "tok"), peers_file=str(base / "peers")).validated()
        conf.write_text(render(Inventory([Instance("dp0", "127.0.0.1", REPLICA, REPLICA)]), opts))
        t = _nginx_t(conf, lua=True, standalone=False)
    assert t.returncode == 0, f"fdngx accepted --admin-allow {value!r}, nginx -t refused it: {t.stderr[-400:]}"


def test_an_openresty_out_in_a_directory_with_a_space_is_said_as_out(tmp_path: Path) -> None:
    """The peers file and the admin token live beside --out and are named bare in the config: the refusal named
    an --admin-token-file the user never gave."""
    (tmp_path / "sp ace").mkdir()
    out = tmp_path / "sp ace" / "site.conf"
    proc = fdngx("render", "-i", str(_inv(tmp_path, [("127.0.0.1", REPLICA)])), "--mode", "site", "--flavor",
                 "openresty", "--out", str(out))
    assert "--admin-token-file" not in _refused(proc, "--out", "without spaces")
    assert list((tmp_path / "sp ace").iterdir()) == []


@pytest.mark.skipif(shutil.which("unshare") is None or shutil.which("ip") is None, reason="needs unshare and ip")
def test_a_local_address_is_told_by_the_routing_table_not_by_bind(tmp_path: Path) -> None:
    """In a network namespace of its own (nothing leaves it): with ip_nonlocal_bind=1 (VRRP front doors) any
    address binds, and a bind() test took every replica for one of this host's (a review: --listen 8000 was
    refused for replicas on other nodes again). And an address added while fdngx runs is seen (no cache)."""
    script = (
        "import subprocess\n"
        "from fdngx.nginx.local import on_this_host\n"
        "subprocess.run(['ip', 'link', 'set', 'lo', 'up'], check=True)\n"
        "open('/proc/sys/net/ipv4/ip_nonlocal_bind', 'w').write('1')\n"
        "print(on_this_host('10.9.8.7'), on_this_host('127.0.0.1'))\n"
        "subprocess.run(['ip', 'addr', 'add', '10.9.8.7/32', 'dev', 'lo'], check=True)\n"
        "print(on_this_host('10.9.8.7'))\n"
        "open('/proc/sys/net/ipv4/ip_nonlocal_bind', 'w').write('0')\n"
        "subprocess.run(['ip', 'addr', 'add', '10.9.9.1/24', 'dev', 'lo'], check=True)\n"
        "subprocess.run(['ip', 'addr', 'add', '10.9.9.2/24', 'dev', 'lo'], check=True)\n"
        "print(on_this_host('10.9.9.2'))\n"
    )
    out = _in_namespace("-rn", script)
    # a second address of a subnet (routed from the first: a review) is this host's too
    assert out.split() == ["False", "True", "True", "True"], out


@pytest.mark.skipif(shutil.which("unshare") is None or shutil.which("ip") is None, reason="needs unshare and ip")
def test_a_listen_or_a_replica_given_as_a_name_is_taken_for_what_it_resolves_to(tmp_path: Path) -> None:
    """A name stands for its addresses, as nginx resolves a listen name at load: `--listen vm:PORT` with vm at
    127.0.0.1 and a replica at 127.0.0.1:PORT passed render's self-proxy check and the registry's own-listener
    refusal (only `localhost` was known as this host: a review). In a network and mount namespace of its own,
    with an /etc/hosts of the test's (nothing leaves it, no resolver is asked)."""
    hosts = tmp_path / "hosts"
    hosts.write_text("127.0.0.1 localhost\n127.0.0.1 vm\n10.9.8.7 far\n")
    script = (
        "import subprocess\n"
        "from fdngx.domain import Instance, Inventory, Listen, Mode\n"
        "from fdngx.errors import RenderError\n"
        "from fdngx.nginx.local import takes\n"
        "from fdngx.nginx.render import RenderOptions, check_renderable\n"
        "from fdngx.registry.rules import RegistrySettings\n"
        "subprocess.run(['ip', 'link', 'set', 'lo', 'up'], check=True)\n"
        f"subprocess.run(['mount', '--bind', {str(hosts)!r}, '/etc/hosts'], check=True)\n"
        f"P = {REPLICA}\n"
        "print(takes(Listen('vm', P), '127.0.0.1', P), takes(Listen('0.0.0.0', P), 'vm', P),\n"
        "      takes(Listen('127.0.0.1', P), 'far', P), takes(Listen('vm', P), '127.0.0.1', P + 1))\n"
        "own = RegistrySettings(own=(('--listen', Listen('vm', P)),))\n"
        "print(own.own_listener('127.0.0.1', P))\n"
        "opts = RenderOptions(mode=Mode.SITE, listen=f'vm:{P}').validated()\n"
        "try:\n"
        "    check_renderable(Inventory([Instance('dp0', '127.0.0.1', P, P)]), opts)\n"
        "except RenderError as exc:\n"
        "    print(exc)\n"
    )
    out = _in_namespace("-rnm", script)
    lines = out.splitlines()
    assert lines[0].split() == ["True", "True", "False", "False"], out
    assert lines[1] == f"fdngx's own --listen vm:{REPLICA}", out
    assert lines[2].startswith(f"instance 'dp0' is at 127.0.0.1:{REPLICA}, where --listen vm:{REPLICA}"), out


def _in_namespace(flags: str, script: str) -> str:
    """What `script` prints, run by this Python in namespaces of its own (`unshare FLAGS`); skipped where the
    kernel or the container allows none."""
    proc = subprocess.run(["unshare", flags, sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=60, cwd=REPO)
    if proc.returncode != 0 and "unshare" in proc.stderr:
        pytest.skip(f"no namespaces here (unshare {flags}): {proc.stderr.strip()[-200:]}")
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


@pytest.mark.nginx
def test_a_long_upstream_site_applies_when_the_users_http_block_sets_the_bucket_size(tmp_path: Path) -> None:
    """What fdngx's hint says to do must be enough: the candidate's test wrapper (an http {} of fdngx's own)
    refused the name with nginx's default bucket size, so `--reload` and every sidecar cycle failed (a review)."""
    (tmp_path / "logs").mkdir()
    (tmp_path / "fdngx").mkdir()
    backend, listen = free_ports(2)
    inv = write_inventory(tmp_path / "fdngx.json", [{"name": "r0", "host": "127.0.0.1", "port": backend,
                                                     "metrics_port": backend}], "u" * 40)
    site = tmp_path / "fdngx" / "site.conf"
    main = tmp_path / "main.conf"
    main.write_text("pid logs/nginx.pid;\nevents {}\n"
                    f"http {{\n    variables_hash_bucket_size 128;\n    include {site};\n}}\n")
    args = ["-i", str(inv), "--mode", "site", "--listen", f"127.0.0.1:{listen}", "--out", str(site),
            "--nginx-conf", str(main), "--prefix", str(tmp_path)]
    fdngx("render", *args, check=True)
    with Nginx(tmp_path, main).start(f"http://127.0.0.1:{listen}/fdngx/generation"):
        write_inventory(inv, [{"name": "r0", "host": "127.0.0.1", "port": backend, "metrics_port": backend,
                               "weight": 2}], "u" * 40)
        proc = fdngx("render", *args, "--reload")
        assert proc.returncode == 0 and "applied and reloaded" in proc.stderr, proc.stderr
