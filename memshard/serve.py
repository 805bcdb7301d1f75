"""`memshard serve RUN`: the run's served checkpoint behind an HTTP endpoint (Ray Serve).

One deployment, :class:`MemshardServer`, serves either kind of run:

* text-to-image runs: ``POST /generate`` with ``{"prompt": "a red square", "num_images": 2}``
  returns PNG images (base64) and the per-image PRSS report. PRSS is always on unless the
  server was started with ``allow_no_prss`` (then a request may send ``"prss": false``);
* DDPM runs (unconditional / class-conditional): ``POST /generate`` with
  ``{"num_images": 4, "label": 3}`` (``label`` only for class-conditional models).

``GET /health`` answers what is served (no paths or URIs), the PRSS floor and the request
limits; ``GET /health/live`` and ``GET /health/ready`` are the probes for a load balancer or
Kubernetes. Serve's own replica health check is :meth:`MemshardServer.check_health`.

Under load
----------
Every request is bounded in time as well as in size (:class:`ServeLimits`), so that neither
a flood of work nor slow or hostile clients can take a replica offline:

* the body is read under ``body_timeout_s`` (408 after it) and before the request takes any
  share of generation, so clients that send half a body and wait hold a cheap connection,
  not a generation slot; a replica holds at most ``max_connections`` requests in all (Serve's
  ``max_ongoing_requests``), far more than it generates at once;
* admission is by deadline: the replica keeps a running estimate of its seconds per
  image-step (measured by a warm-up call at start and by every batch since) and refuses with
  503 and ``Retry-After`` a request that the work already queued would not let it finish
  within ``deadline_s``; a request still waiting at its deadline is answered 503 the same way
  (and dropped from its batch if that has not started). Serve's ``request_timeout_s``
  defaults to the deadline plus the body timeout plus 10 s, a backstop for anything else;
* the probes are answered on the event loop, which generation never blocks (it runs in a
  worker thread), so they never wait behind a batch: ``/health/live`` is 200 while the
  replica answers at all, ``/health/ready`` 200 while it can generate (503 after 3 failed
  pipeline calls in a row, when Serve also restarts it);
* objects that are not thread-safe are never shared between the event loop and the
  generation thread: prompts are counted with the replica's own copy of the tokenizer;
* every malformed request is a 4xx naming the problem (415 for a body that is not declared
  ``application/json``); a 500 carries the request id (also in Serve's ``x-request-id``
  header) and nothing else, the replica log has the exception under that id.

Past ``max_connections`` requests a replica's requests queue in Serve's proxy
(``max_queued_requests``) and beyond that Serve answers 503 itself, with ``Retry-After`` but
with its own message (which names the queue's counts): size replicas so that this is not
reached.

The privacy floor (text-to-image)
---------------------------------
The server's thresholds are resolved once, at start-up, key by key: thresholds given to
:func:`serve_run` (the operator's ``--lambda-ss/--lambda-pr/--tau``) win over
``RUN/prss/calibration.json`` (``memshard calibrate-prss``, thresholds on the model's own
scale), which wins over the run config's ``prss`` section (the spec's SD-scale defaults).
A request may send ``lambda_ss``, ``lambda_pr`` and ``tau``; each effective value is
``min(requested, server's)``. Lower thresholds are more private (more prompts trigger the
search, re-anchoring starts earlier and reaches full strength sooner), so a request can ask
for more privacy but never for less; a clamped value is reported back in
``response["prss"]["clamped"]`` with what was asked. PRSS mode, candidate source and search
size stay the server's.

Batching
--------
Requests are batched with ``@serve.batch`` (the batch size counts images, not requests);
requests with the same sampling settings (steps, guidance, thresholds) go into ONE pipeline
call, with per-image noise seeds (image i of a request with seed s uses
``s * 1_000_003 + i``, the rule of ``memshard sample``) and per-request PRSS candidates, so
sharing a call changes no image's noise, prompt, thresholds or candidates. A request alone in
its call gives exactly (bit for bit) what ``memshard sample`` gives for the same prompts, seed
and thresholds, on the same hardware and torch thread count (Ray sets a replica's thread
count from the CPUs it reserves, 1 for a fraction; ``GET /health`` says how many). In a
shared call, or with another thread count, kernels may round differently, and guidance
amplifies it over the steps (measured on CPU: at most 1 level of 255 in a pixel at 2-4 steps,
2 levels at 10 steps and guidance 7.5; a magnitude within rounding of a threshold could flip
its trigger); ``batch`` in the response says how many requests shared the call.
"""

