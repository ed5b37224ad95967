"""Where the policy state lives between cron runs and sidecar restarts: a JSON file beside the config.

Reads never fail the caller: a missing, unreadable, garbage or wrongly typed state (its recorded policy
settings included) is logged and replaced by a fresh one (the worst a lost state costs is a cycle of
neutral weights). The file must belong to this user and not be writable by others (refused otherwise:
someone could steer the weights). A state from before fdngx kept it as a dot-file (`<out>.state.json`)
is read once and moved.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import time
from collections.abc import Iterator
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from fdngx.nginx.apply import aside
from fdngx.nginx.journal import remove_stale_temps
from fdngx.system.files import atomic_write, check_private, file_lock, read_regular_file, real_target, remove
from fdngx.weights.settings import PolicyConfig
from fdngx.weights.state import PolicyState

log = logging.getLogger("fdngx.state")
MAX_BYTES = 32 * 1024 * 1024
_MAX_SETTING = 1e6  # every PolicyConfig value is 0 or within 1e-6..1e6 in magnitude


@dataclass(frozen=True)
class StateStore:
    path: Path
    legacy: Path | None = None  # an older location to read once, then remove

    def lock_path(self) -> Path:
        return self.path.with_name(f"{self.path.name}.lock" if self.path.name.startswith(".")
                                   else f".{self.path.name}.lock")

    @contextlib.contextmanager
    def locked(self, timeout: float = 60.0) -> Iterator[None]:
        """Held for a whole cron cycle: two overlapping runs cannot both read the old state."""
        with file_lock(self.lock_path(), timeout=timeout):
            yield

    def load(self) -> PolicyState:
        for path in (self.path, self.legacy):
            if path is None:
                continue
            state = self._read(path)
            if state is not None:
                return state
        return PolicyState()

    def _read(self, path: Path) -> PolicyState | None:
        check_private(path, "policy state file")
        try:
            text = read_regular_file(path, MAX_BYTES)
        except FileNotFoundError:
            return None
        except OSError as exc:
            log.warning("%s: cannot read policy state (%s); starting fresh", path, exc.strerror or exc)
            return PolicyState()
        try:
            state = PolicyState.from_dict(json.loads(text))
            _check_settings(state.config)
            return state
        except (ValueError, TypeError, RecursionError) as exc:  # JSONDecodeError is a ValueError
            log.warning("%s: ignoring unusable policy state (%s); starting fresh", path, str(exc)[:200])
            return PolicyState()

    def save(self, state: PolicyState) -> None:
        # private: a symlink planted at the path after load (the sidecar saves for days) is replaced, not
        # followed into someone else's file.
        atomic_write(self.path, json.dumps(state.to_dict(), indent=1, sort_keys=True) + "\n", private=True)
        # a writer killed between write and rename (a controller's state is beside its inventory, where no
        # apply's recovery looks): its temp goes here, once surely nobody's (fdngx.nginx.journal)
        swept = remove_stale_temps(self.path, time.time())
        if swept:
            log.info("removed %d temp file(s) that interrupted writes of %s left", swept, self.path)
        if self.legacy is not None:
            remove(self.legacy)


def _check_settings(config: dict[str, Any]) -> None:
    """The policy settings a state records (`fdngx status` decides with them) must have the types of
    PolicyConfig and plain magnitudes: `"ramp_steps": 1e308` would overflow the policy. ValueError if not."""
    for f in fields(PolicyConfig):
        if f.name not in config:
            continue
        value, kind = config[f.name], str(f.type)
        if kind == "bool":
            ok = isinstance(value, bool)
        elif kind == "int":
            ok = type(value) is int and abs(value) <= _MAX_SETTING
        elif kind == "float":
            ok = (type(value) in (int, float) and math.isfinite(value)
                  and (value == 0 or 1 / _MAX_SETTING <= abs(value) <= _MAX_SETTING))
        else:
            ok = True
        if not ok:
            raise ValueError(f"setting {f.name!r} = {str(value)[:40]!r} is not a plausible {kind}")


def store_for(out: Path, state: Path | None = None) -> StateStore:
    """The state of the config at `out`: `state` if given, else a dot-file beside it (hidden from include
    globs); an old `<out>.state.json` is read once and moved."""
    if state is not None:
        return StateStore(state.absolute())
    return StateStore(aside(real_target(out), "state.json"), legacy=out.absolute().with_name(out.name + ".state.json"))


def controller_store(inventory: Path) -> StateStore:
    """The state of a controller with no nginx of its own (no --out): a dot-file beside its first inventory."""
    return StateStore(aside(real_target(inventory), "controller-state.json").absolute())
