"""fdngx.nginx.build without a running nginx: a build's defaults from `nginx -V`, the main config's `pid` and
`error_log` (crossplane, main context and its includes), nginx's words in a message, and where NginxControl
looks for the pid file and the error log. Before, the pid file was a regex over /etc/nginx/nginx.conf (or
--nginx-conf) else /run/nginx.pid, and the error log /var/log/nginx/error.log, whatever the binary."""

from __future__ import annotations

import logging
import os
import subprocess
from pathlib import Path
from typing import Any

import pytest

from fdngx.nginx import build as nb
from fdngx.nginx.build import MainSettings, NginxBuild, main_settings, nginx_build, parse_build
from fdngx.nginx.control import NginxControl, NginxNotRunning, nginx_message

# `/usr/sbin/nginx -V` on the Debian machine these tests were written on (nginx 1.22.1, bookworm).
DEBIAN_V = """\
nginx version: nginx/1.22.1
built with OpenSSL 3.0.22 25 Aug 2026 (running with OpenSSL 3.0.19 27 Jan 2026)
TLS SNI support enabled
configure arguments: --with-cc-opt='-g -O2 -ffile-prefix-map=/build/reproducible-path/nginx-1.22.1=. \
-fstack-protector-strong -Wformat -Werror=format-security -fPIC -Wdate-time -D_FORTIFY_SOURCE=2' \
--with-ld-opt='-Wl,-z,relro -Wl,-z,now -fPIC' --prefix=/usr/share/nginx --conf-path=/etc/nginx/nginx.conf \
--http-log-path=/var/log/nginx/access.log --error-log-path=stderr --lock-path=/var/lock/nginx.lock \
--pid-path=/run/nginx.pid --modules-path=/usr/lib/nginx/modules --http-client-body-temp-path=/var/lib/nginx/body \
--http-fastcgi-temp-path=/var/lib/nginx/fastcgi --http-proxy-temp-path=/var/lib/nginx/proxy \
--http-scgi-temp-path=/var/lib/nginx/scgi --http-uwsgi-temp-path=/var/lib/nginx/uwsgi --with-compat --with-debug \
--with-pcre-jit --with-http_ssl_module --with-http_stub_status_module --with-http_realip_module \
--with-http_auth_request_module --with-http_v2_module --with-http_dav_module --with-http_slice_module \
--with-threads --with-http_addition_module --with-http_flv_module --with-http_gunzip_module \
--with-http_gzip_static_module --with-http_mp4_module --with-http_random_index_module \
--with-http_secure_link_module --with-http_sub_module --with-mail_ssl_module --with-stream_ssl_module \
--with-stream_ssl_preread_module --with-stream_realip_module --with-http_geoip_module=dynamic \
--with-http_image_filter_module=dynamic --with-http_perl_module=dynamic --with-http_xslt_module=dynamic \
--with-mail=dynamic --with-stream=dynamic --with-stream_geoip_module=dynamic
"""

# OpenResty's packages: prefix /usr/local/openresty/nginx, no --pid-path / --conf-path (nginx's defaults).
OPENRESTY_V = """\
nginx version: openresty/1.21.4.3
built by gcc 12.2.0 (Debian 12.2.0-14)
configure arguments: --prefix=/usr/local/openresty/nginx --with-cc-opt='-O2 -DNGX_LUA_ABORT_AT_PANIC \
-I/usr/local/openresty/zlib/include' --add-module=../ngx_devel_kit-0.3.3 --add-module=../lua-nginx-module-0.10.26 \
--with-ld-opt='-Wl,-rpath,/usr/local/openresty/luajit/lib -L/usr/local/openresty/zlib/lib' --with-threads
"""


def test_debians_build_is_read_from_its_own_nginx_v() -> None:
    build = parse_build(Path("/usr/sbin/nginx"), DEBIAN_V)
    assert build == NginxBuild(Path("/usr/sbin/nginx"), "nginx/1.22.1", Path("/usr/share/nginx"),
                               Path("/etc/nginx/nginx.conf"), Path("/run/nginx.pid"), None)
    assert build.under(Path("/srv/x")).pid_path == Path("/run/nginx.pid"), "absolute paths stay where they are"


