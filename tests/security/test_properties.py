"""Property tests (hypothesis) over what fdngx reads from places it does not control (issue 10, Deliver 3,
5 and 9): inventories, metrics pages, scraped samples with the policy state, and state files.

- inventory documents, random valid and hostile -> a valid Inventory, or one InventoryError line naming the
  file; never another exception;
- metrics pages with extreme values -> the scrape never raises and what it passes on is clamped;
- samples and state documents, any floats -> the policy never raises and every weight is within
  1..max_weight, cycle after cycle;
- state files, any bytes -> loading never raises, and the state loaded (with the settings it records, as
  `fdngx status` uses them) drives the policy without an error.

Bounded by the `security` profile in `make test`; HYPOTHESIS_PROFILE=fuzz runs them long.
"""

from __future__ import annotations

import ipaddress
import json
import math
import os
from pathlib import Path
from typing import Any

import pytest
from hypothesis import event, example, given
from hypothesis import strategies as st

from fdngx.domain import Engine, Instance, Inventory, LoadSample, valid_host
from fdngx.engines import spec
from fdngx.errors import InventoryError
from fdngx.inventory import NAME, UPSTREAM, address_key, parse_text, to_json
from fdngx.weights.fetch import Client, Fetch
from fdngx.weights.memory import CAPACITY_TRUST, MAX_REQUESTS
from fdngx.weights.policy import decide
from fdngx.weights.scrape import MAX_COUNTER, scrape_all, wanted_names
from fdngx.weights.settings import PolicyConfig, config_for_flavor, config_of_state
from fdngx.weights.state import PolicyState
from fdngx.weights.store import StateStore
from tests.security.conftest import PROPERTY, scaled
from tests.security.strategies import inventory_text, json_any, json_leaf

SOURCE = "/etc/fdngx/fdngx.json"


@PROPERTY
@given(inventory_text())
def test_property_inventory_is_valid_or_one_line_error_naming_the_file(text: str | bytes) -> None:
    try:
        inv = parse_text(text, SOURCE)
    except InventoryError as exc:
        event("refused")
        msg = str(exc)
        assert SOURCE in msg and "\n" not in msg and len(msg) < 1000, msg
        return
    event(f"valid, {min(len(inv.instances), 3)}+ instances")
    assert inv.version == 1 and UPSTREAM.fullmatch(inv.upstream)
    keys = set()
    for inst in inv.instances:
        assert NAME.fullmatch(inst.name) and valid_host(inst.host), inst
        assert "%" not in inst.host and "\n" not in inst.host
        assert 1 <= inst.port <= 65535 and 1 <= inst.metrics_port <= 65535
        assert type(inst.port) is int and type(inst.weight) is int and 1 <= inst.weight <= 10_000
        if not _is_ip(inst.host):
            assert not inst.host.rstrip(".").split(".")[-1].isdigit()
        keys.add(address_key(inst.host, inst.port))
    assert len(keys) == len(inv.instances)
    # A round trip keeps it valid and equal.
    again = parse_text(to_json(inv), SOURCE)
    assert [i.to_dict() for i in again.instances] == [i.to_dict() for i in inv.instances]


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


# -- metrics pages -----------------------------------------------------------------------------------------

EXTREME = ["0", "1", "-1", "3.5", "64", "1e308", "-1e308", "1e300", "1e-320", "NaN", "+Inf", "-Inf", "1" * 400,
           "0x10", "", "abc", "1e999", "-0", "5e-324", "9007199254740993"]


plausible = st.one_of(st.integers(0, 2000).map(str), st.floats(0, 1000).map(repr))


