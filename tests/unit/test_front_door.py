"""The front door of site and standalone configs (issue 13, Deliver 4), rendered: nginx's own errors as
OpenAI JSON, the body buffer, gzip off, the access log's fields and formats, TLS, API keys, rate limits,
timeouts; every new value validated. Real nginx behaviour is in tests/integration/test_front_door.py."""

from __future__ import annotations

import json
import os
import re
import stat
import time
from pathlib import Path

import pytest

from fdngx import inventory
from fdngx.errors import RenderError, UsageError
from fdngx.nginx import frontdoor, keymap
from fdngx.nginx.render import RenderOptions, render
from tests.security.conftest import assert_refused, cli, write

REPO = Path(__file__).resolve().parents[2]
KEYS = ["sk-test-AbCdEfGh.123+xyz", "another_key_0001", "k/=~_-+.ABCDEFGH"]


def sample() -> inventory.Inventory:
    return inventory.load(REPO / "examples" / "fdngx.json")


def site(**kw: object) -> str:
    return render(sample(), RenderOptions(mode=kw.pop("mode", "site"), **kw))  # type: ignore[arg-type]


def location(text: str, name: str) -> str:
    """The text of one location block (braces counted; quoted strings hold none in these configs)."""
    start = text.index(f"location {name} {{")
    depth = 0
    for i in range(text.index("{", start), len(text)):
        depth += {"{": 1, "}": -1}.get(text[i], 0)
        if depth == 0:
            return text[start:i + 1]
    raise AssertionError(f"unbalanced location {name}")


def error_bodies(text: str) -> dict[str, tuple[int, dict]]:
    """error location -> (status it returns last, parsed JSON body), as nginx reads the double-quoted string."""
    out = {}
    for name in re.findall(r"location (= /fdngx/error/\d+|@fdngx_\w+) \{", text):
        status, body = re.findall(r'\n\s+return (\d+) ("(?:[^"\\]|\\.)*");', location(text, name))[-1]
        out[name] = (int(status), json.loads(re.sub(r"\\(.)", r"\1", body[1:-1])))
    return out


# -- defaults: what every site/standalone user gets ----------------------------------------------------------


@pytest.mark.parametrize("mode", ["site", "standalone"])
def test_nginx_own_errors_are_openai_json_with_retry_after_on_429_and_503(mode: str) -> None:
    text = site(mode=mode)
    bodies = error_bodies(text)
    for status in (400, 401, 403, 404, 413, 414, 429, 500, 502, 503, 504):
        assert f"error_page {status} = /fdngx/error/{status};" in text
        loc = location(text, f"= /fdngx/error/{status}")
        assert "internal;" in loc and "default_type application/json;" in loc
        returned, body = bodies[f"= /fdngx/error/{status}"]
        assert returned == status
        err = body["error"]
        assert set(err) == {"message", "type", "param", "code"} and err["message"] and err["type"] and err["code"]
    assert bodies["= /fdngx/error/494"][0] == 400  # header too large: a 400 on the wire
    for status in (429, 503):
        loc = location(text, f"= /fdngx/error/{status}")
        # add_header here replaces the server's: the request id and generation are repeated
        assert "add_header Retry-After 1 always;" in loc and "add_header X-Request-ID" in loc, loc
    # "no live upstreams" (every replica held out after failures or 429s) is an overload: 503 + Retry-After
    loc502 = location(text, "= /fdngx/error/502")
    assert "if ($fdngx_fastdeploy_no_live)" in loc502 and "return 503 " in loc502 and "Retry-After 1" in loc502
    assert bodies["= /fdngx/error/401"][1]["error"]["code"] == "invalid_api_key"
    assert "WWW-Authenticate Bearer" in location(text, "= /fdngx/error/401")
    assert "return 404;" in location(text, "/")  # the catch-all answers through error_page 404 too
    assert "proxy_intercept_errors off;" in text  # a replica's own JSON errors pass through