def test_an_openresty_build_keeps_its_pid_file_under_its_prefix() -> None:
    build = parse_build(Path("/usr/local/openresty/nginx/sbin/nginx"), OPENRESTY_V)
    root = Path("/usr/local/openresty/nginx")
    assert (build.version, build.prefix) == ("openresty/1.21.4.3", root)
    assert (build.conf_path, build.pid_path, build.error_log_path) == (
        root / "conf/nginx.conf", root / "logs/nginx.pid", root / "logs/error.log")
    moved = build.under(Path("/srv/or"))  # run with -p /srv/or/: its relative defaults move with it
    assert (moved.conf_path, moved.pid_path, moved.error_log_path) == (
        Path("/srv/or/conf/nginx.conf"), Path("/srv/or/logs/nginx.pid"), Path("/srv/or/logs/error.log"))


@pytest.mark.parametrize("configure", ["", "configure arguments:\n", "configure arguments: --with-threads\n"])
def test_absent_arguments_are_nginxs_own_defaults(configure: str) -> None:
    build = parse_build(Path("/opt/nginx"), "nginx version: nginx/1.27.0\n" + configure)
    root = Path("/usr/local/nginx")
    assert (build.prefix, build.conf_path, build.pid_path, build.error_log_path) == (
        root, root / "conf/nginx.conf", root / "logs/nginx.pid", root / "logs/error.log")


def test_quoted_arguments_are_one_argument_each() -> None:
    text = ("nginx version: nginx/1.25.3 (Ubuntu)\nconfigure arguments: --with-cc-opt='-DX --pid-path=/wrong "
            "--prefix=/wrong' --prefix=/opt/ng --pid-path=run/ng.pid \"--conf-path=/etc/ng/my conf.conf\"\n")
    build = parse_build(Path("/opt/ng/sbin/nginx"), text)
    assert build.version == "nginx/1.25.3"
    assert (build.prefix, build.pid_path, build.conf_path) == (
        Path("/opt/ng"), Path("/opt/ng/run/ng.pid"), Path("/etc/ng/my conf.conf"))


def _runner(stderr: str = "", exc: BaseException | None = None, calls: list[list[str]] | None = None) -> Any:
    def run(argv: list[str], **_kw: object) -> subprocess.CompletedProcess[str]:
        if calls is not None:
            calls.append(argv)
        if exc is not None:
            raise exc
        return subprocess.CompletedProcess(argv, 0, "", stderr)
    return run


@pytest.mark.parametrize("runner", [
    _runner(exc=subprocess.TimeoutExpired(["nginx", "-V"], 10)),
    _runner(exc=PermissionError(13, "Permission denied")),
    _runner(stderr="sh: 1: not nginx at all\n"),
])
def test_a_binary_that_cannot_say_gives_debians_layout(runner: Any, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.DEBUG, logger="fdngx.nginx"):
        build = nginx_build("/opt/broken/nginx", runner)
    assert (build.conf_path, build.pid_path, build.error_log_path) == (
        Path("/etc/nginx/nginx.conf"), Path("/run/nginx.pid"), Path("/var/log/nginx/error.log"))
    assert "assuming Debian's layout" in caplog.text
    assert nginx_build("/nonexistent/sbin/nginx").pid_path == Path("/run/nginx.pid")  # the real runner: no such file


def _fake_binary(tmp_path: Path, stderr: str) -> tuple[str, list[list[str]], Any]:
    binary = tmp_path / "sbin" / "nginx"
    binary.parent.mkdir(parents=True, exist_ok=True)
    binary.write_text("#!/bin/sh\nexit 1\n")
    binary.chmod(0o755)
    calls: list[list[str]] = []
    return str(binary), calls, _runner(stderr, calls=calls)


def test_the_build_is_asked_once_per_program_file(tmp_path: Path) -> None:
    binary, calls, runner = _fake_binary(tmp_path, OPENRESTY_V)
    assert nginx_build(binary, runner) is nginx_build(binary, runner)
    assert calls == [[binary, "-V"]]
    os.utime(binary, ns=(1, 1))  # another program file there (an upgrade): asked again
    nginx_build(binary, runner)
    assert len(calls) == 2


# -- the main config ----------------------------------------------------------------------------------


