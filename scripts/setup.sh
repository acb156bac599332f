#!/usr/bin/env bash
# Creates the project's virtual environment and installs vgg_jax with the
# extras asked for, plus Debian's Fashion-MNIST files when this machine can
# install them.
#   VENV         where the environment lives (.venv)
#   PYTHON       the interpreter that creates it (python3)
#   EXTRAS       comma-separated extras: "" for the demo, "dev,torch" for the tests
#   CONSTRAINTS  optional pip constraints file (CI pins the oldest stack with it)
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PYTHON=${PYTHON:-python3}
EXTRAS=${EXTRAS-dev,torch}
CONSTRAINTS=${CONSTRAINTS:-}

if [ ! -x "$VENV/bin/python" ]; then
  echo "[setup] creating virtual environment in $VENV with $("$PYTHON" --version)"
  "$PYTHON" -m venv "$VENV"
fi

# The stamp records the extras installed and the constraints used. Reinstall
# when pyproject.toml changed, the constraints changed, or an extra is asked
# for that is not installed yet (a demo after the tests reuses their venv).
stamp="$VENV/.vgg_jax_installed"
installed_extras() { [ -f "$stamp" ] && sed -n 's/^extras=//p' "$stamp" | tr ',' '\n'; }
needs_install() {
  [ -f "$stamp" ] && [ ! pyproject.toml -nt "$stamp" ] || return 0
  [ "$(sed -n 's/^constraints=//p' "$stamp")" = "$CONSTRAINTS" ] || return 0
  local have extra
  have=$(installed_extras)
  for extra in ${EXTRAS//,/ }; do
    grep -qxF "$extra" <<<"$have" || return 0
  done
  return 1
}
if needs_install; then
  # Keep what was installed before, so the stamp never claims less than the venv has.
  all=$( { installed_extras; tr ',' '\n' <<<"$EXTRAS"; } | sed '/^$/d' | sort -u | paste -sd, -)
  [ pyproject.toml -nt "$stamp" ] 2>/dev/null && all=$EXTRAS
  spec=.
  [ -n "$all" ] && spec=".[$all]"
  echo "[setup] installing vgg_jax $spec into $VENV (a few minutes the first time)"
  args=()
  [ -n "$CONSTRAINTS" ] && args=(-c "$CONSTRAINTS")
  "$VENV/bin/python" -m pip install -q --upgrade pip
  # setuptools prints an "Editable installation" notice box (a UserWarning of
  # the build backend) on every editable install; it tells the user nothing.
  PYTHONWARNINGS=ignore::UserWarning "$VENV/bin/python" -m pip install -q "${args[@]}" -e "$spec"
  printf 'extras=%s\nconstraints=%s\n' "$all" "$CONSTRAINTS" >"$stamp"
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
