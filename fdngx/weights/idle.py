"""`fdngx drain NAME --wait`: wait until nothing is in flight on a drained replica, saying how it goes.

The replica is read as the sidecar reads it (fdngx.weights.scrape, one client and one memory for the whole
wait, so an engine's backlog estimate works as in a cycle): running + queued, clients that bypass nginx
included. Done when that is 0 on QUIET_READS reads in a row (a request that starts between two reads shows
on the next), or when nothing listens at its address any more (stopped: nothing can run there). Given
`applied` (`--out`: the config file's server line, or the policy state beside it: fdngx.commands.drain), quiet
reads count only once nginx holds the replica out: before that a quiet moment between two requests proves
nothing. A page that cannot be read is waited through, saying why. Out of time:
an FdngxError saying what still runs and what to check; the replica stays drained either way.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from fdngx.domain import Instance
from fdngx.errors import FdngxError
from fdngx.weights.memory import PeakRunning
from fdngx.weights.policy import in_flight
from fdngx.weights.scrape import make_client, no_load_signal, scrape_all

QUIET_READS = 2
POLL_S = 1.0
SAY_EVERY_S = 5.0


def wait_idle(inst: Instance, timeout: float, say: Callable[[str], None], *,
              applied: Callable[[], str | None] | None = None,
              clock: Callable[[], float] = time.monotonic, sleep: Callable[[float], None] = time.sleep) -> None:
    """Return once nothing is in flight on `inst`; raise FdngxError after `timeout` seconds. `applied`: None
    once nginx holds the replica out, else what says it does not yet; until then, no quiet read counts."""
    if no_load_signal(inst):
        raise FdngxError(f"{inst.name}: registered without a metrics port: fdngx cannot see what runs there, "
                         "so it cannot wait for it (see --registry-metrics-port)")
    client, peaks = make_client(), PeakRunning()
    start = clock()
    said_at: float | None = None
    said_held = True
    quiet = 0
    try:
        while True:
            sample = scrape_all([inst], session=client, peaks=peaks).get(inst.name)
            if sample is not None and sample.refused:
                say(f"{inst.name}: nothing listens at {inst.address} any more: nothing in flight there")
                return
            pending = applied() if applied is not None else None
            held = pending is None
            left, what = in_flight(sample)
            if pending is not None:
                what = f"the drain is not applied yet ({pending})"
            quiet = quiet + 1 if held and left == 0 else 0
            if quiet >= QUIET_READS:
                say(f"{inst.name}: {what}")
                return
            now = clock()
            waited = now - start
            if waited >= timeout:
                ask = "Is the drain applied? " if held else ""
                raise FdngxError(
                    f"{inst.name}: {what} after {timeout:g} s; it stays drained. {ask}A running sidecar applies it "
                    "within its --debounce seconds, else run `fdngx render --reload` with your usual options "
                    "(--scrape too where a cron job keeps the weights); wait longer with a larger --wait")
            due = said_at is None or now - said_at >= SAY_EVERY_S or held != said_held  # or once it is applied
            if due and quiet == 0:  # a quiet read: the next one decides
                say(f"{inst.name}: {what}; waiting ({waited:.0f} s of {timeout:g})")
                said_at, said_held = now, held
            sleep(POLL_S)
    finally:
        client.close()
