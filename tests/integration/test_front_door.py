"""The front door through a real nginx (standalone and site configs rendered by `fdngx render`) to real
replicas (the simulator, the echo backend, an in-process recorder), all on 127.0.0.1 (issue 13, Deliver 4)."""

from __future__ import annotations

import collections
import contextlib
import json
import re
import shutil
import signal
import socket
import ssl
import stat
import subprocess
import sys
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import openai
import pytest
import requests

from fdngx.sim.process import start_sim
from tests.support import (
    Backends,
    Nginx,
    fdngx,
    free_ports,
    self_signed,
    stop_process_group,
    wait_for,
    write_inventory,
)

pytestmark = pytest.mark.nginx
OURS = {"bad_gateway", "service_unavailable", "gateway_timeout", "rate_limit_exceeded", "invalid_api_key",
        "bad_request", "header_too_large", "not_found"}
CHAT = {"model": "fdngx-sim", "messages": [{"role": "user", "content": "Say something."}], "max_tokens": 8}
KEY, OTHER_KEY, NEW_KEY = "sk-test-AbCdEfGh.123+xyz", "another_key_0001", "rotated-key-0002"


class Door:
    """A standalone nginx rendered by `fdngx render` with front-door options, in a temp dir."""

    def __init__(self, tmp: Path, ports: list[int], *extra: str, tls: bool = False) -> None:
        inv = write_inventory(tmp / "fdngx.json", [
            {"name": f"r{i}", "host": "127.0.0.1", "port": p, "metrics_port": p} for i, p in enumerate(ports)])
        self.port = free_ports(1)[0]
        self.conf = tmp / "nginx" / "nginx.conf"
        self.args = ["-i", str(inv), "--mode", "standalone", "--listen", f"127.0.0.1:{self.port}",
                     "--out", str(self.conf), *extra]
        fdngx("render", *self.args, check=True)
        self.url = f"{'https' if tls else 'http'}://127.0.0.1:{self.port}"
        # With TLS, plain HTTP gets nginx's JSON 400 there: still "up".
        self.nginx = Nginx(self.conf.parent).start(f"http://127.0.0.1:{self.port}/health")

    def apply(self, *extra: str) -> subprocess.CompletedProcess[str]:
        return fdngx("render", *self.args, *extra, "--reload")

    def error_log(self) -> str:
        return (self.conf.parent / "logs" / "error.log").read_text()

    def stop(self) -> None:
        self.nginx.stop()


@pytest.fixture
def stack() -> Iterator[contextlib.ExitStack]:
    with contextlib.ExitStack() as s:
        yield s


def door(stack: contextlib.ExitStack, *args: Any, **kw: Any) -> Door:
    d = Door(*args, **kw)
    stack.callback(d.stop)
    return d


def sim(stack: contextlib.ExitStack, n: int = 1, **kw: Any) -> Any:
    ports = free_ports(2 * n)
    return stack.enter_context(start_sim(ports[:n], ports[n:], **kw))


def assert_nginx_json(r: requests.Response, status: int, code: str) -> dict:
    assert r.status_code == status, (r.status_code, r.text[:300])
    assert r.headers["Content-Type"] == "application/json" and "<html" not in r.text
    body = r.json()
    assert body["error"]["code"] == code and body["error"]["message"], body
    assert r.headers.get("X-Request-ID"), r.headers
    return body


# -- nginx's own errors: JSON; a replica's own: untouched ----------------------------------------------------


def test_overload_through_nginx_answers_only_json(tmp_path: Path, stack: contextlib.ExitStack) -> None:
    """Issue 13: 12 concurrent requests to two small replicas gave 5 JSON 429s and 3 HTML 502 pages."""
    s = sim(stack, 2, max_num_seqs=1, extra_args=["--max-concurrency", "1", "--token-rate", "40"])
    d = door(stack, tmp_path, s.ports)

    def one(_: int) -> requests.Response:
        return requests.post(f"{d.url}/v1/chat/completions", json={**CHAT, "max_tokens": 20}, timeout=60)

    with ThreadPoolExecutor(24) as pool:
        answers = list(pool.map(one, range(24))) + list(pool.map(one, range(24)))
    seen: collections.Counter[str] = collections.Counter()
    for r in answers:
        if r.status_code == 200:
            seen["200"] += 1
            continue
        assert r.headers.get("Content-Type", "").startswith("application/json"), (r.status_code, r.text[:200])
        body = r.json()
        if "detail" in body:  # the replica's own 429 ({"detail": ...}, FastDeploy's shape), passed on as it is
            assert r.status_code == 429 and body["detail"].startswith("Too many requests"), body
            seen["replica 429"] += 1
        else:
            assert body["error"]["code"] in OURS, body
            if r.status_code == 503:
                assert r.headers["Retry-After"] == "1"
            seen[f"nginx {r.status_code}"] += 1
    print(f"overload through nginx: {dict(seen)}")
    assert seen["200"] >= 2 and any(k.startswith("nginx 5") for k in seen), seen


