#!/usr/bin/env bash
# Creates the project's virtual environment and installs vgg_jax with its test
# dependencies, plus Debian's Fashion-MNIST files when this machine can install them.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PYTHON=${PYTHON:-python3}

if [ ! -x "$VENV/bin/python" ]; then
  echo "[setup] creating virtual environment in $VENV"
  "$PYTHON" -m venv "$VENV"
fi
stamp="$VENV/.vgg_jax_installed"
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  echo "[setup] installing vgg_jax and its dependencies (a few minutes the first time)"
  "$VENV/bin/python" -m pip install -q --upgrade pip
  "$VENV/bin/python" -m pip install -q -e ".[dev,torch]"
  touch "$stamp"
fi

# Fashion-MNIST offline: Debian ships the four IDX files. Online machines can
# skip this: tfds downloads the data itself.
fmnist=/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz
if [ ! -f "$fmnist" ] && command -v apt-get >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ]; then
    echo "[setup] installing Debian's dataset-fashion-mnist"
    (apt-get install -y -qq dataset-fashion-mnist >/dev/null 2>&1 ||
      (apt-get update -qq >/dev/null 2>&1 && apt-get install -y -qq dataset-fashion-mnist >/dev/null 2>&1)) ||
      echo "[setup] could not install dataset-fashion-mnist; tfds will download Fashion-MNIST when online"
  else
    echo "[setup] for offline Fashion-MNIST run: sudo apt-get install dataset-fashion-mnist"
  fi
fi
