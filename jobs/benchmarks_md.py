"""Regenerate BENCHMARKS.md's measured tables from the machine-readable summaries in docs/results/.

Every benchmark commits its OUT/summary.json as docs/results/<name>.json (``--publish``); the
tables in BENCHMARKS.md between the markers

    <!-- BEGIN generated: <name> -->
    <!-- END generated: <name> -->

are rendered from those files by the benchmark's own ``render`` function, so every published
figure has its source beside it. The analysis around the markers is written by hand.

    python jobs/benchmarks_md.py            # rewrite the generated blocks
    python jobs/benchmarks_md.py --check    # exit 1 if BENCHMARKS.md is out of date
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import re
import sys
from collections.abc import Callable
from types import ModuleType
from typing import Any

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
RESULTS = os.path.join(ROOT, "docs", "results")
BENCHMARKS = os.path.join(ROOT, "BENCHMARKS.md")
# docs/results/<prefix>-SIZE.json -> the job whose `render(summary, plot_path)` draws it
RENDERERS = {
    "bench-memorization": "bench_memorization",
    "bench-prss": "bench_prss",
    "serve": "load_serve",
    "sweep-frontier": "sweep_frontier",
}
_BLOCK = re.compile(
    r"(<!-- BEGIN generated: (?P<name>[\w.-]+) -->\n)(?P<body>.*?)(<!-- END generated: (?P=name) -->)", re.S
)


def _job(name: str) -> ModuleType:
    path = os.path.join(ROOT, "jobs", f"{name}.py")
    spec = importlib.util.spec_from_file_location(f"_bench_{name}", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


def renderer(name: str) -> Callable[[dict[str, Any], str], str]:
    for prefix, job in RENDERERS.items():
        if name.startswith(prefix + "-"):
            return _job(job).render
    raise KeyError(f"no renderer for docs/results/{name}.json (known prefixes: {', '.join(RENDERERS)})")


def render_block(name: str, results_dir: str = RESULTS) -> str:
    """The Markdown of one generated block, from docs/results/NAME.json (and NAME.png beside it)."""
    with open(os.path.join(results_dir, f"{name}.json")) as fh:
        summary = json.load(fh)
    plot = os.path.relpath(os.path.join(results_dir, f"{name}.png"), ROOT)
    return renderer(name)(summary, plot).rstrip() + "\n"


def regenerate(text: str, results_dir: str = RESULTS) -> tuple[str, list[str]]:
    """``text`` with every generated block re-rendered; also the names of the blocks."""
    names: list[str] = []

    def sub(m: re.Match[str]) -> str:
        names.append(m.group("name"))
        return m.group(1) + render_block(m.group("name"), results_dir) + m.group(4)

    return _BLOCK.sub(sub, text), names


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if BENCHMARKS.md differs from the results")
    args = parser.parse_args(argv)
    with open(BENCHMARKS) as fh:
        text = fh.read()
    new, names = regenerate(text)
    published = sorted(f[:-5] for f in os.listdir(RESULTS) if f.endswith(".json")) if os.path.isdir(RESULTS) else []
    missing = [n for n in published if n not in names and any(n.startswith(p + "-") for p in RENDERERS)]
    if missing:
        print(f"BENCHMARKS.md has no block for {', '.join(missing)}: add <!-- BEGIN generated: NAME --> markers")
        return 1
    if args.check:
        if new != text:
            print("BENCHMARKS.md is out of date: run `python jobs/benchmarks_md.py`")
            return 1
        print(f"BENCHMARKS.md is up to date ({len(names)} generated blocks)")
        return 0
    with open(BENCHMARKS, "w") as fh:
        fh.write(new)
    print(f"regenerated {len(names)} block(s): {', '.join(names)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
