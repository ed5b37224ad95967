"""One scrape -> policy cycle with the policy state kept in a small JSON file: what cron mode runs.

`fdngx render --scrape` calls `run_cycle` once per run; the state file (`<out>.state.json`, beside the
rendered config) carries smoothing, hold times, failure counts and the reload budget from one run to the
next, so cron behaves like the sidecar, only slower. The sidecar keeps the same state in memory and
saves it with the same functions, so a restarted sidecar (or `fdngx status`) picks up where it left.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, replace
from pathlib import Path

import requests

from fdngx.fetch import Client
from fdngx.fsutil import atomic_write, file_lock
from fdngx.inventory import Inventory
from fdngx.policy import Decisions, PolicyConfig, PolicyState, decide
from fdngx.render import ServerState
from fdngx.scrape import LoadSample, scrape_all

log = logging.getLogger("fdngx.cycle")


@dataclass(frozen=True)
class CycleResult:
    states: dict[str, ServerState]  # what render() needs, keyed by instance name
    decisions: Decisions
    samples: dict[str, LoadSample]
    changed: bool
    state: PolicyState


def state_path_for(out: Path) -> Path:
    """The state file that belongs to a rendered config: `<out>.state.json` in the same directory."""
    return out.with_name(out.name + ".state.json")


def load_state(path: Path) -> PolicyState:
    """The saved state, or a fresh one when there is none or it cannot be read (logged, never fatal:
    the worst a lost state costs is one cycle of neutral weights)."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return PolicyState()
    except OSError as exc:
        log.warning("%s: cannot read policy state (%s); starting fresh", path, exc)
        return PolicyState()
    try:
        return PolicyState.from_dict(json.loads(text))
    except ValueError as exc:  # JSONDecodeError is a ValueError
        log.warning("%s: ignoring unreadable policy state (%s); starting fresh", path, exc)
        return PolicyState()


def save_state(path: Path, state: PolicyState) -> None:
    atomic_write(path, json.dumps(state.to_dict(), indent=1, sort_keys=True) + "\n")


def server_states(decisions: Decisions) -> dict[str, ServerState]:
    return {d.name: ServerState(d.weight, d.down) for d in decisions}


def unapplied(new: PolicyState, old: PolicyState) -> PolicyState:
    """`new` with the applied weights/down of `old`: what to keep when writing the config failed, so
    the next cycle sees the change as still pending instead of done (health counts and smoothing stay)."""
    instances = {}
    for name, st in new.instances.items():
        prev = old.instances.get(name)
        instances[name] = replace(
            st,
            weight=prev.weight if prev else None,
            down=prev.down if prev else False,
            last_change_at=prev.last_change_at if prev else None,
        )
    reloads = [t for t in new.reloads if t in old.reloads]
    return PolicyState(instances, reloads, new.updated_at)


def run_cycle(
    inv: Inventory,
    *,
    state_path: Path,
    config: PolicyConfig | None = None,
    session: Client | requests.Session | None = None,
    now: float | None = None,
    save: bool = True,
) -> CycleResult:
    """Load state, scrape every instance, decide, save state (unless `save` is False: --check, --diff).

    Holds `<state>.lock` throughout so two overlapping cron runs cannot both read the old state and
    double-count a cycle. Called from inside safe_apply's content_fn, so it runs under that lock too."""
    config = (config or PolicyConfig()).validated()
    lock = state_path.with_name(f".{state_path.name}.lock")
    with file_lock(lock):
        state = load_state(state_path)
        samples = scrape_all(inv.instances, session=session)
        at = time.time() if now is None else now
        decisions, new_state = decide(samples, inv, state, config, at)
        if save:
            save_state(state_path, new_state)
    for d in decisions:
        if d.changed and save:
            log.info("%s: %s", d.name, d.reason)
    return CycleResult(server_states(decisions), decisions, samples, decisions.changed, new_state)
