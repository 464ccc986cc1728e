# The two commands: `make run` starts everything, `make test` checks everything.
# Both create .venv with Python 3.11+ and install the project into it first.

# The first interpreter on PATH that runs and is 3.11+ (a pyenv shim may exist and not run).
PYTHON ?= $(shell for p in python3 python3.13 python3.12 python3.11; do \
	$$p -c 'import sys; sys.exit(sys.version_info < (3, 11))' >/dev/null 2>&1 && echo $$p && break; done)
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.install-stamp
# uv installs the project from uv.lock, the one lock of every install (this, the image, CI). uv
# itself comes from scripts/uv-requirements.txt, pinned with hashes, into a venv of its own.
UV_VENV := .uv
UV      := $(UV_VENV)/bin/uv
# uv uses the interpreter found above and never downloads one of its own.
UV_ENV  := UV_PYTHON_DOWNLOADS=never UV_PYTHON=$(PYTHON)
# What the suite runs against: `make test-latest` points it at a throwaway environment.
INSTALL := install

.PHONY: run-models install lock test-latest check-lock tools run test test-fast lint typecheck unit bench \
	quality image image-test scaleout clean model-servers model-servers-lock

install: $(STAMP)

$(UV): scripts/uv-requirements.txt
	@test -n "$(PYTHON)" || { echo "Python 3.11+ is required and none was found on PATH" >&2; exit 1; }
	@test -x $(UV_VENV)/bin/python || $(PYTHON) -m venv $(UV_VENV)
	$(UV_VENV)/bin/python -m pip install --quiet --require-hashes -r scripts/uv-requirements.txt
	@touch $(UV)

# Exactly the lock: `uv sync --locked` installs what uv.lock says (and removes what it does not),
# and stops, resolving nothing, when the lock no longer matches pyproject.toml.
$(STAMP): pyproject.toml uv.lock $(UV)
	@$(UV_ENV) $(UV) lock --check --offline --quiet 2>/dev/null || { \
		echo "make install: uv.lock does not match pyproject.toml (its dependencies changed since" \
			"the lock was made). Run \`make lock\` to resolve them anew, then \`make test\`, and" \
			"commit uv.lock with the change." >&2; exit 1; }
	$(UV_ENV) UV_PROJECT_ENVIRONMENT=$(VENV) $(UV) sync --locked --all-extras --quiet
	@touch $(STAMP)

# Upgrading is this one deliberate step: re-resolve uv.lock to the newest versions pyproject.toml
# allows, then `make test` against them and commit uv.lock (docs/operations.md).
lock: $(UV)
	$(UV_ENV) $(UV) lock --upgrade

# The installed environment is the lock's, package for package (part of `make test`).
check-lock: install
	@$(UV_ENV) UV_PROJECT_ENVIRONMENT=$(VENV) $(UV) sync --locked --all-extras --check --quiet \
		2>/dev/null || { $(UV_ENV) UV_PROJECT_ENVIRONMENT=$(VENV) $(UV) sync --locked --all-extras \
		--check 2>&1 | grep -E '^ [-+] ' >&2; echo "check-lock: $(VENV) differs from uv.lock (- what" \
		"it holds, + what the lock pins); \`rm $(STAMP); make install\` puts the lock's back" >&2; \
		exit 1; }
	@echo "check-lock: $(VENV) holds exactly what uv.lock pins"

# The suite against the newest versions pyproject.toml allows, in a throwaway environment, with
# uv.lock untouched: a drift (a new uvicorn) fails here first, not in CI on an unrelated change.
LATEST := .venv-latest
test-latest: $(UV)
	rm -rf $(LATEST)
	$(UV_ENV) $(UV) venv --quiet $(LATEST)
	$(UV_ENV) $(UV) pip install --quiet --python $(LATEST)/bin/python --upgrade -e '.[dev]'
	@echo "test-latest: what the newest allowed versions change against uv.lock:"
	@$(UV_ENV) $(UV) lock --upgrade --dry-run 2>&1 | sed 's/^/  /'
	$(MAKE) lint typecheck unit VENV=$(LATEST) INSTALL=

run: $(INSTALL)
	$(BIN)/python scripts/run.py $(ARGS)

# `make run` plus the real ALS model beside the mocks: KServe (V1) and MLServer (Open Inference).
run-models: $(INSTALL) model-servers
	$(BIN)/python scripts/run.py --with-models $(ARGS)

lint: $(INSTALL)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: $(INSTALL)
	$(BIN)/mypy

