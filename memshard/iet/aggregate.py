"""Aggregation of proxy models into the global model (spec section 1).

theta_bar = sum_i w_i theta_i with w_i = |D_i| / |D|, over the full state dict
(parameters and buffers). Accumulation is in fp32 (or fp64 for fp64 tensors) and the
result is cast back to each entry's dtype, so bf16/fp16 states average without the
rounding drift of summing in half precision. Integer buffers (step counters) are not
averaged: they must agree across proxies, and the first one is kept.

The accumulator is streaming: proxies are added one at a time, so aggregating K
proxies needs one accumulator plus one proxy in memory, never K full copies.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

import torch

StateDict = Mapping[str, torch.Tensor]


def shard_weights(sizes: Sequence[int]) -> list[float]:
    """w_i = |D_i| / |D|. Empty shards get weight 0; all-empty is an error."""
    total = float(sum(sizes))
    if total <= 0:
        raise ValueError("cannot aggregate: every shard is empty")
    return [s / total for s in sizes]


class StreamingAverage:
    """Weighted average of state dicts, fed one at a time."""

    def __init__(self) -> None:
        self._acc: dict[str, torch.Tensor] = {}
        self._dtypes: dict[str, torch.dtype] = {}
        self._total = 0.0
        self._count = 0

    def add(self, state: StateDict, weight: float) -> None:
        if weight < 0:
            raise ValueError("aggregation weights must be non-negative")
        if self._count and set(state) != set(self._acc):
            missing = set(self._acc) ^ set(state)
            raise ValueError(f"state dicts disagree on keys: {sorted(missing)[:5]}")
        for key, value in state.items():
            value = torch.as_tensor(value)
            if not self._count:
                self._dtypes[key] = value.dtype
                if value.is_floating_point():
                    acc_dtype = torch.float64 if value.dtype == torch.float64 else torch.float32
                    self._acc[key] = torch.zeros(value.shape, dtype=acc_dtype, device=value.device)
                else:
                    self._acc[key] = value.clone()
            elif value.shape != self._acc[key].shape:
                raise ValueError(f"{key}: shape {tuple(value.shape)} != {tuple(self._acc[key].shape)}")
            if value.is_floating_point():
                self._acc[key].add_(value.to(self._acc[key].dtype), alpha=weight)
        self._total += weight
        self._count += 1

    def result(self) -> dict[str, torch.Tensor]:
        if not self._count:
            raise ValueError("nothing to aggregate")
        if self._total <= 0:
            raise ValueError("aggregation weights sum to zero")
        out = {}
        for key, acc in self._acc.items():
            if acc.is_floating_point():
                out[key] = (acc / self._total).to(self._dtypes[key])
            else:
                out[key] = acc
        return out


def weighted_average(states: Iterable[StateDict], weights: Sequence[float]) -> dict[str, torch.Tensor]:
    """Size-weighted average of state dicts (weights are normalised to sum 1)."""
    avg = StreamingAverage()
    for state, w in zip(states, weights, strict=True):
        avg.add(state, w)
    return avg.result()
