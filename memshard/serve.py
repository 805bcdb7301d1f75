"""`memshard serve RUN`: the run's served checkpoint behind an HTTP endpoint (Ray Serve).

One deployment, :class:`MemshardServer`, serves either kind of run:

* text-to-image runs: ``POST /generate`` with ``{"prompt": "a red square", "num_images": 2}``
  returns PNG images (base64) and the per-image PRSS report. PRSS is always on unless the
  server was started with ``allow_no_prss`` (then a request may send ``"prss": false``);
* DDPM runs (unconditional / class-conditional): ``POST /generate`` with
  ``{"num_images": 4, "label": 3}`` (``label`` only for class-conditional models).

``GET /health`` answers what is served, the PRSS floor and the request limits; Serve's own
replica health check is :meth:`MemshardServer.check_health`.

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
shared call, or with another thread count, kernels may round differently (measured on CPU:
<= 1e-4 in [0, 1], at most 1 level of 255 in a pixel; a magnitude within that of a threshold
could flip its trigger); ``batch`` in the response says how many requests shared the call.
"""

# No `from __future__ import annotations`: FastAPI must see the real `Request` class in the
# route signatures of the Serve ingress class (a string annotation there becomes a query parameter).
import asyncio
import base64
import io
import json
import os
import socket
import time
import urllib.request
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

from .config import ConfigError, PRSSConfig

THRESHOLDS = ("lambda_ss", "lambda_pr", "tau")
SEED_STRIDE = 1_000_003  # image i of seed s uses s * SEED_STRIDE + i (memshard sample's rule)
MAX_SEED = 2**31 - 1


class RequestError(Exception):
    """A request the server refuses: an HTTP 4xx ``status`` and a message for the client."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


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

    def __post_init__(self) -> None:
        if min(self.max_images, self.max_steps, self.default_steps, self.max_body_bytes) < 1:
            raise ConfigError("serve limits must be positive")
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


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message, "status": status}, status_code=status)


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
        index = json.loads(Storage(run).read_text("served/model_index.json"))
        self.kind: Literal["t2i", "ddpm"] = "ddpm" if index.get("_class_name") == "DDPMPipeline" else "t2i"
        if self.kind == "t2i":
            self._load_t2i(prss or PRSSConfig().model_dump())
        else:
            self._load_ddpm()
        self._generate_batch.set_max_batch_size(self.limits.max_batch_images)
        self._generate_batch.set_batch_wait_timeout_s(self.limits.batch_wait_s)

    def _load_t2i(self, prss: dict[str, Any]) -> None:
        from .pipeline import load_served_t2i
        from .storage import Storage

        self.prss = PRSSConfig.model_validate(prss)
        with Storage(self.run).local_copy("served") as local:
            sub = "unet_raw" if self.weights == "raw" and os.path.isdir(os.path.join(local, "unet_raw")) else "unet"
            self.pipe = load_served_t2i(local, sub)
        if self.device == "cuda":
            self.pipe.to("cuda")
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

    @app.get("/health")
    def health(self) -> dict[str, Any]:
        """What is served and on which terms (PRSS floor, limits): for load balancers and clients."""
        import torch

        out: dict[str, Any] = {
            "status": "ok" if self.failures < 3 else "failing",
            "kind": self.kind,
            "run": self.run,
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
        """Validate, queue into the current batch, answer PNGs (+ PRSS report for text-to-image)."""
        try:
            raw = await self._read_body(request)
            if self.kind == "t2i":
                assert self.prss is not None
                job = parse_t2i(raw, self.limits, self.prss, self.allow_no_prss, self.pipe.tokenizer)
            else:
                job = parse_ddpm(raw, self.limits, self.num_classes)
        except RequestError as exc:
            return _error(exc.status, exc.message)
        result = await self._generate_batch(job)
        if "error" in result:
            return _error(500, result["error"])
        return JSONResponse(result)

    async def _read_body(self, request: Request) -> bytes:
        """The body, refused (413) as soon as it exceeds the limit, before it is all read."""
        limit = self.limits.max_body_bytes
        declared = request.headers.get("content-length")
        if declared is not None:
            if not declared.isdigit():
                raise RequestError(400, "bad Content-Length header")
            if int(declared) > limit:
                raise RequestError(413, f"body has {int(declared)} bytes; at most {limit}")
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise RequestError(413, f"body exceeds {limit} bytes")
            chunks.append(chunk)
        return b"".join(chunks)

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.05, batch_size_fn=_images_in)
    async def _generate_batch(self, jobs: list[Job]) -> list[dict[str, Any]]:
        """One pipeline call per group of jobs with equal settings (usually the whole batch)."""
        groups: dict[tuple[Any, ...], list[int]] = {}
        for i, job in enumerate(jobs):
            groups.setdefault(job.key, []).append(i)
        results: list[dict[str, Any]] = [{} for _ in jobs]
        for idx in groups.values():
            group = [jobs[i] for i in idx]
            try:
                outs = await asyncio.to_thread(self._run_group, group)
                self.failures = 0
            except Exception as exc:  # the requests were validated: this is the server's failure
                self.failures += 1
                outs = [{"error": f"generation failed: {type(exc).__name__}: {exc}"} for _ in group]
            for i, out in zip(idx, outs, strict=True):
                results[i] = out
        return results

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
        # enough in flight to fill a batch of single-image requests; the rest wait in the queue
        max_ongoing_requests=max(2 * limits.max_batch_images, 8),
        max_queued_requests=max_queued_requests,
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
    http: dict[str, Any] = {"host": host, "port": port}
    if request_timeout_s is not None:
        http["request_timeout_s"] = request_timeout_s
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


def describe(url: str, health: dict[str, Any]) -> str:
    """One line for the CLI: where and what is served."""
    what = f"{health['kind']} model, {health['image_size']}px"
    if health.get("prss"):
        floor = health["prss"]["floor"]
        what += ", PRSS floor " + " ".join(f"{k}={v:.4g}" for k, v in floor.items())
        what += "" if not health["prss"]["allow_no_prss"] else " (requests may turn PRSS off)"
    return f"serving {health['run']} ({what}) at {url}/generate (health: {url}/health)"
