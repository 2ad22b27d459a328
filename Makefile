# Two commands for a fresh machine (Python 3.10+ and the package index are all they need):
#   make demo   train CMSA-S on the embedded digits data set, evaluate, save a Hub-ready folder, reload, predict
#   make test   run the test suite
# Both create .venv with the pinned CPU build of torch (constraints.txt) on first use.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check

.PHONY: setup test demo clean

$(VENV)/.installed: setup.cfg pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q -c constraints.txt torch==2.13.0
	$(PIP) install -q -c constraints.txt -e ".[dev]"
	touch $@

setup: $(VENV)/.installed

test: setup
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q tests

demo: setup
	HF_HUB_OFFLINE=1 $(PY) examples/quickstart.py

clean:
	rm -rf $(VENV) outputs
