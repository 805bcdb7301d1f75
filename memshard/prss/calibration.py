"""Privacy levels for PRSS: thresholds calibrated on a model's own magnitudes.

The spec's thresholds (lambda_ss 1, lambda_pr 3, tau 5) are on Stable Diffusion v1.4's
scale; the magnitude m = ||eps(x, prompt) - eps(x, "")|| of another model lives on its own
scale, so a threshold only means something relative to that model's distribution. A
privacy level is therefore a quantile q of reference prompts' magnitudes:

* lambda_ss = the q-quantile of their first-step magnitudes (so about 1 - q of such prompts
  trigger),
* lambda_pr = the q-quantile of their per-step magnitudes along the undefended trajectory,
* tau = lambda_pr * 5/3, the spec's tau / lambda_pr.

Against benign (held-out) prompts, q is one minus the false-trigger rate; against the
training captions themselves, 1 - q is the share of the most memorization-prone captions
flagged. ``memshard calibrate-prss RUN`` writes ``RUN/prss/calibration.json``, which
``memshard sample`` uses when no threshold is given on the command line.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

TAU_RATIO = 5.0 / 3.0  # spec defaults: tau / lambda_pr


def level(first: Sequence[float] | np.ndarray, per_step: Sequence[float] | np.ndarray, q: float) -> dict[str, float]:
    """Thresholds of privacy level ``q`` from first-step and per-step magnitudes of reference prompts."""
    if not 0 < q < 1:
        raise ValueError(f"privacy level quantile must be in (0, 1), got {q}")
    first_a, steps_a = np.asarray(first, dtype=np.float64), np.asarray(per_step, dtype=np.float64)
    if first_a.size == 0 or steps_a.size == 0:
        raise ValueError("need magnitudes of at least one reference prompt")
    lpr = float(np.quantile(steps_a, q))
    return {"q": q, "lambda_ss": float(np.quantile(first_a, q)), "lambda_pr": lpr, "tau": lpr * TAU_RATIO}


def reference_magnitudes(
    pipe: Any,
    prompts: Sequence[str],
    seeds: Sequence[int],
    steps: int,
    batch_size: int = 32,
    guidance_scale: float = 7.5,
) -> tuple[np.ndarray, np.ndarray]:
    """(first-step m per image, every per-step m) of ``prompts`` sampled undefended by ``pipe``."""
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


def calibrate_run(
    run: str,
    q: float = 0.95,
    num_prompts: int = 64,
    steps: int = 50,
    seed: int = 0,
    guidance_scale: float | None = None,
) -> dict[str, Any]:
    """Calibrate a text-to-image run's thresholds on its own training captions; writes RUN/prss/calibration.json."""
    from memshard.data import load_captions
    from memshard.io.rundir import RunDir
    from memshard.prss.pipeline import load_served_t2i

    rd = RunDir(run)
    manifest = rd.manifest()
    if manifest is None:
        raise FileNotFoundError(f"{run}: no run (run.json missing)")
    ids, _ = rd.read_assignment(0)
    captions = sorted({c for c in load_captions(manifest["data_uri"], np.sort(ids)) if c.strip()})
    if not captions:
        raise ValueError(f"{run}: the training set has no non-empty captions")
    rng = np.random.default_rng(seed)
    chosen = [captions[i] for i in sorted(rng.choice(len(captions), min(num_prompts, len(captions)), replace=False))]
    rd.check_served()
    with rd.store.local_copy("served") as local:
        pipe = load_served_t2i(local)
        if torch.cuda.is_available():
            pipe.to("cuda")
        if guidance_scale is None:
            from memshard.config import build_config

            guidance_scale = build_config(manifest["config"]).prss.guidance_scale
        first, per_step = reference_magnitudes(
            pipe, chosen, list(range(len(chosen))), steps, guidance_scale=guidance_scale
        )
    out = {
        **level(first, per_step, q),
        "reference": f"{len(chosen)} training captions of the run",
        "steps": steps,
        "guidance_scale": guidance_scale,
        "first_step_quantiles": {str(p): float(np.quantile(first, p)) for p in (0.5, 0.9, 0.95, 0.99)},
    }
    rd.store.write_text("prss/calibration.json", json.dumps(out, indent=2))
    return out


def load_calibration(run: str) -> dict[str, Any] | None:
    from memshard.io.storage import Storage

    store = Storage(run)
    if not store.exists("prss/calibration.json"):
        return None
    return json.loads(store.read_text("prss/calibration.json"))
