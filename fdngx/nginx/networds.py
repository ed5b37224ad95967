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
