"""When nginx counts as stopping (fdngx.nginx.control._stopping): only when every child of its master is a
worker "shutting down". A child with another title (a new worker not yet retitled after a reload, still
carrying its master's title; a USR2 binary upgrade's new master; a cache manager) means it still serves, and
a needed reload must not be skipped (an outside review). Real processes with nginx's titles (bash's exec -a)."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from contextlib import contextmanager

from fdngx.nginx.control import _stopping
from fdngx.system import procs
from tests.support import stop_process_group, wait_for


@contextmanager
def master_with(*titles: str) -> Iterator[int]:
    script = " ".join(f"(exec -a '{t}' sleep 30) &" for t in titles) + " wait"
    proc = subprocess.Popen(["bash", "-c", script], start_new_session=True)
    try:
        wait_for(lambda: len(procs.children(proc.pid)) == len(titles)
                 and all(procs.cmdline(k).startswith("nginx:") for k in procs.children(proc.pid)), 10,
                 what="the children titled")
        yield proc.pid
    finally:
        stop_process_group(proc)


def test_stopping_only_when_every_child_is_shutting_down() -> None:
    old = "nginx: worker process is shutting down"
    with master_with(old, old) as master:
        assert _stopping(master)
    with master_with(old, "nginx: master process /usr/sbin/nginx") as master:
        assert not _stopping(master), "a new worker not yet retitled, or a USR2 master: nginx still serves"
    with master_with(old, "nginx: worker process") as master:
        assert not _stopping(master)
