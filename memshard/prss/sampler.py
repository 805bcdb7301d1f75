"""DDIM (eta = 0) sampling with classifier-free guidance and PRSS (spec section 4), model-agnostic.

The sampler only needs three things from a model, so it works for the pixel-space demo
UNet, a Stable-Diffusion latent UNet, or a toy test model alike:

* ``eps_fn(x, t, cond) -> eps``: the UNet's prediction for a batch (``t`` a (B,) long
  tensor, ``cond`` a :class:`~memshard.models.text.TextCond`). It is called under ``torch.no_grad``
  here, but the Wen et al. baseline differentiates through it, so the closure itself must
  not force ``no_grad``. "eps" means the model output in the scheduler's prediction type;
  guidance and magnitudes are computed on it as diffusers does.
* ``encode(prompts) -> TextCond``: states padded to a fixed length (every call must give the
  same L and D, since states of different calls are concatenated into one batch).
* a ``DDIMScheduler`` config dict.

Seeding is the caller's: ``x_T`` is passed in, one noise tensor per image, and DDIM with
eta = 0 adds no noise, so the result is a deterministic function of (x_T, prompt).

PRSS, per image (never per batch):

1. Step 1 computes [eps(x_T, e0), eps(x_T, ep)] for the whole batch exactly as the undefended
   sampler does; m(ep) comes from these same tensors, so detection costs no UNet call.
   m(ep) <= lambda_ss: not triggered, and the image is bitwise the undefended output.
2. Triggered images (modes prss, ss): all candidates of all triggered images are scored at
   x_T in ONE batched UNet call (m against the eps(x_T, e0) already computed); the first
   candidate with m <= lambda_ss is chosen, else the lowest m, the original included. The
   chosen candidate's row of that call is reused as eps(x_T, ess) for step 1.
3. Every step, triggered images are guided by re-anchoring (prss, pr) or plain CFG with ess
   (ss). To keep untriggered images bitwise equal to the undefended sampler in a mixed
   batch, the [e0, ep] call stays the undefended call (same inputs, same batch shape) and
   the ess branch of the triggered images is a separate call. Once every image of the batch
   is triggered there is nothing to preserve: e0 and ess go into one call, and ep, which only
   the re-anchoring formula reads, is computed only for the images that step re-anchors
   (m_t > lambda_pr): 2 + (share re-anchored) branches per step instead of 3.

Detection at a later step (``detect_step`` k > 1, beyond the spec): steps 1..k-1 are the
undefended sampler's; m(ep) at step k triggers, candidates are scored on step k's state, and
guidance switches from step k on; with ``restart`` a batch in which anything triggered is
instead sampled again from x_T with those decisions fixed (k - 1 extra steps for the whole
batch; a batch without a trigger pays nothing). An untriggered image stays bitwise the
undefended output either way. Why: on a model whose first-step magnitude does not separate
memorized prompts, a few steps in it does (BENCHMARKS.md).

Mode ``pr`` re-anchors on the first candidate without scoring any: it isolates the effect of
re-anchoring (the ablation of the paper), costs no search call, and the first candidate is
the provider's best guess (bank: the most similar prompt; list: the caller's first choice).
With no candidate at all, ess = ep: re-anchoring then only weakens the guidance towards ep.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, fields
from typing import Any

import torch
from diffusers import DDIMScheduler

from memshard.config import PRSSConfig, pr_profile_problem, reanchoring_problem
from memshard.models.text import TextCond
from memshard.prss.candidates import CandidateProvider
from memshard.prss.reanchor import cfg_eps, magnitude, reanchor_scale, reanchored_eps

EpsFn = Callable[[torch.Tensor, torch.Tensor, TextCond], torch.Tensor]
EncodeFn = Callable[[list[str]], TextCond]
Candidates = Sequence[Sequence[str]] | CandidateProvider

MODES = ("prss", "pr", "ss")


_DEFAULTS = PRSSConfig()  # the spec's defaults live in the config alone


@dataclass(frozen=True)
class PRSSOptions:
    """The sampler's options: the sampling part of ``memshard.config.PRSSConfig`` (same names, its defaults).

    A plain frozen dataclass rather than the pydantic model, so that the sampler's hot path and its
    callers (pipelines, calibration, the baselines) carry no config machinery; candidates and the
    prompt bank are arguments of :func:`sample`, not options. ``num_candidates`` caps the candidates
    scored per triggered prompt, whether they come from a provider or an explicit list.
    """

    enabled: bool = _DEFAULTS.enabled
    mode: str = _DEFAULTS.mode
    guidance_scale: float = _DEFAULTS.guidance_scale
    lambda_ss: float = _DEFAULTS.lambda_ss
    lambda_pr: float = _DEFAULTS.lambda_pr
    tau: float = _DEFAULTS.tau
    num_candidates: int = _DEFAULTS.num_candidates
    detect_step: int = _DEFAULTS.detect_step
    restart: bool = _DEFAULTS.restart
    # Per-step multipliers of lambda_pr and tau, from the first step to the last (any length: step i
    # of n reads the entry at the same share of the trajectory). None: the same thresholds at every
    # step, the spec's rule. Why: m_t can grow many-fold along a trajectory (about 30x on the PRSS
    # benchmark's shapes model), so one lambda_pr re-anchors only the late steps at light levels;
    # thresholds that follow the memorized trajectories' own per-step scale
    # (:func:`memshard.prss.calibration.per_step_level`) spread re-anchoring over the trajectory.
    pr_profile: tuple[float, ...] | None = None

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"PRSS mode must be one of {MODES}, got {self.mode!r}")
        if self.guidance_scale < 1:
            raise ValueError(f"guidance_scale must be >= 1, got {self.guidance_scale}")
        problem = reanchoring_problem(self.tau, self.lambda_pr, self.guidance_scale, self.mode)
        if self.enabled and problem is not None:
            raise ValueError(f"PRSS: {problem}")
        if self.num_candidates < 0:
            raise ValueError("num_candidates must be >= 0")
        if self.detect_step < 1:
            raise ValueError(f"detect_step counts sampling steps from 1, got {self.detect_step}")
        if self.pr_profile is not None:
            prof = tuple(float(v) for v in self.pr_profile)
            problem = pr_profile_problem(prof)
            if problem is not None:
                raise ValueError(problem)
            object.__setattr__(self, "pr_profile", prof)

    def pr_thresholds(self, i: int, steps: int) -> tuple[float, float]:
        """(lambda_pr, tau) at step ``i`` (from 0) of ``steps``: scaled by ``pr_profile`` where given."""
        if self.pr_profile is None:
            return self.lambda_pr, self.tau
        k = round(i * (len(self.pr_profile) - 1) / max(steps - 1, 1))
        return self.lambda_pr * self.pr_profile[k], self.tau * self.pr_profile[k]

    @classmethod
    def from_config(cls, cfg: Any, **overrides: Any) -> PRSSOptions:
        """From a ``PRSSConfig`` (or anything with the same attributes), then ``overrides``."""
        values = {f.name: getattr(cfg, f.name) for f in fields(cls) if hasattr(cfg, f.name)}
        values.update(overrides)
        return cls(**values)


def make_scheduler(scheduler_config: Mapping[str, Any], steps: int, device: torch.device | str) -> DDIMScheduler:
    """A fresh DDIM scheduler set to ``steps`` inference steps (fresh: schedulers are stateful)."""
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    sched = DDIMScheduler.from_config(dict(scheduler_config))
    sched.set_timesteps(steps, device=device)
    return sched


def _tt(t: torch.Tensor, n: int, device: torch.device) -> torch.Tensor:
    return torch.full((n,), int(t), device=device, dtype=torch.long)


def encode_batch(encode: EncodeFn, prompts: list[str], device: torch.device) -> TextCond:
    """``encode(prompts)`` checked for one row per prompt and moved to ``device``."""
    cond = encode(list(prompts))
    if len(cond) != len(prompts):
        raise ValueError(f"encode returned {len(cond)} rows for {len(prompts)} prompts")
    return cond.to(device)


def uncond_batch(encode: EncodeFn, n: int, device: torch.device) -> TextCond:
    """e0 for ``n`` images: the empty prompt encoded once and repeated (identical rows)."""
    return encode_batch(encode, [""], device).repeat(n)


def first_step_eps(
    eps_fn: EpsFn, x_T: torch.Tensor, t: torch.Tensor, uncond: TextCond, cond: TextCond
) -> tuple[torch.Tensor, torch.Tensor]:
    """(eps(x_T, e0), eps(x_T, ep)) from one [e0, ep] call, exactly the sampler's CFG call."""
    n = x_T.shape[0]
    tt = _tt(t, n, x_T.device)
    out = eps_fn(torch.cat([x_T, x_T]), torch.cat([tt, tt]), TextCond.cat([uncond, cond]))
    eps_0, eps_p = out.chunk(2)
    return eps_0, eps_p


