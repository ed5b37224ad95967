"""Simulated FastDeploy data-parallel replicas (`fdngx sim`).

model.py (pure queueing model) -> metrics.py (FastDeploy's Prometheus names) and protocol.py (OpenAI bodies)
-> server.py (aiohttp apps per replica, faults.py switches) -> runtime.py (the process);
config.py checks options; process.py starts and stops a sim from Python (tests, benchmarks, demo).
"""
