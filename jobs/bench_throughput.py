"""The throughput benchmark: what IET-AGC's bookkeeping, the Ray orchestration and aggregation cost.

Issue 8 asks whether the defence is cheap to run, so each part is measured against the
cheapest thing that does the same job, in the same process and the same run:

* ``agc_overhead``: the step time of memshard's :class:`~memshard.iet.proxy.Proxy` loop (AGC skip
  rule, TAA queue mode, memory bank, per-sample statistics) against a minimal plain diffusers
  loop of the same UNet, optimizer (Adam, grad clip, LR warm-up, EMA), batch and device. The
  arms are timed in interleaved repetitions (A B C .. then .. C B A, so slow drift from other
  load cancels) and compared by their medians. Proxy arms with AGC off and with AGC but no
  TAA (and the full IET-AGC+ proxy, threshold skipping included) split the overhead up.
* ``orchestration_overhead``: a small real run on a local Ray cluster (``memshard.runtime.driver.train``
  on the demo preset), read back from RUN/run.json: per round, 1 - max_shards(train_s) /
  round_s, the share of a round not spent training. Round 1 includes actor start-up and is
  left out of the median. The round is broken down from the run directory's file times
  (proxy checkpoints, aggregated weights, statistics) and the driver's ``on_round`` call.
* ``aggregation``: :class:`~memshard.iet.aggregate.StreamingAverage` over K=4 synthetic state dicts
  against this machine's copy bandwidth (``torch.clone`` of a large tensor): aggregation is
  memory bound, so that is its roofline.

Sizes: ``--tiny`` (the test's, seconds), ``--quick`` (a few minutes on 2 CPU cores) and the
default full size (larger models, longer rounds, an 860M-parameter state = Stable Diffusion's
UNet, CUDA for the step timing when there is a GPU).

    OMP_NUM_THREADS=1 python jobs/bench_throughput.py --quick --json /tmp/throughput.json
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

# run as a script (python jobs/bench_throughput.py): the checkout's memshard, installed or not
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from memshard.config import MemshardConfig, load_config
from memshard.iet.aggregate import StreamingAverage
from memshard.iet.proxy import Proxy, ShardData, batch_order
from memshard.models.unet import build_scheduler, build_unet
from memshard.runtime.machine import device_info

BASE_PRESET = "demo"
PARTS = ("agc", "flops", "orchestration", "scaling", "aggregation", "sampling", "knn")


@dataclass(frozen=True)
class StepCase:
    """One model/batch for the step-time comparison."""

    name: str
    overrides: tuple[str, ...]  # on top of the demo preset (model, image size, channels, batch)
    steps: int  # optimizer steps per timed repetition (one proxy round)
    reps: int  # timed repetitions per arm (after one untimed warm-up each)
    samples: int = 256  # synthetic shard size


@dataclass(frozen=True)
class Size:
    """A benchmark size: step-time cases, the Ray run, the aggregation."""

    cases: tuple[StepCase, ...]
    ray_overrides: tuple[str, ...]
    agg_params: int
    agg_reps: int
    copy_params: int  # size of the tensor cloned to measure copy bandwidth (capped by agg_params)
    arms: tuple[str, ...] = ("plain", "agc_off", "agc", "agc_taa", "agc_plus")
    cuda_cases: tuple[StepCase, ...] = field(default_factory=tuple)  # replace ``cases`` when running on CUDA
    # on CUDA the fast arm (torch.compile + channels_last) joins: target 1 is its images/s against plain eager.
    # Not on the CPU: torch 2.13's CPU inductor miscompiles this UNet's backward (memshard/compiled.py), so
    # the arm would time the eager fallback after a two-minute compile.
    cuda_arms: tuple[str, ...] = ("plain", "agc_off", "agc", "agc_taa", "agc_plus", "fast")
    scaling_k: tuple[int, ...] = (1, 2)  # shard counts for the scaling runs (the orchestration run is the largest)
    sampling: tuple[int, int, int] = (32, 10, 32)  # (images, DDIM steps, batch) for the sampling throughput
    knn: tuple[int, int, int] = (2048, 5000, 3072)  # (queries, training images, dims) timed, then extrapolated


TINY_CASE = ("model.preset=tiny", "data.image_size=16", "data.channels=1")


def cifar_case(preset: str, batch: int) -> tuple[str, ...]:
    """Overrides for a UNet preset on CIFAR-shaped images (32x32 RGB) at a batch size."""
    return (f"model.preset={preset}", "data.image_size=32", "data.channels=3", f"train.batch_size={batch}")


SIZES: dict[str, Size] = {
    # the test's size: every code path, numbers meaningless
    "tiny": Size(
        cases=(StepCase("tiny-16px-b8", (*TINY_CASE, "train.batch_size=8"), steps=4, reps=2, samples=32),),
        ray_overrides=(
            "data.limit=48",
            "shards.count=2",
            "train.rounds=3",
            "train.steps_per_round=3",
            "train.batch_size=8",
            "train.warmup_steps=2",
            "resources.cpus_per_shard=0.5",
        ),
        agg_params=1_000_000,
        agg_reps=2,
        copy_params=1_000_000,
        arms=("plain", "agc_off", "agc_taa"),
        sampling=(4, 2, 4),
        knn=(64, 300, 48),
    ),
    # a few minutes on 2 CPU cores: the demo's model and batch
    "quick": Size(
        cases=(StepCase("tiny-16px-b32", (*TINY_CASE, "train.batch_size=32"), steps=12, reps=8),),
        ray_overrides=(
            "data.limit=96",
            "shards.count=2",
            "train.rounds=4",
            "train.steps_per_round=300",  # the spec's round: 100 local epochs of a 48-image shard at batch 16
            "train.batch_size=16",
            "train.warmup_steps=5",
            "resources.cpus_per_shard=0.5",
        ),
        agg_params=50_000_000,
        agg_reps=3,
        copy_params=50_000_000,
    ),
    "full": Size(
        cases=(
            StepCase("tiny-16px-b32", (*TINY_CASE, "train.batch_size=32"), steps=40, reps=9),
            StepCase(
                "small-32px-b32",
                cifar_case("small", 32),
                steps=10,
                reps=5,
            ),
        ),
        cuda_cases=(
            StepCase(
                "small-32px-b128",
                cifar_case("small", 128),
                steps=50,
                reps=9,
                samples=1024,
            ),
            StepCase(
                "ddpm-cifar10-32px-b128",
                cifar_case("ddpm-cifar10", 128),
                steps=30,
                reps=7,
                samples=1024,
            ),
        ),
        # the demo run itself (4 shards x 150 steps of batch 32), one round more for the start-up round
        ray_overrides=("train.rounds=5",),
        scaling_k=(1, 2, 4),
        sampling=(256, 50, 128),
        knn=(8192, 50_000, 3072),
        agg_params=860_000_000,
        agg_reps=3,
        copy_params=250_000_000,
    ),
}

# The arms of the step-time comparison: config switches (None: the plain diffusers loop).
ARMS: dict[str, tuple[str, tuple[str, ...] | None]] = {
    "plain": ("plain diffusers loop (same UNet, Adam, grad clip, LR warm-up, EMA, batch); no AGC/TAA/stats", None),
    "agc_off": ("Proxy, AGC off, TAA off (memory bank and per-sample statistics still kept)", ("agc.enabled=false",)),
    "agc": ("Proxy, AGC on (masked loss), TAA off", ("agc.enabled=true",)),
    "agc_taa": (
        "Proxy, AGC on (masked loss), TAA on (queue mode), statistics",
        ("agc.enabled=true", "taa.enabled=true"),
    ),
    "agc_plus": (
        "Proxy, IET-AGC+ (threshold skipping before backward, TAA queue mode)",
        ("agc.enabled=true", "taa.enabled=true", "agc.decide_before_backward=true"),
    ),
}
ARMS["fast"] = (
    "Proxy as agc_taa, torch.compile (verified against eager on the first batch) + channels_last",
    ("agc.enabled=true", "taa.enabled=true", "train.compile=true", "train.channels_last=true"),
)
HEADLINE = ("agc_taa", "plain")
FAST = ("fast", "plain")  # target 1: the shard actor's step against the plain eager loop

# Dense bf16 tensor-core peaks (FLOP/s, SXM parts, no sparsity) for MFU; other devices report FLOP/s only.
PEAK_BF16_FLOPS = {"H100": 989.4e12, "H200": 989.4e12, "A100": 312e12}

# What a 65,536 x 50,000 nearest-neighbour search of 32x32x3 images is (issue 8, item 6).
KNN_TARGET = (65_536, 50_000, 3072)


# --------------------------------------------------------------------------- pure helpers


def overhead(t_method: Sequence[float], t_plain: Sequence[float]) -> dict[str, float]:
    """Overhead of one arm over another from their repetition timings, by medians.

    Medians, not means: one repetition slowed by another process must not move the result.
    ``median_paired_ratio`` (the median of per-repetition ratios) is reported beside the ratio
    of medians; with interleaved repetitions both should agree, and a gap says the machine was
    noisy.
    """
    if not t_method or not t_plain:
        raise ValueError("overhead needs at least one timing per arm")
    a, b = statistics.median(t_method), statistics.median(t_plain)
    if b <= 0:
        raise ValueError(f"plain step time must be positive, got {b}")
    paired = [x / y for x, y in zip(t_method, t_plain, strict=False) if y > 0]
    return {
        "t_method_s": a,
        "t_plain_s": b,
        "ratio": a / b,
        "overhead_fraction": (a - b) / b,
        "median_paired_ratio": statistics.median(paired) if paired else float("nan"),
    }


def interleaved_order(arms: Sequence[str], rep: int) -> list[str]:
    """A B C on even repetitions, C B A on odd ones: a linear drift in machine speed cancels in pairs."""
    return list(arms) if rep % 2 == 0 else list(reversed(arms))


def orchestration_rounds(manifest: dict[str, Any], marks: dict[int, dict[str, float]] | None = None) -> dict[str, Any]:
    """Per round, the share of round time not spent training: 1 - max_shards(train_s) / round_s.

    The slowest shard is what the round waits for, so max over shards. Round 1 includes actor
    start-up (the proxies are built then), so it is reported but left out of the median.
    ``marks`` (round -> offsets in s from the round's start, from :func:`round_marks`) adds the
    breakdown the summary itself does not carry.
    """
    rows = []
    for s in manifest["rounds"]:
        r = int(s["round"])
        train_max = max(float(sh["train_s"]) for sh in s["shards"])
        round_s = float(s["round_s"])
        row: dict[str, Any] = {
            "round": r,
            "round_s": round_s,
            "train_s_max": train_max,
            "train_s_min": min(float(sh["train_s"]) for sh in s["shards"]),
            "overhead_fraction": 1.0 - train_max / round_s if round_s > 0 else float("nan"),
        }
        m = (marks or {}).get(r)
        if m:
            row.update({k: v for k, v in m.items() if v is not None})
            if m.get("proxies_saved_at_s") is not None and m.get("aggregated_at_s") is not None:
                row["aggregation_tail_s"] = m["aggregated_at_s"] - m["proxies_saved_at_s"]
            if m.get("served_at_s") is not None:
                row["commit_publish_s"] = m["served_at_s"] - round_s
                row["overhead_fraction_wall"] = 1.0 - train_max / m["served_at_s"]
        rows.append(row)
    later = [row for row in rows if row["round"] > 1]

    def med(key: str) -> float | None:
        vals = [row[key] for row in later if key in row]
        return statistics.median(vals) if vals else None

    return {
        "rounds": rows,
        "overhead_fraction_median": med("overhead_fraction"),
        "overhead_fraction_wall_median": med("overhead_fraction_wall"),
        "round_s_median": med("round_s"),
        "train_s_max_median": med("train_s_max"),
        "aggregation_tail_s_median": med("aggregation_tail_s"),
        "commit_publish_s_median": med("commit_publish_s"),
        "rounds_in_median": [row["round"] for row in later],
    }


def round_marks(run_dir: str, served_at: dict[int, float]) -> dict[int, dict[str, float | None]]:
    """When each part of a round finished, in seconds from the round's start, from file times.

    The summary has no aggregation or commit times, and adding them would change the driver,
    so they are read off what the round leaves behind: the last proxy checkpoint written
    (training + state save), the aggregated weights (aggregation), the coordinator's statistics.
    A round starts right after the previous round's ``on_round`` call (``served_at``: wall
    clock), so only rounds >= 2 get marks. Local run directories only (file mtimes).
    """
    out: dict[int, dict[str, float | None]] = {}

    def mtime(*paths: str) -> float | None:
        times = [os.path.getmtime(p) for p in paths if os.path.exists(p)]
        return max(times) if times else None

    for r in sorted(served_at):
        if r - 1 not in served_at:
            continue
        start = served_at[r - 1]
        base = os.path.join(run_dir, "rounds", f"{r:04d}")
        proxies = os.path.join(base, "proxies")
        proxy_files = [os.path.join(proxies, f) for f in os.listdir(proxies)] if os.path.isdir(proxies) else []

        def rel(t: float | None, start: float = start) -> float | None:
            return None if t is None else t - start

        out[r] = {
            "proxies_saved_at_s": rel(mtime(*proxy_files)),
            "aggregated_at_s": rel(
                mtime(os.path.join(base, "global.safetensors"), os.path.join(base, "ema.safetensors"))
            ),
            "stats_written_at_s": rel(mtime(os.path.join(run_dir, "stats", f"round-{r:04d}.parquet"))),
            "served_at_s": served_at[r] - start,
        }
    return out


def aggregation_traffic_bytes(params: int, k: int, elem: int = 4) -> int:
    """Bytes StreamingAverage reads and writes for K fp32 states of ``params`` elements.

    Each add reads the proxy and the accumulator and writes the accumulator (3 passes); the
    result reads the accumulator and writes the average (2 passes).
    """
    return (3 * k + 2) * params * elem


def peak_flops(device_name: str | None) -> float | None:
    """The bf16 dense peak of a known GPU, by name (None: unknown device, no MFU)."""
    for key, peak in PEAK_BF16_FLOPS.items():
        if device_name and key in device_name:
            return peak
    return None


def round_throughput(manifest: dict[str, Any], batch_size: int) -> dict[str, Any]:
    """Images/s of whole rounds (all shards' steps x batch / round_s); median over rounds >= 2."""
    rows = [
        {
            "round": int(s["round"]),
            "images_per_s": sum(int(sh["steps"]) for sh in s["shards"]) * batch_size / s["round_s"],
        }
        for s in manifest["rounds"]
    ]
    later = [r["images_per_s"] for r in rows if r["round"] > 1]
    return {"rounds": rows, "images_per_s_median": statistics.median(later) if later else None}


def scaling_efficiency(images_per_s: dict[int, float]) -> dict[int, float]:
    """Round throughput with K shards over K times the one-shard throughput."""
    if 1 not in images_per_s:
        raise ValueError("scaling needs the one-shard run")
    return {k: v / (k * images_per_s[1]) for k, v in sorted(images_per_s.items())}


def data_path(manifest: dict[str, Any]) -> dict[str, Any]:
    """Per round, the slowest shard's time getting its rows onto the device, as a share of its train_s.

    The step loop indexes a shard that is already decoded and resident on the device
    (augmentation runs there too), so this load is the only time the device waits for data:
    the 'idle fraction' of issue 8, item 5. Round 1 decodes every row; later rounds only the
    rows that migrated in (decoded rows are cached per actor).
    """
    rows = []
    for s in manifest["rounds"]:
        shards = [sh for sh in s["shards"] if sh.get("data_s") is not None]
        if not shards:
            continue
        worst = max(shards, key=lambda sh: float(sh["data_s"]) / max(float(sh["train_s"]), 1e-9))
        rows.append(
            {
                "round": int(s["round"]),
                "data_s_max": max(float(sh["data_s"]) for sh in shards),
                "idle_fraction": float(worst["data_s"]) / max(float(worst["train_s"]), 1e-9),
            }
        )
    later = [r["idle_fraction"] for r in rows if r["round"] > 1]
    first = [r["idle_fraction"] for r in rows if r["round"] == 1]
    return {
        "rounds": rows,
        "idle_fraction_median": statistics.median(later) if later else None,
        "idle_fraction_first_round": first[0] if first else None,
    }


def project_round(
    state_bytes: int, k: int, train_s: float, net_GBps: float, agg_GBps: float, states: int = 2
) -> dict[str, float]:
    """A paper projection of one round on K nodes, one shard per node, the aggregation on one of them.

    Per round each proxy ships ``states`` (raw + EMA) state dicts to the aggregating node (its NIC
    takes K-1 of them: incast), the average is computed at the measured aggregation traffic rate
    ((3K+2) passes per element), and the result is pulled back by the K-1 other nodes from the
    node that holds it (Ray transfers objects point to point, so that node's NIC sends K-1 copies).
    """
    gather = (k - 1) * states * state_bytes / (net_GBps * 1e9)
    aggregate = states * aggregation_traffic_bytes(state_bytes // 4, k) / (agg_GBps * 1e9)
    broadcast = (k - 1) * states * state_bytes / (net_GBps * 1e9)
    overhead = gather + aggregate + broadcast
    return {
        "min_train_s_for_3pct": overhead * 0.97 / 0.03,  # a round this long keeps the fixed cost at 3%
        "k": k,
        "gather_s": gather,
        "aggregate_s": aggregate,
        "broadcast_s": broadcast,
        "overhead_s": overhead,
        "train_s": train_s,
        "overhead_fraction": overhead / (overhead + train_s),
        "efficiency": train_s / (overhead + train_s),
    }


SD_UNET_PARAMS = 859_520_964  # Stable Diffusion 1.x UNet2DConditionModel
NIC_GBPS = {"100GbE": 12.5, "400Gb InfiniBand": 50.0}


def projection(agg_traffic_GBps: float, ks: Sequence[int] = (2, 4, 8, 16, 32)) -> dict[str, Any]:
    """Per-round fixed cost of an SD-sized run on K nodes, at this machine's aggregation rate (paper sizing)."""
    state = SD_UNET_PARAMS * 4
    return {
        "state_bytes": state,
        "agg_traffic_GBps": agg_traffic_GBps,
        "nics": {
            nic: [project_round(state, k, 0.0, gbps, agg_traffic_GBps) for k in ks] for nic, gbps in NIC_GBPS.items()
        },
        "definition": "project_round with train_s = 0: overhead_s per round (raw + EMA fp32 states gathered to one "
        "node, averaged at the measured aggregation traffic rate, pulled back by the other nodes); "
        "min_train_s_for_3pct = the round length at which that is 3%.",
    }


def reference_flops(presets: Sequence[str] = ("ddpm-cifar10", "small"), batch: int = 128) -> dict[str, Any]:
    """Counted FLOPs per image of a training step for the GPU reference configs (meta tensors: no compute)."""
    out: dict[str, Any] = {}
    for preset in presets:
        flops, params = step_flops(load_config(BASE_PRESET, list(cifar_case(preset, batch))), torch.device("meta"))
        per_image = flops / batch
        out[preset] = {
            "params": params,
            "flops_per_image": per_image,
            # issue 8's reference rates for the plain loop on an H100 (eager bf16 / compiled) and the 2x target
            "h100_mfu_at": {str(r): r * per_image / PEAK_BF16_FLOPS["H100"] for r in (1850, 2300, 3700)},
        }
    return out


# --------------------------------------------------------------------------- step timing


def step_config(case: StepCase, arm: str, device: str) -> MemshardConfig:
    """The demo preset at the case's size with the arm's switches (method unset: switches one by one)."""
    switches = ARMS[arm][1] or ("agc.enabled=false",)
    return load_config(
        BASE_PRESET,
        [
            *case.overrides,
            "method=null",
            "msr.enabled=false",
            "taa.enabled=false",
            "agc.decide_before_backward=false",
            "shards.count=1",
            f"train.device={device}",
            "train.warmup_steps=10",
            "logging.progress=false",
            *switches,
        ],
    )


def synthetic_shard(cfg: MemshardConfig, n: int, device: torch.device) -> ShardData:
    """Random uint8 images with labels: step time does not depend on the pixels."""
    g = torch.Generator().manual_seed(1234)
    c, s = cfg.data.channels, cfg.data.image_size
    images = torch.randint(0, 256, (n, c, s, s), generator=g, dtype=torch.uint8)
    labels = torch.randint(0, max(cfg.data.num_classes or 1, 1), (n,), generator=g)
    return ShardData(ids=np.arange(n, dtype=np.int64), images=images.to(device), labels=labels.to(device))


class PlainLoop:
    """A minimal diffusers training loop: what training costs with none of memshard's bookkeeping.

    The same UNet (built from the same config and seed), optimizer and hyper-parameters, EMA
    update, LR warm-up, batch order and autocast as the proxy, and diffusers' own
    ``add_noise``; no memory bank, skip mask, per-sample statistics, TAA or non-finite checks.
    """

    def __init__(self, cfg: MemshardConfig, device: torch.device) -> None:
        self.cfg = cfg
        self.device = device
        torch.manual_seed(cfg.seed)
        self.unet = build_unet(cfg).to(device)
        self.unet.train()
        self.sched = build_scheduler(cfg)
        opt_cls = torch.optim.AdamW if cfg.train.optimizer == "adamw" else torch.optim.Adam
        kwargs: dict[str, Any] = {
            "lr": cfg.train.lr,
            "betas": cfg.train.betas,
            "eps": cfg.train.eps,
            "weight_decay": cfg.train.weight_decay,
        }
        if device.type == "cuda":
            kwargs["fused"] = True
        self.optimizer = opt_cls([p for p in self.unet.parameters() if p.requires_grad], **kwargs)
        self.ema = {k: v.detach().clone() for k, v in self.unet.state_dict().items()} if cfg.train.ema else None
        mp = cfg.train.mixed_precision
        self.amp = None if device.type != "cuda" or mp == "no" else (torch.float16 if mp == "fp16" else torch.bfloat16)
        self.scaler = torch.amp.GradScaler("cuda") if self.amp == torch.float16 else None
        self.step = 0

    def train_round(self, round_id: int, data: ShardData, steps: int) -> None:
        cfg = self.cfg
        order = torch.from_numpy(
            batch_order(len(data), steps, cfg.train.batch_size, np.random.default_rng(round_id))
        ).to(self.device)
        gen = torch.Generator(device=self.device).manual_seed(round_id)
        warmup = cfg.train.warmup_steps or 0
        for i in range(steps):
            idx = order[i]
            x0 = data.x0(idx)
            labels = data.labels[idx] if (data.labels is not None and cfg.model.class_conditional) else None
            t = torch.randint(0, cfg.model.num_train_timesteps, (idx.numel(),), generator=gen, device=self.device)
            noise = torch.randn(x0.shape, generator=gen, device=self.device)
            xt = self.sched.add_noise(x0, noise, t)
            target = noise if cfg.model.prediction_type == "epsilon" else self.sched.get_velocity(x0, noise, t)
            for group in self.optimizer.param_groups:
                group["lr"] = cfg.train.lr * (min(1.0, (self.step + 1) / warmup) if warmup > 0 else 1.0)
            self.optimizer.zero_grad(set_to_none=True)
            with torch.autocast(self.device.type, dtype=self.amp, enabled=self.amp is not None):
                pred = self.unet(xt, t, class_labels=labels).sample
            loss = torch.nn.functional.mse_loss(pred.float(), target.float())
            if self.scaler is not None:
                self.scaler.scale(loss).backward()
                self.scaler.unscale_(self.optimizer)
            else:
                loss.backward()
            if cfg.train.grad_clip is not None:
                torch.nn.utils.clip_grad_norm_(self.unet.parameters(), cfg.train.grad_clip)
            if self.scaler is not None:
                self.scaler.step(self.optimizer)
                self.scaler.update()
            else:
                self.optimizer.step()
            if self.ema is not None:
                with torch.no_grad():
                    state = self.unet.state_dict()
                    pairs = [(self.ema[k], v.detach()) for k, v in state.items() if v.is_floating_point()]
                    torch._foreach_lerp_([e for e, _ in pairs], [v for _, v in pairs], 1.0 - cfg.train.ema_decay)
            self.step += 1
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


def step_flops(cfg: MemshardConfig, device: torch.device) -> tuple[int, int]:
    """(FLOPs, parameters) of one training step's forward + backward of the UNet (counted, not estimated).

    On the ``meta`` device nothing is computed: the count of an SD- or CIFAR-sized step costs nothing.
    """
    from torch.utils.flop_counter import FlopCounterMode

    unet = build_unet(cfg).to(device)
    b, c, hw = cfg.train.batch_size, cfg.data.channels, cfg.data.image_size
    x = torch.randn(b, c, hw, hw, device=device)
    t = torch.randint(0, cfg.model.num_train_timesteps, (b,), device=device)
    labels = torch.zeros(b, dtype=torch.long, device=device) if cfg.model.class_conditional else None
    with FlopCounterMode(display=False) as counter:
        unet(x, t, class_labels=labels).sample.float().square().mean().backward()
    return int(counter.get_total_flops()), sum(p.numel() for p in unet.parameters())


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def arm_runner(case: StepCase, arm: str, device: torch.device) -> tuple[Proxy | PlainLoop, ShardData]:
    """The loop an arm times (the plain diffusers loop or a configured proxy) and its synthetic shard."""
    cfg = step_config(case, arm, device.type)
    runner = PlainLoop(cfg, device) if ARMS[arm][1] is None else Proxy(cfg, 0, device)
    return runner, synthetic_shard(cfg, case.samples, device)


def _run_round(runner: Proxy | PlainLoop, round_id: int, data: ShardData, steps: int) -> Any:
    """One round of either kind of loop; the proxy's RoundResult (None for the plain loop)."""
    if isinstance(runner, Proxy):
        return runner.train_round(round_id, data, steps=steps)
    runner.train_round(round_id, data, steps)
    return None


def profile_arms(case: StepCase, arms: Sequence[str], device: torch.device, top: int = 12) -> dict[str, Any]:
    """Where the method's extra step time goes: self time per op, method arm minus plain (torch.profiler).

    One warm round per arm, then one profiled round. The rows with the largest positive
    difference are the bookkeeping the method adds (or noise in shared kernels, which shows as
    both signs).
    """
    from torch.profiler import ProfilerActivity, profile

    per_arm: dict[str, dict[str, float]] = {}
    for arm in arms:
        runner, data = arm_runner(case, arm, device)
        _run_round(runner, 1, data, case.steps)
        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
        with profile(activities=acts) as prof:
            _run_round(runner, 2, data, case.steps)
            _sync(device)
        attr = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
        per_arm[arm] = {e.key: getattr(e, attr) / 1e3 / case.steps for e in prof.key_averages()}  # ms per step
    base, method = per_arm[arms[0]], per_arm[arms[-1]]
    diff = {k: method.get(k, 0.0) - base.get(k, 0.0) for k in set(base) | set(method)}
    rows = sorted(diff.items(), key=lambda kv: -kv[1])[:top]
    only = sorted(((k, v) for k, v in method.items() if k not in base), key=lambda kv: -kv[1])
    return {
        "arms": list(arms),
        "total_ms_per_step": {a: sum(v.values()) for a, v in per_arm.items()},
        # ops the plain loop never calls: the bookkeeping itself, whatever the noise in shared kernels
        "only_in_method_ms_per_step": sum(v for _, v in only),
        "only_in_method_top": [{"op": k, "ms": v} for k, v in only[:top]],
        "top_extra_ms_per_step": [{"op": k, "extra_ms": v, "method_ms": method.get(k, 0.0)} for k, v in rows],
        "definition": f"self {'device' if device.type == 'cuda' else 'CPU'} time per op and step, "
        f"{arms[-1]} minus {arms[0]}, one profiled round of {case.steps} steps each.",
    }


def bench_steps(case: StepCase, arms: Sequence[str], device: torch.device) -> dict[str, Any]:
    """Interleaved repetitions of one proxy round (``case.steps`` steps) per arm; medians per step."""
    runners: dict[str, Any] = {}
    datas: dict[str, ShardData] = {}
    for arm in arms:
        runners[arm], datas[arm] = arm_runner(case, arm, device)
    flops, params = step_flops(step_config(case, arms[0], device.type), device)
    times: dict[str, list[float]] = {a: [] for a in arms}
    skip_rates: dict[str, list[float]] = {a: [] for a in arms}
    for rep in range(-1, case.reps):  # rep -1: untimed warm-up (allocator, autotuning, a filled memory bank)
        for arm in interleaved_order(arms, max(rep, 0)):
            runner, data = runners[arm], datas[arm]
            _sync(device)
            t0 = time.perf_counter()
            res = _run_round(runner, rep + 2, data, case.steps)
            _sync(device)
            dt = (time.perf_counter() - t0) / case.steps
            if rep >= 0:
                times[arm].append(dt)
                if res is not None:
                    skip_rates[arm].append(res.skip_rate)
    cfg0 = step_config(case, arms[0], device.type)
    peak = peak_flops(torch.cuda.get_device_name(device) if device.type == "cuda" else None)
    out: dict[str, Any] = {
        "case": case.name,
        "device": str(device),
        "params": params,
        "batch_size": cfg0.train.batch_size,
        "image_size": cfg0.data.image_size,
        "channels": cfg0.data.channels,
        "steps_per_rep": case.steps,
        "reps": case.reps,
        "autocast": None if device.type != "cuda" else cfg0.train.mixed_precision,
        "arms": {
            a: {
                "what": ARMS[a][0],
                "step_s_median": statistics.median(times[a]),
                "step_s": times[a],
                "skip_rate_median": statistics.median(skip_rates[a]) if skip_rates[a] else None,
                "images_per_s": cfg0.train.batch_size / statistics.median(times[a]),
                "achieved_flops": flops / statistics.median(times[a]),
                "mfu": flops / statistics.median(times[a]) / peak if peak else None,
                "compile": runners[a].model.status if isinstance(runners[a], Proxy) else "off",
            }
            for a in arms
        },
        "flops_per_step": flops,
        "peak_flops": peak,
        "flops_definition": "forward + backward of the UNet at this batch, counted by torch.utils.flop_counter "
        "(matmuls and convolutions; AGC's no-grad forward and element-wise work not counted); MFU = achieved / the "
        "device's dense bf16 peak.",
        "vs_plain": {a: overhead(times[a], times["plain"]) for a in arms if a != "plain" and "plain" in arms},
    }
    if "agc_off" in arms:
        out["vs_agc_off"] = {a: overhead(times[a], times["agc_off"]) for a in arms if a not in ("plain", "agc_off")}
    return out


# --------------------------------------------------------------------------- orchestration


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

    cmd = [sys.executable, os.path.abspath(__file__), CEILING_FLAG, case.name, repr(window_s)]
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


# --------------------------------------------------------------------------- sampling and search


def bench_sampling(size: Size, device: torch.device) -> dict[str, Any]:
    """Batched DDIM sampling throughput (item 6) against one image at a time, same UNet and steps."""
    from memshard.models.sampling import ddim_sample

    num, steps, batch = size.sampling
    cfg = load_config(BASE_PRESET, list(TINY_CASE if device.type == "cpu" else cifar_case("small", batch)))
    torch.manual_seed(0)
    unet = build_unet(cfg).to(device)
    sched = dict(build_scheduler(cfg).config)
    ddim_sample(unet, sched, min(batch, num), steps=2, batch_size=batch, device=device)  # warm-up
    out: dict[str, Any] = {"images": num, "steps": steps, "image_size": cfg.data.image_size, "model": cfg.model.preset}
    for label, b, n in (("batched", batch, num), ("one_at_a_time", 1, max(2, num // 8))):
        with torch.inference_mode():
            _sync(device)
            t0 = time.perf_counter()
            ddim_sample(unet, sched, n, steps=steps, batch_size=b, device=device)
            _sync(device)
        dt = time.perf_counter() - t0
        out[label] = {"batch": b, "images": n, "time_s": dt, "images_per_s": n / dt}
    out["batching_speedup"] = out["batched"]["images_per_s"] / out["one_at_a_time"]["images_per_s"]
    return out


def bench_knn(size: Size, device: torch.device) -> dict[str, Any]:
    """Exact k-NN (the memorization metric's search) on a slice, extrapolated to 65,536 x 50,000.

    The blocked search is a matrix product plus a top-k merge per block, so its time grows
    with Q x N at a fixed D; the slice is timed and scaled by (65,536 x 50,000) / (Q x N).
    """
    from memshard.evaluation.metrics.neighbours import topk_neighbours

    q, n, d = size.knn
    g = torch.Generator().manual_seed(0)
    queries, train = torch.rand(q, d, generator=g), torch.rand(n, d, generator=g)
    if device.type == "cuda":
        queries = queries.to(device)
    topk_neighbours(queries[: min(q, 64)], train[: min(n, 256)], k=min(50, n // 8), device=device)  # warm-up
    _sync(device)
    t0 = time.perf_counter()
    topk_neighbours(queries, train, k=min(50, n), device=device)
    _sync(device)
    dt = time.perf_counter() - t0
    tq, tn, td = KNN_TARGET
    scale = (tq * tn) / (q * n) * (td / d)
    return {
        "queries": q,
        "train": n,
        "dims": d,
        "k": min(50, n),
        "time_s": dt,
        "gflops": 2 * q * n * d / dt / 1e9,
        "target": {"queries": tq, "train": tn, "dims": td},
        "extrapolated_time_s": dt * scale,
        "definition": "time of topk_neighbours (exact, blocked, squared Euclidean, k=50) on random rows; "
        "extrapolated_time_s = time x (65,536 x 50,000 x 3072) / (Q x N x D), i.e. at this slice's FLOP rate.",
    }


# --------------------------------------------------------------------------- aggregation


def synthetic_state(params: int, seed: int, width: int = 1024) -> dict[str, torch.Tensor]:
    """A state dict of about ``params`` fp32 elements in UNet-like pieces (width^2 weights + biases/norms)."""
    g = torch.Generator().manual_seed(seed)
    state: dict[str, torch.Tensor] = {}
    left, i = params, 0
    while left > 0:
        n = min(width * width, left)
        state[f"layer{i}.weight"] = torch.randn(n, generator=g)
        left -= n
        if left >= 2 * width:
            state[f"layer{i}.bias"] = torch.randn(width, generator=g)
            state[f"layer{i}.norm"] = torch.randn(width, generator=g)
            left -= 2 * width
        i += 1
    return state


def mem_available_bytes() -> int:
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 8 << 30


def copy_bandwidth(params: int, reps: int) -> dict[str, float]:
    """This machine's copy bandwidth on one large fp32 tensor, medians of ``reps``.

    Two figures: ``copy_`` into a preallocated tensor (pure memcpy: the roofline the
    aggregation's fractions use) and ``torch.clone`` (memcpy into fresh memory, so it also pays
    the kernel's page faults, which at these sizes can cost more than the copy itself).
    Bandwidths count bytes read plus written (``traffic``) and bytes copied (``copy``/``clone``).
    """
    x = torch.randn(params)
    y = torch.empty_like(x)
    y.copy_(x)  # fault the destination in once
    copy_t, clone_t = [], []
    for _ in range(reps + 1):
        t0 = time.perf_counter()
        y.copy_(x)
        copy_t.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        z = x.clone()
        clone_t.append(time.perf_counter() - t0)
        del z
    tc, tk = statistics.median(copy_t[1:]), statistics.median(clone_t[1:])
    nbytes = params * 4
    return {
        "bytes": nbytes,
        "copy_s": tc,
        "copy_GBps": nbytes / tc / 1e9,
        "traffic_GBps": 2 * nbytes / tc / 1e9,
        "clone_s": tk,
        "clone_GBps": nbytes / tk / 1e9,
        "clone_traffic_GBps": 2 * nbytes / tk / 1e9,
    }


def bench_aggregation(params: int, k: int, reps: int, copy_params: int) -> dict[str, Any]:
    """StreamingAverage over K synthetic states (the aggregation task's work for one of raw/EMA)."""
    need_distinct = (k + 2) * params * 4
    need_reused = 3 * params * 4 + 2 * min(copy_params, params) * 4
    avail = mem_available_bytes()
    scaled_from = None
    if need_reused > 0.7 * avail:  # not even one input fits with the accumulator: scale down, say so
        scaled_from, params = params, int(0.7 * avail / 20)
    distinct = (k + 2) * params * 4 <= 0.6 * avail
    states = [synthetic_state(params, seed=i) for i in range(k if distinct else 1)]
    weights = [100.0 + i for i in range(k)]
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        avg = StreamingAverage()
        for i in range(k):
            avg.add(states[i % len(states)], weights[i])
        out = avg.result()
        times.append(time.perf_counter() - t0)
        del out, avg
    del states
    copy = copy_bandwidth(min(copy_params, params), reps)
    t = statistics.median(times)
    traffic = aggregation_traffic_bytes(params, k)
    res = {
        "params": params,
        "k": k,
        "reps": reps,
        "dtype": "float32",
        "distinct_inputs": distinct,
        "time_s": t,
        "time_s_all": times,
        "input_GBps": k * params * 4 / t / 1e9,
        "traffic_GBps": traffic / t / 1e9,
        "copy": copy,
        "fraction_of_copy_bandwidth": (traffic / t) / (copy["traffic_GBps"] * 1e9),
        "fraction_of_clone_bandwidth": (traffic / t) / (copy["clone_traffic_GBps"] * 1e9),
        "definition": "input_GBps = K*params*4 B / time; traffic_GBps counts every byte read and written "
        "((3K+2)*params*4 B); fraction_of_copy_bandwidth = traffic_GBps / the read+write GBps of copy_ into a "
        "preallocated tensor (fraction_of_clone_bandwidth: of torch.clone, which also page-faults fresh memory, as the "
        "aggregation's accumulators do). A real round "
        "averages two such states per proxy (raw and EMA) on the CPU, so it costs about twice time_s.",
        "need_bytes_distinct": need_distinct,
        "mem_available_bytes": avail,
        "threads": torch.get_num_threads(),
    }
    if not distinct:
        res["note"] = f"one input state reused for all K (K distinct states of {params:,} params do not fit in memory)"
    if scaled_from is not None:
        res["scaled_down_from_params"] = scaled_from
    return res


# --------------------------------------------------------------------------- report


def table(res: dict[str, Any]) -> str:
    """The compact human-readable summary printed at the end."""
    lines = []
    for case in res.get("agc_overhead_cases", []):
        lines.append(
            f"step time  {case['case']} ({case['params'] / 1e6:.2f}M params, {case['device']}, "
            f"{case['reps']} reps x {case['steps_per_rep']} steps)"
        )
        lines.append(f"  {'arm':<10} {'ms/step':>9} {'vs plain':>9} {'skip':>6}")
        for arm, a in case["arms"].items():
            vs = case["vs_plain"].get(arm)
            vs_s = f"{vs['overhead_fraction']:+.1%}" if vs else "-"
            skip = a["skip_rate_median"]
            skip_s = f"{skip:.0%}" if skip is not None else "-"
            lines.append(f"  {arm:<10} {a['step_s_median'] * 1e3:>9.2f} {vs_s:>9} {skip_s:>6}")
    o = res.get("orchestration_overhead")
    if o:
        lines.append(
            f"orchestration ({o['config']['shards']} shards x {o['config']['steps_per_round']} steps/round, "
            f"batch {o['config']['batch_size']}; upper bound)"
        )
        lines.append(
            f"  {'round':>5} {'round_s':>8} {'train_max':>9} {'overhead':>8} {'agg_tail':>8} {'commit+pub':>10}"
        )
        for row in o["rounds"]:

            def f(key: str, row: dict = row) -> str:
                return f"{row[key]:.3f}" if row.get(key) is not None else "-"

            lines.append(
                f"  {row['round']:>5} {row['round_s']:>8.3f} {row['train_s_max']:>9.3f} "
                f"{row['overhead_fraction']:>8.1%} {f('aggregation_tail_s'):>8} {f('commit_publish_s'):>10}"
            )
        med = o["overhead_fraction_median"]
        lines.append(f"  median (rounds >= 2): {med:.1%}" if med is not None else "  median: -")
    a = res.get("aggregation")
    if a:
        lines.append(
            f"aggregation  K={a['k']} x {a['params'] / 1e6:.0f}M params: {a['time_s']:.3f} s, "
            f"{a['input_GBps']:.2f} GB/s of states, {a['traffic_GBps']:.2f} GB/s traffic = "
            f"{a['fraction_of_copy_bandwidth']:.0%} of copy_ ({a['copy']['traffic_GBps']:.2f} GB/s), "
            f"{a['fraction_of_clone_bandwidth']:.0%} of clone ({a['copy']['clone_traffic_GBps']:.2f} GB/s)"
        )
    for f in res.get("fast_vs_plain", []):
        mfu = f" (MFU {f['mfu']:.1%} vs {f['plain_mfu']:.1%})" if f["mfu"] is not None else ""
        lines.append(
            f"fast step  {f['case']}: {f['images_per_s']:.0f} vs {f['plain_images_per_s']:.0f} img/s plain eager = "
            f"x{f['speedup']:.2f}{mfu}; compile {f['compile'][:60]}"
        )
    dp = res.get("data_path")
    if dp and dp["idle_fraction_median"] is not None:
        lines.append(
            f"data path  device idle for data: {dp['idle_fraction_median']:.2%} of train time (rounds >= 2), "
            f"{dp['idle_fraction_first_round']:.1%} in round 1 (cold decode)"
        )
    sc = res.get("scaling")
    if sc:
        parts_s = ", ".join(
            f"K={k}: {sc['images_per_s'][k]:.0f} img/s (eff. {sc['efficiency'][k]:.0%})" for k in sc["k"]
        )
        lines.append(f"scaling    {parts_s} on {sc['workers']}")
        if sc.get("ceiling_images_per_s"):
            ceil = sc["ceiling_images_per_s"]
            cells = ", ".join(
                f"K={k}: x{ceil[k] / ceil[1]:.2f} (eff. vs ceiling {sc['efficiency_vs_ceiling'][k]:.0%})"
                for k in sc["k"]
            )
            lines.append(f"  machine ceiling (K independent plain loops): {cells}")
    sm = res.get("sampling")
    if sm:
        lines.append(
            f"sampling   DDIM {sm['steps']} steps, {sm['model']} {sm['image_size']}px: batch {sm['batched']['batch']} "
            f"{sm['batched']['images_per_s']:.1f} img/s vs one at a time {sm['one_at_a_time']['images_per_s']:.1f} "
            f"(x{sm['batching_speedup']:.1f})"
        )
    kn = res.get("knn")
    if kn:
        lines.append(
            f"k-NN       {kn['queries']}x{kn['train']}x{kn['dims']}: {kn['time_s']:.2f} s "
            f"({kn['gflops']:.0f} GFLOP/s); "
            f"65,536x50,000x3072 extrapolated {kn['extrapolated_time_s']:.0f} s"
        )
    prof = res.get("agc_profile")
    if prof:
        tot = prof["total_ms_per_step"]
        lines.append(
            f"profile    self time ms/step: {', '.join(f'{a} {v:.2f}' for a, v in tot.items())}; largest extra:"
        )
        for row in prof["top_extra_ms_per_step"][:8]:
            lines.append(f"  {row['op']:<40} {row['extra_ms']:+.3f} ms ({row['method_ms']:.3f})")
        lines.append(f"  ops only the method calls: {prof['only_in_method_ms_per_step']:.3f} ms/step in all; largest:")
        for row in prof["only_in_method_top"][:6]:
            lines.append(f"  {row['op']:<40} {row['ms']:.3f} ms")
    pr = res.get("projection")
    if pr:
        for nic, rows in pr["nics"].items():
            cells = ", ".join(f"K={r['k']} {r['overhead_s']:.1f} s" for r in rows)
            lines.append(f"projection SD UNet, {nic}: fixed cost per round {cells}")
    for preset, rf in (res.get("reference_flops") or {}).items():
        mfu = ", ".join(f"{r} img/s {v:.1%}" for r, v in rf["h100_mfu_at"].items())
        lines.append(
            f"flops      {preset} ({rf['params'] / 1e6:.1f}M): {rf['flops_per_image'] / 1e9:.2f} GFLOP/img per step; "
            f"H100 MFU at {mfu}"
        )
    d = res["device"]
    lines.append(f"device  {d['cpu_model']} ({d['cpu_count']} cores), torch {d['torch']}, {d['torch_threads']} threads")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == CEILING_FLAG:
        ceiling_worker(argv[1], float(argv[2]))
        return 0
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sz = ap.add_mutually_exclusive_group()
    sz.add_argument("--quick", action="store_true", help="a few minutes on 2 CPU cores")
    sz.add_argument("--tiny", action="store_true", help="the test's size: seconds, numbers meaningless")
    ap.add_argument("--json", dest="json_path", default=None, help="write the results here")
    ap.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="for the step timing and Ray run")
    ap.add_argument("--parts", default=",".join(PARTS), help=f"comma list of {', '.join(PARTS)}")
    ap.add_argument("--workdir", default=None, help="where the Ray run goes (default: a temporary directory)")
    ap.add_argument("--profile", action="store_true", help="also profile plain vs agc_taa: where the extra time goes")
    args = ap.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    name = "tiny" if args.tiny else "quick" if args.quick else "full"
    size = SIZES[name]
    parts = {p.strip() for p in args.parts.split(",") if p.strip()}
    unknown = parts - set(PARTS)
    if unknown:
        ap.error(f"unknown --parts: {sorted(unknown)}")
    use_cuda = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    device = torch.device("cuda" if use_cuda else "cpu")
    t_start = time.perf_counter()
    res: dict[str, Any] = {"size": name, "command": " ".join([os.path.basename(sys.argv[0]), *argv])}
    res["device"] = device_info(device)

    if "agc" in parts:
        cases = size.cuda_cases if (use_cuda and size.cuda_cases) else size.cases
        arms = size.cuda_arms if use_cuda else size.arms
        res["agc_overhead_cases"] = [bench_steps(c, arms, device) for c in cases]
        head = res["agc_overhead_cases"][0]
        h = head["vs_plain"][HEADLINE[0]]
        res["agc_overhead"] = {
            "case": head["case"],
            "method_arm": HEADLINE[0],
            "method": ARMS[HEADLINE[0]][0],
            "baseline_arm": HEADLINE[1],
            "baseline": ARMS[HEADLINE[1]][0],
            "t_agc_s": h["t_method_s"],
            "t_plain_s": h["t_plain_s"],
            "ratio": h["ratio"],
            "overhead_fraction": h["overhead_fraction"],
            "median_paired_ratio": h["median_paired_ratio"],
            "definition": "overhead_fraction = (t_agc - t_plain) / t_plain, medians of per-step times over "
            "interleaved repetitions (one proxy round each, ABC..CBA order); TAA queue-mode extra steps count as "
            "steps, as in the round's step budget.",
        }
        if args.profile:
            res["agc_profile"] = profile_arms(cases[0], list(HEADLINE[::-1]), device)
        fast = [c for c in res["agc_overhead_cases"] if FAST[0] in c["arms"]]
        if fast:
            res["fast_vs_plain"] = [
                {
                    "case": c["case"],
                    "speedup": c["arms"]["plain"]["step_s_median"] / c["arms"]["fast"]["step_s_median"],
                    "images_per_s": c["arms"]["fast"]["images_per_s"],
                    "plain_images_per_s": c["arms"]["plain"]["images_per_s"],
                    "mfu": c["arms"]["fast"]["mfu"],
                    "plain_mfu": c["arms"]["plain"]["mfu"],
                    "compile": c["arms"]["fast"]["compile"],
                }
                for c in fast
            ]
    workdir = args.workdir or tempfile.mkdtemp(prefix="bench-throughput-")
    try:
        if "orchestration" in parts:
            res["orchestration_overhead"] = bench_orchestration(size, workdir, device)
            res["data_path"] = res["orchestration_overhead"]["data_path"]
        if "scaling" in parts:
            res["scaling"] = bench_scaling(size, workdir, device)
    finally:
        if args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)
    if "aggregation" in parts:
        res["aggregation"] = bench_aggregation(size.agg_params, 4, size.agg_reps, size.copy_params)
    if "aggregation" in parts:
        res["projection"] = projection(res["aggregation"]["traffic_GBps"])
    if "flops" in parts:
        res["reference_flops"] = reference_flops()
    if "sampling" in parts:
        res["sampling"] = bench_sampling(size, device)
    if "knn" in parts:
        res["knn"] = bench_knn(size, device)
    res["total_s"] = time.perf_counter() - t_start
    if args.json_path:
        os.makedirs(os.path.dirname(os.path.abspath(args.json_path)), exist_ok=True)
        with open(args.json_path, "w") as fh:
            json.dump(res, fh, indent=2)
    print(table(res))
    print(f"total {res['total_s']:.0f} s" + (f"; results in {args.json_path}" if args.json_path else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
