"""Generations of the OpenResty balancer's snapshots: the pusher's wall clock in ms, strictly increasing within
a process, and what a refusal of one as older means.

A frontend keeps the newest generation and refuses an older one (409 stale), so two controllers can push
side by side (run them with NTP). It refuses one more than FUTURE_S ahead of its own clock (400), and lets
one already in force that far ahead give way to the next valid push (fdngx.pool.verdict). A generation in
force further ahead of this host's clock than any frontend takes from a pusher means this host's clock is
behind, not that a second controller pushes.
"""

from __future__ import annotations

import logging
import re
import threading
import time

from fdngx.domain import StrEnum

# fdngx.pool.FUTURE_MS, in seconds (the pool module is written with this value).
FUTURE_S = 300.0

_generation_lock = threading.Lock()
_last_generation = 0


def next_generation() -> int:
    """The pusher's wall clock in ms, strictly increasing within this process (a clock stepped back by a
    little cannot make a later push look older than an earlier one from here). A clock stepped back by more
    than FUTURE_S starts again from the clock: counting on from a generation that far ahead would have every
    frontend refuse each push (400) until this process restarts."""
    global _last_generation
    with _generation_lock:
        now = time.time_ns() // 1_000_000
        follow = _last_generation + 1
        _last_generation = follow if now < follow <= now + FUTURE_S * 1000 else now
        return _last_generation


def seed(saved: object) -> None:
    """Count on from `saved`, the last generation a previous process used (its state file): after a restart
    following a clock set back by less than FUTURE_S, generations from the clock alone would be older than
    what the frontends hold (409 stale until the clock catches up). Ignored unless an integer within FUTURE_S
    ahead of the clock: next_generation gives max(saved + 1, now)."""
    global _last_generation
    if type(saved) is not int or saved > time.time_ns() // 1_000_000 + FUTURE_S * 1000:
        return
    with _generation_lock:
        _last_generation = max(_last_generation, saved)


def last_generation() -> int:
    """The last generation this process gave out (0: none yet)."""
    return _last_generation


def clock_behind(current: int | None, now: float | None = None) -> bool:
    """Whether a generation in force elsewhere is further ahead of this host's clock than any frontend takes
    from a pusher: then this host's clock is behind (a second controller's would be within FUTURE_S)."""
    return current is not None and current / 1000 - (time.time() if now is None else now) > FUTURE_S


def generation_in(text: str) -> int | None:
    """The generation a snapshot's text says it is (its `generation N` line), None if none."""
    found = re.search(r"^generation ([0-9]{1,16})$", text, re.MULTILINE)
    return int(found.group(1)) if found else None


def from_the_future(text: str) -> bool:
    """A peers file with no generation, or one written by a clock more than FUTURE_S ahead of this one: the
    balancer refuses re-sending it (400), so every static render would fail until a replica changed."""
    generation = generation_in(text)
    return generation is None or clock_behind(generation)


class PushState(StrEnum):
    """What a push to one frontend came to, as said in the logs (once per change)."""

    OK = "ok"  # taken, or the same generation again
    FAILED = "failed"  # no answer, refused, an error
    STALE = "stale"  # refused as older: another controller (or one whose clock is ahead) pushes there
    BEHIND = "behind"  # refused as older, by more than any pusher could be ahead: this host's clock is behind

    @classmethod
    def of(cls, status: str, current: int | None) -> PushState:
        """From a frontend's answer: its status ("ok", "unchanged", "stale", else a failure) and, when stale,
        the generation in force there."""
        if status in ("ok", "unchanged"):
            return cls.OK
        if status != "stale":
            return cls.FAILED
        return cls.BEHIND if clock_behind(current) else cls.STALE


def superseded(where: str, generation: int | None, current: int | None, now: float | None = None, *,
               peers_file: bool = False) -> str:
    """Why a push was refused as older (409 stale), for people, one line: how far ahead the generation in
    force is, and the likely cause. `peers_file`: what was pushed is the peers file of a static render, which
    a sidecar's newer snapshot rightly supersedes."""
    if current is None or generation is None:
        return f"{where}: holds a newer generation than this push's {generation}: nothing applied"
    ahead = f"{(current - generation) / 1000:.1f} s newer than"
    if peers_file and not clock_behind(current, now):
        return (f"{where}: keeps its newer snapshot (generation {current}, {ahead} the peers file's {generation}), "
                "as a sidecar's should be")
    why = ("more than the balancer's window ahead of this host's clock: this host's clock looks behind"
           if clock_behind(current, now) else
           "another controller pushes there, or its clock is ahead of this host's")
    return f"{where}: holds generation {current}, {ahead} this push's {generation}: {why}; nothing applied"


def say_change(log: logging.Logger, where: str, was: PushState | None, state: PushState, generation: int | None,
               current: int | None, *, pusher: str = "this host") -> None:
    """Log a push's refusal as older once per change of state: INFO beside a second controller, WARNING when
    this host's clock is behind; INFO again when the frontend takes this pusher's snapshots. (Failures are
    the caller's to say: it knows the error.)"""
    if state == was:
        return
    if state in (PushState.STALE, PushState.BEHIND):
        log.log(logging.WARNING if state is PushState.BEHIND else logging.INFO, "%s (said again when it changes)",
                superseded(where, generation, current))
    elif state is PushState.OK and was in (PushState.STALE, PushState.BEHIND):
        log.info("%s: takes %s's snapshots again", where, pusher)
