# Every target installs what it needs into .venv (Python 3.11 + pip are all a fresh machine needs).
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test test-fast install bench clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -c constraints.txt -e ".[test]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/posttrain demo --out runs/demo

# Two workers, each single-threaded (tests/conftest.py): both cores busy, and the learning tests' thresholds were
# measured the same way (two single-threaded runs at a time). The slowest tests are listed at the end of each run:
# the suite must stay under 20 minutes, each slow test under 4.
test: $(STAMP)
	$(BIN)/python -m pytest -q -n 2 --dist worksteal --durations=12

test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -n 2 --dist worksteal -m "not slow"

# posttrain beside TRL (bench/README.md): TRL is the `bench` extra, installed here only. About 10 min on 2 idle cores;
# writes bench/results.json, bench/scaling.png and the tables in bench/README.md.
BENCH_STAMP := $(VENV)/.installed-bench

$(BENCH_STAMP): $(STAMP)
	$(BIN)/python -m pip install -q -c constraints.txt -e ".[bench]"
	touch $(BENCH_STAMP)

bench: $(BENCH_STAMP)
	$(BIN)/python -m bench.run

clean:
	rm -rf $(VENV) runs .pytest_cache
