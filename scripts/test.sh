#!/usr/bin/env bash
# Set up .venv with the test extras, check lint, formatting and types (ruff, mypy: settings in
# pyproject.toml), then run the whole test suite (offline, CPU, < 15 min). Arguments go to pytest;
# LMFORGE_SKIP_LINT=1 runs the tests alone.
# The web-chat test drives Debian's chromium headless; it is installed here when missing and
# we are root (the test is skipped, not failed, where it cannot be installed).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh test
if ! command -v chromium >/dev/null 2>&1 && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  (apt-get update -qq && apt-get install -y -qq chromium >/dev/null) || echo "test: chromium not installed; the web test will be skipped"
fi
. .venv/bin/activate
if [ -z "${LMFORGE_SKIP_LINT:-}" ]; then
  ruff check src tests benchmarks
  ruff format --check src tests benchmarks
  mypy
fi
python -m pytest "$@"