@pytest.mark.parametrize("mode", ["site", "standalone"])
def test_safe_improvements_are_on_by_default(mode: str) -> None:
    text = site(mode=mode)
    v1 = location(text, "/v1/")
    assert "gzip off;" in v1
    assert "client_body_buffer_size 1m;" in text
    assert "$upstream_header_time" in text and "$request_length" in text
    assert "proxy_connect_timeout 5s;" in v1 and "proxy_read_timeout 1h;" in v1
    # and nothing a user did not ask for
    for absent in ("ssl_", " ssl", "http2", "limit_req", "$fdngx_fastdeploy_api_key", "$http_authorization"):
        assert absent not in text, absent
    assert re.search(r"\n +listen 127\.0\.0\.1:8080;\n", text)


def test_upstream_mode_is_unchanged_and_refuses_front_door_guards(tmp_path: Path) -> None:
    text = site(mode="upstream")
    assert "server {" not in text and "error_page" not in text
    for kw in ({"tls_cert": "/a.pem", "tls_key": "/a.key"}, {"api_keys_file": "/k"}, {"rate_limit": "5"}):
        with pytest.raises(UsageError, match="only for --mode site or standalone"):
            RenderOptions(mode="upstream", **kw).validated()  # type: ignore[arg-type]


def test_timeouts_and_body_buffer_are_options() -> None:
    text = site(read_timeout="90s", connect_timeout="2s", client_body_buffer_size="512k")
    assert "proxy_read_timeout 90s;" in text and "proxy_send_timeout 90s;" in text
    assert "proxy_connect_timeout 2s;" in text and "client_body_buffer_size 512k;" in text


def test_json_access_log_is_valid_json_once_nginx_fills_it_in() -> None:
    text = site(access_log_format="json")
    m = re.search(r"log_format fdngx_fastdeploy escape=json ((?:'[^']*'\s*)+);", text)
    assert m, text
    template = "".join(re.findall(r"'([^']*)'", m.group(1)))
    sample_values = {"status": "502", "body_bytes_sent": "17", "request_length": "210", "request_time": "0.004"}
    filled = re.sub(r"\$([a-z_]+)", lambda v: sample_values.get(v.group(1), "x, y"), template)
    line = json.loads(filled)
    assert {"upstream_header_time", "request_length", "request_id", "upstream", "status"} <= set(line)
    assert "access_log /var/log/nginx/fastdeploy.access.log fdngx_fastdeploy;" in text


# -- TLS ---------------------------------------------------------------------------------------------------


def test_tls_listens_with_ssl_and_http2_and_modern_protocols_only() -> None:
    text = site(tls_cert="/etc/fdngx/tls/cert.pem", tls_key="/etc/fdngx/tls/key.pem", listen="0.0.0.0:443")
    assert "\n    listen 0.0.0.0:443 ssl http2;\n" in text
    assert 'ssl_certificate "/etc/fdngx/tls/cert.pem";' in text
    assert 'ssl_certificate_key "/etc/fdngx/tls/key.pem";' in text
    assert "ssl_protocols TLSv1.2 TLSv1.3;" in text and "ssl_session_tickets off;" in text
    assert "ssl_session_cache shared:fdngx_fastdeploy_tls:10m;" in text
    # the reload check reads /fdngx/generation over plain HTTP on the same port
    assert "error_page 497 = @fdngx_plain_http;" in text
    assert "rewrite ^/fdngx/(generation|status)$ /fdngx/$1 last;" in location(text, "@fdngx_plain_http")


@pytest.mark.parametrize("kw", [
    {"tls_cert": "/a.pem"}, {"tls_key": "/a.key"},
    {"tls_cert": "a.pem", "tls_key": "/a.key"},
    {"tls_cert": "/etc/$ssl_server_name.pem", "tls_key": "/a.key"},
    {"tls_cert": "/a.pem\nssl_protocols SSLv3", "tls_key": "/a.key"},
])
def test_tls_values_are_refused(kw: dict[str, str]) -> None:
    with pytest.raises(UsageError):
        RenderOptions(mode="site", **kw).validated()  # type: ignore[arg-type]


