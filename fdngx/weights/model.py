"""The load model (nginx flavor): how much of each replica's load nginx sent it, and so what came from
elsewhere; the correction each weight gets for it, and when nginx should send a replica nothing at all
(`backup`). Pure: called once per cycle by fdngx.weights.policy.decide."""

from __future__ import annotations

import math
import statistics
from collections.abc import Collection, Mapping

from fdngx.weights.settings import PolicyConfig
from fdngx.weights.state import InstanceState


def _external(load: float, nginx_share: float) -> float:
    """Load beyond nginx's share, once it stands out of the noise: a count of in-flight requests wanders by
    about its square root, so less than two of those is not evidence of traffic from elsewhere."""
    excess = load - nginx_share
    return excess if excess >= 2.0 * math.sqrt(nginx_share + 1.0) else 0.0


def update_corrections(
    states: dict[str, InstanceState],
    active: list[str],
    caps: Mapping[str, float],
    base: Mapping[str, float],
    top_slots: float,
    dt: float,
    config: PolicyConfig,
    settling: Collection[str] = (),
) -> float | None:
    """Move every replica's load correction toward the load model's estimate; returns the fleet load per
    (speed-adjusted) slot, None without fresh replicas.

    The model: nginx's weighted least_conn keeps its own in-flight requests per unit of weight about
    equal, so the replica with the least load per applied weight carries nginx's traffic only, and
    c = its load / its weight is nginx's in-flight per weight unit (replicas below half the median are
    left out of that minimum: nginx is not sending them their share, and no weight can change that).
    Whatever a replica carries beyond c x its weight came from elsewhere (other frontends, direct clients)
    or is KV pressure:

        external_i = L_i - c * w_i, counted once beyond 2 sqrt(c * w_i + 1) (noise)
                                                   L_i = smoothed requests (running + queued), w_i = applied
        want_i     = max(0, U * b_i - external_i) + soft * b_i
        f_i        = want_i / b_i / (sum(want) / sum(b))      1 when nothing is external

    with b_i = slots x static weight x speed (the effective slots) and U = sum(L) / sum(b). A `backup` replica
    gets none of nginx's requests while the others are up (w_i counts as 0, and it is left out of c).

    One step to the estimate, not an integral: nothing winds up while a weight waits for its reload, and a
    replica whose backlog drains gets its weight back as its load falls."""
    lo, hi = math.log(config.min_factor), math.log(config.max_factor)
    # A replica nginx has no weight for yet has had no traffic from it, one failing /health may be skipped
    # by nginx's passive check, and one `settling` (metrics back after a gap or a restart) is refilling: none
    # says anything about nginx's share. A settling one, not far enough below the others to be left out of the
    # minimum below, set nginx's share per weight, and the replicas that had carried the fleet meanwhile looked
    # loaded from elsewhere: all lowered in one reload, raised in the next (bench.lb kill-restart-legacy).
    model = [n for n in active if states[n].weight is not None and not states[n].fails and n not in settling]
    if not active:
        for st in states.values():
            st.log_gain *= 0.5 ** (dt / config.stale_half_life)
        return None
    # Effective slots: capacity x static weight x speed (what the base weight and speed factor express).
    slots = {n: base[n] * top_slots / config.scale * states[n].speed for n in active}
    load = {n: (states[n].load or 0.0) * caps[n] for n in active}
    fleet = sum(load[n] for n in active) / sum(caps[n] * states[n].speed for n in active)
    want: dict[str, float] = {}
    idle: set[str] = set()
    if len(model) > 1:
        # nginx sends a `backup` replica nothing while the others are up, whatever its weight: all its load came
        # from elsewhere, and it says nothing of nginx's share per weight (with none of the others here to
        # say so, nginx may be using it: counted as before).
        idle = {n for n in model if states[n].backup} if any(not states[n].backup for n in model) else set()
        applied = {n: 0.0 if n in idle else float(states[n].weight or 1) for n in model}
        ratios = {n: load[n] / applied[n] for n in model if applied[n] > 0}
        # nginx's share per weight unit: the least loaded replica's, ignoring one far below the others
        # (nginx is not sending it its share: passive failure, ...; its weight cannot fix that).
        typical = statistics.median(ratios.values())
        per_weight = min(r for r in ratios.values() if r >= 0.5 * typical)
        share = sum(load[n] for n in model) / sum(slots[n] for n in model)  # requests per effective slot
        external = {n: _external(load[n], per_weight * applied[n]) for n in model}
        want = {n: max(0.0, share * slots[n] - external[n]) + config.soft * slots[n] for n in model}
        mean = sum(want.values()) / sum(slots[n] for n in model)
        # Traffic from elsewhere alone fills a replica to (or past) its fair share: even the smallest weight
        # sends it a trickle of nginx's requests that wait in its queue and make nginx's p99 (measured: 2 % of
        # requests at 3x the others' TTFT). nginx's `backup` sends it none while the others are available.
        # Hysteresis: in at 90 % of the fair share (nginx's part would round to nothing), out below 70 %. Never
        # every replica.
        for n in model:
            fair = share * slots[n]
            states[n].overflow = config.gain > 0 and (external[n] >= (0.7 if states[n].overflow else 0.9) * fair > 0)
        if all(states[n].overflow for n in model):
            for n in model:
                states[n].overflow = False
    for name, st in states.items():
        if name in want:
            target = math.log(want[name] / slots[name] / mean) if want[name] > 0 else lo
            target = 0.0 if abs(target) <= config.tolerance else min(hi, max(lo, target))
            # In backup the whole step: nothing nginx does moves its load, so there is no loop to damp, and its
            # weight when it leaves backup is what its room then calls for.
            st.log_gain += (1.0 if name in idle else config.gain) * (target - st.log_gain)
        elif name in active and (len(model) < 2 or st.weight is None):
            st.log_gain, st.overflow = 0.0, False  # alone, or new: nothing to compare with
        elif name in active:
            pass  # failing /health or settling: its verdicts wait for a reading that says something
        else:
            # Stale or down: fade toward neutral so a replica never keeps a verdict based on old data.
            st.log_gain *= 0.5 ** (dt / config.stale_half_life)
            st.overflow = False
        st.log_gain = min(hi, max(lo, st.log_gain))
    return fleet
