#!/usr/bin/env bash
# Set up (idempotent), lint, then run the whole test suite: unit tests and end-to-end runs
# on a real local Ray cluster. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export RAY_AUTH_MODE=disabled HF_HUB_OFFLINE=1
PY=${PYTHON:-python3}
"$PY" -m ruff check memshard tests jobs
"$PY" -m pytest -q -p no:cacheprovider "$@"
