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

# Debian packages: Fashion-MNIST's IDX files (the offline data of the main
# job; online machines can do without, tfds downloads the data) and shellcheck
# (the launch scripts' tests).
apt_install() {  # apt_install PACKAGE CHECK_PATH
  [ -e "$2" ] && return 0
  command -v apt-get >/dev/null 2>&1 || return 0
  if [ "$(id -u)" != 0 ]; then
    echo "[setup] $1 is not installed; with root rights: apt-get install $1"
    return 0
  fi
  echo "[setup] installing Debian's $1"
  apt-get install -y -qq "$1" >/dev/null 2>&1 ||
    { apt-get update -qq >/dev/null 2>&1 && apt-get install -y -qq "$1" >/dev/null 2>&1; } ||
    echo "[setup] could not install $1"
}
apt_install dataset-fashion-mnist /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz
apt_install shellcheck /usr/bin/shellcheck
