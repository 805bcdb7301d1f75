"""The frontier sweep: IET-AGC+ tuned, with Ray Tune, on privacy at matched quality (issue 18).

Each trial is a full IET-AGC+ run on the memorization benchmark's data; every committed round is
evaluated and scored by ``memshard sweep --metric frontier``: its memorized fraction at matched
quality (FID <= 1.05 x plain training's best) minus plain training's early-stopping frontier
E(Q), or a penalty above 1 while no checkpoint reaches Q. ASHA stops trials on that score, round
by round. Plain training is trained and evaluated once per sweep (or reused: ``--baseline-run``,
for example the memorization benchmark's own ``OUT/baseline``, which has the same config).

Sizes (``--size``), each within about an hour of a 2-core CPU (``--time-budget-s``):

* ``dup``: the memorization benchmark's ``dup`` data (500 digits, 10 stored 30 times), its
  sharded arm (4 shards x 300 steps a round, batch 64), 8 rounds a trial; plain training as the
  benchmark's (10 checkpoints x 240 steps).
* ``cpu``: the ``cpu`` size (100 digits, every one memorized by plain training), 4 x 188 steps.
* ``ci``: a toy for the test suite.

Outputs: OUT/results.csv, OUT/points.csv, OUT/pareto.png (memshard sweep's), OUT/summary.json
(every trial with its values and score, plain training's frontier, the best trial);
``--publish`` copies summary.json and the plot to docs/results/sweep-frontier-SIZE.{json,png},
from which ``python jobs/benchmarks_md.py`` regenerates BENCHMARKS.md's table.

    python jobs/sweep_frontier.py --size dup --out runs/sweep-dup --baseline-run runs/bench-dup/baseline

``--param KEY=SPACE`` replaces or adds a dimension of the size's space; ``--warm-start 3,4`` adds
``train.init_from`` = plain training's round 3 or 4 (a grid): the proxies start from that common
model, and its steps count in every figure. ASHA's budget axis stays rounds, so at a rung a
warm-started trial is compared with cold ones at the same number of its own rounds.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import os
import shutil
import sys
import time
from dataclasses import dataclass, replace
from typing import Any

import pandas as pd

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, ROOT)

from jobs.bench_memorization import METHODS, arm_overrides, data_file  # noqa: E402
from jobs.bench_memorization import SIZES as BENCH_SIZES  # noqa: E402
from memshard.config import load_config  # noqa: E402
from memshard.runtime.machine import device_info  # noqa: E402
from memshard.runtime.progress import console  # noqa: E402
from memshard.sweep import BASELINE_DIR, PARETO_PNG, POINTS_CSV, RESULTS_CSV, parse_param, run_sweep  # noqa: E402

RESULTS_DIR = os.path.join(ROOT, "docs", "results")


@dataclass(frozen=True)
class SweepSize:
    """A sweep size: the trials' config, plain training's overrides, the space and the budget.

    ``bench`` names a size of jobs/bench_memorization.py: the trials are then its IET-AGC+ arm
    and plain training its baseline arm, built by the benchmark's own :func:`arm_overrides` on
    its prepared data, so ``--baseline-run`` can reuse the benchmark's plain training as is.
    Otherwise ``config`` and ``baseline`` are overrides of the demo preset.
    """

    params: dict[str, str]
    samples: int
    grace_period: int
    reduction_factor: float
    eval_num: int
    eval_steps: int
    time_budget_s: float
    bench: str | None = None
    max_factor: float = 4.0  # with ``bench``: trials train up to this x plain training's steps (its --max-factor)
    config: tuple[str, ...] = ()  # overrides of the demo preset for every trial (no ``bench``)
    baseline: tuple[str, ...] = ()  # overrides of plain training (method=baseline is applied first)


# What the benchmark's analysis points at: IET-AGC+'s copies fall, but its quality falls short of Q,
# so the space is mostly what costs quality: the augmentation (mode, scale) and the learning rate.
# Grids, not random choices: the first dup sweep's random draws repeated a setting (BENCHMARKS.md).
SIZES: dict[str, SweepSize] = {
    "dup": SweepSize(
        bench="dup",
        params={
            "taa.mode": "grid(inline, queue, prototype)",
            "taa.scale": "grid(memshard, torchvision)",
            "train.lr": "grid(0.002)",
        },
        samples=1,
        grace_period=2,
        reduction_factor=3,
        eval_num=128,
        eval_steps=25,
        time_budget_s=3300,
    ),
    "cpu": SweepSize(
        bench="cpu",
        max_factor=2.0,  # as the published cpu benchmark
        params={"taa.alpha": "grid(5, 20)", "train.lr": "grid(0.001, 0.002)"},
        samples=1,
        grace_period=2,
        reduction_factor=3,
        eval_num=128,
        eval_steps=25,
        time_budget_s=3300,
    ),
    "ci": SweepSize(
        config=(
            "data.limit=48",
            "method=iet-agc-plus",
            "shards.count=2",
            "train.rounds=2",
            "train.steps_per_round=3",
            "train.batch_size=8",
            "train.warmup_steps=2",
            "resources.cpus_per_shard=0.5",
            "logging.progress=false",
            "sweep.eval_reference=16",
        ),
        baseline=("train.rounds=3",),
        params={"taa.scale": "grid(memshard, torchvision)"},
        samples=1,
        grace_period=1,
        reduction_factor=2,
        eval_num=8,
        eval_steps=2,
        time_budget_s=600,
    ),
}


def trial_configs(size: SweepSize, out: str, data: str | None) -> tuple[list[str], list[str]]:
    """(the trials' overrides of the demo preset, plain training's overrides of a trial's config)."""
    if size.bench is None:
        config = list(size.config)
        if data is not None:
            config += ["data.source=null", f"data.path={os.path.abspath(data)}"]
        return config, list(size.baseline)
    bench = BENCH_SIZES[size.bench]
    path = os.path.abspath(data) if data is not None else data_file(bench, out, None)
    config = arm_overrides(bench, METHODS["iet-agc-plus"], path, seed=0, max_factor=size.max_factor)
    plain = load_config(bench.preset, arm_overrides(bench, METHODS["baseline"], path, seed=0))
    baseline = [
        f"train.steps_per_round={plain.train.steps_per_round}",
        f"train.rounds={plain.train.rounds}",
        f"resources.cpus_per_shard={plain.resources.cpus_per_shard:g}",
        f"resources.gpus_per_shard={plain.resources.gpus_per_shard:g}",
    ]
    return config, baseline


def with_space(size: SweepSize, params: list[str], warm_start: str | None, plain_run: str) -> SweepSize:
    """The size with ``--param`` dimensions replaced or added and ``--warm-start`` rounds as a grid."""
    space = dict(size.params)
    for item in params:
        key, text = parse_param(item)
        space[key] = text
    if warm_start is not None:
        rounds = [r.strip() for r in warm_start.split(",") if r.strip()]
        if not rounds or not all(r.isdigit() and int(r) >= 1 for r in rounds):
            raise ValueError(f"--warm-start {warm_start!r}: expected rounds of plain training, e.g. 3,4")
        space["train.init_from"] = "grid(" + ", ".join(f"{os.path.abspath(plain_run)}@{r}" for r in rounds) + ")"
    return replace(size, params=space)


def _value(key: str, v: Any) -> str:
    """A trial's value as the table shows it (a warm start by its run's name and round)."""
    if key == "train.init_from" and isinstance(v, str):
        return os.path.basename(v)
    return str(v)


def _num(v: Any) -> Any:
    """JSON-safe: NaN -> None, numpy scalars -> Python."""
    if hasattr(v, "item"):
        v = v.item()
    return None if isinstance(v, float) and not math.isfinite(v) else v


def summarize(
    df: pd.DataFrame,
    points: pd.DataFrame,
    size: SweepSize,
    config: list[str],
    baseline: list[str],
    command: str,
    elapsed: float,
) -> dict[str, Any]:
    """The machine-readable summary: every trial, plain training's frontier, the best trial."""
    base = points[points["arm"] == "baseline"].sort_values("round")
    scored_q = df["matched_fid_limit"].dropna() if "matched_fid_limit" in df else pd.Series(dtype=float)
    q = float(scored_q.iloc[0]) if len(scored_q) else None  # Q as the sweep scored the trials (None: no trial)
    keep = ["trial_id", "status", "rounds_completed", *size.params, "frontier", "reached", "matched_memorized",
            "early_stopping", "vs_early_stopping_rel", "fid", "memorized_fraction", "round_chosen",
            "duplicated_copied", "last_fid", "last_memorized", "skip_rate", "pareto"]  # fmt: skip
    trials = [{k: _num(r.get(k)) for k in keep if k in r} for r in df.to_dict("records")]
    scored = [t for t in trials if t.get("frontier") is not None]
    best = min(scored, key=lambda t: t["frontier"]) if scored else None
    return {
        "benchmark": "sweep-frontier",
        "command": command,
        "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d"),
        "device": device_info("cpu"),
        "elapsed_s": elapsed,
        "config": config,
        "baseline_overrides": baseline,
        "params": size.params,
        "scheduler": {"name": "asha", "grace_period": size.grace_period, "reduction_factor": size.reduction_factor},
        "eval": {"num": size.eval_num, "steps": size.eval_steps},
        "baseline": {
            "matched_fid": q,
            "best_fid": float(base["fid"].min()),
            "checkpoints": [
                {
                    "round": int(r["round"]),
                    "steps": int(r["steps"]),
                    "fid": float(r["fid"]),
                    "memorized_fraction": float(r["memorized_fraction"]),
                }
                for r in base.to_dict("records")
            ],
        },
        "trials": trials,
        "best": best,
    }


