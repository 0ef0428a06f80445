#!/usr/bin/env bash
# The README's test command: make a virtual environment, install runtime + test requirements, lint, run the tests.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
. .venv/bin/activate
python -m pip install -q --upgrade pip
python -m pip install -q -r requirements-test.txt
ruff check .
ruff format --check .
python -m pytest -q --durations=15 "$@"
