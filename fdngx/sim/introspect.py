"""What a simulated replica says about itself: FastDeploy's /config-info (its shape, with the simulator's
own knobs under "sim") and the loopback-only /sim/state used by tests and benchmarks."""

from __future__ import annotations

from typing import Any, Protocol

from fdngx.sim.config import ReplicaConfig, SimConfig
from fdngx.sim.faults import Faults
from fdngx.sim.model import ReplicaModel


class _Replica(Protocol):
    """What the state needs of a replica (fdngx.sim.server.Replica)."""

    rc: ReplicaConfig
    model: ReplicaModel
    faults: Faults
    in_flight: int
    hung: int
    rejected: int
    errors: int


def config_info(rc: ReplicaConfig, sim: SimConfig, model: ReplicaModel) -> dict[str, Any]:
    p = rc.params
    return {
        "model_config": {"model": sim.model_name, "max_model_len": 8192},
        "scheduler_config": {
            "max_num_seqs": rc.max_num_seqs,
            "max_num_batched_tokens": p.max_prefill_tokens,
        },
        "cache_config": {
            "block_size": p.block_size,
            "total_block_num": p.kv_blocks,
            "enable_prefix_caching": True,
        },
        "parallel_config": {
            "tensor_parallel_size": 1,
            "data_parallel_size": len(sim.replicas),
            "local_data_parallel_id": rc.index,
        },
        "port": rc.port,
        "metrics_port": rc.metrics_port,
        "max_concurrency": rc.max_concurrency,
        "sim": {
            "speed": model.speed,
            "token_rate": p.token_rate,
            "batch_cost": p.batch_cost,
            "prefill_rate": p.prefill_rate,
            "jitter": p.jitter,
            "legacy_metrics": sim.legacy_metrics,
        },
    }


def replica_state(replica: _Replica) -> dict[str, Any]:
    m = replica.model
    return {
        "name": replica.rc.name,
        "index": replica.rc.index,
        "port": replica.rc.port,
        "metrics_port": replica.rc.metrics_port,
        "running": m.num_running,
        "waiting": m.num_waiting,
        "in_flight": replica.in_flight,
        "hung": replica.hung,
        "healthy": not (replica.faults.unhealthy or replica.faults.no_weights),
        "speed": m.speed,
        "max_num_seqs": replica.rc.max_num_seqs,
        "max_concurrency": replica.rc.max_concurrency,
        "kv_usage": m.cache_usage(),
        "requests_total": m.requests_total,
        "success_total": m.success_total,
        "rejected_total": replica.rejected,
        "errors_total": replica.errors,
        "generation_tokens_total": m.generation_tokens_total,
        "faults": replica.faults.as_dict(),
    }
