# Two commands: `make run` (a working Distillery) and `make test` (the whole suite); `make test-fast` skips
# the tests marked slow (whole jobs trained to accuracy floors, the chaos suite).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_WHEEL_DIR ?= /opt/wheels

.PHONY: run test test-fast install install-dev lint clean bench sandbox browser

# Reinstall only when the project's install files change (stamp files), so re-running is fast.
$(VENV)/.stamp-install: pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q --find-links $(TORCH_WHEEL_DIR) -e .
	@touch $@

# The SDK and `distill` (client/, a distribution of its own) too, so the tests can import distillery_client.
$(VENV)/.stamp-dev: $(VENV)/.stamp-install client/pyproject.toml
	$(PY) -m pip install -q --find-links $(TORCH_WHEEL_DIR) -e '.[dev]' -e './client[cli]'
	@touch $@

install: $(VENV)/.stamp-install
install-dev: $(VENV)/.stamp-dev

run: install sandbox
	$(VENV)/bin/distillery run

# Uploads and jobs run under bubblewrap (docs/security.md); install it when missing and we can (root + apt).
sandbox:
	@command -v bwrap >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 && \
	  (apt-get update -qq && apt-get install -y -qq bubblewrap >/dev/null) ; } || \
	  echo "warning: bubblewrap is not installed; the sandbox falls back to plain child processes"

# The console's browser tests (tests/console/) drive Debian's Chromium through Playwright (never a downloaded
# browser); install it when missing and we can. Without it they skip, or fail under CI=true.
browser:
	@command -v chromium >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 && \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) ; } || \
	  echo "warning: chromium is not installed; the console's browser tests will skip (fail under CI=true)"

# The suite runs on one pytest-xdist worker per CPU (pyproject addopts). PYTEST_ARGS: extra pytest options,
# e.g. PYTEST_ARGS="-x" or "-n0" (one process).
PYTEST_ARGS ?=

test: install-dev sandbox browser
	$(VENV)/bin/ruff check app worker engine jobspec safezip tests benchmarks migrations client
	$(PY) -m pytest -q --durations=12 $(PYTEST_ARGS)

test-fast: install-dev sandbox
	$(PY) -m pytest -q -m "not slow" $(PYTEST_ARGS)

lint: install-dev
	$(VENV)/bin/ruff check app worker engine jobspec safezip tests benchmarks migrations client

bench: install-dev
	$(PY) -m benchmarks

clean:
	rm -rf var .pytest_cache
