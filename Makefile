# Front door. `make serve`: install, fetch MovieLens-100k, build a bundle, serve on :8000.
#             `make test`:  install with the test extras and run the test suite.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
BUNDLE ?= bundles/ml-100k

.PHONY: serve test install-train install-dev bundle clean

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)

# torch==2.13.0 is pinned in the extras: it resolves to the local CPU build.
$(VENV)/.train: pyproject.toml | $(VENV)/bin/python
	$(PY) -m pip install -q -e '.[train]'
	touch $@

$(VENV)/.dev: pyproject.toml | $(VENV)/bin/python
	$(PY) -m pip install -q -e '.[dev]'
	touch $@

install-train: $(VENV)/.train
install-dev: $(VENV)/.dev

# Rebuilt when the feature assembly changes: a bundle built with other features refuses to load.
$(BUNDLE)/manifest.json: rank/features.py | $(VENV)/.train
	$(VENV)/bin/funnel data fetch ml-100k
	$(VENV)/bin/funnel build --dataset ml-100k --out $(BUNDLE) --link bundles/current

bundle: $(BUNDLE)/manifest.json

serve: $(VENV)/.train $(BUNDLE)/manifest.json
	$(VENV)/bin/funnel serve --bundle bundles/current

test: $(VENV)/.dev
	$(VENV)/bin/python -m pytest

clean:
	rm -rf $(VENV) bundles data state
