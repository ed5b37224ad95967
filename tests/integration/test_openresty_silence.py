"""A frontend refuses a snapshot that is not its own, through the real nginx: one for another upstream is refused with
both names, and the controller's fan-out says so (an outside review's finding 2)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from fdngx.errors import ApplyError
from fdngx.nginx.fanout import Fanout, FrontendSpec
from fdngx.nginx.generation import next_generation
from tests.integration.lua_site import LuaSite, needs_lua

pytestmark = [*needs_lua, pytest.mark.timeout(120)]


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
