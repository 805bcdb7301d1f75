"""Privacy levels for PRSS: thresholds calibrated on a model's own magnitudes.

The spec's thresholds (lambda_ss 1, lambda_pr 3, tau 5) are on Stable Diffusion v1.4's
scale; the magnitude m = ||eps(x, prompt) - eps(x, "")|| of another model lives on its own
scale, so a threshold only means something relative to that model's distribution. A
privacy level is therefore a quantile q of reference prompts' magnitudes:

* lambda_ss = the q-quantile of their first-step magnitudes (so about 1 - q of such prompts
  trigger; magnitudes at the detection step when that is not the first, see below),
* lambda_pr = the q-quantile of their per-step magnitudes along the undefended trajectory,
* tau = lambda_pr * 5/3, the spec's tau / lambda_pr.

Against benign (held-out) prompts, q is one minus the false-trigger rate; against the
training captions themselves, 1 - q is the share of the most memorization-prone captions
flagged.

A privacy level can instead be stated as the share of memorized prompts to defend
(:func:`defended_level`): thresholds from the magnitudes of memorized prompts' own
trajectories, the first step for lambda_ss and every step for lambda_pr, so that a level
of 0.9 triggers on 9 in 10 memorized prompts and re-anchors on 9 in 10 of their steps. A
model owner has those prompts: the captions their training set holds many times. This is
the default of ``memshard calibrate-prss RUN`` (``--defend 0.9``; ``--quantile`` for the
first kind), which writes ``RUN/prss/calibration.json``; ``memshard sample`` uses it when
no threshold is given on the command line.

The detection step. lambda_ss is a threshold on m at the step that triggers, the first in
the spec. :func:`detection_step` picks a later one where the first does not separate the
duplicated captions from the once-seen ones; the calibration then states lambda_ss on that
step's magnitudes and records the step (``detect_step``, for ``steps``-step sampling), and
the sampler and the server apply the two together.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

TAU_RATIO = 5.0 / 3.0  # spec defaults: tau / lambda_pr


def _thresholds(
    first: Sequence[float] | np.ndarray, per_step: Sequence[float] | np.ndarray, quantile: float, whose: str
) -> dict[str, float]:
    """lambda_ss, lambda_pr and tau at one quantile of first-step and per-step magnitudes (``whose``: for errors)."""
    first_a, steps_a = np.asarray(first, dtype=np.float64), np.asarray(per_step, dtype=np.float64)
    if first_a.size == 0 or steps_a.size == 0:
        raise ValueError(f"need magnitudes of at least one {whose} prompt")
    lpr = float(np.quantile(steps_a, quantile))
    return {"lambda_ss": float(np.quantile(first_a, quantile)), "lambda_pr": lpr, "tau": lpr * TAU_RATIO}


def level(first: Sequence[float] | np.ndarray, per_step: Sequence[float] | np.ndarray, q: float) -> dict[str, float]:
    """Thresholds of privacy level ``q`` from first-step and per-step magnitudes of reference prompts."""
    if not 0 < q < 1:
        raise ValueError(f"privacy level quantile must be in (0, 1), got {q}")
    return {"q": q, **_thresholds(first, per_step, q, "reference")}


def defended_level(
    mem_first: Sequence[float] | np.ndarray,
    mem_per_step: Sequence[float] | np.ndarray,
    defend: float,
    heldout_first: Sequence[float] | np.ndarray | None = None,
) -> dict[str, float]:
    """Thresholds that defend a share ``defend`` of memorized prompts, from their own trajectories.

    lambda_ss = the (1 - defend)-quantile of memorized prompts' first-step magnitudes (the
    trigger is m > lambda_ss, so about ``defend`` of them trigger); lambda_pr = the
    (1 - defend)-quantile of their per-step magnitudes (re-anchoring acts on about that
    share of a memorized trajectory's steps); tau = lambda_pr * 5/3. With
    ``heldout_first`` the cost is reported too: the share of benign prompts that trigger.
    """
    if not 0 < defend < 1:
        raise ValueError(f"share of memorized prompts to defend must be in (0, 1), got {defend}")
    out = {"defend": defend, **_thresholds(mem_first, mem_per_step, 1 - defend, "memorized")}
    out["memorized_triggered"] = float(np.mean(np.asarray(mem_first, dtype=np.float64) > out["lambda_ss"]))
    if heldout_first is not None:
        held = np.asarray(heldout_first, dtype=np.float64)
        out["heldout_triggered"] = float(np.mean(held > out["lambda_ss"])) if held.size else float("nan")
    return out


def per_step_level(
    mem_steps: np.ndarray,
    defend: float,
    heldout_first: Sequence[float] | np.ndarray | None = None,
    detect_step: int = 1,
) -> dict[str, Any]:
    """:func:`defended_level` with re-anchoring thresholds that follow the trajectory's own scale.

    ``mem_steps``: memorized prompts' undefended trajectories, (prompts x seeds, steps). The
    profile is the median m_t at each step over its median over all steps; lambda_pr is the
    (1 - defend)-quantile of m_t / profile pooled over steps, so at step t the threshold is
    lambda_pr * profile[t] (``pr_profile`` of :class:`~memshard.prss.sampler.PRSSOptions`) and
    re-anchoring acts on about ``defend`` of a memorized trajectory's steps wherever they lie,
    instead of on its late steps only when m_t grows along the trajectory. lambda_ss (the trigger)
    is :func:`defended_level`'s, from m at ``detect_step`` (``heldout_first``: benign prompts' m
    at that step).
    """
    ms = np.asarray(mem_steps, dtype=np.float64)
    if ms.ndim != 2 or ms.size == 0:
        raise ValueError(f"need memorized trajectories as a (prompts, steps) array, got shape {ms.shape}")
    med = np.median(ms, axis=0)
    profile = np.maximum(med / np.median(med), 1e-6)
    if not 1 <= detect_step <= ms.shape[1]:
        raise ValueError(f"detect_step {detect_step} is not a step of these {ms.shape[1]}-step trajectories")
    out = defended_level(ms[:, detect_step - 1], ms / profile, defend, heldout_first)
    out["pr_profile"] = [round(float(v), 6) for v in profile]
    return out


def reference_magnitudes(
    pipe: Any,
    prompts: Sequence[str],
    seeds: Sequence[int],
    steps: int,
    batch_size: int = 32,
    guidance_scale: float = 7.5,
) -> tuple[np.ndarray, np.ndarray]:
    """(first-step m per image, every per-step m) of ``prompts`` sampled undefended by ``pipe``.

    The per-step array is flat, image by image: ``reshape(len(prompts), steps)`` gives trajectories.
    """
    from memshard.prss.sampler import PRSSOptions, sample

    first, per_step = [], []
    sched = dict(pipe.scheduler.config)
    for b in range(0, len(prompts), batch_size):
        p, s = list(prompts[b : b + batch_size]), list(seeds[b : b + batch_size])
        _, reps = sample(
            pipe.eps, pipe.encode_prompts, sched, p, pipe.initial_noise(len(p), s), steps,
            options=PRSSOptions(enabled=False, guidance_scale=guidance_scale), record_steps=True,
        )  # fmt: skip
        first += [r["magnitude"] for r in reps]
        per_step += [m for r in reps for m in r["m_steps"]]
    return np.asarray(first), np.asarray(per_step)


DEFAULT_DEFEND = 0.9  # calibrate-prss's default level: defend 9 in 10 of the run's duplicated captions


def duplicated_captions(captions: Sequence[str], min_copies: int = 2) -> tuple[list[str], list[str]]:
    """(captions held at least ``min_copies`` times, most copies first; captions held once), blanks dropped.

    The duplicated ones are the prompts a model memorizes first (LAION's lesson), so they are
    the reference a privacy level is stated against; the once-seen ones are the benign side.
    """
    from collections import Counter

    counts = Counter(c for c in captions if c.strip())
    dup = sorted((c for c, n in counts.items() if n >= min_copies), key=lambda c: (-counts[c], c))
    return dup, sorted(c for c, n in counts.items() if n == 1)


def calibrate_run(
    run: str,
    q: float | None = None,
    num_prompts: int = 64,
    steps: int = 50,
    seed: int = 0,
    guidance_scale: float | None = None,
    defend: float | None = None,
    seeds_per_prompt: int = 2,
    detect_step: int | None = None,
    per_step: bool = True,
) -> dict[str, Any]:
    """Calibrate a text-to-image run's thresholds on its own training captions; writes RUN/prss/calibration.json.

    By default (neither ``q`` nor ``defend``) the level defends DEFAULT_DEFEND of the run's
    duplicated captions: thresholds from the undefended trajectories of up to ``num_prompts``
    of its most duplicated captions (``seeds_per_prompt`` seeds each), with the share of
    once-seen captions that would trigger reported as the cost. A training set without
    duplicated captions, or an explicit ``q``, falls back to the quantile level over
    ``num_prompts`` random training captions (about 1 - q of them trigger).

    The trigger reads m at ``detect_step``; None (the default) picks it on the defended level:
    the step of the first quarter where the duplicated captions' m_t best separates them from
    the once-seen ones (:func:`detection_step`), 1 when there is nothing to compare. lambda_ss
    is then calibrated on that step's magnitudes; ``memshard sample`` and the server apply the
    step with the thresholds.

    ``per_step`` (the default; the defended level only): re-anchoring thresholds that follow m_t's
    per-step scale (:func:`per_step_level`, written as ``pr_profile``); False: one lambda_pr for
    every step, the spec's rule. On the PRSS benchmark's shapes model at CFG 3 the per-step form
    reached alignment 0.67-0.71 where the one-threshold form reached 0.41-0.65, at the same
    triggers (BENCHMARKS.md, PRSS 4d).
    """
    from memshard.data import load_captions
    from memshard.io.rundir import RunDir
    from memshard.prss.pipeline import load_served_t2i

    rd = RunDir(run)
    manifest = rd.manifest()
    if manifest is None:
        raise FileNotFoundError(f"{run}: no run (run.json missing)")
    ids, _ = rd.read_assignment(0)
    all_caps = load_captions(manifest["data_uri"], np.sort(ids))
    dup, once = duplicated_captions(all_caps)
    captions = sorted({c for c in all_caps if c.strip()})
    if not captions:
        raise ValueError(f"{run}: the training set has no non-empty captions")
    rng = np.random.default_rng(seed)

    def pick(pool: list[str]) -> list[str]:
        return [pool[i] for i in sorted(rng.choice(len(pool), min(num_prompts, len(pool)), replace=False))]

    if detect_step is not None and not 1 <= detect_step <= steps:
        raise ValueError(f"detect_step {detect_step} is not a step of {steps}-step sampling")
    by_share = q is None and (defend is not None or bool(dup))
    if by_share and not dup:  # before any model is loaded
        raise ValueError(
            f"{run}: no caption occurs twice in the training set, so there are no duplicated captions to "
            "defend; state the level as a quantile instead (--quantile)"
        )
    rd.check_served()
    with rd.store.local_copy("served") as local:
        pipe = load_served_t2i(local)
        if torch.cuda.is_available():
            pipe.to("cuda")
        if guidance_scale is None:
            from memshard.config import build_config

            guidance_scale = build_config(manifest["config"]).prss.guidance_scale
        detection: dict[str, Any] = {}
        if by_share:
            mem = [c for c in dup[:num_prompts] for _ in range(seeds_per_prompt)]
            first, per_step_m = reference_magnitudes(
                pipe, mem, list(range(len(mem))), steps, guidance_scale=guidance_scale
            )
            mem_steps = per_step_m.reshape(len(mem), steps)
            benign = pick(once) if once else []
            held_steps = (
                reference_magnitudes(pipe, benign, list(range(len(benign))), steps, guidance_scale=guidance_scale)[
                    1
                ].reshape(len(benign), steps)
                if benign
                else None
            )
            k = detect_step or 1
            if held_steps is not None:
                best, by_step = detection_step(mem_steps, held_steps)
                k = detect_step or best
                detection = {"detect_auc": by_step[k - 1], "auc_by_step": by_step}
            held_k = None if held_steps is None else held_steps[:, k - 1]
            out = {
                **(
                    per_step_level(mem_steps, defend or DEFAULT_DEFEND, held_k, detect_step=k)
                    if per_step
                    else defended_level(mem_steps[:, k - 1], per_step_m, defend or DEFAULT_DEFEND, held_k)
                ),
                "reference": f"{min(len(dup), num_prompts)} most duplicated training captions x {seeds_per_prompt} "
                f"seeds; cost on {len(benign)} once-seen captions",
            }  # fmt: skip
        else:
            chosen = pick(captions)
            first, per_step_m = reference_magnitudes(
                pipe, chosen, list(range(len(chosen))), steps, guidance_scale=guidance_scale
            )
            k = detect_step or 1
            at_k = per_step_m.reshape(len(chosen), steps)[:, k - 1]
            out = {**level(at_k, per_step_m, q or 0.95), "reference": f"{len(chosen)} training captions of the run"}
    out.update(
        {
            "detect_step": k,
            **detection,
            "steps": steps,
            "guidance_scale": guidance_scale,
            "first_step_quantiles": {str(p): float(np.quantile(first, p)) for p in (0.5, 0.9, 0.95, 0.99)},
        }
    )
    rd.store.write_text("prss/calibration.json", json.dumps(out, indent=2))
    return out


def load_calibration(run: str) -> dict[str, Any] | None:
    from memshard.io.storage import Storage

    store = Storage(run)
    if not store.exists("prss/calibration.json"):
        return None
    return json.loads(store.read_text("prss/calibration.json"))


DETECT_WINDOW = 0.25  # a detection step is sought among the first quarter of the steps (a restart repeats them)


def auc_by_step(mem_steps: np.ndarray, benign_steps: np.ndarray) -> list[float]:
    """AUC of m_t at each step: memorized trajectories (rows) against benign ones, higher m = memorized."""
    from memshard.prss.mitigations import auc

    return [round(auc(a, b), 4) for a, b in zip(mem_steps.T, benign_steps.T, strict=True)]


def detection_step(
    mem_steps: np.ndarray, benign_steps: np.ndarray, window: float = DETECT_WINDOW
) -> tuple[int, list[float]]:
    """(step from 1, AUC by step): where m_t best separates memorized from benign trajectories.

    Sought among the first ``window`` of the steps: the spec detects at step 1, where Wen et
    al. find the signal on Stable Diffusion, but on a model that memorized by long training
    the first-step magnitude can fail (BENCHMARKS.md, PRSS: AUC 0.45 at step 1, 0.86 at
    step 11) while a few steps in it separates them; later steps would defend too late (or,
    with a restart, cost too many repeated steps). Ties go to the earliest step.
    """
    by_step = auc_by_step(np.asarray(mem_steps), np.asarray(benign_steps))
    return int(np.argmax(by_step[: detect_window(len(by_step), window)])) + 1, by_step


def detect_window(steps: int, window: float = DETECT_WINDOW) -> int:
    """How many of the first steps :func:`detection_step` searches (at least one)."""
    return max(1, int(steps * window))


def scale_detect_step(detect_step: int, from_steps: int, to_steps: int) -> int:
    """The detection step calibrated for ``from_steps`` sampling steps, for a sampler of ``to_steps``.

    Same share of the trajectory (so about the same noise level), clamped to [1, to_steps].
    """
    k = 1 + round((detect_step - 1) * to_steps / from_steps)
    return max(1, min(to_steps, k))


def calibration_detection(calibration: dict[str, Any]) -> dict[str, int | None]:
    """The detection step that comes with a calibration, and the step count it was chosen for.

    lambda_ss is on the scale of the step it was calibrated at, so whoever uses a calibration's
    lambda_ss (``memshard sample``, the server) takes these with it, as PRSSConfig's
    ``detect_step`` and ``detect_reference_steps``. Files written before detection steps: step 1,
    of no fixed count (every file that names a step also names its count).
    """
    steps = calibration.get("steps")
    return {"detect_step": int(calibration.get("detect_step", 1)),
            "detect_reference_steps": None if steps is None else int(steps)}  # fmt: skip
