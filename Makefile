# latentmill: `make demo` runs the pipeline offline on bundled samples; `make test` runs the test suite.
# Both create .venv on first use and install everything into it.
VENV ?= .venv
PY := $(VENV)/bin/python
PYTHON ?= python3

.PHONY: setup browser test test-fast demo bench lint clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml .ci/install_pillow_simd.sh
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[test]"
	bash .ci/install_pillow_simd.sh $(PY)
	touch $@

# the report test renders the report in headless Chromium: installed here when missing (root or sudo)
browser:
	bash .ci/install_chromium.sh

test: setup browser
	NO_ALBUMENTATIONS_UPDATE=1 $(PY) -m pytest -q tests

# the fast loop while working (about a minute on 2 cores): everything but the end-to-end runs
test-fast: setup
	NO_ALBUMENTATIONS_UPDATE=1 $(PY) -m pytest -q -m "not slow" tests

demo: setup
	NO_ALBUMENTATIONS_UPDATE=1 $(VENV)/bin/latentmill demo --work demo-work

bench: setup
	NO_ALBUMENTATIONS_UPDATE=1 $(PY) bench/run_all.py

lint: setup
	$(VENV)/bin/ruff check latentmill curate filters train tests bench
	$(VENV)/bin/ruff format --check latentmill curate filters train tests bench

clean:
	rm -rf $(VENV) demo-work build *.egg-info
