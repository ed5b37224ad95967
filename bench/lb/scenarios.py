"""The scenarios: 4 replicas, arrivals at 80 % of the scenario's total capacity (workload.py), each in both
metric shapes (with and without FastDeploy's num_requests_enqueued)."""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from bench.lb.workload import SLOTS, Mix, ReplicaSpec, total_capacity

LOAD = 0.8
N_REPLICAS = 4
ODD = 3  # the replica that is slow, small or killed (external traffic goes to replica 0)
KILL_AT = 3.0  # seconds into the measured window
RESTART_AT = 6.0


@dataclass(frozen=True)
class Scenario:
    name: str
    about: str
    specs: list[ReplicaSpec]
    n_frontends: int = 1
    p_external: float = 0.0
    kill: tuple[float, float] | None = None  # (kill, restart) seconds into the measured window
    mix: Mix = field(default_factory=Mix)
    # FastDeploy 2.4/2.5 (before PaddlePaddle/FastDeploy PR #5798): no num_requests_enqueued series, and
    # num_requests_waiting stays near 0 under a backlog (`fdngx sim --legacy-metrics`).
    legacy: bool = False

    def capacity(self) -> float:
        return total_capacity(self.specs, self.mix)

    def rate(self) -> float:
        return LOAD * self.capacity()


def _specs(**odd: float) -> list[ReplicaSpec]:
    specs = [ReplicaSpec() for _ in range(N_REPLICAS)]
    if odd:
        specs[ODD] = ReplicaSpec(slots=int(odd.get("slots", SLOTS)), speed=float(odd.get("speed", 1.0)))
    return specs


BASE = (
        Scenario("homogeneous", "4 equal replicas", _specs()),
        Scenario("half-speed", f"replica {ODD} runs at half speed (not in the inventory)", _specs(speed=0.5)),
        Scenario("half-slots", f"replica {ODD} has 8 slots instead of 16 (in the inventory)", _specs(slots=8)),
        Scenario("two-frontends", "two independent frontend instances, half the traffic each", _specs(),
                 n_frontends=2),
        Scenario("external", "25 % of requests go straight to replica 0, bypassing the frontend", _specs(),
                 p_external=0.25),
        Scenario("kill-restart", f"replica {ODD} killed {KILL_AT:.0f} s into the window, restarted at "
                 f"{RESTART_AT:.0f} s", _specs(), kill=(KILL_AT, RESTART_AT)),
        Scenario("four-frontends", "four independent frontend instances, a quarter of the traffic each", _specs(),
                 n_frontends=4),
)
# Every scenario in both metric shapes: with num_requests_enqueued (the simulator's default) and without it
# (`-legacy`: what most FastDeploy deployments show, where the queue is not visible in the metrics).
SCENARIOS: dict[str, Scenario] = {
    **{s.name: s for s in BASE},
    **{f"{s.name}-legacy": replace(s, name=f"{s.name}-legacy", about=f"{s.about}; legacy metrics (no queue)",
                                   legacy=True) for s in BASE},
}