# No `from __future__ import annotations`: FastAPI must see the real `Request` class in the
# route signatures of the Serve ingress class (a string annotation there becomes a query parameter).
import asyncio
import base64
import copy
import io
import json
import logging
import math
import os
import socket
import time
import urllib.request
import uuid
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import numpy as np
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from ray import serve
from ray.serve import Application
from ray.serve.api import RunTarget
from ray.serve.config import BackpressureConfig

from .config import ConfigError, PRSSConfig

THRESHOLDS = ("lambda_ss", "lambda_pr", "tau")
SEED_STRIDE = 1_000_003  # image i of seed s uses s * SEED_STRIDE + i (memshard sample's rule)
MAX_SEED = 2**31 - 1
log = logging.getLogger("ray.serve")  # the replica's log, where Serve writes the request id beside each line


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
    from .checkpoint import RunDir
    from .config import build_config
    from .privacy import load_calibration

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


def _images_in(jobs: list[Job]) -> int:
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
        return [body.seed * SEED_STRIDE + i for i in range(n)]
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
    from .t2i import check_prompts

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
    if body.prss and prss.mode != "ss" and guidance > 1 and thresholds["tau"] <= thresholds["lambda_pr"]:
        tau, lpr = thresholds["tau"], thresholds["lambda_pr"]
        raise RequestError(400, f"PRSS needs tau > lambda_pr (effective tau={tau:g}, lambda_pr={lpr:g})")
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


# -- admission -----------------------------------------------------------------------
class Admission:
    """Deadline-based admission: refuse up front the work the queue cannot finish in time.

    A pipeline call of n images x s steps costs about ``n * (per_image_s + s * per_step_s)``
    (per image: text encoding, the first-step PRSS check, decoding, PNG encoding; per step: the
    UNet). :meth:`calibrate` fits the two rates from two full-batch calls of different step
    counts (the replica's warm-up); every call since scales them by an exponential average of
    measured over predicted time, so the estimate follows the machine as it is loaded. Each
    admitted job adds its predicted seconds to the backlog until it is done. A request whose
    wait, backlog + its own time + the batch window, exceeds the deadline is refused with 503
    and a ``Retry-After`` of the excess: it would only have waited to be dropped. A replica with
    nothing queued admits any request (the deadline still bounds its wait), so that a
    pessimistic estimate never refuses everything. Ray-free and synchronous: the deployment
    calls it from its event loop only.
    """

    def __init__(self, limits: ServeLimits, smoothing: float = 0.3) -> None:
        self.limits = limits
        self.smoothing = smoothing
        self.per_image_s = 0.0
        self.per_step_s = 0.0  # per image-step; both 0 until calibrated (then nothing is refused on time)
        self.scale = 1.0  # measured / predicted, averaged over recent calls
        self.backlog_s = 0.0  # predicted seconds of the jobs admitted and not finished
        self.images = 0
        self.jobs = 0  # admitted and not finished

    def calibrate(self, images: int, steps: tuple[int, int], seconds: tuple[float, float]) -> None:
        """Fit the two rates from calls of ``images`` images at two step counts (``steps[0] < steps[1]``)."""
        (s1, s2), (t1, t2) = steps, seconds
        per_step = (t2 - t1) / (images * (s2 - s1)) if s2 > s1 else 0.0
        if per_step <= 0:  # timing noise: charge everything to the steps (pessimistic for short requests)
            self.per_image_s, self.per_step_s = 0.0, t2 / (images * s2)
        else:
            self.per_step_s = per_step
            self.per_image_s = max(0.0, t2 / images - per_step * s2)

    def predict_s(self, images: int, work: int) -> float:
        """Seconds a call of ``images`` images and ``work`` image-steps takes, by the current estimate."""
        return self.scale * (images * self.per_image_s + work * self.per_step_s)

    def expected_s(self, job: Job | None = None) -> float:
        """Seconds until ``job`` would be done (behind the backlog), or until the backlog is."""
        own = self.predict_s(len(job.seeds), job.work) if job is not None else 0.0
        return self.backlog_s + own + self.limits.batch_wait_s

    def admit(self, job: Job) -> None:
        """Count ``job`` in, or raise :class:`RequestError` 503 with ``Retry-After``."""
        deadline = self.limits.deadline_s
        if self.images + len(job.seeds) > self.limits.max_queued_images:
            raise RequestError(503, "server busy: its queue is full; retry later", self.retry_after(self.expected_s()))
        expected = self.expected_s(job)
        if expected > deadline and self.jobs:  # an idle replica always tries (the estimate may be high)
            raise RequestError(
                503, f"server busy: this request would not finish within the {deadline:g} s deadline; retry later",
                self.retry_after(expected - deadline),
            )  # fmt: skip
        job.admitted_s = self.predict_s(len(job.seeds), job.work)
        self.backlog_s += job.admitted_s
        self.images += len(job.seeds)
        self.jobs += 1

    def release(self, job: Job) -> None:
        """``job`` is done (answered, failed or dropped): its time no longer delays others."""
        if job.admitted_s is None:
            return
        self.jobs -= 1
        self.backlog_s = max(0.0, self.backlog_s - job.admitted_s) if self.jobs else 0.0  # no drift when idle
        self.images -= len(job.seeds)
        job.admitted_s = None

    def observe(self, images: int, work: int, seconds: float) -> None:
        """A pipeline call of ``images`` images and ``work`` image-steps took ``seconds``."""
        predicted = images * self.per_image_s + work * self.per_step_s
        if predicted <= 0 or not math.isfinite(seconds) or seconds < 0:
            return
        self.scale = (1 - self.smoothing) * self.scale + self.smoothing * (seconds / predicted)

    def retry_after(self, seconds: float) -> int:
        """A Retry-After header value for a wait of about ``seconds``: whole seconds, 1 to the deadline."""
        return int(min(max(1, math.ceil(seconds)), math.ceil(self.limits.deadline_s)))


