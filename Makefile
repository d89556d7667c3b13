# kts: two commands (README).
#   make reproduce   set up, then run every notebook headlessly (papermill) -> results/
#   make test        set up, then run the test suite (unit tests, nbval, a quick pipeline run)
# PROFILE=quick runs the small profile (minutes) instead of the paper's settings (hours).
PYTHON ?= python3
VENV ?= .venv
PROFILE ?= paper
BIN := $(VENV)/bin

.PHONY: reproduce test setup bench clean

setup: $(VENV)/.kts-installed

$(VENV)/.kts-installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ".[test]"
	$(BIN)/python -m pip check
	$(BIN)/python -m ipykernel install --sys-prefix --name python3 >/dev/null
	touch $@

reproduce: setup
	$(BIN)/python -m kts run --profile $(PROFILE)

test: setup
	KTS_PROFILE=quick $(BIN)/python -m pytest -q

bench: setup
	$(BIN)/python -m kts.bench

clean:
	rm -rf runs work .pytest_cache
