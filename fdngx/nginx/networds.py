"""What went wrong on a connection, in a few words for a log line or an error: never a library's text, which
for requests and urllib3 is a repr of a connection pool, its host and retries and a nested exception ("_Pool(
host='127.0.0.1', port=9401): Max retries exceeded with url: ... (Caused by NewConnectionError(...))": an
outside review found it in an ERROR line). No import of requests: a render that verifies nothing never pays it.
"""

from __future__ import annotations

from collections.abc import Iterator


def _chain(exc: BaseException) -> Iterator[BaseException]:
    """`exc` and what it wraps: its cause and context, urllib3's `reason`, exceptions among its args."""
    seen: set[int] = set()
    todo: list[object] = [exc]
    while todo:
        e = todo.pop()
        if not isinstance(e, BaseException) or id(e) in seen:
            continue
        seen.add(id(e))
        yield e
        todo += [e.__cause__, e.__context__, getattr(e, "reason", None), *e.args]


def refused(exc: BaseException) -> bool:
    """Was the connection refused (ECONNREFUSED: nothing listens) somewhere in what `exc` wraps? A reset or a
    close without an answer (a worker out of connections) is not."""
    return any(isinstance(e, ConnectionRefusedError) for e in _chain(exc))


def in_words(exc: BaseException) -> str:
    """`exc` in a few words: refused the connection, timed out, the OS's words (connection reset by peer), or
    the kind of error."""
    errors = list(_chain(exc))
    if any(isinstance(e, ConnectionRefusedError) for e in errors):
        return "refused the connection"
    if any("Timeout" in kind.__name__ for e in errors for kind in type(e).__mro__):
        return "timed out"
    said = next((e.strerror for e in errors if isinstance(e, OSError) and e.strerror), None)
    return said[:1].lower() + said[1:] if said else type(exc).__name__


REFUSED = "refused the connection"  # what get_generation says when nothing listens there


def get_generation(url: str, timeout: float) -> tuple[str | None, str]:
    """GET `url`, nginx's /fdngx/generation on this host, never through an http_proxy from the environment
    (GPU clusters set one): (its body, at most 4 KiB, when it answered 200, else None; what it answered, in
    words). The reload's confirmation (fdngx.nginx.control) and `fdngx status` (fdngx.nginx.served) ask it."""
    import requests  # here: a render that verifies nothing does not pay its import

    try:
        with requests.Session() as session:
            session.trust_env = False
            with session.get(url, timeout=timeout, stream=True) as resp:
                body = next(resp.iter_content(4096), b"").decode("utf-8", "replace").strip()
    except requests.RequestException as exc:
        return None, REFUSED if refused(exc) else f"was unreachable ({in_words(exc)})"
    if resp.status_code != 200:
        return None, f"answered HTTP {resp.status_code}"
    return body, f"answered HTTP 200 with {body[:40]!r}"
