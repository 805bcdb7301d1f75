#!/usr/bin/env bash
# Install memshard and its dependencies into the current Python (3.10+).
# torch is pinned first: on the reference machines a CPU wheel of torch 2.13.0 is available
# locally, and installing it before anything that depends on torch keeps pip from pulling
# a multi-GB CUDA build. On a GPU machine, install the CUDA torch you want first instead.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
# An old pip (23.x) backtracks for minutes and then gives up on the s3fs/aiobotocore/boto3
# pins; a current one resolves them at once.
"$PY" -m pip install --quiet --upgrade "pip>=25"
if ! "$PY" -c "import torch" 2>/dev/null; then
  "$PY" -m pip install --quiet "torch==2.13.0"
fi
"$PY" -m pip install --quiet -e ".[dev]"
# The emoji images (npm emoji-datasource-google, pinned and checked by sha512) are the
# captioned demo set, and nothing may download at run time: fetch them now, once, into
# the cache ($MEMSHARD_CACHE or ~/.cache/memshard). A no-op when already there.
"$PY" -m memshard.data.fetch emoji
