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
* admission is by deadline: the replica keeps a running estimate of what a request costs
  (seconds per image and per image-step, calibrated by a warm-up at start and followed by
  every batch since; :class:`~memshard.serving.admission.Admission`) and refuses with
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
size stay the server's. So does the detection step: the calibration's, when its lambda_ss is
in force (a threshold is on the scale of the step it was calibrated at), scaled to the
request's step count (``/health`` shows it as ``detect_step``: step, of_steps).

Batching
--------
Requests are batched with ``@serve.batch`` (the batch size counts images, not requests);
requests with the same sampling settings (steps, guidance, thresholds) go into ONE pipeline
call, with per-image noise seeds (:func:`memshard.seeds.image_seeds`, the rule of ``memshard
sample``) and per-request PRSS candidates, so
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
import os
import socket
import time
import urllib.request
import uuid
from collections.abc import Callable, Sequence
from dataclasses import asdict
from typing import Any, Literal

import numpy as np
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from ray import serve
from ray.serve import Application
from ray.serve.api import RunTarget
from ray.serve.config import BackpressureConfig

from memshard.config import ConfigError, PRSSConfig
from memshard.serving.admission import Admission, log, run_groups
from memshard.serving.requests import (
    THRESHOLDS,
    Job,
    RequestError,
    ServeLimits,
    images_in,
    parse_ddpm,
    parse_t2i,
    server_prss,
)


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


MAX_FAILURES = 3  # consecutive failed pipeline calls before a replica is failing
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

        from memshard.io.storage import Storage, install_access

        install_access(access)  # the deploying process's S3 settings, before the run is read
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        self.run, self.weights = run, weights
        self.limits = ServeLimits(**limits)
        self.allow_no_prss = allow_no_prss
        self.prss_sources = prss_sources or {}
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        self.failures = 0  # consecutive failed pipeline calls (see `failing`)
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
        from memshard.io.storage import Storage
        from memshard.prss.pipeline import load_served_t2i

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
            from memshard.models.text import load_text_encoder
            from memshard.prss.candidates import make_provider

            enc = load_text_encoder("minilm", 64)
            self.bank = make_provider("bank", bank=self.prss.bank, embed=enc.embed)
        self.image_size = self.pipe._pixel_size()
        self.num_classes = None
        # the step count the detection step was set for (resolved with the thresholds at start-up, so a
        # replica restarted after a recalibration cannot pair the old floor with a new step count): a
        # request with other steps detects at the same share of its trajectory
        self.detect_ref_steps = self.prss.detect_reference_steps or self.limits.default_steps

    def _load_ddpm(self) -> None:
        from memshard.models.sampling import load_served_unet

        self.unet, self.sched, self.info = load_served_unet(self.run, self.weights)
        self.unet.to(self.device).eval()
        self.prss = None
        self.image_size = int(self.unet.config.sample_size)
        self.num_classes = self.unet.config.num_class_embeds or None

    # -- health ----------------------------------------------------------------------
    @property
    def failing(self) -> bool:
        """After MAX_FAILURES failed pipeline calls in a row: not ready, and restarted by Serve's check."""
        return self.failures >= MAX_FAILURES

    def check_health(self) -> None:
        """Serve's periodic replica check: unhealthy (restarted) once the replica is failing."""
        if self.failing:
            raise RuntimeError(f"{self.failures} consecutive generation failures")

    @app.get("/health/live")
    async def live(self) -> JSONResponse:
        """Liveness: the replica's event loop answers (generation never blocks it)."""
        return JSONResponse({"status": "alive"})

    @app.get("/health/ready")
    async def ready(self) -> JSONResponse:
        """Readiness: the model is loaded and its pipeline calls are not failing."""
        if self.failing:
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
            "status": "failing" if self.failing else "ok",
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
                "detect_step": {"step": self.prss.detect_step, "of_steps": self.detect_ref_steps},
                "restart": self.prss.restart,
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

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.05, batch_size_fn=images_in)
    async def _generate_batch(self, jobs: list[Job]) -> list[dict[str, Any]]:
        """One pipeline call per group of jobs with equal settings (usually the whole batch)."""
        return await run_groups(jobs, self._run_group, self._on_call)

    def _on_call(self, ok: bool, group: list[Job], seconds: float) -> None:
        self.failures = 0 if ok else self.failures + 1
        if ok:
            self.admission.observe(sum(len(j.seeds) for j in group), sum(j.work for j in group), seconds)

    def _run_group(self, jobs: list[Job]) -> list[dict[str, Any]]:
        """Generate every image of ``jobs`` in one call and split the results per job."""
        from memshard.models.sampling import to_uint8

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
        from memshard.prss.calibration import scale_detect_step
        from memshard.prss.candidates import PerturbProvider

        assert self.prss is not None
        prompts = [p for j in jobs for p in j.prompts]
        providers = [self.bank or PerturbProvider(seed=j.seed) for j in jobs for _ in j.prompts]
        head = jobs[0]
        th = head.thresholds or {k: getattr(self.prss, k) for k in THRESHOLDS}
        # the server's per-step shape of lambda_pr applies to a request's lambda_pr too: a request may only
        # be stricter (the privacy floor), and a stricter lambda_pr on the same profile is stricter at every step
        profile = self.prss.pr_profile
        res = self.pipe(
            prompts, num_inference_steps=head.steps, guidance_scale=head.guidance_scale, output_type="pt",
            prss=head.prss, lambda_ss=th["lambda_ss"], lambda_pr=th["lambda_pr"], tau=th["tau"],
            prss_mode=self.prss.mode, candidates=_PerImageCandidates(prompts, providers, self.prss.num_candidates),
            num_candidates=self.prss.num_candidates, seeds=seeds, restart=self.prss.restart,
            detect_step=scale_detect_step(self.prss.detect_step, self.detect_ref_steps, head.steps),
            pr_profile=profile,
        )  # fmt: skip
        return res.images, res.report

    def _ddpm_call(self, jobs: list[Job], seeds: list[int]) -> Any:
        import torch

        from memshard.models.sampling import ddim_sample

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

    from memshard.io.rundir import RunDir
    from memshard.io.storage import S3Access, Storage

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
    raises :class:`~memshard.runtime.driver.RunError` on a failed deployment or after ``timeout_s``.
    """
    from memshard.runtime.driver import RunError

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

    from memshard.config import build_config
    from memshard.io.rundir import RunDir
    from memshard.runtime.driver import connect

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
