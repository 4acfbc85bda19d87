# wecombot — the two commands that matter: `make run` and `make test`.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp
MODELS := tests/deploy/models
NPM_STAMP := $(MODELS)/node_modules/.installed-stamp
PYTEST_ARGS ?=

.PHONY: install lock test test-unit test-integration test-e2e chaos test-deploy test-image test-browser fuzz lint format run doctor screenshot bench bench-quick clean

install: $(STAMP)

# Idempotent: re-runs only when pyproject.toml or the lock changes (or the venv is
# missing). The runtime dependencies come from requirements.lock, as in the image, so the
# tests run the versions the image ships; then the package itself and the dev tools.
# A venv made by a Python older than 3.11 (PYTHON=python3.10 once) is made again; pip's
# "No matching distribution" would not say that the Python is what is wrong.
PY_OK := import sys; sys.exit(sys.version_info < (3, 11))
$(STAMP): pyproject.toml requirements.lock
	@if test -x $(BIN)/python && ! $(BIN)/python -c '$(PY_OK)' 2>/dev/null; then \
	  echo "$(VENV) was made with $$($(BIN)/python -V 2>&1), older than 3.11: making it again"; \
	  rm -rf $(VENV); fi
	@test -x $(BIN)/pip || $(PYTHON) -c '$(PY_OK)' 2>/dev/null || { \
	  echo "wecombot needs Python 3.11 or later; $(PYTHON) is $$($(PYTHON) -V 2>&1 || echo missing)." \
	    "Use another one: make $(MAKECMDGOALS) PYTHON=python3.12" >&2; exit 1; }
	@test -x $(BIN)/pip || $(PYTHON) -m venv $(VENV)  # pip: a venv made without ensurepip is redone
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet --require-hashes -r requirements.lock
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	@touch $(STAMP)

# requirements.lock: pyproject.toml's runtime dependencies resolved for Python 3.11 on any
# platform (amd64 and arm64 images alike), each version pinned with the sha256 of every
# file PyPI has for it. Run after changing a dependency, or to take new releases.
lock:
	@test -x $(BIN)/pip || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet 'uv>=0.5,<1'
	$(BIN)/uv pip compile pyproject.toml --universal --python-version 3.11 --generate-hashes \
	  --upgrade --quiet --custom-compile-command 'make lock' --output-file requirements.lock

# Only for the tests: tests/deploy checks the custom resources with their projects' API
# types (npm packages). Re-runs when the lock changes; without npm those checks skip.
$(NPM_STAMP): $(MODELS)/package-lock.json
	@if command -v npm >/dev/null; then \
	  npm ci --prefix $(MODELS) --no-audit --no-fund --loglevel=error && touch $(NPM_STAMP); \
	else echo "npm not found: tests/deploy will skip the custom resources' API-type check"; fi

test: install $(NPM_STAMP)
	$(BIN)/pytest $(PYTEST_ARGS)

test-unit: install
	$(BIN)/pytest tests/unit $(PYTEST_ARGS)

test-integration: install
	$(BIN)/pytest tests/integration $(PYTEST_ARGS)

test-e2e: install
	$(BIN)/pytest tests/e2e $(PYTEST_ARGS)

# Fault injection on real processes, ~3 min (also part of `make test`); replay a failure
# with the seed it printed: WECOMBOT_CHAOS_SEED=<seed> make chaos. See docs/reliability.md.
chaos: install
	$(BIN)/pytest tests/chaos -m chaos $(PYTEST_ARGS)

# Manifests, Dockerfile and NATS permissions, offline (also part of `make test`).
test-deploy: install $(NPM_STAMP)
	$(BIN)/pytest tests/deploy $(PYTEST_ARGS)

# The image: built from the Dockerfile by buildah and every service run from it (root,
# apt-get install buildah debootstrap; also part of `make test`). See docs/deploy.md.
test-image: install
	$(BIN)/pytest tests/image $(PYTEST_ARGS)

# The sandbox console in headless Chromium (Debian's: apt-get install chromium).
test-browser: install
	$(BIN)/pytest tests/browser $(PYTEST_ARGS)

# Re-take docs/console.png, the README's screenshot of the console (its Chinese needs a CJK
# font, or it shows boxes: apt-get install fonts-noto-cjk).
screenshot: install
	WECOMBOT_CONSOLE_SCREENSHOT=docs/console.png $(BIN)/pytest tests/browser -k screenshot $(PYTEST_ARGS)

# Property-based fuzzing of the gateway's decrypt + parse path, for minutes (the quick
# version runs in make test). WECOMBOT_FUZZ_EXAMPLES=N changes the examples per property.
fuzz: install
	WECOMBOT_FUZZ=long $(BIN)/pytest tests/integration/test_gateway_fuzz.py --timeout=0 $(PYTEST_ARGS)

# Benchmarks (issue #5): real processes on loopback, a few minutes on 2 cores; writes the
# table into docs/benchmarks.md. bench-quick is a ~30 s smoke run that writes nothing.
# BENCH_ARGS="--only gateway --profile /tmp/prof" profiles the services with py-spy.
bench: install
	$(BIN)/python -m bench $(BENCH_ARGS)

bench-quick: install
	$(BIN)/python -m bench --quick $(BENCH_ARGS)

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy libs services

format: install
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

run: install
	$(BIN)/wecombot dev

# Check a real configuration (./.env): settings, NATS, gettoken, callback URL, model.
doctor: install
	$(BIN)/wecombot doctor $(if $(PUBLIC_URL),--public-url $(PUBLIC_URL))

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache .hypothesis