@st.composite
def metrics_page(draw: st.DrawFn) -> tuple[Engine, str]:
    """A page with the series the engine's parser wants (plausible or extreme values, some left out or
    repeated with labels), type lines, and junk lines."""
    engine = draw(st.sampled_from([Engine.FASTDEPLOY, Engine.VLLM, Engine.SGLANG, Engine.SIM]))
    names = sorted(wanted_names(spec(engine)))
    lines = []
    for metric in names:
        if draw(st.integers(0, 15)) == 0:
            continue  # a series missing
        if draw(st.integers(0, 4)) == 0:
            kind = draw(st.sampled_from(["gauge", "gauge", "counter", "untyped", "histogram", "x"]))
            lines.append(f"# TYPE {metric} {kind}")
        for _ in range(draw(st.integers(1, 3))):
            labels = ""
            if draw(st.integers(0, 5)) == 0:
                hostile = draw(st.integers(0, 8)) == 0
                pick = draw(st.sampled_from(['a="\\"}"', "bad", 'a="\n"', "{"]) if hostile
                            else st.sampled_from(['engine="0"', 'x="1",y="2"', 'model_name="m"']))
                labels = "{" + pick + "}"
            extreme = draw(st.integers(0, 14)) == 0
            value = draw(st.one_of(st.sampled_from(EXTREME), st.floats().map(repr)) if extreme else plausible)
            lines.append(f"{metric}{labels} {value}")
    for _ in range(draw(st.integers(0, 5)) // 4):
        lines.insert(draw(st.integers(0, len(lines))), draw(st.one_of(st.text(max_size=40), st.sampled_from(
            ["# HELP x y", "x 1", "# TYPE", "{}", "nan nan", "fastdeploy:num_requests_running",
             "# TYPE vllm:num_requests_running \x1b[2J", 'sglang:num_running_reqs{\x1b]0;t\x07="1"} 1']))))
    if draw(st.integers(0, 5)) == 0:
        draw(st.randoms()).shuffle(lines)
    return engine, "\n".join(lines) + draw(st.sampled_from(["\n", "", "\n# EOF\n"]))


class PageClient(Client):
    """A Client that answers every metrics URL with `page` and every health URL with 200."""

    def __init__(self, page: bytes) -> None:
        super().__init__()
        self.page = page

    def get(self, url: str, **_: Any) -> Fetch:
        return Fetch(200, b"" if "metrics" not in url else self.page, 0.001, None)


@PROPERTY
@given(metrics_page(), st.integers(1, 4096))
def test_property_scrape_never_raises_and_clamps(page: tuple[Engine, str], max_num_seqs: int) -> None:
    engine, text = page
    inst = Instance("r0", "127.0.0.1", 8001, 9001, engine, max_num_seqs)
    client = PageClient(text.encode("utf-8", "surrogatepass"))
    try:
        samples = scrape_all([inst], session=client, deadline=5.0)
    finally:
        client.close()
    s = samples["r0"]
    event("read" if s.ok else f"refused: {(s.error or '')[:30]}")
    if not s.ok:
        assert isinstance(s.error, str) and s.error and len(s.error) <= 200 and s.error.isprintable(), s.error
        return
    for v in (s.running, s.queued):
        assert math.isfinite(v) and 0 <= v <= MAX_REQUESTS
    assert s.kv_usage is None or 0 <= s.kv_usage <= 1
    assert s.capacity is None or max(1.0, max_num_seqs / CAPACITY_TRUST) <= s.capacity <= max_num_seqs * CAPACITY_TRUST
    for v in (s.tpot_sum, s.tpot_count):
        assert v is None or (math.isfinite(v) and 0 <= v <= MAX_COUNTER)


# -- the policy ---------------------------------------------------------------------------------------------

hostile_float = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([0.0, -0.0, 1e308, -1e308, 1e-320, 5e-324, 1e15, 1e16, math.nan, math.inf, -math.inf]),
    st.integers(-(10**20), 10**20).map(float),
)
maybe_float = st.one_of(st.none(), hostile_float)


@st.composite
def a_sample(draw: st.DrawFn, name: str) -> LoadSample | None:
    if draw(st.integers(0, 6)) == 0:
        return None  # missing: not scraped this cycle
    ok, healthy = draw(st.booleans()), draw(st.booleans())
    return LoadSample(
        name, ok, healthy, running=draw(hostile_float), queued=draw(hostile_float), kv_usage=draw(maybe_float),
        capacity=draw(maybe_float), queued_reliable=draw(st.booleans()), tpot_sum=draw(maybe_float),
        tpot_count=draw(maybe_float), scraped_at=draw(hostile_float), latency=draw(hostile_float),
        error=None if ok else "x", health_error=None if healthy else draw(st.sampled_from(["404", None, "\n"])),
    )


