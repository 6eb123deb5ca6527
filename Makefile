# Two commands: `make run` (a working Distillery) and `make test` (the whole suite).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
TORCH_WHEEL_DIR ?= /opt/wheels

.PHONY: run test install install-dev lint clean bench

# Reinstall only when the project's install files change (stamp files), so re-running is fast.
$(VENV)/.stamp-install: pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q --find-links $(TORCH_WHEEL_DIR) -e .
	@touch $@

$(VENV)/.stamp-dev: $(VENV)/.stamp-install
	$(PY) -m pip install -q --find-links $(TORCH_WHEEL_DIR) -e '.[dev]'
	@touch $@

install: $(VENV)/.stamp-install
install-dev: $(VENV)/.stamp-dev

run: install
	$(VENV)/bin/distillery run

test: install-dev
	$(VENV)/bin/ruff check app worker tests benchmarks migrations
	$(PY) -m pytest -q

lint: install-dev
	$(VENV)/bin/ruff check app worker tests benchmarks migrations

bench: install-dev
	$(PY) -m benchmarks

clean:
	rm -rf var .pytest_cache
