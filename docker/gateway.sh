#!/bin/sh
# nginx + fdngx sidecar in one container: render a standalone config from the mounted inventory,
# start nginx, then run the sidecar in the foreground (it re-renders and reloads nginx safely).
set -eu
INVENTORY=${FDNGX_INVENTORY:-/etc/fdngx/fdngx.json}
PREFIX=${FDNGX_PREFIX:-/var/lib/fdngx}
LISTEN=${FDNGX_LISTEN:-0.0.0.0:8080}
fdngx render -i "$INVENTORY" --mode standalone --listen "$LISTEN" --out "$PREFIX/nginx.conf"
nginx -p "$PREFIX/" -c "$PREFIX/nginx.conf" -e logs/error.log
exec fdngx sidecar -i "$INVENTORY" --mode standalone --listen "$LISTEN" --out "$PREFIX/nginx.conf" \
  --metrics-listen 0.0.0.0:18400 "$@"