finite = st.one_of(st.floats(allow_nan=False, allow_infinity=False),
                   st.sampled_from([0.0, 1e308, -1e308, 1e-320, 1e15, 1e16, 1.7e9]))
wrong = st.one_of(st.none(), st.booleans(), st.integers(-(10**30), 10**30), finite, st.text(max_size=5),
                  st.lists(st.integers(), max_size=2))
TYPED = {  # InstanceState's fields and values of their type (hostile magnitudes included)
    "weight": st.integers(-(10**30), 10**30), "down": st.booleans(), "fails": st.integers(-(10**9), 10**9),
    "oks": st.integers(-(10**9), 10**9), "health_error": st.one_of(st.none(), st.text(max_size=5)),
    "load": st.one_of(st.none(), finite), "log_gain": finite, "capacity": st.one_of(st.none(), finite),
    "last_ok_at": st.one_of(st.none(), finite), "last_error": st.one_of(st.none(), st.text(max_size=5)),
    "last_change_at": st.one_of(st.none(), finite), "recovered_at": st.one_of(st.none(), finite),
    "tpot_sum": st.one_of(st.none(), finite), "tpot_count": st.one_of(st.none(), finite),
    "tpot": st.one_of(st.none(), finite), "speed": finite,
}
SETTINGS = {"ramp_steps": st.integers(-5, 10**20), "ramp_duration": finite, "max_weight": st.integers(-5, 10**20),
            "scale": st.integers(-5, 10**20), "interval": finite, "alpha": finite, "min_factor": finite,
            "stale_half_life": finite, "max_reloads_per_minute": st.integers(-5, 10**9),
            "speed_aware": st.booleans(), "max_speed": finite, "fail_threshold": st.integers(-5, 10**9)}


@st.composite
def state_doc(draw: st.DrawFn, names: list[str]) -> Any:
    if draw(st.integers(0, 12)) == 0:
        return draw(json_any)
    typed = draw(st.integers(0, 3)) > 0  # mostly the right types, else anything

    def value(strats: dict[str, st.SearchStrategy[Any]], key: str) -> Any:
        return draw(strats[key] if typed else wrong)

    insts = {}
    for n in names + draw(st.lists(st.sampled_from(["gone", "dp9"]), max_size=2)):
        if draw(st.integers(0, 3)):
            insts[n] = {k: value(TYPED, k) for k in draw(st.lists(st.sampled_from(sorted(TYPED)), max_size=10))}
    doc: dict[str, Any] = {"version": 1 if typed else draw(st.one_of(st.just(1), json_leaf)), "instances": insts}
    if draw(st.booleans()):
        doc["reloads"] = draw(st.lists(finite if typed else wrong, max_size=6))
    if draw(st.booleans()):
        doc["updated_at"] = draw(finite if typed else wrong)
    if draw(st.booleans()):
        doc["config"] = {k: value(SETTINGS, k) for k in draw(st.lists(st.sampled_from(sorted(SETTINGS)), max_size=4))}
    return doc


def _state(doc: Any) -> PolicyState:
    try:
        return PolicyState.from_dict(doc)
    except ValueError:
        return PolicyState()  # what the store does with a document it refuses


def _inventory(n: int, caps: list[int], weights: list[int]) -> Inventory:
    return Inventory([Instance(f"dp{i}", "127.0.0.1", 8000 + i, 9000 + i, max_num_seqs=caps[i], weight=weights[i])
                      for i in range(n)])


def _check(decisions: Any, inv: Inventory, config: PolicyConfig) -> None:
    assert len(decisions) == len(inv.instances)
    for d in decisions:
        assert type(d.weight) is int and 1 <= d.weight <= config.max_weight, d
        assert isinstance(d.down, bool)


CONFIGS = [PolicyConfig(), config_for_flavor("nginx"), config_for_flavor("openresty"),
           config_for_flavor("nginx", speed_aware=True, scale=100, max_weight=100)]


