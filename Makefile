# The two set-up commands (see README): `make demo` and `make test`.
# Each creates .venv at the repo root when missing and installs the pinned dependencies into it.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
export HF_HUB_OFFLINE := 1
export RAY_USAGE_STATS_ENABLED := 0

.PHONY: demo test test-slow lint bench venv clean sysdeps

# Validators the tests run (Debian packages: `tool:package`), installed with apt where missing.
# As root in CI and containers; through sudo elsewhere.
SYSTEM_TOOLS := dciodvfy:dicom3tools promtool:prometheus Orthanc:orthanc
# Files the tests need that are not commands (`path:package`): Orthanc's DICOMweb plugin (tests/orthanc.py).
SYSTEM_FILES := /usr/share/orthanc/plugins/libOrthancDicomWeb.so:orthanc-dicomweb
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

venv: $(STAMP)

# pip (not uv): torch/torchvision come from this machine type's local wheel store.
$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade "pip>=25,<26"
	$(PY) -m pip install --quiet -c constraints.txt -e ".[dev]"
	touch $@

demo: $(STAMP)
	$(VENV)/bin/mcs-batch demo --out demo-out

sysdeps:
	@missing=""; for pair in $(SYSTEM_TOOLS); do \
	  command -v "$${pair%%:*}" >/dev/null 2>&1 || missing="$$missing $${pair##*:}"; done; \
	for pair in $(SYSTEM_FILES); do \
	  [ -e "$${pair%%:*}" ] || missing="$$missing $${pair##*:}"; done; \
	if [ -n "$$missing" ]; then \
	  echo "installing$$missing (apt)"; \
	  $(SUDO) apt-get update -qq && \
	  $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing >/dev/null; \
	fi

test: $(STAMP) sysdeps
	$(VENV)/bin/ruff check mcs_batch tests bench jobs
	$(PY) -m pytest -q -m "not slow and not gpu"

test-slow: $(STAMP) sysdeps
	$(PY) -m pytest -q -m slow

lint: $(STAMP)
	$(VENV)/bin/ruff check mcs_batch tests bench jobs
	$(VENV)/bin/ruff format --check mcs_batch tests bench jobs

clean:
	rm -rf $(VENV) demo-out .pytest_cache .ruff_cache
