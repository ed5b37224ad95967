"""`fdngx status --out` tells what the config nginx runs gives each replica, not only what the policy state says
fdngx applied; and a `render` without --scrape over a config whose weights a cron job keeps says it resets them.

An outside review (H1, M1): after cron's `render --scrape --reload` had put `backup`/28/28 in place, a plain
`fdngx render --reload` ran weight=1 on all three without a word, and status went on showing backup:3/28/28 and
shares 0/50/50 % (also with nginx stopped, and with a hand-written file at --out). Real nginx under a temp
prefix, `fdngx sim` replicas, 127.0.0.1 only.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from fdngx.sim.process import SimProcess, free_ports, start_sim
from fdngx.weights.state import InstanceState, PolicyState
from fdngx.weights.store import store_for
from tests.support import Nginx, wait_for, write_inventory


def run(*args: str | Path) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FDNGX_")}
    return subprocess.run([sys.executable, "-m", "fdngx", *map(str, args)], capture_output=True, text=True,
                          timeout=120, env=env)


def ok(*args: str | Path) -> subprocess.CompletedProcess[str]:
    proc = run(*args)
    assert proc.returncode == 0, proc.stderr
    return proc


def doc_of(*args: str | Path) -> dict[str, Any]:
    return dict(json.loads(ok("status", *args, "--json").stdout))


def weights(doc: dict[str, Any]) -> dict[str, object]:
    return {i["name"]: i["current_weight"] for i in doc["instances"]}


@dataclass
class Lab:
    inv: Path
    conf: Path
    url: str
    render: list[str]  # the options every render of this config takes
    nginx: Nginx

    @property
    def state(self) -> Path:
        return store_for(self.conf).path


def fleet(tmp_path: Path, n: int = 2) -> tuple[Path, list[int]]:
    """An inventory of `n` replicas on free ports (nothing started)."""
    ports = free_ports(2 * n)
    inv = write_inventory(tmp_path / "fdngx.json", [
        {"name": f"dp{i}", "host": "127.0.0.1", "port": ports[i], "metrics_port": ports[n + i], "engine": "sim",
         "max_num_seqs": 8} for i in range(n)])
    return inv, ports


@pytest.fixture
def lab(tmp_path: Path) -> Iterator[Lab]:
    """Two sim replicas behind a standalone nginx that fdngx rendered (static weights, 1 each)."""
    inv, ports = fleet(tmp_path)
    sim: SimProcess | None = start_sim(ports[:2], ports[2:], max_num_seqs=8)
    nginx = None
    try:
        listen = free_ports(1)[0]
        conf = tmp_path / "nginx" / "nginx.conf"
        render = ["-i", str(inv), "--mode", "standalone", "--listen", f"127.0.0.1:{listen}", "--out", str(conf)]
        ok("render", *render)
        nginx = Nginx(tmp_path / "nginx").start(f"http://127.0.0.1:{listen}/health")
        yield Lab(inv, conf, f"http://127.0.0.1:{listen}", render, nginx)
    finally:
        if nginx is not None:
            nginx.stop()
        sim.stop()


def test_status_shows_what_the_config_gives_nginx_after_a_plain_render(lab: Lab) -> None:
    ok("render", *lab.render, "--scrape", "--reload")  # cron's cycle: the policy's weights (20 each here)
    cron = doc_of("-i", lab.inv, "--out", lab.conf)
    assert weights(cron) == {"dp0": 20, "dp1": 20} and not cron.get("config_notes"), cron

    ok("render", *lab.render, "--reload")  # "5. Apply changes safely", after an inventory edit: static weights
    assert "weight=1 " in lab.conf.read_text() and "weight=20 " not in lab.conf.read_text()  # render's default
    table = ok("status", "-i", lab.inv, "--out", lab.conf)
    rows = {line.split()[0]: line.split() for line in table.stdout.splitlines()[1:3]}
    assert rows["dp0"][5:8] == ["1", "20", "50%"] and rows["dp1"][5:8] == ["1", "20", "50%"], table.stdout
    said = " ".join(table.stderr.split())
    assert (f"{lab.conf} gives nginx dp0 weight 1, dp1 weight 1 (the inventory's static weights: a render at "
            ) in said and (f" without --scrape), the policy state {lab.state} says dp0 weight 20, dp1 weight 20: "
                           "WEIGHT is the file's; the next sidecar or cron cycle puts the policy's back") in said, said
    assert f"WEIGHT: what {lab.conf} gives nginx (generation " in table.stdout

    doc = doc_of("-i", lab.inv, "--out", lab.conf)
    assert weights(doc) == {"dp0": 1, "dp1": 1} and doc["weights_from"] == "config", doc
    assert [(i["state_weight"], i["in_config"]) for i in doc["instances"]] == [(20, True), (20, True)]
    assert len(doc["config_notes"]) == 1 and "gives nginx dp0 weight 1" in doc["config_notes"][0], doc

    ok("render", *lab.render, "--scrape", "--reload")  # the next cron cycle: the policy's again, nothing said
    again = doc_of("-i", lab.inv, "--out", lab.conf)
    assert weights(again) == {"dp0": 20, "dp1": 20} and again["config_notes"] == [], again
    assert again["weights_from"] == "config", again


def test_a_plain_render_over_weights_a_cron_job_keeps_says_it_resets_them(lab: Lab) -> None:
    """The cron case of the warning a running sidecar's config already got: one line naming the policy state
    and --scrape; the render itself still writes (and nginx runs) the inventory's static weights."""
    ok("render", *lab.render, "--scrape", "--reload")
    plain = ok("render", *lab.render, "--reload")
    warned = [ln for ln in plain.stderr.splitlines() if "keeps the weights" in ln]
    assert len(warned) == 1 and warned[0].startswith(
        f"fdngx: warning: a cron job or sidecar keeps the weights of {lab.conf} from the replicas' load (its "
        f"policy state {lab.state}, written "), plain.stderr
    assert "resets them to the inventory's static weights" in warned[0] and "use --scrape" in warned[0]
    assert "applied and reloaded" in plain.stderr and "weight=1 " in lab.conf.read_text()
    again = ok("render", *lab.render, "--scrape", "--reload")
    assert "keeps the weights" not in again.stderr, again.stderr  # --scrape keeps them: nothing to warn of


