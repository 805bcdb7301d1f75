"""Orchestration and scaling: a small real run on a local Ray cluster, read back from its run directory."""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from typing import Any

import torch

from jobs.throughput.analysis import data_path, orchestration_rounds, round_marks, round_throughput, scaling_efficiency
from jobs.throughput.sizes import BASE_PRESET, SIZES, Size, StepCase
from jobs.throughput.steps import PlainLoop, step_config, synthetic_shard
from memshard.config import load_config


def bench_orchestration(size: Size, workdir: str, device: torch.device, shards: int | None = None) -> dict[str, Any]:
    """A small real run on a local Ray cluster, timed from its own manifest and file times.

    ``shards`` replaces the size's shard count (the scaling runs); every shard trains the same
    steps per round either way, so rounds with more shards do proportionally more work.
    """
    import ray

    from memshard.runtime.driver import train

    if not ray.is_initialized():
        ray.init(num_cpus=os.cpu_count() or 2, include_dashboard=False, log_to_driver=False)
    overrides = [*size.ray_overrides, "logging.progress=false", f"train.device={device.type}"]
    if shards is not None:
        overrides.append(f"shards.count={shards}")
    cfg = load_config(BASE_PRESET, overrides)
    if device.type == "cuda":
        gpus = torch.cuda.device_count()
        per = 1.0 if cfg.shards.count <= gpus else gpus / cfg.shards.count
        cfg = load_config(BASE_PRESET, [*overrides, f"resources.gpus_per_shard={per:g}"])
    run_dir = tempfile.mkdtemp(prefix=f"ray-run-k{cfg.shards.count}-", dir=workdir)
    served_at: dict[int, float] = {}

    def on_round(summary: dict[str, Any]) -> None:
        served_at[int(summary["round"])] = time.time()

    t0 = time.perf_counter()
    train(cfg, out=run_dir, on_round=on_round)
    total_s = time.perf_counter() - t0
    with open(os.path.join(run_dir, "run.json")) as fh:
        manifest = json.load(fh)
    res = orchestration_rounds(manifest, round_marks(run_dir, served_at))
    shard_images = max(1, min(int(sh["size"]) for sh in manifest["rounds"][-1]["shards"]))
    res["throughput"] = round_throughput(manifest, cfg.train.batch_size)
    res["data_path"] = data_path(manifest)
    res.update(
        {
            "config": {
                "preset": BASE_PRESET,
                "overrides": overrides,
                "shards": cfg.shards.count,
                "rounds": cfg.train.rounds,
                "steps_per_round": cfg.train.steps_per_round,
                "batch_size": cfg.train.batch_size,
                "cpus_per_shard": cfg.resources.cpus_per_shard,
            },
            "total_s": total_s,
            "definition": "per round 1 - max over shards(train_s) / round_s; median over rounds >= 2 (round 1 "
            "includes actor start-up). overhead_fraction_wall also counts the manifest commit, served/ publish and "
            "TensorBoard log after round_s.",
            "breakdown_source": "run.json has round_s and shards[].train_s only; proxies_saved_at_s, aggregated_at_s, "
            "stats_written_at_s are file mtimes in RUN/ and served_at_s the driver's on_round call, all in s from the "
            "round's start (the previous round's on_round).",
            "caveat": f"upper bound for this model: these rounds train {cfg.train.steps_per_round} steps per shard, "
            f"{cfg.train.steps_per_round * cfg.train.batch_size / shard_images:.0f} local epochs of a "
            f"{shard_images}-image shard; the spec's default round is 100 local epochs of the shard (on 4 CIFAR-10 "
            "shards of 12,500 at batch 128, about 9,800 steps), where the fixed per-round cost is a smaller share.",
        }
    )
    return res


