"""The shape of an engine adapter: one EngineSpec per engine carries every per-engine fact fdngx uses."""

from __future__ import annotations

import importlib.util
import shutil
from collections.abc import Callable
from dataclasses import dataclass

from fdngx.domain import Engine, Instance
from fdngx.engines.argv import LaunchRequest, ProcSpec


@dataclass(frozen=True)
class MetricNames:
    """Prometheus sample names for each load signal; the first name present wins, queued ones add up, and so
    do the label sets of one name (less the copies `one_per` names)."""

    running: tuple[str, ...]
    queued: tuple[str, ...]
    kv_usage: tuple[str, ...]
    capacity: tuple[str, ...] = ()
    # Histogram(s) of time per output token (their _sum and _count): the replica's decode speed.
    tpot: tuple[str, ...] = ()
    # Histogram(s) of the time requests waited before admission (their _sum): where the engine does not
    # report its backlog, the increase of that sum per second is the average queue length (Little's law).
    queue_time: tuple[str, ...] = ()
    # Counters of requests the engine received and of those it finished (exposition names, `_total`
    # included): where the backlog is not reported, received - finished - running is the backlog at the
    # scrape, less the requests lost without a success (aborted, failed), which the scraper calibrates out.
    received: tuple[str, ...] = ()
    finished: tuple[str, ...] = ()
    # The scheduler's backlog, by its names across versions (the first present counts, added to `queued`):
    # FastDeploy's requests not yet taken from its local scheduler. When none is present, `queued` cannot be
    # trusted (FastDeploy 2.4/2.5: `num_requests_waiting` alone reads ~0 under a backlog).
    scheduler_queue: tuple[str, ...] = ()
    # Labels that tell copies of one count apart: of an engine's samples of one name whose labels differ only
    # in these, one is kept (the largest; the copies read one batch at slightly different moments) before the
    # label sets add up. Read by fdngx.weights.promtext on both of its paths; () reads every label set as its
    # own count.
    one_per: tuple[str, ...] = ()
    # More labels that tell copies apart in the backlog series only (`queued`, `queue_time`): SGLang's pipeline
    # stages each hold the whole waiting queue, while each runs only its own micro-batches (running adds up).
    backlog_one_per: tuple[str, ...] = ()
    # Labels that split the request gauges (`running`, `queued`) into a total and its breakdown: SGLang with
    # --enable-priority-scheduling exports each under priority="" (the total) and priority="<n>" (each class).
    # The largest copy is the total: kept, the breakdown is not added to it.
    gauge_one_per: tuple[str, ...] = ()


@dataclass(frozen=True)
class Launched:
    """What an engine's launch builder returns: the processes, the inventory instances they serve, extra
    ports that must be free (engine-internal ones), and whether all instances live and die together."""

    procs: list[ProcSpec]
    instances: list[Instance]
    extra_ports: list[int]
    grouped: bool
    # Separate processes that are ranks of one data-parallel group (vLLM's external load balancing): when
    # one dies the others cannot go on, so the supervisor stops and restarts them together.
    coupled: bool = False


Builder = Callable[[LaunchRequest], Launched]


@dataclass(frozen=True)
class EngineSpec:
    name: Engine
    metrics: MetricNames
    build_launch: Builder
    # Seconds `fdngx launch` waits for every /health == 200 by default (a real model loads for minutes).
    default_timeout: float = 1800.0
    health_path: str = "/health"
    # Whether metrics are served on the API port (vLLM, SGLang) rather than a separate metrics port.
    metrics_on_api_port: bool = False
    # JSON pages on the API port that state the replica's capacity when its metrics do not (SGLang's), newest
    # path first, the next one tried after a 404, the last one served by every version (a one-off scrape asks
    # that one); read by the scraper as an optional extra once a minute, see fdngx.weights.scrape and
    # fdngx.weights.memory.PeakRunning.info_path.
    capacity_info_paths: tuple[str, ...] = ()
    # Whether its replicas register with a router themselves (FastDeploy's --router URL).
    registers: bool = False
    # How to tell the engine is installed for this interpreter: a Python module or a command on PATH.
    module: str | None = None
    command: str | None = None

    def installed(self) -> bool:
        if self.module is not None and importlib.util.find_spec(self.module) is None:
            return False
        return self.command is None or shutil.which(self.command) is not None