def test_a_replicas_own_errors_pass_through_unchanged(tmp_path: Path, stack: contextlib.ExitStack) -> None:
    s = sim(stack, 1, extra_args=["--error-rate", "1"])
    d = door(stack, tmp_path, s.ports)
    direct = requests.post(f"{s.url(0)}/v1/chat/completions", json=CHAT, timeout=10)
    through = requests.post(f"{d.url}/v1/chat/completions", json=CHAT, timeout=10)
    assert through.status_code == direct.status_code == 500
    assert through.json()["error"]["type"] == direct.json()["error"]["type"] == "internal_error"
    assert "simulated engine error" in through.json()["error"]["message"]
    bad = requests.post(f"{d.url}/v1/chat/completions", json={"max_tokens": 1}, timeout=10)  # a replica's 400
    assert bad.status_code == 400 and bad.json()["error"]["code"] == "missing_required_parameter"


def test_no_live_replica_is_a_json_503_with_retry_after(tmp_path: Path, stack: contextlib.ExitStack) -> None:
    d = door(stack, tmp_path, free_ports(2))  # nothing listens there
    statuses = []
    for _ in range(30):
        r = requests.post(f"{d.url}/v1/completions", json={}, timeout=10)
        statuses.append(r.status_code)
        assert_nginx_json(r, r.status_code, {502: "bad_gateway", 503: "service_unavailable"}[r.status_code])
        if r.status_code == 503:
            assert r.headers["Retry-After"] == "1"
            break
    assert statuses[-1] == 503, statuses


def test_a_silent_replica_is_a_json_504_and_read_timeout_is_an_option(tmp_path: Path,
                                                                      stack: contextlib.ExitStack) -> None:
    s = sim(stack, 1, extra_args=["--hang"])
    d = door(stack, tmp_path, s.ports, "--read-timeout", "1s", "--connect-timeout", "2s")
    assert_nginx_json(requests.post(f"{d.url}/v1/chat/completions", json=CHAT, timeout=20), 504, "gateway_timeout")


def test_a_stream_cut_after_it_started_is_not_rewritten(tmp_path: Path, stack: contextlib.ExitStack) -> None:
    s = sim(stack, 1, extra_args=["--token-rate", "20"])
    d = door(stack, tmp_path, s.ports)
    got = b""
    with requests.post(f"{d.url}/v1/chat/completions", json={**CHAT, "max_tokens": 400, "stream": True},
                       headers={"Accept-Encoding": "gzip"}, stream=True, timeout=30) as r:
        assert r.status_code == 200 and r.headers["Content-Type"].startswith("text/event-stream")
        assert "Content-Encoding" not in r.headers
        chunks = r.iter_content(chunk_size=None)
        while got.count(b"data:") < 3:
            got += next(chunks)  # chunk by chunk, as the replica sends them (no buffering)
        s.fault(0, crash=True)
        with contextlib.suppress(requests.RequestException):
            for chunk in chunks:
                got += chunk
    text = got.decode()
    assert "data:" in text and "[DONE]" not in text  # cut short...
    assert '"param":null,"code"' not in text and "<html" not in text  # ...and nothing of nginx's appended


def test_site_mode_never_gzips_v1_even_when_the_host_does(tmp_path: Path, stack: contextlib.ExitStack) -> None:
    s = sim(stack, 1)
    prefix, port = tmp_path / "p", free_ports(1)[0]
    prefix.mkdir()
    write_inventory(tmp_path / "fdngx.json", [{"name": "r0", "host": "127.0.0.1", "port": s.ports[0]}])
    fdngx("render", "-i", str(tmp_path / "fdngx.json"), "--mode", "site", "--listen", f"127.0.0.1:{port}",
          "--access-log", "logs/access.log", "--out", str(prefix / "fdngx.conf"), check=True)
    (prefix / "nginx.conf").write_text("pid logs/nginx.pid; events {}\nhttp {\n    gzip on; gzip_types *; "
                                       "gzip_min_length 1; gzip_proxied any;\n    include fdngx.conf;\n}\n")
    nginx = Nginx(prefix, prefix / "nginx.conf").start(f"http://127.0.0.1:{port}/health")
    stack.callback(nginx.stop)
    gz = {"Accept-Encoding": "gzip"}
    assert requests.get(f"http://127.0.0.1:{port}/health", headers=gz, timeout=5).headers.get(
        "Content-Encoding") == "gzip"  # the host's gzip is on...
    for r in (requests.get(f"http://127.0.0.1:{port}/v1/models", headers=gz, timeout=5),
              requests.post(f"http://127.0.0.1:{port}/v1/chat/completions", json={**CHAT, "stream": True},
                            headers=gz, timeout=30)):
        assert r.status_code == 200 and "Content-Encoding" not in r.headers  # ...but never on /v1/


