"""The files a sysadmin copies into production as they are, checked for what they do together.

- examples/cron/fdngx and the systemd units take every option from one settings file, examples/fdngx.toml
  (`--config /etc/fdngx/fdngx.toml`): each of them, run for real with it, writes the config the README's quick
  start renders (same mode, listener, server blocks). A cron line with the default `--mode upstream` once wrote
  an upstream block over the quick start's site (its listener gone), and one without --api-keys-file turned the
  key checks off.
- The units never start nginx (Wants=) and skip a missing nginx log directory (`-` in ReadWritePaths=), with the
  OpenResty log directory beside it, commented.
- examples/nginx/nginx.conf includes the file the units write, where their sandbox lets them write, and passes
  `nginx -t` with it.
- docker/gateway.sh: the health check speaks https when the config nginx runs serves TLS (it probed http and
  got 400: a restart loop), and FDNGX_INVENTORY=/a.json:/b.json merges both files (it was passed as one -i).

Everything listens on 127.0.0.1; every process is stopped by PID.
"""

from __future__ import annotations

import json
import re
import shlex
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import requests
import urllib3

from fdngx.nginx.control import find_nginx
from tests.integration.test_ops import Gateway, run
from tests.support import REPO, free_ports, self_signed, wait_for

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

SETTINGS = REPO / "examples" / "fdngx.toml"
CRON = REPO / "examples" / "cron" / "fdngx"
SYSTEMD = REPO / "examples" / "systemd"
NGINX_CONF = REPO / "examples" / "nginx" / "nginx.conf"
DOCKER = REPO / "docker"
VENV_BIN = Path(sys.executable).parent

# Where the files put things on a host; a test moves each under its own temp directory.
HOST_SETTINGS = "/etc/fdngx/fdngx.toml"
HOST_INVENTORY = "/etc/fdngx/fdngx.json"
HOST_OUT_DIR = "/etc/nginx/fdngx"
HOST_FDNGX = "/opt/fdngx/.venv/bin/fdngx"
OPENRESTY_LOGS = "#ReadWritePaths=-/usr/local/openresty/nginx/logs"
SERVICES = sorted(p.name for p in SYSTEMD.glob("*.service"))
# What a cron or unit run may still say on its own command line: what to do, not how to render.
ACTIONS = {"render": {"--scrape", "--reload", "--quiet", "-q"}, "sidecar": set()}


def directives(unit: Path) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for line in unit.read_text().splitlines():
        if "=" in line and not line.startswith(("#", "[")):
            key, value = line.split("=", 1)
            out.setdefault(key, []).append(value)
    return out


def settings() -> dict[str, object]:
    with SETTINGS.open("rb") as f:
        return tomllib.load(f)


def command_of(argv: list[str]) -> str | None:
    """`render` or `sidecar` for a `fdngx [--config FILE] CMD ...` argv, else None."""
    words = iter(argv[1:])
    for word in words:
        if word in ("--config", "--log-format"):
            next(words, None)
        elif not word.startswith("-"):
            return word if word in ACTIONS else None
    return None


def deployed_runs() -> list[tuple[str, list[str]]]:
    """(where, argv) of every line that renders on a host: the cron line(s) and each unit's ExecStart."""
    found = []
    for line in CRON.read_text().splitlines():
        if line.strip() and not line.startswith("#") and "=" not in line.split()[0]:
            argv = shlex.split(line.split(" | ")[0])[6:]  # minus the 5 time fields and the user
            found.append(("cron", [a for a in argv if a != "2>&1"]))
    for unit in SERVICES:
        argv = shlex.split(directives(SYSTEMD / unit)["ExecStart"][-1])
        if command_of(argv):
            found.append((unit, argv))
    return found


def quick_start_render() -> list[str]:
    """The README quick start's first `fdngx render` line, as argv."""
    readme = (REPO / "README.md").read_text()
    section = readme.split("## Quick start for sysadmins", 1)[1].split("\n## ", 1)[0]
    joined = re.sub(r"\\\n\s*", " ", section)
    for line in joined.splitlines():
        line = line.split(" #", 1)[0].strip()
        if line.startswith("fdngx ") and command_of(shlex.split(line)) == "render":
            return shlex.split(line)
    raise AssertionError("no `fdngx render` line in the README's quick start")


def write_inventory(path: Path, name: str, port: int, metrics_port: int) -> Path:
    path.write_text(json.dumps({"version": 1, "instances": [
        {"name": name, "host": "127.0.0.1", "port": port, "metrics_port": metrics_port, "engine": "sim"}]}))
    return path


def test_the_cron_line_and_every_render_unit_are_found() -> None:
    where = [w for w, _ in deployed_runs()]
    assert "cron" in where and "fdngx-render.service" in where and "fdngx-sidecar.service" in where, where


