#!/usr/bin/env bash
# Sets up everything the project needs on a fresh machine: a virtualenv in .venv with the pinned packages,
# and the offline Fashion-MNIST dataset (Debian's dataset-fashion-mnist). Safe to run again: it only does
# what is missing. PYTHON picks the interpreter (default python3, >= 3.11).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}

if [ ! -x .venv/bin/python ]; then
  echo "setup: creating .venv with $($PYTHON --version)"
  "$PYTHON" -m venv .venv
fi
stamp=.venv/.decrop-installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  echo "setup: installing the project and its pinned dependencies (about 2 minutes the first time)"
  .venv/bin/python -m pip install --quiet --disable-pip-version-check -e '.[dev]'
  touch "$stamp"
fi

fmnist=${DECROP_FASHION_MNIST_DIR:-/usr/share/datasets/fashion-mnist}
if [ ! -f "$fmnist/train-images-idx3-ubyte.gz" ]; then
  echo "setup: installing Fashion-MNIST from Debian's package dataset-fashion-mnist"
  sudo=""; [ "$(id -u)" -eq 0 ] || sudo="sudo"
  if ! { $sudo apt-get install -y -q dataset-fashion-mnist >/dev/null 2>&1 \
         || { $sudo apt-get update -q >/dev/null 2>&1 && $sudo apt-get install -y -q dataset-fashion-mnist >/dev/null; }; }; then
    echo "setup: could not install dataset-fashion-mnist; runs will download Fashion-MNIST with torchvision" \
         "if you pass --set data.download=true on a machine with internet" >&2
  fi
fi
echo "setup: done"
