#!/usr/bin/env bash
# From nothing to a trained, evaluated tiny model: set up .venv, then run the default pipeline
# (built-in corpus, no downloads). Extra arguments go to `lmforge run`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
lmforge run "$@"