# The real servers some tests start themselves: prometheus and promtool (the alert rules and
# the dashboard), nginx (scale-out behind a load balancer), kubectl (kustomize). Installed from
# Debian's packages when missing (as root, or with sudo); `make test` fails rather than skip
# those tests when a tool is still missing.
tools:
	@scripts/install-tools.sh

# Two real model servers serving a real ALS model (model_servers/README.md), each in a venv of
# its own: kserve and mlserver pin versions that conflict with each other, and neither enters
# the gateway's lock. Each venv is rebuilt only when its pinned requirements change (a stamp);
# the model is trained again when it is missing or its training script changed.
VENVS       := .venvs
MODEL_CACHE := .cache/models
ALS_MODEL   := $(MODEL_CACHE)/als-2026.npz
SERVER_REQS := model_servers/requirements

model-servers: $(VENVS)/kserve/.stamp $(VENVS)/mlserver/.stamp $(ALS_MODEL)

$(VENVS)/%/.stamp: $(SERVER_REQS)/%.txt $(UV)
	@test -n "$(PYTHON)" || { echo "Python 3.11+ is required and none was found on PATH" >&2; exit 1; }
	rm -rf $(VENVS)/$*
	$(UV_ENV) $(UV) venv --quiet --python $(PYTHON) $(VENVS)/$*
	$(UV_ENV) $(UV) pip sync --quiet --require-hashes --python $(VENVS)/$*/bin/python $<
	@touch $@

# Trained with the kserve venv's python, which holds `implicit`; single-threaded BLAS, as
# implicit asks (its own threads do the work).
$(ALS_MODEL): model_servers/als/train.py mock_recommenders/world.py $(VENVS)/kserve/.stamp
	OPENBLAS_NUM_THREADS=1 MKL_NUM_THREADS=1 $(VENVS)/kserve/bin/python -m model_servers.als.train \
		--out $@

# Pin the model servers' requirements (their .in files) again, with hashes, after editing one; uv
# keeps the pins already in the .txt it can (delete the .txt first for the newest of everything).
model-servers-lock: $(UV)
	for name in kserve mlserver; do \
		UV_PYTHON_DOWNLOADS=never $(UV) pip compile --quiet --generate-hashes \
			--python-version 3.11 --custom-compile-command "make model-servers-lock" \
			$(SERVER_REQS)/$$name.in -o $(SERVER_REQS)/$$name.txt || exit 1; \
	done

# Coverage (floor: fail_under in pyproject.toml) over the fast tier only: over the slow tier it
# took that tier from about 2 min 40 s to 4 min 37 s, past CI's 5-minute budget for `make test`.
# Both tiers run in two processes (pytest-xdist: the fast tier 122 s -> 72 s). The slow tier's
# tests start gunicorn, load generators and servers of their own on port 0 and assert what the
# gateway reports, not how fast: they pass with a second suite and busy loops beside them, so a
# second test beside each costs them nothing but wall time (224 s -> 139 s at rest).
unit: $(INSTALL) tools model-servers
	FUSION_TEST_REQUIRE_TOOLS=1 $(BIN)/pytest -m "not slow" -n 2 --cov --cov-report=term:skip-covered
	FUSION_TEST_REQUIRE_TOOLS=1 $(BIN)/pytest -m slow -n 2 --durations=15

test: check-lock lint typecheck unit

# The fast tier for development: everything but the tests marked slow (gunicorn, child
# processes, load, the benchmarks), which `make test` and CI run too.
test-fast: $(INSTALL)
	$(BIN)/pytest -m "not slow"

bench: $(INSTALL)
	$(BIN)/python -m benchmarks $(ARGS)

quality: $(INSTALL)
	$(BIN)/python -m benchmarks quality $(ARGS)

# The container image (Dockerfile). BASE_IMAGE=python:3.12-slim to build from a registry's
# base; by default, where no registry is reachable, from a Debian base made here (debootstrap).
image: $(INSTALL)
	@scripts/install-tools.sh image
	scripts/image.sh build

# Builds the image with podman, runs the mocks and the gateway in containers, and checks them.
image-test: $(INSTALL)
	@scripts/install-tools.sh image
	$(BIN)/python scripts/image_test.py

# Two gateways behind nginx, one killed mid-load: what is lost, and what is still answered.
scaleout: $(INSTALL) tools
	$(BIN)/python -m benchmarks scaleout $(ARGS)

clean:
	rm -rf $(VENV) $(LATEST) $(UV_VENV) $(VENVS) $(MODEL_CACHE) .pytest_cache .mypy_cache .ruff_cache *.egg-info
