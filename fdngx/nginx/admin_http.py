"""The admin client's HTTP transport (fdngx.nginx.admin): requests with a connection class that reports each
socket it opens, so another thread can shut it down (fdngx.nginx.admin.Watch).

A module of its own, imported on first use: requests and urllib3 take ~0.09 s to import, a third of a cron
`fdngx render` that pushes nothing (the plain nginx flavor, --check, --diff, stdout).
"""

from __future__ import annotations

import functools
import socket
from typing import Any, Protocol

import requests
import urllib3
from requests.adapters import HTTPAdapter


class Watch(Protocol):
    """Told of every socket the session connects (fdngx.nginx.admin.Watch)."""

    def opened(self, sock: socket.socket | None) -> None: ...


class _Conn(urllib3.connection.HTTPConnection):
    def __init__(self, *args: Any, watch: Watch, **kw: Any) -> None:
        super().__init__(*args, **kw)
        self.watch = watch

    def connect(self) -> None:
        super().connect()
        self.watch.opened(self.sock)


class _Pool(urllib3.HTTPConnectionPool):
    ConnectionCls = _Conn  # `watch` reaches it among the pool's connection keywords


def direct_session(watch: Watch) -> requests.Session:
    """A session that never goes through an HTTP(S)_PROXY and tells `watch` of every connection it opens."""
    session = requests.Session()
    session.trust_env = False  # pushes go straight to the frontend, never through an HTTP(S)_PROXY
    adapter = HTTPAdapter()
    adapter.poolmanager.pool_classes_by_scheme = {"http": functools.partial(_Pool, watch=watch)}
    session.mount("http://", adapter)
    return session
