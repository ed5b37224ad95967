"""Render and safe-apply speed: `python -m bench.render`. Printed, never asserted.

Targets (issue 2): rendering 1,000 instances under 100 ms; a full safe apply (render, nginx -t, swap,
reload, confirm) under 1 s. Both are measured here side by side with a baseline in the same run: the
bare `nginx -t` and `nginx -s reload` the apply must pay anyway, so the ratio shows fdngx's own cost.
"""

from __future__ import annotations

import statistics
import subprocess
import tempfile
import time
from pathlib import Path

from fdngx.domain import Instance, Inventory, ServerState
from fdngx.nginx.apply import safe_apply
from fdngx.nginx.control import NginxControl, find_nginx, prepare_prefix
from fdngx.nginx.render import RenderOptions, render


def inventory(n: int) -> Inventory:
    insts = [Instance(f"dp{i}", f"10.{i // 65536 % 256}.{i // 256 % 256}.{i % 256}", 8000 + i % 1000,
                      9000 + i % 1000, max_num_seqs=64) for i in range(n)]
    return Inventory(insts)


def timed(fn: object, reps: int) -> list[float]:
    out = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()  # type: ignore[operator]
        out.append(time.perf_counter() - t)
    return out


def ms(xs: list[float]) -> str:
    return f"median {statistics.median(xs) * 1000:7.2f} ms  (min {min(xs) * 1000:.2f}, max {max(xs) * 1000:.2f})"


def bench_render() -> float:
    inv = inventory(1000)
    opts = RenderOptions(mode="upstream")
    states = {f"dp{i}": ServerState(weight=1 + i % 7, down=i % 50 == 0) for i in range(1000)}
    render(inv, opts, states)  # warm the template cache, as a running sidecar has it
    t = timed(lambda: render(inv, opts, states), 30)
    print(f"render 1,000 instances (upstream): {ms(t)}   target < 100 ms")
    t_site = timed(lambda: render(inv, RenderOptions(mode="standalone"), states), 10)
    print(f"render 1,000 instances (standalone): {ms(t_site)}")
    return statistics.median(t)


def bench_apply() -> float:
    nginx = find_nginx()
    with tempfile.TemporaryDirectory() as tmp:
        prefix = Path(tmp)
        prepare_prefix(prefix)
        conf = prefix / "nginx.conf"
        port = 18000 + (int(time.time()) % 1000)
        inv = Inventory([Instance(f"dp{i}", "127.0.0.1", 20000 + i, 21000 + i) for i in range(16)])
        opts = RenderOptions(mode="standalone", listen=f"127.0.0.1:{port}")
        conf.write_text(render(inv, opts))
        argv = [nginx, "-p", f"{prefix}/", "-c", str(conf), "-e", "logs/error.log"]
        proc = subprocess.Popen([*argv, "-g", "daemon off;"], start_new_session=True)
        try:
            deadline = time.time() + 10
            while not (prefix / "logs" / "nginx.pid").exists() and time.time() < deadline:
                time.sleep(0.02)
            control = NginxControl(nginx, conf, prefix, "logs/error.log",
                                   verify_url=f"http://127.0.0.1:{port}/fdngx/generation")
            weights = iter(range(2, 10_000))  # 1 is the current weight: start with a real change
            t_apply = timed(lambda: safe_apply(conf, render(inv, opts, {"dp0": ServerState(next(weights))}),
                                               control, reload=True, standalone=True), 10)
            t_test = timed(lambda: subprocess.run([*argv, "-t", "-q"], check=True), 10)
            t_same = timed(lambda: safe_apply(conf, conf.read_text(), control, reload=True, standalone=True), 10)
        finally:
            proc.terminate()
            proc.wait(timeout=10)
    print(f"full safe apply (render, nginx -t x2, swap, reload, confirm): {ms(t_apply)}   target < 1 s")
    print(f"  of which a bare `nginx -t`:                              {ms(t_test)}")
    print(f"  unchanged render (lock, compare, served generation):     {ms(t_same)}")
    print(f"  ratio apply / bare nginx -t: {statistics.median(t_apply) / statistics.median(t_test):.1f}x")
    return statistics.median(t_apply)


def main() -> None:
    print(f"nginx: {subprocess.run([find_nginx(), '-v'], capture_output=True, text=True).stderr.strip()}")
    bench_render()
    bench_apply()


if __name__ == "__main__":
    main()
