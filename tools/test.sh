#!/usr/bin/env bash
# The README's test command: make a virtual environment, install runtime + test requirements, lint, run the tests.
# Two pytest workers (pytest-xdist), a test file each at a time: a test is mostly one-threaded Python, XLA
# compiles and subprocess waits, so one process kept 1.2 of the 2 cores busy. UIT_JAX_TEST_WORKERS=0 runs them in
# this process, one after another.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
. .venv/bin/activate
python -m pip install -q --upgrade pip
python -m pip install -q -r requirements-test.txt
ruff check .
ruff format --check .
python -m pytest -q -n "${UIT_JAX_TEST_WORKERS:-2}" --dist loadfile --durations=15 "$@"
