"""NginxControl against a real nginx under a temp prefix: it finds the master where this build and its main
config put the pid file, reads the error log the config names, says what a reload that timed out really
showed, and lists the files `nginx -T` loaded.

Before: the pid file was /run/nginx.pid unless the main nginx.conf itself had a `pid` line (a build with
another compiled-in default, OpenResty's logs/nginx.pid, or a `pid` in an included file: "nginx is not
running", never reloaded, --reload-cmd never run); the error log was /var/log/nginx/error.log unless -e was
given (a refused reload was seen only at the timeout); a timeout after new workers started said "no new
worker processes"; `nginx -t` messages kept nginx's log prefix.
"""

from __future__ import annotations

import contextlib
import re
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from fdngx.errors import ApplyError
from fdngx.nginx.control import NginxControl, ReloadError, find_nginx
from fdngx.system import procs
from tests.support import Site, fdngx, free_ports, stop_process_group, wait_for

pytestmark = pytest.mark.nginx


def _http(root: Path, servers: str) -> str:
    """An http {} whose temp paths are under `root` (Debian's build compiles them under /var/lib/nginx)."""
    temps = " ".join(f"{kind}_temp_path {root}/tmp/{kind};" for kind in ("client_body", "proxy", "fastcgi", "uwsgi",
                                                                          "scgi"))
    return f"http {{\n  access_log off;\n  {temps}\n{servers}\n}}\n"


def _server(port: int, body: str = "return 200 'ok\\n';", extra: str = "") -> str:
    return f"  server {{ listen 127.0.0.1:{port}{extra}; {body} }}\n"


