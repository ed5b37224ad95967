"""The `fdngx sim` process: start every replica on one loop, stop on SIGTERM/SIGINT or when all have crashed."""

from __future__ import annotations

import asyncio
import logging
import signal

from fdngx.sim.config import SimConfig
from fdngx.sim.server import Replica

log = logging.getLogger("fdngx.sim")


async def serve(cfg: SimConfig) -> int:
    """Run until SIGTERM/SIGINT (exit status 0) or until every replica has crashed (status 1)."""
    done = asyncio.Event()
    replicas: list[Replica] = []

    def on_crash() -> None:
        if all(r.crashed for r in replicas):
            done.set()

    replicas.extend(Replica(rc, cfg, on_crash) for rc in cfg.replicas)
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        for r in replicas:
            await r.start(cfg.host)
        log.info(
            "fdngx sim: %d replicas on %s, API ports %s, metrics ports %s",
            len(replicas),
            cfg.host,
            ",".join(str(r.rc.port) for r in replicas),
            ",".join(str(r.rc.metrics_port) for r in replicas),
        )
        if cfg.crash_after is not None:
            for r in replicas:
                loop.call_later(cfg.crash_after, lambda r=r: asyncio.ensure_future(r.crash()))
        waiters = [asyncio.ensure_future(stop.wait()), asyncio.ensure_future(done.wait())]
        await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
        for w in waiters:
            w.cancel()
        return 0 if stop.is_set() else 1
    finally:
        for r in replicas:
            await r.stop()


def run(cfg: SimConfig) -> int:
    return asyncio.run(serve(cfg))