def test_a_tls_path_with_nginx_syntax_stays_one_quoted_argument() -> None:
    text = site(tls_cert='/etc/a b;"} server {.pem', tls_key="/etc/k.pem")
    assert 'ssl_certificate "/etc/a b;\\"} server {.pem";' in text


# -- rate limits -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("given, rate, burst", [
    ("10", "10r/s", 10), ("10r/s", "10r/s", 10), ("10/s", "10r/s", 10), ("600r/m", "600r/m", 10),
    ("30/m", "30r/m", 1), (" 7 ", "7r/s", 7),
])
def test_rate_forms(given: str, rate: str, burst: int) -> None:
    assert frontdoor.rate(given) == rate
    assert frontdoor.default_burst(rate) == burst


def test_rate_limit_by_address_or_by_key_answers_429() -> None:
    text = site(rate_limit="5")
    assert "limit_req_zone $binary_remote_addr zone=fdngx_fastdeploy_req:10m rate=5r/s;" in text
    v1 = location(text, "/v1/")
    assert "limit_req zone=fdngx_fastdeploy_req burst=5 nodelay;" in v1 and "limit_req_status 429;" in v1
    assert "limit_req" not in location(text, "= /health")
    keyed = site(rate_limit="600r/m", rate_burst=3, api_keys_file="/k", api_keys_map="/etc/nginx/.x.fdngx-api-keys")
    assert "limit_req_zone $fdngx_fastdeploy_api_key zone=fdngx_fastdeploy_req:10m rate=600r/m;" in keyed
    assert "burst=3 nodelay;" in keyed


@pytest.mark.parametrize("value", ["0.5", "-1", "10r/h", "10r/s; include /etc/passwd", "1e9", "10 r/s", "1000000"])
def test_bad_rates_are_refused(value: str) -> None:
    with pytest.raises(UsageError, match="--rate-limit"):
        RenderOptions(mode="site", rate_limit=value)


@pytest.mark.parametrize("kw", [{"rate_burst": 5}, {"rate_limit": "5", "rate_burst": -1},
                                {"rate_limit": "5", "rate_burst": 10**9}, {"rate_limit": "5", "rate_burst": True}])
def test_bad_bursts_are_refused(kw: dict[str, object]) -> None:
    with pytest.raises(UsageError, match="--rate-burst"):
        RenderOptions(mode="site", **kw).validated()  # type: ignore[arg-type]


# -- API keys ----------------------------------------------------------------------------------------------


def keys_file(tmp: Path, lines: list[str] | None = None) -> Path:
    path = tmp / "api-keys"
    path.write_text("# who has which key\n\n" + "\n".join(lines if lines is not None else KEYS) + "  # last\n")
    path.chmod(0o600)
    return path


def test_keys_file_parsing_comments_blank_lines_and_duplicates(tmp_path: Path) -> None:
    path = keys_file(tmp_path, [KEYS[0], KEYS[1], KEYS[0]])
    assert frontdoor.load_api_keys(path) == [(3, KEYS[0]), (4, KEYS[1])]


@pytest.mark.parametrize("bad", ["short", "x" * 257, "has space inside", 'quote"key123', "dollar$key12",
                                 "semi;colon1", "brace}key123", "back\\slash12", "ключ-ключ-ключ"])
def test_a_bad_key_is_refused_naming_the_line_not_the_value(tmp_path: Path, bad: str) -> None:
    path = tmp_path / "k"
    path.write_bytes(("good-key-0001\n" + bad + "\n").encode())
    with pytest.raises(UsageError) as info:
        frontdoor.load_api_keys(path)
    msg = str(info.value)
    assert str(path) in msg and (":2:" in msg or "ASCII" in msg) and bad not in msg and "\n" not in msg


def test_an_empty_or_missing_keys_file_is_refused(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="no keys"):
        frontdoor.load_api_keys(keys_file(tmp_path, ["# nobody yet"]))
    with pytest.raises(UsageError, match="no such file"):
        frontdoor.load_api_keys(tmp_path / "missing")


