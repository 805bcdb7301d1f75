"""Aggregation against this machine's copy bandwidth (aggregation is memory bound: that is its roofline)."""

from __future__ import annotations

import statistics
import time
from typing import Any

import torch

from jobs.throughput.analysis import aggregation_traffic_bytes
from memshard.iet.aggregate import StreamingAverage


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
