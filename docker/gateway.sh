#!/bin/bash
# fdngx-gateway: nginx and the fdngx sidecar in one container, supervised together.
#
#   fdngx-gateway [SIDECAR OPTIONS...]  render a standalone nginx.conf from the inventory (one sidecar cycle
#                                       with these options: `fdngx sidecar --once`), run nginx in the
#                                       foreground and the sidecar beside it; as soon as either exits, stop
#                                       the other and exit (non-zero), so the restart policy sees it.
#   fdngx-gateway health                the HEALTHCHECK: nginx answers /health (over https when the config
#                                       it runs serves TLS), the sidecar /metrics.
#
# SIGTERM or SIGINT (docker stop): nginx gets SIGQUIT (graceful: open streams may finish), the sidecar
# SIGTERM (it stops after its current cycle). Whatever still runs FDNGX_STOP_TIMEOUT seconds later is
# stopped hard (nginx: SIGTERM, then SIGKILL). Run it under an init (tini) as PID 1, which reaps orphans.
#
# Logs: nginx's access log goes to stdout, nginx's errors and the sidecar's log to stderr, so
# `docker logs` shows traffic and decisions. nginx also keeps errors in PREFIX/logs/error.log: the
# sidecar quotes nginx's own message from it when a reload fails.
#
# Environment (the same names as fdngx's own options): FDNGX_INVENTORY (/etc/fdngx/fdngx.json; several
# merged: /a.json:/b.json, read by fdngx itself; an -i among the arguments replaces it),
# FDNGX_PREFIX (/var/lib/fdngx), FDNGX_LISTEN (0.0.0.0:8080), FDNGX_METRICS_LISTEN (0.0.0.0:18400, or off),
# FDNGX_STOP_TIMEOUT (25 seconds; keep it below the container's stop grace period). Any other FDNGX_*
# variable (FDNGX_TLS_CERT, FDNGX_API_KEYS_FILE, FDNGX_CONFIG...) reaches the sidecar as it is.
set -uo pipefail

# fdngx reads it (and splits a list on ':', as everywhere); passed as one -i it would be one path.
export FDNGX_INVENTORY=${FDNGX_INVENTORY:-/etc/fdngx/fdngx.json}
PREFIX=${FDNGX_PREFIX:-/var/lib/fdngx}
LISTEN=${FDNGX_LISTEN:-0.0.0.0:8080}
METRICS_LISTEN=${FDNGX_METRICS_LISTEN:-0.0.0.0:18400}
STOP_TIMEOUT=${FDNGX_STOP_TIMEOUT:-25}

log() { printf 'fdngx-gateway: %s\n' "$*" >&2; }

# ADDR:PORT as fdngx takes it -> HOST:PORT on loopback that reaches it (a wildcard address is probed on
# loopback; a bare PORT means 127.0.0.1).
probe_addr() {
  local listen=$1 host port
  case $listen in
    *:*) host=${listen%:*} port=${listen##*:} ;;
    *) host=127.0.0.1 port=$listen ;;
  esac
  case $host in
    '' | '*' | 0.0.0.0) host=127.0.0.1 ;;
    '[::]') host='[::1]' ;;
  esac
  printf '%s:%s' "$host" "$port"
}

health() {
  local metrics=''
  [ "$METRICS_LISTEN" = off ] || metrics="$(probe_addr "$METRICS_LISTEN")"
  python3 - "$PREFIX/nginx.conf" "$(probe_addr "$LISTEN")" "$metrics" <<'PY'
import re
import ssl
import sys
import urllib.request

conf, nginx, metrics = sys.argv[1:]
# https when the config nginx runs has `ssl` on its listener for that port, however TLS was asked for (arguments,
# which this check never sees; FDNGX_TLS_CERT; a settings file): plain http there gets 400, never healthy.
try:
    with open(conf, encoding="utf-8", errors="replace") as fh:
        text = fh.read()
except OSError:
    text = ""
port = nginx.rsplit(":", 1)[1]
tls = any(m[1].rsplit(":", 1)[-1] == port and "ssl" in m[2].split()
          for m in re.finditer(r"^\s*listen\s+(\S+)([^;]*);", text, re.M))
urls = [f"{'https' if tls else 'http'}://{nginx}/health"] + ([f"http://{metrics}/metrics"] if metrics else [])
# nginx's own listener on loopback: its certificate names the public host (or is self-signed), not 127.0.0.1,
# and this only asks whether nginx answers.
unverified = ssl.create_default_context()
unverified.check_hostname = False
unverified.verify_mode = ssl.CERT_NONE

for url in urls:
    try:
        with urllib.request.urlopen(url, timeout=3, context=unverified if url.startswith("https:") else None) as resp:
            if resp.status != 200:
                sys.exit(f"unhealthy: {url} answered {resp.status}")
    except OSError as exc:
        sys.exit(f"unhealthy: {url}: {exc}")
PY
}

