# Everything bootstraps its own .venv: a fresh Debian machine needs only python3 (>= 3.11) with python3-venv, gcc and make.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-$(shell cksum pyproject.toml | cut -d' ' -f1)

.PHONY: install test lint typecheck pytest chromium demo run bench clean

$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "Python >= 3.11 is required")'
	@# Debian and Ubuntu ship venv's ensurepip in a separate package; without it `venv` fails half-way.
	@$(PYTHON) -c 'import ensurepip' 2>/dev/null || $(PYTHON) -c 'import sys; v = sys.version_info; sys.exit( \
		f"error: {sys.executable} has no ensurepip, so it cannot create {sys.argv[1]}: install it with " \
		f"`apt-get install python{v[0]}.{v[1]}-venv` (python3-venv for the default python3)")' $(VENV)
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[dev]'
	@rm -f $(VENV)/.installed-*
	@touch $(STAMP)

install: $(STAMP)

lint: $(STAMP)
	$(BIN)/ruff check .

typecheck: $(STAMP)
	$(BIN)/mypy

## Two test processes, each test file whole in one of them: most tests wait on real servers and processes, so
## two share the two cores well (about 5 minutes instead of 9 1/2 on the 2-core machine).
pytest: $(STAMP)
	$(BIN)/python -m pytest -n 2 --dist loadfile

## Debian's Chromium for the dashboard's browser test: installed only when missing and we are root; if that
## fails the test skips and says why.
chromium:
	@if [ ! -x /usr/bin/chromium ] && [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		echo "installing Debian's chromium for the dashboard browser test"; \
		DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium >/dev/null \
		|| (apt-get update -q >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium >/dev/null) \
		|| echo "could not install chromium: the browser test will be skipped"; \
	fi

## The one command for tests: lint, types, then the whole suite (it starts its own Redis and servers).
test: lint typecheck chromium pytest

## The one command to see the product work end to end on this machine. Size and speed defaults live in
## passbridge/demo/defaults.py; per run: make demo DEMO_ARGS="--passes 5000 --rate-scale 30".
DEMO_ARGS ?=
demo: $(STAMP)
	$(BIN)/passbridge demo $(DEMO_ARGS)

## The same stack, kept running for manual use (Ctrl-C stops it).
run: $(STAMP)
	$(BIN)/passbridge up

# Every benchmark script (harness.py and ingest_app.py are their helpers, not benchmarks).
BENCHES = $(filter-out bench/harness.py bench/ingest_app.py bench/__init__.py,$(wildcard bench/*.py))

bench: $(STAMP)
	@for b in $(BENCHES); do echo "== $$b"; $(BIN)/python $$b || exit 1; done

clean:
	rm -rf $(VENV) .passbridge .mypy_cache .ruff_cache .pytest_cache
