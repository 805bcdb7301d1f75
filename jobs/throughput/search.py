"""Sampling and nearest-neighbour search throughput (what an evaluation spends its time on)."""

from __future__ import annotations

import time
from typing import Any

import torch

from jobs.throughput.sizes import BASE_PRESET, KNN_TARGET, TINY_CASE, Size, cifar_case
from jobs.throughput.steps import _sync
from memshard.config import load_config
from memshard.models.unet import build_scheduler, build_unet


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