def test_status_says_when_nginx_does_not_serve_the_file(lab: Lab) -> None:
    """A render written but not loaded (no --reload): nginx serves another generation. nginx stopped: nothing
    answers. Before, status showed the same table either way."""
    ok("render", *lab.render, "--scrape")  # written only: nginx keeps the static render it loaded
    doc = doc_of("-i", lab.inv, "--out", lab.conf)
    assert weights(doc) == {"dp0": 20, "dp1": 20}, doc
    assert any(f"{lab.url}/fdngx/generation serves generation " in n and "it has not loaded this file" in n
               for n in doc["config_notes"]), doc

    lab.nginx.stop()
    wait_for(lambda: not lab.nginx.proc or lab.nginx.proc.poll() is not None, 20, what="nginx stopped")
    down = ok("status", "-i", lab.inv, "--out", lab.conf)
    assert (f"nginx at {lab.url}/fdngx/generation refused the connection: is it running? WEIGHT is what "
            f"{lab.conf} gives it once it starts") in down.stderr, down.stderr


def write_state(path: Path, age: float = 0.0, **applied: InstanceState) -> Path:
    path.write_text(json.dumps(PolicyState(dict(applied), updated_at=time.time() - age).to_dict()))
    return path


def test_a_file_fdngx_did_not_write_or_none_at_all_is_said(tmp_path: Path) -> None:
    """A hand-written upstream at --out (nginx runs it; every apply is refused) or no file there: the policy
    state's weights are shown, and the line says they are not what nginx has. Nothing listens at the replicas."""
    inv, _ = fleet(tmp_path)
    conf = tmp_path / "upstream.conf"
    conf.write_text("upstream fastdeploy {\n    server 127.0.0.1:9;\n}\n")
    write_state(store_for(conf).path, dp0=InstanceState(weight=7), dp1=InstanceState(weight=13))
    doc = doc_of("-i", inv, "--out", conf)
    assert weights(doc) == {"dp0": 7, "dp1": 13} and doc["weights_from"] == "state", doc
    assert doc["config_notes"] == [
        f"{conf}: not a config fdngx wrote (no fdngx header): nginx runs what it says, not these weights, and every "
        "sidecar or cron apply refuses to replace it (move it away, or --force); WEIGHT is the policy state's, not "
        "what nginx has"], doc
    assert [i["in_config"] for i in doc["instances"]] == [None, None]

    missing = tmp_path / "elsewhere.conf"
    proc = ok("status", "-i", inv, "--out", missing, "--state", store_for(conf).path)
    assert (f"{missing}: no such file, so what nginx runs cannot be read from it (is --out the file nginx "
            "reads?); WEIGHT is the policy state's") in proc.stderr, proc.stderr


