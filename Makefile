# The commands the README names. Every target that needs Python sets up .venv itself.
#   make demo                       the service + a local worker on SQLite, running a small search
#   make test                       lint, check the Docker files, run the tests
#   make test TORCH_SPEC="torch torchvision"   pick your own torch build on the first install
#   make test PYTEST_ARGS="-k cbam -x"         pass arguments to pytest
#   make test PYTEST_WORKERS=1                 the tests in one process (default: 2, pytest-xdist)
#   make test-fast                  lint and the tests but the process-level end-to-end ones (-m 'not e2e')
.DEFAULT_GOAL := test
SHELL := bash
.SHELLFLAGS := -eu -o pipefail -c

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# torch is installed explicitly, before the project, so that the build you choose is the one kept
# (pyproject holds only ranges). This default resolves from the local wheel store on our machines.
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1
PYTEST_ARGS ?=
# pytest-xdist processes: the suite is mostly single-threaded training and waiting on worker and
# server processes, so two processes on two cores finish it in 230-280 s (three: slower).
# worksteal balances the long process-level tests; 1 runs the tests in this process.
PYTEST_WORKERS ?= 2
STAMP := $(VENV)/.installed

# Reinstall when the stamp records another TORCH_SPEC than the one asked for now.
ifneq ($(shell cat $(STAMP) 2>/dev/null),$(strip $(TORCH_SPEC)))
.PHONY: $(STAMP)
endif

.PHONY: install kernels demo test test-fast pytest lint format check-docker bench gpu-wheels clean \
	distclean

install: $(STAMP)

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(STAMP): pyproject.toml | $(BIN)/python
	spec='$(TORCH_SPEC)'; $(BIN)/python -m pip install $$spec
	$(BIN)/python -m pip install -e '.[dev]'
	echo '$(TORCH_SPEC)' > $@

# State lives in ./.cbam-nas; running it again resumes the same search (same spec, same key).
DEMO_SPEC ?= examples/cluttered-digits.yaml
DEMO_PORT ?= 8000
# The CBAM CPU kernels, compiled once per machine (about a minute) before anything needs them.
kernels: $(STAMP)
	$(BIN)/python -m search.nn.cbam_kernels

demo: $(STAMP) kernels
	$(BIN)/cbam-nas serve --port $(DEMO_PORT) --workers 1 --device cpu --submit $(DEMO_SPEC)

test: lint check-docker pytest

test-fast: PYTEST_ARGS += -m 'not e2e'
test-fast: lint pytest

# With several pytest processes each gets one intra-op thread (the processes already fill the
# cores; two threads each spin-wait against each other): test-fast 94 s -> 72 s here (59-73 s
# since, with other savings). Three processes were slower (78 s): the collection is per process.
pytest: $(STAMP) kernels
	$(if $(filter-out 1,$(PYTEST_WORKERS)),OMP_NUM_THREADS=$${OMP_NUM_THREADS:-1}) \
	$(BIN)/python -m pytest $(if $(filter-out 1,$(PYTEST_WORKERS)),-n $(PYTEST_WORKERS) --dist worksteal) $(PYTEST_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/lint-imports --no-cache

format: $(STAMP)
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

check-docker: $(STAMP)
	VENV=$(VENV) bash scripts/check-docker.sh

bench: $(STAMP)
	for script in benchmarks/[!_]*.py; do \
		name=$$(basename "$$script" .py); \
		echo "== $$name"; \
		$(BIN)/python -m "benchmarks.$$name"; \
	done

# Wheels of the spec's pydantic models and the settings for a GPU box that has torch and timm but
# not pydantic (CPython 3.12, Linux x86-64): carry .whl/ there and pip install --target it onto
# PYTHONPATH.
GPU_WHEELS = pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 \
	typing-inspection==0.4.5 typing-extensions==4.16.0 pydantic-settings==2.16.3 \
	python-dotenv==1.2.4
gpu-wheels: $(STAMP)
	$(BIN)/python -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
		--implementation cp --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
		-d .whl $(GPU_WHEELS)

# Build outputs and caches only; .cbam-nas/ (your database, artifacts and data) is left alone.
clean:
	rm -rf build dist *.egg-info .pytest_cache .ruff_cache test-artifacts
	find . -path ./$(VENV) -prune -o -name __pycache__ -type d -prune -exec rm -rf {} +

distclean: clean
	rm -rf $(VENV)
