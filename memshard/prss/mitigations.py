"""Baselines that PRSS is compared with (spec section 5), and Wen et al.'s detection scores.

Every mitigation only changes what the sampler is conditioned on -- the prompt text
(Somepalli et al.'s perturbations), the token states (Gaussian noise, Wen et al.'s
optimised embedding) -- and then runs the *same* plain-CFG DDIM path as the undefended
sampler (:func:`memshard.prss.sample` with PRSS off). So a comparison with PRSS differs only
in the defence, never in the sampler, the seeds (x_T is the caller's) or the step count.

Randomised mitigations take ``seed``: an int gives image ``i`` the seed ``seed + i``, a
sequence gives one seed per image. A per-image seed means an image's perturbation depends
only on its own seed and prompt, not on its batch neighbours.
"""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import numpy as np
import torch

from memshard.models.text import TextCond
from memshard.prss.reanchor import magnitude
from memshard.prss.sampler import (
    EncodeFn,
    EpsFn,
    PRSSOptions,
    encode_batch,
    first_step_magnitude,
    make_scheduler,
    sample,
    step_magnitude,
    uncond_batch,
)

MITIGATIONS = ("none", "random_token", "random_number", "repeat_words", "gaussian_noise", "wen")

# Built-in vocabulary for random token addition: ordinary, content-neutral English words.
VOCABULARY = (
    "apple river stone cloud garden window paper silver orange forest candle bridge mirror winter "
    "copper violin lantern meadow harbor pencil marble velvet compass feather island thunder "
    "basket ladder pepper cotton anchor rocket saddle tunnel jacket puzzle falcon glacier "
    "pillow kettle orchid canyon hammer wallet tablet carpet prairie trumpet walnut blossom "
    "helmet quartz shovel teapot blanket cactus dolphin engine fossil goblet hazel igloo "
    "jungle kiwi lemon mango nectar oyster parrot quiver raven sapphire tulip umbrella "
    "vessel wizard yarn zebra acorn bamboo cobalt desert ember fjord grape honey ivory"
).split()


def _seeds(seed: int | Sequence[int], n: int) -> list[int]:
    if isinstance(seed, int):
        return [seed + i for i in range(n)]
    seeds = [int(s) for s in seed]
    if len(seeds) != n:
        raise ValueError(f"{len(seeds)} seeds for {n} prompts")
    return seeds


def _rng(seed: int, prompt: str, what: str) -> random.Random:
    """A generator per (mitigation, seed, prompt); string seeds hash stably across processes."""
    return random.Random(f"{what}:{seed}:{prompt}")


def random_token(prompts: Sequence[str], k: int = 4, seed: int | Sequence[int] = 0) -> list[str]:
    """Somepalli et al.'s random token addition: append ``k`` random words from :data:`VOCABULARY`."""
    out = []
    for p, sd in zip(prompts, _seeds(seed, len(prompts)), strict=True):
        rng = _rng(sd, p, "random_token")
        out.append(" ".join([p, *(rng.choice(VOCABULARY) for _ in range(k))]).strip())
    return out


def random_number(prompts: Sequence[str], k: int = 4, seed: int | Sequence[int] = 0) -> list[str]:
    """Somepalli et al.'s random number addition: append ``k`` random integers in [0, 10^6)."""
    out = []
    for p, sd in zip(prompts, _seeds(seed, len(prompts)), strict=True):
        rng = _rng(sd, p, "random_number")
        out.append(" ".join([p, *(str(rng.randrange(1_000_000)) for _ in range(k))]).strip())
    return out


def repeat_words(prompts: Sequence[str], k: int = 2, seed: int | Sequence[int] = 0) -> list[str]:
    """Somepalli et al.'s caption word repetition: ``k`` times, insert a copy of a random word
    of the prompt at a random position. An empty prompt is returned unchanged."""
    out = []
    for p, sd in zip(prompts, _seeds(seed, len(prompts)), strict=True):
        rng = _rng(sd, p, "repeat_words")
        words = p.split()
        if words:
            for _ in range(k):
                word = rng.choice(words)
                words.insert(rng.randint(0, len(words)), word)
        out.append(" ".join(words))
    return out


def gaussian_noise(cond: TextCond, sigma: float = 0.1, seed: int | Sequence[int] = 0) -> TextCond:
    """Somepalli et al.'s Gaussian noise on the text embedding: states + N(0, sigma^2), per-image seeds.

    Noise is added to every position; padded positions are ignored by masked attention
    anyway, and unmasked models (SD's CLIP) were trained on all positions. The mask is kept.
    """
    seeds = _seeds(seed, len(cond))
    shape = tuple(cond.states.shape[1:])
    noise = torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(sd)) for sd in seeds])
    states = cond.states + sigma * noise.to(cond.states.device, cond.states.dtype)
    return TextCond(states, cond.mask.clone())


