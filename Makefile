# Two commands matter: `make demo` and `make test`. Both bootstrap .venv on first use.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: demo test lint unit integration soak bench schemas simulate broker clean

# A failed `python3 -m venv` removes the half-made venv: without Debian's python3-venv it writes
# bin/python, then fails (no ensurepip), and the next run took that venv for a made one. A failed
# pip upgrade (offline, a mirror without pip) keeps it: its own pip installs all the same.
$(BIN)/python:
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null || { \
	  echo "coc-change-worker needs Python >= 3.11; '$(PYTHON)' is older or missing: run 'make clean' and then e.g. 'make demo PYTHON=python3.11'" >&2; exit 1; }
	$(PYTHON) -m venv $(VENV) || { rm -rf $(VENV); exit 1; }
	-$(BIN)/python -m pip install --quiet --upgrade pip

# A venv without pip (left by an older Makefile, as above) gets it back once ensurepip is installed.
ENSURE_PIP = @$(BIN)/python -m pip --version >/dev/null 2>&1 || $(BIN)/python -m ensurepip --upgrade >/dev/null || { \
	  echo "$(VENV) has no pip and ensurepip cannot add it (on Debian/Ubuntu: install python3-venv), or run 'make clean'" >&2; exit 1; }

# Reinstall whenever the project's dependency list or its pins change. The pins are constraints:
# a fresh machine gets the versions CI last passed with (`make lock` re-pins from .venv).
$(STAMP): pyproject.toml requirements-test.lock | $(BIN)/python
	$(ENSURE_PIP)
	$(BIN)/python -m pip install --quiet -c requirements-test.lock -e '.[test]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/coc-worker demo

test: $(STAMP) lint
	$(BIN)/python -m pytest -q

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

unit: $(STAMP)
	$(BIN)/python -m pytest -q --ignore=tests/integration

integration: $(STAMP)
	$(BIN)/python -m pytest -q tests/integration

# Every reliability scenario at full size (tests/integration/test_reliability.py, harness in
# tests/faults/); writes docs/reliability.md.
soak: $(STAMP)
	$(BIN)/python -m pytest -q -m soak tests/integration --run-soak

BENCH_STAMP := $(VENV)/.installed-bench

$(BENCH_STAMP): pyproject.toml requirements-bench.lock | $(BIN)/python
	$(ENSURE_PIP)
	$(BIN)/python -m pip install --quiet -c requirements-bench.lock -e '.[test,bench]'
	touch $(BENCH_STAMP)

# make bench ARGS=--quick   (see bench/README.md). Its time budget counts from here, before the
# install: the whole of `make bench` on a fresh machine stays under 10 minutes.
ifneq ($(filter bench,$(MAKECMDGOALS)),)
BENCH_STARTED := $(shell date +%s)
endif
bench: $(BENCH_STAMP)
	$(BIN)/python bench/run.py --started-at $(BENCH_STARTED) $(ARGS)

schemas: $(STAMP)
	$(BIN)/coc-worker schema --out schemas/json

# make simulate ARGS=--seed-file=tickets.json   (default: any ticket is taken, created on first use)
SIMULATE_ARGS ?= --auto-create
simulate: $(STAMP)
	$(BIN)/coc-worker simulate $(or $(ARGS),$(SIMULATE_ARGS))

# A local Kafka-protocol broker (Tansu, in memory: a restart loses everything) for trying the worker
# and the tools outside the demo; Ctrl-C stops it.
BROKER_PORT ?= 9092
broker: $(STAMP)
	exec "$$($(BIN)/python -c 'from worker.sandbox import tansu_binary; print(tansu_binary())')" broker \
	  --listener-url tcp://127.0.0.1:$(BROKER_PORT) --advertised-listener-url tcp://127.0.0.1:$(BROKER_PORT) \
	  --storage-engine memory://tansu/

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .hypothesis

# --- deployment (Dockerfile, helm/coc-change-worker) --------------------------------------------------
.PHONY: lock helm-venv helm-lint image

# Re-pin requirements.lock (the image's runtime dependencies), requirements-test.lock (what
# `make test` installs) and requirements-bench.lock (what `make bench` installs) from the current
# .venv, the bench extra included.
lock: $(STAMP) $(BENCH_STAMP)
	$(BIN)/python tests/test_dockerfile.py --write-lock

# helm-sdkpy needs Python >= 3.12: its own venv, made from requirements-helm.lock (set HELM_PYTHON
# to choose the interpreter). tests/test_helm_chart.py makes it on demand too.
helm-venv: $(STAMP)
	$(BIN)/python tests/test_helm_chart.py

# helm lint, the rendered manifests, the values schema and the settings drift check.
helm-lint: $(STAMP)
	$(BIN)/python -m pytest -q tests/test_helm_chart.py

# The production image (needs a Docker engine; tests/test_dockerfile.py replays it without one).
image:
	docker build -t coc-change-worker:$$(sed -n 's/^version = "\(.*\)"/\1/p' pyproject.toml) \
		--build-arg REVISION=$$(git rev-parse --short HEAD) .