@scaled(60)
@given(st.data(), st.integers(1, 5), st.sampled_from(range(len(CONFIGS))))
def test_property_policy_never_raises_and_weights_stay_in_bounds(data: st.DataObject, n: int, which: int) -> None:
    config = CONFIGS[which]
    inv = _inventory(n, data.draw(st.lists(st.integers(1, 1_000_000), min_size=n, max_size=n)),
                     data.draw(st.lists(st.integers(1, 10_000), min_size=n, max_size=n)))
    names = [i.name for i in inv.instances]
    state = _state(data.draw(state_doc(names)))
    now = data.draw(st.floats(-1e12, 1e12))
    for _ in range(data.draw(st.integers(1, 4))):
        samples = {}
        for name in names:
            s = data.draw(a_sample(name))
            if s is not None:
                samples[name] = s
        decisions, state = decide(samples, inv, state, config, now)
        _check(decisions, inv, config)
        # The state it returns is a state it can load again (what the store saves).
        state = PolicyState.from_dict(json.loads(json.dumps(state.to_dict())))
        now += data.draw(st.one_of(st.floats(-100, 1e6), st.sampled_from([0.0, 2.0, 1e9])))


def test_a_stored_weight_above_max_weight_is_clamped() -> None:
    """A sidecar ran with --scale 500 (max_weight 500), then restarts with the default (max_weight 100)."""
    config = PolicyConfig()
    inv = _inventory(2, [64, 64], [1, 1])
    state = PolicyState.from_dict({"version": 1, "updated_at": 1000.0, "reloads": [999.0] * 10, "instances": {
        "dp0": {"weight": 500, "fails": 5, "down": True}, "dp1": {"weight": 500, "last_change_at": 0.0}}})
    samples = {"dp0": LoadSample("dp0", False, False, error="refused"),
               "dp1": LoadSample("dp1", True, True, 3.0, 0.0, 0.2, 64.0)}
    decisions, _ = decide(samples, inv, state, config, 1001.0)
    _check(decisions, inv, config)


# -- state files ---------------------------------------------------------------------------------------------

@st.composite
def state_file_bytes(draw: st.DrawFn) -> bytes:
    kind = draw(st.integers(0, 8))
    if kind == 0:
        return draw(st.binary(max_size=300))
    if kind == 1:
        return ("[" * draw(st.integers(100, 5000))).encode()
    text = json.dumps(draw(state_doc(["dp0", "dp1"])), allow_nan=True)
    if kind == 2:
        text = text[: draw(st.integers(0, len(text)))]
    return text.encode()


@scaled(60)
@given(state_file_bytes(), st.sampled_from([0.0, 1e9, 1.7e9]))
# A saved speed with no TPOT beside it: the reason's text multiplied None (found by this test in CI, 2026-12-05).
@example(raw=b'{"version": 1, "instances": {"dp0": {"capacity": null, "last_error": "", "speed": 0.0, '
         b'"last_ok_at": 0.0}}, "config": {"speed_aware": true}}', now=0.0)
def test_property_state_file_load_never_raises_and_drives_the_policy(tmp_path_factory: Any, raw: bytes,
                                                                     now: float) -> None:
    path = Path(tmp_path_factory.mktemp("state")) / ".fdngx.conf.fdngx-state.json"
    path.write_bytes(raw)
    os.chmod(path, 0o600)
    state = StateStore(path).load()
    assert isinstance(state, PolicyState)
    event("loaded" if state.instances or state.config else "fresh")
    config = config_of_state(state)  # what `fdngx status` decides with
    for st_ in state.instances.values():  # above max_weight: test_a_stored_weight_above_max_weight_is_clamped
        if st_.weight is not None:
            st_.weight = min(st_.weight, config.max_weight)
    inv = _inventory(2, [64, 64], [1, 1])
    samples = {"dp0": LoadSample("dp0", True, True, 3.0, 0.0, 0.2, 64.0),
               "dp1": LoadSample("dp1", False, False, error="refused")}
    decisions, _ = decide(samples, inv, state, config, now)
    _check(decisions, inv, config)
    assert config.max_weight <= 1_000_000


def test_profiles_are_bounded_by_default() -> None:
    from tests.security.conftest import PROFILE_NAME

    if PROFILE_NAME != "security":
        pytest.skip("HYPOTHESIS_PROFILE selects another profile")
    assert PROPERTY.max_examples <= 100 and PROPERTY.database is None
