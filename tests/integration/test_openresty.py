"""The OpenResty flavor on Debian's nginx + libnginx-mod-http-lua: weights change with no reload."""

from __future__ import annotations

import collections
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import requests

from fdngx.domain import Listen, ServerState
from fdngx.nginx.openresty import Admin, lua_modules
from tests.support import Backends, Nginx, fdngx, free_ports, wait_for, write_inventory

pytestmark = [
    pytest.mark.nginx,
    pytest.mark.skipif(not lua_modules(None), reason="needs libnginx-mod-http-lua (make test installs it)"),
]


class LuaSite:
    def __init__(self, tmp: Path, backends: Backends, weights: list[int]) -> None:
        self.port, admin_port = free_ports(2)
        self.inv = write_inventory(tmp / "fdngx.json", [
            {"name": f"b{i}", "host": "127.0.0.1", "port": p, "metrics_port": p, "weight": w}
            for i, (p, w) in enumerate(zip(backends.ports, weights, strict=True))
        ])
        self.conf = tmp / "nginx" / "nginx.conf"
        self.url = f"http://127.0.0.1:{self.port}"
        self.args = ["-i", str(self.inv), "--mode", "standalone", "--flavor", "openresty",
                     "--listen", str(self.port), "--admin-listen", f"127.0.0.1:{admin_port}", "--out", str(self.conf)]
        fdngx("render", *self.args, check=True)
        token = (self.conf.parent / ".nginx.conf.fdngx-admin-token").read_text().strip()
        self.admin = Admin(Listen("127.0.0.1", admin_port), token)
        self.nginx = Nginx(self.conf.parent).start(f"{self.url}/health")

    def split(self, n: int, workers: int = 1) -> collections.Counter[str]:
        def one(_: int) -> str:
            return requests.post(f"{self.url}/v1/completions", json={}, timeout=10).headers["X-Fdngx-Replica"]

        with ThreadPoolExecutor(workers) as pool:
            return collections.Counter(pool.map(one, range(n)))


@pytest.fixture
def lua_site(tmp_path: Path) -> Iterator[LuaSite]:
    with Backends(free_ports(2), ["b0", "b1"], delay=0.05) as backends:
        site = LuaSite(tmp_path, backends, [1, 3])
        try:
            yield site
        finally:
            site.nginx.stop()


def test_config_is_valid_and_token_stays_out_of_it(lua_site: LuaSite) -> None:
    text = lua_site.conf.read_text()
    assert "balancer_by_lua_block" in text and "lua_shared_dict fdngx_fastdeploy" in text
    assert lua_site.admin.token not in text
    assert (lua_site.conf.parent / ".nginx.conf.fdngx-admin-token").stat().st_mode & 0o777 == 0o600
    # rendering again is byte-identical (the token file is reused, not regenerated)
    assert "unchanged" in fdngx("render", *lua_site.args, check=True).stderr


def test_idle_split_follows_static_weights(lua_site: LuaSite) -> None:
    counts = lua_site.split(120)
    assert 0.62 <= counts["b1"] / 120 <= 0.88, counts  # weights 1:3, idle: weighted ties like nginx


def test_pushes_change_routing_without_reload(lua_site: LuaSite) -> None:
    workers = lua_site.nginx.worker_pids()
    # Hold b1 out: everything goes to b0.
    assert lua_site.admin.push({"b0": ServerState(1), "b1": ServerState(3, down=True)}) == 2
    assert lua_site.split(30) == collections.Counter({"b0": 30})
    # Back in, and b0 now carries heavy load from elsewhere (e.g. another frontend): b1 takes the traffic.
    lua_site.admin.push({"b0": ServerState(1), "b1": ServerState(1)}, loads={"b0": 50.0, "b1": 0.0})
    counts = lua_site.split(40, workers=4)
    assert counts["b1"] >= 36, counts
    assert lua_site.nginx.worker_pids() == workers  # no reload happened


def test_inflight_is_counted_and_released(lua_site: LuaSite) -> None:
    lua_site.split(40, workers=8)
    def peers() -> dict[str, int]:
        # GET on the admin location lists "name weight down inflight score" per peer.
        r = requests.get(lua_site.admin.url, headers={"X-Fdngx-Token": lua_site.admin.token}, timeout=5)
        return {ln.split()[0]: int(float(ln.split()[3])) for ln in r.text.splitlines()}

    peers_now = wait_for(lambda: (p := peers()) and all(v == 0 for v in p.values()) and p,
                         10, what="in-flight counters back to 0")
    assert set(peers_now) == {"b0", "b1"}


def test_all_held_out_fails_open(lua_site: LuaSite) -> None:
    lua_site.admin.push({"b0": ServerState(1, down=True), "b1": ServerState(1, down=True)})
    assert sum(lua_site.split(10).values()) == 10


def test_admin_needs_the_token(lua_site: LuaSite) -> None:
    bad = Admin(lua_site.admin.listen, "x" * 32)
    with pytest.raises(Exception, match="HTTP 403"):
        bad.push({"b0": ServerState(1)})
    r = requests.post(lua_site.admin.url, data="b0 1 1 0\n", timeout=5)
    assert r.status_code == 403
    assert lua_site.split(20)["b0"] > 0  # the rejected push changed nothing