def test_map_entries_are_anchored_case_sensitive_regexes_with_metacharacters_escaped() -> None:
    entries = keymap.map_entries([(2, KEYS[0]), (9, KEYS[2])])
    assert entries == ['"~^(?i:bearer) +sk-test-AbCdEfGh\\.123\\+xyz$" L2;',
                       '"~^(?i:bearer) +k/=~_-\\+\\.ABCDEFGH$" L9;']
    for entry, key in zip(entries, (KEYS[0], KEYS[2]), strict=True):
        pattern = re.compile(entry.split('"')[1][1:])  # what nginx compiles (PCRE reads these the same way)
        assert pattern.fullmatch(f"Bearer {key}") and pattern.fullmatch(f"bearer  {key}")
        assert not pattern.fullmatch(f"Bearer {key.swapcase()}") and not pattern.fullmatch(f"Bearer {key}x")
        assert not pattern.fullmatch(f"Bearer x{key}") and not pattern.fullmatch(key)
    assert not re.fullmatch(entries[0].split('"')[1][1:], "Bearer sk-test-AbCdEfGhX123+xyz")  # `.` is literal


def test_the_key_map_is_private_stable_and_new_keys_get_a_new_file(tmp_path: Path) -> None:
    base = tmp_path / ".fdngx.conf.fdngx-api-keys"
    keys = frontdoor.load_api_keys(keys_file(tmp_path))
    assert keymap.ensure(base, keys, write=False) == (base, "unwritten") and not list(tmp_path.glob(".fdngx.*"))
    p1, v1 = keymap.ensure(base, keys, write=True)
    assert p1 == base.with_name(f"{base.name}.{v1}")
    st = os.stat(p1)
    assert stat.S_IMODE(st.st_mode) == 0o600 and st.st_uid == os.geteuid()
    assert all(k.replace(".", "\\.").replace("+", "\\+") in p1.read_text() for k in KEYS)
    text = p1.read_text()
    assert keymap.ensure(base, keys, write=True) == (p1, v1)  # same keys: same file, same version
    assert os.stat(p1).st_ino == st.st_ino and p1.read_text() == text  # not rewritten
    assert keymap.ensure(base, keys, write=False) == (p1, v1)
    p2, v2 = keymap.ensure(base, keys[:1], write=True)
    # New keys never rewrite the map a live config includes: a run that fails after this leaves nginx's keys.
    assert v2 != v1 and p2 != p1 and KEYS[1] not in p2.read_text() and KEYS[1] in p1.read_text()


def test_maps_no_config_names_go_once_old_enough(tmp_path: Path) -> None:
    base = tmp_path / ".fdngx.conf.fdngx-api-keys"
    keys = frontdoor.load_api_keys(keys_file(tmp_path))
    old, _ = keymap.ensure(base, keys, write=True)
    legacy = base
    legacy.write_text("# an older fdngx's map\n")
    named, _ = keymap.ensure(base, keys[:1], write=True)
    keep, _ = keymap.ensure(base, keys[:2], write=True)
    live = f'include "{named}";\n'.encode()
    later = time.time() + keymap.STALE_AFTER + 1
    assert keymap.prune(base, keep, [live, None], now=time.time()) == []  # too recent: a run may test it
    assert sorted(keymap.prune(base, keep, [live, None], now=later)) == sorted([old, legacy])
    assert named.exists() and keep.exists()
    # A legacy map the live config names stays (its name is a prefix of every versioned one: matched whole).
    legacy.write_text("# an older fdngx's map\n")
    assert keymap.prune(base, keep, [f'include "{legacy}";'.encode()], now=later) == [named]


def _older_unnamed_map(tmp_path: Path) -> tuple[Path, list[tuple[int, str]], Path, Path, float]:
    """A map of the whole keys file, old enough to prune, and the live one (the first key only): (base, keys,
    older, live, the older map's time)."""
    base = tmp_path / ".fdngx.conf.fdngx-api-keys"
    keys = frontdoor.load_api_keys(keys_file(tmp_path))
    older, _ = keymap.ensure(base, keys, write=True)
    live, _ = keymap.ensure(base, keys[:1], write=True)
    long_ago = time.time() - 2 * keymap.STALE_AFTER
    os.utime(older, (long_ago, long_ago))
    return base, keys, older, live, long_ago


