"""What ``POST /generate`` accepts: the request limits, the bodies, their validation, and the privacy floor.

Ray-free: parsing and the PRSS floor are plain functions of the bytes, the limits and the server's
PRSS settings, tested without a server. Every refusal is a :class:`RequestError` with an HTTP status
and a message naming the problem; :mod:`memshard.serving.app` turns it into the response.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from memshard.config import ConfigError, PRSSConfig, reanchoring_problem
from memshard.seeds import image_seeds

THRESHOLDS = ("lambda_ss", "lambda_pr", "tau")
MAX_SEED = 2**31 - 1


class RequestError(Exception):
    """A request the server refuses: a 4xx (or 503) ``status``, a message for the client, maybe Retry-After."""

    def __init__(self, status: int, message: str, retry_after: int | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.retry_after = retry_after


@dataclass(frozen=True)
class ServeLimits:
    """Bounds on every request, so that no single request can tie up or exhaust a replica."""

    max_images: int = 8  # images per request (prompts x num_images)
    max_steps: int = 100
    default_steps: int = 50
    max_guidance_scale: float = 30.0
    max_body_bytes: int = 64 * 1024
    max_batch_images: int = 16  # images per pipeline call (the @serve.batch size)
    batch_wait_s: float = 0.05  # how long a batch waits for more requests after its first
    deadline_s: float = 60.0  # a generation request is answered within this, or refused (503 + Retry-After)
    body_timeout_s: float = 10.0  # the whole body must arrive within this (408 after it)
    max_connections: int = 256  # requests a replica holds at once (reading, queued, generating, probes)
    max_queued_images: int = 256  # images admitted and not yet generated (a memory bound beside the deadline)

    def __post_init__(self) -> None:
        if min(self.max_images, self.max_steps, self.default_steps, self.max_body_bytes) < 1:
            raise ConfigError("serve limits must be positive")
        if min(self.deadline_s, self.body_timeout_s) <= 0 or self.max_connections < 8:
            raise ConfigError("deadline_s and body_timeout_s must be > 0 and max_connections >= 8")
        if self.max_queued_images < self.max_images:
            raise ConfigError(f"max_queued_images {self.max_queued_images} < max_images {self.max_images}")
        if self.default_steps > self.max_steps:
            raise ConfigError(f"default_steps {self.default_steps} > max_steps {self.max_steps}")
        if self.max_batch_images < self.max_images:
            # serve.batch refuses an item larger than the whole batch
            raise ConfigError(f"max_batch_images {self.max_batch_images} < max_images {self.max_images}")
        if self.max_guidance_scale < 1 or self.batch_wait_s < 0:
            raise ConfigError("max_guidance_scale must be >= 1 and batch_wait_s >= 0")


# -- the privacy floor ---------------------------------------------------------------
def server_prss(run: str, overrides: dict[str, float | None] | None = None) -> tuple[PRSSConfig, dict[str, str]]:
    """The server's PRSS settings and, per threshold, where it came from (server | calibration | config).

    Resolved once at start-up (see the module docstring for the rule); ``overrides`` are the
    operator's explicit thresholds.
    """
    from memshard.config import build_config
    from memshard.io.rundir import RunDir
    from memshard.prss.calibration import calibration_detection, load_calibration

    manifest = RunDir(run).manifest()
    prss = build_config(manifest["config"]).prss if manifest else PRSSConfig()
    values = prss.model_dump()
    sources = dict.fromkeys(THRESHOLDS, "config" if manifest else "default")
    calibration = load_calibration(run)
    if calibration is not None:
        values.update({k: float(calibration[k]) for k in THRESHOLDS})
        sources = dict.fromkeys(THRESHOLDS, "calibration")
    for key, value in (overrides or {}).items():
        if key not in THRESHOLDS:
            raise ConfigError(f"unknown PRSS threshold {key!r} (one of {', '.join(THRESHOLDS)})")
        if value is not None:
            values[key] = float(value)
            sources[key] = "server"
    # a per-step shape of lambda_pr goes with the lambda_pr it came with; an operator's lambda_pr is flat
    if sources["lambda_pr"] == "calibration":
        values["pr_profile"] = calibration.get("pr_profile")  # type: ignore[union-attr]
    elif sources["lambda_pr"] == "server":
        values["pr_profile"] = None
    if calibration is not None and sources["lambda_ss"] == "calibration":
        # lambda_ss comes with the step it was calibrated at, and its step count: replicas never reread the file
        values.update(calibration_detection(calibration))
    try:
        prss = PRSSConfig.model_validate(values)
    except ValidationError as exc:
        raise ConfigError(f"server PRSS thresholds: {_first_error(exc)}") from None
    if prss.candidates == "list":  # a server has no per-prompt lists: use the rule-based paraphrases
        prss = prss.model_copy(update={"candidates": "perturb"})
    return prss, sources


# -- requests ------------------------------------------------------------------------
class _Body(BaseModel):
    """Fields common to both kinds of request (strict: no silent coercion of "4" to 4)."""

    model_config = ConfigDict(extra="forbid", strict=True)

    num_images: int = Field(1, ge=1)
    steps: int | None = Field(None, ge=1)
    seed: int = Field(0, ge=0, le=MAX_SEED)
    seeds: list[int] | None = None


class T2IBody(_Body):
    """``POST /generate`` for a text-to-image run; ``num_images`` is per prompt."""

    prompt: str | list[str]
    guidance_scale: float | None = Field(None, allow_inf_nan=False)
    prss: bool = True
    lambda_ss: float | None = Field(None, gt=0, allow_inf_nan=False)
    lambda_pr: float | None = Field(None, gt=0, allow_inf_nan=False)
    tau: float | None = Field(None, gt=0, allow_inf_nan=False)


class DDPMBody(_Body):
    """``POST /generate`` for an unconditional / class-conditional run."""

    label: int | None = None


@dataclass
class Job:
    """One validated request, as the batch handler needs it."""

    seeds: list[int]
    steps: int
    seed: int
    prompts: list[str] = field(default_factory=list)  # one per image (t2i)
    labels: list[int] | None = None  # one per image (class-conditional)
    guidance_scale: float = 1.0
    prss: bool = True
    thresholds: dict[str, float] = field(default_factory=dict)
    clamped: dict[str, dict[str, float]] = field(default_factory=dict)
    request_id: str = ""
    deadline: float = math.inf  # time.monotonic() by which the answer is due; a batch drops a job past it
    admitted_s: float | None = None  # the seconds Admission counted it for, while admitted

    @property
    def work(self) -> int:
        """Image-steps: what the admission estimate counts."""
        return len(self.seeds) * self.steps

    @property
    def key(self) -> tuple[Any, ...]:
        """Jobs with equal keys can share one pipeline call."""
        return (self.steps, self.guidance_scale, self.prss, *sorted(self.thresholds.items()))


def images_in(jobs: list[Job]) -> int:
    """The @serve.batch size of a list of jobs: images, so a batch bounds the pipeline call."""
    return sum(len(j.seeds) for j in jobs)


def _first_error(exc: ValidationError) -> str:
    """A one-line message for the first problem pydantic found."""
    err = exc.errors()[0]
    loc = ".".join(str(p) for p in err.get("loc", ()))
    if err.get("type") == "extra_forbidden":
        return f"unknown field {loc!r}"
    return f"field {loc!r}: {err.get('msg', 'invalid')}" if loc else str(err.get("msg", "invalid"))


def _decode(body: bytes) -> dict[str, Any]:
    def no_constant(name: str) -> Any:
        raise ValueError(f"{name} is not a JSON number")

    try:
        obj = json.loads(body, parse_constant=no_constant)
    except (ValueError, UnicodeDecodeError) as exc:
        raise RequestError(400, f"body is not valid JSON: {exc}") from None
    except RecursionError:
        raise RequestError(400, "body is not valid JSON: nested too deeply") from None
    if not isinstance(obj, dict):
        raise RequestError(400, "body must be a JSON object")
    return obj


def _seeds(body: _Body, n: int) -> list[int]:
    if body.seeds is None:
        return image_seeds(body.seed, n)  # memshard sample's rule
    if len(body.seeds) != n:
        raise RequestError(400, f"'seeds' has {len(body.seeds)} entries for {n} images")
    if any(not 0 <= s < 2**63 for s in body.seeds):
        raise RequestError(400, "'seeds' must be integers in [0, 2**63)")
    return list(body.seeds)


def _steps(body: _Body, limits: ServeLimits) -> int:
    steps = limits.default_steps if body.steps is None else body.steps
    if steps > limits.max_steps:
        raise RequestError(400, f"steps={steps}: this server runs at most {limits.max_steps} steps")
    return steps


def parse_t2i(
    raw: bytes,
    limits: ServeLimits,
    prss: PRSSConfig,
    allow_no_prss: bool = False,
    tokenizer: Any = None,
) -> Job:
    """Validate a text-to-image request body and apply the privacy floor; raises :class:`RequestError`."""
    from memshard.prss.sample import check_prompts

    obj = _decode(raw)
    try:
        body = T2IBody.model_validate(obj)
    except ValidationError as exc:
        raise RequestError(400, _first_error(exc)) from None
    prompts = [body.prompt] if isinstance(body.prompt, str) else list(body.prompt)
    if not prompts:
        raise RequestError(400, "'prompt' must be a string or a non-empty list of strings")
    n = len(prompts) * body.num_images
    if n > limits.max_images:
        raise RequestError(
            400, f"{len(prompts)} prompt(s) x num_images={body.num_images} = {n} images; at most {limits.max_images}"
        )
    try:
        check_prompts(prompts, tokenizer)
    except ValueError as exc:
        raise RequestError(400, str(exc)) from None
    if not body.prss and not allow_no_prss:
        raise RequestError(403, "PRSS cannot be turned off on this server (started without --allow-no-prss)")
    guidance = prss.guidance_scale if body.guidance_scale is None else body.guidance_scale
    if not 1 <= guidance <= limits.max_guidance_scale:
        raise RequestError(400, f"guidance_scale={guidance}: must be in [1, {limits.max_guidance_scale}]")
    thresholds: dict[str, float] = {}
    clamped: dict[str, dict[str, float]] = {}
    for key in THRESHOLDS:
        floor, asked = float(getattr(prss, key)), getattr(body, key)
        thresholds[key] = floor if asked is None else min(float(asked), floor)
        if asked is not None and asked > floor:
            clamped[key] = {"requested": float(asked), "used": floor}
    problem = reanchoring_problem(thresholds["tau"], thresholds["lambda_pr"], guidance, prss.mode)
    if body.prss and problem is not None:
        raise RequestError(400, f"PRSS with the effective thresholds: {problem}")
    return Job(
        seeds=_seeds(body, n),
        steps=_steps(body, limits),
        seed=body.seed,
        prompts=[p for p in prompts for _ in range(body.num_images)],
        guidance_scale=float(guidance),
        prss=body.prss,
        thresholds=thresholds if body.prss else {},
        clamped=clamped if body.prss else {},
    )


def parse_ddpm(raw: bytes, limits: ServeLimits, num_classes: int | None) -> Job:
    """Validate a DDPM request body; labels cycle 0..K-1 like ``memshard sample`` unless ``label`` is given."""
    obj = _decode(raw)
    if "prompt" in obj:
        raise RequestError(400, "unknown field 'prompt': this run serves an image model without text conditioning")
    try:
        body = DDPMBody.model_validate(obj)
    except ValidationError as exc:
        raise RequestError(400, _first_error(exc)) from None
    n = body.num_images
    if n > limits.max_images:
        raise RequestError(400, f"num_images={n}: at most {limits.max_images} per request")
    labels = None
    if num_classes:
        if body.label is not None and not 0 <= body.label < num_classes:
            raise RequestError(400, f"label={body.label}: this model has classes 0..{num_classes - 1}")
        labels = [body.label] * n if body.label is not None else [i % num_classes for i in range(n)]
    elif body.label is not None:
        raise RequestError(400, "this model is unconditional: it takes no 'label'")
    return Job(seeds=_seeds(body, n), steps=_steps(body, limits), seed=body.seed, labels=labels)
