"""Every CLI value that lands in a config is validated like inventory data (issue 10: `--access-log 'x; }
server { ... }'` was written verbatim into the config).

Each hostile value is refused with a one-line usage error naming the option, and no config is printed or
written. The benign value next to it renders, so the test shows the option really reaches the config.
"""

from __future__ import annotations

import json
import signal
import subprocess
from pathlib import Path

import pytest

from tests.security.conftest import assert_refused, cli, popen_cli, write


def _inventory(tmp: Path) -> Path:
    return write(tmp / "fdngx.json", json.dumps(
        {"version": 1, "instances": [{"name": "dp0", "host": "127.0.0.1", "port": 8001}]}))


HOSTILE = [
    ("--access-log", "x; } server { listen 127.0.0.1:1; location / { return 200; } }", "site"),
    ("--access-log", "/tmp/a b.log", "standalone"),
    ("--listen", "127.0.0.1:8080; include /etc/passwd", "site"),
    ("--listen", "0x7f000001:8080", "standalone"),
]


@pytest.mark.parametrize("option, value, mode", HOSTILE)
def test_hostile_cli_values_never_reach_the_config(tmp_path: Path, option: str, value: str, mode: str) -> None:
    inv = _inventory(tmp_path)
    out = tmp_path / "out.conf"
    proc = cli("render", "-i", str(inv), "--mode", mode, "--out", str(out), f"{option}={value}")
    assert_refused(proc, option)
    assert not out.exists()


@pytest.mark.parametrize("option, value", [
    ("--admin-listen", "127.0.0.1:9401; include /etc/passwd"),
    ("--admin-token-file", "/tmp/tok;\ninit_by_lua_block { os.execute('id') }"),
])
def test_hostile_openresty_cli_values_never_reach_the_config(tmp_path: Path, option: str, value: str) -> None:
    inv = _inventory(tmp_path)
    out = tmp_path / "out.conf"
    proc = cli("render", "-i", str(inv), "--flavor", "openresty", "--mode", "site", "--out", str(out),
               f"{option}={value}", cwd=tmp_path)
    assert_refused(proc, option)
    assert not out.exists()
    assert not list(tmp_path.glob("*init_by_lua*"))


def test_a_benign_access_log_does_reach_the_config(tmp_path: Path) -> None:
    proc = cli("render", "-i", str(_inventory(tmp_path)), "--mode", "site", "--out", "-",
               "--access-log=/tmp/fdngx-security-test.log", "--listen=[::1]:18181")
    assert proc.returncode == 0, proc.stderr
    assert "access_log /tmp/fdngx-security-test.log" in proc.stdout and "listen [::1]:18181;" in proc.stdout


# -- every option that lands in a config, in process (RenderOptions is what the CLI builds) --------------

OPTION_VALUES = [
    ("access_log", "x; } server { listen 127.0.0.1:1; }"), ("access_log", "/var/log/a.log; include /etc/shadow"),
    ("access_log", "/tmp/a b.log"), ("access_log", "/tmp/$remote_addr.log"), ("access_log", "/tmp/a.log\nlisten 1"),
    ("access_log", "'/tmp/a.log'"), ("access_log", "/tmp/a.log#"), ("access_log", "/tmp/a{b}.log"),
    ("listen", "127.0.0.1:8080; include /etc/passwd"), ("listen", "127.0.0.1:8080 ssl"), ("listen", "0x7f000001:80"),
    ("listen", "[fe80::1%eth0]:8080"), ("listen", "localhost\n:8080"), ("listen", "127.0.0.1:99999"),
    ("listen", "999:8080"), ("admin_listen", "127.0.0.1:9401;x"), ("admin_listen", "[::1%lo]:9401"),
    ("admin_token_file", "/tmp/tok;\ninit_by_lua_block { os.execute('id') }"), ("admin_token_file", '/tmp/to"k'),
    ("admin_token_file", "/tmp/tok]]..os.execute('id')..[["), ("lua_modules", ("/tmp/x.so; load_module /tmp/y.so",)),
    ("worker_processes", "auto; load_module /tmp/x.so"), ("worker_shutdown_timeout", "10m; user root"),
    ("read_timeout", "1h }"), ("client_max_body_size", "64m;"), ("max_fails", -1), ("fail_timeout", 0),
    ("keepalive", -5),
]


@pytest.mark.parametrize("field, value", OPTION_VALUES)
def test_every_option_that_lands_in_a_config_is_validated(field: str, value: object) -> None:
    from fdngx.errors import UsageError
    from fdngx.nginx.render import RenderOptions

    with pytest.raises(UsageError) as info:
        RenderOptions(**{field: value}).validated()  # type: ignore[arg-type]
    assert "\n" not in str(info.value)


def test_sidecar_refuses_a_hostile_access_log_before_doing_anything(tmp_path: Path) -> None:
    inv = _inventory(tmp_path)
    out = tmp_path / "out.conf"
    proc = popen_cli("sidecar", "-i", str(inv), "--mode", "site", "--out", str(out), "--no-reload",
                     "--metrics-listen", "off", "--access-log", "x; } server { listen 1; }")
    try:
        _, err = proc.communicate(timeout=30)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=15)
        pytest.fail("the sidecar accepted a hostile --access-log and kept running")
    assert proc.returncode in (1, 2) and "Traceback" not in err, err
    assert "--access-log" in err
    assert not out.exists()