def _write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def test_pid_and_error_log_come_from_files_included_at_the_main_level(tmp_path: Path) -> None:
    conf = _write(tmp_path / "nginx.conf", "#pid logs/commented.pid;\nerror_log stderr;\nerror_log syslog:server=x;\n"
                  "include main.d/*.conf;\nevents {}\nhttp {\n  error_log /http/level.log;\n  include http.d/*;\n}\n")
    _write(tmp_path / "main.d" / "a.conf", "error_log memory:32m debug;\n")
    _write(tmp_path / "main.d" / "b.conf", "error_log logs/main.log warn;\nerror_log logs/second.log;\n")
    _write(tmp_path / "pid.conf", "pid run/from-include.pid;\n")
    _write(tmp_path / "http.d" / "x", "pid /not/main/context.pid;\n")
    _write(tmp_path / "main.d" / "c.conf", "include pid.conf;\n")  # relative to nginx.conf's directory, as nginx
    assert main_settings(conf) == MainSettings("run/from-include.pid", "logs/main.log")


def test_a_commented_pid_is_no_pid(tmp_path: Path) -> None:
    conf = _write(tmp_path / "nginx.conf", "#pid        logs/nginx.pid;\n# pid /x.pid;\nevents {}\n")
    assert main_settings(conf) == MainSettings(None, None)


@pytest.mark.parametrize("kind", ["missing", "directory", "fifo", "unbalanced", "unreadable", "include loop"])
def test_a_config_that_cannot_be_read_says_nothing_and_never_raises(tmp_path: Path, kind: str) -> None:
    conf = tmp_path / "nginx.conf"
    if kind == "directory":
        conf.mkdir()
    elif kind == "fifo":
        os.mkfifo(conf)  # must not hang
    elif kind == "unbalanced":
        conf.write_text("pid x.pid;\nhttp {\n")
    elif kind == "unreadable":
        conf.write_bytes(b"pid \xff\xfe.pid;\x00\n")
    elif kind == "include loop":
        conf.write_text("include nginx.conf;\ninclude *.conf;\n")
    settings = main_settings(conf)
    assert settings.error_log is None
    assert settings.pid in (None, "\ufffd\ufffd.pid")  # undecodable bytes: replaced, not an error


# -- where NginxControl looks -------------------------------------------------------------------------


def test_the_pid_file_is_given_else_the_configs_else_the_builds(tmp_path: Path) -> None:
    binary, _calls, runner = _fake_binary(tmp_path, OPENRESTY_V.replace("/usr/local/openresty/nginx", str(tmp_path)))
    conf = _write(tmp_path / "conf" / "nginx.conf", "#pid logs/nginx.pid;\nevents {}\n")
    control = NginxControl(binary, runner=runner)
    assert control.default_conf == control.main_conf == conf
    assert control.pid_path() == tmp_path / "logs" / "nginx.pid", "the build's default, under its prefix"
    assert control._error_log_path() == tmp_path / "logs" / "error.log"
    other = _write(tmp_path / "other" / "nginx.conf", "include pid.conf;\nerror_log stderr;\nerror_log e.log;\n")
    _write(tmp_path / "other" / "pid.conf", "pid run/n.pid;\n")
    control = NginxControl(binary, conf=other, prefix=tmp_path / "p", runner=runner)
    assert control.pid_path() == tmp_path / "p" / "run" / "n.pid", "the config's, relative to our -p"
    assert control._error_log_path() == tmp_path / "p" / "e.log"
    control.error_log = "logs/given.log"
    assert control._error_log_path() == tmp_path / "p" / "logs" / "given.log"
    control.pid_file = tmp_path / "given.pid"
    assert control.pid_path() == tmp_path / "given.pid"


def test_a_debian_build_with_its_nginx_conf_logs_where_the_conf_says(tmp_path: Path) -> None:
    binary, _calls, runner = _fake_binary(tmp_path, DEBIAN_V)
    conf = _write(tmp_path / "nginx.conf", f"pid {tmp_path}/run/nginx.pid;\nerror_log {tmp_path}/log/error.log;\n")
    control = NginxControl(binary, conf=conf, prefix=tmp_path, runner=runner)
    assert control._error_log_path() == tmp_path / "log" / "error.log"
    bare = _write(tmp_path / "bare.conf", "events {}\n")
    assert NginxControl(binary, conf=bare, runner=runner)._error_log_path() is None, "Debian's build logs to stderr"