def _candidate_lists(
    candidates: Candidates | None, prompts: list[str], rows: list[int], n: int
) -> dict[int, list[str]]:
    """Candidates of the images in ``rows`` only (a provider is asked only for triggered prompts).

    At most ``n`` each; a candidate equal to the prompt is dropped (the original is always
    in the running anyway, scoring it again would only waste a row of the search call).
    """
    if candidates is None or n == 0:
        return {i: [] for i in rows}
    if callable(candidates) and not isinstance(candidates, Sequence):
        raw = {i: list(candidates(prompts[i], n)) for i in rows}
    else:
        if len(candidates) != len(prompts):
            raise ValueError(f"candidates: {len(candidates)} lists for {len(prompts)} prompts")
        raw = {i: list(candidates[i]) for i in rows}
    return {i: [str(c) for c in raw[i] if str(c).strip() != prompts[i].strip()][:n] for i in rows}


@dataclass
class _Decision:
    """What detection decided for a batch: triggered rows, anchored rows and their ess states.

    A restart (``PRSSOptions.restart``) replays it from x_T: the second pass starts with these
    decisions instead of detecting again.
    """

    trig: list[int]
    anchored: list[int]
    ess: TextCond | None


@torch.no_grad()
def sample(
    eps_fn: EpsFn,
    encode: EncodeFn,
    scheduler_config: Mapping[str, Any],
    prompts: Sequence[str],
    x_T: torch.Tensor,
    steps: int = 50,
    options: PRSSOptions | None = None,
    candidates: Candidates | None = None,
    cond: TextCond | None = None,
    record_steps: bool = False,
) -> tuple[torch.Tensor, list[dict[str, Any]]]:
    """DDIM (eta 0) with CFG and optional PRSS; returns (final x, one report dict per image).

    ``prompts[i]`` conditions image ``i`` started from ``x_T[i]``. ``candidates`` is either one
    list per image (may be empty) or a provider ``(prompt, n) -> list[str]`` asked only for
    triggered prompts. ``cond`` replaces ``encode(prompts)`` (baselines that edit the token
    states); ``prompts`` are then only used for reports and candidates. The final x is in
    model space (pixels or VAE latents): decoding is the caller's.

    Detection reads m(ep) at step ``options.detect_step`` (1, the spec's first step, by
    default) of the undefended trajectory; candidates are scored on that step's state. From
    there a triggered image is either guided by PRSS for the remaining steps, or, with
    ``options.restart``, sampled again from x_T with the prompt chosen there (the images of
    the first pass are discarded). Either way an untriggered image is bitwise the undefended
    output.

    Report keys: prompt, magnitude (first-step m(ep)), detect_magnitude (m(ep) at the detection
    step: the trigger statistic), detect_step, triggered, chosen_prompt, chosen_magnitude (m of the guiding
    prompt on the state where it was chosen; pr: where its branch was first computed), pr_steps
    (steps with m_t > lambda_pr), candidates_scored, candidate_magnitudes, mode; with
    ``record_steps`` also m_steps (m of the prompt guiding the image, at each step).
    """
    opt = options or PRSSOptions()
    prompts = [str(p) for p in prompts]
    n = len(prompts)
    if x_T.shape[0] != n:
        raise ValueError(f"x_T has {x_T.shape[0]} images for {n} prompts")
    if opt.enabled and opt.detect_step > steps:  # (off: the undefended sampler, no detection to place)
        raise ValueError(f"detect_step {opt.detect_step} is past the last of {steps} sampling steps")
    device = x_T.device
    uncond = uncond_batch(encode, n, device)
    ep = cond.to(device) if cond is not None else encode_batch(encode, prompts, device)
    if len(ep) != n:
        raise ValueError(f"cond has {len(ep)} rows for {n} prompts")

    reports: list[dict[str, Any]] = [
        {
            "prompt": p,
            "magnitude": 0.0,
            "detect_magnitude": 0.0,
            "detect_step": opt.detect_step,
            "triggered": False,
            "chosen_prompt": p,
            "chosen_magnitude": 0.0,
            "pr_steps": 0,
            "candidates_scored": 0,
            "candidate_magnitudes": [],
            "mode": opt.mode if opt.enabled else "off",
            **({"m_steps": []} if record_steps else {}),
        }
        for p in prompts
    ]
    run = functools.partial(
        _trajectory, eps_fn, encode, opt, prompts, candidates, scheduler_config, steps, x_T, uncond, ep, reports,
        record_steps,
    )  # fmt: skip
    restart = opt.enabled and opt.restart and opt.detect_step > 1
    x, decision = run(None, restart)
    if decision is not None:  # triggered after step 1 with restart: again from x_T, decisions fixed
        if record_steps:
            for r in reports:
                r["m_steps"] = []
        x, _ = run(decision, False)
    return x, reports