@pytest.mark.parametrize(("where", "argv"), deployed_runs(), ids=[w for w, _ in deployed_runs()])
def test_cron_and_units_take_every_option_from_the_one_settings_file(where: str, argv: list[str]) -> None:
    assert argv[0] == HOST_FDNGX and argv[1:3] == ["--config", HOST_SETTINGS], f"{where}: {argv}"
    cmd = command_of(argv)
    assert cmd is not None
    own = argv[argv.index(cmd) + 1:]
    assert set(own) <= ACTIONS[cmd], f"{where}: render options belong in {HOST_SETTINGS}, not here: {own}"
    out = settings().get("out")
    assert isinstance(out, str) and str(Path(out).parent) == HOST_OUT_DIR, out
    if where != "cron":  # the sandbox lets it write its output
        rw = " ".join(directives(SYSTEMD / where)["ReadWritePaths"]).split()
        assert HOST_OUT_DIR in rw, rw


def normalized(text: str, out_dir: Path) -> str:
    """A rendered config minus what differs between two runs by design: the generation hash, the weights (a
    scrape's against the inventory's) and the directory it was written to."""
    m = re.search(r"^# fdngx-generation: (\w+)$", text, re.M)
    assert m, text[:500]
    text = text.replace(m[1], "GENERATION")
    text = re.sub(r"\bweight=\d+", "weight=N", text)
    return text.replace(f"{out_dir}/", f"{HOST_OUT_DIR}/")


def test_every_deployed_run_with_the_settings_file_renders_the_quick_starts_config(tmp_path: Path) -> None:
    """The quick start's render, then the cron line and each unit's ExecStart, each with the shipped settings
    file: all write the same file (the same mode, listen address and server blocks)."""
    ports = free_ports(4)  # nothing listens there: the scraping runs fail open, on capacity weights
    inventory = tmp_path / "fdngx.json"
    inventory.write_text(json.dumps({"version": 1, "instances": [
        {"name": f"dp{i}", "host": "127.0.0.1", "port": ports[i], "metrics_port": ports[2 + i],
         "engine": "fastdeploy", "max_num_seqs": 64} for i in range(2)]}))

    def run_here(label: str, argv: list[str]) -> Path:
        home = tmp_path / label
        home.mkdir()
        moved = {HOST_SETTINGS: str(home / "fdngx.toml"), HOST_INVENTORY: str(inventory),
                 f"{HOST_OUT_DIR}/": f"{home}/"}
        text = SETTINGS.read_text()
        for host, here in moved.items():
            text = text.replace(host, here)
        (home / "fdngx.toml").write_text(text)
        args = []
        for arg in argv[1:]:
            for host, here in moved.items():
                arg = arg.replace(host, here)
            args.append(arg)
        # Only what needs the host's nginx goes: the reload (a reload proper is test_apply's business).
        args = [a for a in args if a != "--reload"]
        if command_of(argv) == "sidecar":
            args += ["--once", "--no-reload", "--metrics-listen", "off"]
        proc = subprocess.run([sys.executable, "-m", "fdngx", *args], capture_output=True, text=True, timeout=120,
                              cwd=home)
        assert proc.returncode == 0, f"{label}: fdngx {' '.join(args)}: {proc.stderr}"
        return home

    readme = run_here("readme", quick_start_render())
    written = [p for p in readme.iterdir() if p.suffix == ".conf" and not p.name.startswith(".")]
    assert len(written) == 1, written
    conf = written[0].name
    expected = normalized(written[0].read_text(), readme)
    assert "listen " in expected and "server 127.0.0.1:" in expected, expected
    for where, argv in deployed_runs():
        home = run_here(where, argv)
        assert (home / conf).exists(), (
            f"{where} does not write {conf} as the quick start does: {sorted(p.name for p in home.iterdir())}")
        got = normalized((home / conf).read_text(), home)
        assert got == expected, f"{where} renders another config than the README's quick start"