# -- images --------------------------------------------------------------------------
def png_b64(img: np.ndarray) -> str:
    """A uint8 (H, W, C) image as base64 PNG, encoded as ``memshard sample`` writes its files."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(img[..., 0] if img.shape[-1] == 1 else img).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode("ascii")


class _PerImageCandidates(Sequence[list[str]]):
    """One lazily computed candidate list per image (PRSS asks only for triggered rows).

    Lets images of different requests share a call while each keeps its own request's
    provider (the perturbation provider is seeded by the request's seed, as in ``memshard sample``).
    """

    def __init__(self, prompts: list[str], providers: list[Callable[[str, int], list[str]]], n: int) -> None:
        self.prompts, self.providers, self.n = prompts, providers, n

    def __len__(self) -> int:
        return len(self.prompts)

    def __getitem__(self, i: Any) -> Any:
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        return list(self.providers[i](self.prompts[i], self.n))


# -- the deployment ------------------------------------------------------------------
# No /docs, /redoc or /openapi.json: the endpoint's contract is this module's docstring, and a
# public model server should expose nothing but generation and health.
app = FastAPI(title="memshard", docs_url=None, redoc_url=None, openapi_url=None)

REPORT_KEYS = ("prompt", "magnitude", "triggered", "chosen_prompt", "chosen_magnitude", "pr_steps",
               "candidates_scored", "mode")  # fmt: skip


def _error(status: int, message: str, retry_after: int | None = None) -> JSONResponse:
    headers = {"Retry-After": str(retry_after)} if retry_after is not None else None
    return JSONResponse({"error": message, "status": status}, status_code=status, headers=headers)


def _internal_error(request_id: str) -> JSONResponse:
    """A 500 that says which request failed and nothing of why (the replica log has the exception)."""
    body = {"error": "internal server error; the server log has the details under this request id",
            "request_id": request_id, "status": 500}  # fmt: skip
    return JSONResponse(body, status_code=500)


def _request_id() -> str:
    """Serve's id of the request being handled (the proxy's ``x-request-id``), or a fresh one."""
    try:
        from ray.serve.context import _get_serve_request_context

        rid = _get_serve_request_context().request_id
    except Exception:  # a private API: never fail a request over it
        rid = ""
    return rid or uuid.uuid4().hex


MAX_HEADER_BYTES = 16 * 1024  # Serve's proxy (uvicorn + httptools) sets no bound of its own


def _check_headers(request: Request) -> None:
    size = sum(len(k) + len(v) for k, v in request.headers.raw)
    if size > MAX_HEADER_BYTES:
        raise RequestError(431, f"request headers have {size} bytes; at most {MAX_HEADER_BYTES}")


def _check_content_type(request: Request) -> None:
    media = request.headers.get("content-type", "").split(";", 1)[0].strip().lower()
    if media != "application/json":
        got = f"Content-Type {media!r}" if media else "no Content-Type"
        raise RequestError(415, f"the body must be JSON sent as Content-Type: application/json (got {got})")


async def run_groups(
    jobs: list[Job], run: Callable[[list[Job]], Any], on_call: Callable[[bool, list[Job], float], None]
) -> list[dict[str, Any]]:
    """One ``run(group)`` call per group of jobs with equal settings; a result dict per job.

    Jobs already past their deadline are dropped (``{"expired": True}``: their client has been
    answered 503). A failed call answers ``{"failed": True}`` for its jobs and logs the exception
    with their request ids; the exception text never reaches a client. ``on_call(ok, group,
    seconds)`` is told of each call (the admission estimate and the failure count).
    """
    groups: dict[tuple[Any, ...], list[int]] = {}
    results: list[dict[str, Any]] = [{"expired": True} for _ in jobs]
    now = time.monotonic()
    for i, job in enumerate(jobs):
        if job.deadline > now:
            groups.setdefault(job.key, []).append(i)
    for idx in groups.values():
        group = [jobs[i] for i in idx]
        t0 = time.monotonic()
        try:
            outs = await asyncio.to_thread(run, group)
            on_call(True, group, time.monotonic() - t0)
        except Exception:  # the requests were validated: this is the server's failure
            on_call(False, group, time.monotonic() - t0)
            log.exception("generation failed for request(s) %s", ", ".join(j.request_id for j in group))
            outs = [{"failed": True} for _ in group]
        for i, out in zip(idx, outs, strict=True):
            results[i] = out
    return results


@serve.deployment
@serve.ingress(app)
class MemshardServer:
    """One replica: the run's served model, loaded once, behind ``POST /generate`` and ``GET /health``.

    Constructor arguments stay small (the run URI and plain settings): a restarted replica
    reloads the model from storage.
    """

    def __init__(
        self,
        run: str,
        weights: str,
        limits: dict[str, Any],
        prss: dict[str, Any] | None,
        prss_sources: dict[str, str] | None,
        allow_no_prss: bool,
        access: Any = None,
    ) -> None:
        import torch

        from .storage import Storage, install_access

        install_access(access)  # the deploying process's S3 settings, before the run is read
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        self.run, self.weights = run, weights
        self.limits = ServeLimits(**limits)
        self.allow_no_prss = allow_no_prss
        self.prss_sources = prss_sources or {}
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        self.failures = 0  # consecutive failed pipeline calls (check_health gives up after 3)
        self.admission = Admission(self.limits)
        store = Storage(run)
        index = json.loads(store.read_text("served/model_index.json"))
        info = json.loads(store.read_text("served/memshard.json")) if store.exists("served/memshard.json") else {}
        self.round = info.get("round")
        self.kind: Literal["t2i", "ddpm"] = "ddpm" if index.get("_class_name") == "DDPMPipeline" else "t2i"
        if self.kind == "t2i":
            self._load_t2i(prss or PRSSConfig().model_dump())
        else:
            self._load_ddpm()
        self._generate_batch.set_max_batch_size(self.limits.max_batch_images)
        self._generate_batch.set_batch_wait_timeout_s(self.limits.batch_wait_s)
        self._warm_up()

    def _warm_up(self) -> None:
        """Three full batches before the first request: the first pays lazy initialisation, the
        other two (1 step and up to 10) calibrate the admission estimate."""
        n = self.limits.max_batch_images
        steps = (1, max(2, min(self.limits.default_steps, 10)))
        job = Job(seeds=list(range(n)), steps=steps[1], seed=0)
        if self.kind == "t2i":
            assert self.prss is not None
            job.prompts = ["warm up"] * n
            job.guidance_scale = self.prss.guidance_scale
            job.thresholds = {k: float(getattr(self.prss, k)) for k in THRESHOLDS}
        elif self.num_classes:
            job.labels = [i % self.num_classes for i in range(n)]
        self._run_group([job])
        took = []
        for s in steps:
            job.steps = s
            t0 = time.monotonic()
            self._run_group([job])
            took.append(time.monotonic() - t0)
        self.admission.calibrate(n, steps, (took[0], took[1]))
        biggest = self.admission.predict_s(self.limits.max_images, self.limits.max_images * self.limits.max_steps)
        if biggest > self.limits.deadline_s:
            log.warning(
                "a request of max_images x max_steps (%d x %d) needs about %.1f s on this replica, over the %g s "
                "deadline: such requests are answered 503 under load; lower the limits or raise the deadline",
                self.limits.max_images, self.limits.max_steps, biggest, self.limits.deadline_s,
            )  # fmt: skip

    def _load_t2i(self, prss: dict[str, Any]) -> None:
        from .pipeline import load_served_t2i
        from .storage import Storage

        self.prss = PRSSConfig.model_validate(prss)
        with Storage(self.run).local_copy("served") as local:
            sub = "unet_raw" if self.weights == "raw" and os.path.isdir(os.path.join(local, "unet_raw")) else "unet"
            self.pipe = load_served_t2i(local, sub)
        if self.device == "cuda":
            self.pipe.to("cuda")
        # Prompt validation runs on the event loop while generation tokenizes in a worker thread;
        # a tokenizer is not thread-safe (its padding/truncation state is set per call), so the
        # event loop counts tokens with its own copy and never touches the pipeline's.
        self.tokenizer = copy.deepcopy(self.pipe.tokenizer)
        self.bank = None
        if self.prss.candidates == "bank":
            from .candidates import make_provider
            from .text import load_text_encoder

            enc = load_text_encoder("minilm", 64)
            self.bank = make_provider("bank", bank=self.prss.bank, embed=enc.embed)
        self.image_size = self.pipe._pixel_size()
        self.num_classes = None

    def _load_ddpm(self) -> None:
        from .sampling import load_served_unet

        self.unet, self.sched, self.info = load_served_unet(self.run, self.weights)
        self.unet.to(self.device).eval()
        self.prss = None
        self.image_size = int(self.unet.config.sample_size)
        self.num_classes = self.unet.config.num_class_embeds or None

    # -- health ----------------------------------------------------------------------
    def check_health(self) -> None:
        """Serve's periodic replica check: unhealthy (restarted) after 3 failed pipeline calls in a row."""
        if self.failures >= 3:
            raise RuntimeError(f"{self.failures} consecutive generation failures")

    @app.get("/health/live")
    async def live(self) -> JSONResponse:
        """Liveness: the replica's event loop answers (generation never blocks it)."""
        return JSONResponse({"status": "alive"})

    @app.get("/health/ready")
    async def ready(self) -> JSONResponse:
        """Readiness: the model is loaded and its pipeline calls are not failing."""
        if self.failures >= 3:
            return _error(503, "failing: the last pipeline calls failed", retry_after=10)
        return JSONResponse({"status": "ready"})

    @app.get("/health")
    async def health(self) -> dict[str, Any]:
        """What is served and on which terms (PRSS floor, limits): for clients and operators.

        No run path or storage URI (an ``s3://`` run's bucket is nobody's business): the
        served round and weights identify the model.
        """
        import torch

        out: dict[str, Any] = {
            "status": "ok" if self.failures < 3 else "failing",
            "kind": self.kind,
            "round": self.round,
            "weights": self.weights,
            "image_size": self.image_size,
            "device": self.device,
            "torch_threads": torch.get_num_threads(),  # CPU results are bit-reproducible at equal thread counts
            "limits": asdict(self.limits),
        }
        if self.kind == "t2i":
            assert self.prss is not None
            out["prss"] = {
                "floor": {k: getattr(self.prss, k) for k in THRESHOLDS},
                "floor_source": self.prss_sources,
                "mode": self.prss.mode,
                "guidance_scale": self.prss.guidance_scale,
                "candidates": self.prss.candidates,
                "num_candidates": self.prss.num_candidates,
                "allow_no_prss": self.allow_no_prss,
            }
        else:
            out["num_classes"] = self.num_classes
        return out

    # -- generation ------------------------------------------------------------------
    @app.post("/generate")
    async def generate(self, request: Request) -> JSONResponse:
        """Validate, admit against the deadline, queue into the current batch, answer PNGs (+ PRSS report)."""
        start = time.monotonic()
        limits = self.limits
        try:
            _check_headers(request)
            _check_content_type(request)
            try:  # read before taking any share of generation, under its own deadline
                raw = await asyncio.wait_for(self._read_body(request), limits.body_timeout_s)
            except asyncio.TimeoutError:
                raise RequestError(408, f"request body not received within {limits.body_timeout_s:g} s") from None
            if self.kind == "t2i":
                assert self.prss is not None
                job = parse_t2i(raw, limits, self.prss, self.allow_no_prss, self.tokenizer)
            else:
                job = parse_ddpm(raw, limits, self.num_classes)
            self.admission.admit(job)
        except RequestError as exc:
            return _error(exc.status, exc.message, exc.retry_after)
        job.request_id, job.deadline = _request_id(), start + limits.deadline_s
        task = asyncio.ensure_future(self._generate_batch(job))
        task.add_done_callback(lambda t: self._done(t, job))
        try:  # shielded: a request answered 503 at its deadline leaves its batch intact
            result = await asyncio.wait_for(asyncio.shield(task), max(0.0, job.deadline - time.monotonic()))
        except asyncio.TimeoutError:
            result = {"expired": True}
        if result.get("expired"):
            late = f"server busy: the request did not finish within the {limits.deadline_s:g} s deadline; retry later"
            return _error(503, late, self.admission.retry_after(self.admission.expected_s()))
        if result.get("failed"):
            return _internal_error(job.request_id)
        return JSONResponse(result)

    def _done(self, task: asyncio.Future[Any], job: Job) -> None:
        self.admission.release(job)
        if not task.cancelled() and task.exception() is not None:  # retrieved, so never "never retrieved"
            log.error("request %s: batch failed: %r", job.request_id, task.exception())

    async def _read_body(self, request: Request) -> bytes:
        """The body, refused (413) as soon as it exceeds the limit, before it is all read."""
        from starlette.requests import ClientDisconnect

        limit = self.limits.max_body_bytes
        declared = request.headers.get("content-length")
        if declared is not None:
            if not declared.isdigit():
                raise RequestError(400, "bad Content-Length header")
            if int(declared) > limit:
                raise RequestError(413, f"body has {int(declared)} bytes; at most {limit}")
        chunks, size = [], 0
        try:
            async for chunk in request.stream():
                size += len(chunk)
                if size > limit:
                    raise RequestError(413, f"body exceeds {limit} bytes")
                chunks.append(chunk)
        except ClientDisconnect:
            raise RequestError(400, "the client disconnected before sending the whole body") from None
        return b"".join(chunks)

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.05, batch_size_fn=_images_in)
    async def _generate_batch(self, jobs: list[Job]) -> list[dict[str, Any]]:
        """One pipeline call per group of jobs with equal settings (usually the whole batch)."""
        return await run_groups(jobs, self._run_group, self._on_call)

    def _on_call(self, ok: bool, group: list[Job], seconds: float) -> None:
        self.failures = 0 if ok else self.failures + 1
        if ok:
            self.admission.observe(sum(len(j.seeds) for j in group), sum(j.work for j in group), seconds)

    def _run_group(self, jobs: list[Job]) -> list[dict[str, Any]]:
        """Generate every image of ``jobs`` in one call and split the results per job."""
        from .sampling import to_uint8

        seeds = [s for j in jobs for s in j.seeds]
        reports: list[dict[str, Any]] | None = None
        if self.kind == "t2i":
            images, reports = self._t2i_call(jobs, seeds)
        else:
            images = self._ddpm_call(jobs, seeds)
        arr = to_uint8(images)
        batch = {"requests": len(jobs), "images": len(seeds)}
        outs, start = [], 0
        for job in jobs:
            n = len(job.seeds)
            out: dict[str, Any] = {
                "images": [png_b64(a) for a in arr[start : start + n]],
                "width": int(arr.shape[2]),
                "height": int(arr.shape[1]),
                "seeds": job.seeds,
                "steps": job.steps,
                "batch": batch,
            }
            if reports is not None:
                assert self.prss is not None
                out["guidance_scale"] = job.guidance_scale
                out["report"] = [
                    {"index": k, "seed": job.seeds[k], **{key: r.get(key) for key in REPORT_KEYS}}
                    for k, r in enumerate(reports[start : start + n])
                ]
                out["prss"] = {
                    "enabled": job.prss,
                    "mode": self.prss.mode if job.prss else "off",
                    **job.thresholds,
                    "floor": {k: getattr(self.prss, k) for k in THRESHOLDS},
                    "clamped": job.clamped,
                }
            else:
                out["labels"] = job.labels
            outs.append(out)
            start += n
        return outs

    def _t2i_call(self, jobs: list[Job], seeds: list[int]) -> tuple[Any, list[dict[str, Any]]]:
        from .candidates import PerturbProvider

        assert self.prss is not None
        prompts = [p for j in jobs for p in j.prompts]
        providers = [self.bank or PerturbProvider(seed=j.seed) for j in jobs for _ in j.prompts]
        head = jobs[0]
        th = head.thresholds or {k: getattr(self.prss, k) for k in THRESHOLDS}
        res = self.pipe(
            prompts, num_inference_steps=head.steps, guidance_scale=head.guidance_scale, output_type="pt",
            prss=head.prss, lambda_ss=th["lambda_ss"], lambda_pr=th["lambda_pr"], tau=th["tau"],
            prss_mode=self.prss.mode, candidates=_PerImageCandidates(prompts, providers, self.prss.num_candidates),
            num_candidates=self.prss.num_candidates, seeds=seeds,
        )  # fmt: skip
        return res.images, res.report

    def _ddpm_call(self, jobs: list[Job], seeds: list[int]) -> Any:
        import torch

        from .sampling import ddim_sample

        labels = None
        if self.num_classes:
            labels = torch.tensor([lab for j in jobs for lab in (j.labels or [])], dtype=torch.long)
        return ddim_sample(
            self.unet, self.sched, len(seeds), steps=jobs[0].steps, seeds=seeds, class_labels=labels,
            device=self.device,
        )  # fmt: skip


