#!/usr/bin/env bash
# Set up, then run the main job on the embedded digits with some images duplicated (CPU, about
# 17 minutes on 2 cores, nothing downloads): AGC and plain training with the same steps (the
# `demo-dup` preset), every checkpoint of both evaluated (memorization over distinct images,
# copy similarity, FID), AGC trained on by up to a quarter more steps if it has not reached
# plain training's quality, ending with the frontier table and a one-line verdict: does it copy
# less than plain training stopped early at matched quality?
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export RAY_AUTH_MODE=${RAY_AUTH_MODE:-disabled}
exec memshard compare demo-dup --max-factor 1.25 --num 128 --fid-num 64 --calibration-images 64 "$@"