def test_a_master_title_without_c_names_the_builds_config(tmp_path: Path) -> None:
    binary, _calls, runner = _fake_binary(tmp_path, OPENRESTY_V)
    control = NginxControl(binary, runner=runner)
    title = "nginx: master process /usr/local/openresty/nginx/sbin/nginx"
    assert control._title_conf(title) == "/usr/local/openresty/nginx/conf/nginx.conf"
    assert control._title_conf(title + " -p /srv/or/") == "/srv/or/conf/nginx.conf"
    moved = NginxControl(binary, prefix=Path("/srv/or"), runner=runner)
    assert moved.main_conf == Path("/srv/or/conf/nginx.conf"), "what `nginx -p /srv/or/` reads"
    assert moved.default_conf == Path("/usr/local/openresty/nginx/conf/nginx.conf"), "what plain `nginx` reads"


def test_no_master_with_a_reload_command_says_the_command_was_not_run(tmp_path: Path) -> None:
    control = NginxControl("/usr/sbin/nginx", pid_file=tmp_path / "nowhere.pid", reload_cmd=["systemctl", "reload",
                                                                                                 "nginx"])
    with pytest.raises(NginxNotRunning) as err:
        control.reload(None)
    text = str(err.value)
    assert str(tmp_path / "nowhere.pid") in text and "systemctl reload nginx was not run" in text, text
    assert "--pid-file PATH" in text, text


# -- nginx's words ------------------------------------------------------------------------------------


def test_nginx_message_drops_the_log_prefix_but_keeps_the_level() -> None:
    text = ('2026/12/06 02:41:11 [emerg] 13184#13184: unknown directive "bogus" in /x/a.conf:3\n'
            "nginx: configuration file /x/nginx.conf test failed\n")
    assert nginx_message(text) == '[emerg] unknown directive "bogus" in /x/a.conf:3'
    assert nginx_message('nginx: [emerg] unknown directive "x"\n') == '[emerg] unknown directive "x"'
    line = "2026/12/06 02:41:11 [emerg] 7#7: bind() failed"
    assert nginx_message(line, keep_pid=True) == "[emerg] 7#7: bind() failed"


def test_only_dump_headers_at_a_lines_start_name_files(tmp_path: Path) -> None:
    dump = tmp_path / "dump"
    dump.write_bytes(b"# configuration file /a/nginx.conf:\nevents {}\nreturn 200 '# configuration file /x:\n"
                     + b"y" * 70000 + b"# configuration file /not/at/start:\n"
                     + b"\n# configuration file /a/b.conf:\nserver {}\n")
    found: set[str] = set()
    with dump.open("rb") as fh:
        nb.scan_dump(fh, found)
    assert found == {"/a/nginx.conf", "/a/b.conf"}
    (tmp_path / "real.conf").write_text("")
    (tmp_path / "link.conf").symlink_to(tmp_path / "real.conf")
    assert nb.with_real_paths([str(tmp_path / "link.conf")]) == {str(tmp_path / "link.conf"),
                                                                  str(tmp_path / "real.conf")}


def test_the_main_config_is_parsed_again_only_when_a_file_it_read_changed(tmp_path: Path,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """The sidecar asks for the pid file every cycle; a config of thousands of servers took 0.24 s a parse."""
    conf = _write(tmp_path / "nginx.conf", "include main.d/*.conf;\nevents {}\n")
    _write(tmp_path / "main.d" / "a.conf", "pid run/a.pid;\n")
    parses: list[str] = []
    real = nb.crossplane.parse
    monkeypatch.setattr(nb.crossplane, "parse", lambda path, **kw: parses.append(path) or real(path, **kw))
    assert main_settings(conf).pid == "run/a.pid"
    first = len(parses)
    assert main_settings(conf).pid == "run/a.pid" and len(parses) == first, "unchanged: not parsed again"
    _write(tmp_path / "main.d" / "a.conf", "pid run/changed.pid;\n")
    assert main_settings(conf).pid == "run/changed.pid", "an included file changed"
    os.unlink(tmp_path / "main.d" / "a.conf")
    _write(tmp_path / "main.d" / "b.conf", "pid run/b.pid;\n")
    assert main_settings(conf).pid == "run/b.pid", "a file added to a globbed directory"
