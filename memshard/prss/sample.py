"""`memshard sample` for text-to-image runs: prompts in, images and a per-image PRSS report out.

Output directory layout::

    OUT/images/00000.png ...   one PNG per generation
    OUT/grid.png               all generations tiled
    OUT/report.jsonl           one JSON object per image: prompt, seed, magnitude, triggered,
                               chosen_prompt, pr_steps, candidates_scored, mode / mitigation
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import torch
from PIL import Image

from memshard.config import PRSSConfig
from memshard.data import DataError
from memshard.io.storage import Storage
from memshard.models.sampling import grid, to_uint8
from memshard.seeds import image_seeds

MAX_PROMPT_CHARS = 2000


def check_prompts(prompts: Sequence[str], tokenizer: Any = None) -> None:
    """Refuse empty prompts and prompts longer than the model can read, naming the offending one."""
    if not prompts:
        raise ValueError("no prompts given (--prompt TEXT or --prompts-file FILE)")
    limit = getattr(tokenizer, "model_max_length", None) if tokenizer is not None else None
    for i, p in enumerate(prompts):
        if not isinstance(p, str) or not p.strip():
            raise ValueError(f"prompt {i} is empty")
        if len(p) > MAX_PROMPT_CHARS:
            raise ValueError(f"prompt {i} has {len(p)} characters (at most {MAX_PROMPT_CHARS})")
        try:
            p.encode("utf-8")
        except UnicodeEncodeError:  # a lone surrogate ("\ud800" in JSON): no tokenizer can read it
            raise ValueError(f"prompt {i} is not valid Unicode text (it holds a lone surrogate)") from None
        if limit is not None and limit < 100_000:
            n = len(tokenizer(p, truncation=False)["input_ids"])
            if n > limit:
                raise ValueError(f"prompt {i} ({p[:40]!r}...) has {n} tokens; the text encoder reads at most {limit}")


def read_prompts(path: str) -> tuple[list[str], list[list[str]] | None]:
    """Prompts (and per-prompt candidate lists) from a text file (one a line) or Parquet.

    Parquet: a ``prompt`` (or ``caption``) string column and, optionally, a ``candidates``
    column of string lists (the explicit-list provider).
    """
    store_dir, name = os.path.split(path)
    store = Storage(store_dir or ".")
    if not store.exists(name):
        raise FileNotFoundError(f"prompts file {path} does not exist")
    if path.endswith(".parquet"):
        try:
            table = pq.read_table(store.open_input(name))
        except Exception as exc:
            raise DataError(f"prompts file {path}: not readable Parquet ({exc})") from None
        col = "prompt" if "prompt" in table.column_names else "caption" if "caption" in table.column_names else None
        if col is None:
            raise DataError(f"prompts file {path}: needs a 'prompt' (or 'caption') column")
        prompts = [str(p) if p is not None else "" for p in table.column(col).to_pylist()]
        cands = None
        if "candidates" in table.column_names:
            cands = [[str(c) for c in (row or [])] for row in table.column("candidates").to_pylist()]
        return prompts, cands
    lines = [ln.strip() for ln in store.read_text(name).splitlines()]
    return [ln for ln in lines if ln], None


@dataclass
class SampleRequest:
    """One `memshard sample` call for a text-to-image run."""

    prompts: list[str]
    num_per_prompt: int = 1
    steps: int = 50
    seed: int = 0
    batch_size: int = 16
    prss: PRSSConfig = field(default_factory=PRSSConfig)
    candidate_lists: list[list[str]] | None = None
    mitigation: str | None = None
    mitigation_params: dict[str, Any] = field(default_factory=dict)
    weights: str = "ema"


def provider_for(req: SampleRequest, pipe: Any) -> Any:
    """The candidate source: explicit lists, a MiniLM-searched bank, or the rule-based perturber."""
    from memshard.prss.candidates import make_provider

    if req.candidate_lists is not None:
        lists = [c for c in req.candidate_lists for _ in range(req.num_per_prompt)]
        return lists
    kind = req.prss.candidates
    if kind == "bank":
        from memshard.models.text import load_text_encoder

        enc = load_text_encoder("minilm", 64)
        return make_provider("bank", bank=req.prss.bank, embed=enc.embed, seed=req.seed)
    if kind == "list":
        raise ValueError("prss.candidates=list needs candidate lists (a 'candidates' column in --prompts-file)")
    return make_provider(kind, seed=req.seed)


def sample_run(run: str, req: SampleRequest, out: str) -> list[dict[str, Any]]:
    """Generate for every prompt with the run's served pipeline; write images, grid and report."""
    from memshard.io.rundir import RunDir
    from memshard.prss.pipeline import load_served_t2i

    store = Storage(run)
    RunDir(run).check_served()  # safetensors weights that fit the config, before anything is copied or loaded
    with store.local_copy("served") as local:
        sub = "unet_raw" if req.weights == "raw" and os.path.isdir(os.path.join(local, "unet_raw")) else "unet"
        pipe = load_served_t2i(local, sub)
    check_prompts(req.prompts, pipe.tokenizer)
    if torch.cuda.is_available():
        pipe.to("cuda")
    provider = provider_for(req, pipe)
    prompts = [p for p in req.prompts for _ in range(req.num_per_prompt)]
    seeds = image_seeds(req.seed, len(prompts))
    os.makedirs(os.path.join(out, "images"), exist_ok=True)
    reports: list[dict[str, Any]] = []
    images: list[np.ndarray] = []
    p = req.prss
    for start in range(0, len(prompts), req.batch_size):
        sl = slice(start, start + req.batch_size)
        cands = provider[sl] if isinstance(provider, list) else provider
        res = pipe(
            prompts[sl], num_inference_steps=req.steps, guidance_scale=p.guidance_scale, output_type="pt",
            prss=p.enabled, lambda_ss=p.lambda_ss, lambda_pr=p.lambda_pr, tau=p.tau, prss_mode=p.mode,
            candidates=cands, num_candidates=p.num_candidates, seeds=seeds[sl],
            detect_step=p.detect_step, restart=p.restart, pr_profile=p.pr_profile,
            mitigation=req.mitigation, mitigation_params=req.mitigation_params,
        )  # fmt: skip
        batch = to_uint8(res.images)
        for j, (img, rep) in enumerate(zip(batch, res.report, strict=True)):
            idx = start + j
            Image.fromarray(img[..., 0] if img.shape[-1] == 1 else img).save(
                os.path.join(out, "images", f"{idx:05d}.png")
            )
            rep = {k: v for k, v in rep.items() if k not in ("candidate_magnitudes", "m_steps")}
            rep["sampled_prompt"] = rep.get("prompt", prompts[idx])  # what a prompt-editing baseline sampled
            reports.append({"index": idx, "seed": seeds[idx], **rep, "prompt": prompts[idx]})
        images.append(batch)
    grid(np.concatenate(images), scale=max(1, 128 // images[0].shape[1])).save(os.path.join(out, "grid.png"))
    with open(os.path.join(out, "report.jsonl"), "w") as fh:
        for rep in reports:
            fh.write(json.dumps(rep, default=float) + "\n")
    return reports
