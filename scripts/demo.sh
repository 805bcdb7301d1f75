#!/usr/bin/env bash
# Set up, then run the main job on the embedded digits data (CPU, a few minutes).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export RAY_AUTH_MODE=${RAY_AUTH_MODE:-disabled}
exec memshard train demo "$@"
