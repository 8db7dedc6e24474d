# scatlas: `make demo` and `make test` each work on a fresh machine with Python 3.11 and the registries.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: setup browser demo test test-fast lint clean

setup: $(STAMP)

# Stamped on the files that declare the environment: a changed pin re-runs the install, and pip then replaces any
# installed version the new pins exclude (pip check fails the setup if the result is inconsistent). Everything the
# tests import comes from the extras [test,bench] (scanpy, CellTypist, Ray, scikit-learn, ...), nothing by hand.
$(STAMP): pyproject.toml setup.py query/hunt/_fp16dot.c
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first: the pinned CPU build lies on local disk; a bare `torch` would fetch a CUDA build.
	$(PY) -m pip install -q "torch==2.13.0"
	$(PY) -m pip install -q -e ".[test,bench]"
	$(PY) -m pip check
	touch $(STAMP)

# Debian's chromium + chromium-driver for the page's browser test (tests/test_server_browser.py), installed with
# apt-get when either is missing and we are root (as on CI); with both present this does nothing. Elsewhere it says
# what to install, and the browser test skips saying why.
browser:
	@if command -v chromium >/dev/null 2>&1 && command -v chromedriver >/dev/null 2>&1; then \
		:; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
		echo "installing Debian's chromium and chromium-driver (browser test of scatlas serve)"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null; \
	else \
		echo "note: chromium and chromedriver not found; install Debian's chromium and chromium-driver as root for the browser test"; \
	fi

demo: setup
	$(VENV)/bin/scatlas demo --out demo_out

test: setup browser
	$(VENV)/bin/ruff check atlas index query scatlas tests scripts
	$(VENV)/bin/lint-imports
	$(VENV)/bin/mypy
	# Everything, slow tests included (about 10 minutes on an idle 2-core machine); --durations keeps that in view.
	$(VENV)/bin/python -m pytest -q --durations=15

# Skips the tests marked slow (over ~20 s each: Ray, the 5,000-cell hunt, numba-compiled scanpy steps, real data).
test-fast: setup browser
	$(VENV)/bin/python -m pytest -q -m "not slow"

lint: setup
	$(VENV)/bin/ruff check atlas index query scatlas tests scripts
	$(VENV)/bin/lint-imports
	$(VENV)/bin/mypy

clean:
	rm -rf $(VENV) demo_out bench_out
