"""Train a method and the plain-training baseline like for like, evaluate both, show a table.

"Like for like" means the same total number of optimizer steps and images seen: a
K-shard run with S steps per round per shard is compared with one model trained for
K*S steps per round, same rounds, batch size, data and seed, no skipping. This is what the
README's first command runs, so a new user sees the effect of IET-AGC in minutes.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Any

from .config import METHOD_SWITCHES, MemshardConfig, build_config
from .driver import TrainOutcome, train
from .evaluate import EvalOptions, evaluate
from .progress import console
from .proxy import steps_for


def baseline_of(cfg: MemshardConfig, shard_sizes: list[int]) -> MemshardConfig:
    """The plain-training counterpart of ``cfg``: one shard, no AGC, same steps and images in total.

    ``shard_sizes`` are the method run's actual shard sizes (its manifest), so the step count
    follows the split that really happened.
    """
    k = cfg.shards.count
    steps = sum(steps_for(cfg, n) for n in shard_sizes)
    d = cfg.to_dict()
    d["name"] = f"{cfg.name}-baseline"
    d["method"] = "baseline"
    for section, key in (s.split(".") for s in METHOD_SWITCHES["baseline"]):
        d[section].pop(key, None)  # the method sets them
    d["train"]["steps_per_round"] = steps
    # the single model may use the CPUs the K proxies had
    d["resources"]["cpus_per_shard"] = min(cfg.resources.cpus_per_shard * k, float(os.cpu_count() or 1))
    return build_config(d)


@dataclass
class Row:
    label: str
    run: str
    metrics: dict[str, Any]
    train_s: float


def table(rows: list[Row]) -> str:
    """A Markdown table of the headline figures."""
    head = (
        "| run | memorized (1/3 rule) | NN ratio < 0.3 | copy sim. mean | copy sim. p95 | FID | "
        "train time (s) |\n|---|---|---|---|---|---|---|"
    )
    lines = [head]
    for r in rows:
        m = r.metrics
        lines.append(
            f"| {r.label} | {100 * m['memorized_fraction']:.1f}% | {100 * m['nn_ratio_fraction']['0.3']:.1f}% | "
            f"{m['copy_similarity']['mean']:.3f} | {m['copy_similarity']['p95']:.3f} | {m['fid']:.2f} | "
            f"{r.train_s:.0f} |"
        )
    first = rows[0].metrics
    lines.append(
        f"\n{first['num_samples']} samples, {first['ddim_steps']} DDIM steps; FID against "
        f"{first['fid_num_reference']} training images ({first['fid_extractor']}); copy similarity threshold "
        "calibrated per run on augmented copies."
    )
    return "\n".join(lines)


def compare(cfg: MemshardConfig, out: str, opts: EvalOptions) -> list[Row]:
    """Train ``cfg`` and its baseline under ``out``/{method,baseline}, evaluate both, print the table."""
    rows = []
    method = train_and_time(cfg, os.path.join(out, "method"))
    sizes = method[1].manifest["initial_shard_sizes"]
    base = train_and_time(baseline_of(cfg, sizes), os.path.join(out, "baseline"))
    for label, (secs, outcome) in ((_label(cfg), method), ("plain training (baseline)", base)):
        console.print(f"evaluating {label} ...")
        t0 = time.perf_counter()
        metrics = evaluate(outcome.run_uri, opts)
        console.print(f"  evaluated in {time.perf_counter() - t0:.0f}s")
        rows.append(Row(label=label, run=outcome.run_uri, metrics=metrics, train_s=secs))
    text = table(rows)
    with open(os.path.join(out, "comparison.md"), "w") as fh:
        fh.write(text + "\n")
    console.print(text)
    return rows


def train_and_time(cfg: MemshardConfig, out: str) -> tuple[float, TrainOutcome]:
    t0 = time.perf_counter()
    outcome = train(cfg, out=out)
    return time.perf_counter() - t0, outcome


def _label(cfg: MemshardConfig) -> str:
    k = cfg.shards.count
    if cfg.msr.enabled or cfg.taa.enabled:
        return f"IET-AGC+ (K={k}, r={cfg.agc.ratio:g})"
    if cfg.agc.enabled:
        return f"IET-AGC (K={k}, r={cfg.agc.ratio:g})"
    return f"IET (K={k})"
