# The two commands a new user needs: `make demo` (the offline Fashion-MNIST
# experiment) and `make test`. Both create .venv on first use: the demo installs
# vgg_jax alone, the tests add the `dev` and `torch` extras (pyproject.toml).
# Another stack: make test VENV=.venv312 PYTHON=python3.12 TEST_EXTRAS=dev
VENV ?= .venv
PYTHON ?= python3
TEST_EXTRAS ?= dev,torch
CONSTRAINTS ?=
PY := $(VENV)/bin/python
SETUP = VENV=$(VENV) PYTHON=$(PYTHON) CONSTRAINTS=$(CONSTRAINTS) bash scripts/setup.sh
WORKDIR ?= runs/fashion_mnist_quick
# Test workers: two keep both cores of the project's 2-core machines busy while
# one test compiles (single-threaded) and the other computes; about 1.3x faster.
TEST_WORKERS ?= 2

.PHONY: setup setup-demo demo test lint models

setup:
	@EXTRAS=$(TEST_EXTRAS) $(SETUP)

setup-demo:
	@EXTRAS= $(SETUP)

# The quick variant sets test_when_complete: the trainer ends with the test protocol's
# table (`vgg_jax.evaluate --workdir`, run in the training process and stored).
demo: setup-demo
	$(PY) -m vgg_jax.train --config configs/fashion_mnist.py:quick --workdir $(WORKDIR)

test: setup
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile --durations=15

lint: setup
	$(VENV)/bin/ruff check .

models: setup-demo
	$(PY) -m vgg_jax.models