if [ "${1:-}" = health ]; then
  shift
  health
  exit
fi

mkdir -p "$PREFIX/logs" || exit 1
common=(--mode standalone --listen "$LISTEN" --out "$PREFIX/nginx.conf" --access-log /dev/stdout)
# The config nginx starts with: one sidecar cycle with every option the sidecar will run with (flavor, TLS,
# API keys, limits...), so nginx never serves, even for a second, a config without them.
fdngx sidecar "${common[@]}" "$@" --once || exit

# A pid file left by an earlier run of this container would name a process that is not this nginx.
rm -f "$PREFIX/logs/nginx.pid"

nginx_pid='' sidecar_pid='' stopping=0 stop_sent=0
# Once only: a second signal would cut short the graceful stop the first one began.
stop_children() {
  [ "$stop_sent" = 1 ] && return
  stop_sent=1
  if [ -n "$nginx_pid" ]; then kill -QUIT "$nginx_pid" 2>/dev/null; fi
  if [ -n "$sidecar_pid" ]; then kill -TERM "$sidecar_pid" 2>/dev/null; fi
}
# Forward at once (even if the signal lands before `wait` starts), then leave the wait loop.
# shellcheck disable=SC2317  # called by the trap below, which shellcheck 0.9 does not follow
on_signal() {
  stopping=1
  stop_children
}
trap on_signal TERM INT

nginx -p "$PREFIX/" -c "$PREFIX/nginx.conf" -e stderr -g 'daemon off; error_log stderr warn;' &
nginx_pid=$!

# Start the sidecar once nginx has written its pid file: its first apply then finds nginx running.
for _ in $(seq 100); do
  [ -s "$PREFIX/logs/nginx.pid" ] && break
  kill -0 "$nginx_pid" 2>/dev/null || break
  sleep 0.1
done

if kill -0 "$nginx_pid" 2>/dev/null && [ "$stopping" = 0 ]; then
  fdngx sidecar "${common[@]}" --metrics-listen "$METRICS_LISTEN" "$@" &
  sidecar_pid=$!
fi

exited='' status=0
while [ "$stopping" = 0 ]; do
  pids=("$nginx_pid")
  [ -n "$sidecar_pid" ] && pids+=("$sidecar_pid")
  wait -n -p exited "${pids[@]}"
  status=$?
  [ -n "${exited:-}" ] && break
done

if [ "$stopping" = 0 ]; then
  if [ "$exited" = "$nginx_pid" ]; then what=nginx; nginx_pid=''; else what='fdngx sidecar'; sidecar_pid=''; fi
  log "$what exited with status $status; stopping the rest"
  [ "$status" = 0 ] && status=1
else
  log "stopping nginx (graceful) and the sidecar"
  status=0
fi
stop_children

# Bounded: STOP_TIMEOUT seconds for a clean stop, then hard.
alive() {
  local pid
  for pid in "$nginx_pid" "$sidecar_pid"; do
    if [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null; then return 0; fi
  done
  return 1
}
for _ in $(seq $((STOP_TIMEOUT * 10))); do
  alive || break
  sleep 0.1
done
if alive; then
  log "still running after ${STOP_TIMEOUT}s: stopping hard"
  if [ -n "$nginx_pid" ]; then kill -TERM "$nginx_pid" 2>/dev/null; fi
  for _ in $(seq 50); do
    alive || break
    sleep 0.1
  done
  if [ -n "$nginx_pid" ]; then kill -KILL "$nginx_pid" 2>/dev/null; fi
  if [ -n "$sidecar_pid" ]; then kill -KILL "$sidecar_pid" 2>/dev/null; fi
fi
wait
exit "$status"
