"""Train a method and the plain-training baseline like for like, and compare them at matched quality.

"Like for like" means the same total number of optimizer steps and images seen: a
K-shard run with S steps per round per shard is compared with one model trained for
K*S steps per round, same rounds (hence the same number of checkpoints), batch size, data
and seed, no skipping. Every checkpoint of both is evaluated, and the comparison that
matters is made at equal quality: does the method copy less than plain training stopped
early at the same FID? This is what the README's first command runs.
"""

from __future__ import annotations

import math
import os
import time
from typing import Any

from memshard.config import METHOD_SWITCHES, MemshardConfig, build_config
from memshard.evaluation.evaluate import EvalOptions, ReferenceSlot, evaluate_rounds
from memshard.evaluation.frontier import frontier, matched_table, next_action, points_table, verdict
from memshard.evaluation.metrics.frontier import checkpoint_from_metrics, matched_quality
from memshard.iet.proxy import steps_for
from memshard.io.rundir import RunDir
from memshard.runtime.driver import TrainOutcome, train
from memshard.runtime.progress import console


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


def compare(cfg: MemshardConfig, out: str, opts: EvalOptions, max_factor: float = 1.0) -> dict[str, Any]:
    """Train ``cfg`` and its baseline under ``out``/{method,baseline}, put both on one frontier, print it.

    Both runs are evaluated at every committed round (the same generations), so the table shows
    how copying and quality move over training, and the last line says whether the method copies
    less than plain training stopped early at matched quality (memshard.evaluation.frontier). With
    ``max_factor`` > 1 the method, if it has not reached matched quality at the baseline's steps,
    trains on a round at a time up to ``max_factor`` x them and stops at the first checkpoint that
    does (as the memorization benchmark does); the extra steps and time are in the table.
    """
    if max_factor < 1:
        raise ValueError(f"max_factor must be >= 1, got {max_factor}")
    label = _label(cfg)
    equal = cfg.train.rounds
    cap = math.ceil(max_factor * equal)
    method_cfg = cfg.model_copy(update={"train": cfg.train.model_copy(update={"rounds": cap})})
    method_dir = os.path.join(out, "method")
    t0 = time.perf_counter()
    method = train(method_cfg, out=method_dir, until_round=equal)
    method_s = time.perf_counter() - t0
    sizes = method.manifest["initial_shard_sizes"]
    base_s, base = train_and_time(baseline_of(cfg, sizes), os.path.join(out, "baseline"))
    names = ["baseline", cfg.method or "method"]
    labels = {"baseline": "plain training", names[1]: label}
    console.print("evaluating every checkpoint of both runs (the same generations for each) ...")
    t0 = time.perf_counter()
    base_points = [checkpoint_from_metrics("baseline", m) for m in evaluate_rounds(base.run_uri, opts).values()]
    q = matched_quality(base_points)
    fids: dict[int, float] = {}
    ref = ReferenceSlot()  # the method's reference, built once for all its rounds
    while True:
        action, rounds = next_action(fids, RunDir(method_dir).rounds_completed(), q, equal, cap, 1)
        if action == "done":
            break
        if action == "train":
            console.print(f"{label} has not reached matched quality Q = {q:.2f} yet: training round {rounds[0]}")
            t1 = time.perf_counter()
            train(method_cfg, out=method_dir, resume=True, until_round=rounds[0])
            method_s += time.perf_counter() - t1
        else:
            fids.update({r: m["fid"] for r, m in evaluate_rounds(method_dir, opts, rounds, ref=ref).items()})
    result = frontier(
        base.run_uri,
        [method_dir],
        os.path.join(out, "frontier"),
        opts,
        names=names,
        labels=labels,
        title=f"{label} vs plain training: memorization vs quality over training",
    )
    console.print(f"  evaluated in {time.perf_counter() - t0:.0f}s")
    text = "\n\n".join(
        [
            points_table(result, labels),
            matched_table(result, labels),
            verdict(result, names[1], labels),
            f"Training time: {label} {method_s:.0f}s, plain training {base_s:.0f}s. "
            f"Plot: {os.path.join(out, 'frontier', 'frontier.png')}",
        ]
    )
    with open(os.path.join(out, "comparison.md"), "w") as fh:
        fh.write(text + "\n")
    console.print(text)
    return result


def train_and_time(cfg: MemshardConfig, out: str) -> tuple[float, TrainOutcome]:
    t0 = time.perf_counter()
    outcome = train(cfg, out=out)
    return time.perf_counter() - t0, outcome


def _label(cfg: MemshardConfig) -> str:
    k = cfg.shards.count
    if cfg.msr.enabled or cfg.taa.enabled:
        return f"IET-AGC+ (K={k}, r={cfg.agc.ratio:g})"
    if cfg.agc.enabled:
        return f"AGC on one model (r={cfg.agc.ratio:g})" if k == 1 else f"IET-AGC (K={k}, r={cfg.agc.ratio:g})"
    return "plain training (one model)" if k == 1 else f"IET (K={k})"
