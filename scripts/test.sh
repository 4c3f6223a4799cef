#!/usr/bin/env bash
# Set up .venv with the test extras and run the whole test suite (offline, CPU, < 15 min).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh test
. .venv/bin/activate
python -m pytest "$@"
