# The two commands a new user needs: `make demo` (the offline Fashion-MNIST
# experiment) and `make test`. Both create .venv on first use.
VENV ?= .venv
PY := $(VENV)/bin/python
WORKDIR ?= runs/fashion_mnist_quick

.PHONY: setup demo test lint models

setup:
	@VENV=$(VENV) bash scripts/setup.sh

demo: setup
	$(PY) -m vgg_jax.train --config configs/fashion_mnist.py:quick --workdir $(WORKDIR)
	$(PY) -m vgg_jax.evaluate --workdir $(WORKDIR)

test: setup
	$(PY) -m pytest -q --durations=15

lint: setup
	$(VENV)/bin/ruff check .

models: setup
	$(PY) -m vgg_jax.models