def test_malformed_requests_get_json_400s(tmp_path: Path, stack: contextlib.ExitStack) -> None:
    d = door(stack, tmp_path, free_ports(1))
    for raw, code in ((b"GARBAGE\r\n\r\n", "bad_request"),
                      (b"GET /v1/models HTTP/1.1\r\nHost: x\r\nCookie: " + b"a" * 70_000 + b"\r\n\r\n",
                       "header_too_large")):
        with socket.create_connection(("127.0.0.1", d.port), timeout=10) as sock:
            sock.sendall(raw)
            answer = b""
            while chunk := sock.recv(65536):
                answer += chunk
        head, _, body = answer.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 400") and b"Content-Type: application/json" in head, answer[:400]
        assert json.loads(body)["error"]["code"] == code


# -- the body buffer ---------------------------------------------------------------------------------------


def test_a_200kb_prompt_stays_in_memory(tmp_path: Path, stack: contextlib.ExitStack) -> None:
    backends = stack.enter_context(Backends(free_ports(1)))
    d = door(stack, tmp_path, backends.ports)
    prompt = {"model": "m", "messages": [{"role": "user", "content": "x" * 200_000}]}
    warning = "buffered to a temporary file"
    for _ in range(3):
        assert requests.post(f"{d.url}/v1/chat/completions", json=prompt, timeout=10).status_code == 200
    assert warning not in d.error_log()
    assert not list((d.conf.parent / "tmp" / "client_body").iterdir())
    # The control: with a small buffer the same prompt goes to a temp file, and nginx says so (or, with
    # nginx's workers as `nobody` under a root-only pytest directory, says it could not open one: a 500).
    proc = d.apply("--client-body-buffer-size", "16k")
    assert proc.returncode == 0, proc.stderr
    r = requests.post(f"{d.url}/v1/chat/completions", json=prompt, timeout=10)
    log = d.error_log()
    assert warning in log or ("client_body/0" in log and r.status_code == 500), (r.status_code, log[-500:])


# -- TLS + HTTP/2 ------------------------------------------------------------------------------------------


def https_client(url: str, cert: Path, key: str = "x") -> openai.OpenAI:
    http = openai.DefaultHttpx2Client(verify=ssl.create_default_context(cafile=str(cert)))
    return openai.OpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0, timeout=30, http_client=http)


def test_https_with_http2_the_openai_client_and_a_safe_reload(tmp_path: Path, stack: contextlib.ExitStack) -> None:
    cert, key = self_signed(tmp_path)
    s = sim(stack, 1, extra_args=["--token-rate", "200"])
    d = door(stack, tmp_path, s.ports, "--tls-cert", str(cert), "--tls-key", str(key), tls=True)
    r = requests.get(f"{d.url}/v1/models", verify=str(cert), timeout=10)
    assert r.status_code == 200 and "fdngx-sim" in r.text
    with pytest.raises(requests.exceptions.SSLError):
        requests.get(f"{d.url}/v1/models", timeout=10)  # not a certificate the system trusts
    if shutil.which("curl"):
        body = tmp_path / "long.json"  # a 200 KB request over HTTP/2 stays in memory too
        body.write_text(json.dumps({**CHAT, "max_tokens": 1, "user": "u" * 200_000}))
        h2 = subprocess.run(["curl", "-s", "--http2", "--cacert", str(cert), "-o", "/dev/null", "-w",
                             "%{http_code} %{http_version}", "-H", "Content-Type: application/json", "--data-binary",
                             f"@{body}", f"{d.url}/v1/chat/completions"], capture_output=True, text=True, timeout=30)
        assert h2.stdout == "200 2", h2
        assert "buffered to a temporary file" not in d.error_log()
    client = https_client(d.url, cert)
    stream = client.chat.completions.create(**{**CHAT, "stream": True})  # type: ignore[call-overload]
    assert len("".join(ch.choices[0].delta.content or "" for ch in stream if ch.choices).split()) == 8
    # fdngx's own reload check reads /fdngx/generation over plain HTTP on the TLS port: the apply confirms.
    proc = d.apply("--tls-cert", str(cert), "--tls-key", str(key), "--read-timeout", "30m")
    assert proc.returncode == 0 and "applied and reloaded" in proc.stderr, proc.stderr
    assert "proxy_read_timeout 30m;" in d.conf.read_text()
    assert client.models.list().data


