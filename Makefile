# fraudstream: `make demo` runs the whole service on embedded defaults, `make test` the suite.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
DURATION ?= 0
RATE ?= 250

.PHONY: help venv kernel demo test test-slow test-deps test-faketime lint bench bench-deps clean

help:  ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-14s %s\n", $$1, $$2}'

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test]'
	touch $@

venv: $(BIN)/.installed  ## create .venv and install the project

kernel: venv  ## compile the feature kernel ahead of time (C compiler; once per source version)
	$(BIN)/python -m fraudstream.state.kernel_aot

demo: venv  ## run broker, registry, worker and generator with a live summary (DURATION=60 to stop by itself)
	$(BIN)/fraudstream demo --duration $(DURATION) --rate $(RATE)

TEST_DEBS := kcat redis-server prometheus gcc openssl

test-deps:  ## Debian packages the tests use (kcat, redis-server, prometheus with promtool, gcc, openssl)
	@missing=""; for p in $(TEST_DEBS); do command -v $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ]; then apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; \
	  else echo "missing:$$missing: sudo apt-get install$$missing"; exit 1; fi; fi

lint: venv  ## ruff
	$(BIN)/ruff check .

test: venv test-deps bench-deps lint kernel  ## install what the tests need and run them (e2e included; the slowest suites: make test-slow; bench-deps for the Quix peer's test)
	$(BIN)/pytest -m "not slow"

test-slow: venv test-deps bench-deps kernel  ## the slowest end-to-end suites (canary rollouts, the autopilot loop, scale-out: minutes each; a few of 25-35 s); CI runs them after make test
	$(BIN)/pytest -m slow

FAKE ?= 2027-02-28 23:59:30
FAKETIME_PRELOAD := $(VENV)/faketime-preload.so

$(FAKETIME_PRELOAD): tests/faketime/preload.c
	cc -O2 -shared -fPIC -Wall -o $@ $< -lpthread

test-faketime: venv test-deps $(FAKETIME_PRELOAD)  ## the suite at a fake date, hour and zone (FAKE="2026-12-31 23:58:00" TZ=America/Adak)
	@command -v faketime >/dev/null 2>&1 || \
	if [ "$$(id -u)" = 0 ]; then apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq faketime >/dev/null; \
	else echo "missing: faketime: sudo apt-get install faketime"; exit 1; fi
	@# FAKE is local time in TZ. The plain form (not -f) sets one offset from the real
	@# clock, the same in every process started (test, workers, kcat), which keeps
	@# running. The monotonic clock stays real: Python's timed lock waits measure on it.
	@# The preload fixes two libfaketime gaps (librdkafka waits, monotonic sleeps), and
	@# redis-server runs on the real clock (jemalloc hangs under libfaketime): see them.
	@# FAKETIME_FORCE_MONOTONIC_FIX=0: libfaketime turns this on by itself for glibc >= 2.30;
	@# with it, a CLOCK_MONOTONIC condition wait returns at once, so Python's 5 ms GIL
	@# wait never waits: threads thrash over the GIL and a 50 ms model budget is missed.
	$(if $(TZ),TZ="$(TZ)") PATH="$(CURDIR)/tests/faketime/bin:$$PATH" \
	  LD_PRELOAD="$(abspath $(FAKETIME_PRELOAD))" FAKETIME_FORCE_MONOTONIC_FIX=0 \
	  faketime --exclude-monotonic "$(FAKE)" $(BIN)/pytest $(PYTEST_ARGS)

# quixstreams pins confluent-kafka below the project's pin: it gets an environment of its
# own, from the "bench" dependency group of pyproject.toml (pip >= 25.1 reads it)
QUIX_VENV ?= .venv-quix

$(QUIX_VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(QUIX_VENV)
	$(QUIX_VENV)/bin/pip install --quiet --upgrade pip
	$(QUIX_VENV)/bin/pip install --quiet --group bench
	touch $@

bench-deps: $(QUIX_VENV)/.installed  ## the Quix Streams peer of the benchmark, in .venv-quix

bench: venv bench-deps  ## one-worker throughput and latency benchmark, with the Quix Streams peer (prints numbers, JSON in results/)
	$(BIN)/python -m fraudstream.loadtest --quix-python $(QUIX_VENV)/bin/python

clean:  ## remove the virtual environment and local state
	rm -rf $(VENV) $(QUIX_VENV) data results *.egg-info
