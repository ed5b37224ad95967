"""The registry's cost at fleet scale: `python -m bench.registry [--instances N]`. Printed, never asserted.

FastDeploy posts `/register` every 5 s per instance (`fastdeploy/engine/register_manager.py`): at the 1,024
instances `--registry-max-instances` allows, ~200 heartbeats a second, nearly all changing nothing. This
registers N instances (in-process, no HTTP: the registry's own work; timed), then times unchanged heartbeats
side by side in one run, in three cases:

- settled: the inventory file last changed 10 s ago (more than store.CachedLoad.RACY_SECONDS);
- churn: one instance changes a field (its version) every CHURN_EVERY heartbeats, as a flapping version or
  is_paused, or a rollout's registrations, do: the file never gets older than RACY_SECONDS. The changes
  themselves (a write each, under the lock) are timed apart;
- plain load: settled, but every read a plain inventory.load (what no cache costs).

Nothing is contacted: /health always passes, no instance has a metrics page, addresses are never resolved.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from fdngx import inventory as inv_mod
from fdngx.domain import Inventory
from fdngx.registry.core import Registry, RegistrySettings
from fdngx.registry.rules import NameCache
from tests.support import HealthyProbe  # contacts nobody

BODY = json.loads((Path(__file__).parent.parent / "tests/fixtures/upstream/fastdeploy-register-body.json").read_text())
CHURN_EVERY = 20  # heartbeats between two changes; any change within RACY_SECONDS keeps the file recent


def body(i: int, **kw: Any) -> dict[str, Any]:
    return {**BODY, "host_ip": f"10.{i // 250 % 250}.{i % 250}.1", "port": 8001, "metrics_port": 9001, **kw}


def register(reg: Registry, b: dict[str, Any]) -> float:
    t = time.perf_counter()
    status, doc = reg.register(b, "10.0.0.1")
    took = time.perf_counter() - t
    if status != 200:
        raise SystemExit(f"registration answered {status}: {doc}")
    return took


class PlainLoad:
    """A plain inventory.load per read, in the registry's reader's place."""

    def __call__(self, path: str | Path, *, verify: bool = False) -> Inventory:
        return inv_mod.load(path)

    def prime(self, path: str | Path, raw: bytes, inv: Inventory) -> None:
        pass


def heartbeats(reg: Registry, n: int, count: int, churn: bool = False) -> tuple[list[float], list[float], list[float]]:
    """Unchanged heartbeats' times; with `churn`, instance 0 changes its version every CHURN_EVERY of them
    (those writes' times apart). Also how old the file was at each heartbeat, in seconds."""
    beats, writes, ages = [], [], []
    for k in range(count):
        if churn and k % CHURN_EVERY == 0:
            writes.append(register(reg, body(0, version=f"v{k // CHURN_EVERY % 2}")))
        ages.append(time.time() - reg.path.stat().st_mtime_ns / 1e9)
        beats.append(register(reg, body(1 + k % (n - 1) if churn else k % n)))
    return beats, writes, ages


def row(name: str, xs: list[float], rate: float | None = None) -> str:
    med = statistics.median(xs)
    cores = f"  -> {rate * med:.2f} cores at {rate:.0f} a second" if rate else ""
    return (f"  {name:48s} median {med * 1000:7.2f} ms  p99 {sorted(xs)[int(len(xs) * 0.99)] * 1000:7.2f} ms"
            f"{cores}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--instances", type=int, default=1024)
    p.add_argument("--heartbeats", type=int, default=400, help="timed per case (default 400)")
    args = p.parse_args()
    n, rate = max(args.instances, 2), max(args.instances, 2) / 5
    with tempfile.TemporaryDirectory(prefix="fdngx-bench-registry-") as d:
        path = Path(d) / "fdngx.json"
        reg = Registry(path, settings=RegistrySettings.from_options(30, max_instances=n),
                       probe=HealthyProbe(), names=NameCache(lambda name: []))
        t0, new = time.perf_counter(), []
        for i in range(n):
            new.append(register(reg, body(i)))
            if i % 128 == 127:
                print(f"  registered {i + 1} of {n} ({time.perf_counter() - t0:.0f} s)", flush=True)
        filled = time.perf_counter() - t0
        size = path.stat().st_size
        settled = time.time() - 10  # as a file last changed more than RACY_SECONDS ago
        os.utime(path, (settled, settled))
        heartbeats(reg, n, 5)  # warm: the first read of this version
        calm, _, calm_age = heartbeats(reg, n, args.heartbeats)
        busy, writes, busy_age = heartbeats(reg, n, args.heartbeats, churn=True)
        reg._load, cached = PlainLoad(), reg._load  # type: ignore[assignment]
        os.utime(path, (settled, settled))
        plain, _, _ = heartbeats(reg, n, args.heartbeats)
        reg._load = cached
    print(f"{n} registered instances, inventory {size / 1024:.0f} KiB; registering them one by one took "
          f"{filled:.1f} s (the last 128: median {statistics.median(new[-128:]) * 1000:.1f} ms each)")
    print(f"unchanged heartbeats, {args.heartbeats} per case (the fleet sends {rate:.0f} a second):")
    print(row(f"settled (the file >= {min(calm_age):.0f} s old)", calm, rate))
    print(row(f"churn (a change every {CHURN_EVERY}; file <= {max(busy_age):.2f} s old)", busy, rate))
    print(row("plain load per read (settled)", plain, rate))
    print(row(f"the churn's changes ({len(writes)} writes, under the lock)", writes))
    med = {k: statistics.median(v) for k, v in (("settled", calm), ("churn", busy), ("plain", plain))}
    print(f"  ratios: churn / settled {med['churn'] / med['settled']:.1f}x; plain / churn "
          f"{med['plain'] / med['churn']:.1f}x; plain / settled {med['plain'] / med['settled']:.0f}x")


if __name__ == "__main__":
    main()
