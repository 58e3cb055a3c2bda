# The two commands of the README: `make train` and `make test`. Every target that runs the project's Python sets
# up what it needs first: the project environment .venv from uv.lock (tools/setup_venv.sh; PYTHON=... picks the
# interpreter it is made with), so each works on a fresh clone. Every target runs inside it, as if activated, so
# scripts and tests that call `python` get its packages.
VENV ?= .venv
export VENV
export VIRTUAL_ENV := $(abspath $(VENV))
export PATH := $(VIRTUAL_ENV)/bin:$(PATH)
PY := $(VENV)/bin/python
CONFIG ?= configs/cnn.py
ARGS ?=
WORKDIR ?=
RUN ?=
OTHER_RUN ?=
DATA_DIR := /usr/share/datasets/fashion-mnist
# What the test suite needs from Debian beyond Python: the data set, git, the container tests' engine and base
# image builder, the shell linter, a headless browser for the HTML report, PostgreSQL for a shared sweep study,
# Slurm and munge for a one-node cluster.
# `make test` installs whichever are missing, so CI needs nothing else.
TEST_SYSTEM_PACKAGES := dataset-fashion-mnist git docker.io debootstrap shellcheck chromium postgresql slurm-wlm munge

.PHONY: help setup setup-data setup-test-system lock train test test-fast test-wandb-server lint format notebooks bench bench-install clean

help:  ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | sed 's/:.*## /\t/'

# Without apt-get (not Debian/Ubuntu) or when it fails, one line says the way round, and setup goes on: a run
# with data.source=auto then downloads Fashion-MNIST through TFDS, or reads the IDX files of --config.data.local_dir.
DATA_HINT := note: Fashion-MNIST is not in $(DATA_DIR) and apt-get could not install it (dataset-fashion-mnist); \
  a run downloads it through TFDS instead (needs the network), or pass ARGS='--config.data.local_dir=DIR' with \
  the four IDX files in DIR (docs/training.md\#data)

setup-data:  ## Fashion-MNIST's IDX files from Debian (needs root or sudo once; without apt-get, says the way round)
	@test -f $(DATA_DIR)/train-images-idx3-ubyte.gz || { \
	  command -v apt-get >/dev/null 2>&1 && SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ) && \
	  $$SUDO apt-get update -q && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -q dataset-fashion-mnist; \
	} || echo "$(DATA_HINT)"

setup-test-system:  ## every Debian package the tests use (needs root or sudo once)
	@missing=$$(for p in $(TEST_SYSTEM_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || echo $$p; done); \
	if [ -n "$$missing" ]; then \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -q && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -q $$missing; fi

# pyproject.toml's extras .venv gets: `tfds` (TensorFlow) for the TFDS tests and data sets; `make train` asks for
# none (an extra already installed stays), so a checkout that only trains never installs TensorFlow.
EXTRAS ?= tfds
train: EXTRAS =
setup: setup-data  ## data + the locked environment in .venv (training, tests, notebooks; the tfds extra)
	@tools/setup_venv.sh $(foreach extra,$(EXTRAS),--extra $(extra))

lock:  ## regenerate uv.lock and requirements.txt after editing pyproject.toml's dependencies (then commit them)
	@tools/setup_venv.sh --lock

train: setup  ## train CONFIG (default the CNN) on Fashion-MNIST; WORKDIR=runs/cnn ARGS='--config.num_epochs=2 ...'
	$(PY) main.py --config=$(CONFIG) $(if $(WORKDIR),--workdir=$(WORKDIR)) $(ARGS)

# Two workers (pytest-xdist), each test module on one of them, longest first (tests/parallel.py); the end of the
# output reports the suite's time against its budget (tests/budget.py).
PYTEST_WORKERS ?= 2
PYTEST_PARALLEL := $(if $(filter-out 0 1,$(PYTEST_WORKERS)),-n $(PYTEST_WORKERS) --dist loadgroup --no-loadscope-reorder)

test: setup-test-system setup lint  ## system packages (docker.io, PostgreSQL, Slurm, ...), lint, the whole suite (~25 min)
	$(PY) -m pytest -q $(PYTEST_PARALLEL) --durations=20

test-fast: setup  ## the tests not marked slow, for the edit-test loop (no system packages beyond the data set)
	$(PY) -m pytest -q $(PYTEST_PARALLEL) -m "not slow" --suite-budget=300

test-wandb-server: setup  ## tests/test_wandb_server.py against YOUR W&B server: WANDB_BASE_URL and WANDB_API_KEY set
	@test -n "$$WANDB_BASE_URL" || { echo "error: set WANDB_BASE_URL (and WANDB_API_KEY) to your W&B server" >&2; exit 2; }
	MNIST_FLAX_TEST_WANDB_SERVER="$$WANDB_BASE_URL" $(PY) -m pytest -q tests/test_wandb_server.py

lint: setup  ## ruff format + check, and notebooks committed without outputs
	$(PY) -m ruff format --check .
	$(PY) -m ruff check .
	$(PY) tools/strip_notebook_outputs.py --check

format: setup  ## apply ruff's formatting and fixes; strip notebook outputs
	$(PY) -m ruff format .
	$(PY) -m ruff check --fix .
	$(PY) tools/strip_notebook_outputs.py

notebooks: setup  ## run the notebooks against runs (default: the two newest under runs/) -> notebooks/_build/*.html
	$(PY) notebooks/render.py --run "$(RUN)" --other-run "$(OTHER_RUN)"

bench: setup  ## throughput against PyTorch, compile time, overheads, time to 90% -> benchmarks/RESULTS.md
	$(PY) -m pip install -q -r benchmarks/requirements.txt
	$(PY) benchmarks/run.py

bench-install: setup  ## a fresh venv from uv.lock, pip against uv, cold and warm -> benchmarks/RESULTS.md
	$(PY) benchmarks/install.py

clean:  ## remove caches (not runs/, not .venv)
	rm -rf .pytest_cache .ruff_cache notebooks/_build
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