def test_a_map_chosen_again_is_young_again_for_another_runs_prune(tmp_path: Path) -> None:
    # Keys put back to an older set: the run takes that older map (no config names it now) into its candidate.
    # Another run's prune (not under the apply lock) must not remove it while that candidate is being tested.
    base, keys, older, live, long_ago = _older_unnamed_map(tmp_path)
    assert keymap.ensure(base, keys, write=True)[0] == older  # the run's candidate names it again
    named = f'include "{live}";\n'.encode()
    assert keymap.prune(base, live, [named]) == [] and older.exists()
    os.utime(older, (long_ago, long_ago))
    assert keymap.ensure(base, keys, write=False)[0] == older  # --check/--diff touch nothing
    assert keymap.prune(base, live, [named]) == [older]


def test_a_map_another_runs_prune_takes_just_before_the_touch_is_written_anew(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # The prune (outside the apply lock) lands between ensure's read of the older map and its touch: ensure
    # returned the removed map, and the candidate named a file that was gone (nginx -t failed).
    base, keys, older, live, _ = _older_unnamed_map(tmp_path)
    real_utime = os.utime

    def racing_utime(path: Path, *a: object, **k: object) -> None:
        keymap.prune(base, live, [f'include "{live}";\n'.encode()])
        real_utime(path, *a, **k)  # type: ignore[arg-type]

    monkeypatch.setattr(keymap.os, "utime", racing_utime)
    path, _ = keymap.ensure(base, keys, write=True)
    assert path.exists() and path != older and all(e in path.read_text() for e in keymap.map_entries(keys))


def test_a_symlink_planted_at_a_key_map_name_is_not_followed(tmp_path: Path) -> None:
    victim = tmp_path / "victim"
    victim.write_text("precious\n")
    victim.chmod(0o644)
    base = tmp_path / ".fdngx.conf.fdngx-api-keys"
    base.symlink_to(victim)
    path, _ = keymap.ensure(base, frontdoor.load_api_keys(keys_file(tmp_path)), write=True)
    assert victim.read_text() == "precious\n" and stat.S_IMODE(victim.stat().st_mode) == 0o644
    assert path != base and stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert keymap.prune(base, path, [], now=time.time() + keymap.STALE_AFTER + 1) == []  # a link: not ours


def test_a_planted_key_map_with_other_keys_is_not_used(tmp_path: Path) -> None:
    base = tmp_path / ".fdngx.conf.fdngx-api-keys"
    planted = base.with_name(base.name + ".0123456789abcdef")
    planted.write_text('# version 0123456789abcdef\n"~^(?i:bearer) +attacker-key$" L1;\n')
    planted.chmod(0o644)  # not private: never trusted, even with the same entries
    path, version = keymap.ensure(base, frontdoor.load_api_keys(keys_file(tmp_path)), write=True)
    assert version != "0123456789abcdef" and path != planted and "attacker" not in path.read_text()


def test_keys_on_without_a_prepared_map_refuses_to_render_an_open_door() -> None:
    with pytest.raises(RenderError, match="key map was not prepared"):
        site(api_keys_file="/etc/fdngx/api-keys")


def test_keys_guard_v1_only_and_can_be_stripped_before_the_replica() -> None:
    text = site(api_keys_file="/k", api_keys_map="/etc/nginx/.x.fdngx-api-keys", api_keys_version="0123456789abcdef")
    assert 'include "/etc/nginx/.x.fdngx-api-keys";' in text and "version 0123456789abcdef" in text
    v1 = location(text, "/v1/")
    assert 'if ($fdngx_fastdeploy_api_key = "") {\n            return 401;' in v1
    assert "proxy_set_header Authorization" not in v1  # forwarded by default
    for other in ("= /health", "= /fdngx/generation"):
        assert "api_key" not in location(text, other)
    stripped = site(api_keys_file="/k", api_keys_map="/m", api_keys_forward=False)
    assert 'proxy_set_header Authorization "";' in location(stripped, "/v1/")
    with pytest.raises(UsageError):
        RenderOptions(mode="site", api_keys_file="/k", api_keys_map="/etc/*.keys").validated()


# -- the CLI: keys never in the config, hostile values refused with exit 2 -----------------------------------


def _inventory(tmp: Path) -> Path:
    return write(tmp / "fdngx.json", json.dumps(
        {"version": 1, "instances": [{"name": "dp0", "host": "127.0.0.1", "port": 8001}]}))


def test_keys_never_reach_the_config_stdout_or_a_diff(tmp_path: Path) -> None:
    inv, keys = _inventory(tmp_path), keys_file(tmp_path)
    out = tmp_path / "conf" / "fdngx.conf"
    out.parent.mkdir()
    args = ["render", "-i", str(inv), "--mode", "site", "--api-keys-file", str(keys), "--access-log", "off"]
    preview = cli(*args, "--out", "-", cwd=tmp_path)
    assert preview.returncode == 0, preview.stderr
    assert not (tmp_path / ".fdngx-api-keys").exists()  # stdout: nothing written
    proc = cli(*args, "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    (key_map,) = out.parent.glob(".fdngx.conf.fdngx-api-keys.*")
    assert stat.S_IMODE(key_map.stat().st_mode) == 0o600
    diff = cli(*args, "--out", str(out), "--diff")
    check = cli(*args, "--out", str(out), "--check")
    assert diff.returncode == 0 and check.returncode == 0, (diff.stderr, check.stderr)
    text = out.read_text()
    assert f'include "{key_map}";' in text
    for key in KEYS:
        for shown in (text, preview.stdout, preview.stderr, proc.stderr, diff.stdout):
            assert key not in shown and key.replace(".", "\\.") not in shown


def test_a_changed_keys_file_changes_the_config(tmp_path: Path) -> None:
    inv, keys = _inventory(tmp_path), keys_file(tmp_path)
    out = tmp_path / "fdngx.conf"
    args = ["render", "-i", str(inv), "--mode", "site", "--api-keys-file", str(keys), "--out", str(out)]
    assert cli(*args).returncode == 0
    first = out.read_text()
    keys_file(tmp_path, KEYS[:1])
    assert cli(*args, "--check").returncode == 1  # stale: a render would change it
    assert cli(*args).returncode == 0
    assert out.read_text() != first
    (was,), (now,) = (re.findall(r'include "([^"]+)";', text) for text in (first, out.read_text()))
    assert now != was and KEYS[1] not in Path(now).read_text() and KEYS[1] in Path(was).read_text()


def test_a_refused_run_writes_no_key_map(tmp_path: Path) -> None:
    """A missing inventory, a file at --out fdngx did not write, a run that would drop the site's mode: each
    refused with one line, and no key map made beside --out (it was written before any of these checks)."""
    keys = keys_file(tmp_path)
    out = tmp_path / "conf" / "site.conf"
    out.parent.mkdir()
    base = ["render", "--mode", "site", "--api-keys-file", str(keys), "--out", str(out)]
    missing = cli(*base, "-i", str(tmp_path / "missing.json"))
    assert missing.returncode == 1 and "inventory file not found" in missing.stderr, missing.stderr
    out.write_text("server { listen 8080; }\n")  # hand-written
    foreign = cli(*base, "-i", str(_inventory(tmp_path)))
    assert foreign.returncode == 1 and "not a file fdngx wrote" in foreign.stderr, foreign.stderr
    assert not list(out.parent.glob(".site.conf.fdngx-api-keys*"))
    out.unlink()
    assert cli("render", "-i", str(_inventory(tmp_path)), "--mode", "site", "--out", str(out)).returncode == 0
    moved = cli(*base, "-i", str(_inventory(tmp_path)), "--mode", "standalone")  # site -> standalone: refused
    assert moved.returncode == 1 and "refusing to change its mode" in moved.stderr, moved.stderr
    assert not list(out.parent.glob(".site.conf.fdngx-api-keys*"))


HOSTILE = [
    ("--read-timeout", "1h; include /etc/passwd"), ("--connect-timeout", "5s }"),
    ("--client-body-buffer-size", "1m;"), ("--client-body-buffer-size", "$x"),
    ("--lua-dict-size", "16m; lua_code_cache off"), ("--lua-dict-size", "16m\ninit_by_lua_block {}"),
    ("--access-log-format", "json; }"), ("--rate-limit", "10r/s; include /etc/passwd"),
    ("--rate-limit", "10r/s\nlisten 1"), ("--tls-cert", "/etc/$host.pem"),
    ("--api-keys-file", "/nonexistent/keys"),
]


@pytest.mark.parametrize("option, value", HOSTILE)
def test_hostile_front_door_values_never_reach_the_config(tmp_path: Path, option: str, value: str) -> None:
    out = tmp_path / "out.conf"
    extra = ["--tls-key", str(write(tmp_path / "k.pem", "x"))] if option == "--tls-cert" else []
    proc = cli("render", "-i", str(_inventory(tmp_path)), "--mode", "standalone", "--out", str(out),
               f"{option}={value}", *extra)
    assert_refused(proc, option)
    assert not out.exists()


def test_a_keys_file_line_that_would_change_the_config_is_refused(tmp_path: Path) -> None:
    keys = write(tmp_path / "keys", 'good-key-0001\nx" 1; } server { listen 1; } map $a $b { "y\n')
    keys.chmod(0o600)
    out = tmp_path / "out.conf"
    proc = cli("render", "-i", str(_inventory(tmp_path)), "--mode", "site", "--out", str(out),
               "--api-keys-file", str(keys))
    assert_refused(proc, "--api-keys-file")
    assert not out.exists() and not list(tmp_path.glob(".out.conf.fdngx-api-keys*"))
    assert "server {" not in proc.stderr


def test_tls_files_must_exist_and_go_together(tmp_path: Path) -> None:
    inv = _inventory(tmp_path)
    cert = write(tmp_path / "cert.pem", "x")
    for extra in (["--tls-cert", str(cert)], ["--tls-cert", str(cert), "--tls-key", str(tmp_path / "nope.pem")]):
        proc = cli("render", "-i", str(inv), "--mode", "site", "--out", "-", *extra)
        assert proc.returncode == 2 and "--tls-" in proc.stderr and "Traceback" not in proc.stderr, proc.stderr


def test_sidecar_takes_the_same_front_door_options() -> None:
    from typer.main import get_command

    from fdngx.cli import app

    root = get_command(app)
    names = {"--read-timeout", "--connect-timeout", "--client-body-buffer-size", "--access-log-format",
             "--tls-cert", "--tls-key", "--api-keys-file", "--api-keys-forward", "--rate-limit", "--rate-burst"}
    for command in ("render", "sidecar"):
        opts = {o for p in root.commands[command].params for o in getattr(p, "opts", [])}  # type: ignore[attr-defined]
        assert names <= opts, (command, names - opts)


def test_render_stays_deterministic_with_every_guard_on() -> None:
    kw = {"tls_cert": "/c.pem", "tls_key": "/k.pem", "api_keys_file": "/k", "api_keys_map": "/m",
          "api_keys_version": "0123456789abcdef", "rate_limit": "5", "access_log_format": "json"}
    assert site(**kw) == site(**kw)


def test_the_sidecar_refuses_hostile_front_door_values_before_doing_anything(tmp_path: Path) -> None:
    out = tmp_path / "out.conf"
    for option, value in (("--rate-limit", "5r/s; include /etc/passwd"), ("--api-keys-file", str(tmp_path / "no"))):
        proc = cli("sidecar", "-i", str(_inventory(tmp_path)), "--mode", "site", "--out", str(out), "--no-reload",
                   "--metrics-listen", "off", f"{option}={value}", timeout=30)
        assert_refused(proc, option, codes=(2,))
        assert not out.exists()
