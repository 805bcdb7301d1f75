"""The training-time memorization benchmark: privacy at matched quality, against plain training stopped early.

A defence is worth using only if it copies less than plain training that one simply stops in
time, at the same quality. So every arm is evaluated at every checkpoint (its memorization-FID
curve over training), plain training's checkpoints give the early-stopping frontier E(f), and
each arm's figure is its lowest memorized fraction among checkpoints with FID <= Q = 1.05 x plain
training's best FID, beside E(Q), with the steps and time it took (memshard/metrics/frontier.py).

Arms (``--methods``): ``baseline`` (plain training), ``agc`` (AGC on one model), ``iet``,
``iet-agc``, ``iet-agc-plus``; same data, seed, batch size and evaluation (same generations and
reference). Plain training and the one-model arms checkpoint every ``base_steps`` steps; sharded
arms every round (``shard_steps`` per shard, the averaging interval). Each non-baseline arm
trains first to the baseline's steps; if it has not reached Q it trains on, up to
``--max-factor`` (4) x the baseline's steps, evaluated every ``extend_steps`` steps, and stops
at the first checkpoint that reaches Q (the rounds in between are then evaluated too). The cost
in steps and time is part of the result.

Sizes (``--size``):

* ``cpu``: 100 of scikit-learn's digits at 16x16 (a set any model memorizes whole), the
  0.28M-parameter ``tiny`` UNet, 4 shards, batch 64. 2-core CPU.
* ``dup``: the realistic threat, as in LAION: 500 distinct digits of which 10 are stored 30
  times each (790 rows). Plain training copies the duplicated images long before it fits the
  rest, and no singleton. 2-core CPU, about 90 minutes for all five arms.
* ``gpu``: 100 CIFAR-10 images at 32x32 (``--data``, default ../shared/data/
  cifar10-train-10k.parquet), the 9M-parameter ``small`` UNet, batch 128.
* ``gpu-dup``: 2,000 distinct CIFAR-10 images of which 20 are stored 50 times (2,980 rows),
  same model. Both GPU sizes run in calls of 9 minutes (``--time-budget-s 540``, repeated
  until exit code 0).

Every call resumes what an earlier one left: trainings continue from their last committed
round and evaluations already made with the same settings are reused; ``--time-budget-s``
stops a call cleanly (exit code 3) before it would overrun. Outputs: OUT/summary.json (every
figure, with the command, device and date; ``--publish`` copies it to
docs/results/bench-memorization-SIZE.json and the plot beside it, from which
``python jobs/benchmarks_md.py`` regenerates BENCHMARKS.md's tables), OUT/results.md with
OUT/frontier.png and OUT/frontier-most-copied.png (plain training's closest copies at its
matched checkpoint), and OUT/frontier/{frontier.csv,matched.json,frontier.png}.

    python jobs/bench_memorization.py --size dup --out runs/bench-dup
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import json
import math
import os
import re
import shutil
import sys
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow.parquet as pq

from memshard.config import MemshardConfig, load_config
from memshard.data import prepare
from memshard.evaluation.evaluate import (
    EvalOptions,
    ReferenceSlot,
    evaluate_rounds,
    round_eval_dir,
    stored_round,
    summed_stats,
)
from memshard.evaluation.frontier import build, matched_table, next_action, points_table, write_outputs
from memshard.evaluation.metrics.frontier import Checkpoint, checkpoint_from_metrics
from memshard.io.rundir import RunDir
from memshard.runtime.driver import connect, train
from memshard.runtime.machine import device_info
from memshard.runtime.progress import console

INCOMPLETE_EXIT = 3
EVAL_NAME = "bench"
ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
RESULTS_DIR = os.path.join(ROOT, "docs", "results")
DEFAULT_GPU_DATA = os.path.join(ROOT, "..", "shared", "data", "cifar10-train-10k.parquet")


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
DEFAULT_METHODS = tuple(METHODS)


@dataclass(frozen=True)
class Duplicates:
    """D of the distinct images stored M times each (memshard prepare --duplicate D:M)."""

    groups: int
    copies: int
    seed: int = 0


@dataclass(frozen=True)
class Size:
    """A benchmark size: data, model, checkpoint schedule and evaluation."""

    preset: str
    source: str  # "digits" or "cifar" (--data)
    distinct: int  # distinct images taken from the source
    overrides: tuple[str, ...]
    shards: int
    base_rounds: int  # checkpoints of plain training (>= 8 for a fine frontier)
    base_steps: int  # steps per checkpoint of plain training and of one-model arms
    shard_steps: int  # steps per shard per round of sharded arms (their averaging interval)
    cpus: float  # CPUs the whole run may use (split over the K proxies)
    gpus: float  # GPUs the whole run may use
    num_samples: int
    calibration_images: int
    duplicates: Duplicates | None = None
    extend_steps: int = 0  # beyond the baseline's steps, evaluate every this many steps (0: every round)
    notes: tuple[str, ...] = field(default_factory=tuple)

    @property
    def base_total(self) -> int:
        return self.base_rounds * self.base_steps

    def per_round(self, sharded: bool) -> int:
        return self.shards * self.shard_steps if sharded else self.base_steps

    def extend_every(self, sharded: bool) -> int:
        """Rounds between evaluations once an arm trains past the baseline's steps."""
        return max(1, self.extend_steps // self.per_round(sharded))

    def equal_rounds(self, sharded: bool) -> int:
        """Rounds an arm needs for the baseline's total steps."""
        per_round = self.per_round(sharded)
        if self.base_total % per_round:
            raise ValueError(f"baseline steps {self.base_total} are not a whole number of rounds of {per_round}")
        return self.base_total // per_round


_CIFAR_SMALL = (
    "model.preset=small",
    "train.batch_size=128",
    "train.lr=0.0002",
    "train.warmup_steps=100",
    "train.ema_decay=0.999",
)
SIZES: dict[str, Size] = {
    # 100 digits: 8 checkpoints x 376 steps = 3,008 steps of batch 64 for plain training (the
    # earlier equal-steps benchmark's budget, where it copies 27% of its generations); sharded arms
    # average every 188 steps per shard (4 x 188 = 752 steps a round), 4 rounds to the baseline's steps.
    "cpu": Size(
        preset="demo",
        source="digits",
        distinct=100,
        overrides=("train.batch_size=64",),
        shards=4,
        base_rounds=8,
        base_steps=376,
        shard_steps=188,
        cpus=2.0,
        gpus=0.0,
        num_samples=256,
        calibration_images=64,
        extend_steps=1504,
    ),
    # 500 distinct digits, 10 of them stored 30 times (790 rows). Plain training: 10 checkpoints x
    # 240 steps of batch 64. Sharded arms: 300 steps per shard a round, about 100 local epochs of a
    # 197-row shard (the spec's round), so 2 rounds reach the baseline's 2,400 steps. Calibration:
    # BENCHMARKS.md, "dup size: calibration".
    "dup": Size(
        preset="demo",
        source="digits",
        distinct=500,
        overrides=("train.batch_size=64",),
        shards=4,
        base_rounds=10,
        base_steps=240,
        shard_steps=300,
        cpus=2.0,
        gpus=0.0,
        num_samples=256,
        calibration_images=128,
        duplicates=Duplicates(groups=10, copies=30),
        extend_steps=1200,
    ),
    # 100 CIFAR-10 images, 8 checkpoints x 500 steps of batch 128.
    "gpu": Size(
        preset="cifar10",
        source="cifar",
        distinct=100,
        overrides=_CIFAR_SMALL,
        shards=4,
        base_rounds=8,
        base_steps=500,
        shard_steps=250,
        cpus=4.0,
        gpus=1.0,
        num_samples=1024,
        calibration_images=100,
        extend_steps=2000,
    ),
    # 2,000 distinct CIFAR-10 images, 20 stored 50 times (2,980 rows): 12 checkpoints x 600 steps of
    # batch 128; sharded arms 600 steps per shard a round (about 100 local epochs of a 745-row shard).
    "gpu-dup": Size(
        preset="cifar10",
        source="cifar",
        distinct=2000,
        overrides=_CIFAR_SMALL,
        shards=4,
        base_rounds=12,
        base_steps=600,
        shard_steps=600,
        cpus=4.0,
        gpus=1.0,
        num_samples=1024,
        calibration_images=256,
        duplicates=Duplicates(groups=20, copies=50),
        extend_steps=2400,
    ),
}


# --------------------------------------------------------------------------- configs and data


def data_file(size: Size, out: str, source_path: str | None) -> str:
    """The benchmark's dataset, prepared once into OUT/data/ (never into the project)."""
    dup = size.duplicates
    tag = f"{size.source}-{size.distinct}" + ("" if dup is None else f"-dup{dup.groups}x{dup.copies}s{dup.seed}")
    path = os.path.join(out, "data", f"{tag}.parquet")
    if not os.path.exists(path):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        src = "digits" if size.source == "digits" else source_path
        if src is None:
            raise ValueError(f"source {size.source} needs --data (a Parquet dataset)")
        res = prepare(
            src,
            path,
            limit=size.distinct,
            duplicate=None if dup is None else (dup.groups, dup.copies),
            duplicate_seed=0 if dup is None else dup.seed,
        )
        console.print(f"prepared {res.num_rows} rows ({res.duplicate_rows} duplicate rows) into {path}")
    return path


def cap_rounds(size: Size, method: Method, max_factor: float) -> int:
    """Rounds an arm is configured for: the baseline's own; others up to max_factor x its steps."""
    equal = size.equal_rounds(method.sharded)
    return equal if method.key == "baseline" else math.ceil(max_factor * equal)


def schedule(size: Size, cfg: MemshardConfig) -> tuple[int, int]:
    """(rounds to the baseline's steps, rounds between evaluations past them) from the arm's own config.

    From the config rather than the size, so an arm whose round length ``--arm-set`` changed
    (``train.steps_per_round``) is still evaluated every round up to the baseline's steps and
    every ``extend_steps`` after them.
    """
    per_round = cfg.shards.count * (cfg.train.steps_per_round or 0)
    if per_round <= 0 or size.base_total % per_round:
        raise ValueError(
            f"{cfg.name}: baseline steps {size.base_total} are not a whole number of rounds of {per_round} "
            f"({cfg.shards.count} shard(s) x train.steps_per_round={cfg.train.steps_per_round})"
        )
    equal = size.base_total // per_round
    if cfg.train.rounds < equal:
        raise ValueError(
            f"{cfg.name}: train.rounds={cfg.train.rounds} stops before the baseline's {size.base_total} steps "
            f"({equal} rounds of {per_round}); set train.rounds too"
        )
    return equal, max(1, size.extend_steps // per_round)


def method_config(
    size: Size, method: Method, data: str | None, extra: list[str], seed: int, max_factor: float = 4.0
) -> MemshardConfig:
    """The config of one arm; one-model arms take all the resources, sharded arms split them."""
    return load_config(size.preset, [*arm_overrides(size, method, data, seed, max_factor), *extra])


def arm_overrides(size: Size, method: Method, data: str | None, seed: int, max_factor: float = 4.0) -> list[str]:
    """The overrides of ``size.preset`` that make one arm (also the frontier sweep's trials and baseline)."""
    k = size.shards if method.sharded else 1
    steps = size.shard_steps if method.sharded else size.base_steps
    overrides = [
        *size.overrides,
        f"name=bench-{method.key}",
        f"seed={seed}",
        f"method={method.method}",
        f"shards.count={k}",
        f"train.rounds={cap_rounds(size, method, max_factor)}",
        f"train.steps_per_round={steps}",
        f"resources.cpus_per_shard={size.cpus / k:g}",
        f"resources.gpus_per_shard={size.gpus / k:g}",
        "logging.progress=false",
    ]
    if data is not None:
        overrides += ["data.source=null", f"data.path={data}"]
    return overrides


# --------------------------------------------------------------------------- one arm


class BudgetSpent(Exception):
    """This call's --time-budget-s is spent; the next call continues."""


@dataclass
class Arm:
    key: str
    cfg: MemshardConfig
    run_dir: str
    equal_rounds: int
    extend_every: int
    timing: dict[str, float] = field(default_factory=lambda: {"train_s": 0.0, "eval_s": 0.0})
    ref: ReferenceSlot = field(default_factory=ReferenceSlot)  # built on the first evaluation, kept
    metrics: dict[int, dict[str, Any]] = field(default_factory=dict)


def _timing_path(run_dir: str) -> str:
    """Wall times of one arm, summed over calls; beside the run directory, not inside it."""
    return f"{run_dir.rstrip('/')}.timing.json"


def _write_json(path: str, obj: Any) -> None:
    tmp = f"{path}.tmp"
    with open(tmp, "w") as fh:
        json.dump(obj, fh, indent=2, default=_json_default)
    os.replace(tmp, path)


def _json_default(o: Any) -> Any:
    if isinstance(o, np.integer | np.floating | np.bool_):
        return o.item()
    raise TypeError(f"{type(o).__name__} is not JSON serialisable")


def _left(deadline: float | None) -> float | None:
    if deadline is None:
        return None
    left = deadline - time.time()
    if left <= 0:
        raise BudgetSpent
    return left


def train_to(arm: Arm, rounds: int, deadline: float | None) -> None:
    """Train (or resume) the arm's run until ``rounds`` rounds are committed."""
    run = RunDir(arm.run_dir)
    manifest = run.manifest()
    if manifest is not None and manifest["rounds_completed"] >= rounds:
        return
    t0 = time.perf_counter()
    try:
        out = train(
            arm.cfg, out=arm.run_dir, resume=manifest is not None, stop_after_s=_left(deadline), until_round=rounds
        )
    finally:
        arm.timing["train_s"] += time.perf_counter() - t0
        _write_json(_timing_path(arm.run_dir), arm.timing)
    if out.rounds_completed < rounds:
        raise BudgetSpent


def evaluate_arm(arm: Arm, rounds: list[int], opts: EvalOptions, deadline: float | None) -> None:
    """Evaluate (or reuse) the given committed rounds of the arm."""
    run = RunDir(arm.run_dir)
    todo = [r for r in rounds if r not in arm.metrics]
    fresh = []
    for r in todo:
        m = stored_round(run, opts.name, r, opts)
        if m is not None:
            arm.metrics[r] = m
        else:
            fresh.append(r)
    for r in fresh:
        _left(deadline)
        t0 = time.perf_counter()
        try:
            arm.metrics.update(evaluate_rounds(arm.run_dir, opts, [r], ref=arm.ref))
        finally:
            arm.timing["eval_s"] += time.perf_counter() - t0
            _write_json(_timing_path(arm.run_dir), arm.timing)
        m = arm.metrics[r]
        console.print(
            f"  {arm.key} round {r}: {m['train_steps']} steps, memorized {100 * m['memorized_fraction']:.1f}%, "
            f"FID {m['fid']:.2f}, duplicated images copied {m['duplicates']['duplicated_copied']}"
        )


def run_arm(arm: Arm, opts: EvalOptions, q: float | None, cap: int, deadline: float | None) -> None:
    """Train and evaluate one arm by :func:`next_action` until it is done."""
    while True:
        fids = {r: m["fid"] for r, m in arm.metrics.items()}
        # what was evaluated in an earlier call counts too (evaluate_arm reuses stored results)
        action, rounds = next_action(
            fids, RunDir(arm.run_dir).rounds_completed(), q, arm.equal_rounds, cap, arm.extend_every
        )
        if action == "done":
            return
        if action == "train":
            train_to(arm, rounds[0], deadline)
        else:
            evaluate_arm(arm, rounds, opts, deadline)


# --------------------------------------------------------------------------- analysis


def analyse(arm: Arm, round_id: int) -> dict[str, Any]:
    """The link between training statistics and outcome, up to the arm's matched checkpoint.

    AGC's premise is that memorizable samples have abnormally low loss (l / m[t] small) and are
    skipped. On duplicated data: are the duplicated samples' loss ratios lower and their skip
    rates higher than the singletons'? Did MSR move them? On a set without duplicates the same
    split is made between images a memorized generation copied and the rest.
    """
    path = os.path.join(arm.run_dir, round_eval_dir(EVAL_NAME, round_id), "per_sample.parquet")
    t = pq.read_table(path).to_pydict()
    copies = np.asarray(t["copies"])
    visits = np.asarray(t["visits"], dtype=np.float64)
    skips = np.asarray(t["skips"], dtype=np.float64)
    ratio = np.asarray(t["mean_ratio"], dtype=np.float64)
    moves = np.asarray(t["migrations"], dtype=np.float64)
    copied = np.asarray(t["memorized_nn_count"]) > 0
    dup = copies > 1
    split = dup if dup.any() else copied
    with open(os.path.join(arm.run_dir, "run.json")) as fh:
        manifest = json.load(fh)
    rounds = [s for s in manifest["rounds"] if s["round"] <= round_id]
    # from the run's statistics, not the per-sample table, so evaluations stored before it had the column are reused
    augmented = summed_stats(RunDir(arm.run_dir), np.asarray(t["id"]), round_id)["augmented"]

    def part(mask: np.ndarray) -> dict[str, float | int | None]:
        if not mask.any():
            return {"rows": 0, "skip_rate": None, "mean_loss_ratio": None, "migrations_per_row": None,
                    "augmented_rate": None}  # fmt: skip
        r = ratio[mask]
        return {
            "rows": int(mask.sum()),
            "skip_rate": float(skips[mask].sum() / max(visits[mask].sum(), 1)),
            "mean_loss_ratio": float(np.nanmean(r)) if np.isfinite(r).any() else None,
            "migrations_per_row": float(moves[mask].mean()),
            "augmented_rate": float(augmented[mask].sum() / max(visits[mask].sum(), 1)),
        }

    return {
        "round": round_id,
        "split": "duplicated vs singletons" if dup.any() else "copied vs other images",
        "in": part(split),
        "out": part(~split),
        "skip_rate": float(sum(s["skips"] for s in rounds) / max(sum(s["visits"] for s in rounds), 1)),
        "migrations": int(moves.sum()),
        "dup_share_of_migrations": float(moves[split].sum() / moves.sum()) if moves.sum() > 0 else None,
        "copied_images": int(copied.sum()),
        "copied_ever_skipped": float((skips[copied] > 0).mean()) if copied.any() else None,
    }


def analysis_table(summary: dict[str, Any]) -> str:
    """Markdown: AGC's premise on this data, per arm (at the matched checkpoint)."""
    arms = summary["arms"]
    split = next(iter(arms.values()))["analysis"]["split"]
    a_in, a_out = split.split(" vs ")
    # TAA's share of visits trained augmented: only in summaries measured since it was recorded
    taa = any("augmented_rate" in a["analysis"]["in"] for a in arms.values())
    lines = [
        f"| arm | skip rate: {a_in} | {a_out} | loss ratio l/m[t]: {a_in} | {a_out} | "
        f"migrations per row: {a_in} | {a_out} | "
        + (f"augmented per visit: {a_in} | {a_out} | " if taa else "")
        + "run skip rate |",
        "|---|---|---|---|---|---|---|---|" + ("---|---|" if taa else ""),
    ]

    def f(x: float | None, pct: bool = False) -> str:
        if x is None:
            return "n/a"
        return f"{100 * x:.1f}%" if pct else f"{x:.2f}"

    for _key, a in arms.items():
        an = a["analysis"]
        lines.append(
            f"| {a['label']} | {f(an['in']['skip_rate'], True)} | {f(an['out']['skip_rate'], True)} | "
            f"{f(an['in']['mean_loss_ratio'])} | {f(an['out']['mean_loss_ratio'])} | "
            f"{f(an['in']['migrations_per_row'])} | {f(an['out']['migrations_per_row'])} | "
            + (f"{f(an['in'].get('augmented_rate'), True)} | {f(an['out'].get('augmented_rate'), True)} | " * taa)
            + f"{f(an['skip_rate'], True)} |"
        )
    return "\n".join(lines)


# --------------------------------------------------------------------------- report


def frontier_on_distinct(points: dict[str, list[Checkpoint]]) -> dict[str, Any] | None:
    """The matched-quality figures with FID against one copy of each distinct image (None without duplicates).

    The primary figure's FID is against the training set as stored (the spec's training-set
    statistics), so reproducing the duplicated images at their stored frequency is part of the
    quality it rewards, and a defence that stops copying them is charged for it. This secondary
    view does not charge that: same checkpoints, same rule, ``fid_distinct`` in place of FID.
    The arms' training budgets and stopping rule stay the primary's.
    """
    if all(p.fid_distinct == p.fid for pts in points.values() for p in pts):
        return None
    swapped = {k: [dataclasses.replace(p, fid=p.fid_distinct) for p in pts] for k, pts in points.items()}
    result = build(swapped, "baseline")
    result.pop("rows")  # every checkpoint's fid_distinct is already in the primary rows
    return result


def render(summary: dict[str, Any], plot_path: str) -> str:
    """The benchmark's Markdown (results.md, and BENCHMARKS.md's generated section)."""
    labels = {k: a["label"] for k, a in summary["arms"].items()}
    d = summary["data"]
    dup = d.get("duplicates")
    data_line = f"{d['rows']} training rows, {d['distinct']} distinct images"
    if dup:
        data_line += f" ({dup['groups']} of them stored {dup['copies']} times each)"
    ev = summary["eval"]
    result = summary["frontier"]
    dev = summary["device"]
    command = (
        f"Command: `{summary['command']}` ({summary['date']}, {dev.get('gpu') or dev['cpu_model']}, "
        f"{dev['cpu_count']} cores; {summary['elapsed_s'] / 60:.0f} min of work in all, summed over calls)."
    )
    earlier = {k: c for k, c in summary.get("measured_by", {}).items() if c != "this call"}
    if earlier:
        command += " Arms " + ", ".join(f"`{k}`" for k in earlier) + " are kept from an earlier call "
        command += "(`--keep-published`: this call's plain training reproduced that call's checkpoint for checkpoint, "
        command += "every memorized fraction equal and FIDs within 0.1%):"
        command += " " + "; ".join(sorted({f"`{c}`" for c in earlier.values()})) + "."
    parts = [
        command,
        f"Data: {data_line}. Evaluation per checkpoint: {ev['num']} generations, {ev['steps']}-step DDIM (eta 0), "
        f"{ev['weights']} weights, same seeds for every arm; memorized = 1/3 rule over distinct training images "
        f"({ev['dedupe']} dedupe); FID against the training set as stored ({summary['fid_extractor']}).",
        "**At matched quality**:\n\n" + matched_table(result, labels),
        *_distinct_part(summary, labels),
        "**AGC's premise on this data** (statistics up to each arm's checkpoint above; loss ratio = the sample's "
        "loss over its timestep's running average, which AGC skips under 1/r = 0.5):\n\n" + analysis_table(summary),
        f"![frontier]({plot_path})",
        f"Plain training's generations at its matched-quality checkpoint that are closest to a training image, "
        f"each beside its nearest distinct training image:\n\n![most copied]({plot_path[:-4]}-most-copied.png)",
        "<details><summary>Every checkpoint (the plot's data)</summary>\n\n"
        + points_table(result, labels)
        + "\n\n</details>",
    ]
    return "\n\n".join(parts)


def _distinct_part(summary: dict[str, Any], labels: dict[str, str]) -> list[str]:
    fd = summary.get("frontier_distinct")
    if fd is None:
        return []
    return [
        f"**At matched quality on the distinct images** (secondary view: FID against one copy of each distinct "
        f"training image, so Q = 1.05 x plain training's best such FID ({fd['baseline_best_fid']:.2f}) = "
        f"{fd['matched_fid']:.2f}; the primary figure above charges a defence for not reproducing the duplicated "
        "images at their stored frequency, this one does not; same checkpoints, the arms trained by the "
        "primary's rule):\n\n" + matched_table(fd, labels)
    ]


def publish(out: str, size: str, seed: int = 0, tag: str | None = None) -> tuple[str, str]:
    """Copy summary.json and the plots into docs/results/ (what BENCHMARKS.md is generated from).

    The name is bench-memorization-SIZE, with -seedN for a seed other than 0 (a replicate) and
    -TAG for a lever measured beside the published arms (``--tag``), which it never replaces.
    """
    os.makedirs(RESULTS_DIR, exist_ok=True)
    name = f"bench-memorization-{size}" + (f"-seed{seed}" if seed else "") + (f"-{tag}" if tag else "")
    js = os.path.join(RESULTS_DIR, f"{name}.json")
    png = os.path.join(RESULTS_DIR, f"{name}.png")
    shutil.copyfile(os.path.join(out, "summary.json"), js)
    shutil.copyfile(os.path.join(out, "frontier.png"), png)
    shutil.copyfile(os.path.join(out, "frontier-most-copied.png"), png[:-4] + "-most-copied.png")
    return js, png


def published_path(size: str, seed: int = 0) -> str:
    return os.path.join(RESULTS_DIR, f"bench-memorization-{size}" + (f"-seed{seed}" if seed else "") + ".json")


def _plain_json(v: Any) -> Any:
    """A value as JSON would give it back (tuples as lists), for comparing with a loaded summary."""
    return json.loads(json.dumps(v))


# Plain training reproduces its weights and generations exactly (the memorized fractions must be
# equal); the Inception features' float sums vary at the 1e-4 level with thread scheduling when other
# work shares the cores (measured: FIDs 0.01-0.03% apart, every memorized fraction equal).
FID_REPRODUCED = 1e-3


class KeepError(ValueError):
    """--keep-published cannot reuse the published arms (they were measured under other conditions)."""


def kept_arms(
    published: dict[str, Any],
    keys: list[str],
    same_config: dict[str, bool],
    baseline: list[Checkpoint],
    size_config: dict[str, Any],
) -> dict[str, list[Checkpoint]]:
    """The published arms this call does not run, as checkpoints, if reusing them is sound.

    Sound means: this call's baseline checkpoints equal the published ones figure for figure
    (same data, seed, evaluation: training and evaluation are deterministic on one device
    type; FIDs within :data:`FID_REPRODUCED`), and this call's overrides would not change the kept arm's config
    (``same_config``), and the size is the published one (``size_config``: ``--size-set``
    changes every arm's schedule). Anything else raises :class:`KeepError` naming what differs.
    """
    changed = sorted(k for k in {*size_config, *published["size_config"]}
                     if _plain_json(size_config.get(k)) != _plain_json(published["size_config"].get(k)))  # fmt: skip
    if changed:
        raise KeepError(f"this call's size differs from the published one in {', '.join(changed)}: run every arm")
    rows = published["frontier"]["rows"]
    pub_base = sorted((r["round"], r["fid"], r["memorized_fraction"]) for r in rows if r["arm"] == "baseline")
    mine = sorted((p.round, p.fid, p.memorized_fraction) for p in baseline)
    same = len(pub_base) == len(mine) and all(
        a[0] == b[0] and a[2] == b[2] and abs(a[1] - b[1]) <= FID_REPRODUCED * max(a[1], b[1])
        for a, b in zip(pub_base, mine, strict=True)
    )
    if not same:
        raise KeepError(
            "this call's plain training does not reproduce the published one checkpoint for checkpoint "
            f"({len(mine)} vs {len(pub_base)} checkpoints, or a different memorized fraction, or an FID more than "
            f"{FID_REPRODUCED:.1%} apart): run every arm"
        )
    fields = set(Checkpoint.__dataclass_fields__)
    out: dict[str, list[Checkpoint]] = {}
    for k in published["arms"]:
        if k in keys:
            continue
        if not same_config.get(k, False):
            raise KeepError(f"--set changes arm {k}'s config, so its published figures do not apply: run it too")
        out[k] = [Checkpoint(**{f: v for f, v in r.items() if f in fields}) for r in rows if r["arm"] == k]
    return out


# --------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", choices=sorted(SIZES), default="dup")
    parser.add_argument("--out", default=None, help="Output directory (default runs/bench-memorization-SIZE).")
    parser.add_argument("--methods", default=",".join(DEFAULT_METHODS), help=f"Comma list of {', '.join(METHODS)}.")
    parser.add_argument(
        "--data", default=None, help="Parquet dataset for the gpu sizes (default: the shared CIFAR-10)."
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--num", type=int, default=None, help="Generations per checkpoint (default per size).")
    parser.add_argument("--eval-steps", type=int, default=50, help="DDIM steps per generation.")
    parser.add_argument("--max-factor", type=float, default=4.0, help="Arms train up to this x the baseline's steps.")
    parser.add_argument("--time-budget-s", type=float, default=None, help="Stop this call after about this long.")
    parser.add_argument("--publish", action="store_true", help="Copy summary.json and the plot to docs/results/.")
    parser.add_argument(
        "--tag",
        default=None,
        help="Publish as bench-memorization-SIZE-TAG: a lever's measurement beside the published arms, not over them.",
    )
    parser.add_argument(
        "--keep-published",
        action="store_true",
        help="Take the arms not in --methods from the published summary (docs/results/), when this call's "
        "baseline reproduces it (every memorized fraction equal, FIDs within 0.1%%) and --set leaves those arms' "
        "configs unchanged; their command is kept.",
    )
    parser.add_argument("--set", dest="overrides", action="append", default=[], help="Extra config override k=v.")
    parser.add_argument(
        "--arm-set",
        dest="arm_overrides",
        action="append",
        default=[],
        metavar="ARM:KEY=VALUE",
        help="An override of one arm only (e.g. iet-agc-plus:train.lr=0.004); --set changes every arm.",
    )
    parser.add_argument(
        "--size-set",
        action="append",
        default=[],
        metavar="FIELD=VALUE",
        help="Change a field of the size (base_rounds, base_steps, shard_steps, distinct, shards, extend_steps, ...): "
        "for calibration and tests.",
    )
    args = parser.parse_args(argv)
    if args.tag is not None and not re.fullmatch(r"[A-Za-z0-9][\w.-]*", args.tag):
        parser.error(f"--tag {args.tag!r}: letters, digits, '.', '_' and '-' only (it names a file and a block)")
    per_arm: dict[str, list[str]] = {}
    for item in args.arm_overrides:
        arm, sep, kv = item.partition(":")
        if not sep or arm not in METHODS or "=" not in kv:
            parser.error(f"--arm-set {item!r}: expected ARM:KEY=VALUE with ARM one of {', '.join(METHODS)}")
        per_arm.setdefault(arm, []).append(kv)

    def extra(k: str) -> list[str]:
        return [*args.overrides, *per_arm.get(k, [])]

    size = _with_fields(SIZES[args.size], args.size_set, parser)
    keys = [k.strip() for k in args.methods.split(",") if k.strip()]
    unknown = [k for k in keys if k not in METHODS]
    if unknown or not keys:
        parser.error(f"--methods: unknown {unknown}; choose from {', '.join(METHODS)}")
    if "baseline" not in keys:
        parser.error("--methods must include baseline: it defines matched quality and the early-stopping frontier")
    keys = ["baseline", *[k for k in keys if k != "baseline"]]
    data_src = args.data or (os.path.abspath(DEFAULT_GPU_DATA) if size.source == "cifar" else None)
    if data_src is not None and not data_src.startswith("s3://") and not os.path.exists(data_src):
        parser.error(f"--data {data_src} does not exist")
    # validate every arm's config and schedule before any work (the data path is filled in once prepared)
    for k in keys:
        try:
            schedule(size, method_config(size, METHODS[k], "/dev/null" if data_src else None, extra(k), args.seed,
                                         args.max_factor))  # fmt: skip
        except ValueError as exc:
            parser.error(str(exc))
    out = args.out or os.path.join("runs", f"bench-memorization-{args.size}")
    os.makedirs(out, exist_ok=True)
    t_call = time.time()
    deadline = None if args.time_budget_s is None else t_call + args.time_budget_s
    opts = EvalOptions(
        num=args.num or size.num_samples,
        steps=args.eval_steps,
        name=EVAL_NAME,
        seed=args.seed,
        calibration_images=size.calibration_images,
    )
    data = data_file(size, out, data_src)
    cfgs = {k: method_config(size, METHODS[k], data, extra(k), args.seed, args.max_factor) for k in keys}
    connect(cfgs["baseline"])
    arms = {
        k: Arm(k, cfgs[k], os.path.join(out, k), *schedule(size, cfgs[k]))  # equal_rounds, extend_every
        for k in keys
    }
    for arm in arms.values():
        if os.path.exists(_timing_path(arm.run_dir)):
            with open(_timing_path(arm.run_dir)) as fh:
                arm.timing.update(json.load(fh))
    q = None
    try:
        for k in keys:
            arm = arms[k]
            console.rule(f"[bold]{METHODS[k].label}[/bold] ({k})")
            run_arm(arm, opts, q, cfgs[k].train.rounds, deadline)
            if k == "baseline":
                base_points = [checkpoint_from_metrics(k, m) for m in arm.metrics.values()]
                q = build({k: base_points}, k)["matched_fid"]
                console.print(f"matched quality Q = 1.05 x best baseline FID = {q:.2f}")
    except BudgetSpent:
        console.print("[yellow]time budget of this call spent; run the same command again to continue[/yellow]")
        return INCOMPLETE_EXIT

    points: dict[str, list[Checkpoint]] = {
        k: [checkpoint_from_metrics(k, m) for m in a.metrics.values()] for k, a in arms.items()
    }
    published: dict[str, Any] = {}
    measured_by = {k: "this call" for k in keys}
    if args.keep_published:
        with open(published_path(args.size, args.seed)) as fh:
            published = json.load(fh)
        same = {
            k: method_config(size, m, data, extra(k), args.seed, args.max_factor).to_dict()
            == method_config(size, m, data, [], args.seed, args.max_factor).to_dict()
            for k, m in METHODS.items()
        }
        try:
            size_config = {k: v for k, v in dataclasses.asdict(size).items() if k != "notes"}
            kept = kept_arms(published, keys, same, points["baseline"], size_config)
        except KeepError as exc:
            console.print(f"[red]--keep-published: {exc}[/red]")
            return 2
        points.update(kept)
        for k in kept:
            measured_by[k] = published.get("measured_by", {}).get(k, published["command"])
        console.print(f"kept from {published_path(args.size, args.seed)}: {', '.join(kept) or 'nothing'}")
        keys = [k for k in METHODS if k in points]
        points = {k: points[k] for k in keys}  # the arms in the benchmark's order, kept or measured
    result = build(points, "baseline")
    labels = {k: METHODS[k].label for k in keys}
    write_outputs(result, os.path.join(out, "frontier"), f"Memorization vs quality, size `{args.size}`", labels)
    matched = result["matched"]
    summary: dict[str, Any] = {
        "benchmark": "memorization",
        "size": args.size,
        "command": "python jobs/bench_memorization.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d"),
        "device": device_info("cuda" if size.gpus and _cuda() else "cpu"),
        "elapsed_s": sum(a.timing["train_s"] + a.timing["eval_s"] for a in arms.values())
        + sum(published["arms"][k]["train_s"] + published["arms"][k]["eval_s"] for k in keys if k not in arms),
        "measured_by": measured_by,
        "data": _data_summary(size, arms["baseline"]),
        "eval": opts.settings(),
        "fid_extractor": next(iter(arms["baseline"].metrics.values()))["fid_extractor"],
        "size_config": {k: v for k, v in dataclasses.asdict(size).items() if k != "notes"},
        "definitions": {
            "early_stopping": "E(f) = lowest memorized fraction among plain training's checkpoints with FID <= f",
            "matched_quality": "Q = 1.05 x plain training's best FID over its checkpoints",
            "at_matched_quality": "an arm's lowest memorized fraction among its checkpoints with FID <= Q",
        },
        "frontier": result,
        "matched": matched,
        "arms": {
            k: published["arms"][k]
            if k not in arms
            else {
                "label": METHODS[k].label,
                "method": METHODS[k].method,
                "shards": cfgs[k].shards.count,
                "steps_per_round": cfgs[k].train.steps_per_round,
                "equal_rounds": arms[k].equal_rounds,
                "cap_rounds": cfgs[k].train.rounds,
                "rounds_trained": RunDir(arms[k].run_dir).rounds_completed(),
                "train_s": arms[k].timing["train_s"],
                "eval_s": arms[k].timing["eval_s"],
                "analysis": analyse(arms[k], matched[k]["round"]),
            }
            for k in keys
        },
    }
    distinct = frontier_on_distinct(points)
    if distinct is not None:
        summary["frontier_distinct"] = distinct
    if args.overrides:
        summary["overrides"] = list(args.overrides)
    _write_json(os.path.join(out, "summary.json"), summary)
    base_round = matched["baseline"]["round"]
    shutil.copyfile(os.path.join(out, "frontier", "frontier.png"), os.path.join(out, "frontier.png"))
    shutil.copyfile(
        os.path.join(arms["baseline"].run_dir, round_eval_dir(EVAL_NAME, base_round), "most_copied.png"),
        os.path.join(out, "frontier-most-copied.png"),
    )
    text = f"## Memorization benchmark, size `{args.size}`\n\n" + render(summary, "frontier.png")
    with open(os.path.join(out, "results.md"), "w") as fh:
        fh.write(text + "\n")
    console.print(text)
    if args.publish:
        js, png = publish(out, args.size, args.seed, args.tag)
        console.print(f"published {js} and {png}; regenerate BENCHMARKS.md with `python jobs/benchmarks_md.py`")
    console.print(
        f"summary: {os.path.join(out, 'summary.json')}, plot: {os.path.join(out, 'frontier', 'frontier.png')}"
    )
    return 0


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def _data_summary(size: Size, base: Arm) -> dict[str, Any]:
    ref = next(iter(base.metrics.values()))["reference"]
    out: dict[str, Any] = {
        "source": size.source,
        "rows": ref["images"],
        "distinct": ref["distinct"],
        "duplicated_images": ref["duplicated_images"],
        "duplicated_rows": ref["duplicated_rows"],
    }
    if size.duplicates is not None:
        out["duplicates"] = {"groups": size.duplicates.groups, "copies": size.duplicates.copies}
    return out


def _with_fields(size: Size, items: list[str], parser: argparse.ArgumentParser) -> Size:
    """--size-set FIELD=VALUE: a changed copy of the size (ints, floats or D:M for duplicates)."""
    changes: dict[str, Any] = {}
    for item in items:
        key, _, value = item.partition("=")
        if key not in {f.name for f in dataclasses.fields(Size)} or key in ("notes", "preset", "source"):
            parser.error(f"--size-set {item!r}: not a size field")
        if key == "duplicates":
            if value in ("", "none"):
                changes[key] = None
            else:
                from memshard.data.prepare import parse_duplicate

                changes[key] = Duplicates(*parse_duplicate(value))
        elif key == "overrides":
            changes[key] = tuple(v for v in value.split(";") if v)
        else:
            try:
                changes[key] = type(getattr(size, key))(value)
            except ValueError:
                parser.error(f"--size-set {item!r}: bad value")
    return dataclasses.replace(size, **changes)


if __name__ == "__main__":
    sys.exit(main())
