"""Starting replicas: plan (pure argv/env/inventory), run (launch, detach, stop), supervise, probe
(health, ports), progress, pidfile. Per-engine command lines live in fdngx.engines."""
