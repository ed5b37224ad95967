"""The registry's heartbeat cost at fleet scale: `python -m bench.registry [--instances N]`. Printed, never
asserted.

FastDeploy posts `/register` every 5 s per instance (`fastdeploy/engine/register_manager.py`): at the 1,024
instances `--registry-max-instances` allows, ~200 heartbeats a second, nearly all changing nothing. This
registers N instances (in-process, no HTTP: the registry's own work), then times unchanged heartbeats side by
side in one run: reading the inventory files through registry.store.CachedLoad (what the registry does) and
with a plain inventory.load per read (what it did before). Nothing is contacted: /health always passes, no
instance has a metrics page, addresses are never resolved.
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
from fdngx.registry.core import Registry, RegistrySettings
from fdngx.registry.rules import NameCache
from fdngx.registry.store import CachedLoad
from tests.support import HealthyProbe  # contacts nobody

BODY = json.loads((Path(__file__).parent.parent / "tests/fixtures/upstream/fastdeploy-register-body.json").read_text())


def body(i: int) -> dict[str, Any]:
    return {**BODY, "host_ip": f"10.{i // 250 % 250}.{i % 250}.1", "port": 8001, "metrics_port": 9001}


def heartbeats(reg: Registry, n: int, count: int) -> list[float]:
    out = []
    for k in range(count):
        t = time.perf_counter()
        status, doc = reg.register(body(k % n), "10.0.0.1")
        out.append(time.perf_counter() - t)
        if status != 200:
            raise SystemExit(f"heartbeat answered {status}: {doc}")
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--instances", type=int, default=1024)
    p.add_argument("--heartbeats", type=int, default=400, help="timed per side (default 400)")
    args = p.parse_args()
    with tempfile.TemporaryDirectory(prefix="fdngx-bench-registry-") as d:
        path = Path(d) / "fdngx.json"
        reg = Registry(path, settings=RegistrySettings.from_options(30, max_instances=max(args.instances, 1)),
                       probe=HealthyProbe(), names=NameCache(lambda name: []))
        t0 = time.perf_counter()
        for i in range(args.instances):
            if (done := reg.register(body(i), "10.0.0.1"))[0] != 200:
                raise SystemExit(f"registration {i} answered {done}")
            if i % 128 == 127:
                print(f"  registered {i + 1} of {args.instances} ({time.perf_counter() - t0:.0f} s)", flush=True)
        settled = time.time() - 10  # as a file last changed more than CachedLoad.RACY_SECONDS ago
        os.utime(path, (settled, settled))
        size = path.stat().st_size
        results = {}
        for name, reader in (("cached (now)", CachedLoad()), ("plain load (before)", inv_mod.load)):
            reg._load = reader  # type: ignore[assignment]
            heartbeats(reg, args.instances, 5)  # warm: the first read of each version parses
            results[name] = heartbeats(reg, args.instances, args.heartbeats)
    print(f"{args.instances} registered instances, inventory {size / 1024:.0f} KiB; unchanged heartbeats, "
          f"{args.heartbeats} per side:")
    for name, xs in results.items():
        med = statistics.median(xs)
        print(f"  {name:20s} median {med * 1000:7.2f} ms  p99 {sorted(xs)[int(len(xs) * 0.99)] * 1000:7.2f} ms  "
              f"-> {200 * med:.2f} cores at 200 heartbeats/s")
    before, now = (statistics.median(results[k]) for k in ("plain load (before)", "cached (now)"))
    print(f"  ratio before / now: {before / now:.1f}x")


if __name__ == "__main__":
    main()