def bench_scaling(size: Size, workdir: str, device: torch.device) -> dict[str, Any]:
    """Round throughput with K shard actors against one (item 4), from real runs.

    On one machine the K actors share its cores (or its one GPU), so the efficiency measures
    how much of the machine's parallelism the orchestration keeps, not K-node scaling; that is
    projected in BENCHMARKS.md from the measured aggregation rate (:func:`project_round`).
    Every K gets a fresh run, in increasing order, after the orchestration run has warmed the
    cluster (a new Ray cluster's background start-up takes CPU from the first rounds).
    """
    cap = (torch.cuda.device_count() if device.type == "cuda" else os.cpu_count()) or 1
    ks = sorted({k for k in size.scaling_k if k <= max(cap, 1)} | {1})
    runs: dict[int, dict[str, Any]] = {}
    ceiling: dict[int, float] = {}
    for k in ks:
        if device.type == "cpu":  # what K independent loops get from this machine right now
            ceiling[k] = parallel_ceiling(size.cases[0], k, window_s=size.cases[0].steps * 0.5)
        runs[k] = bench_orchestration(size, workdir, device, shards=k)
    thr = {k: r["throughput"]["images_per_s_median"] for k, r in runs.items()}
    eff = scaling_efficiency(thr)
    return {
        "k": ks,
        "images_per_s": thr,
        "efficiency": eff,
        "ceiling_images_per_s": ceiling or None,
        "efficiency_vs_ceiling": (
            {k: eff[k] * k * ceiling[1] / ceiling[k] for k in ks} if ceiling and ceiling[1] > 0 else None
        ),
        "round_s_median": {k: r["round_s_median"] for k, r in runs.items()},
        "train_s_max_median": {k: r["train_s_max_median"] for k, r in runs.items()},
        "workers": f"{cap} {'GPUs' if device.type == 'cuda' else 'CPU cores'}",
        "definition": "images/s = sum over shards of steps x batch / round_s, median over rounds >= 2; efficiency = "
        "images/s(K) / (K x images/s(1)). On the CPU, ceiling_images_per_s is the summed rate of K independent "
        "plain loops (separate processes, same window) measured just before each run: virtual CPUs do not always "
        "give K times one, and efficiency_vs_ceiling = (images/s(K) / images/s(1)) / (ceiling(K) / ceiling(1)).",
    }


CEILING_FLAG = "--ceiling-worker"


def ceiling_worker(case_name: str, window_s: float) -> None:
    """One independent plain loop: the images/s it trains in a window the parent opens for all workers.

    Run as a separate process (``python bench_throughput.py --ceiling-worker CASE WINDOW``): it
    builds its loop, prints ``ready``, reads the window's start (wall clock) from stdin, counts
    the steps it finishes inside the window and prints the rate. Every worker measures the
    same seconds of the machine.
    """
    torch.set_num_threads(1)
    case = next(c for size in SIZES.values() for c in size.cases if c.name == case_name)
    cfg = step_config(case, "plain", "cpu")
    loop = PlainLoop(cfg, torch.device("cpu"))
    data = synthetic_shard(cfg, case.samples, torch.device("cpu"))
    loop.train_round(1, data, 2)
    print("ready", flush=True)
    start_at = float(sys.stdin.readline())
    while time.time() < start_at:
        loop.train_round(1, data, 1)
    done, r = 0, 2
    while time.time() < start_at + window_s:
        loop.train_round(r, data, 1)
        done, r = done + 1, r + 1
    print(done * cfg.train.batch_size / window_s, flush=True)


def parallel_ceiling(case: StepCase, k: int, window_s: float) -> float:
    """Summed images/s of K concurrent single-thread plain loops in separate processes (this machine, now)."""
    import subprocess

    entry = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench_throughput.py")
    cmd = [sys.executable, entry, CEILING_FLAG, case.name, repr(window_s)]  # the entry point runs ceiling_worker
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env) for _ in range(k)]
    try:
        for proc in procs:
            line = proc.stdout.readline()
            if line.strip() != "ready":
                raise RuntimeError(f"ceiling worker failed to start (exit {proc.wait()})")
        start_at = repr(time.time() + 0.5)
        for proc in procs:
            proc.stdin.write(start_at + "\n")
            proc.stdin.flush()
        rates = []
        for proc in procs:
            out, _ = proc.communicate(timeout=window_s + 120)
            if proc.returncode != 0:
                raise RuntimeError(f"ceiling worker exited with {proc.returncode}")
            rates.append(float(out.strip().splitlines()[-1]))
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
    return sum(rates)
