"""Simulated replicas for one run: one `fdngx sim` process per replica, so one can be killed and restarted."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from bench.lb import procs
from bench.lb.workload import BATCH_COST, PREFILL_RATE, TOKEN_RATE, ReplicaSpec
from fdngx.sim.process import SimProcess, free_ports, start_sim


class Cluster:
    def __init__(self, specs: list[ReplicaSpec], workdir: Path, seed: int, *, token_rate: float = TOKEN_RATE,
                 prefill_rate: float = PREFILL_RATE, legacy: bool = False) -> None:
        self.specs = specs
        self.sim_args = ["--token-rate", str(token_rate), "--prefill-rate", str(prefill_rate),
                         "--batch-cost", str(BATCH_COST), *(["--legacy-metrics"] if legacy else [])]
        self.workdir = workdir
        self.seed = seed
        ports = free_ports(2 * len(specs))
        self.ports = ports[: len(specs)]
        self.metrics_ports = ports[len(specs):]
        self.sims: list[SimProcess | None] = [None] * len(specs)
        self.restarts = 0

    @property
    def n(self) -> int:
        return len(self.specs)

    def url(self, i: int) -> str:
        return f"http://127.0.0.1:{self.ports[i]}"

    def metrics_url(self, i: int) -> str:
        return f"http://127.0.0.1:{self.metrics_ports[i]}"

    def index_of(self, replica_header: str | None) -> int:
        try:
            return self.ports.index(int(replica_header or ""))
        except ValueError:
            return -1

    def _start_one(self, i: int) -> SimProcess:
        spec = self.specs[i]
        sim = start_sim(
            [self.ports[i]], [self.metrics_ports[i]], speed=spec.speed, max_num_seqs=spec.slots,
            seed=self.seed * 100 + i,
            extra_args=self.sim_args,
            log_path=self.workdir / f"sim{i}.log",
        )
        procs._live[sim.proc.pid] = sim.proc  # so an interrupted run still stops it
        return sim

    def start(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        with ThreadPoolExecutor(self.n) as ex:
            futures = [ex.submit(self._start_one, i) for i in range(self.n)]
            for i, fut in enumerate(futures):
                self.sims[i] = fut.result()

    def kill(self, i: int) -> None:
        sim = self.sims[i]
        if sim is not None:
            # SIGTERM: the simulator exits at once and cuts its open streams, like a crashed server.
            sim.stop(grace=2.0)
            procs._live.pop(sim.proc.pid, None)
        self.sims[i] = None

    def restart(self, i: int) -> None:
        self.sims[i] = self._start_one(i)
        self.restarts += 1

    def stop(self) -> None:
        def one(i: int) -> None:
            self.kill(i)

        with ThreadPoolExecutor(self.n) as ex:
            list(ex.map(one, range(self.n)))

    def pgids(self) -> list[int]:
        return [s.proc.pid for s in self.sims if s is not None]

    def inventory(self, path: Path, *, capacity_weights: bool) -> Path:
        """The inventory an operator writes. capacity_weights: weight = slots relative to the smallest
        (fdngx-static's capacity weights); otherwise weight 1 (the sidecar derives capacity itself and
        multiplies it by the inventory weight)."""
        least = min(s.slots for s in self.specs)
        instances: list[dict[str, Any]] = [
            {
                "name": f"dp{i}", "host": "127.0.0.1", "port": self.ports[i], "metrics_port": self.metrics_ports[i],
                "engine": "sim", "max_num_seqs": s.slots, "role": "mixed",
                "weight": (s.slots // least if s.slots % least == 0 else s.slots) if capacity_weights else 1,
            }
            for i, s in enumerate(self.specs)
        ]
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"version": 1, "upstream": "fastdeploy", "instances": instances}, indent=2))
        return path
