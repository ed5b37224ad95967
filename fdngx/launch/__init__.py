"""Starting replicas: plan (pure argv/env/inventory), hosts (listen vs advertised address, FastDeploy's router
self-check), run (launch, detach, stop), supervise and children (the supervision loop, typed child states),
probe (typed health, ports), progress, pidfile (the typed record). Per-engine command lines: fdngx.engines."""
