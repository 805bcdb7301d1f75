"""Admission by deadline and the batch runner: what keeps a replica answering in time under load.

Ray-free and synchronous where it can be (the deployment calls :class:`Admission` from its event
loop only); :func:`run_groups` is the body of the replica's ``@serve.batch`` handler, tested with a
plain function in place of the pipeline.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Callable
from typing import Any

from memshard.serving.requests import Job, RequestError, ServeLimits

log = logging.getLogger("ray.serve")  # the replica's log, where Serve writes the request id beside each line


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
