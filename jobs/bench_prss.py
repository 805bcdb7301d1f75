"""The inference-time benchmark: PRSS against undefended sampling and the published baselines.

A text-to-image model is trained (plain training, one model) on emoji (or, with
``--size-set source=shapes``, on :mod:`memshard.data.shapes`, whose captions compose) where a set of
image-caption pairs is duplicated many times, as in LAION, so it memorizes them; other
pairs appear once and a held-out set never. Then, on the memorized prompts, every method
samples from the same seeds:

* ``none`` (undefended CFG), ``random_token`` (Somepalli et al.), ``gaussian_noise`` on the
  prompt embedding, ``wen`` (Wen et al. embedding optimisation);
* ``pr`` (re-anchoring only), ``ss`` (semantic search only), ``prss`` at several privacy
  levels (thresholds);
* ``prss-late`` and ``prss-restart``: PRSS at the same levels with detection at a later
  step (the first-quarter step whose magnitude best separates memorized from held-out
  calibration trajectories), guidance switched from there or the image sampled again.

Reported per method: copy similarity (correlation of mean-centred pixels, max over the
training set; mean, p95, fraction over the calibrated threshold: :class:`Judge` says why not
Inception pool3 at 16 px), the pixel 1/3-rule memorized fraction, alignment
with the ORIGINAL prompt (the project's contrastive MiniLM/CNN model trained on the
training pairs, its held-out retrieval accuracy reported), how many prompts triggered, and
sampling time relative to plain CFG. Also detection (Wen et al.'s first-step magnitude:
AUC and TPR at 1% FPR, memorized vs held-out prompts, with 1 and 4 generations per
prompt), the cost of PRSS on untriggered prompts, and the combined system: IET-AGC+
training plus PRSS sampling against plain training plus plain sampling, and against plain
training stopped early (every committed round of the undefended model, at matched alignment).

Privacy levels. The spec's thresholds (lambda_ss 1, lambda_pr 3, tau 5) are on SD v1.4's
scale; a small model's magnitudes are on another one, so a level is the share of memorized
prompts to defend, calibrated on those prompts' own undefended trajectories (other seeds
than the test's): lambda_ss = the (1 - level)-quantile of their first-step magnitudes,
lambda_pr = the same quantile of their per-step magnitudes, tau = lambda_pr * 5/3 (the
spec's tau/lambda_pr). The held-out prompts that trigger at each level are the cost.

    python jobs/bench_prss.py --size cpu --out runs/bench-prss-cpu --publish
    python jobs/bench_prss.py --out runs/prss-drop1 --stage model --size-set caption_dropout=0.1 --skip-levers
    python jobs/bench_prss.py --size cpu --out runs/prss-long --stage model \
        --size-set init_from=runs/bench-prss-cpu/baseline --size-set train_steps=4000

Resumable: finished trainings, calibration, detection and every method's generations are
kept under OUT; run the same command again. ``--time-budget-s`` bounds one call (exit 3
when it stopped early), so the ``gpu`` size runs in 9-minute calls.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from memshard.config import load_config
from memshard.runtime.driver import connect, train
from memshard.runtime.progress import console


@dataclass(frozen=True)
class Size:
    image_size: int
    preset: str
    num_memorized: int  # captions duplicated ``duplicates`` times each
    duplicates: int
    num_single: int  # captions seen once
    num_heldout: int  # captions never seen (detection negatives, threshold calibration)
    train_steps: int  # total optimizer steps of each training
    batch_size: int
    lr: float
    shards: int  # IET-AGC+ arm of the combined system
    gens_per_prompt: int
    sample_steps: int
    cpus: float
    align_steps: int = 400
    # CFG scale of every arm: the spec's 7.5 (Stable Diffusion's), the regime PRSS is for.
    # Neither cpu model holds it (their samples turn to colour noise), so they run at 1.5.
    guidance_scale: float = 7.5
    caption_dropout: float = 0.1  # share of training captions replaced by the empty prompt
    # what the UNet predicts: epsilon (the published runs) or v_prediction (Salimans & Ho; Lin et al.
    # pair it with guidance rescale against over-exposure at high CFG): a lever on the high-CFG failure
    prediction_type: str = "epsilon"
    max_text_length: int = 16
    gpus: float = 0.0  # GPUs of the whole training run (split over the shards); sampling then uses CUDA
    # warm start of the undefended model (train.init_from: RUN or RUN@ROUND trained on the same
    # split), e.g. to continue it for train_steps more steps in a calibration run of its own --out
    init_from: str = ""
    # warm start of the IET-AGC+ arm: an IET-AGC+ run on the same split, continued for train_steps.
    # Empty: the arm never inherits the undefended model (its memorization would come with it), so
    # with init_from set it trains from scratch for as many steps as the undefended model has in all.
    plus_init_from: str = ""
    # rounds of each training: the plain-training checkpoints the combined system is compared with
    # (the early-stopping frontier) are its rounds, so more rounds place E(a) more finely; the
    # IET-AGC+ arm then also migrates and re-augments more often (between each of its rounds)
    rounds: int = 4
    # the captioned images: "emoji" (once-seen names: the published runs) or "shapes" (memshard.data.shapes:
    # captions whose words recur, so held-out prompts can be followed, and per-image texture to copy)
    source: str = "emoji"


SOURCES = ("emoji", "shapes")  # the captioned sets a size may train on (memshard.data.prepare sources)

# the model, data and sampling fields ``--size-set`` may change (calibration runs)
SETTABLE = (
    "image_size",
    "preset",
    "num_memorized",
    "duplicates",
    "num_single",
    "num_heldout",
    "train_steps",
    "batch_size",
    "lr",
    "gens_per_prompt",
    "sample_steps",
    "cpus",
    "shards",
    "guidance_scale",
    "caption_dropout",
    "prediction_type",
    "init_from",
    "plus_init_from",
    "rounds",
    "source",
)


SIZES = {
    # the first cpu size (published until this issue): tiny UNet, 64 distinct training images
    "cpu-tiny": Size(16, "tiny", 24, 10, 40, 64, 6000, 32, 5e-4, 4, 2, 50, 1.0, guidance_scale=1.5),
    # the attempt at PRSS's regime: a 2M UNet, a stronger unconditional branch (dropout 0.2)
    # and enough distinct captions that held-out prompts have something to generalise from.
    # Measured (the regime and lever tables in BENCHMARKS.md): it copies its duplicated images
    # at CFG 1.5 (98% of generations) but turns them to colour noise from CFG 3 up, with or
    # without guidance rescale, dynamic thresholding, raw weights or a guidance interval; 20,000 steps of
    # training move it towards the regime, slowly; caption dropout 0.4 moves it away, 0.1 and 0.05 towards it
    # (8,000 / 12,000 steps at 0.1 ~ 12,000 / 20,000 at 0.2; 8,000 at 0.05 ~ 12,000 at 0.1 at CFG 5-7.5) and
    # v-prediction far away (BENCHMARKS.md; the published cpu results keep 0.2 and epsilon);
    # so the methods run at 1.5 (the 20,000-step model was also measured at 3 and 5: --size-set guidance_scale).
    "cpu": Size(16, "small", 24, 20, 1200, 200, 8000, 32, 1e-3, 4, 2, 50, 1.0, guidance_scale=1.5, caption_dropout=0.2),
    # ready, not run (no GPU was lent): a 25M UNet at 32 px, 100 memorized captions x20, 30,000 steps
    # at batch 64 (1,400 of the 1,581 distinct images at 32 px); in 9-minute calls with --time-budget-s 540.
    # Caption dropout 0.1 (Stable Diffusion's): on the cpu model 0.1 and 0.05 held high CFG sooner than 0.2
    # (section 1 of BENCHMARKS.md's PRSS benchmark); 0.05 is unmeasured at this model's size, 0.1 the safer one
    "gpu": Size(32, "base", 100, 20, 1050, 250, 30000, 64, 1e-3, 4, 4, 50, 4.0, 800, caption_dropout=0.1, gpus=1.0),
    # the test suite's size: every code path, no claim about the numbers
    "toy": Size(16, "tiny", 4, 3, 8, 8, 32, 8, 1e-3, 2, 2, 4, 2.0, align_steps=20),
}
# Privacy levels: the share of memorized prompts to defend (calibration.defended_level),
# least to most private; MID_LEVEL is the one the single-level arms (pr, ss, providers) use.
DEFEND_LEVELS = (0.5, 0.75, 0.9, 0.97)
MID_LEVEL = 0.9
# Candidate providers reported; the PRSS levels use DEFAULT_PROVIDER (`memshard sample` keeps `perturb`:
# the bank did not beat the baselines' trade-off here, BENCHMARKS.md).
PROVIDERS = ("bank", "perturb", "list")
DEFAULT_PROVIDER = "bank"
# shapes only: exact paraphrases as a user's list; PRSS at every level and SS alone with them
PARAPHRASE = "paraphrase"
# PRSS with fewer candidates scored (the spec's 25 is num_candidates' default): the cost of a triggered image
FEW_CANDIDATES = 8
# matched alignment for the combined system: within 5% of plain training's best (the frontier's 1.05 x FID)
MATCHED_ALIGNMENT = 0.95
FRONTIER_KEYS = ("round", "steps", "alignment", "copy_over", "memorized_fraction")
RANDOM_TOKENS = (1, 2, 4, 8)  # random_token's k, weakest to strongest
NOISE_SIGMAS = (0.1, 0.3, 1.0)  # gaussian_noise's sigma on the token states
WEN_LEVELS = (0.5, 0.9, 0.97)  # Wen et al. optimise down to lambda_ss of these levels
# Benchmark images are mutually distinct: no two with pixel correlation (PixelExtractor cosine) at or above
# this at the size's resolution. 16 px emoji: 1,910 distinct captions, 1,491 of them pass (0.95 would keep 1,689).
DISTINCT_NCC = 0.9
MODEL_SUMMARY = "model-summary.json"  # what --stage model writes (summary.json stays the full benchmark's)
INCOMPLETE_EXIT = 3  # a --time-budget-s call that stopped early; run the same command again
RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "docs", "results")


class BudgetSpent(Exception):
    """This call's --time-budget-s is spent; the next call continues from what is cached."""


# ----------------------------------------------------------------------------- data


def build_data(size: Size, out: str, seed: int = 0) -> dict[str, Any]:
    """The source's captions split into memorized (duplicated), single and held-out ones; training Parquet written."""
    from memshard.data import prepare

    path = os.path.join(out, "data")
    os.makedirs(path, exist_ok=True)
    split_file = os.path.join(path, "split.json")
    shape = {k: getattr(size, k) for k in ("image_size", "num_memorized", "duplicates", "num_single", "num_heldout")}
    shape["distinct_ncc"] = DISTINCT_NCC
    if size.source != "emoji":  # the published emoji runs' splits carry no source
        shape["source"] = size.source
    if os.path.exists(split_file):
        split = json.loads(open(split_file).read())
        if split.get("shape", shape) != shape:
            raise SystemExit(
                f"{out} holds data built for {split['shape']}, not {shape}: use another --out for this size"
            )
        return split
    src = os.path.join(path, f"{size.source}.parquet")
    prepare(size.source, src, image_size=size.image_size, channels=3)
    table = pq.read_table(src)
    caps = table.column("caption").to_pylist()
    # one row per distinct caption: a duplicated caption must mean one image
    first: dict[str, int] = {}
    for i, c in enumerate(caps):
        first.setdefault(c, i)
    rows = np.array(sorted(first.values()))
    # and no two images near-identical (skin-tone variants, similar flags): memorized, single and
    # held-out images must be distinct for the 1/3 rule and copy similarity to mean "copied this one"
    from memshard.evaluation.copies import distinct_subset
    from memshard.evaluation.extractor import PixelExtractor

    imgs, _ = rows_of(src, rows.tolist(), size.image_size)
    rows = rows[distinct_subset(PixelExtractor()(as_float(imgs)), DISTINCT_NCC)]
    perm = np.random.default_rng(seed).permutation(rows)
    need = size.num_memorized + size.num_single + size.num_heldout
    if len(perm) < need:
        raise SystemExit(
            f"{size.source} has {len(perm)} captions with mutually distinct images (pixel NCC < {DISTINCT_NCC}) at "
            f"{size.image_size} px; size needs {need}"
        )
    mem = perm[: size.num_memorized]
    single = perm[size.num_memorized : size.num_memorized + size.num_single]
    held = perm[size.num_memorized + size.num_single : need]
    order = np.concatenate([np.repeat(mem, size.duplicates), single])
    train_t = table.take(pa.array(order))
    train_t = train_t.set_column(0, "id", pa.array(np.arange(len(order)), type=pa.int64()))
    pq.write_table(train_t, os.path.join(path, "train.parquet"))
    split = {
        "train": os.path.join(path, "train.parquet"),
        "source": src,
        "memorized": [int(i) for i in mem],
        "single": [int(i) for i in single],
        "heldout": [int(i) for i in held],
        "shape": shape,
    }
    open(split_file, "w").write(json.dumps(split, indent=2))
    return split


