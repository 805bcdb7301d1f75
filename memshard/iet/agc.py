"""Anti-gradient control (AGC): the skip rule and the per-timestep memory bank.

Spec section 2. A sample whose denoising loss is abnormally low for its timestep is
being memorized; AGC gives it zero gradient. "Abnormally low" is measured against a
memory bank m[t], an exponential running average of the loss at each timestep.

Everything here is plain torch on whatever device the batch lives on, with no host
synchronisation, so it can sit inside a compiled or CUDA-graphed training step.
"""

from __future__ import annotations

import torch


def per_sample_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """l_j = mean over C,H,W of (pred - target)^2, computed in fp32 whatever the autocast dtype."""
    diff = pred.float() - target.float()
    return diff.pow(2).flatten(1).mean(dim=1)


def keep_mask(loss: torch.Tensor, bank: torch.Tensor, timesteps: torch.Tensor, ratio: float) -> torch.Tensor:
    """Keep sample j iff l_j * r >= m[t_j]  (skip iff l_j / m[t_j] < 1/r).

    With the bank initialised to 0 nothing is skipped until a timestep has been seen,
    which is why the method needs no separate warm-up.
    """
    return loss.detach() * ratio >= bank[timesteps]


def masked_loss(loss: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """sum_j keep_j l_j / max(sum_j keep_j, 1).

    Skipped samples stay in the graph (they were forwarded) but their gradient is
    exactly zero. An all-skipped batch gives loss 0 with a valid graph, so the optimizer
    step still happens (Adam moments decay, matching the authors' loop).
    """
    k = keep.to(loss.dtype)
    return (loss * k).sum() / k.sum().clamp(min=1.0)


def loss_ratio(loss: torch.Tensor, bank: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    """l_j / m[t_j] as recorded in the statistics; inf where the bank is still 0."""
    denom = bank[timesteps]
    return torch.where(denom > 0, loss.detach() / denom.clamp(min=1e-30), torch.full_like(denom, float("inf")))


def update_bank(bank: torch.Tensor, loss: torch.Tensor, timesteps: torch.Tensor, decay: float) -> torch.Tensor:
    """Return the bank after m[t_j] <- beta m[t_j] + (1 - beta) l_j for every j in batch order.

    Vectorised but equal to the sequential loop when several samples share a timestep:
    if a timestep occurs k times with losses l_(0)..l_(k-1) in batch order, the loop
    yields beta^k m + sum_i (1 - beta) beta^(k-1-i) l_(i). We compute each sample's
    position among its duplicates (a stable sort) and scatter-add those terms.
    """
    loss = loss.detach().to(bank.dtype)
    n = timesteps.numel()
    if n == 0:
        return bank.clone()
    order = torch.sort(timesteps, stable=True).indices
    t_sorted = timesteps[order]
    idx = torch.arange(n, device=timesteps.device)
    is_start = torch.ones(n, dtype=torch.bool, device=timesteps.device)
    is_start[1:] = t_sorted[1:] != t_sorted[:-1]
    # index of the first element of each run, carried forward with a cumulative max
    run_start = torch.cummax(torch.where(is_start, idx, torch.zeros_like(idx)), dim=0).values
    pos_sorted = idx - run_start
    counts = torch.zeros_like(bank).index_add_(0, timesteps, torch.ones_like(loss))
    pos = torch.empty_like(pos_sorted)
    pos[order] = pos_sorted
    k = counts[timesteps]
    beta = torch.as_tensor(decay, dtype=bank.dtype, device=bank.device)
    weights = (1 - beta) * beta.pow(k - 1 - pos.to(bank.dtype))
    new = bank * beta.pow(counts)
    return new.index_add_(0, timesteps, weights * loss)


def update_bank_sequential(
    bank: torch.Tensor, loss: torch.Tensor, timesteps: torch.Tensor, decay: float
) -> torch.Tensor:
    """Reference: the authors' Python loop, one sample at a time (used in tests only)."""
    out = bank.clone()
    for li, ti in zip(loss.tolist(), timesteps.tolist(), strict=True):
        out[ti] = decay * out[ti] + (1 - decay) * li
    return out
