#!/usr/bin/env bash
# Set up, then run the main job on the embedded digits data (CPU, about 10 minutes on 2 cores):
# IET-AGC over 4 shards and the plain-training baseline with the same steps, both evaluated
# (memorization, copy similarity, FID), ending with a comparison table.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export RAY_AUTH_MODE=${RAY_AUTH_MODE:-disabled}
exec memshard compare demo --num 64 --fid-reference 256 --calibration-images 64 "$@"
