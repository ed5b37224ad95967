"""Simulated FastDeploy data-parallel replicas (`fdngx sim`), mirroring FastDeploy's own source.

model.py (pure queueing model) -> metrics.py (FastDeploy's Prometheus page), validation.py (which request gets
which error) and protocol.py (response bodies and SSE chunks) -> server.py (aiohttp apps per replica, faults.py
switches) -> runtime.py (the process); config.py checks options; process.py starts and stops a sim from Python
(tests, benchmarks, demo). The upstream files each part mirrors: tests/fixtures/upstream/README.md.
"""
