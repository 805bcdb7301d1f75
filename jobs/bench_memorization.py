"""The training-time memorization benchmark: plain training vs IET, IET-AGC and IET-AGC+, like for like.

Every method trains for the same total number of optimizer steps with the same batch size
(so the same number of images seen), the same data, the same seed and the same rounds; a
K-shard method runs S steps per shard per round, a single-model method K*S. Then each served
model is evaluated the same way (``memshard evaluate``: 1/3-rule memorized fraction, NN-ratio
fractions, copy similarity, FID) and the job writes OUT/results.md (table + analysis),
OUT/results.json and OUT/bench.png (privacy-utility plot).

Two sizes (``--size``):

* ``cpu``: 100 of scikit-learn's digits at 16x16, the 0.28M-parameter ``tiny`` UNet. Runs on
  a laptop or a 2-core CI box in under 30 minutes; nothing downloads.
* ``gpu``: 100 CIFAR-10 images at 32x32 (``--data``, default ../shared/data/
  cifar10-train-10k.parquet), the 9M-parameter ``small`` UNet, batch 128.

The job is resumable by design: run the same command again and finished trainings and
evaluations are kept, an unfinished training resumes from its last committed round.
``--time-budget-s`` makes one call stop cleanly (exit code 3) before it would overrun, which is
how the ``gpu`` size runs on machines lent in 10-minute slices.

    python jobs/bench_memorization.py --size cpu --out runs/bench-cpu
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow.parquet as pq

from memshard.config import MemshardConfig, load_config
from memshard.driver import connect, train
from memshard.evaluate import EvalOptions, evaluate, summary_lines
from memshard.progress import console

INCOMPLETE_EXIT = 3
EVAL_NAME = "bench"
DEFAULT_GPU_DATA = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "cifar10-train-10k.parquet")


@dataclass(frozen=True)
class Method:
    """One arm of the benchmark: the config ``method`` it runs, over K shards or one model."""

    key: str
    label: str
    method: str  # the config's `method` key
    sharded: bool


METHODS: dict[str, Method] = {
    m.key: m
    for m in (
        Method("baseline", "plain training", "baseline", sharded=False),
        Method("agc", "AGC only (one model)", "iet-agc", sharded=False),
        Method("iet", "IET", "iet", sharded=True),
        Method("iet-agc", "IET-AGC", "iet-agc", sharded=True),
        Method("iet-agc-plus", "IET-AGC+", "iet-agc-plus", sharded=True),
    )
}
DEFAULT_METHODS = ("baseline", "iet", "iet-agc", "iet-agc-plus")


@dataclass(frozen=True)
class Size:
    """A benchmark size: the base config and the evaluation it gets."""

    preset: str
    overrides: tuple[str, ...]
    shards: int
    steps_per_shard_round: int
    cpus: float  # CPUs the whole run may use (split over the K proxies)
    gpus: float  # GPUs the whole run may use
    num_samples: int
    calibration_images: int


SIZES: dict[str, Size] = {
    # 100 digits, 4 rounds x 4 shards x 188 steps = 3,008 steps of batch 64 (1,925 epochs of the set).
    # Calibrated with plain training on this set: 4.5-6.6% memorized after 2,000 steps, 29% after
    # 3,000, 40-44% after 4,000 (EMA weights, 200-256 samples). 3,000 is the budget where the
    # baseline clearly memorizes (>= 20%) and four arms fit in 30 minutes on 2 cores.
    "cpu": Size(
        preset="demo",
        overrides=("data.limit=100", "train.rounds=4", "train.batch_size=64"),
        shards=4,
        steps_per_shard_round=188,
        cpus=2.0,
        gpus=0.0,
        num_samples=256,
        calibration_images=64,
    ),
    # 100 CIFAR-10 images, 4 rounds x 4 shards x 250 steps = 4,000 steps of batch 128.
    "gpu": Size(
        preset="cifar10",
        overrides=(
            "data.limit=100",
            "model.preset=small",
            "train.rounds=4",
            "train.batch_size=128",
            "train.lr=0.0002",
            "train.warmup_steps=100",
            "train.ema_decay=0.999",
        ),
        shards=4,
        steps_per_shard_round=250,
        cpus=4.0,
        gpus=1.0,
        num_samples=1024,
        calibration_images=100,
    ),
}


def method_config(
    size: Size, method: Method, data: str | None, extra: list[str], seed: int, steps_per_shard_round: int | None = None
) -> MemshardConfig:
    """The config of one arm. Single-model arms take K*S steps per round and all the resources."""
    k = size.shards if method.sharded else 1
    s = steps_per_shard_round or size.steps_per_shard_round
    steps = s * (1 if method.sharded else size.shards)
    overrides = [
        *size.overrides,
        f"name=bench-{method.key}",
        f"seed={seed}",
        f"method={method.method}",
        f"shards.count={k}",
        f"train.steps_per_round={steps}",
        f"resources.cpus_per_shard={size.cpus / k:g}",
        f"resources.gpus_per_shard={size.gpus / k:g}",
        "logging.progress=false",
    ]
    if data is not None:
        overrides.append(f"data.path={data}")
    return load_config(size.preset, [*overrides, *extra])


def run_method(cfg: MemshardConfig, out: str, opts: EvalOptions, deadline: float | None) -> dict[str, Any] | None:
    """Train (or resume) and evaluate one arm; None when the time budget ran out first."""
    metrics_path = os.path.join(out, "eval", opts.name, "metrics.json")
    timing_path = _timing_path(out)
    if os.path.exists(metrics_path):
        with open(metrics_path) as fh:
            return json.load(fh)
    timing = {"train_s": 0.0, "eval_s": 0.0}
    if os.path.exists(timing_path):
        with open(timing_path) as fh:
            timing = json.load(fh)
    resume = os.path.exists(os.path.join(out, "run.json"))
    left = None if deadline is None else max(0.0, deadline - time.time())
    t0 = time.perf_counter()
    outcome = train(cfg, out=out, resume=resume, stop_after_s=left)
    timing["train_s"] += time.perf_counter() - t0
    _write_json(timing_path, timing)
    if not outcome.complete:
        return None
    t0 = time.perf_counter()
    metrics = evaluate(outcome.run_uri, opts)
    timing["eval_s"] += time.perf_counter() - t0
    _write_json(timing_path, timing)
    return metrics


def curve(run_dir: str, opts: EvalOptions, rounds: int, steps_per_round: int) -> list[dict[str, Any]]:
    """Memorization and FID of the global model after each earlier round (the arm's path over training).

    Plain training evaluated this way is the early-stopping frontier: a defence is only worth
    its cost if it sits below that curve, i.e. copies less than plain training at the same FID.
    """
    points = []
    for r in range(1, rounds):
        name = f"{opts.name}-r{r}"
        path = os.path.join(run_dir, "eval", name, "metrics.json")
        if os.path.exists(path):
            with open(path) as fh:
                m = json.load(fh)
        else:
            m = evaluate(run_dir, dataclasses.replace(opts, name=name, round=r))
        points.append(
            {"round": r, "steps": r * steps_per_round, "memorized_fraction": m["memorized_fraction"], "fid": m["fid"]}
        )
    return points


def _timing_path(run_dir: str) -> str:
    """Wall times of one arm, summed over calls; beside the run directory, not inside it."""
    return f"{run_dir.rstrip('/')}.timing.json"


def _write_json(path: str, obj: Any) -> None:
    tmp = f"{path}.tmp"
    with open(tmp, "w") as fh:
        json.dump(obj, fh, indent=2)
    os.replace(tmp, path)


def analyse(run_dir: str, metrics: dict[str, Any]) -> dict[str, Any]:
    """Figures from the run's own statistics: how much AGC skipped, and were the copied images skipped?

    A training image "is copied" when it is the nearest neighbour of at least one memorized
    generation (per_sample.parquet). If AGC works as intended, copied images should be the
    ones it skipped most; if they were never skipped, the threshold never caught them.
    """
    with open(os.path.join(run_dir, "run.json")) as fh:
        manifest = json.load(fh)
    with open(_timing_path(run_dir)) as fh:
        timing = json.load(fh)
    rounds = manifest["rounds"]
    steps = sum(r["steps"] for r in rounds)
    round_s = sum(r["round_s"] for r in rounds)
    cfg = manifest["config"]
    t = pq.read_table(os.path.join(run_dir, "eval", EVAL_NAME, "per_sample.parquet")).to_pydict()
    copied = np.array(t["memorized_nn_count"]) > 0
    skips = np.array(t["skips"])
    visits = np.array(t["visits"])
    rate = np.where(visits > 0, skips / np.maximum(visits, 1), 0.0)
    return {
        "steps": int(steps),
        "images_seen": int(steps * cfg["train"]["batch_size"]),
        "train_s": float(timing["train_s"]),
        "eval_s": float(timing["eval_s"]),
        "images_per_s": float(steps * cfg["train"]["batch_size"] / max(round_s, 1e-9)),
        "skip_rate": float(skips.sum() / max(visits.sum(), 1)),
        "copied_images": int(copied.sum()),
        "copied_skip_rate": float(rate[copied].mean()) if copied.any() else float("nan"),
        "other_skip_rate": float(rate[~copied].mean()) if (~copied).any() else float("nan"),
        "copied_ever_skipped": float((skips[copied] > 0).mean()) if copied.any() else float("nan"),
        "top_copy_count": int(np.max(t["memorized_nn_count"], initial=0)),
    }


def results_table(rows: list[dict[str, Any]]) -> str:
    """The Markdown table of the benchmark (first row = the baseline the change is measured against)."""
    base = rows[0]["metrics"]
    lines = [
        "| method | memorized (1/3 rule) | vs baseline | NN ratio < 0.3 | NN ratio < 0.5 | copy sim. p95 | FID | "
        "FID vs baseline | steps | images/s | train s | AGC skip rate |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        m, a = row["metrics"], row["analysis"]
        mem_change = _rel(m["memorized_fraction"], base["memorized_fraction"])
        fid_change = _rel(m["fid"], base["fid"])
        lines.append(
            f"| {row['label']} | {100 * m['memorized_fraction']:.1f}% | {mem_change} | "
            f"{100 * m['nn_ratio_fraction']['0.3']:.1f}% | {100 * m['nn_ratio_fraction']['0.5']:.1f}% | "
            f"{m['copy_similarity']['p95']:.3f} | {m['fid']:.2f} | {fid_change} | {a['steps']} | "
            f"{a['images_per_s']:.0f} | {a['train_s']:.0f} | {100 * a['skip_rate']:.1f}% |"
        )
    lines.append(
        f"\n{base['num_samples']} samples per method, {base['ddim_steps']}-step DDIM (eta 0) from {base['weights']} "
        f"weights; FID against {base['fid_num_reference']} training images ({base['fid_extractor']}); "
        "memorized = the nearest training image is under 1/3 of the distance to the second nearest (pixel L2)."
    )
    return "\n".join(lines)


def analysis_text(rows: list[dict[str, Any]]) -> str:
    """Which training images were copied, and had AGC skipped them?"""
    lines = [
        "| method | training images copied | their mean skip rate | other images' skip rate | "
        "copied and skipped at least once | most copies of one image |",
        "|---|---|---|---|---|---|",
    ]
    for row in rows:
        a = row["analysis"]
        lines.append(
            f"| {row['label']} | {a['copied_images']} | {_pct(a['copied_skip_rate'])} | {_pct(a['other_skip_rate'])} | "
            f"{_pct(a['copied_ever_skipped'])} | {a['top_copy_count']} |"
        )
    return "\n".join(lines)


def targets_text(rows: list[dict[str, Any]]) -> str:
    """The issue's efficacy targets, checked against the measured rows (never asserted in tests)."""
    base = rows[0]["metrics"]
    out = []
    for row in rows[1:]:
        m = row["metrics"]
        cut = 1 - m["memorized_fraction"] / base["memorized_fraction"] if base["memorized_fraction"] > 0 else 0.0
        fid_up = m["fid"] / base["fid"] - 1
        ok_mem, ok_fid = cut >= 0.5, fid_up <= 0.05
        out.append(
            f"- {row['label']}: memorized fraction {100 * cut:.0f}% lower (target >= 50%: "
            f"{'met' if ok_mem else 'missed'}), FID {100 * fid_up:+.1f}% vs baseline (target <= +5%: "
            f"{'met' if ok_fid else 'missed'})"
        )
    return "\n".join(out)


def curve_text(rows: list[dict[str, Any]]) -> str:
    """Earlier checkpoints of the arms evaluated with --curve (empty when none were)."""
    lines = []
    for row in rows:
        for p in row.get("curve") or []:
            lines.append(
                f"| {row['label']} | {p['round']} | {p['steps']} | {100 * p['memorized_fraction']:.1f}% | "
                f"{p['fid']:.2f} |"
            )
    if not lines:
        return ""
    head = [
        "Earlier checkpoints (same evaluation; the final round is the table above):",
        "",
        "| method | after round | total steps | memorized (1/3 rule) | FID |",
        "|---|---|---|---|---|",
    ]
    return "\n".join(head + lines)


def _rel(x: float, ref: float) -> str:
    return "-" if ref == 0 else f"{100 * (x / ref - 1):+.0f}%"


def _pct(x: float) -> str:
    return "n/a" if x != x else f"{100 * x:.1f}%"


def plot(rows: list[dict[str, Any]], path: str) -> None:
    """Privacy-utility picture: memorized fraction against FID per method, plus NN-ratio curves."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    for row in rows:
        m = row["metrics"]
        pts = row.get("curve") or []
        if pts:
            xs = [p["fid"] for p in pts] + [m["fid"]]
            ys = [100 * p["memorized_fraction"] for p in pts] + [100 * m["memorized_fraction"]]
            ax1.plot(xs, ys, linestyle="--", marker=".", alpha=0.6)
            for p in pts:
                ax1.annotate(f"{p['steps']} steps", (p["fid"], 100 * p["memorized_fraction"]), fontsize=7)
        ax1.scatter(m["fid"], 100 * m["memorized_fraction"], s=60)
        ax1.annotate(row["label"], (m["fid"], 100 * m["memorized_fraction"]), textcoords="offset points", xytext=(6, 4))
        th = sorted(m["nn_ratio_fraction"], key=float)
        ax2.plot([float(x) for x in th], [100 * m["nn_ratio_fraction"][x] for x in th], marker="o", label=row["label"])
    ax1.set_xlabel("FID (lower is better)")
    ax1.set_ylabel("memorized fraction, 1/3 rule (%)")
    ax1.set_title("privacy vs quality (lower-left is better)")
    ax1.grid(alpha=0.3)
    ax2.set_xlabel("NN distance ratio threshold")
    ax2.set_ylabel("generations under threshold (%)")
    ax2.set_title("nearest-neighbour ratio fractions")
    ax2.legend()
    ax2.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_report(out: str, size: str, rows: list[dict[str, Any]], command: str) -> str:
    """results.md / results.json / bench.png under ``out``; returns the Markdown."""
    parts = [
        f"## Memorization benchmark, size `{size}`",
        f"Command: `{command}`",
        results_table(rows),
        "Efficacy targets:\n" + targets_text(rows),
        "Which training images were copied (nearest neighbour of a memorized generation), and had AGC "
        "skipped them:\n\n" + analysis_text(rows),
        curve_text(rows),
        "![privacy vs quality](bench.png)",
    ]
    text = "\n\n".join(p for p in parts if p)
    with open(os.path.join(out, "results.md"), "w") as fh:
        fh.write(text + "\n")
    _write_json(os.path.join(out, "results.json"), rows)
    plot(rows, os.path.join(out, "bench.png"))
    return text


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", choices=sorted(SIZES), default="cpu")
    parser.add_argument("--out", default=None, help="Output directory (default runs/bench-memorization-SIZE).")
    parser.add_argument("--methods", default=",".join(DEFAULT_METHODS), help=f"Comma list of {', '.join(METHODS)}.")
    parser.add_argument("--data", default=None, help="Parquet dataset (gpu size default: the shared CIFAR-10 file).")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--num", type=int, default=None, help="Generations per method (default per size).")
    parser.add_argument("--steps", type=int, default=None, help="Steps per shard per round (default per size).")
    parser.add_argument("--eval-steps", type=int, default=50, help="DDIM steps per generation.")
    parser.add_argument("--time-budget-s", type=float, default=None, help="Stop this call after about this long.")
    parser.add_argument(
        "--curve",
        default="",
        help="Comma list of arms whose earlier rounds are evaluated too (e.g. baseline: the early-stopping curve).",
    )
    parser.add_argument("--set", dest="overrides", action="append", default=[], help="Extra config override k=v.")
    args = parser.parse_args(argv)

    size = SIZES[args.size]
    keys = [k.strip() for k in args.methods.split(",") if k.strip()]
    curve_keys = {k.strip() for k in args.curve.split(",") if k.strip()}
    unknown = [k for k in [*keys, *curve_keys] if k not in METHODS]
    if unknown or not keys:
        parser.error(f"--methods: unknown {unknown}; choose from {', '.join(METHODS)}")
    data = args.data or (os.path.abspath(DEFAULT_GPU_DATA) if args.size == "gpu" else None)
    if data is not None and not data.startswith("s3://") and not os.path.exists(data):
        parser.error(f"--data {data} does not exist")
    out = args.out or os.path.join("runs", f"bench-memorization-{args.size}")
    os.makedirs(out, exist_ok=True)
    deadline = None if args.time_budget_s is None else time.time() + args.time_budget_s
    cfgs = {
        k: method_config(size, METHODS[k], data, args.overrides, args.seed, args.steps) for k in keys
    }  # validate all first
    opts = EvalOptions(
        num=args.num or size.num_samples,
        steps=args.eval_steps,
        name=EVAL_NAME,
        seed=args.seed,
        calibration_images=size.calibration_images,
    )

    connect(cfgs[keys[0]])  # one Ray session for every arm (also when only evaluations are left)
    rows = []
    for key in keys:
        console.rule(f"[bold]{METHODS[key].label}[/bold] ({key})")
        run_dir = os.path.join(out, key)
        metrics = run_method(cfgs[key], run_dir, opts, deadline)
        if metrics is None:
            console.print(f"[yellow]time budget spent during {key}; run the same command again to continue[/yellow]")
            return INCOMPLETE_EXIT
        for line in summary_lines(metrics):
            console.print(f"  {line}")
        row = {"method": key, "label": METHODS[key].label, "metrics": metrics, "analysis": analyse(run_dir, metrics)}
        if key in curve_keys:
            cfg = cfgs[key]
            row["curve"] = curve(run_dir, opts, cfg.train.rounds, cfg.train.steps_per_round * cfg.shards.count)
        rows.append(row)
    command = "python jobs/bench_memorization.py " + " ".join(sys.argv[1:] if argv is None else argv)
    console.print(write_report(out, args.size, rows, command.strip()))
    console.print(f"results: {os.path.join(out, 'results.md')}, plot: {os.path.join(out, 'bench.png')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
