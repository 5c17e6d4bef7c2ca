# The two set-up commands (see README): `make demo` and `make test`.
# Each creates .venv at the repo root when missing and installs the pinned dependencies into it.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
export HF_HUB_OFFLINE := 1
export RAY_USAGE_STATS_ENABLED := 0

.PHONY: demo test test-slow lint bench venv clean

venv: $(STAMP)

# pip (not uv): torch/torchvision come from this machine type's local wheel store.
$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade "pip>=25,<26"
	$(PY) -m pip install --quiet -c constraints.txt -e ".[dev]"
	touch $@

demo: $(STAMP)
	$(VENV)/bin/mcs-batch demo --out demo-out

test: $(STAMP)
	$(VENV)/bin/ruff check mcs_batch tests bench jobs
	$(PY) -m pytest -q -m "not slow and not gpu"

test-slow: $(STAMP)
	$(PY) -m pytest -q -m slow

lint: $(STAMP)
	$(VENV)/bin/ruff check mcs_batch tests bench jobs
	$(VENV)/bin/ruff format --check mcs_batch tests bench jobs

clean:
	rm -rf $(VENV) demo-out .pytest_cache .ruff_cache