def _trajectory(
    eps_fn: EpsFn,
    encode: EncodeFn,
    opt: PRSSOptions,
    prompts: list[str],
    candidates: Candidates | None,
    scheduler_config: Mapping[str, Any],
    steps: int,
    x_T: torch.Tensor,
    uncond: TextCond,
    ep: TextCond,
    reports: list[dict[str, Any]],
    record_steps: bool,
    preset: _Decision | None,
    stop_on_trigger: bool,
) -> tuple[torch.Tensor, _Decision | None]:
    """One pass of the sampler from x_T; fills ``reports``.

    ``preset``: decisions of an earlier pass (a restart), applied from step 1 without detecting.
    ``stop_on_trigger``: return (x, decision) right after detection if anything triggered, for
    the caller to restart; otherwise the decision returned is None.
    """
    n = len(prompts)
    device = x_T.device
    s = float(opt.guidance_scale)
    sched = make_scheduler(scheduler_config, steps, device)
    main_cond = TextCond.cat([uncond, ep])
    detect_at = -1 if preset is not None else (opt.detect_step - 1 if opt.enabled else steps)
    first_guided = 0 if preset is not None else detect_at  # the step whose ess branch is computed on its own

    trig: list[int] = []  # triggered rows
    anchored: list[int] = []  # triggered rows whose ess differs from ep (need their own branch)
    ess: TextCond | None = None  # states of ess for the rows in `anchored`, in that order
    chosen_full: TextCond | None = None  # ep with the `anchored` rows replaced (ss, all triggered)
    if preset is not None:
        trig, anchored, ess = preset.trig, preset.anchored, preset.ess
        chosen_full = _chosen_full(ep, anchored, ess) if len(trig) == n else None
    x = x_T
    for i, t in enumerate(sched.timesteps):
        x_in = sched.scale_model_input(x, t)
        tt = _tt(t, n, device)
        all_trig = len(trig) == n and i > first_guided
        lambda_pr, tau = opt.pr_thresholds(i, steps)
        eps_ss_rows: torch.Tensor | None = None
        if all_trig and opt.mode == "ss":
            # Nothing to preserve bitwise: one call with the guiding prompt of every image.
            assert chosen_full is not None
            out = eps_fn(torch.cat([x_in, x_in]), torch.cat([tt, tt]), TextCond.cat([uncond, chosen_full]))
            eps_0, eps_g = out.chunk(2)
            eps = cfg_eps(eps_0, eps_g, s)
            if record_steps:
                for r, v in zip(range(n), magnitude(eps_g, eps_0).tolist(), strict=True):
                    reports[r]["m_steps"].append(v)
            x = sched.step(eps, t, x, eta=0.0).prev_sample
            continue
        if all_trig:
            # e0 and the guiding prompt (ess, or ep where nothing better was found) in one call; ep
            # of an anchored image only at the steps that re-anchor it (m_t > lambda_pr): below
            # lambda_pr the rule is plain CFG with ess, which does not read ep.
            assert chosen_full is not None
            out = eps_fn(torch.cat([x_in, x_in]), torch.cat([tt, tt]), TextCond.cat([uncond, chosen_full]))
            eps_0, eps_p = out.chunk(2)
            if anchored:
                a = torch.tensor(anchored, device=device, dtype=torch.long)
                eps_ss_rows = eps_p[a]
                hit = a[magnitude(eps_ss_rows, eps_0[a]) > lambda_pr]
                if len(hit):
                    eps_p = eps_p.clone()
                    eps_p[hit] = eps_fn(x_in[hit], tt[hit], ep.index(hit))
        else:
            # The undefended sampler's call, unchanged.
            out = eps_fn(torch.cat([x_in, x_in]), torch.cat([tt, tt]), main_cond)
            eps_0, eps_p = out.chunk(2)

        if i == 0 and preset is None:
            m0 = magnitude(eps_p, eps_0).tolist()
            for r in range(n):
                reports[r]["magnitude"] = reports[r]["detect_magnitude"] = reports[r]["chosen_magnitude"] = m0[r]
        if i == detect_at:
            mk = magnitude(eps_p, eps_0).tolist()
            for r in range(n):
                reports[r]["detect_magnitude"] = reports[r]["chosen_magnitude"] = mk[r]
            trig = [r for r in range(n) if mk[r] > opt.lambda_ss]
            for r in trig:
                reports[r]["triggered"] = True
            if trig:
                anchored, ess, eps_ss_rows = _choose(
                    eps_fn, encode, opt, prompts, candidates, trig, x_in, tt, eps_0, mk, reports
                )
                if stop_on_trigger:
                    return x, _Decision(trig, anchored, ess)
                if len(trig) == n:
                    chosen_full = _chosen_full(ep, anchored, ess)

        if anchored and eps_ss_rows is None:
            # Mixed batch (or the first guided step of mode pr): the ess branch of the triggered images.
            a = torch.tensor(anchored, device=device, dtype=torch.long)
            eps_ss_rows = eps_fn(x_in[a], tt[a], ess)  # type: ignore[arg-type]

        eps = cfg_eps(eps_0, eps_p, s)  # the undefended arithmetic, on the whole batch
        if record_steps:
            m_p = magnitude(eps_p, eps_0).tolist()
            trig_set = set(trig)
            for r in range(n):
                if r not in trig_set:
                    reports[r]["m_steps"].append(m_p[r])
        if trig:
            eps = eps.clone()
            guided, m_t = _defended_eps(
                opt, (lambda_pr, tau), trig, anchored, eps_0, eps_p, eps_ss_rows, reports, record_steps
            )
            eps[torch.tensor(trig, device=device)] = guided
            if i == first_guided and opt.mode == "pr":  # pr scores nothing: report ess's m from this step
                for r, v in zip(trig, m_t.tolist(), strict=True):
                    reports[r]["chosen_magnitude"] = v
        x = sched.step(eps, t, x, eta=0.0).prev_sample
    return x, None


