"""A connection's failure in words (fdngx.nginx.networds), never a library's repr: an outside review found
"_Pool(host='127.0.0.1', port=9401): Max retries exceeded with url: ... (Caused by NewConnectionError(...))"
in an ERROR line of a sidecar whose nginx was stopping. Real sockets on 127.0.0.1."""

from __future__ import annotations

import socket

import pytest
import requests

from fdngx.nginx.admin import Admin, AdminUnreachable
from fdngx.nginx.networds import in_words, refused


def _closed_port() -> tuple[socket.socket, int]:
    s = socket.socket()  # bound, never listening: a connect is refused
    s.bind(("127.0.0.1", 0))
    return s, s.getsockname()[1]


def test_a_frontend_that_refuses_the_connection_is_said_in_words() -> None:
    s, port = _closed_port()
    with s:
        admin = Admin.from_url(f"http://127.0.0.1:{port}", "t" * 32)
        try:
            with pytest.raises(AdminUnreachable) as exc:
                admin.push('{"generation": 1}')
        finally:
            admin.close()
    assert str(exc.value) == f"openresty admin http://127.0.0.1:{port}/fdngx/peers: refused the connection"


def test_requests_errors_in_words() -> None:
    s, port = _closed_port()
    with s, pytest.raises(requests.ConnectionError) as exc:
        requests.get(f"http://127.0.0.1:{port}/", timeout=2)
    assert refused(exc.value) and in_words(exc.value) == "refused the connection"
    listening = socket.create_server(("127.0.0.1", 0))  # accepts (the backlog), never answers
    with listening, pytest.raises(requests.Timeout) as late:
        requests.get(f"http://127.0.0.1:{listening.getsockname()[1]}/", timeout=0.2)
    assert not refused(late.value) and in_words(late.value) == "timed out"
    assert in_words(ConnectionResetError(104, "Connection reset by peer")) == "connection reset by peer"
    assert in_words(ValueError("x")) == "ValueError"
