"""The package layout is a contract (README, "Where things are"): the algorithm core never imports Ray,
and memshard/ holds packages named for concepts, not a flat pile of modules."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
RAY_FREE = ["iet", "prss", "models", "io", "evaluation.metrics"]
PACKAGES = {"data", "evaluation", "iet", "io", "models", "presets", "prss", "runtime", "serving", "testing"}
TOP_MODULES = {"__init__.py", "__main__.py", "cli.py", "config.py", "seeds.py", "sweep.py"}


@pytest.mark.parametrize("package", RAY_FREE)
def test_the_algorithm_core_never_imports_ray(package):
    code = f"""
import importlib, pkgutil, sys
import memshard.{package} as p
for m in pkgutil.walk_packages(p.__path__, p.__name__ + "."):
    importlib.import_module(m.name)
shells = sorted(k for k in sys.modules if k.startswith(("memshard.runtime", "memshard.serving")))
print("ray" in sys.modules, shells)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    assert out.stdout.split("\n")[0] == "False []", f"memshard.{package} pulls in Ray or a Ray shell: {out.stdout}"


def test_memshard_holds_concept_packages_and_the_commands_only():
    base = ROOT / "memshard"
    # a folder that holds only __pycache__ (left by an older layout in a working copy) is not a package
    dirs = {p.name for p in base.iterdir() if p.is_dir() and any(q.name != "__pycache__" for q in p.iterdir())}
    dirs.discard("__pycache__")
    files = {p.name for p in base.iterdir() if p.is_file() and p.suffix == ".py"}
    assert dirs == PACKAGES and files == TOP_MODULES, (dirs ^ PACKAGES, files ^ TOP_MODULES)
    for pkg in PACKAGES - {"presets"}:
        init = base / pkg / "__init__.py"
        assert init.is_file() and init.read_text().startswith('"""'), f"{pkg}/__init__.py says what the package holds"