def wen_optimize(
    eps_fn: EpsFn,
    encode: EncodeFn,
    scheduler_config: Mapping[str, Any],
    prompts: Sequence[str],
    x_T: torch.Tensor,
    steps: int = 50,
    target: float = 1.0,
    lr: float = 0.05,
    max_iters: int = 10,
    cond: TextCond | None = None,
) -> tuple[TextCond, list[dict[str, Any]]]:
    """Wen et al.'s mitigation: optimise each prompt's token states at step 0 until m <= target.

    Minimises m(e) = ||eps(x_T, e) - eps(x_T, e0)|| at the sampler's first timestep with
    AdamW (lr 0.05) for at most ``max_iters`` updates, the start token's gradient zeroed (it
    carries no prompt content and anchors the embedding; it is also kept out of AdamW's
    decoupled weight decay, so it stays exactly as encoded). Each image has its own parameter
    and optimizer and stops on its own: the batched loss is a sum, so each image's gradient
    is its own and a finished neighbour never moves again. ``target`` is on the same scale as
    PRSS's lambda_ss (calibrate per model). Gradients are taken w.r.t. the states only
    (``torch.autograd.grad``), so UNet parameters accumulate nothing; this path runs under
    ``torch.enable_grad`` so ``eps_fn`` must not force ``no_grad``.

    Returns the optimised states (original mask) and per image: prompt, m_before, m_after,
    iterations, reached_target.
    """
    n = len(prompts)
    device = x_T.device
    sched = make_scheduler(scheduler_config, steps, device)
    t = sched.timesteps[0]
    x0 = sched.scale_model_input(x_T, t)
    tt = torch.full((n,), int(t), device=device, dtype=torch.long)
    base = cond.to(device) if cond is not None else encode_batch(encode, [str(p) for p in prompts], device)
    with torch.no_grad():
        eps_0 = eps_fn(x0, tt, uncond_batch(encode, n, device)).detach()

    params = [base.states[i : i + 1].detach().float().clone().requires_grad_(True) for i in range(n)]
    start = [p[:, 0].detach().clone() for p in params]
    optims = [torch.optim.AdamW([p], lr=lr) for p in params]
    reports: list[dict[str, Any]] = [
        {"prompt": str(p), "m_before": 0.0, "m_after": 0.0, "iterations": 0, "reached_target": False} for p in prompts
    ]
    done = [False] * n
    for it in range(max_iters + 1):
        active = [i for i in range(n) if not done[i]]
        if not active:
            break
        a = torch.tensor(active, device=device)
        with torch.enable_grad():
            states = torch.cat([params[i] for i in active]).to(base.states.dtype)
            out = eps_fn(x0[a], tt[a], TextCond(states, base.mask[a]))
            m = magnitude(out, eps_0[a])
            values = m.detach().tolist()
            for i, v in zip(active, values, strict=True):
                if it == 0:
                    reports[i]["m_before"] = v
                reports[i]["m_after"] = v
                if v <= target:
                    done[i] = True
                    reports[i]["reached_target"] = True
            keep = [j for j, i in enumerate(active) if not done[i]]
            if it == max_iters or not keep:
                break
            grads = torch.autograd.grad(m[keep].sum(), [params[active[j]] for j in keep])
        for j, g in zip(keep, grads, strict=True):
            i = active[j]
            g = g.clone()
            g[:, 0] = 0  # start token: not optimised
            params[i].grad = g
            optims[i].step()
            with torch.no_grad():  # AdamW's decoupled weight decay would still shrink it: restore
                params[i][:, 0] = start[i]
            optims[i].zero_grad(set_to_none=True)
            reports[i]["iterations"] += 1
    states = torch.cat([p.detach() for p in params]).to(base.states.dtype)
    return TextCond(states, base.mask.clone()), reports