# -- building and running ------------------------------------------------------------
def build_app(
    run: str,
    *,
    num_replicas: int = 1,
    weights: str = "ema",
    limits: ServeLimits | None = None,
    allow_no_prss: bool = False,
    lambda_ss: float | None = None,
    lambda_pr: float | None = None,
    tau: float | None = None,
    cpus_per_replica: float = 1.0,
    gpus_per_replica: float | None = None,
    max_queued_requests: int = 64,
) -> Application:
    """The Serve application for ``run`` (bind only; :func:`serve_run` or ``serve.run`` deploys it).

    Everything that can be wrong with the run or the settings fails here, on the driver,
    rather than in a replica that Serve would restart in a loop.
    """
    import ray

    from .checkpoint import RunDir
    from .storage import S3Access, Storage

    if weights not in ("ema", "raw"):
        raise ConfigError(f"weights must be ema or raw, got {weights!r}")
    if num_replicas < 1:
        raise ConfigError(f"num_replicas must be >= 1, got {num_replicas}")
    limits = limits or ServeLimits()
    store = Storage(run)
    # a missing model, pickle-only or mis-shaped weights fail here, not in replicas Serve would restart in a loop
    RunDir(run).check_served()
    t2i = json.loads(store.read_text("served/model_index.json")).get("_class_name") != "DDPMPipeline"
    prss, sources = None, None
    if t2i:
        cfg, sources = server_prss(run, {"lambda_ss": lambda_ss, "lambda_pr": lambda_pr, "tau": tau})
        prss = cfg.model_dump()
    elif any(v is not None for v in (lambda_ss, lambda_pr, tau)) or allow_no_prss:
        raise ConfigError(f"{run} serves a DDPM model: PRSS options apply to text-to-image runs only")
    if gpus_per_replica is None:
        gpus_per_replica = 1.0 if ray.is_initialized() and ray.cluster_resources().get("GPU", 0) > 0 else 0.0
    deployment = MemshardServer.options(
        num_replicas=num_replicas,
        ray_actor_options={"num_cpus": cpus_per_replica, "num_gpus": gpus_per_replica},
        # connections, not generation slots: a request reading its body or waiting for a batch
        # costs a coroutine; generation is bounded by the batch size and admission by the deadline
        max_ongoing_requests=limits.max_connections,
        max_queued_requests=max_queued_requests,
        backpressure_config=BackpressureConfig(retry_after_s=max(1.0, limits.batch_wait_s * 20)),
        health_check_period_s=10,
    )
    return deployment.bind(run, weights, asdict(limits), prss, sources, allow_no_prss, S3Access.resolve() or None)


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port free right now on ``host`` (tests; a race with other processes is possible)."""
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def wait_running(name: str, health_url: str, timeout_s: float = 300.0) -> dict[str, Any]:
    """Block until application ``name`` is RUNNING and ``health_url`` answers; its health JSON.

    Serve's own wait is unbounded (a replica that cannot be placed waits forever): this one
    raises :class:`~memshard.driver.RunError` on a failed deployment or after ``timeout_s``.
    """
    from .driver import RunError

    deadline = time.monotonic() + timeout_s
    status = None
    while time.monotonic() < deadline:
        app_status = serve.status().applications.get(name)
        status = app_status.status if app_status is not None else None
        if status == "RUNNING":
            break
        if status in ("DEPLOY_FAILED", "UNHEALTHY"):
            raise RunError(f"serve application {name!r} is {status}: {app_status.message}")
        time.sleep(0.5)
    else:
        raise RunError(f"serve application {name!r} not running after {timeout_s:.0f} s (status {status})")
    while True:
        try:
            with urllib.request.urlopen(health_url, timeout=max(1.0, deadline - time.monotonic())) as resp:
                return json.loads(resp.read())
        except OSError:
            pass  # the proxy learns new routes asynchronously: 404/503 for a moment
        if time.monotonic() > deadline:
            raise RunError(f"{health_url} did not answer within {timeout_s:.0f} s")
        time.sleep(0.5)


def serve_run(
    run: str,
    host: str = "127.0.0.1",
    port: int = 8000,
    num_replicas: int = 1,
    *,
    name: str = "memshard",
    route_prefix: str = "/",
    weights: str = "ema",
    limits: ServeLimits | None = None,
    allow_no_prss: bool = False,
    lambda_ss: float | None = None,
    lambda_pr: float | None = None,
    tau: float | None = None,
    cpus_per_replica: float = 1.0,
    gpus_per_replica: float | None = None,
    request_timeout_s: float | None = None,
    timeout_s: float = 600.0,
    blocking: bool = False,
    on_ready: Callable[[str, dict[str, Any]], None] | None = None,
) -> str:
    """Deploy ``run``'s served model with Ray Serve and return its base URL.

    Joins the run's Ray cluster (``RAY_ADDRESS`` / the run config) or starts a local one.
    Serve's HTTP host/port are set when Serve first starts on the cluster; a Serve instance
    already running keeps its own (Ray warns). ``blocking`` serves until Ctrl-C, then deletes
    the application; otherwise the application keeps running (on a remote cluster, after this
    process exits too) until ``serve.delete(name)`` / ``serve.shutdown()``. ``on_ready(url,
    health)`` is called once the endpoint answers (before blocking: the CLI prints there).
    Settings errors raise :class:`~memshard.config.ConfigError` before anything is deployed.
    ``request_timeout_s`` is Serve's end-to-end timeout (408), by default the limits' deadline
    plus their body timeout plus 10 s.
    """
    import ray

    from .checkpoint import RunDir
    from .config import build_config
    from .driver import connect

    if not ray.is_initialized():
        manifest = RunDir(run).manifest()
        if manifest is None:
            raise FileNotFoundError(f"{run}: no run (run.json missing)")
        connect(build_config(manifest["config"]))
    application = build_app(
        run, num_replicas=num_replicas, weights=weights, limits=limits, allow_no_prss=allow_no_prss,
        lambda_ss=lambda_ss, lambda_pr=lambda_pr, tau=tau, cpus_per_replica=cpus_per_replica,
        gpus_per_replica=gpus_per_replica,
    )  # fmt: skip
    limits = limits or ServeLimits()
    if request_timeout_s is None:  # a backstop behind the replica's own deadline and body timeout
        request_timeout_s = limits.deadline_s + limits.body_timeout_s + 10
    http: dict[str, Any] = {"host": host, "port": port, "request_timeout_s": request_timeout_s}
    serve.start(http_options=http)
    # deploy without Serve's unbounded wait, then wait with a deadline and a clear error
    serve.run_many([RunTarget(application, name=name, route_prefix=route_prefix)],
                   wait_for_applications_running=False)  # fmt: skip
    local = {"0.0.0.0": "127.0.0.1", "::": "[::1]"}.get(host, f"[{host}]" if ":" in host else host)
    url = f"http://{local}:{port}{route_prefix.rstrip('/')}"
    try:
        health = wait_running(name, f"{url}/health", timeout_s)
    except Exception:
        serve.delete(name, _blocking=False)  # leave no replica waiting for resources forever
        raise
    if on_ready is not None:
        on_ready(url, health)
    if blocking:
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            serve.delete(name, _blocking=False)  # the controller tears it down; a second Ctrl-C cannot interrupt
    return url


def describe(url: str, health: dict[str, Any], run: str) -> str:
    """One line for the CLI: where and what is served (``run``: the operator's own argument)."""
    what = f"{health['kind']} model, {health['image_size']}px"
    if health.get("prss"):
        floor = health["prss"]["floor"]
        what += ", PRSS floor " + " ".join(f"{k}={v:.4g}" for k, v in floor.items())
        what += "" if not health["prss"]["allow_no_prss"] else " (requests may turn PRSS off)"
    return f"serving {run} ({what}) at {url}/generate (health: {url}/health, probes: {url}/health/live, /health/ready)"