def split_source(split: dict[str, Any]) -> str:
    """The source a split was built from (splits from before the field are emoji)."""
    return split.get("shape", {}).get("source", "emoji")


def rows_of(src: str, idx: list[int], size: int) -> tuple[np.ndarray, list[str]]:
    """(uint8 NHWC images, captions) of source rows ``idx``."""
    from memshard.data import decode_image

    t = pq.read_table(src).take(pa.array(idx))
    imgs = [decode_image(b, size, 3).transpose(1, 2, 0) for b in t.column("image").to_pylist()]
    return np.stack(imgs), t.column("caption").to_pylist()


# ----------------------------------------------------------------------------- training


def train_arm(size: Size, split: dict[str, Any], out: str, method: str, deadline: float | None = None) -> str:
    """Train (or resume) one arm for ``size.train_steps`` total optimizer steps; returns the run dir.

    With a ``deadline`` (time.time()) training stops at the round boundary after it and
    BudgetSpent is raised: the next call resumes from the last committed round.
    """
    run = os.path.join(out, method)
    cfg = arm_config(size, split, method)
    rounds, per, k = cfg.train.rounds, cfg.train.steps_per_round, cfg.shards.count
    done = (
        os.path.exists(os.path.join(run, "run.json"))
        and json.loads(open(os.path.join(run, "run.json")).read())["rounds_completed"] >= rounds
    )
    if not done:
        connect(cfg)
        t0 = time.perf_counter()
        left = None if deadline is None else max(1.0, deadline - time.time())
        res = train(cfg, out=run, resume=os.path.exists(os.path.join(run, "run.json")), stop_after_s=left)
        timing_file = os.path.join(out, f"{method}.timing.json")
        spent = json.loads(open(timing_file).read())["train_s"] if os.path.exists(timing_file) else 0.0
        write_json(timing_file, {"train_s": spent + time.perf_counter() - t0, "steps": per * rounds * k})
        if res.rounds_completed < rounds:
            raise BudgetSpent
    return run


def arm_steps(size: Size, method: str) -> tuple[int, str]:
    """(optimizer steps to train, warm start) of one arm; both arms end at the same total steps.

    The undefended model continues ``size.init_from``; the IET-AGC+ arm continues
    ``size.plus_init_from`` (an IET-AGC+ run) or, without one, trains from scratch for the
    undefended model's total (its warm start's steps included): warm-starting the defence from
    the undefended model would hand it the memorization it is meant to prevent.
    """
    if method == "baseline":
        return size.train_steps, size.init_from
    if size.plus_init_from or not size.init_from:
        return size.train_steps, size.plus_init_from
    return size.train_steps + total_steps(size.init_from), ""


def arm_config(size: Size, split: dict[str, Any], method: str) -> Any:
    """The validated training config of one arm: its steps (:func:`arm_steps`) over the size's rounds and shards."""
    k = 1 if method == "baseline" else size.shards
    rounds = size.rounds
    steps, init_from = arm_steps(size, method)
    per = steps // (rounds * k)
    return load_config(
        {
            "name": f"prss-{method}",
            "data": {"path": split["train"], "image_size": size.image_size, "channels": 3},
            "model": {
                "preset": size.preset,
                "text_conditional": True,
                "max_text_length": size.max_text_length,
                "caption_dropout": size.caption_dropout,
                "prediction_type": size.prediction_type,
            },
            "method": method,
            "train": {
                "rounds": rounds,
                "steps_per_round": per,
                "batch_size": size.batch_size,
                "lr": size.lr,
                "warmup_steps": 50,
                "ema_decay": 0.999,
                "init_from": init_from or None,
            },
            "shards": {"count": k},
            # gpus_per_shard None (not 0) on the CPU: the resources the cpu runs were trained with
            "resources": {"cpus_per_shard": size.cpus / k, "gpus_per_shard": size.gpus / k if size.gpus else None},
            "logging": {"progress": False},
        }
    )


# ----------------------------------------------------------------------------- sampling


def generate(
    pipe: Any, prompts: list[str], seeds: list[int], steps: int, gs: float, **kw: Any
) -> tuple[np.ndarray, list, float]:
    """uint8 NHWC generations, per-image reports and wall seconds (batches of 32)."""
    from memshard.models.sampling import to_uint8

    imgs, reps = [], []
    t0 = time.perf_counter()
    for s in range(0, len(prompts), 32):
        res = pipe(
            prompts[s : s + 32], num_inference_steps=steps, seeds=seeds[s : s + 32], output_type="pt",
            guidance_scale=gs, **kw,
        )  # fmt: skip
        imgs.append(to_uint8(res.images))
        reps += res.report
    return np.concatenate(imgs), reps, time.perf_counter() - t0


