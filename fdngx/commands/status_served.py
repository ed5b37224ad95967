"""`fdngx status --out`: what the config file nginx reads gives each replica (fdngx.nginx.served), against what
the policy state says fdngx applied: the current weights status shows, and the lines it says when they differ.

The state records what fdngx's own applies gave nginx; it holds only while fdngx is the only writer. A plain
`fdngx render --reload` (static weights), a restore from backup or a hand-written file at --out change what
nginx runs without a word to the state (an outside review: status showed backup:3/28/28 while nginx ran
weight=1 on all three). So with the nginx flavor the file is the truth; the OpenResty flavor keeps its weights
out of the file (pushed to the balancer), where the state stays the source. Whether the state is fresh (a
sidecar or cron job keeps it) is said here too: `render` asks it before it resets the weights a cron job keeps.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from fdngx.domain import Instance, Inventory
from fdngx.errors import FdngxError
from fdngx.nginx.control import NginxControl
from fdngx.nginx.journal import aside
from fdngx.nginx.networds import REFUSED
from fdngx.nginx.served import Kind, Served, Server
from fdngx.system.files import real_target
from fdngx.weights.state import InstanceState, PolicyState

# A sidecar saves its state at least every 10 s (sidecar.STATE_SAVE_EVERY), cron's render --scrape every run
# (a minute at most in the shipped cron file and timer): older than this (two cron runs missed), nothing is
# keeping the weights. (It was 5 minutes: a killed sidecar's table looked current for that long.)
STATE_STALE_S = 150.0


def state_note(path: Path, age: float | None, exists: bool = False, interval: float = 0.0,
               config: Path | None = None) -> str | None:
    """Why WEIGHT may not be what anything keeps current (None: a sidecar or cron run wrote it recently).
    `exists`: a file is there, yet no state came of it (unusable: the store said why). `interval`: the writer's
    cycle (its state's config): a sidecar with a long --interval saves once a cycle. `config`: WEIGHT is read
    from this config file (current()), not from the state."""
    shown = f"WEIGHT is what {config} gives nginx" if config is not None else "WEIGHT is the inventory's"
    if age is None and exists:
        return f"{path}: the policy state cannot be used (see above), so {shown}"
    if age is None:
        return (f"{path}: no policy state: no sidecar or 'render --scrape' has run for this config, so {shown} "
                "(check --out/--state)")
    if not fresh(age, interval):
        last = shown if config is not None else "WEIGHT is what the last one applied"
        return (f"{path}: last written {_ago(age)} ago: no sidecar or cron run is keeping the weights now; {last} "
                "(is the sidecar or the cron job running?)")
    return None


def fresh(age: float, interval: float = 0.0) -> bool:
    """Whether a policy state written `age` s ago says a sidecar or cron job keeps the weights now."""
    return age <= max(STATE_STALE_S, 3 * interval)


def _ago(seconds: float) -> str:
    minutes = int(seconds // 60)
    if minutes < 120:
        return f"{minutes} min"
    hours = minutes // 60
    return f"{hours} h" if hours < 48 else f"{hours // 24} days"


LISTED = 6  # replicas named in one line; more are counted ("and 12 more")


@dataclass(frozen=True)
class Current:
    """What nginx has for one replica, as status shows it (WEIGHT, SHARE)."""

    weight: int
    down: bool
    backup: bool
    in_config: bool | None = None  # read from the config file: whether it has a server line (None: not read)


def weights_from(served: Served | None, state: PolicyState, has_store: bool) -> str:
    """Where the current weights come from: "config" (the file at --out), "state" (the policy state), or
    "inventory" (neither: its static weights)."""
    if served is not None and served.kind is Kind.WEIGHTS:
        return "config"
    return "state" if has_store and state.updated_at is not None else "inventory"


def current(inst: Instance, st: InstanceState | None, served: Served | None) -> Current:
    """The file's server line for `inst` when the file was read (none: nginx sends it nothing), else the policy
    state's, else the inventory's static render (a drained replica is `down` in it)."""
    if served is not None and served.kind is Kind.WEIGHTS:
        line = served.servers.get(inst.name)
        if line is None:
            return Current(_state_weight(inst, st), True, False, in_config=False)
        return Current(line.weight, line.down, line.backup and not line.down, in_config=True)
    if st is not None:
        return Current(_state_weight(inst, st), bool(st.down), bool(st.backup))
    return Current(inst.weight, inst.drain, False)


def _state_weight(inst: Instance, st: InstanceState | None) -> int:
    return st.weight if st is not None and st.weight is not None else inst.weight


def notes(served: Served | None, inv: Inventory, state: PolicyState, state_path: Path | None,
          kept: bool, nginx: tuple[str | None, str] | None) -> tuple[str, ...]:
    """What to say about the config file (on stderr, above --watch frames, --json config_notes): a file that is
    missing, not fdngx's or unreadable; one whose weights are not the policy state's; an nginx that does not
    serve it. `nginx`: what GET /fdngx/generation answered (None: not asked, an upstream block has no server)."""
    if served is None:
        return ()
    path = served.path
    source = "the policy state's" if state.updated_at is not None else "the inventory's"
    if served.kind is Kind.MISSING:
        return (f"{path}: no such file, so what nginx runs cannot be read from it (is --out the file nginx reads?); "
                f"WEIGHT is {source}",)
    if served.kind is Kind.FOREIGN:
        return (f"{path}: not a config fdngx wrote (no fdngx header): nginx runs what it says, not these weights, "
                "and every sidecar or cron apply refuses to replace it (move it away, or --force); WEIGHT is "
                f"{source}, not what nginx has",)
    if served.kind in (Kind.UNREADABLE, Kind.UNPARSED):
        why = served.error if served.kind is Kind.UNREADABLE else f"fdngx's header, but {served.error}"
        return (f"{path}: {why}: WEIGHT is {source}, not checked against what nginx has",)
    said = []
    if served.edited:
        runs = ("WEIGHT is the edit's, which nginx runs if it was reloaded since" if served.kind is Kind.WEIGHTS
                else "nginx runs the edit if it was reloaded since")
        said.append(f"{path}: edited by hand since fdngx wrote it (no longer its fdngx-generation stamp's text): "
                    f"{runs}; the next sidecar, cron or render apply replaces it and keeps the edit beside it "
                    f"({aside(real_target(path), 'edit')}*)")
    if served.kind is Kind.WEIGHTS and (line := disagreement(served, inv, state, state_path, kept)):
        said.append(line)
    if nginx is not None and served.verify_url is not None and nginx[0] != served.generation:
        said.append(_not_served(served, *nginx))
    return tuple(said)


def master_note(served: Served | None, control: NginxControl | None) -> str | None:
    """upstream mode (a block another nginx.conf includes: no /fdngx/generation to ask): a line when the nginx
    `control` names has no live master (its pid file, verified as an apply does); None when it runs, when
    there is nothing to ask (site/standalone ask over HTTP; a file missing or not fdngx's is said already), or
    when it cannot be told here (no nginx binary, a main config that cannot be read)."""
    if control is None or served is None or served.verify_url is not None:
        return None
    if served.kind not in (Kind.WEIGHTS, Kind.OPENRESTY):
        return None
    try:
        if control.running():
            return None
        pid = control.pid_path()
    except (FdngxError, OSError):
        return None
    if os.path.lexists(pid) and not os.access(pid, os.R_OK):
        return None  # another account's pid file: whether its master runs cannot be told from here
    then = ("WEIGHT is what it gives nginx once nginx starts" if served.kind is Kind.WEIGHTS
            else "nothing is balanced until nginx starts")
    return (f"{served.path}: no nginx master runs per {pid}, so no nginx serves this file: {then} (another nginx "
            "includes it? name it with --nginx-conf or --pid-file)")


def _not_served(served: Served, generation: str | None, words: str) -> str:
    """nginx does not answer GET /fdngx/generation with the file's: stopped, or running another config."""
    weights = served.kind is Kind.WEIGHTS  # the OpenResty flavor's weights are pushed: not the file's
    where = f"nginx at {served.verify_url}"
    if generation is not None:
        return (f"{where} serves generation {generation}, not {served.path}'s {served.generation}: it has not loaded "
                "this file (a reload not done, or refused: its error log)"
                + ("; WEIGHT is the file's, not what nginx runs now" if weights else ""))
    if words == REFUSED and weights:
        return f"{where} {words}: is it running? WEIGHT is what {served.path} gives it once it starts"
    if words == REFUSED:
        return f"{where} {words}: is it running?"
    return f"{where} {words}: whether it runs {served.path} is not known"


def disagreement(served: Served, inv: Inventory, state: PolicyState, state_path: Path | None,
                 kept: bool) -> str | None:
    """One line when the file's servers are not what the policy state says nginx got (None: they are), or
    when the file lacks a replica of the inventory or has one the inventory no longer lists."""
    differ: list[tuple[str, str, str]] = []
    absent: list[str] = []
    for inst in inv.instances:
        line = served.servers.get(inst.name)
        st = state.instances.get(inst.name)
        if line is None:
            absent.append(inst.name)
        elif st is not None and st.weight is not None and not _same(line, st):
            differ.append((inst.name, _word(line.weight, line.down, line.backup), _word(st.weight, st.down, st.backup)))
    names = {i.name for i in inv.instances}
    extra = [n for n in served.servers if n not in names]
    parts = []
    if differ:
        gives = _listed(f"{n} {w}" for n, w, _ in differ)
        says = _listed(f"{n} {w}" for n, _, w in differ)
        parts.append(f"{served.path} gives nginx {gives} ({_origin(served, inv, state)}), the policy state "
                     f"{state_path} says {says}: WEIGHT is the file's; {_then(served, inv, state, kept)}")
    if absent:
        parts.append(f"{served.path} has no server line for {_listed(absent)}: nginx sends it nothing until the next "
                     "render (added to the inventory since?)")
    if extra:
        parts.append(f"{served.path} still gives nginx {_listed(extra)}, which the inventory no longer lists: the "
                     "next render removes it")
    return "; ".join(parts) or None


def _same(line: Server, st: InstanceState) -> bool:
    if line.down or st.down:
        return line.down == bool(st.down)
    return line.weight == st.weight and line.backup == bool(st.backup)


def _word(weight: int | None, down: bool, backup: bool) -> str:
    return "down" if down else f"backup {weight}" if backup else f"weight {weight}"


def _listed(items: Iterable[str]) -> str:
    got = list(items)
    more = len(got) - LISTED
    return ", ".join(got[:LISTED]) + (f" and {more} more" if more > 0 else "")


def _static(served: Served, inv: Inventory) -> bool:
    """Whether the file holds what a render without --scrape writes: each replica's static weight, no backup,
    `down` for a drained one only."""
    for inst in inv.instances:
        line = served.servers.get(inst.name)
        if line is None or line.backup or line.down != inst.drain or line.weight != max(1, inst.weight):
            return False
    return True


def _origin(served: Served, inv: Inventory, state: PolicyState) -> str:
    when = clock(served.written_at)
    if _static(served, inv):
        return f"the inventory's static weights: a render at {when} without --scrape"
    if _after(served, state):
        return f"written at {when}, after the policy's last cycle: by another writer"
    return f"written at {when}"


def _after(served: Served, state: PolicyState) -> bool:
    return served.written_at is not None and state.updated_at is not None and served.written_at > state.updated_at


def _then(served: Served, inv: Inventory, state: PolicyState, kept: bool) -> str:
    """What happens next (`kept`: a sidecar or cron job keeps the state fresh): who puts the policy's weights
    back, or why nobody does."""
    if not kept:
        return "nothing keeps the policy's weights now (see the policy state's line)"
    if _after(served, state):
        hint = " (render with --scrape to keep them)" if _static(served, inv) else ""
        return f"the next sidecar or cron cycle puts the policy's back{hint}"
    return ("the policy's cycles since did not get theirs into it: are its applies failing? (the sidecar's log, "
            "cron's mail)")


def clock(at: float | None) -> str:
    """A file time for people: HH:MM:SS today, else the date too."""
    if at is None:
        return "an unknown time"
    now = time.localtime()
    then = time.localtime(at)
    same_day = (then.tm_year, then.tm_yday) == (now.tm_year, now.tm_yday)
    return time.strftime("%H:%M:%S" if same_day else "%Y-%m-%d %H:%M", then)


def footer(served: Served | None, source: str) -> str | None:
    """The line under the one-shot table that says where WEIGHT comes from (None: no --out)."""
    if served is None:
        return None
    if served.kind is Kind.OPENRESTY:
        return ("WEIGHT: the policy state's (the OpenResty flavor pushes weights to its Lua balancer; "
                f"{served.path} holds none)")
    if source == "config":
        gen = f"generation {served.generation}, " if served.generation else ""
        return f"WEIGHT: what {served.path} gives nginx ({gen}written {clock(served.written_at)})"
    return None
