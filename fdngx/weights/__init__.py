"""Keeping weights in line with load: fetch + scrape (bounded, per-replica errors stay per replica),
policy (pure), settings, state + store, controller (ONE cycle for cron and the sidecar), sidecar (timer,
inventory watch, signals), registry (FastDeploy's POST /register), telemetry (the sidecar's metrics)."""