# -- API keys ----------------------------------------------------------------------------------------------


def keys_file(tmp: Path, *keys: str) -> Path:
    path = tmp / "api-keys"
    path.write_text("# team keys\n" + "".join(f"{k}\n" for k in keys))
    path.chmod(0o600)
    return path


def test_api_keys_checked_by_nginx_with_the_openai_client(tmp_path: Path, stack: contextlib.ExitStack) -> None:
    s = sim(stack, 1, extra_args=["--token-rate", "200"])
    keys = keys_file(tmp_path, KEY, OTHER_KEY)
    d = door(stack, tmp_path, s.ports, "--api-keys-file", str(keys))
    text = d.conf.read_text()
    (key_map,) = d.conf.parent.glob(".nginx.conf.fdngx-api-keys.*")
    assert KEY not in text and OTHER_KEY not in text and f'include "{key_map}";' in text
    assert stat.S_IMODE(key_map.stat().st_mode) == 0o600 and stat.S_IMODE(d.conf.stat().st_mode) == 0o644

    def client(key: str) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{d.url}/v1", api_key=key, max_retries=0, timeout=30)

    done = client(KEY).chat.completions.create(**CHAT)  # type: ignore[call-overload]
    assert len((done.choices[0].message.content or "").split()) == 8
    assert client(OTHER_KEY).models.list().data
    for wrong in ("sk-wrong-key-0000", KEY.swapcase(), KEY + "x", KEY[:-1]):
        with pytest.raises(openai.AuthenticationError) as info:
            client(wrong).models.list()
        assert info.value.status_code == 401 and info.value.code == "invalid_api_key"
    r = requests.post(f"{d.url}/v1/chat/completions", json=CHAT, timeout=10)
    assert_nginx_json(r, 401, "invalid_api_key")
    assert r.headers["WWW-Authenticate"] == "Bearer"
    assert requests.get(f"{d.url}/health", timeout=5).status_code == 200  # health stays open
    access = (d.conf.parent / "logs" / "access.log").read_text()
    assert "key=L2" in access and KEY not in access and KEY not in d.error_log()

    # Rotation: edit the file, apply; the old key stops working, the new one works.
    keys_file(tmp_path, OTHER_KEY, NEW_KEY)
    proc = d.apply()
    assert proc.returncode == 0 and "applied and reloaded" in proc.stderr, proc.stderr
    with pytest.raises(openai.AuthenticationError):
        client(KEY).models.list()
    assert client(NEW_KEY).models.list().data


def test_a_failed_apply_leaves_nginx_checking_the_keys_it_had(tmp_path: Path, stack: contextlib.ExitStack) -> None:
    """The keys file changed, then the apply failed (its candidate fails nginx -t): the one key map beside the
    config had been rewritten already, so nginx's next plain reload (logrotate's, an admin's) took the new keys
    from a run that said it failed. New keys go to a new map only the candidate names."""
    s = sim(stack, 1)
    keys = keys_file(tmp_path, KEY)
    d = door(stack, tmp_path, s.ports, "--api-keys-file", str(keys))

    def status(key: str) -> int:
        return requests.get(f"{d.url}/v1/models", headers={"Authorization": f"Bearer {key}"}, timeout=10).status_code

    assert (status(KEY), status(NEW_KEY)) == (200, 401)
    keys_file(tmp_path, NEW_KEY)
    broken = tmp_path / "templates"
    broken.mkdir()
    (broken / "_proxy.j2").write_text("no_such_directive on;\n")  # this candidate fails nginx -t
    before = d.conf.read_bytes()
    proc = d.apply("--template-dir", str(broken))
    assert proc.returncode == 1 and "the live file was not touched" in proc.stderr, proc.stderr
    assert d.conf.read_bytes() == before
    assert d.nginx.proc is not None
    workers = d.nginx.worker_pids()
    d.nginx.proc.send_signal(signal.SIGHUP)  # a reload fdngx did not ask for
    wait_for(lambda: not d.nginx.worker_pids() & workers, 20, what="nginx's new workers")
    assert (status(KEY), status(NEW_KEY)) == (200, 401), "a failed apply changed the keys nginx checks"
    # The next good apply takes the new keys; the map no config names goes once it is old enough.
    proc = d.apply()
    assert proc.returncode == 0 and "applied and reloaded" in proc.stderr, proc.stderr
    assert (status(KEY), status(NEW_KEY)) == (401, 200)