def _pct(x: Any) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def render(summary: dict[str, Any], plot_path: str) -> str:
    """BENCHMARKS.md's table of one frontier sweep."""
    b = summary["baseline"]
    params = list(summary["params"])
    head = ["trial", *[p.split(".", 1)[1] if "." in p else p for p in params], "status", "rounds", "score",
            "at Q: memorized", "E(Q)", "FID (chosen)", "dup. images copied"]  # fmt: skip
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for t in sorted(summary["trials"], key=lambda t: (t.get("frontier") is None, t.get("frontier") or 0)):
        score = t.get("frontier")
        cells = [
            t["trial_id"][-5:],
            *[_value(p, t.get(p)) for p in params],
            t["status"],
            str(t["rounds_completed"]),
            "-" if score is None else f"{score:+.3f}",
            _pct(t.get("matched_memorized")) if t.get("reached") else "not reached",
            _pct(t.get("early_stopping")),
            "-" if t.get("fid") is None else f"{t['fid']:.2f}",
            "-" if t.get("duplicated_copied") is None else str(int(t["duplicated_copied"])),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    best = summary.get("best")
    verdict = "no trial was scored"
    if best is not None:
        values = ", ".join(f"`{p}={_value(p, best.get(p))}`" for p in params)
        if best.get("reached"):
            verdict = (
                f"best trial: {values}: memorized {_pct(best['matched_memorized'])} at matched quality against "
                f"plain training's {_pct(best['early_stopping'])} ({best['frontier']:+.3f})"
            )
        else:
            verdict = f"best trial: {values}: no trial reached Q; the closest ended at FID {best['fid']:.2f}"
    ev = summary["eval"]
    q_text = "n/a" if b["matched_fid"] is None else f"{b['matched_fid']:.2f}"
    parts = [
        f"Command: `{summary['command']}` ({summary['date']}, {summary['device']['cpu_count']} cores, "
        f"{summary['elapsed_s'] / 60:.0f} min). Trials: `{' '.join(summary['config'])}`; ASHA on the frontier "
        f"score (grace {summary['scheduler']['grace_period']} rounds, reduction "
        f"{summary['scheduler']['reduction_factor']:g}); every round evaluated with {ev['num']} generations of "
        f"{ev['steps']} DDIM steps. Plain training: {len(b['checkpoints'])} checkpoints, best FID "
        f"{b['best_fid']:.2f}, so Q = {q_text}. Score = memorized fraction at Q minus E(Q) "
        "(negative: below plain training's early-stopping frontier), or 1 + the FID shortfall while Q is not "
        "reached.",
        "\n".join(lines),
        verdict + ".",
        f"![sweep]({plot_path})",
    ]
    return "\n\n".join(parts)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", choices=sorted(SIZES), default="dup")
    parser.add_argument("--out", default=None, help="Sweep directory (default runs/sweep-frontier-SIZE).")
    parser.add_argument("--baseline-run", default=None, help="Reuse this plain-training run (trained on as needed).")
    parser.add_argument("--samples", type=int, default=None, help="Trials (default per size).")
    parser.add_argument("--time-budget-s", type=float, default=None, help="Tune's budget (default per size).")
    parser.add_argument(
        "--data",
        default=None,
        help="A prepared Parquet dataset instead of the size's built-in one (for example the memorization "
        "benchmark's OUT/data/*.parquet, so trials, plain training and the benchmark share one file).",
    )
    parser.add_argument("--set", dest="overrides", action="append", default=[], help="Extra trial override k=v.")
    parser.add_argument(
        "--param",
        dest="params",
        action="append",
        default=[],
        metavar="KEY=SPACE",
        help="Replace or add one dimension of the size's space (memshard sweep's syntax, e.g. train.lr=grid(1e-3)).",
    )
    parser.add_argument(
        "--warm-start",
        default=None,
        metavar="ROUNDS",
        help="Add train.init_from = grid(PLAIN@R for R in ROUNDS) (e.g. 3,4): trials start from plain training's "
        "round-R weights (--baseline-run, or the sweep's own OUT/baseline); their steps count those rounds'.",
    )
    parser.add_argument("--publish", action="store_true", help="Copy summary.json and the plot to docs/results/.")
    args = parser.parse_args(argv)
    out = os.path.abspath(args.out or os.path.join("runs", f"sweep-frontier-{args.size}"))
    try:
        size = with_space(
            SIZES[args.size], args.params, args.warm_start, args.baseline_run or os.path.join(out, BASELINE_DIR)
        )
    except ValueError as exc:
        parser.error(str(exc))
    command = "python jobs/sweep_frontier.py " + " ".join(sys.argv[1:] if argv is None else argv)
    if args.data is not None and not os.path.exists(args.data):
        parser.error(f"--data {args.data} does not exist")
    config, baseline = trial_configs(size, out, args.data)
    t0 = time.perf_counter()
    df = run_sweep(
        "demo",
        [f"{k}={v}" for k, v in size.params.items()],
        args.samples or size.samples,
        out,
        [*config, *args.overrides],
        metric="frontier",
        scheduler="asha",
        grace_period=size.grace_period,
        max_concurrent=1,
        eval_num=size.eval_num,
        time_budget_s=args.time_budget_s or size.time_budget_s,
        baseline=baseline,
        baseline_run=args.baseline_run,
        reduction_factor=size.reduction_factor,
        eval_steps=size.eval_steps,
    )
    points = pd.read_csv(os.path.join(out, POINTS_CSV))
    summary = summarize(df, points, size, config, baseline, command, time.perf_counter() - t0)
    with open(os.path.join(out, "summary.json"), "w") as fh:
        json.dump(summary, fh, indent=1)
    console.print(render(summary, PARETO_PNG))
    if args.publish:
        os.makedirs(RESULTS_DIR, exist_ok=True)
        name = f"sweep-frontier-{args.size}"
        shutil.copyfile(os.path.join(out, "summary.json"), os.path.join(RESULTS_DIR, f"{name}.json"))
        shutil.copyfile(os.path.join(out, PARETO_PNG), os.path.join(RESULTS_DIR, f"{name}.png"))
        console.print(f"published docs/results/{name}.json; regenerate BENCHMARKS.md: python jobs/benchmarks_md.py")
    console.print(f"results: {os.path.join(out, RESULTS_CSV)}")
    return 0 if summary["best"] is not None else 1


if __name__ == "__main__":
    sys.exit(main())
