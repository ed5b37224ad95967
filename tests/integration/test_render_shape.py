"""A run that leaves out an option the config was rendered with (cron's line, a timer's unit, a sidecar started
by hand) must not change what the config serves without a word: the mode (site -> upstream took the server
block and its listener away), TLS, API-key checks, the Lua balancer. Through the real CLI; no nginx needed (nothing here
reloads), the same check runs under the apply lock when one does (fdngx.nginx.apply)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fdngx.domain import Flavor, Mode
from fdngx.errors import ApplyError
from fdngx.nginx import shape
from fdngx.nginx.shape import Front
from tests.support import fdngx, free_ports, write_inventory


@pytest.fixture
def inv(tmp_path: Path) -> str:
    """Two replicas on closed 127.0.0.1 ports: a scrape (had a check let one run) reaches nothing else."""
    return str(write_inventory(tmp_path / "fdngx.json", [
        {"name": f"dp{i}", "host": "127.0.0.1", "port": p, "engine": "fastdeploy"}
        for i, p in enumerate(free_ports(2))]))


def _keys(tmp: Path) -> Path:
    path = tmp / "api-keys"
    path.write_text("sk-shape-test-key-0001\n")
    path.chmod(0o600)
    return path


def _site(inv: str, out: Path, *extra: str) -> list[str]:
    return ["render", "-i", inv, "--out", str(out), "--mode", "site", "--listen", "127.0.0.1:18431", *extra]


def test_a_run_without_the_mode_or_the_api_keys_is_refused_and_writes_nothing(tmp_path: Path, inv: str) -> None:
    out = tmp_path / "fdngx" / "site.conf"
    out.parent.mkdir()
    keys = _keys(tmp_path)
    fdngx(*_site(inv, out, "--api-keys-file", str(keys)), check=True)
    first = out.read_bytes()
    assert b"\n# fdngx-front: mode=site tls=off api-keys=on flavor=nginx\n" in first[:400]

    bare = fdngx("render", "-i", inv, "--out", str(out))  # cron's line without the site's options
    assert bare.returncode == 1, bare.stderr
    assert bare.stderr.count("\n") == 1 and f"{out}: refusing to change its mode from site to upstream" in bare.stderr
    assert "--force" in bare.stderr and "--config" in bare.stderr, bare.stderr
    assert out.read_bytes() == first

    keyless = fdngx(*_site(inv, out))
    assert keyless.returncode == 1 and "refusing to turn API-key checks off" in keyless.stderr, keyless.stderr
    assert "mode" not in keyless.stderr.split("refusing", 1)[1].split(":")[0], keyless.stderr
    assert out.read_bytes() == first
    scraped = fdngx(*_site(inv, out, "--scrape"))  # cron's form: refused the same way
    assert scraped.returncode == 1 and "refusing to turn API-key checks off" in scraped.stderr, scraped.stderr
    assert out.read_bytes() == first

    # Asked for: done. Then the new options are the config's, and a run with them needs no asking.
    forced = fdngx(*_site(inv, out, "--force"))
    assert forced.returncode == 0, forced.stderr
    assert b"# fdngx-front: mode=site tls=off api-keys=off flavor=nginx" in out.read_bytes()
    assert fdngx(*_site(inv, out, "--api-keys-file", str(keys))).returncode == 0, "turning a check on needs no --force"
    assert fdngx(*_site(inv, out, "--api-keys-file", str(keys), "--listen", "127.0.0.1:18432")).returncode == 0


def test_a_run_without_the_openresty_flavor_is_refused_and_writes_nothing(tmp_path: Path, inv: str) -> None:
    """The flavor was not in the front line: a cron line or unit without `--flavor openresty` (the settings file's
    `flavor` left commented out, the option given by hand once) put plain least_conn in place of the Lua balancer
    and said "applied" (a docs review). Now refused like a lost mode; `--force` makes the change."""
    out = tmp_path / "site.conf"
    lua = ("--flavor", "openresty", "--admin-listen", f"127.0.0.1:{free_ports(1)[0]}")
    fdngx(*_site(inv, out, *lua), check=True)
    first = out.read_bytes()
    assert b"\n# fdngx-front: mode=site tls=off api-keys=off flavor=openresty\n" in first[:400]

    plain = fdngx(*_site(inv, out))
    assert plain.returncode == 1, plain.stderr
    assert plain.stderr.count("\n") == 1 and f"{out}: refusing to turn the Lua balancer off" in plain.stderr
    assert out.read_bytes() == first
    assert fdngx(*_site(inv, out, *lua, "--listen", "127.0.0.1:18433")).returncode == 0, "same flavor: no asking"
    assert fdngx(*_site(inv, out, "--force")).returncode == 0
    assert b"# fdngx-front: mode=site tls=off api-keys=off flavor=nginx\n" in out.read_bytes()
    assert fdngx(*_site(inv, out, *lua)).returncode == 0, "turning the balancer on needs no --force"

    # The first run after an upgrade: the line an older fdngx wrote has no flavor; the body says it.
    out.write_bytes(out.read_bytes().replace(b" flavor=openresty\n", b"\n", 1))
    upgraded = fdngx(*_site(inv, out))
    assert upgraded.returncode == 1 and "refusing to turn the Lua balancer off" in upgraded.stderr, upgraded.stderr


def test_a_config_from_an_older_fdngx_has_no_front_line_and_is_replaced(tmp_path: Path, inv: str) -> None:
    out = tmp_path / "upstream.conf"
    fdngx(*_site(inv, out), check=True)
    old = b"".join(ln for ln in out.read_bytes().splitlines(keepends=True) if not ln.startswith(b"# fdngx-front:"))
    out.write_bytes(old)
    got = fdngx("render", "-i", inv, "--out", str(out))
    assert got.returncode == 0, got.stderr
    assert b"# fdngx-front: mode=upstream" in out.read_bytes()


def test_a_sidecar_with_other_options_refuses_to_start(tmp_path: Path, inv: str) -> None:
    """Refused at start, before any cycle (not an apply error every cycle)."""
    out = tmp_path / "site.conf"
    fdngx(*_site(inv, out, "--api-keys-file", str(_keys(tmp_path))), check=True)
    first = out.read_bytes()
    proc = subprocess.Popen([sys.executable, "-m", "fdngx", "sidecar", "-i", inv, "--out", str(out), "--mode",
                             "site", "--listen", "127.0.0.1:18431", "--no-reload", "--metrics-listen", "off"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        _out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
    assert proc.returncode == 1 and "refusing to turn API-key checks off" in err, err
    assert out.read_bytes() == first


fronts = st.builds(Front, st.sampled_from(list(Mode)), st.booleans(), st.booleans(),
                   st.sampled_from([None, *Flavor]))


@settings(max_examples=200, deadline=None)
@given(was=fronts, new=fronts)
def test_exactly_a_lost_mode_tls_api_keys_or_lua_balancer_is_refused(was: Front, new: Front) -> None:
    """The line round-trips, and the check refuses iff the mode changes or TLS / API keys / the Lua balancer go
    from on to off (a line without the flavor, an older fdngx's, refuses no flavor change)."""
    assert Front.of(f"# Generated by fdngx\n# fdngx-front: {was.line}\n".encode()) == was
    loses = (new.mode is not was.mode or (was.tls and not new.tls) or (was.api_keys and not new.api_keys)
             or (was.flavor is Flavor.OPENRESTY and new.flavor is Flavor.NGINX))
    data = f"# fdngx-front: {was.line}\n".encode()
    if loses:
        with pytest.raises(ApplyError, match="refusing to"):
            shape.check("x.conf", data, new, force=False)
    else:
        shape.check("x.conf", data, new, force=False)
    shape.check("x.conf", data, new, force=True)  # --force: always