def as_float(x: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(x).permute(0, 3, 1, 2).float() / 255.0


COPY_FPR = 0.01  # a generation copies when it is closer to a training image than 99% of them are to another


class Judge:
    """Copy similarity, pixel memorization and alignment of generations, against one training set.

    Copy similarity is pixel correlation (:class:`~memshard.evaluation.extractor.PixelExtractor`),
    not Inception pool3: at 16 px Inception scored augmented copies below distinct emoji (its
    calibration called everything a copy, TPR = FPR = 1; the first cpu results in BENCHMARKS.md),
    while a small pixel model's copies are pixel-aligned reproductions. Its threshold
    (``copy_over``, the share of generations that copy) is where distinct training images exceed
    it at rate COPY_FPR; the augmented copies' TPR is reported beside it, and is low by design
    (crops and flips move pixels).
    """

    def __init__(self, train_imgs: np.ndarray, align: Any) -> None:
        from memshard.evaluation.copies import calibration_pairs
        from memshard.evaluation.extractor import PixelExtractor
        from memshard.evaluation.metrics.memorization import threshold_at_fpr

        self.train = as_float(train_imgs)
        self.extractor = PixelExtractor()
        self.train_feats = self.extractor(self.train)
        copy_s, distinct_s = calibration_pairs(self.extractor, self.train, seed=0, max_images=len(self.train))
        self.calibration = threshold_at_fpr(distinct_s, COPY_FPR, copy_s)
        self.align = align

    def __call__(self, gen: np.ndarray, prompts: list[str], own: np.ndarray | None = None) -> dict[str, Any]:
        """Scores of ``gen`` (for ``prompts``); with ``own`` (each generation's own training
        image index), also the share that copies its own image by the 1/3 rule."""
        from memshard.evaluation.metrics.memorization import copy_similarity, memorization_report

        g = as_float(gen)
        cs = copy_similarity(
            self.extractor(g), self.train_feats, self.calibration["threshold"], self.extractor.name
        ).to_dict()
        mem = memorization_report(g, self.train)
        out = {
            "copy_mean": cs["mean"],
            "copy_p95": cs["p95"],
            "copy_over": cs["over_threshold"],
            "memorized_fraction": mem.memorized_fraction,
            "alignment": float(np.mean(self.align.score(gen, prompts))),
        }
        if own is not None:
            hit = mem.memorized & (mem.nn_index == own)
            out["copies_own"] = float(np.mean(hit))
            # the share of the distinct memorized images that at least one generation copies
            out["images_copied"] = len(set(own[hit].tolist())) / len(set(own.tolist()))
        return out


REGIME_SCALES = (1.5, 3.0, 5.0, 7.5)


def regime(
    pipe: Any, judge: Judge, caps: dict[str, list[str]], g: int, steps: int, out: str, train_mem: np.ndarray
) -> list[dict[str, Any]]:
    """Is the model in PRSS's regime? Memorized and held-out prompts sampled at each CFG scale.

    The model is in the regime at a scale where the memorized prompts copy their own
    images (``copies_own``) while the held-out prompts do not copy (``memorized`` low) and
    follow their prompt (``alignment``). ``regime.png``: a row per prompt (memorized ones
    start with their training image), a column per scale.
    """
    from memshard.models.sampling import grid

    rows, tiles = [], {}
    mem_p = [c for c in caps["memorized"] for _ in range(g)]
    own = np.repeat(np.arange(len(caps["memorized"])), g)  # memorized images come first in the judge's set
    held_p = caps["heldout"]
    for gs in REGIME_SCALES:
        gm, _, secs = generate(pipe, mem_p, list(range(len(mem_p))), steps, gs, prss=False)
        gh, _, _ = generate(pipe, held_p, list(range(10_000, 10_000 + len(held_p))), steps, gs, prss=False)
        row = {"guidance_scale": gs, "memorized_prompts": judge(gm, mem_p, own), "heldout_prompts": judge(gh, held_p)}
        rows.append(row)
        tiles[gs] = (gm, gh)
        m, h = row["memorized_prompts"], row["heldout_prompts"]
        console.print(
            f"  CFG {gs:4.1f}: memorized prompts copy their image {m['copies_own']:.0%} (1/3 rule "
            f"{m['memorized_fraction']:.0%}, alignment {m['alignment']:.3f}); held-out prompts memorized "
            f"{h['memorized_fraction']:.0%}, alignment {h['alignment']:.3f}  [{secs:.0f} s]"
        )
    pics = []
    for i in range(min(8, len(caps["memorized"]))):
        pics.append(train_mem[i])
        pics += [tiles[gs][0][i * g] for gs in REGIME_SCALES]
    for i in range(min(8, len(held_p))):
        pics.append(np.full_like(train_mem[0], 255))
        pics += [tiles[gs][1][i] for gs in REGIME_SCALES]
    grid(np.stack(pics), cols=len(REGIME_SCALES) + 1, scale=4).save(os.path.join(out, "regime.png"))
    return rows


# Sampler levers tried on the undefended model at high CFG (the regime study): none is a default
# of memshard's sampler; each is what a pixel-space model is usually given to hold strong guidance.
DYNAMIC_THRESHOLDING = {"thresholding": True, "dynamic_thresholding_ratio": 0.95, "sample_max_value": 3.0}
LEVERS: tuple[tuple[str, dict[str, Any]], ...] = (
    ("plain CFG", {}),
    ("guidance rescale 0.7", {"rescale": 0.7}),  # Lin et al. 2024: guided std back to the conditional's
    # Imagen's dynamic thresholding (x0 clipped at its 95th |value| percentile s, then / s; s <= 3)
    ("dynamic thresholding", {"scheduler": DYNAMIC_THRESHOLDING}),
    ("raw (non-EMA) weights", {"weights": "raw"}),
    # Kynkaanniemi et al. 2024: guidance only in part of the trajectory (the rest at scale 1)
    ("guidance in the noisiest 60%", {"interval": (0.0, 0.6)}),
    ("guidance in the last 80%", {"interval": (0.2, 1.0)}),
)
LEVER_SCALES = (5.0, 7.5)


def guided_steps(interval: tuple[float, float], steps: int) -> range:
    """The DDIM steps (0 = noisiest) that apply guidance: those in the ``interval`` fraction of the trajectory.

    Guidance in a limited interval (Kynkaanniemi et al. 2024): where a small model's conditional
    and unconditional predictions differ mostly by its error, a large scale only amplifies that
    error. ``(0, 1)`` guides every step (plain CFG). A lever of the regime study, not of the
    sampler: on the cpu model it removed the colour noise only by losing the image (BENCHMARKS.md).
    """
    lo, hi = interval
    if not 0.0 <= lo < hi <= 1.0:
        raise ValueError(f"guidance interval must satisfy 0 <= start < end <= 1, got {interval}")
    first = round(lo * steps)
    return range(first, max(first + 1, round(hi * steps)))


@torch.no_grad()
def lever_sample(
    pipe: Any, prompts: list[str], seeds: list[int], steps: int, gs: float, rescale: float = 0.0,
    scheduler: dict[str, Any] | None = None, interval: tuple[float, float] = (0.0, 1.0),
) -> np.ndarray:  # fmt: skip
    """Plain-CFG DDIM with one sampler lever: guidance rescale ``rescale``, scheduler overrides, or
    guidance only in the ``interval`` fraction of the steps (:func:`guided_steps`).

    Its own loop (the undefended arithmetic of memshard.prss.sampler) because guidance rescale
    needs both branches, which the pipeline does not expose; for the regime study only.
    """
    from memshard.models.sampling import to_uint8
    from memshard.models.text import TextCond
    from memshard.prss.reanchor import cfg_eps
    from memshard.prss.sampler import encode_batch, make_scheduler, uncond_batch

    guided = guided_steps(interval, steps)
    outs = []
    for s0 in range(0, len(prompts), 32):
        p = prompts[s0 : s0 + 32]
        x = pipe.initial_noise(len(p), seeds=seeds[s0 : s0 + 32])
        sched = make_scheduler({**pipe.scheduler.config, **(scheduler or {})}, steps, x.device)
        cond = TextCond.cat(
            [uncond_batch(pipe.encode_prompts, len(p), x.device), encode_batch(pipe.encode_prompts, p, x.device)]
        )
        for i, t in enumerate(sched.timesteps):
            tt = torch.full((2 * len(p),), int(t), device=x.device, dtype=torch.long)
            e0, ec = pipe.eps(torch.cat([x, x]), tt, cond).chunk(2)
            eps = cfg_eps(e0, ec, gs if i in guided else 1.0)
            if rescale:
                ratio = (ec.flatten(1).std(dim=1) / eps.flatten(1).std(dim=1)).view(-1, *[1] * (eps.dim() - 1))
                eps = rescale * eps * ratio + (1 - rescale) * eps
            x = sched.step(eps, t, x, eta=0.0).prev_sample
        outs.append(to_uint8(pipe._decode(x)))
    return np.concatenate(outs)


def regime_levers(
    pipe: Any,
    served: str,
    judge: Judge,
    caps: dict[str, list[str]],
    g: int,
    steps: int,
    out: str,
    train_mem: np.ndarray,
) -> list[dict[str, Any]]:
    """Each of LEVERS at each of LEVER_SCALES: do memorized prompts still copy and held-out ones follow?

    ``pipe`` is the served (EMA) pipeline, ``served`` its directory (the raw weights load from it).
    Held-out prompts: the first 48 (the study is about whether samples are images at all).
    ``regime-levers.png``: a row per prompt, a column per (scale, lever).
    """
    from memshard.models.sampling import grid
    from memshard.prss.pipeline import load_served_t2i

    pipes = {"ema": pipe}  # the served (EMA) pipeline the caller already loaded
    if os.path.isdir(os.path.join(served, "unet_raw")):
        pipes["raw"] = on_device(load_served_t2i(served, unet_subfolder="unet_raw"))
    mem_p = [c for c in caps["memorized"] for _ in range(g)]
    own = np.repeat(np.arange(len(caps["memorized"])), g)
    held_p = caps["heldout"][:48]
    rows, cols = [], []
    for gs in LEVER_SCALES:
        for name, lever in LEVERS:
            lever_pipe = pipes.get(lever.get("weights", "ema"))
            if lever_pipe is None:
                continue
            kw = {k: v for k, v in lever.items() if k != "weights"}
            gm = lever_sample(lever_pipe, mem_p, list(range(len(mem_p))), steps, gs, **kw)
            gh = lever_sample(lever_pipe, held_p, list(range(10_000, 10_000 + len(held_p))), steps, gs, **kw)
            row = {"guidance_scale": gs, "lever": name, "memorized_prompts": judge(gm, mem_p, own),
                   "heldout_prompts": judge(gh, held_p)}  # fmt: skip
            rows.append(row)
            cols.append((gm, gh))
            m, h = row["memorized_prompts"], row["heldout_prompts"]
            console.print(
                f"  CFG {gs:4.1f} {name:24s}: memorized prompts copy {m['copy_over']:.0%} (1/3 rule "
                f"{m['copies_own']:.0%}), alignment {m['alignment']:.3f}; held-out alignment {h['alignment']:.3f}"
            )
    pics = []
    for i in range(min(6, len(caps["memorized"]))):
        pics += [train_mem[i]] + [gm[i * g] for gm, _ in cols]
    for i in range(min(6, len(held_p))):
        pics += [np.full_like(train_mem[0], 255)] + [gh[i] for _, gh in cols]
    grid(np.stack(pics), cols=len(cols) + 1, scale=4).save(os.path.join(out, "regime-levers.png"))
    return rows


def on_device(pipe: Any) -> Any:
    """The pipeline on CUDA when there is one (the gpu size), else as loaded."""
    return pipe.to("cuda") if torch.cuda.is_available() else pipe


def write_json(path: str, obj: Any) -> None:
    """Write ``obj`` as JSON through a temporary file, so a killed call never leaves half a file."""
    tmp = f"{path}.tmp"
    with open(tmp, "w") as fh:
        fh.write(json.dumps(obj, indent=2, default=float))
    os.replace(tmp, path)


def cached(out: str, name: str, make: Any) -> Any:
    """OUT/NAME.json if an earlier call wrote it, else ``make()`` written there (resumable stages)."""
    path = os.path.join(out, f"{name}.json")
    if os.path.exists(path):
        return json.loads(open(path).read())
    obj = make()
    write_json(path, obj)
    return obj


def detection(
    pipe: Any,
    mem: list[str],
    held: list[str],
    single: list[str],
    steps: int,
    at: str | int = "first",
    gs: float = 7.5,
) -> dict[str, Any]:
    """Wen et al.'s detector: the first-step magnitude averaged over 1 and 4 seeds per prompt.

    AUC and TPR at 1% FPR of memorized against held-out prompts (and, as a harder negative
    set, against captions the model saw once). ``at`` = k: the magnitude at step k of the
    undefended trajectory at CFG ``gs`` instead (the trigger of ``detect_step = k``).
    """
    from memshard.prss.mitigations import auc, detection_score, tpr_at_fpr

    def mags(caps: list[str], n: int) -> np.ndarray:
        prompts = [c for c in caps for _ in range(n)]
        seeds = [7_000 + j for _ in caps for j in range(n)]
        out = []
        for b in range(0, len(prompts), 32):
            x = pipe.initial_noise(len(prompts[b : b + 32]), seeds[b : b + 32])
            out.append(
                detection_score(
                    pipe.eps,
                    pipe.encode_prompts,
                    dict(pipe.scheduler.config),
                    prompts[b : b + 32],
                    x,
                    steps,
                    steps=at,
                    guidance_scale=gs,
                ).numpy()
            )
        return np.concatenate(out).reshape(len(caps), n).mean(1)

    det: dict[str, Any] = {}
    for n in (1, 4):
        pm, ph, ps = mags(mem, n), mags(held, n), mags(single, n)
        det[str(n)] = {
            "auc": auc(pm, ph),
            "tpr_at_1pct_fpr": tpr_at_fpr(pm, ph, 0.01),
            "auc_vs_single": auc(pm, ps),
            "memorized_mean": float(pm.mean()),
            "heldout_mean": float(ph.mean()),
        }
    return det


def trajectory_magnitudes(
    pipe: Any, mem: list[str], held: list[str], g: int, steps: int, gs: float
) -> dict[str, np.ndarray]:
    """m_t of every step of undefended trajectories: memorized prompts x ``g`` seeds (20000+), held-out x 1 (30000+).

    Calibration seeds, not the test seeds. Arrays (trajectories, steps): ``mem``, ``held``.
    """
    from memshard.prss.calibration import reference_magnitudes

    mp = [c for c in mem for _ in range(g)]
    _, ms = reference_magnitudes(pipe, mp, list(range(20_000, 20_000 + len(mp))), steps, guidance_scale=gs)
    _, hs = reference_magnitudes(pipe, held, list(range(30_000, 30_000 + len(held))), steps, guidance_scale=gs)
    return {"mem": ms.reshape(len(mp), steps), "held": hs.reshape(len(held), steps)}


def cached_arrays(out: str, name: str, make: Any) -> dict[str, np.ndarray]:
    """OUT/NAME.npz if an earlier call wrote it, else ``make()`` written there (written whole, then renamed)."""
    path = os.path.join(out, f"{name}.npz")
    if not os.path.exists(path):
        arrays = make()
        np.savez(path + ".tmp.npz", **arrays)
        os.replace(path + ".tmp.npz", path)
    with np.load(path) as z:
        return {k: z[k] for k in z.files}


def calibrate(mags: dict[str, np.ndarray], num_mem: int, g: int) -> dict[str, Any]:
    """Privacy levels from undefended trajectories of the memorized prompts (:func:`trajectory_magnitudes`).

    Also the per-step distributions (10/50/90th percentiles of m_t at each step, memorized
    against held-out prompts) that show where along the trajectory the two differ.
    """
    from memshard.prss.calibration import auc_by_step, defended_level

    ms, hs = mags["mem"], mags["held"]

    def curve(m: np.ndarray) -> dict[str, list[float]]:
        return {f"p{q}": np.percentile(m, q, axis=0).round(4).tolist() for q in (10, 50, 90)}

    return {
        "reference": f"{num_mem} memorized captions x {g} seeds; {len(hs)} held-out captions x 1 seed",
        "levels": [defended_level(ms[:, 0], ms.ravel(), d, hs[:, 0]) for d in DEFEND_LEVELS],
        "first_step": {
            "memorized": np.percentile(ms[:, 0], (10, 50, 90)).round(4).tolist(),
            "heldout": np.percentile(hs[:, 0], (10, 50, 90)).round(4).tolist(),
        },
        "per_step": {"memorized": curve(ms), "heldout": curve(hs)},
        # a detector that reads m_t at step k instead of the first step
        "auc_by_step": auc_by_step(ms, hs),
    }


def search_choices(
    pipe: Any,
    providers: dict[str, Any],
    prompts: list[str],
    seeds: list[int],
    steps: int,
    levels: list[dict[str, Any]],
    num_candidates: int = 25,
) -> dict[str, list[dict[str, Any]]]:
    """What semantic search has to choose from (shapes: every caption parses to its combination).

    For each provider and level, of the memorized generations that trigger (m(ep) > lambda_ss
    on their own x_T): ``with_below``, how many have a candidate under lambda_ss, so that SS
    takes the first such (the provider's order: the bank's most similar); ``same_content``, how
    many of those first-under candidates name the prompt's own combination (a paraphrase); the
    rest fall back to the candidate of lowest magnitude, whatever it says. The same first-step
    magnitudes :func:`memshard.prss.sampler.sample` scores.
    """
    from memshard.data.shapes import parse
    from memshard.prss.sampler import first_step_magnitude

    sc = dict(pipe.scheduler.config)
    x_T = pipe.initial_noise(len(prompts), seeds=seeds)
    m0 = first_step_magnitude(pipe.eps, pipe.encode_prompts, sc, prompts, x_T, steps).tolist()

    def combo(text: str) -> Any:
        try:
            return parse(text)[0]
        except ValueError:  # a perturbation is no caption of the set
            return None

    out: dict[str, list[dict[str, Any]]] = {}
    for name in (DEFAULT_PROVIDER, PARAPHRASE):
        rows = [{"level": lv["defend"], "triggered": 0, "with_below": 0, "same_content": 0} for lv in levels]
        for i, p in enumerate(prompts):
            cands = providers[name](p, num_candidates)
            if not cands:
                continue
            xs = x_T[i : i + 1].expand(len(cands), *x_T.shape[1:])
            mc = first_step_magnitude(pipe.eps, pipe.encode_prompts, sc, cands, xs, steps).tolist()
            for row, lv in zip(rows, levels, strict=True):
                if m0[i] <= lv["lambda_ss"]:
                    continue
                row["triggered"] += 1
                below = [c for c, m in zip(cands, mc, strict=True) if m <= lv["lambda_ss"]]
                if below:
                    row["with_below"] += 1
                    row["same_content"] += int(combo(below[0]) == combo(p))
        out[name] = rows
    return out


def late_calibration(mags: dict[str, np.ndarray], levels: list[dict[str, Any]]) -> dict[str, Any]:
    """Detection at a later step: the step of best AUC within the first quarter of the trajectory.

    Chosen on calibration seeds by the rule ``memshard calibrate-prss`` applies
    (:func:`memshard.prss.calibration.detection_step`). Each level keeps its first-step level's
    lambda_pr and tau (re-anchoring unchanged) and takes lambda_ss from the memorized
    trajectories' m_t at that step, so ``prss-late d`` differs from ``prss d`` in the trigger alone.
    """
    from memshard.prss.calibration import defended_level, detect_window, detection_step

    ms, hs = mags["mem"], mags["held"]
    k, by_step = detection_step(ms, hs)
    window = detect_window(len(by_step))
    out = []
    for lv in levels:
        at_k = defended_level(ms[:, k - 1], ms.ravel(), lv["defend"], hs[:, k - 1])
        out.append({**at_k, "lambda_pr": lv["lambda_pr"], "tau": lv["tau"]})
    return {"detect_step": k, "window": window, "auc": by_step[k - 1], "levels": out}


def per_step_levels(mags: dict[str, np.ndarray], levels: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each level with re-anchoring thresholds that follow m_t's per-step scale (``prss-perstep``).

    :func:`memshard.prss.calibration.per_step_level` on the memorized trajectories of the
    calibration seeds; the trigger (lambda_ss) is the level's own, so ``prss-perstep d`` differs from
    its PRSS level in where along the trajectory it re-anchors.
    """
    from memshard.prss.calibration import per_step_level

    out = []
    for lv in levels:
        ps = per_step_level(mags["mem"], lv["defend"], mags["held"][:, 0])
        out.append({**ps, "lambda_ss": lv["lambda_ss"]})
    return out


def candidate_providers(split: dict[str, Any], mem_caps: list[str]) -> dict[str, Any]:
    """The three candidate sources the benchmark reports, none of which may offer a memorized caption.

    * bank: MiniLM nearest neighbours among a caption pool without the memorized captions
      (the spec's semantic search over a large caption pool): every caption of the source for
      emoji; for shapes every wording of every combination (:func:`~memshard.data.shapes.all_wordings`),
      so, as in a web caption pool, other wordings of a memorized image's content are in it;
    * perturb: the rule-based paraphrases (word drops, swaps, synonyms);
    * list: a user's list, here 25 captions of the same label (emoji category, or shape) (seeded);
    * paraphrase (shapes only): a user's list of exact paraphrases, the other wordings of the
      caption (:func:`~memshard.data.shapes.paraphrases`), the paper's LLM paraphrases without
      their errors. The bank ranks captions that swap a colour or move the shape above these
      (MiniLM reads words, not their roles), so this provider separates "SS finds another
      prompt" from "SS finds the same content in other words".
    """
    from memshard.models.text import load_text_encoder
    from memshard.prss.candidates import BankProvider, ListProvider, PerturbProvider

    t = pq.read_table(split["source"], columns=["caption", "label"])
    caps, labels = t.column("caption").to_pylist(), t.column("label").to_pylist()
    banned = set(mem_caps)
    if split_source(split) == "shapes":
        from memshard.data.shapes import all_wordings

        pool = [c for c in all_wordings() if c not in banned]
    else:
        pool = [c for c in dict.fromkeys(caps) if c not in banned]
    enc = load_text_encoder("minilm", 64)
    rng = np.random.default_rng(0)
    lists = {}
    for c in mem_caps:
        lab = labels[caps.index(c)]
        same = [x for x, lb in zip(caps, labels, strict=True) if lb == lab and x not in banned]
        lists[c] = [same[i] for i in rng.permutation(len(same))[:25]]
    bank = BankProvider(pool, enc.embed)
    _ = bank.vectors  # embed the bank now: a one-time index build, not a cost of the first arm that searches it
    out = {"bank": bank, "perturb": PerturbProvider(seed=0), "list": ListProvider(lists)}
    if split_source(split) == "shapes":
        from memshard.data.shapes import paraphrases

        out[PARAPHRASE] = ListProvider({c: paraphrases(c) for c in mem_caps})
    return out


def thresholds(lv: dict[str, Any]) -> dict[str, float]:
    """The sampler's threshold arguments of a privacy level."""
    return {k: lv[k] for k in ("lambda_ss", "lambda_pr", "tau")}


def method_arms(
    levels: list[dict[str, Any]],
    mid: dict[str, Any],
    late: dict[str, Any] | None = None,
    reword: bool = False,
    perstep: list[dict[str, Any]] | None = None,
) -> list[tuple[str, str, Any, dict[str, Any]]]:
    """(name, method, level, sampler kwargs) of every arm, in the order they run (``none`` first).

    With ``late`` (:func:`late_calibration`), PRSS at every level with detection at its step, guidance
    switched from there (prss-late) or the image sampled again from x_T (prss-restart); new arms go
    last, so a cached run computes only them. With ``reword`` (a source whose captions have other
    wordings: shapes), ``reworded``: plain CFG on another wording of each memorized caption, the
    candidate a perfect semantic search would find (scored, like every arm, against the original),
    then SS alone and PRSS at every level with those paraphrases as candidates (``PARAPHRASE``).
    With ``perstep`` (:func:`per_step_levels`), ``prss-perstep``: PRSS at every level with per-step
    re-anchoring thresholds, over the paraphrases where there are any, else the bank.
    """
    by = {lv["defend"]: lv for lv in levels}
    arms: list[tuple[str, str, Any, dict[str, Any]]] = [("none", "none", None, {"prss": False})]
    arms += [(f"random_token {k}", "random_token", k, {"mitigation": "random_token", "mitigation_params": {"k": k}})
             for k in RANDOM_TOKENS]  # fmt: skip
    arms += [
        (
            f"gaussian_noise {sg}",
            "gaussian_noise",
            sg,
            {"mitigation": "gaussian_noise", "mitigation_params": {"sigma": sg}},
        )
        for sg in NOISE_SIGMAS
    ]
    arms += [
        (f"wen {d}", "wen", d, {"mitigation": "wen", "mitigation_params": {"target": by[d]["lambda_ss"]}})
        for d in WEN_LEVELS
    ]
    arms += [
        (f"pr {MID_LEVEL}", "pr", MID_LEVEL, {"prss_mode": "pr", "candidates": DEFAULT_PROVIDER, **thresholds(mid)}),
        (f"ss {MID_LEVEL}", "ss", MID_LEVEL, {"prss_mode": "ss", "candidates": DEFAULT_PROVIDER, **thresholds(mid)}),
    ]
    arms += [
        (f"prss {lv['defend']}", "prss", lv["defend"], {"candidates": DEFAULT_PROVIDER, **thresholds(lv)})
        for lv in levels
    ]
    arms += [
        (f"prss-{p} {MID_LEVEL}", f"prss-{p}", MID_LEVEL, {"candidates": p, **thresholds(mid)})
        for p in PROVIDERS
        if p != DEFAULT_PROVIDER
    ]
    few = {"candidates": DEFAULT_PROVIDER, "num_candidates": FEW_CANDIDATES, **thresholds(mid)}
    arms.append((f"prss-k{FEW_CANDIDATES} {MID_LEVEL}", f"prss-k{FEW_CANDIDATES}", MID_LEVEL, few))
    for method, restart in (("prss-late", False), ("prss-restart", True)):
        arms += [
            (f"{method} {lv['defend']}", method, lv["defend"],
             {"candidates": DEFAULT_PROVIDER, **thresholds(lv), "detect_step": late["detect_step"], "restart": restart})
            for lv in (late["levels"] if late else [])
        ]  # fmt: skip
    if reword:
        arms.append(("reworded", "reworded", None, {"prss": False, "reword": True}))
        arms.append(
            (f"ss-{PARAPHRASE} {MID_LEVEL}", f"ss-{PARAPHRASE}", MID_LEVEL,
             {"prss_mode": "ss", "candidates": PARAPHRASE, **thresholds(mid)})
        )  # fmt: skip
        arms += [
            (f"prss-{PARAPHRASE} {lv['defend']}", f"prss-{PARAPHRASE}", lv["defend"],
             {"candidates": PARAPHRASE, **thresholds(lv)})
            for lv in levels
        ]  # fmt: skip
    if perstep:
        provider = PARAPHRASE if reword else DEFAULT_PROVIDER
        arms += [
            (f"prss-perstep {lv['defend']}", "prss-perstep", lv["defend"],
             {"candidates": provider, **thresholds(lv), "pr_profile": lv["pr_profile"]})
            for lv in perstep
        ]  # fmt: skip
    return arms


def plain_checkpoints(
    run: str, judge: Judge, prompts: list[str], seeds: list[int], own: np.ndarray, steps: int, gs: float
) -> list[dict[str, Any]]:
    """Plain training stopped early: the undefended sampler on every committed round of the undefended model.

    The same memorized prompts and seeds as every method, EMA weights as served; the last
    round is the served model itself. These points are the early-stopping frontier the
    combined system is compared with at matched alignment (:func:`early_stopping`).
    """
    from memshard.io.rundir import RunDir
    from memshard.io.weights import shapes_of
    from memshard.prss.pipeline import load_served_t2i

    rd = RunDir(run)
    pipe = on_device(load_served_t2i(os.path.join(run, "served")))
    expected = shapes_of(pipe.unet.state_dict())
    points = []
    for r in range(1, rd.rounds_completed() + 1):
        raw, ema = rd.load_weights(r, expected=expected)
        pipe.unet.load_state_dict(ema if ema is not None else raw)
        gen, _, _ = generate(pipe, prompts, seeds, steps, gs, prss=False)
        points.append({"round": r, "steps": total_steps(f"{run}@{r}"), **judge(gen, prompts, own)})
    return points


def early_stopping(points: list[dict[str, Any]], alignment: float) -> dict[str, Any] | None:
    """E(a): the plain-training checkpoint that copies least among those at least ``alignment`` aligned.

    The frontier's definition (memshard.evaluation.metrics.frontier) with alignment in place of
    FID: a user who wants alignment a can stop plain training at the first point that has it;
    a defence must copy less than that to be worth using. None: no checkpoint is that aligned.
    """
    ok = [p for p in points if p["alignment"] >= alignment]
    return min(ok, key=lambda p: (p["copy_over"], p["memorized_fraction"], p["steps"])) if ok else None


def combined_targets(combined: dict[str, Any], frontier: list[dict[str, Any]] | None) -> dict[str, Any]:
    """The combined system against plain training stopped early, at matched and at its own alignment.

    Matched alignment Q = MATCHED_ALIGNMENT x the best alignment plain training reaches (its
    checkpoints, or the final model alone without them): an IET-AGC+ row reaches it when its
    alignment is at least Q, and the best such row (fewest copies) is compared with E(Q)
    (``combined_matched_alignment``; None when no row reaches Q). Every row is also compared with
    E(its own alignment) (``combined_at_own_alignment``), the only fair comparison for a row that
    does not reach Q.
    """
    plain = combined["plain + none"]
    points = frontier or [{"round": None, "steps": None, **plain}]
    q = MATCHED_ALIGNMENT * max(p["alignment"] for p in points)
    rows = {k: v for k, v in combined.items() if k.startswith("IET-AGC+")}

    def versus(v: dict[str, Any], e: dict[str, Any] | None) -> dict[str, Any]:
        return {
            "alignment": v["alignment"],
            "copied": v["copy_over"],
            "memorized_fraction": v["memorized_fraction"],
            "early_stopping": None if e is None else {k: e[k] for k in FRONTIER_KEYS},
            "copied_reduction": None if e is None else _reduction(v["copy_over"], e["copy_over"]),
            "memorized_reduction": None if e is None else _reduction(v["memorized_fraction"], e["memorized_fraction"]),
        }

    out: dict[str, Any] = {
        "combined_matched_alignment_q": q,
        "combined_at_own_alignment": {k: versus(v, early_stopping(points, v["alignment"])) for k, v in rows.items()},
    }
    matched = {k: v for k, v in rows.items() if v["alignment"] >= q}
    if matched:
        k, v = min(matched.items(), key=lambda kv: (kv[1]["copy_over"], kv[1]["memorized_fraction"]))
        out["combined_matched_alignment"] = {
            "name": k,
            **versus(v, early_stopping(points, q)),
            "alignment_change": v["alignment"] / plain["alignment"] - 1,
        }
    else:
        out["combined_matched_alignment"] = None
    return out


def _reduction(v: float, base: float) -> float | None:
    return 1 - v / base if base > 0 else None


def targets(
    results: list[dict[str, Any]],
    combined: dict[str, Any] | None,
    untrig: dict[str, Any],
    distinct_mean: float,
    trig_alone: dict[str, Any] | None = None,
    frontier: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """The issue's targets, measured: PRSS's best level within 5% alignment, time, and the combined system
    (against plain training stopped early, ``frontier``: :func:`combined_targets`).

    ``copy_excess_reduction``: how much of the undefended copy similarity's excess over
    ``distinct_mean`` (what the nearest distinct training image scores, the pixel measure's
    "unrelated" level, where SSCD's is about 0) is removed; the issue's "66% lower copy
    similarity" is meant on that scale.
    """
    base = results[0]
    ok = [
        r for r in results
        if r["method"] in PRSS_CURVES and r["alignment"] >= 0.95 * base["alignment"]
    ]  # fmt: skip
    best = min(ok, key=lambda r: (r["copy_over"], r["memorized_fraction"], r["copy_mean"]), default=None)
    keys = ("copy_mean", "copy_over", "memorized_fraction", "alignment")
    out: dict[str, Any] = {"undefended": {k: base[k] for k in keys}}
    if best is not None:
        out["prss_within_5pct_alignment"] = {
            "name": best["name"],
            "copy_reduction": 1 - best["copy_mean"] / base["copy_mean"],
            "copy_excess_reduction": _reduction(best["copy_mean"] - distinct_mean, base["copy_mean"] - distinct_mean),
            "copied_reduction": _reduction(best["copy_over"], base["copy_over"]),
            "memorized_reduction": _reduction(best["memorized_fraction"], base["memorized_fraction"]),
            "alignment_change": best["alignment"] / base["alignment"] - 1,
        }
    trig = [r["time_ratio"] for r in results if r["method"] == "prss"]
    out["time"] = {"triggered_max": max(trig) if trig else None, **untrig}
    if trig_alone and trig_alone.get("images"):
        out["time"]["triggered_alone_time_ratio"] = trig_alone["time_ratio"]
        out["time"]["triggered_alone_time_ratio_few_candidates"] = trig_alone.get("time_ratio_few_candidates")
        if PARAPHRASE in trig_alone:
            out["time"]["triggered_alone_time_ratio_paraphrase"] = trig_alone[PARAPHRASE]["time_ratio"]
    if combined:
        out.update(combined_targets(combined, frontier))
    return out


BASELINE_METHODS = ("random_token", "gaussian_noise", "wen")
PRSS_METHODS = ("prss", "prss-late", "prss-restart")  # PRSS at every level: the spec's trigger, then later ones
# every PRSS curve over the levels (paraphrases: shapes only; per-step re-anchoring thresholds)
PRSS_CURVES = (*PRSS_METHODS, f"prss-{PARAPHRASE}", "prss-perstep")


def dominance(methods: list[dict[str, Any]], family: str = "prss") -> dict[str, list[str]]:
    """Who beats whom on the privacy-alignment plot, point by point.

    A point dominates another when its copy similarity is no higher and its alignment no
    lower, one of them strictly: the sweep's Pareto rule (:func:`memshard.sweep.pareto_mask`),
    copy minimised and alignment maximised. ``prss_dominated``: PRSS levels some baseline point
    dominates (PRSS below the baselines' curve there); ``baselines_dominated``: baseline
    points some PRSS level dominates (PRSS above it). Both empty: the curves do not overlap
    or cross without either winning, which a reader sees in the plot. ``family``: which PRSS
    curve (``prss``, or another of PRSS_CURVES).
    """
    from memshard.sweep import pareto_mask

    def beaten(row: dict[str, Any], others: list[dict[str, Any]]) -> bool:
        pts = [row, *others]
        copy, align = np.array([r["copy_mean"] for r in pts]), np.array([r["alignment"] for r in pts])
        return not pareto_mask(copy, -align)[0]

    prss = [r for r in methods if r["method"] == family]
    base = [r for r in methods if r["method"] in BASELINE_METHODS]
    return {
        "prss_dominated": [p["name"] for p in prss if beaten(p, base)],
        "baselines_dominated": [b["name"] for b in base if beaten(b, prss)],
    }


def with_overrides(size: Size, args: argparse.Namespace) -> Size:
    """``size`` with --train-steps, --sample-steps and every --size-set FIELD=VALUE applied (typed like the field)."""
    fields = dict(size.__dict__)
    fields["train_steps"] = args.train_steps or size.train_steps
    fields["sample_steps"] = args.sample_steps or size.sample_steps
    for item in args.size_set:
        key, sep, value = item.partition("=")
        if not sep or key not in SETTABLE:
            raise SystemExit(f"--size-set {item!r}: expected FIELD=VALUE with FIELD one of {', '.join(SETTABLE)}")
        try:
            fields[key] = type(getattr(size, key))(value)
        except ValueError:
            raise SystemExit(f"--size-set {item!r}: {value!r} is not a {type(getattr(size, key)).__name__}") from None
    if fields["source"] not in SOURCES:
        raise SystemExit(f"--size-set source={fields['source']!r}: one of {', '.join(SOURCES)}")
    return Size(**fields)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", choices=sorted(SIZES), default="cpu")
    ap.add_argument("--out", required=True)
    ap.add_argument("--train-steps", type=int, help="override the size's total training steps")
    ap.add_argument("--sample-steps", type=int, help="override the DDIM steps")
    ap.add_argument("--skip-combined", action="store_true", help="do not train the IET-AGC+ arm")
    ap.add_argument(
        "--size-set", action="append", default=[], metavar="FIELD=VALUE",
        help=f"override a field of the size (calibration runs; use their own --out): {', '.join(SETTABLE)}",
    )  # fmt: skip
    ap.add_argument(
        "--stage", choices=("model", "plus", "all"), default="all",
        help="model: train the undefended model and report its regime (CFG scales) only; plus: train the "
        "combined system's IET-AGC+ arm only (in a second process beside --stage model, on the same --out)",
    )  # fmt: skip
    ap.add_argument(
        "--skip-levers", action="store_true",
        help="do not run the sampler-lever study (16 min on one core; a calibration run whose levers are known)",
    )  # fmt: skip
    ap.add_argument("--time-budget-s", type=float, help="stop this call after about this long (exit 3; rerun)")
    ap.add_argument("--publish", action="store_true", help="copy summary.json and plots to docs/results/")
    ap.add_argument(
        "--publish-name", default="", metavar="NAME",
        help="publish as docs/results/bench-prss-SIZE-NAME.json (calibration runs; --stage model: default 'model')",
    )  # fmt: skip
    args = ap.parse_args(argv)
    try:
        return run(args, argv)
    except BudgetSpent:
        console.print("[yellow]time budget of this call spent; run the same command again to continue[/yellow]")
        return INCOMPLETE_EXIT


def run(args: argparse.Namespace, argv: list[str] | None) -> int:
    """The benchmark behind ``main``; every finished stage is cached under OUT."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    size = with_overrides(SIZES[args.size], args)
    os.makedirs(args.out, exist_ok=True)
    t_start = time.perf_counter()
    split = build_data(size, args.out)
    console.print(
        f"[bold]data[/bold]: {len(split['memorized'])} memorized x{size.duplicates}, "
        f"{len(split['single'])} single, {len(split['heldout'])} held-out captions"
    )
    deadline = None if args.time_budget_s is None else time.time() + args.time_budget_s
    if args.stage == "plus":
        train_arm(size, split, args.out, "iet-agc-plus", deadline)
        console.print(f"trained {args.out}/iet-agc-plus")
        return 0
    plain_run = train_arm(size, split, args.out, "baseline", deadline)

    from memshard.evaluation.alignment import train_alignment
    from memshard.prss.pipeline import load_served_t2i

    src = split["source"]
    mem_imgs, mem_caps = rows_of(src, split["memorized"], size.image_size)
    single_imgs, single_caps = rows_of(src, split["single"], size.image_size)
    held_imgs, held_caps = rows_of(src, split["heldout"], size.image_size)
    train_imgs = np.concatenate([mem_imgs, single_imgs])
    # The alignment judge is trained on every pair of the source (it is an evaluator, not the model
    # under test: more pairs make it a better judge); a seeded 10% is held out for its
    # retrieval accuracy.
    all_t = pq.read_table(src)
    all_imgs, all_caps = rows_of(src, list(range(all_t.num_rows)), size.image_size)
    align = train_alignment(all_imgs, all_caps, holdout=0.1, seed=0, steps=size.align_steps)
    judge = Judge(train_imgs, align)
    console.print(
        f"alignment model: {align.name}; held-out top-1 {align.info.get('holdout_top1'):.2f} "
        f"(chance {align.info.get('holdout_chance_top1'):.2f}); copy threshold {judge.calibration['threshold']:.3f}"
    )
    # what following a prompt perfectly scores: the real images with their own captions
    reference = cached(
        args.out,
        "reference-alignment",
        lambda: {
            "memorized": float(np.mean(align.score(mem_imgs, mem_caps))),
            "heldout": float(np.mean(align.score(held_imgs, held_caps))),
        },
    )
    caps = {"memorized": mem_caps, "heldout": held_caps}
    pipe = on_device(load_served_t2i(os.path.join(plain_run, "served")))
    model_regime = cached(
        args.out,
        "regime",
        lambda: regime(pipe, judge, caps, size.gens_per_prompt, size.sample_steps, args.out, mem_imgs),
    )
    levers = (
        None
        if args.skip_levers
        else cached(
            args.out,
            "regime-levers",
            lambda: regime_levers(
                pipe,
                os.path.join(plain_run, "served"),
                judge,
                caps,
                size.gens_per_prompt,
                size.sample_steps,
                args.out,
                mem_imgs,
            ),
        )
    )
    if args.stage == "model":
        summary = model_summary(args.size, size, plain_run, args.out, model_regime, levers, argv)
        summary["reference_alignment"] = reference
        write_json(os.path.join(args.out, MODEL_SUMMARY), summary)
        plots = "regime.png" + ("" if levers is None else ", regime-levers.png")
        console.print(f"wrote {args.out}/{MODEL_SUMMARY}, {plots}")
        if args.publish:
            publish(args.out, args.size, args.publish_name or "model", model_only=True, with_levers=levers is not None)
        return 0
    plus_run = None if args.skip_combined else train_arm(size, split, args.out, "iet-agc-plus", deadline)

    g = size.gens_per_prompt
    steps = size.sample_steps
    gs = size.guidance_scale
    m_prompts = [c for c in mem_caps for _ in range(g)]
    m_seeds = list(range(len(m_prompts)))
    h_prompts = list(held_caps)  # one generation each: the untriggered-cost check
    h_seeds = list(range(10_000, 10_000 + len(h_prompts)))
    own = np.repeat(np.arange(len(mem_caps)), g)  # each generation's own training image (memorized ones first)
    generate(pipe, m_prompts[:32], m_seeds[:32], 2, gs, prss=False)  # warm-up: the first arm's time is not a load

    # ---- detection: Wen et al.'s first-step magnitude, memorized vs held-out (and once-seen) captions
    det = cached(args.out, "detection", lambda: detection(pipe, mem_caps, held_caps, single_caps[:64], steps))
    # ---- privacy levels from the memorized prompts' own trajectories (calibration seeds, not the test seeds)
    # caches of everything that depends on the CFG scale carry it in their name (a rerun at another scale)
    tag = f"cfg{gs:g}-steps{steps}"
    mags = cached_arrays(
        args.out, f"magnitudes-{tag}", lambda: trajectory_magnitudes(pipe, mem_caps, held_caps, g, steps, gs)
    )
    cal = cached(args.out, f"calibration-{tag}", lambda: calibrate(mags, len(mem_caps), g))
    # Wen et al.'s other statistic: m_t averaged over the whole trajectory (known only once sampled)
    from memshard.prss.mitigations import auc

    cal["auc_mean_over_steps"] = round(auc(mags["mem"].mean(1), mags["held"].mean(1)), 4)
    levels = cal["levels"]
    mid = next(lv for lv in levels if lv["defend"] == MID_LEVEL)
    late = late_calibration(mags, levels)
    providers = candidate_providers(split, mem_caps)
    perstep = per_step_levels(mags, levels)
    arms = method_arms(levels, mid, late, reword=split_source(split) == "shapes", perstep=perstep)
    choices = (
        cached(args.out, f"search-{tag}", lambda: search_choices(pipe, providers, m_prompts, m_seeds, steps, levels))
        if PARAPHRASE in providers
        else None
    )
    results: list[dict[str, Any]] = []
    grids: dict[str, np.ndarray] = {}
    base_secs = None
    for name, method, lvl, kw in arms:
        if deadline is not None and time.time() > deadline:
            raise BudgetSpent
        kw = {**kw, "candidates": providers[kw["candidates"]]} if "candidates" in kw else kw
        row_file = os.path.join(args.out, f"methods-{tag}", f"{name.replace(' ', '_')}.json")
        gen_file = row_file[:-5] + ".npy"
        if os.path.exists(row_file):
            row, gen = json.loads(open(row_file).read()), np.load(gen_file)
        else:
            sampled = m_prompts
            if kw.pop("reword", False):
                from memshard.data.shapes import rewording

                sampled = [rewording(p) for p in m_prompts]
            gen, reps, secs = generate(pipe, sampled, m_seeds, steps, gs, **kw)
            # scored against the ORIGINAL prompt, whatever was sampled
            row = {"name": name, "method": method, "level": lvl, **judge(gen, m_prompts, own), "seconds": secs}
            row["triggered"] = float(np.mean([r.get("triggered", False) for r in reps]))
            row["pr_steps"] = float(np.mean([r.get("pr_steps", 0) for r in reps]))
            row["moved"] = float(
                np.mean([r.get("chosen_prompt", q) != p for r, p, q in zip(reps, m_prompts, sampled, strict=True)])
            )
            os.makedirs(os.path.dirname(row_file), exist_ok=True)
            np.save(gen_file, gen)  # before the row: a row on disk always has its generations
            write_json(row_file, row)
        base_secs = row["seconds"] if name == "none" else base_secs
        row["time_ratio"] = row["seconds"] / base_secs  # arms run back to back: time against the "none" arm
        results.append(row)
        grids[name] = gen
        console.print(
            f"  {name:22s} copy {row['copy_mean']:.3f} (p95 {row['copy_p95']:.3f})  memorized "
            f"{row['memorized_fraction']:.1%}  alignment {row['alignment']:.3f}  triggered {row['triggered']:.0%}"
            f"  time x{row['time_ratio']:.2f}"
        )

    # ---- untriggered cost: held-out prompts under PRSS (mid level) vs plain CFG
    mid_kw = {**thresholds(mid), "candidates": providers[DEFAULT_PROVIDER]}

    def untriggered_cost(kw: dict[str, Any], alone: bool = True) -> dict[str, Any]:
        gen_p, rep_hp, t_prss_h = generate(pipe, h_prompts, h_seeds, steps, gs, **kw)
        gen_0, _, t_plain_h = generate(pipe, h_prompts, h_seeds, steps, gs, prss=False)
        untrig = [i for i, r in enumerate(rep_hp) if not r["triggered"]]
        res = {
            "level": MID_LEVEL,
            "triggered_fraction": 1 - len(untrig) / len(rep_hp),
            "time_ratio": t_prss_h / t_plain_h,
            "untriggered_equal": bool(all(np.array_equal(gen_p[i], gen_0[i]) for i in untrig)),
        }
        if untrig and alone:  # the untriggered images alone, sampled as a batch of their own: the x1.00 claim
            only, seeds_u = [h_prompts[i] for i in untrig][:64], [h_seeds[i] for i in untrig][:64]
            _, _, t_u_prss = generate(pipe, only, seeds_u, steps, gs, **kw)
            _, _, t_u_plain = generate(pipe, only, seeds_u, steps, gs, prss=False)
            res["untriggered_time_ratio"] = t_u_prss / t_u_plain
        return res

    untriggered = cached(args.out, f"untriggered-{tag}", lambda: untriggered_cost(mid_kw))
    # the same held-out prompts (test seeds) with detection at the later step: the false triggers it spares
    late_mid = next(lv for lv in late["levels"] if lv["defend"] == MID_LEVEL)
    late_kw = {**thresholds(late_mid), "candidates": providers[DEFAULT_PROVIDER], "detect_step": late["detect_step"]}
    late["detection"] = cached(
        args.out,
        f"detection-late-{tag}",
        lambda: detection(pipe, mem_caps, held_caps, single_caps[:64], steps, late["detect_step"], gs),
    )
    late["untriggered"] = cached(
        args.out, f"untriggered-late-{tag}", lambda: {**untriggered_cost(late_kw, alone=False), "kind": "prss-late"}
    )

    def triggered_alone() -> tuple[list[str], list[int]]:
        """The memorized generations PRSS triggers on (mid level): prompts and seeds, at most 64."""
        from memshard.prss.sampler import first_step_magnitude

        x_T = pipe.initial_noise(len(m_prompts), seeds=m_seeds)
        m0 = first_step_magnitude(pipe.eps, pipe.encode_prompts, pipe.scheduler.config, m_prompts, x_T, steps)
        idx = [i for i, m in enumerate(m0.tolist()) if m > mid["lambda_ss"]][:64]
        return [m_prompts[i] for i in idx], [m_seeds[i] for i in idx]

    def best_of_2(only: list[str], seeds_t: list[int], arms_kw: dict[str, dict[str, Any]]) -> dict[str, Any]:
        """Best of 2 timings (a shared machine) of each named sampler setting and of plain CFG, back to back;
        also the reports of each setting's last run."""
        best = {name: float("inf") for name in (*arms_kw, "plain")}
        reps: dict[str, list[dict[str, Any]]] = {}
        for _ in range(2):
            for name, kw in arms_kw.items():
                _, reps[name], t = generate(pipe, only, seeds_t, steps, gs, **kw)
                best[name] = min(best[name], t)
            best["plain"] = min(best["plain"], generate(pipe, only, seeds_t, steps, gs, prss=False)[2])
        return {"seconds": best, "reports": reps}

    def triggered_cost() -> dict[str, Any]:
        """The triggered generations sampled as batches of their own: the issue's x1.6 is about a
        triggered image, while the method arms' batches mix in untriggered ones (whose bitwise
        guarantee keeps every branch)."""
        only, seeds_t = triggered_alone()
        if not only:
            return {"level": MID_LEVEL, "images": 0}
        t = best_of_2(only, seeds_t, {"prss": mid_kw, "few": {**mid_kw, "num_candidates": FEW_CANDIDATES}})
        sec, reps = t["seconds"], t["reports"]["prss"]
        return {
            "level": MID_LEVEL,
            "images": len(only),
            "time_ratio": sec["prss"] / sec["plain"],
            "pr_steps": float(np.mean([r["pr_steps"] for r in reps])),
            "candidates_scored": float(np.mean([r["candidates_scored"] for r in reps])),
            "few_candidates": FEW_CANDIDATES,
            "time_ratio_few_candidates": sec["few"] / sec["plain"],
        }

    triggered = cached(args.out, f"triggered-{tag}", triggered_cost)
    if PARAPHRASE in providers:

        def paraphrase_cost() -> dict[str, Any]:
            """The same triggered images with the paraphrase list (a few candidates, as an LLM would write)."""
            only, seeds_t = triggered_alone()
            t = best_of_2(only, seeds_t, {"prss": {**mid_kw, "candidates": providers[PARAPHRASE]}})
            reps = t["reports"]["prss"]
            return {
                "time_ratio": t["seconds"]["prss"] / t["seconds"]["plain"],
                "pr_steps": float(np.mean([r["pr_steps"] for r in reps])),
                "candidates_scored": float(np.mean([r.get("candidates_scored", 0) for r in reps])),
            }

        if triggered.get("images"):
            triggered[PARAPHRASE] = cached(args.out, f"triggered-{PARAPHRASE}-{tag}", paraphrase_cost)

    # ---- the combined system: IET-AGC+ training, then PRSS calibrated on that model
    combined, frontier = None, None
    if plus_run is not None:
        pipe2 = on_device(load_served_t2i(os.path.join(plus_run, "served")))

        mags2 = cached_arrays(
            args.out,
            f"magnitudes-iet-agc-plus-{tag}",
            lambda: trajectory_magnitudes(pipe2, mem_caps, held_caps, g, steps, gs),
        )
        cal2 = cached(args.out, f"calibration-iet-agc-plus-{tag}", lambda: calibrate(mags2, len(mem_caps), g))

        def defended_model() -> dict[str, Any]:
            gen_a, _, _ = generate(pipe2, m_prompts, m_seeds, steps, gs, prss=False)
            rows = {"IET-AGC+ + none": judge(gen_a, m_prompts, own)}
            for lv in cal2["levels"]:
                kw = {**thresholds(lv), "candidates": providers[DEFAULT_PROVIDER]}
                gen_b, _, _ = generate(pipe2, m_prompts, m_seeds, steps, gs, **kw)
                rows[f"IET-AGC+ + PRSS {lv['defend']}"] = judge(gen_b, m_prompts, own)
            return rows

        def defended_perstep() -> dict[str, Any]:
            """PRSS with per-step re-anchoring thresholds on the IET-AGC+ model (paraphrases where there are any)."""
            provider = providers[PARAPHRASE if PARAPHRASE in providers else DEFAULT_PROVIDER]
            rows = {}
            for lv in per_step_levels(mags2, cal2["levels"]):
                kw = {**thresholds(lv), "pr_profile": lv["pr_profile"], "candidates": provider}
                gen_c, _, _ = generate(pipe2, m_prompts, m_seeds, steps, gs, **kw)
                rows[f"IET-AGC+ + PRSS-perstep {lv['defend']}"] = judge(gen_c, m_prompts, own)
            return rows

        combined = {
            "plain + none": {k: v for k, v in results[0].items() if k not in ("name", "method", "level")},
            **cached(args.out, f"combined-{tag}", defended_model),
            **cached(args.out, f"combined-perstep-{tag}", defended_perstep),
        }
        frontier = cached(
            args.out,
            f"plain-frontier-{tag}",
            lambda: plain_checkpoints(plain_run, judge, m_prompts, m_seeds, own, steps, gs),
        )

    summary = {
        "size": args.size,
        "guidance_scale": gs,
        "total_steps": total_steps(plain_run),  # a warm start's (size.init_from) included
        "config": size.__dict__,
        "alignment_model": {"name": align.name, **{k: v for k, v in align.info.items() if isinstance(v, int | float)}},
        "copy_calibration": judge.calibration,
        "extractor": judge.extractor.name,
        "regime": model_regime,
        "regime_levers": levers,
        "reference_alignment": reference,
        "detection": det,
        "calibration": cal,
        "levels": levels,
        "late_detection": late,
        "per_step_levels": perstep,
        "default_provider": DEFAULT_PROVIDER,
        "search_choices": choices,
        "methods": results,
        "untriggered": untriggered,
        "triggered_alone": triggered,
        "combined": combined,
        "plain_frontier": frontier,  # plain training's checkpoints: what stopping it early would give
        "combined_total_steps": None if plus_run is None else total_steps(plus_run),  # the IET-AGC+ arm's
        "targets": targets(results, combined, untriggered, judge.calibration["distinct_mean"], triggered, frontier),
        "wall_s": time.perf_counter() - t_start,
        "command": command_line(argv),
    }
    write_json(os.path.join(args.out, "summary.json"), summary)
    plot(summary, os.path.join(args.out, "prss.png"))
    sample_grid(grids, mem_imgs, g, os.path.join(args.out, "memorized_prompts.png"))
    open(os.path.join(args.out, "results.md"), "w").write(render(summary, "prss.png"))
    console.print(f"wrote {args.out}/summary.json, results.md, prss.png, memorized_prompts.png")
    if args.publish:
        publish(args.out, args.size, args.publish_name, with_levers=levers is not None)
    return 0


def command_line(argv: list[str] | None) -> str:
    """The command that produced a summary, as BENCHMARKS.md shows it beside its numbers."""
    return " ".join(["python", "jobs/bench_prss.py", *(argv if argv is not None else sys.argv[1:])])


def total_steps(spec: str) -> int:
    """Optimizer steps behind a run's model (RUN, or RUN@ROUND as ``train.init_from`` names it), its
    own warm start's included."""
    from memshard.config import split_init_from
    from memshard.io.rundir import RunDir, training_through

    path, rnd = split_init_from(spec)
    manifest = RunDir(path).manifest()
    if manifest is None:
        raise SystemExit(f"{spec}: no run there (no run.json)")
    return int(training_through(manifest, int(manifest["rounds_completed"]) if rnd is None else rnd)["train_steps"])


def predicting(prediction_type: str) -> str:
    """The model line's note on what the UNet predicts: nothing for epsilon (every published run before v)."""
    return "" if prediction_type == "epsilon" else f", predicting {prediction_type}"


def model_summary(
    size_name: str, size: Size, run: str, out: str, model_regime: Any, levers: Any, argv: list[str] | None
) -> dict[str, Any]:
    """The summary of a ``--stage model`` call (a calibration run): the model and its regime tables."""
    steps = total_steps(run)
    what = f"the {size_name} size's undefended model, {steps:,} steps"
    if size.init_from:
        what += f" ({size.train_steps:,} of them continuing {size.init_from})"
    what += predicting(size.prediction_type)
    if size.source != "emoji":
        what += f", trained on {size.source}"
    timing = os.path.join(out, "baseline.timing.json")
    return {
        "size": size_name,
        "what": what,
        "total_steps": steps,
        "config": size.__dict__,
        "train": json.loads(open(timing).read()) if os.path.exists(timing) else None,
        "regime": model_regime,
        "regime_levers": levers,
        "command": command_line(argv),
    }


def publish(out: str, size: str, name: str = "", model_only: bool = False, with_levers: bool = True) -> None:
    """Copy summary.json and the plots to docs/results/bench-prss-SIZE[-NAME]* (BENCHMARKS.md is generated from them).

    A model-stage summary (``model_only``) has no methods plot or sample grid to copy, and one
    without the lever study (``with_levers`` false) no lever plot.
    """
    os.makedirs(RESULTS_DIR, exist_ok=True)
    stem = f"bench-prss-{size}" + (f"-{name}" if name else "")
    files = [(MODEL_SUMMARY if model_only else "summary.json", ".json"), ("regime.png", "-regime.png")]
    if with_levers:  # else --skip-levers: OUT may hold an earlier call's lever plot, not this summary's
        files.append(("regime-levers.png", "-levers.png"))
    if not model_only:
        files += [("prss.png", ".png"), ("memorized_prompts.png", "-memorized.png")]
    for src, suffix in files:
        shutil.copyfile(os.path.join(out, src), os.path.join(RESULTS_DIR, stem + suffix))
    console.print(f"published docs/results/{stem}.json; now run python jobs/benchmarks_md.py")


def _pct(v: float | None) -> str:
    return "n/a" if v is None else f"{v:+.0%}"


def _change(reduction: float | None) -> str:
    """A reduction (1 - new / old) as the signed change a reader expects (-90%: nine tenths fewer)."""
    return _pct(None if reduction is None else -reduction)


def _rate(v: float) -> str:
    return "n/a" if v != v else f"{v:.0%}"  # NaN: no copy scores were given


def _regime_tables(s: dict[str, Any]) -> list[str]:
    """The regime table (undefended model over CFG scales) and, when measured, the sampler-lever table."""
    lines = [
        "Regime of the undefended model (memorized prompts: share of generations that copy their own image "
        "by the 1/3 rule, and by copy similarity; held-out prompts: share that copy any training image):",
        "",
        "| CFG | memorized prompts: 1/3 rule | copied | memorized images copied at least once | their copy "
        "similarity | their alignment | held-out prompts: 1/3 rule | copied | held-out alignment |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in s["regime"]:
        m, h = r["memorized_prompts"], r["heldout_prompts"]
        lines.append(
            f"| {r['guidance_scale']} | {m['copies_own']:.1%} | {m['copy_over']:.1%} | "
            f"{m.get('images_copied', float('nan')):.0%} | {m['copy_mean']:.3f} | {m['alignment']:.3f} | "
            f"{h['memorized_fraction']:.1%} | {h['copy_over']:.1%} | {h['alignment']:.3f} |"
        )
    ref = s.get("reference_alignment")
    if ref:  # summaries published before it was measured have none
        lines += [
            "",
            f"Alignment of the real images with their own captions (a generation that follows its prompt "
            f"perfectly): memorized {ref['memorized']:.3f}, held-out {ref['heldout']:.3f}.",
        ]
    if s.get("regime_levers"):
        lines += [
            "",
            "Sampler levers at high CFG (the undefended model; held-out: the first 48 prompts; "
            "`regime-levers.png` beside the summary):",
            "",
            "| CFG | lever | memorized prompts copied | 1/3 rule | their alignment | held-out alignment |",
            "|---|---|---|---|---|---|",
        ]
        lines += [
            f"| {r['guidance_scale']} | {r['lever']} | {r['memorized_prompts']['copy_over']:.1%} | "
            f"{r['memorized_prompts']['copies_own']:.1%} | {r['memorized_prompts']['alignment']:.3f} | "
            f"{r['heldout_prompts']['alignment']:.3f} |"
            for r in s["regime_levers"]
        ]
    return lines


def render(s: dict[str, Any], plot_path: str) -> str:
    """BENCHMARKS.md's generated block for one size: calibration, methods, detection, time, combined.

    A model-stage summary (a calibration run: ``regime`` and ``regime_levers`` only, no
    ``methods``) renders as its command and the two regime tables.
    """
    if "methods" not in s:
        return "\n".join([f"Command: `{s['command']}` ({s['what']})", "", *_regime_tables(s), ""])
    base = s["methods"][0]
    c = s["config"]
    cal = s["copy_calibration"]
    steps = f"{s.get('total_steps', c['train_steps']):,}"
    if c.get("init_from"):
        steps += f" ({c['train_steps']:,} of them continuing {c['init_from']})"
    lines = [
        f"Command: `{s['command']}`",
        "",
        f"Model: `{c['preset']}` text-conditional UNet at {c['image_size']} px, {steps} steps at batch "
        f"{c['batch_size']}, caption dropout {c['caption_dropout']}"
        # summaries from before the field are epsilon-prediction models
        f"{predicting(c.get('prediction_type', 'epsilon'))}; "
        f"{c['num_memorized']} memorized captions (each image x{c['duplicates']}), {c['num_single']} seen once, "
        f"{c['num_heldout']} held out; "
        f"{c['gens_per_prompt']} generations per memorized prompt, {c['sample_steps']}-step DDIM, "
        f"**CFG {s['guidance_scale']}**.",
        "",
        f"Copy similarity: {s['extractor']}, the cosine to the nearest training image; "
        f"a generation **copies** when it scores at least {cal['threshold']:.3f}, which "
        f"{cal['fpr']:.1%} of training images reach against their nearest other training image "
        f"(mean {cal['distinct_mean']:.3f}; augmented crops/flips of training images reach it {_rate(cal['tpr'])}). "
        "Memorized: the 1/3 rule (pixel L2 to the nearest over the second nearest training image).",
        "",
        *_regime_tables(s),
    ]
    lines += [
        "",
        "Memorized prompts, same seeds for every method (alignment with the ORIGINAL prompt: "
        f"{s['alignment_model']['name']}, held-out retrieval top-1 {s['alignment_model'].get('holdout_top1', 0):.2f}):",
        "",
        "| method | level | copy mean | copy p95 | copied | vs none | memorized (1/3) | vs none | images copied | "
        "alignment | vs none | triggered | time ratio |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in s["methods"]:
        mem_rel = r["memorized_fraction"] / base["memorized_fraction"] - 1 if base["memorized_fraction"] else None
        over_rel = r["copy_over"] / base["copy_over"] - 1 if base["copy_over"] else None
        lines.append(
            f"| {r['method']} | {'' if r['level'] is None else r['level']} | {r['copy_mean']:.3f} | "
            f"{r['copy_p95']:.3f} | {r['copy_over']:.1%} | {_pct(over_rel)} | {r['memorized_fraction']:.1%} | "
            f"{_pct(mem_rel)} | {r.get('images_copied', float('nan')):.0%} | {r['alignment']:.3f} | "
            f"{r['alignment'] / base['alignment'] - 1:+.1%} | "
            f"{r['triggered']:.0%} | x{r['time_ratio']:.2f} |"
        )
    choices = s.get("search_choices")
    if choices:
        lines += [
            "",
            "What semantic search chose from (memorized generations that trigger; SS takes the first candidate "
            "under lambda_ss in the provider's order, else the one of lowest magnitude):",
            "",
            "| candidates | level | triggered | a candidate under lambda_ss | the first of them is a paraphrase |",
            "|---|---|---|---|---|",
        ]
        lines += [
            f"| {name} | {r['level']} | {r['triggered']} | {r['with_below']} | {r['same_content']} |"
            for name, rows in choices.items()
            for r in rows
        ]
    for fam in [m for m in PRSS_CURVES if any(r["method"] == m for r in s["methods"])]:
        dom = dominance(s["methods"], fam)
        lines += [
            "",
            f"Point by point on the privacy-alignment plot (lower copy mean and higher alignment wins): {fam} "
            f"levels a baseline beats: {', '.join(dom['prss_dominated']) or 'none'}; baseline points a {fam} "
            f"level beats: {', '.join(dom['baselines_dominated']) or 'none'}.",
        ]
    within = (s.get("targets") or {}).get("prss_within_5pct_alignment")
    lines += [
        "",
        "The issue's first target (a PRSS level within 5% of the undefended alignment, copies 66% lower): "
        + (
            f"best {within['name']}: copy similarity's excess over distinct images "
            f"{_pct(-within['copy_excess_reduction'])} (the raw mean {_pct(-within['copy_reduction'])}), copied share "
            f"{_pct(None if within['copied_reduction'] is None else -within['copied_reduction'])}, alignment "
            f"{within['alignment_change']:+.1%}."
            if within
            else "no PRSS level keeps within 5% of the alignment."
        ),
    ]
    lines += [
        "",
        "Levels are the share of memorized prompts to defend (thresholds from those prompts' own undefended "
        "trajectories on calibration seeds); random_token's level is the number of added words, gaussian_noise's "
        "the sigma, Wen's the level whose lambda_ss it optimises down to. pr, ss and the other candidate providers "
        f"run at level {MID_LEVEL}; the PRSS levels use the `{s['default_provider']}` provider.",
        "",
        "| level | lambda_ss | lambda_pr | tau | memorized prompts triggered (calibration) | held-out triggered |",
        "|---|---|---|---|---|---|",
    ]
    lines += [
        f"| {lv['defend']} | {lv['lambda_ss']:.3f} | {lv['lambda_pr']:.3f} | {lv['tau']:.3f} | "
        f"{lv['memorized_triggered']:.0%} | {lv.get('heldout_triggered', float('nan')):.0%} |"
        for lv in s["levels"]
    ]
    perstep = s.get("per_step_levels")
    if perstep and any(r["method"] == "prss-perstep" for r in s["methods"]):
        prof = perstep[0]["pr_profile"]
        paraphrased = any(r["method"] == f"prss-{PARAPHRASE}" for r in s["methods"])
        lines += [
            "",
            "prss-perstep: the same triggers, re-anchoring at step t when m_t > lambda_pr x profile[t] (tau "
            "likewise); the profile is the memorized trajectories' median m_t per step over its median "
            f"(x{prof[0]:.2f} at step 1, x{prof[len(prof) // 2]:.2f} at step {len(prof) // 2 + 1}, "
            f"x{max(prof):.2f} at most); lambda_pr by level: "
            + ", ".join(f"{lv['defend']}: {lv['lambda_pr']:.3f}" for lv in perstep)
            + f"; candidates: {'paraphrases' if paraphrased else s['default_provider']}.",
        ]
    late_det = (s.get("late_detection") or {}).get("detection")
    lines += [
        "",
        "Detection (first-step magnitude, memorized against held-out prompts"
        + ('; rows "at step k": the magnitude at the later detection step' if late_det else "")
        + "):",
        "",
        "| generations per prompt | AUC | TPR at 1% FPR | AUC against once-seen captions |",
        "|---|---|---|---|",
    ]
    lines += [
        f"| {n} | {d['auc']:.3f} | {d['tpr_at_1pct_fpr']:.1%} | {d['auc_vs_single']:.3f} |"
        for n, d in s["detection"].items()
    ]
    if late_det:
        lines += [
            f"| {n} at step {s['late_detection']['detect_step']} | {d['auc']:.3f} | {d['tpr_at_1pct_fpr']:.1%} | "
            f"{d['auc_vs_single']:.3f} |"
            for n, d in late_det.items()
        ]
    by_step = s["calibration"].get("auc_by_step")
    if by_step:
        k = int(np.argmax(by_step))
        lines += [
            "",
            f"The same magnitude read later in the trajectory (calibration seeds, one trajectory per seed): AUC "
            f"{by_step[0]:.3f} at step 1, {by_step[len(by_step) // 2]:.3f} at step {len(by_step) // 2 + 1}, best "
            f"{by_step[k]:.3f} at step {k + 1} of {len(by_step)}"
            + (
                f"; averaged over all steps (Wen et al.'s statistic, known only after sampling) "
                f"{s['calibration']['auc_mean_over_steps']:.3f}"
                if "auc_mean_over_steps" in s["calibration"]
                else ""
            )
            + ".",
        ]
    late = s.get("late_detection")
    if late and any(r["method"] in PRSS_METHODS[1:] for r in s["methods"]):
        lines += [
            "",
            f"Detection at step {late['detect_step']} (the best AUC, {late['auc']:.3f}, among the first "
            f"{late['window']} steps on calibration seeds): prss-late switches to PRSS guidance from that step, "
            "prss-restart samples a triggered image again from x_T with the prompt chosen there. Its levels keep "
            "lambda_pr and tau:",
            "",
            "| level | lambda_ss at that step | memorized prompts triggered (calibration) | held-out triggered |",
            "|---|---|---|---|",
        ]
        lines += [
            f"| {lv['defend']} | {lv['lambda_ss']:.3f} | {lv['memorized_triggered']:.0%} | "
            f"{lv.get('heldout_triggered', float('nan')):.0%} |"
            for lv in late["levels"]
        ]
        lu = late.get("untriggered")
        if lu:
            lines += [
                "",
                f"Held-out prompts on the test seeds at level {lu['level']}: {lu['triggered_fraction']:.1%} triggered "
                f"with detection at step {late['detect_step']}, "
                f"{s['untriggered']['triggered_fraction']:.1%} at step 1; "
                f"untriggered images bit-identical to plain CFG: {lu['untriggered_equal']}.",
            ]
    u = s["untriggered"]
    lines += [
        "",
        f"Held-out prompts under PRSS (level {u['level']}): {u['triggered_fraction']:.1%} triggered; the mixed batch "
        f"costs x{u['time_ratio']:.2f} of plain CFG"
        + (
            f", the untriggered prompts alone x{u['untriggered_time_ratio']:.2f}"
            if "untriggered_time_ratio" in u
            else ""
        )
        + f"; untriggered images bit-identical to plain CFG: {u['untriggered_equal']}.",
    ]
    t = s.get("triggered_alone") or {}
    if t.get("images"):
        lines += [
            "",
            f"Memorized prompts PRSS triggers on (level {t['level']}), {t['images']} images sampled as batches of "
            f"their own: x{t['time_ratio']:.2f} of plain CFG ({t['candidates_scored']:.0f} candidates scored, "
            f"re-anchored at {t['pr_steps']:.0f} of {s['config']['sample_steps']} steps; best of 2 timings); "
            f"x{t.get('time_ratio_few_candidates', float('nan')):.2f} scoring {t.get('few_candidates', '?')} "
            "candidates"
            + (
                f"; x{t[PARAPHRASE]['time_ratio']:.2f} with the paraphrase list "
                f"({t[PARAPHRASE]['candidates_scored']:.0f} candidates scored)"
                if PARAPHRASE in t
                else ""
            )
            + ".",
        ]
    if s.get("combined"):
        own = s["targets"].get("combined_at_own_alignment") or {}
        lines += [
            "",
            "Combined system (memorized prompts; PRSS levels calibrated on the IET-AGC+ model"
            + f", {s['config']['shards']} shard{'s' if s['config']['shards'] > 1 else ''}"
            + (f", trained {s['combined_total_steps']:,} steps" if s.get("combined_total_steps") else "")
            + "):",
            "",
            "| training + sampling | copy mean | copy p95 | copied | memorized (1/3) | alignment |"
            + (" plain training stopped early at this alignment: copied | vs it |" if own else ""),
            "|---|---|---|---|---|---|" + ("---|---|" if own else ""),
        ]
        for k, r in s["combined"].items():
            row = (
                f"| {k} | {r['copy_mean']:.3f} | {r['copy_p95']:.3f} | {r['copy_over']:.1%} | "
                f"{r['memorized_fraction']:.1%} | {r['alignment']:.3f} |"
            )
            if own:  # summaries from before the frontier comparison have none
                e = (own.get(k) or {}).get("early_stopping")
                at = "" if e is None else f"{e['copy_over']:.1%}" + (f" ({e['steps']:,} steps)" if e["steps"] else "")
                row += f" {at} | {_change((own.get(k) or {}).get('copied_reduction'))} |"
            lines.append(row)
        lines += combined_lines(s)
    lines += ["", f"![privacy vs alignment]({plot_path})", ""]
    return "\n".join(lines)


def combined_lines(s: dict[str, Any]) -> list[str]:
    """The early-stopping frontier of plain training and the combined system's verdict at matched alignment."""
    t = s["targets"]
    lines = []
    if s.get("plain_frontier"):
        lines += [
            "",
            "Plain training stopped early (the undefended sampler on each committed round of the undefended model, "
            "same prompts and seeds): the frontier a defence must beat.",
            "",
            "| round | steps | copy mean | copied | memorized (1/3) | alignment |",
            "|---|---|---|---|---|---|",
        ]
        lines += [
            f"| {p['round']} | {p['steps']:,} | {p['copy_mean']:.3f} | {p['copy_over']:.1%} | "
            f"{p['memorized_fraction']:.1%} | {p['alignment']:.3f} |"
            for p in s["plain_frontier"]
        ]
    if "combined_matched_alignment_q" not in t:
        return lines
    q, m = t["combined_matched_alignment_q"], t.get("combined_matched_alignment")
    if m is None:
        best = max(t["combined_at_own_alignment"].items(), key=lambda kv: kv[1]["alignment"])
        verdict = (
            f"no IET-AGC+ row reaches it (the best, {best[0]}, has alignment {best[1]['alignment']:.3f}), so the "
            "target (memorized fraction -90% at matched alignment) is unmeasurable; each row's comparison at its own "
            "alignment is in the table"
        )
    else:
        e = m["early_stopping"]
        verdict = (
            f"{m['name']} reaches it (alignment {m['alignment']:.3f}) and copies {m['copied']:.1%} of generations "
            f"(1/3 rule {m['memorized_fraction']:.1%}) against {e['copy_over']:.1%} ({e['memorized_fraction']:.1%}) "
            f"for plain training stopped at {e['steps']:,} steps: copied {_change(m['copied_reduction'])}, "
            f"memorized {_change(m['memorized_reduction'])} (target -90%)"
        )
    return [
        *lines,
        "",
        f"Matched alignment: at least {MATCHED_ALIGNMENT:g} x plain training's best alignment = {q:.3f}; {verdict}.",
    ]


def plot(s: dict[str, Any], path: str) -> None:
    """Copy similarity against alignment: a curve per method over its levels, the undefended point alone."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9.5, 5))
    methods = list(dict.fromkeys(r["method"] for r in s["methods"]))
    colours = plt.get_cmap("tab20").colors  # one colour per method: more methods than the default cycle's 10
    for i, m in enumerate(methods):
        rows = [r for r in s["methods"] if r["method"] == m]
        x, y = [r["copy_mean"] for r in rows], [r["alignment"] for r in rows]
        style = "*" if m == "none" else ("o-" if len(rows) > 1 else "s")
        lw = 2.5 if m in ("prss", f"prss-{PARAPHRASE}", "prss-perstep") else 1.2
        ax.plot(x, y, style, label=m, color=colours[(2 * i) % 20 + (2 * i) // 20 % 2],
                markersize=12 if m == "none" else 6, lw=lw)  # fmt: skip
        for r in rows if len(rows) > 1 else []:
            ax.annotate(str(r["level"]), (r["copy_mean"], r["alignment"]), fontsize=7, xytext=(3, 3),
                        textcoords="offset points")  # fmt: skip
    if s.get("plain_frontier"):
        pts = s["plain_frontier"]
        ax.plot([p["copy_mean"] for p in pts], [p["alignment"] for p in pts], "k--", lw=1,
                label="plain training, stopped early")  # fmt: skip
        for p in pts:
            ax.annotate(f"{p['steps']:,}", (p["copy_mean"], p["alignment"]), fontsize=7, xytext=(3, -9),
                        textcoords="offset points")  # fmt: skip
    combined = s.get("combined") or {}
    for key, colour, label in (("PRSS ", "black", "IET-AGC+ model (+ PRSS levels)"),
                               ("PRSS-perstep ", "dimgray", "IET-AGC+ model + PRSS-perstep levels")):  # fmt: skip
        plus = [r for k, r in combined.items() if k.startswith("IET-AGC+") and (key in k or k.endswith("none"))]
        if plus:
            ax.plot([r["copy_mean"] for r in plus], [r["alignment"] for r in plus], "^-", color=colour, lw=1.5,
                    label=label)  # fmt: skip
    ax.set_xlabel(f"copy similarity, mean ({s['extractor']}; lower = more private)")
    ax.set_ylabel("alignment with the original prompt")
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))  # beside the plot: it hides no point
    ax.set_title(f"Memorized prompts at CFG {s['guidance_scale']}: privacy against alignment")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def sample_grid(grids: dict[str, np.ndarray], train: np.ndarray, g: int, path: str, rows: int = 8) -> None:
    """Rows: memorized prompts; columns: the training image, then one generation per method."""
    from memshard.models.sampling import grid

    wanted = ("none", "random_token 4", "gaussian_noise 0.3", f"wen {MID_LEVEL}", f"ss {MID_LEVEL}", f"pr {MID_LEVEL}")
    more = (f"prss {MID_LEVEL}", *(f"prss-{p} {MID_LEVEL}" for p in (*PROVIDERS, PARAPHRASE, "perstep")), "reworded")
    names = [n for n in (*wanted, *more) if n in grids]
    tiles = []
    for i in range(min(rows, len(train))):
        tiles.append(train[i])
        tiles += [grids[n][i * g] for n in names]
    grid(np.stack(tiles), cols=len(names) + 1, scale=4).save(path)


if __name__ == "__main__":
    sys.exit(main())
