"""Baselines of spec section 5 and Wen et al.'s detection metrics, on the tiny model of test_prss."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score, roc_curve

from memshard.models.text import TextCond
from memshard.prss.mitigations import (
    MITIGATIONS,
    VOCABULARY,
    auc,
    detection_score,
    gaussian_noise,
    mitigate,
    random_number,
    random_token,
    repeat_words,
    tpr_at_fpr,
    wen_optimize,
)
from memshard.prss.sampler import PRSSOptions, first_step_magnitude, sample
from tests.test_prss import OFFSETS, SCHED, STEPS, Planted, direction, noise, one_thread, toy_encode, unet_eps

__all__ = ["one_thread"]  # the module-scoped single-thread fixture, reused

PROMPTS = ["mem A", "safe B", "a photo of a red car"]


# -- prompt and embedding perturbations -------------------------------------------------------


def test_random_token_and_number() -> None:
    out = random_token(PROMPTS, k=3, seed=0)
    assert out == random_token(PROMPTS, k=3, seed=0)  # seeded
    assert out != random_token(PROMPTS, k=3, seed=1)
    for p, o in zip(PROMPTS, out, strict=True):
        extra = o[len(p) :].split()
        assert o.startswith(p + " ") and len(extra) == 3 and all(w in VOCABULARY for w in extra)
    # per-image seeds: an image's perturbation does not depend on its batch position's neighbours
    assert random_token(["x", "y"], seed=[5, 9])[1] == random_token(["y"], seed=[9])[0]
    nums = random_number(PROMPTS, k=2, seed=0)
    for p, o in zip(PROMPTS, nums, strict=True):
        extra = o[len(p) :].split()
        assert o.startswith(p + " ") and len(extra) == 2 and all(w.isdigit() for w in extra)


def test_repeat_words() -> None:
    out = repeat_words(PROMPTS, k=2, seed=0)
    assert out == repeat_words(PROMPTS, k=2, seed=0)
    for p, o in zip(PROMPTS, out, strict=True):
        words, new = p.split(), o.split()
        assert len(new) == len(words) + 2 and set(new) == set(words)
        assert any(new.count(w) > words.count(w) for w in set(words))  # a word of the prompt repeated
    assert repeat_words([""], k=3) == [""]


def test_gaussian_noise_changes_the_states_only() -> None:
    cond = toy_encode(PROMPTS)
    noisy = gaussian_noise(cond, sigma=0.5, seed=0)
    assert not torch.equal(noisy.states, cond.states) and torch.equal(noisy.mask, cond.mask)
    assert (noisy.states - cond.states).std().item() == pytest.approx(0.5, rel=0.2)
    assert torch.equal(noisy.states, gaussian_noise(cond, sigma=0.5, seed=0).states)
    assert torch.equal(gaussian_noise(cond, sigma=0.0).states, cond.states)


# -- every baseline through the plain CFG path ------------------------------------------------


def test_every_mitigation_samples_through_plain_cfg() -> None:
    x_T = noise(3, seed=2)
    x_none, _ = sample(unet_eps, toy_encode, SCHED, PROMPTS, x_T, STEPS, PRSSOptions(enabled=False))
    outs = {}
    for name in MITIGATIONS:
        params = {"target": 0.5} if name == "wen" else {}
        x, rep = mitigate(name, unet_eps, toy_encode, SCHED, PROMPTS, x_T, STEPS, seed=0, **params)
        assert x.shape == x_T.shape and torch.isfinite(x).all(), name
        assert all(r["mitigation"] == name and not r["triggered"] for r in rep)
        assert [r["original_prompt"] for r in rep] == PROMPTS
        outs[name] = x
    assert torch.equal(outs["none"], x_none)  # the undefended sampler, bitwise
    for name in ("random_token", "random_number", "repeat_words", "gaussian_noise"):
        assert not torch.allclose(outs[name], x_none), name
    with pytest.raises(ValueError, match="unknown mitigation"):
        mitigate("bogus", unet_eps, toy_encode, SCHED, PROMPTS, x_T, STEPS)


class Smooth(Planted):
    """A differentiable planted memorization: offset k * <states, W> * d (zero for e0's zero pad states)."""

    def __init__(self, k: float) -> None:
        super().__init__({})
        g = torch.Generator().manual_seed(7)
        self.w = torch.randn(6, 16, generator=g)
        self.w[0] = 0  # the start token carries nothing
        self.w /= self.w.norm()
        self.k = k

    def __call__(self, x: torch.Tensor, t: torch.Tensor, cond: TextCond) -> torch.Tensor:
        self.calls.append(int(x.shape[0]))
        proj = (cond.states * self.w).sum(dim=(1, 2))
        return unet_eps(x, t, cond) + self.k * proj.view(-1, 1, 1, 1) * direction()


def test_wen_lowers_m_within_ten_iterations() -> None:
    prompts = ["memorized prompt here", "safe B"]
    x_T = noise(2, seed=4)
    proj = (toy_encode(prompts[:1]).states * Smooth(1.0).w).sum()
    eps = Smooth(k=20.0 / abs(float(proj)))  # m(memorized) ~ 20; safe B ~ 20 |proj_B| / |proj_A|
    m0 = first_step_magnitude(eps, toy_encode, SCHED, prompts, x_T, STEPS)
    target = 5.0
    cond, rep = wen_optimize(eps, toy_encode, SCHED, prompts, x_T, STEPS, target=target)
    r = rep[0]
    assert r["m_before"] == pytest.approx(float(m0[0]), rel=1e-4) and r["m_before"] > 15
    assert r["reached_target"] and r["m_after"] <= target and 1 <= r["iterations"] <= 10
    orig = toy_encode(prompts)
    assert torch.equal(cond.states[:, 0], orig.states[:, 0])  # start token untouched
    assert torch.equal(cond.mask, orig.mask) and not torch.equal(cond.states[0], orig.states[0])
    m1 = first_step_magnitude(eps, toy_encode, SCHED, prompts, x_T, STEPS, cond=cond)
    assert m1[0] <= target + 0.5
    # an image already at or below target is left exactly as encoded
    cond, rep = wen_optimize(eps, toy_encode, SCHED, prompts, x_T, STEPS, target=1e6)
    assert all(r["iterations"] == 0 for r in rep) and torch.equal(cond.states, orig.states)
    # no UNet parameter accumulated a gradient
    from tests.test_prss import tiny_unet

    assert all(p.grad is None for p in tiny_unet().parameters())


# -- detection ---------------------------------------------------------------------------------


def test_detection_scores() -> None:
    prompts = ["mem A", "mem C", "safe B", "another safe prompt"]
    x_T = noise(4, seed=1)
    eps = Planted(OFFSETS)
    first = detection_score(eps, toy_encode, SCHED, prompts, x_T, STEPS, steps="first")
    _, rep = sample(eps, toy_encode, SCHED, prompts, x_T, STEPS, PRSSOptions(enabled=False))
    assert first.tolist() == [r["magnitude"] for r in rep]
    mean = detection_score(eps, toy_encode, SCHED, prompts, x_T, STEPS, steps="mean")
    assert mean.shape == (4,) and torch.isfinite(mean).all()
    assert mean[:2].min() > 50 > mean[2:].max()
    assert auc(first[:2], first[2:]) == 1.0 and tpr_at_fpr(mean[:2], mean[2:]) == 1.0
    with pytest.raises(ValueError, match="first"):
        detection_score(eps, toy_encode, SCHED, prompts, x_T, STEPS, steps="last")  # type: ignore[arg-type]
    # a step number: m(ep) at that step of the undefended trajectory, the sampler's detect_magnitude
    # (its own calls and arithmetic, stopped there), for a few steps' cost
    _, rep = sample(eps, toy_encode, SCHED, prompts, x_T, STEPS, PRSSOptions(enabled=False, guidance_scale=3.0),
                    record_steps=True)  # fmt: skip
    for k in (1, 3, STEPS):
        eps.calls.clear()
        at_k = detection_score(eps, toy_encode, SCHED, prompts, x_T, STEPS, steps=k, guidance_scale=3.0)
        assert at_k.tolist() == [r["m_steps"][k - 1] for r in rep] and eps.calls == [8] * k
    _, rep = sample(eps, toy_encode, SCHED, prompts, x_T, STEPS, PRSSOptions(lambda_ss=1e9, detect_step=3))
    assert detection_score(eps, toy_encode, SCHED, prompts, x_T, STEPS, steps=3).tolist() == [
        r["detect_magnitude"] for r in rep
    ]
    with pytest.raises(ValueError, match="at_step"):
        detection_score(eps, toy_encode, SCHED, prompts, x_T, STEPS, steps=STEPS + 1)


def test_auc_and_tpr_at_fpr() -> None:
    assert auc([3, 4, 5], [0, 1, 2]) == 1.0 and tpr_at_fpr([3, 4, 5], [0, 1, 2]) == 1.0
    assert auc([1, 1, 1], [1, 1]) == 0.5 and tpr_at_fpr([1, 1, 1], [1, 1]) == 0.0
    assert auc([0, 1], [2, 3]) == 0.0
    assert auc([1, 2], [1, 0]) == pytest.approx(0.875)  # one tie, half-counted
    rng = np.random.default_rng(0)
    pos, neg = rng.normal(1, 1, 300), rng.normal(0, 1, 500)
    assert auc(pos, neg) == pytest.approx(roc_auc_score(np.r_[np.ones(300), np.zeros(500)], np.r_[pos, neg]))
    for fpr in (0.01, 0.1):
        f, t, _ = roc_curve(np.r_[np.ones(300), np.zeros(500)], np.r_[pos, neg])
        assert tpr_at_fpr(pos, neg, fpr) == pytest.approx(t[f <= fpr].max())
    with pytest.raises(ValueError):
        auc([], [1.0])