def mitigate(
    name: str,
    eps_fn: EpsFn,
    encode: EncodeFn,
    scheduler_config: Mapping[str, Any],
    prompts: Sequence[str],
    x_T: torch.Tensor,
    steps: int = 50,
    guidance_scale: float = 7.5,
    seed: int | Sequence[int] = 0,
    **params: Any,
) -> tuple[torch.Tensor, list[dict[str, Any]]]:
    """Sample with the baseline ``name`` (one of :data:`MITIGATIONS`) through plain CFG.

    ``params`` go to the mitigation: ``k`` (random_token, random_number, repeat_words),
    ``sigma`` (gaussian_noise), ``target``/``lr``/``max_iters`` (wen). Reports are the
    sampler's, plus ``mitigation``, ``original_prompt`` and (wen) ``wen``; for prompt edits
    ``prompt`` is the edited prompt actually sampled.
    """
    if name not in MITIGATIONS:
        raise ValueError(f"unknown mitigation {name!r}; choose one of {MITIGATIONS}")
    prompts = [str(p) for p in prompts]
    used, cond, extra = prompts, None, None
    if name == "random_token":
        used = random_token(prompts, seed=seed, **params)
    elif name == "random_number":
        used = random_number(prompts, seed=seed, **params)
    elif name == "repeat_words":
        used = repeat_words(prompts, seed=seed, **params)
    elif name == "gaussian_noise":
        cond = gaussian_noise(encode_batch(encode, prompts, x_T.device), seed=seed, **params)
    elif name == "wen":
        cond, extra = wen_optimize(eps_fn, encode, scheduler_config, prompts, x_T, steps, **params)
    elif params:
        raise ValueError(f"mitigation 'none' takes no parameters, got {sorted(params)}")
    x, reports = sample(
        eps_fn, encode, scheduler_config, used, x_T, steps,
        options=PRSSOptions(enabled=False, guidance_scale=guidance_scale), cond=cond,
    )  # fmt: skip
    for i, rep in enumerate(reports):
        rep["mitigation"] = name
        rep["original_prompt"] = prompts[i]
        if extra is not None:
            rep["wen"] = extra[i]
    return x, reports


def detection_score(
    eps_fn: EpsFn,
    encode: EncodeFn,
    scheduler_config: Mapping[str, Any],
    prompts: Sequence[str],
    x_T: torch.Tensor,
    num_inference_steps: int = 50,
    steps: Literal["first", "mean"] | int = "first",
    guidance_scale: float = 7.5,
) -> torch.Tensor:
    """Wen et al.'s memorization score per image: m(ep) at the first step, or its mean over steps.

    ``first`` is one [e0, ep] UNet call -- the PRSS trigger statistic, equal to the sampler's
    reported ``magnitude``. ``mean`` follows the undefended CFG trajectory (the guidance
    scale matters only there) and averages m(ep) over its steps, as Wen et al. do. An int k:
    m(ep) at step k of that trajectory, the trigger statistic of ``detect_step = k``.
    """
    if steps == "first":
        return first_step_magnitude(eps_fn, encode, scheduler_config, prompts, x_T, num_inference_steps)
    if isinstance(steps, int) and not isinstance(steps, bool):
        return step_magnitude(
            eps_fn, encode, scheduler_config, prompts, x_T, num_inference_steps, steps, guidance_scale
        )
    if steps != "mean":
        raise ValueError(f"steps must be 'first', 'mean' or a step number, got {steps!r}")
    _, reports = sample(
        eps_fn, encode, scheduler_config, prompts, x_T, num_inference_steps,
        options=PRSSOptions(enabled=False, guidance_scale=guidance_scale), record_steps=True,
    )  # fmt: skip
    return torch.tensor([float(np.mean(r["m_steps"])) for r in reports])


def _scores(pos: Any, neg: Any) -> tuple[np.ndarray, np.ndarray]:
    p = np.asarray(pos, dtype=np.float64).ravel()
    q = np.asarray(neg, dtype=np.float64).ravel()
    if p.size == 0 or q.size == 0:
        raise ValueError("need at least one positive and one negative score")
    if not (np.isfinite(p).all() and np.isfinite(q).all()):
        raise ValueError("scores must be finite")
    return p, q


def auc(scores_pos: Any, scores_neg: Any) -> float:
    """ROC AUC of "higher score = memorized": P(pos > neg) + P(pos = neg)/2 (Mann-Whitney, ties halved)."""
    p, q = _scores(scores_pos, scores_neg)
    allv = np.concatenate([p, q])
    order = np.argsort(allv, kind="mergesort")
    _, first, counts = np.unique(allv[order], return_index=True, return_counts=True)
    ranks = np.empty(allv.size)
    ranks[order] = np.repeat(first + (counts + 1) / 2.0, counts)  # 1-based average ranks
    return float((ranks[: p.size].sum() - p.size * (p.size + 1) / 2.0) / (p.size * q.size))


def tpr_at_fpr(scores_pos: Any, scores_neg: Any, fpr: float = 0.01) -> float:
    """The highest TPR over thresholds "score >= thr" whose FPR is at most ``fpr``.

    The ROC operating point Wen et al. report (sklearn's roc_curve, last point with
    FPR <= fpr); with tied scores a threshold takes all of them, so identical positive and
    negative scores give 0 (no threshold separates any positive without the negatives).
    """
    p, q = _scores(scores_pos, scores_neg)
    thr = np.concatenate([[np.inf], np.unique(np.concatenate([p, q]))[::-1]])
    ps, qs = np.sort(p), np.sort(q)
    tpr = (p.size - np.searchsorted(ps, thr, side="left")) / p.size
    fp = (q.size - np.searchsorted(qs, thr, side="left")) / q.size
    ok = fp <= fpr + 1e-12
    return float(tpr[ok].max())
