"""`fdngx demo`: the whole loop on simulated replicas and a private nginx."""

from __future__ import annotations

from pathlib import Path

import typer

from fdngx.demo import DemoConfig, run_demo


def demo_cmd(
    workdir: Path = typer.Option(Path("demo-run"), "--dir", help="Where the inventory, nginx prefix and logs go."),
    port: int = typer.Option(8080, help="Port nginx listens on (127.0.0.1); a free one is chosen if taken."),
    replicas: int = typer.Option(4, min=1, help="Simulated replicas."),
    speeds: str = typer.Option("1,1,1,0.5", help="Speed factor per replica (1 = normal, 0.5 = half speed)."),
    max_num_seqs: int = typer.Option(8, min=1, help="Slots per replica (FastDeploy --max-num-seqs)."),
    concurrency: int = typer.Option(20, min=1, help="Concurrent streaming requests the demo keeps in flight."),
    direct: int = typer.Option(6, min=0, help="Extra streams sent straight to the third replica, bypassing nginx."),
    interval: float = typer.Option(2.0, min=0.2, help="Sidecar scrape interval in seconds."),
    duration: float | None = typer.Option(None, help="Stop after this many seconds (default: run until Ctrl-C)."),
) -> None:
    """Run launch -> render -> nginx -> sidecar on this machine and show the weights follow the load.

    Four simulated FastDeploy replicas (one at half speed), a standalone nginx under --dir, the sidecar,
    a steady streaming load through nginx plus some sent straight to one replica (traffic nginx cannot
    see); every few seconds a share-by-replica line and `fdngx status`.
    Point curl or an OpenAI client at the printed URL while it runs. Ctrl-C stops everything it started.
    """
    n = len(speeds.split(","))
    if n not in (1, replicas):
        raise typer.BadParameter(f"--speeds has {n} values for {replicas} replicas")
    run_demo(DemoConfig(workdir, port, replicas, speeds, max_num_seqs, concurrency, direct, interval, duration))


def register(app: typer.Typer) -> None:
    app.command("demo",
                short_help="Run launch -> render -> nginx -> sidecar on simulated replicas.")(demo_cmd)
