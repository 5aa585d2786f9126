#!/usr/bin/env bash
# Set-up and the two commands of the README, on a machine with only Python (>= 3.10) and pip:
#   bash dev.sh demo    # creates .venv, installs expkit, runs the demo
#   bash dev.sh test    # creates .venv, installs expkit with its test extras, runs the test suite
#   bash dev.sh tutorials [NAME ...]  # executes tutorials/*.ipynb into tutorials/rendered/ (notebooks + PNGs)
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
VPY=.venv/bin/python
stamp=.venv/.expkit-installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  "$VPY" -m pip install -q --upgrade pip
  # the CPU wheel of torch (an unpinned torch pulls gigabytes of CUDA packages)
  "$VPY" -m pip install -q "torch==2.13.0"
  "$VPY" -m pip install -q -e ".[test]"
  touch "$stamp"
fi
cmd=${1:-test}
shift || true
case "$cmd" in
  demo) exec "$VPY" -m expkit.demo "$@" ;;
  test) exec "$VPY" -m pytest -q -p no:cacheprovider "$@" ;;
  tutorials) exec "$VPY" tutorials/run.py "$@" ;;
  *) echo "usage: bash dev.sh demo|test|tutorials [args]" >&2; exit 2 ;;
esac
