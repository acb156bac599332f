# The two commands a new user needs: `make demo` (the offline Fashion-MNIST
# experiment) and `make test`. Both create .venv on first use.
VENV ?= .venv
PY := $(VENV)/bin/python
WORKDIR ?= runs/fashion_mnist_quick
# Test workers: two keep both cores of the project's 2-core machines busy while
# one test compiles (single-threaded) and the other computes; about 1.3x faster.
TEST_WORKERS ?= 2

.PHONY: setup demo test lint models

setup:
	@VENV=$(VENV) bash scripts/setup.sh

demo: setup
	$(PY) -m vgg_jax.train --config configs/fashion_mnist.py:quick --workdir $(WORKDIR)
	$(PY) -m vgg_jax.evaluate --workdir $(WORKDIR)

test: setup
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile --durations=15

lint: setup
	$(VENV)/bin/ruff check .

models: setup
	$(PY) -m vgg_jax.models