def _chosen_full(ep: TextCond, anchored: list[int], ess: TextCond | None) -> TextCond:
    """ep with the anchored rows replaced by their ess: the guiding prompt of every image."""
    if not anchored:
        return ep
    states, mask = ep.states.clone(), ep.mask.clone()
    a = torch.tensor(anchored, device=ep.states.device, dtype=torch.long)
    states[a], mask[a] = ess.states, ess.mask  # type: ignore[union-attr]
    return TextCond(states, mask)


def _choose(
    eps_fn: EpsFn,
    encode: EncodeFn,
    opt: PRSSOptions,
    prompts: list[str],
    candidates: Candidates | None,
    trig: list[int],
    x_in: torch.Tensor,
    tt: torch.Tensor,
    eps_0: torch.Tensor,
    m0: list[float],
    reports: list[dict[str, Any]],
) -> tuple[list[int], TextCond | None, torch.Tensor | None]:
    """Pick ess for each triggered image; returns (anchored rows, their ess states, eps(x_T, ess) or None).

    prss / ss: one batched call scores every candidate of every triggered image at x_T.
    pr: the first candidate, unscored (its eps at x_T is then computed by the step's ess call).
    """
    device = x_in.device
    lists = _candidate_lists(candidates, prompts, trig, opt.num_candidates)
    if opt.mode == "pr":
        anchored = [r for r in trig if lists[r]]
        for r in anchored:
            reports[r]["chosen_prompt"] = lists[r][0]
        if not anchored:
            return [], None, None
        return anchored, encode_batch(encode, [lists[r][0] for r in anchored], device), None

    flat = [c for r in trig for c in lists[r]]
    if not flat:
        return [], None, None
    owner = torch.tensor([r for r in trig for _ in lists[r]], device=device, dtype=torch.long)
    cc = encode_batch(encode, flat, device)
    out = eps_fn(x_in[owner], tt[owner], cc)  # the one search call
    m_c = magnitude(out, eps_0[owner]).tolist()

    anchored: list[int] = []
    picks: list[int] = []  # row of `out` / `cc` chosen for each anchored image
    start = 0
    for r in trig:
        k = len(lists[r])
        ms = m_c[start : start + k]
        rep = reports[r]
        rep["candidates_scored"] = k
        rep["candidate_magnitudes"] = ms
        below = [j for j, m in enumerate(ms) if m <= opt.lambda_ss]
        if below:
            j = below[0]
        else:
            j = min(range(k), key=lambda q: ms[q]) if k else -1
            if j >= 0 and not ms[j] < m0[r]:  # the original is at least as good: keep it
                j = -1
        if j >= 0:
            anchored.append(r)
            picks.append(start + j)
            rep["chosen_prompt"] = lists[r][j]
            rep["chosen_magnitude"] = ms[j]
        start += k
    if not anchored:
        return [], None, None
    p = torch.tensor(picks, device=device, dtype=torch.long)
    return anchored, cc.index(p), out[p]


