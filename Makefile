# Targets mirror CI (.ci/run runs `make lint` then `make test`).
# `make demo` and `make test` each install everything they need on a fresh machine.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: install browser postgres demo test test-fast reliability lint format bench clean

# torch is pinned to 2.13.0 in pyproject.toml: on CPU machines pip's find-links supplies the
# CPU build; on GPU machines the same pin resolves to the ordinary CUDA build.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

# Debian's Chromium + ChromeDriver for the MLflow UI test (tests/test_mlflow_ui.py).
postgres:  ## Debian's PostgreSQL for the secure-stack test (tests/test_secure_stack.py)
	@ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || { \
	  SUDO=$$(test "$$(id -u)" = 0 || echo sudo); \
	  $$SUDO apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq postgresql >/dev/null; }

browser:
	@test -x /usr/bin/chromium -a -x /usr/bin/chromedriver || { \
	  SUDO=$$(test "$$(id -u)" = 0 || echo sudo); \
	  $$SUDO apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq chromium chromium-driver >/dev/null; }

demo: $(STAMP)  ## train cnn_digits on 2 DDP workers (embedded Ray, ./mlflow.db)
	$(BIN)/orchestrate job=cnn_digits trainer.num_workers=2

test: $(STAMP) browser postgres  ## the whole suite, as CI runs it
	$(BIN)/python -m pytest

test-fast: $(STAMP)  ## everything except the end-to-end Ray runs
	$(BIN)/python -m pytest -m "not slow"

reliability: $(STAMP)  ## the whole fault-injection and bad-input matrix, with its figures
	$(BIN)/python -m pytest -m "fault or bad_input"

bench: $(STAMP)  ## measured figures (not part of the tests); see README "Performance" and benchmarks/NOTES.md
	$(BIN)/python benchmarks/performance.py
	$(BIN)/python benchmarks/sweep_efficiency.py

lint: $(STAMP)
	$(BIN)/ruff check orchestrator jobs tests benchmarks
	$(BIN)/ruff format --check orchestrator jobs tests benchmarks
	$(BIN)/mypy

format: $(STAMP)
	$(BIN)/ruff check --fix orchestrator jobs tests
	$(BIN)/ruff format orchestrator jobs tests

clean:
	rm -rf $(VENV) outputs mlflow.db .pytest_cache .ruff_cache .mypy_cache test-artifacts