def test_a_key_revoked_in_the_file_stays_revoked_under_a_running_sidecar(
        tmp_path: Path, stack: contextlib.ExitStack) -> None:
    """The sidecar read the keys file once, at its start: a key revoked in the file and applied by `render` came
    back at the sidecar's next cycle (it put its own, older map back). It reads the file again when it
    changes: the revoked key is refused, and stays refused."""
    s = sim(stack, 1)
    keys = keys_file(tmp_path, KEY, OTHER_KEY)
    d = door(stack, tmp_path, s.ports, "--api-keys-file", str(keys))
    log = tmp_path / "sidecar.log"
    with log.open("wb") as fh:
        proc = subprocess.Popen([sys.executable, "-m", "fdngx", "-v", "sidecar", *d.args, "--interval", "0.3",
                                 "--metrics-listen", "off"], stdout=subprocess.DEVNULL, stderr=fh,
                                start_new_session=True)
    stack.callback(stop_process_group, proc)

    def status(key: str) -> int:
        return requests.get(f"{d.url}/v1/models", headers={"Authorization": f"Bearer {key}"}, timeout=10).status_code

    def cycles() -> int:
        return len(re.findall(r"cycle \d+:", log.read_text()))

    wait_for(lambda: cycles() >= 2, 30, what=f"two sidecar cycles ({log.read_text()[-500:]})")
    assert (status(KEY), status(OTHER_KEY)) == (200, 200)
    keys_file(tmp_path, OTHER_KEY)  # KEY leaked: revoked
    assert d.apply().returncode == 0  # what the help says to run
    seen = cycles()
    wait_for(lambda: cycles() >= seen + 4, 30, what="four more sidecar cycles")
    # The sidecar rewrote the config render wrote (its own weights), with the new map: KEY stays refused.
    assert (status(KEY), status(OTHER_KEY)) == (401, 200), log.read_text()[-2000:]
    assert "API keys changed: key map version" in log.read_text()


class Recorder(ThreadingHTTPServer):
    """An in-process replica that remembers the Authorization header of every request."""

    def __init__(self, port: int) -> None:
        self.seen: list[str | None] = []
        recorder = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: object) -> None:
                pass

            def do_GET(self) -> None:
                recorder.seen.append(self.headers.get("Authorization"))
                body = b'{"ok": true}'
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        super().__init__(("127.0.0.1", port), Handler)
        self.daemon_threads = True
        self.thread = threading.Thread(target=self.serve_forever, daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.shutdown()
        self.server_close()
        self.thread.join(timeout=10)


def test_api_keys_are_forwarded_or_stripped(tmp_path: Path, stack: contextlib.ExitStack) -> None:
    recorder = Recorder(free_ports(1)[0])
    stack.callback(recorder.stop)
    keys = keys_file(tmp_path, KEY)
    d = door(stack, tmp_path, [recorder.server_address[1]], "--api-keys-file", str(keys))
    auth = {"Authorization": f"Bearer {KEY}"}
    assert requests.get(f"{d.url}/v1/models", headers=auth, timeout=5).status_code == 200
    proc = d.apply("--no-api-keys-forward")
    assert proc.returncode == 0, proc.stderr
    assert requests.get(f"{d.url}/v1/models", headers=auth, timeout=5).status_code == 200
    assert recorder.seen == [f"Bearer {KEY}", None]


# -- rate limits -------------------------------------------------------------------------------------------


def test_rate_limit_answers_json_429_with_retry_after(tmp_path: Path, stack: contextlib.ExitStack) -> None:
    backends = stack.enter_context(Backends(free_ports(1)))
    d = door(stack, tmp_path, backends.ports, "--rate-limit", "2r/s", "--rate-burst", "1")
    with requests.Session() as http:
        answers = [http.post(f"{d.url}/v1/completions", json={}, timeout=5) for _ in range(8)]
        assert all(http.get(f"{d.url}/health", timeout=5).status_code == 200 for _ in range(8))
    limited = [r for r in answers if r.status_code == 429]
    assert limited and answers[0].status_code == 200, [r.status_code for r in answers]
    for r in limited:
        assert_nginx_json(r, 429, "rate_limit_exceeded")
        assert r.headers["Retry-After"] == "1"
