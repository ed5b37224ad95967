"""Everything that touches nginx: render (inventory -> config text), escape (one rule per output syntax),
apply (the one crash-safe write path), control (nginx -t, reload, confirm, process identity), openresty
(the Lua balancer's admin push and token), target (where a config lives and how it is applied)."""
