"""Job entrypoint for `ray job submit`: a thin wrapper over `memshard train`.

    ray job submit --working-dir . -- python jobs/train.py CONFIG --set key=value --out s3://bucket/runs/x

All outputs go to the run directory (--out / storage.run_dir), never to the job's
working directory, which Ray deletes with the job.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from memshard.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
