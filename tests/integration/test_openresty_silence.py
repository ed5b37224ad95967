"""What a frontend does when its pusher goes silent or pushes what is not its own, through the real nginx: a dead
controller's `down` flags stop holding replicas out once no push came for fdngx.store.SILENT_AFTER (the
frontend's own /health checks decide), a standby controller whose clock is behind takes over then, and a
snapshot for another upstream is refused with both names (an outside review's findings 4, 6 and 2)."""

from __future__ import annotations

import re
import time
from pathlib import Path

import pytest

from fdngx.errors import ApplyError
from fdngx.nginx.fanout import Fanout
from fdngx.nginx.generation import next_generation
from fdngx.nginx.pushfile import FrontendSpec
from tests.integration.lua_site import LuaSite, needs_lua
from tests.support import wait_for

pytestmark = [*needs_lua, pytest.mark.timeout(120)]

SILENT = "no snapshot for "


def silent_lines(site: LuaSite) -> list[str]:
    return [ln for ln in site.error_log().splitlines() if SILENT in ln]


def test_a_silent_controllers_down_stops_holding_a_healthy_replica_out_and_a_standby_takes_over(
        tmp_path: Path) -> None:
    site = LuaSite(tmp_path, 2, delay=0.01)
    try:
        # The last push of a controller whose clock runs a minute ahead: b1 down (its /health answers 200 here,
        # as a replica's does once it has recovered). Then the controller dies.
        ahead = int(time.time() * 1000) + 60_000
        assert site.admin.push(site.snapshot(ahead, {"b0": (20, 0, 0), "b1": (20, 1, 0)})).status == "ok"
        # The standby's pushes are older by its clock: refused while the dead one's snapshot is fresh.
        standby = site.snapshot(next_generation(), {"b0": (20, 0, 0), "b1": (20, 0, 0)})
        assert site.admin.push(standby).status == "stale"
        assert site.view()["b1"]["health"] == "down"
        assert "b1" not in site.split(20)
        # No push for SILENT_AFTER: the frontend's own probes (b1 answers 200) decide; said once, at WARN.
        head, view = wait_for(lambda: (v := site.admin.view())[1]["b1"]["health"] == "own-up" and v, 20,
                              interval=0.2, what="b1 back in by the frontend's own checks")
        assert head["silent"] == "1" and float(head["age"]) >= 10.0, head
        assert int(head["generation"]) == ahead and view["b1"]["down"] == "1"  # the snapshot itself stays
        assert "b1" in site.split(20)
        [line] = wait_for(lambda: silent_lines(site), 10, what="the silence said")
        assert "[warn]" in line and re.search(r"no snapshot for \d+ s: the frontend's own health checks decide", line)
        # The standby's next push (an older generation) now takes over, said at WARN; so is the push's return.
        standby = site.snapshot(next_generation(), {"b0": (20, 0, 0), "b1": (20, 1, 0)})
        assert site.admin.push(standby).status == "ok"
        log = site.error_log()
        assert re.search(rf"\[warn\].*generation {ahead} in force was not pushed again for \d+ s \(its pusher "
                         r"went silent\): replaced by the older generation \d+, \d+\.\d s older, of another pusher",
                         log), log
        assert re.search(r"\[warn\].*a push again, after \d+ s without one: its down flags hold replicas out", log)
        head, view = site.admin.view()
        assert (head["silent"], view["b1"]["health"]) == ("0", "down")
        assert "b1" not in site.split(20), "a fresh push's down holds again"
        assert len(silent_lines(site)) == 1, "said once, by one worker"
    finally:
        site.stop()


def test_a_snapshot_for_another_upstream_is_refused_and_the_controller_says_so(tmp_path: Path) -> None:
    site = LuaSite(tmp_path, 2, delay=0.01)  # upstream fastdeploy (the inventory's default)
    fan = Fanout([FrontendSpec(site.admin.url, site.token_file)], timeout=5)
    try:
        gen = site.generation()
        body = site.snapshot(next_generation(), {"b0": (20, 0, 0), "b1": (1, 0, 0)})
        other = body.replace("\n", "\nupstream fleet\n", 1)
        with pytest.raises(ApplyError, match=re.escape("HTTP 409 snapshot for upstream fleet; this frontend's pool "
                                                       "is fastdeploy (nothing applied)")):
            site.admin.push(other)
        (outcome,) = fan.push(other)
        assert outcome.status == "failed" and not outcome.answered
        assert outcome.error is not None and "snapshot for upstream fleet; this frontend's pool is fastdeploy" \
            in outcome.error, outcome.error
        assert site.generation() == gen and site.view()["b1"]["weight"] != "1", "nothing applied"
        # Its own upstream's (and an older pusher's, naming none) go in as ever.
        assert site.admin.push(body.replace("\n", "\nupstream fastdeploy\n", 1)).status == "ok"
        assert site.view()["b1"]["weight"] == "1"
        # The peers file fdngx wrote names the upstream too (checked when nginx starts or reloads).
        assert "\nupstream fastdeploy\n" in site.peers_file.read_text()
    finally:
        fan.close()
        site.stop()
