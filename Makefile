# duration: `make demo` and `make test` work on a fresh machine with nothing set up.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
IAC_VENV ?= .venv-iac
IAC_STAMP := $(IAC_VENV)/.installed
# Commands the tools exec (uvicorn, moto_server, mlflow, hadolint) come from the venv.
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)

.PHONY: install iac demo test lint bench clean

install: $(STAMP)  ## create .venv and install the project with its test and spark extras

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -U pip setuptools wheel
	$(PY) -m pip install -q -e '.[test,spark]'
	touch $@

iac: $(IAC_STAMP)  ## cfn-lint and checkov in their own venv (checkov's pins clash with mlflow's)

$(IAC_STAMP): ops/aws/requirements-iac.txt
	$(PYTHON) -m venv $(IAC_VENV)
	$(IAC_VENV)/bin/python -m pip install -q -U pip
	$(IAC_VENV)/bin/python -m pip install -q -r ops/aws/requirements-iac.txt
	touch $@

demo: install  ## embedded stack -> synthetic months -> mlflow run -> one prediction per mode
	$(PY) -m ops.demo

# Test files run in parallel worker processes (one file stays on one worker, with its session
# fixtures): most of the suite waits on servers, builds and pip, so 3 workers fit 2 cores.
TEST_WORKERS ?= 3

test: install iac  ## the whole suite against real servers (started by the test session)
	$(PY) -m pytest -n $(TEST_WORKERS) --dist loadfile

lint: install iac  ## ruff on the code, hadolint on the Dockerfiles, cfn-lint + checkov on ops/aws
	$(VENV)/bin/ruff check .
	@files=$$(git ls-files '*Dockerfile' '*.Dockerfile'); \
	if [ -n "$$files" ]; then $(VENV)/bin/hadolint $$files; fi
	DURATION_IAC_VENV=$(IAC_VENV) $(PY) -m ops.aws.lint ops/aws/stack.yaml

bench: install  ## the benchmarks quoted in the README
	@command -v wrk >/dev/null || (apt-get update -qq && apt-get install -y -qq wrk)  # bench/online.py's load generator
	@for b in bench/*.py; do echo "== $$b"; $(PY) $$b || exit 1; done

clean:  ## remove the venv, the embedded stack's state and generated data
	rm -rf $(VENV) $(IAC_VENV) .stack data mlruns mlartifacts
