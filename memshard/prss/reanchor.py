"""Guidance algebra of PRSS (spec section 4): CFG, the memorization magnitude, prompt re-anchoring.

Everything here is per image: magnitudes are (B,) tensors and scales broadcast over the
non-batch dimensions. Nothing is averaged over the batch, because the trigger and the
re-anchoring strength are decisions about one image; a batch mean would let a neighbour's
prompt change whether (and how strongly) an image is defended.

Notation (spec): ``eps_0`` the prediction for the empty prompt e0, ``eps_p`` for the user
prompt ep, ``eps_ss`` for the prompt chosen by semantic search ess, ``s`` the CFG scale.
"""

from __future__ import annotations

import torch

from memshard.config import reanchoring_problem


def _per_image(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A (B,) tensor shaped to broadcast over ``like``'s non-batch dims (B, 1, 1, ...)."""
    v = torch.as_tensor(v, device=like.device, dtype=like.dtype)
    if v.dim() == 0:
        return v
    return v.reshape(v.shape[0], *([1] * (like.dim() - 1)))


def cfg_eps(eps_uncond: torch.Tensor, eps_cond: torch.Tensor, s: float | torch.Tensor) -> torch.Tensor:
    """Classifier-free guidance ``eps_uncond + s (eps_cond - eps_uncond)``.

    Written exactly as diffusers' pipelines write it (same operations, same order), so the
    undefended path reproduces a stock pipeline's arithmetic. ``s`` may be a float or a
    per-image (B,) tensor.
    """
    s = _per_image(s, eps_cond) if isinstance(s, torch.Tensor) else s
    return eps_uncond + s * (eps_cond - eps_uncond)


def magnitude(eps_c: torch.Tensor, eps_0: torch.Tensor) -> torch.Tensor:
    """m = ||eps_c - eps_0||_2 per image over all non-batch dims, as a float32 (B,) tensor.

    Computed in float32 whatever the model dtype, so thresholds mean the same under
    half-precision inference.
    """
    return (eps_c.float() - eps_0.float()).flatten(1).norm(dim=1)


def reanchor_threshold_a(s: float, lambda_pr: float, tau: float) -> float:
    """a = (s lambda_pr - tau) / (s - 1): the m_t at which the linear s_pr ramp would be 0.

    The ramp s_pr(m) = s (m - a) / (tau - a) is chosen so that s_pr(lambda_pr) = 1 (plain CFG,
    continuous with the untriggered rule) and s_pr(tau) = s (full re-anchoring).
    """
    if s <= 1:
        raise ValueError(f"re-anchoring needs a CFG scale s > 1, got {s}")
    return (s * lambda_pr - tau) / (s - 1)


def reanchor_scale(m_t: torch.Tensor | float, s: float, lambda_pr: float, tau: float) -> torch.Tensor:
    """s_pr per image: 1 where m_t <= lambda_pr, else min(s (m_t - a) / (tau - a), s).

    The spec's rule is "if m_t <= lambda_pr: plain CFG with ess", which is exactly s_pr = 1
    in :func:`reanchored_eps`; returning 1 there makes this function the whole per-step rule.
    Above lambda_pr the ramp is continuous at 1 and clamps at s (pure prompt re-anchoring) for
    m_t >= tau. With s <= 1 there is no guidance to re-anchor, so s_pr = s (the formula then
    reduces to eps_ss). ``tau`` must exceed ``lambda_pr`` (equivalently tau > a), otherwise
    the ramp would run backwards.
    """
    m = torch.as_tensor(m_t, dtype=torch.float32)
    if s <= 1:
        return torch.full_like(m, float(s))
    problem = reanchoring_problem(tau, lambda_pr, s)
    if problem is not None:
        raise ValueError(f"re-anchoring: {problem}")
    a = reanchor_threshold_a(s, lambda_pr, tau)
    ramp = torch.clamp(s * (m - a) / (tau - a), max=s)
    return torch.where(m <= lambda_pr, torch.ones_like(ramp), ramp)


def reanchored_eps(
    eps_p: torch.Tensor,
    eps_ss: torch.Tensor,
    eps_0: torch.Tensor,
    s: float,
    s_pr: torch.Tensor | float,
) -> torch.Tensor:
    """eps_p + s_pr (eps_ss - eps_p) + (s - s_pr)(eps_ss - eps_0), with a per-image s_pr.

    The memorized prompt ep becomes the anchor that guidance pushes away from (weight s_pr),
    and the remaining (s - s_pr) keeps ordinary guidance towards ess. s_pr = 1 is plain CFG
    with ess; s_pr = s is the paper's pure form eps_p + s (eps_ss - eps_p).
    """
    sp = _per_image(s_pr, eps_p) if isinstance(s_pr, torch.Tensor) else s_pr
    return eps_p + sp * (eps_ss - eps_p) + (s - sp) * (eps_ss - eps_0)
