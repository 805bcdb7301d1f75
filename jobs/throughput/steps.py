"""Step timing: memshard's proxy loop against a minimal plain diffusers loop of the same UNet and optimizer."""

from __future__ import annotations

import statistics
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from jobs.throughput.analysis import interleaved_order, overhead, peak_flops
from jobs.throughput.sizes import ARMS, BASE_PRESET, PEAK_BF16_FLOPS, StepCase, cifar_case
from memshard.config import MemshardConfig, load_config
from memshard.iet.proxy import Proxy, ShardData, batch_order
from memshard.models.unet import build_scheduler, build_unet


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
