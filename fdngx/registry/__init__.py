"""FastDeploy's router registration protocol, answered by fdngx: instances started with `--router URL`
POST /register (and heartbeat) and land in an inventory file the sidecar watches.

core (the inventory side: accept, refresh, remove), body (the register body, typed as FastDeploy's Go
router reads it), rules (allow-lists, the metrics-port rule, name resolution, rate limit), probe (bounded
/health and /metrics checks), liveness (when a registered instance counts as gone), changes (updates of
registered instances, said once per check), store (the inventory files: parsed once per content, the
registry's writes under the inventory lock), http (the hardened HTTP server)."""
