# The two commands: `make demo` and `make test`. Each creates .venv when missing.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test lint bench install clean

$(BIN)/python:
	$(PY) -m venv $(VENV)

# torch is installed first and pinned: 2.13.0 is the local CPU build; anything else pulls GBs.
# constraints.txt pins every other dependency to exact versions (see its header): the same code then
# gives the same numbers on a fresh machine.
$(STAMP): $(BIN)/python pyproject.toml constraints.txt
	$(BIN)/pip install --quiet "torch==2.13.0"
	$(BIN)/pip install --quiet -c constraints.txt -e ".[dev]"
	# the peer the influence tests compare against; --no-deps: it declares torchvision (never
	# imported), which would replace the pinned torch
	$(BIN)/pip install --quiet --no-deps "kronfluence==1.0.1"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/poisonmech demo

# two workers (CI has 2 cores; every test runs on one torch thread); --dist loadfile keeps each test file,
# and so its module fixtures (the default pair is trained once), on one worker
test: $(STAMP)
	$(BIN)/python -m pytest -q -n 2 --dist loadfile

lint: $(STAMP)
	$(BIN)/ruff check .

bench: $(STAMP)
	$(BIN)/python benchmarks/train_throughput.py

clean:
	rm -rf $(VENV) runs .pytest_cache
