"""Shared body of the job entrypoints: make the checkout importable, run one `memshard` command.

`ray job submit --working-dir .` unpacks the checkout somewhere else and runs the script
there; putting its root on sys.path lets the job use that exact code even where memshard
is not pip-installed on the cluster.
"""

import sys
from pathlib import Path


def run(command: str) -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from memshard.cli import main

    sys.exit(main([command, *sys.argv[1:]]))
