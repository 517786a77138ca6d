# One entry point for people and CI: `make run`, `make check`, `make test`, `make lint`, `make bench`.
# Each target installs what it needs on a fresh Debian machine with Python 3.11.

PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
APT    := $(shell [ "$$(id -u)" = 0 ] && echo apt-get || echo sudo apt-get)

.PHONY: run check test lint bench fuzz soak clean system-deps redis-server-installed promtool-installed wrk-installed

# Debian ships venv/ensurepip and redis-server as separate packages; install them only when missing.
system-deps:
	@$(PYTHON) -c 'import venv, ensurepip' 2>/dev/null || { $(APT) update -qq && $(APT) install -y -qq python3-venv; }

# One venv, two stamps: `make run` installs what serving needs (the runtime dependencies at the versions
# constraints.txt pins, as in the image: what the tests run is what ships); `make test`, `make lint` and the
# other development targets add the test and lint extras on top.
RUN_STAMP := $(VENV)/.installed-run
# constraints.txt's hashes are for the image's --require-hashes install. A constraint with a hash puts every
# requirement of a pip command into hash-checking mode, and the editable project and its extras carry none,
# so the venv takes the same versions from a copy of the pins without their hashes.
VERSIONS := $(VENV)/constraints-versions.txt

$(RUN_STAMP): pyproject.toml constraints.txt | system-deps
	@echo "Installing the runtime dependencies into $(VENV) (once)"
	@$(PYTHON) -m venv $(VENV)
	@$(BIN)/python -m pip install -qq --disable-pip-version-check --upgrade pip
	@sed -e 's/[[:space:]]*\\$$//' -e '/^[[:space:]]*--hash=/d' constraints.txt > $(VERSIONS)
	@$(BIN)/python -m pip install -qq --disable-pip-version-check --constraint $(VERSIONS) -e .
	@touch $@

$(STAMP): $(RUN_STAMP)
	@echo "Installing the test and lint tools into $(VENV) (once)"
	@$(BIN)/python -m pip install -qq --disable-pip-version-check --constraint $(VERSIONS) -e '.[test,lint]'
	@touch $@

# Log lines as text for a person at a terminal; the service's default (and the image's) is JSON.
run: $(RUN_STAMP)
	ATTEST_LOG_FORMAT=$${ATTEST_LOG_FORMAT:-text} $(BIN)/attest-service serve --bind 127.0.0.1:8080

redis-server-installed:
	@command -v redis-server >/dev/null || { $(APT) update -qq && $(APT) install -y -qq redis-server redis-tools; }

# promtool (the alert rule tests) comes with Debian's prometheus package; its recommends (node exporter and
# collectors) are not needed. Where systemd runs, the package also enables and starts a Prometheus server.
promtool-installed:
	@command -v promtool >/dev/null || { $(APT) update -qq && $(APT) install -y -qq --no-install-recommends prometheus; }

# The HTTP benchmark's load generator.
wrk-installed:
	@command -v wrk >/dev/null || { $(APT) update -qq && $(APT) install -y -qq wrk; }

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/mypy
	$(BIN)/hadolint Dockerfile
	$(BIN)/attest-service certs check --pinned-certs pinned_certs

# The fast tier: lint and every test not marked slow (tests/conftest.py fails one that starts a process, binds a
# socket or sleeps), so it needs neither Redis nor promtool.
check: $(STAMP) lint
	$(BIN)/python -m pytest -q -p no:cacheprovider -m "not slow"

test: $(STAMP) redis-server-installed promtool-installed lint
	$(BIN)/python -m pytest -q -p no:cacheprovider

# The four figures of throughput and latency beside their targets (about 5 minutes on 2 cores): the core on
# one CPU first, then the service beside the bare echo on a real Redis; last, CPU per verification with
# attestation results on over off, in alternating runs (bench_cpu.py also compares trees and settings).
bench: $(STAMP) redis-server-installed wrk-installed
	$(BIN)/python benchmarks/bench_verify.py
	$(BIN)/python benchmarks/bench_http.py
	$(BIN)/python benchmarks/bench_refusals.py
	$(BIN)/python benchmarks/bench_internals.py
	$(BIN)/python benchmarks/bench_cpu.py --compare results

# Coverage-guided fuzzing of the document path for FUZZ_SECONDS (default 300); crashes are written to fuzz-artifacts/.
fuzz: $(STAMP)
	$(BIN)/python tests/system/fuzz/fuzz_verify.py

# 30 minutes at half capacity (DURATION=seconds to change it); prints latency, statuses and worker RSS.
soak: $(STAMP) redis-server-installed
	$(BIN)/python benchmarks/soak.py

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache .hypothesis