def _defended_eps(
    opt: PRSSOptions,
    thresholds: tuple[float, float],
    trig: list[int],
    anchored: list[int],
    eps_0: torch.Tensor,
    eps_p: torch.Tensor,
    eps_ss_rows: torch.Tensor | None,
    reports: list[dict[str, Any]],
    record_steps: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The guided eps of the triggered rows (in ``trig`` order) for one step, and their m_t.

    ``thresholds``: this step's (lambda_pr, tau) (:meth:`PRSSOptions.pr_thresholds`).
    """
    device = eps_0.device
    ti = torch.tensor(trig, device=device)
    e0, ep = eps_0[ti], eps_p[ti]
    ess = ep.clone()
    if anchored:
        pos = torch.tensor([trig.index(r) for r in anchored], device=device)
        ess[pos] = eps_ss_rows.to(ess.dtype)  # type: ignore[union-attr]
    m_t = magnitude(ess, e0)
    if record_steps:
        for r, v in zip(trig, m_t.tolist(), strict=True):
            reports[r]["m_steps"].append(v)
    plain = cfg_eps(e0, ess, opt.guidance_scale)
    if opt.mode == "ss":
        return plain, m_t
    lambda_pr, tau = thresholds
    s_pr = reanchor_scale(m_t, opt.guidance_scale, lambda_pr, tau).to(device)
    active = m_t > lambda_pr
    for r, hit in zip(trig, active.tolist(), strict=True):
        reports[r]["pr_steps"] += int(hit)
    re = reanchored_eps(ep, ess, e0, opt.guidance_scale, s_pr)
    mask = active.to(device).reshape(-1, *([1] * (ep.dim() - 1)))
    return torch.where(mask, re, plain), m_t


def first_step_magnitude(
    eps_fn: EpsFn,
    encode: EncodeFn,
    scheduler_config: Mapping[str, Any],
    prompts: Sequence[str],
    x_T: torch.Tensor,
    steps: int = 50,
    cond: TextCond | None = None,
) -> torch.Tensor:
    """m(ep) at the sampler's first step and x_T, per image: the PRSS trigger statistic (at detect_step 1).

    One [e0, ep] UNet call, the same one :func:`sample` makes at step 1, so it equals the
    reports' ``magnitude``.
    """
    return step_magnitude(eps_fn, encode, scheduler_config, prompts, x_T, steps, 1, cond=cond)


def step_magnitude(
    eps_fn: EpsFn,
    encode: EncodeFn,
    scheduler_config: Mapping[str, Any],
    prompts: Sequence[str],
    x_T: torch.Tensor,
    steps: int,
    at_step: int,
    guidance_scale: float = 7.5,
    cond: TextCond | None = None,
) -> torch.Tensor:
    """m(ep) at step ``at_step`` (from 1) of the undefended CFG trajectory from x_T, per image.

    The trigger statistic of ``detect_step = at_step`` (equal to the reports'
    ``detect_magnitude``), at the cost of ``at_step`` steps rather than a whole trajectory: the
    sampler's own calls and arithmetic, stopped there. The guidance scale matters from step 2.
    """
    if not 1 <= at_step <= steps:
        raise ValueError(f"at_step {at_step} is not a step of {steps}-step sampling")
    device = x_T.device
    sched = make_scheduler(scheduler_config, steps, device)
    with torch.no_grad():
        uncond = uncond_batch(encode, len(prompts), device)
        ep = cond.to(device) if cond is not None else encode_batch(encode, [str(p) for p in prompts], device)
        x = x_T
        for i, t in enumerate(sched.timesteps[:at_step]):
            eps_0, eps_p = first_step_eps(eps_fn, sched.scale_model_input(x, t), t, uncond, ep)
            if i == at_step - 1:
                return magnitude(eps_p, eps_0)
            x = sched.step(cfg_eps(eps_0, eps_p, float(guidance_scale)), t, x, eta=0.0).prev_sample
    raise AssertionError("unreachable")
