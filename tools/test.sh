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
# The browser test (tests/test_serve.py) drives Debian's chromium with its chromium-driver; install them where we
# can (root, apt-get). Where we cannot, the run goes on and that test says why it skipped.
if { [ ! -x /usr/bin/chromium ] || [ ! -x /usr/bin/chromedriver ]; } && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  echo "installing Debian's chromium and chromium-driver for the browser test"
  (timeout 900 apt-get update -qq && DEBIAN_FRONTEND=noninteractive timeout 900 apt-get install -y -qq chromium \
    chromium-driver) >/tmp/uit_jax_apt_chromium.log 2>&1 \
    || echo "could not install chromium (see /tmp/uit_jax_apt_chromium.log): the browser test will skip"
fi
ruff check .
ruff format --check .
python -m pytest -q -n "${UIT_JAX_TEST_WORKERS:-2}" --dist loadfile --durations=15 "$@"