@contextlib.contextmanager
def _master(argv: list[str], pid_file: Path) -> Iterator[subprocess.Popen[bytes]]:
    """A real nginx master (daemon off, its own process group) until the block ends; stopped by its PID."""
    proc = subprocess.Popen(argv, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        wait_for(lambda: proc.poll() is not None or (pid_file.is_file() and pid_file.read_text().strip()), 10,
                 what=f"nginx's pid file {pid_file}")
        if proc.poll() is not None:
            raise AssertionError(f"nginx exited: {proc.stderr.read().decode() if proc.stderr else ''}")
        assert int(pid_file.read_text()) == proc.pid
        yield proc
    finally:
        stop_process_group(proc, grace=5)


def _reloaded(control: NginxControl, master: int, expect: str | None = None) -> None:
    before = procs.children(master)
    control.reload(expect)
    assert procs.children(master) - before, "new workers: the reload took"


def test_a_build_whose_pid_file_is_under_its_prefix_is_found_and_reloaded(tmp_path: Path) -> None:
    """The reviewer's s12 case: a build with OpenResty's layout (prefix/logs/nginx.pid compiled in, `pid`
    commented out in nginx.conf), here a wrapper that runs Debian's nginx with that build's defaults and
    answers -V as that build would."""
    root = tmp_path / "or"
    for sub in ("conf/conf.d", "logs", "tmp"):
        (root / sub).mkdir(parents=True)
    port = free_ports(1)[0]
    conf = root / "conf" / "nginx.conf"
    conf.write_text("#pid        logs/nginx.pid;\nerror_log logs/error.log;\nevents { worker_connections 64; }\n"
                    + _http(root, "  include conf.d/*.conf;\n"))
    (root / "conf" / "conf.d" / "site.conf").write_text(_server(port))
    wrapper = tmp_path / "sbin" / "nginx"
    wrapper.parent.mkdir()
    wrapper.write_text(f"""#!/bin/sh
case " $* " in *" -V "*)
    printf '%s\\n' 'nginx version: openresty/1.21.4.3' \\
        "configure arguments: --prefix={root} --with-cc-opt='-O2 -DX' --with-threads" >&2; exit 0;; esac
case " $* " in *" -c "*) exec {find_nginx()} "$@";; esac
exec {find_nginx()} -p {root}/ -c {conf} -g 'pid logs/nginx.pid; daemon off;' "$@"
""")
    wrapper.chmod(0o755)
    with _master([str(wrapper)], root / "logs" / "nginx.pid") as proc:
        control = NginxControl(str(wrapper), timeout=5)
        assert control.pid_path() == root / "logs" / "nginx.pid"
        assert control.main_conf == conf and control.master_pid() == proc.pid
        _reloaded(control, proc.pid)
        # --nginx-conf, --prefix and --reload-cmd: the same pid file, and the reload command runs.
        marker = tmp_path / "reload-cmd-ran"
        control = NginxControl(str(wrapper), conf, root, reload_cmd=[
            "sh", "-c", f'touch {marker} && exec {wrapper} -s reload'], timeout=5)
        _reloaded(control, proc.pid)
        assert marker.exists()


def test_a_pid_directive_in_an_included_file_is_found(tmp_path: Path) -> None:
    """The reviewer's s4 case: nginx.conf says `include pid.conf;`, the `pid` is there; --reload-cmd given."""
    prefix = tmp_path / "nginx"
    (prefix / "tmp").mkdir(parents=True)
    pid_file = tmp_path / "run" / "nginx.pid"
    pid_file.parent.mkdir()
    (prefix / "pid.conf").write_text(f"pid {pid_file};\n")
    conf = prefix / "nginx.conf"
    conf.write_text("include pid.conf;\nerror_log stderr;\nevents {}\n" + _http(prefix, _server(free_ports(1)[0])))
    nginx = find_nginx()
    with _master([nginx, "-p", f"{prefix}/", "-c", str(conf), "-g", "daemon off;"], pid_file) as proc:
        control = NginxControl(nginx, conf, prefix, reload_cmd=[nginx, "-p", f"{prefix}/", "-c", str(conf), "-s",
                                                                "reload"], timeout=5)
        assert control.pid_path() == pid_file
        _reloaded(control, proc.pid)


def _site(tmp_path: Path, servers: str) -> tuple[Path, Path]:
    prefix = tmp_path / "nginx"
    for sub in ("logs", "tmp"):
        (prefix / sub).mkdir(parents=True, exist_ok=True)
    conf = prefix / "nginx.conf"
    conf.write_text("pid logs/nginx.pid;\nerror_log logs/site-error.log;\nevents {}\n" + _http(prefix, servers))
    return prefix, conf


def test_a_refused_reload_is_read_from_the_error_log_the_config_names(tmp_path: Path) -> None:
    """No -e: the master logs to the config's error_log (under the prefix), not /var/log/nginx/error.log.
    Before, the refusal was never read and the reload ran into the timeout ("did not take ... within")."""
    old_port = free_ports(1)[0]
    prefix, conf = _site(tmp_path, _server(old_port))
    nginx = find_nginx()
    with socket.socket() as blocker, _master(
            [nginx, "-p", f"{prefix}/", "-c", str(conf), "-g", "daemon off;"], prefix / "logs" / "nginx.pid") as proc:
        blocker.bind(("127.0.0.1", 0))
        blocker.listen()
        conf.write_text(conf.read_text().replace(f"127.0.0.1:{old_port}", f"127.0.0.1:{blocker.getsockname()[1]}"))
        control = NginxControl(nginx, conf, prefix, timeout=15)
        assert control._error_log_path() == prefix / "logs" / "site-error.log"
        before = procs.children(proc.pid)
        with pytest.raises(ReloadError) as err:
            control.reload(None)
        assert "nginx refused the new config and keeps running the old one" in str(err.value), err.value
        assert "could not bind()" in str(err.value) and not err.value.took_new
        assert procs.children(proc.pid) == before


@contextlib.contextmanager
def _verified_reload(prefix: Path, conf: Path, verify_port: int) -> Iterator[tuple[NginxControl, str]]:
    """A running master of `conf`; a reload expecting generation feedbeef at `verify_port` fails with 'nginx
    reloaded, but ...' (the new config took): the control and that text, nginx still running."""
    nginx = find_nginx()
    with _master([nginx, "-p", f"{prefix}/", "-c", str(conf), "-g", "daemon off;"], prefix / "logs" / "nginx.pid"):
        control = NginxControl(nginx, conf, prefix, verify_url=f"http://127.0.0.1:{verify_port}/fdngx/generation",
                               timeout=15.0)
        with pytest.raises(ReloadError) as err:
            control.reload("feedbeef")
        text = str(err.value)
        assert text.startswith("nginx reloaded, but the new config does not answer at its --listen address"), text
        assert err.value.took_new, text
        yield control, text


def test_a_timeout_says_new_workers_started_and_what_answered_instead(tmp_path: Path) -> None:
    """The verify URL's address is a default_server's too (Debian's default site): new workers start, the
    other server block answers. Before: "no new worker processes and no new generation served"."""
    port = free_ports(1)[0]
    default = _server(port, "location = /fdngx/generation { return 200 '0123abcd\\n'; }", " default_server")
    ours = _server(port, "server_name fdngx.invalid; location = /fdngx/generation { return 200 'feedbeef\\n'; }")
    prefix, conf = _site(tmp_path, default + ours)
    # The whole timeout: once only the new workers listen and another answer comes for a second, that
    # answer will not change; said as such, not as a timeout (which waited 15 s for nothing).
    with _verified_reload(prefix, conf, port) as (control, text):
        assert "new worker processes started" in text and "no new worker" not in text, text
        assert "answered generation 0123abcd, expected generation feedbeef" in text, text
        assert "a default_server on the same listen address?" in text and "--listen" in text, text
        conf.write_text(conf.read_text().replace("return 200 '0123abcd\\n';", "return 404;"))
        with pytest.raises(ReloadError) as err:
            control.reload("feedbeef")
        assert "answered HTTP 404, expected generation feedbeef" in str(err.value), err.value


def test_a_listen_nothing_answers_at_is_said_once_only_new_workers_run_not_after_the_timeout(tmp_path: Path) -> None:
    """The new config took (new workers, the old ones gone) but nothing answers at the verify URL: a --listen
    address this host cannot be reached at (a multicast one did this: an outside review). Before: the whole
    15 s timeout with the front door dark, then "nginx did not take the new config", which it had."""
    port, nobody = free_ports(2)
    prefix, conf = _site(tmp_path, _server(port))
    with _verified_reload(prefix, conf, nobody) as (_, text):
        assert "refused the connection" in text and "nothing listens there now: check --listen" in text


def test_nginx_t_lists_the_files_nginx_read_and_speaks_without_its_log_prefix(tmp_path: Path) -> None:
    prefix = tmp_path / "nginx"
    for sub in ("sites", "avail", "logs", "tmp"):
        (prefix / sub).mkdir(parents=True)
    (prefix / "avail" / "a.conf").write_text(_server(free_ports(1)[0]))
    (prefix / "sites" / "a.conf").symlink_to(prefix / "avail" / "a.conf")
    conf = prefix / "nginx.conf"
    conf.write_text("pid logs/nginx.pid;\nerror_log stderr;\nevents {}\n" + _http(prefix, "  include sites/*.conf;"))
    control = NginxControl(find_nginx(), conf, prefix)
    files = control.test()
    assert {str(conf), str(prefix / "sites" / "a.conf"), str(prefix / "avail" / "a.conf")} <= files, files
    (prefix / "sites" / "b.conf").write_text("bogus_directive on;\n")
    with pytest.raises(ApplyError) as err:
        control.test()
    text = str(err.value)
    assert text.startswith('nginx -t failed: [emerg] unknown directive "bogus_directive"'), text
    assert not re.search(r"\d{4}/\d\d/\d\d|\d+#\d+:", text), text


@pytest.mark.nginx
def test_a_refused_candidate_leaves_no_emerg_line_in_the_live_error_log(site: Site) -> None:
    """nginx -t of a candidate wrote its [emerg] lines into the running nginx's error log too (-e): log alerts
    went off for a run that changed nothing (an outside review). Now they reach stderr only, where fdngx reads
    them and says them."""
    live_log = site.conf.parent / "logs" / "error.log"
    before = live_log.read_text() if live_log.exists() else ""
    proc = fdngx("render", *site.args, "--access-log", "/nonexistent-fdngx-dir/access.log", "--reload")
    assert proc.returncode == 1 and "No such file or directory" in proc.stderr, proc.stderr
    after = live_log.read_text() if live_log.exists() else ""
    assert "[emerg]" not in after[len(before):], after[len(before):]
    assert requests.get(f"{site.url}/health", timeout=5).status_code == 200