def test_the_settings_files_commented_options_work_once_uncommented(tmp_path: Path) -> None:
    """A sysadmin uncomments the front door (and the flavor): the file still loads, and the render has TLS and
    API keys on. Paths are moved under tmp_path; the certificate is a stand-in (render does not parse it)."""
    (tmp_path / "tls").mkdir()
    for name in ("fullchain.pem", "privkey.pem"):
        (tmp_path / "tls" / name).write_text("stand-in\n")
    (tmp_path / "api-keys").write_text("sk-settings-file-test-0001\n")
    (tmp_path / "api-keys").chmod(0o600)
    ports = free_ports(2)
    write_inventory(tmp_path / "fdngx.json", "dp0", ports[0], ports[1])
    text = re.sub(r"^#([a-z][a-z-]* = )", r"\1", SETTINGS.read_text(), flags=re.M)
    uncommented = re.findall(r"^([a-z][a-z-]*) = ", text, re.M)
    assert {"tls-cert", "tls-key", "api-keys-file", "flavor"} <= set(uncommented), uncommented
    for host, here in (("/etc/fdngx/", f"{tmp_path}/"), (f"{HOST_OUT_DIR}/", f"{tmp_path}/")):
        text = text.replace(host, here)
    (tmp_path / "fdngx.toml").write_text(text)
    proc = subprocess.run([sys.executable, "-m", "fdngx", "--config", str(tmp_path / "fdngx.toml"), "render"],
                          capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    out = settings()["out"]
    assert isinstance(out, str)
    conf = (tmp_path / Path(out).name).read_text()
    assert "ssl_certificate " in conf and ".fdngx-api-keys" in conf and "listen 0.0.0.0:8080 ssl" in conf, conf[:600]


@pytest.mark.parametrize("unit", SERVICES)
def test_units_never_start_nginx_and_skip_a_missing_log_directory(unit: str) -> None:
    d = directives(SYSTEMD / unit)
    wants = " ".join(d.get("Wants", [])).split()
    assert not {"nginx.service", "openresty.service"} & set(wants), (
        f"{unit}: Wants= starts an nginx the admin stopped at every run: {wants}")
    if command_of(shlex.split(d["ExecStart"][-1])):
        assert "nginx.service" in " ".join(d["After"]).split(), f"{unit}: After=nginx.service orders the first apply"
    if "ReadWritePaths" not in d:
        return
    own = {f"/etc/{c}" for c in " ".join(d.get("ConfigurationDirectory", [])).split()}
    for path in " ".join(d["ReadWritePaths"]).split():
        assert path in own or path.startswith("-"), (
            f"{unit}: ReadWritePaths={path} fails the unit (226/NAMESPACE) where it does not exist: write -{path}")
    if "-/var/log/nginx" in " ".join(d["ReadWritePaths"]).split():
        assert OPENRESTY_LOGS in (SYSTEMD / unit).read_text().splitlines(), f"{unit}: no OpenResty log line"


# --- examples/nginx/nginx.conf ----------------------------------------------------------------------------

def test_example_nginx_conf_includes_the_file_the_units_write() -> None:
    text = NGINX_CONF.read_text()
    includes = re.findall(r"^\s*include\s+(\S+);", text, re.M)
    ours = [i for i in includes if "fdngx" in i]
    assert ours == [f"{HOST_OUT_DIR}/upstream.conf"], ours
    for unit in ("fdngx-sidecar.service", "fdngx-render.service"):
        assert HOST_OUT_DIR in " ".join(directives(SYSTEMD / unit)["ReadWritePaths"]).split()
    assert "fdngx-upstream.conf" not in text, "a comment still names the old file"


@pytest.mark.nginx
def test_example_nginx_conf_passes_nginx_t_with_the_rendered_upstream(tmp_path: Path) -> None:
    """Its upstream mode, rendered with the shipped settings file (mode and out as its comment says), in a temp
    directory: the include finds the file, and `proxy_pass http://fastdeploy` the upstream in it."""
    port = free_ports(1)[0]
    (tmp_path / "fdngx").mkdir()
    (tmp_path / "logs").mkdir()
    proc = subprocess.run([sys.executable, "-m", "fdngx", "--config", str(SETTINGS), "render",
                           "-i", str(REPO / "examples" / "fdngx.json"), "--mode", "upstream",
                           "--out", str(tmp_path / "fdngx" / "upstream.conf")],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    text = NGINX_CONF.read_text()
    for host, here in ((f"{HOST_OUT_DIR}/", f"{tmp_path}/fdngx/"), ("/var/log/nginx/", f"{tmp_path}/logs/"),
                       ("/run/nginx.pid", f"{tmp_path}/nginx.pid"), ("listen 80;", f"listen 127.0.0.1:{port};")):
        text = text.replace(host, here)
    conf = tmp_path / "nginx.conf"
    conf.write_text(text)
    # nginx's own prefix: modules-enabled/*.conf load modules/*.so relative to it.
    check = run(find_nginx(), "-t", "-c", str(conf), "-e", str(tmp_path / "logs" / "error.log"))
    assert check.returncode == 0, check.stderr


# --- docker/Dockerfile ------------------------------------------------------------------------------------

def test_dockerfile_usage_gives_docker_run_the_gateways_stop_time() -> None:
    stop = int(re.search(r"STOP_TIMEOUT=\$\{FDNGX_STOP_TIMEOUT:-(\d+)\}", (DOCKER / "gateway.sh").read_text())[1])
    runs = [ln for ln in (DOCKER / "Dockerfile").read_text().splitlines()
            if re.match(r"#\s+docker run ", ln) and "fdngx --help" not in ln]
    assert runs, "no `docker run` line for the gateway in the Dockerfile's usage"
    for line in runs:
        m = re.search(r"--stop-timeout[ =](\d+)", line)
        assert m and int(m[1]) > stop, f"docker stops it after 10 s, mid graceful stop ({stop} s): {line}"


# --- docker/gateway.sh, for real ----------------------------------------------------------------------------

def real_bin(tmp: Path) -> Path:
    """The venv's fdngx and python3, and the real nginx, first on PATH (as in the image)."""
    bin_dir = tmp / "bin"
    bin_dir.mkdir()
    for name, target in (("fdngx", VENV_BIN / "fdngx"), ("python3", Path(sys.executable)),
                         ("nginx", Path(find_nginx()))):
        (bin_dir / name).symlink_to(target)
    return bin_dir


def health(gw: Gateway) -> int:
    """`fdngx-gateway health`, as the HEALTHCHECK runs it: the container's environment, none of its arguments."""
    return run(str(DOCKER / "gateway.sh"), "health", env=gw.env, timeout=20).returncode


def healthy(gw: Gateway) -> bool:
    if gw.proc.poll() is not None:
        raise AssertionError(f"the gateway exited {gw.proc.returncode}: {gw.err.read_text()[-2000:]}")
    return health(gw) == 0


@pytest.mark.nginx
@pytest.mark.parametrize("how", ["arguments", "environment"])
def test_gateway_health_probes_https_when_nginx_serves_tls(tmp_path: Path, how: str) -> None:
    """With --tls-cert/--tls-key (arguments the health check never sees) or FDNGX_TLS_CERT/KEY, nginx speaks
    only TLS on --listen: a plain-http probe gets 400 and the orchestrator restarts the container forever."""
    ports = free_ports(4)  # replica, its metrics (nothing there: nginx answers /health itself), nginx, sidecar
    write_inventory(tmp_path / "fdngx.json", "dp0", ports[0], ports[1])
    cert, key = self_signed(tmp_path)
    env = {"FDNGX_LISTEN": f"127.0.0.1:{ports[2]}", "FDNGX_METRICS_LISTEN": f"127.0.0.1:{ports[3]}"}
    args = ["--interval", "0.5"]
    if how == "arguments":
        args += ["--tls-cert", str(cert), "--tls-key", str(key)]
    else:
        env |= {"FDNGX_TLS_CERT": str(cert), "FDNGX_TLS_KEY": str(key)}
    gw = Gateway(tmp_path, real_bin(tmp_path), env, *args)
    try:
        wait_for(lambda: healthy(gw), 30, what="gateway health over https")
        with pytest.warns(urllib3.exceptions.InsecureRequestWarning):
            r = requests.get(f"https://127.0.0.1:{ports[2]}/health", timeout=5, verify=False)
        assert r.status_code == 200  # it is TLS that answers, not a plain listener
        gw.proc.send_signal(signal.SIGTERM)
        assert gw.wait(timeout=30) == 0, gw.err.read_text()
        assert health(gw) != 0
    finally:
        gw.stop()


@pytest.mark.nginx
def test_gateway_merges_the_inventories_fdngx_inventory_lists(tmp_path: Path) -> None:
    """FDNGX_INVENTORY=/a.json:/b.json, as fdngx itself takes it (one inventory per node): both files' replicas
    are in the config nginx runs. Passed as one -i, the pair was one path that did not exist: exit 1."""
    ports = free_ports(6)
    a = write_inventory(tmp_path / "a.json", "node1-dp0", ports[0], ports[1])
    b = write_inventory(tmp_path / "b.json", "node2-dp0", ports[2], ports[3])
    env = {"FDNGX_INVENTORY": f"{a}:{b}", "FDNGX_LISTEN": f"127.0.0.1:{ports[4]}",
           "FDNGX_METRICS_LISTEN": f"127.0.0.1:{ports[5]}"}
    gw = Gateway(tmp_path, real_bin(tmp_path), env, "--interval", "0.5")
    try:
        wait_for(lambda: healthy(gw), 30, what="gateway health")
        conf = (tmp_path / "prefix" / "nginx.conf").read_text()
        assert f"server 127.0.0.1:{ports[0]} " in conf and f"server 127.0.0.1:{ports[2]} " in conf, conf
        gw.proc.send_signal(signal.SIGTERM)
        assert gw.wait(timeout=30) == 0, gw.err.read_text()
    finally:
        gw.stop()