def test_a_replica_the_file_lacks_gets_nothing_from_nginx(tmp_path: Path) -> None:
    """A replica added to the inventory after the last render: nginx has no server line for it."""
    inv, _ = fleet(tmp_path, 2)
    conf = tmp_path / "upstream.conf"
    ok("render", "-i", inv, "--out", conf)
    (tmp_path / "more").mkdir()
    more, _ = fleet(tmp_path / "more", 3)
    doc = doc_of("-i", more, "--out", conf)
    got = {i["name"]: (i["current_down"], i["in_config"], i["share"]) for i in doc["instances"]}
    # the file was rendered for other ports: dp0 and dp1 are there by name; dp2 is not
    assert got["dp2"] == (True, False, 0.0), got
    assert any(f"{conf} has no server line for dp2: nginx sends it nothing" in n for n in doc["config_notes"]), doc


def test_the_openresty_flavor_keeps_the_policy_states_weights_and_says_why(tmp_path: Path) -> None:
    inv, _ = fleet(tmp_path)
    conf = tmp_path / "upstream.conf"
    ok("render", "-i", inv, "--flavor", "openresty", "--out", conf)
    write_state(store_for(conf).path, dp0=InstanceState(weight=7), dp1=InstanceState(weight=13))
    pid = tmp_path / "nginx.pid"  # no nginx includes the block here: the only thing said of the file
    doc = doc_of("-i", inv, "--out", conf, "--pid-file", pid)
    assert weights(doc) == {"dp0": 7, "dp1": 13} and doc["weights_from"] == "state", doc
    assert doc["config_notes"] == [f"{conf}: no nginx master runs per {pid}, so no nginx serves this file: nothing "
                                   "is balanced until nginx starts (another nginx includes it? name it with "
                                   "--nginx-conf or --pid-file)"], doc
    table = ok("status", "-i", inv, "--out", conf)
    assert (f"WEIGHT: the policy state's (the OpenResty flavor pushes weights to its Lua balancer; {conf} holds "
            "none)") in table.stdout, table.stdout


# -- render without --scrape over a config a cron job keeps (M1) -------------------------------------------


def test_render_check_without_scrape_says_what_it_compares_with(tmp_path: Path) -> None:
    inv, _ = fleet(tmp_path)
    conf = tmp_path / "upstream.conf"
    ok("render", "-i", inv, "--out", conf)
    bare = run("render", "-i", inv, "--out", conf, "--check")
    assert bare.returncode == 0 and "note:" not in bare.stderr, bare.stderr  # no policy state: nothing to say

    state = write_state(store_for(conf).path, dp0=InstanceState(weight=20), dp1=InstanceState(weight=20))
    check = run("render", "-i", inv, "--out", conf, "--check")
    assert check.returncode == 0, check.stderr  # the exit code keeps its meaning: this render changes nothing
    assert ("fdngx: note: compared with a render of the inventory's static weights: a cron job or sidecar keeps "
            f"the weights of {conf} from the replicas' load (its policy state {state}, written ") in check.stderr
    assert "--scrape compares with what its next cycle writes" in check.stderr, check.stderr

    write_state(state, age=3600, dp0=InstanceState(weight=20), dp1=InstanceState(weight=20))  # nobody keeps it
    old = ok("render", "-i", inv, "--out", conf)
    assert "keeps the weights" not in old.stderr, old.stderr


def test_a_static_render_warns_only_where_it_resets_kept_weights(tmp_path: Path) -> None:
    """Written without --reload too (nginx takes it at its next reload); not with --scrape; not the OpenResty
    flavor, whose file holds no weights and whose balancer keeps a newer pushed snapshot."""
    inv, _ = fleet(tmp_path)
    conf = tmp_path / "upstream.conf"
    write_state(store_for(conf).path, dp0=InstanceState(weight=20), dp1=InstanceState(weight=20))
    plain = ok("render", "-i", inv, "--out", conf)
    assert plain.stderr.count("fdngx: warning: a cron job or sidecar keeps the weights") == 1, plain.stderr

    lua = tmp_path / "lua" / "upstream.conf"
    lua.parent.mkdir()
    write_state(store_for(lua).path, dp0=InstanceState(weight=20), dp1=InstanceState(weight=20))
    static_lua = ok("render", "-i", inv, "--flavor", "openresty", "--out", lua)
    assert "keeps the weights" not in static_lua.stderr, static_lua.stderr


def test_a_hand_edit_of_the_config_is_said_by_status_and_kept_when_cron_replaces_it(lab: Lab) -> None:
    """A sysadmin changes a weight in fdngx's file by hand (its header says not to): status says so, as it says
    of other ways the file and the policy part; the next cron cycle puts the policy's weights back and keeps
    the edited file beside it, said on stderr."""
    ok("render", *lab.render, "--scrape", "--reload")
    text = lab.conf.read_text()
    edited = text.replace("weight=20 ", "weight=5 ", 1)
    assert edited != text
    lab.conf.write_text(edited)
    doc = doc_of("-i", lab.inv, "--out", lab.conf)
    kept = lab.conf.with_name(f".{lab.conf.name}.fdngx-edit")
    assert any(f"{lab.conf}: edited by hand since fdngx wrote it" in n and "WEIGHT is the edit's" in n
               and f"({kept}*)" in n for n in doc["config_notes"]), doc
    assert sorted(weights(doc).values()) == [5, 20], doc

    cron = ok("render", *lab.render, "--scrape", "--reload")
    assert "edited by hand since fdngx wrote it" in cron.stderr and kept.read_text() == edited, cron.stderr
    again = doc_of("-i", lab.inv, "--out", lab.conf)
    assert weights(again) == {"dp0": 20, "dp1": 20} and again["config_notes"] == [], again


def test_upstream_mode_says_when_the_nginx_that_includes_it_does_not_run(tmp_path: Path) -> None:
    """An upstream block has no /fdngx/generation to ask: status looks for the master of the nginx that includes
    it (its pid file, verified as an apply does), and says when there is none; nothing while it runs. Nothing
    listens at the replicas' ports (connection refused on 127.0.0.1)."""
    inv, _ports = fleet(tmp_path)
    prefix = tmp_path / "nginx"
    prefix.mkdir()
    out = prefix / "upstream.conf"
    ok("render", "-i", inv, "--out", out)
    listen = free_ports(1)[0]
    pid = prefix / "logs" / "nginx.pid"
    (prefix / "nginx.conf").write_text(
        f"pid {pid};\nevents {{}}\nhttp {{\n    include {out};\n"
        f"    server {{ listen 127.0.0.1:{listen}; location / {{ proxy_pass http://fastdeploy; }} }}\n}}\n")
    args = ["-i", inv, "--out", out, "--timeout", "0.2", "--nginx-conf", prefix / "nginx.conf"]
    nginx = Nginx(prefix).start()
    try:
        assert not [n for n in doc_of(*args)["config_notes"] if "no nginx master" in n]
    finally:
        nginx.stop()
    wait_for(lambda: not pid.exists(), 10, what="nginx gone")
    notes = doc_of(*args)["config_notes"]
    assert notes == [f"{out}: no nginx master runs per {pid}, so no nginx serves this file: WEIGHT is what it gives "
                     "nginx once nginx starts (another nginx includes it? name it with --nginx-conf or --pid-file)"]
    table = ok("status", *args)
    assert f"{out}: no nginx master runs per {pid}" in " ".join(table.stderr.split()), table.stderr
    # --pid-file names another master's file: a pid file that is not an nginx master's counts as none
    other = tmp_path / "other.pid"
    other.write_text(f"{os.getpid()}\n")
    assert any(f"no nginx master runs per {other}" in n
               for n in doc_of("-i", inv, "--out", out, "--timeout", "0.2", "--pid-file", other)["config_notes"])
