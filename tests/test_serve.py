"""`memshard serve`: Ray Serve on a real local cluster, called over loopback HTTP.

One Serve instance for the module, two applications: a tiny text-to-image run at /t2i (its
PRSS floor from RUN/prss/calibration.json, set so high that nothing triggers unless a
request asks for more privacy) and a tiny unconditional DDPM run at /ddpm.
"""

from __future__ import annotations

import base64
import io
import json
import os
import shutil
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from memshard.config import load_config
from memshard.serving.requests import RequestError, ServeLimits, parse_t2i, server_prss
from tests.conftest import TINY
from tests.t2i_data import write_captioned_parquet
from tests.test_t2i_train import t2i_config

pytestmark = pytest.mark.ray

HIGH = {"q": 0.99, "lambda_ss": 1e9, "lambda_pr": 1e9, "tau": 2e9}  # nothing triggers at the floor
LOW = {"lambda_ss": 1e-6, "lambda_pr": 1e-6, "tau": 1e-3}  # everything triggers
LIMITS = ServeLimits(max_images=4, max_steps=8, default_steps=4, max_body_bytes=16384, max_batch_images=8,
                     batch_wait_s=1.0, body_timeout_s=3.0)  # fmt: skip
PROMPTS = ["a red square number 0", "a blue circle number 7"]
HTTP_TIMEOUT = 180  # every call is bounded (a loaded 2-core machine samples slowly)


@pytest.fixture(scope="module")
def t2i_run(ray_cluster, tmp_path_factory) -> str:
    from memshard.runtime.driver import train

    root = tmp_path_factory.mktemp("serve-t2i")
    data = write_captioned_parquet(str(root / "shapes.parquet"), 24)
    cfg = load_config(t2i_config(data), [o for o in TINY if not o.startswith("data.limit")])
    out = train(cfg, out=str(root / "run"))
    assert out.complete
    os.makedirs(os.path.join(out.run_uri, "prss"), exist_ok=True)
    with open(os.path.join(out.run_uri, "prss", "calibration.json"), "w") as fh:
        json.dump({**HIGH, "steps": 8}, fh)  # calibrated for 8-step sampling (the server's default is 4)
    return out.run_uri


@pytest.fixture(scope="module")
def ddpm_run(ray_cluster, tmp_path_factory) -> str:
    from memshard.runtime.driver import train

    out = str(tmp_path_factory.mktemp("serve-ddpm") / "run")
    assert train(load_config("demo", TINY), out=out).complete
    return out


@pytest.fixture(scope="module")
def urls(t2i_run, ddpm_run):
    from ray import serve

    from memshard.serving.app import describe, free_port, serve_run

    port = free_port()
    ready: list[str] = []
    try:
        t2i = serve_run(t2i_run, port=port, name="t2i", route_prefix="/t2i", limits=LIMITS, cpus_per_replica=0.5,
                        timeout_s=300, on_ready=lambda url, health: ready.append(describe(url, health, t2i_run)),
                        )  # fmt: skip
        assert ready == [f"serving {t2i_run} (t2i model, 16px, PRSS floor lambda_ss=1e+09 lambda_pr=1e+09 tau=2e+09) "
                         f"at {t2i}/generate (health: {t2i}/health, probes: {t2i}/health/live, "
                         "/health/ready)"]  # fmt: skip
        ddpm = serve_run(ddpm_run, port=port, name="ddpm", route_prefix="/ddpm", limits=LIMITS, cpus_per_replica=0.5,
                         timeout_s=300)  # fmt: skip
        yield {"t2i": t2i, "ddpm": ddpm}
    finally:
        serve.shutdown()


def post(
    url: str, body: Any, headers: dict[str, str] | None = None, timeout: float = HTTP_TIMEOUT
) -> tuple[int, dict[str, Any]]:
    """(status, JSON answer) of a POST; 4xx/5xx answers are returned, not raised."""
    data = json.dumps(body).encode() if isinstance(body, dict) else body  # bytes, or an iterator: sent chunked
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"{}")


def pngs(answer: dict[str, Any]) -> list[bytes]:
    return [base64.b64decode(s) for s in answer["images"]]


def pixels(png: bytes) -> np.ndarray:
    img = Image.open(io.BytesIO(png))
    assert img.format == "PNG"
    return np.asarray(img)


@contextmanager
def threads_of(url: str) -> Iterator[None]:
    """Run local sampling with the replica's torch thread count (CPU kernels round by thread count)."""
    with urllib.request.urlopen(url + "/health", timeout=30) as resp:
        threads = json.loads(resp.read())["torch_threads"]
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def test_health_answers_what_is_served(urls, t2i_run):
    with urllib.request.urlopen(urls["t2i"] + "/health", timeout=30) as resp:
        health = json.loads(resp.read())
    assert health["status"] == "ok" and health["kind"] == "t2i" and health["image_size"] == 16
    assert health["round"] == 2 and t2i_run not in json.dumps(health)  # the model's round, no path or URI
    prss = health["prss"]
    assert prss["floor"] == {k: HIGH[k] for k in ("lambda_ss", "lambda_pr", "tau")}
    assert set(prss["floor_source"].values()) == {"calibration"} and prss["allow_no_prss"] is False
    assert prss["detect_step"] == {"step": 1, "of_steps": 8}  # the calibration's step count, not the default 4
    with urllib.request.urlopen(urls["ddpm"] + "/health", timeout=30) as resp:
        assert json.loads(resp.read())["kind"] == "ddpm"


def test_untriggered_images_equal_sample_without_prss(urls, t2i_run, tmp_path):
    from memshard.cli import main

    status, ans = post(urls["t2i"] + "/generate", {"prompt": PROMPTS, "steps": 4, "seed": 3})
    assert status == 200, ans
    assert ans["width"] == ans["height"] == 16 and ans["seeds"] == [3 * 1_000_003, 3 * 1_000_003 + 1]
    assert ans["batch"] == {"requests": 1, "images": 2}
    got = pngs(ans)
    assert [pixels(p).shape for p in got] == [(16, 16, 3)] * 2
    rep = ans["report"]
    assert [r["prompt"] for r in rep] == PROMPTS and [r["index"] for r in rep] == [0, 1]
    assert all({"magnitude", "triggered", "chosen_prompt", "pr_steps", "seed", "mode"} <= r.keys() for r in rep)
    assert not any(r["triggered"] for r in rep) and all(r["chosen_prompt"] == r["prompt"] for r in rep)
    assert ans["prss"]["enabled"] and ans["prss"]["lambda_ss"] == HIGH["lambda_ss"] and ans["prss"]["clamped"] == {}

    args = [a for p in PROMPTS for a in ("--prompt", p)]
    out = tmp_path / "plain"
    with threads_of(urls["t2i"]):
        assert main(["sample", t2i_run, *args, "--steps", "4", "--seed", "3", "--no-prss", "--out", str(out)]) == 0
    for i, png in enumerate(got):
        assert png == (out / "images" / f"{i:05d}.png").read_bytes()  # the same PNG, byte for byte


def test_floor_clamps_and_more_privacy_triggers(urls):
    url = urls["t2i"] + "/generate"
    status, ans = post(url, {"prompt": PROMPTS[0], "steps": 4, "seed": 3, "lambda_ss": 5e9, "tau": 3e9})
    assert status == 200, ans
    assert ans["prss"]["lambda_ss"] == HIGH["lambda_ss"] and ans["prss"]["tau"] == HIGH["tau"]
    assert ans["prss"]["clamped"] == {
        "lambda_ss": {"requested": 5e9, "used": 1e9},
        "tau": {"requested": 3e9, "used": 2e9},
    }
    status, low = post(url, {"prompt": PROMPTS[0], "steps": 4, "seed": 3, **LOW})
    assert status == 200, low
    r = low["report"][0]
    assert low["prss"]["clamped"] == {} and low["prss"]["lambda_ss"] == LOW["lambda_ss"]
    assert r["triggered"] and r["pr_steps"] == 4 and r["chosen_prompt"] != r["prompt"]
    assert not np.array_equal(pixels(pngs(low)[0]), pixels(pngs(ans)[0]))


def test_bad_requests_get_4xx_with_a_message(urls):
    url = urls["t2i"] + "/generate"
    cases = [
        ({"prompt": "  "}, 400, "prompt 0 is empty"),
        ({"prompt": []}, 400, "non-empty list"),
        ({"prompt": " ".join(["word"] * 40)}, 400, "tokens"),
        ({"prompt": ["a", "b"], "num_images": 3}, 400, "at most 4"),
        ({"prompt": "a red square", "steps": 9}, 400, "at most 8 steps"),
        ({"prompt": "a red square", "steps": "4"}, 400, "'steps'"),
        ({"prompt": "a red square", "colour": "red"}, 400, "unknown field 'colour'"),
        ({"prompt": "a red square", "prss": False}, 403, "allow-no-prss"),
        ({"prompt": "a red square", "lambda_ss": -1.0}, 400, "'lambda_ss'"),
        ({"prompt": "a red square", "lambda_pr": 1.0, "tau": 0.5}, 400, "tau must exceed lambda_pr"),
        ({"prompt": "a red square", "seeds": [1, 2]}, 400, "2 entries for 1 images"),
        ({"prompt": "a red square", "guidance_scale": 100.0}, 400, "guidance_scale"),
        ({"num_images": 1}, 400, "'prompt'"),
        (b"{not json", 400, "not valid JSON"),
        (b'{"prompt": "a", "lambda_ss": NaN}', 400, "not valid JSON"),
        (b"[1, 2]", 400, "JSON object"),
        (json.dumps({"prompt": "a " * 10_000}).encode(), 413, "at most 16384"),
    ]
    for body, code, message in cases:
        status, ans = post(url, body)
        assert status == code and message in ans["error"], (repr(body)[:80], status, ans)
    deep = '{"prompt": ' + "[" * 8_000 + "]" * 8_000 + "}"  # json.loads raises RecursionError
    for body, headers, code, message in [
        (deep.encode(), {}, 400, "nested too deeply"),
        (b'{"prompt": "a\\ud800"}', {}, 400, "lone surrogate"),
        (b'{"prompt": "a"}', {"Content-Type": "text/plain"}, 415, "application/json"),
        (b'{"prompt": "a"}', {"Content-Type": "application/x-www-form-urlencoded"}, 415, "application/json"),
    ]:
        status, ans = post(url, body, headers)
        assert status == code and message in ans["error"], (body[:40], status, ans)
    # a chunked body (no Content-Length) is cut off once it passes the limit too
    status, ans = post(url, iter([b'{"prompt": "', b"a" * 10_000, b"a" * 10_000, b'"}']))
    assert status == 413 and "exceeds 16384" in ans["error"]
    assert post(urls["t2i"] + "/nothing-here", {"prompt": "a"})[0] == 404


def test_concurrent_requests_share_a_batch_with_per_image_seeds(urls):
    url = urls["t2i"] + "/generate"
    bodies = [{"prompt": f"a green cross number {i}", "steps": 3, "seed": 10 + i} for i in range(3)]
    answers: list[Any] = [None] * 3

    def call(i: int) -> None:
        answers[i] = post(url, bodies[i])

    threads = [threading.Thread(target=call, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=HTTP_TIMEOUT + 10)
    assert all(a is not None and a[0] == 200 for a in answers), answers
    assert max(a[1]["batch"]["requests"] for a in answers) >= 2  # batched within the 1 s window
    for body, (_, ans) in zip(bodies, answers, strict=True):
        status, alone = post(url, body)
        assert status == 200 and alone["batch"]["requests"] == 1
        assert ans["seeds"] == alone["seeds"] == [body["seed"] * 1_000_003]
        assert ans["report"][0]["triggered"] == alone["report"][0]["triggered"]
        assert ans["report"][0]["magnitude"] == pytest.approx(alone["report"][0]["magnitude"], rel=1e-3)
        # the same seed and prompt: only the batch shape's float rounding may differ
        diff = np.abs(pixels(pngs(ans)[0]).astype(int) - pixels(pngs(alone)[0]).astype(int))
        assert diff.max() <= 1


def test_ddpm_run_serves_too(urls, ddpm_run):
    from memshard.models.sampling import ddim_sample, load_served_unet, to_uint8

    url = urls["ddpm"] + "/generate"
    status, ans = post(url, {"num_images": 3, "steps": 3, "seed": 2})
    assert status == 200, ans
    got = np.stack([pixels(p) for p in pngs(ans)])
    assert got.shape == (3, 16, 16) and ans["labels"] is None and "report" not in ans
    unet, sched, _ = load_served_unet(ddpm_run)
    with threads_of(urls["ddpm"]):
        want = to_uint8(ddim_sample(unet, sched, 3, steps=3, seed=2))[..., 0]  # what `memshard sample` draws
    assert np.array_equal(got, want)
    status, bad = post(url, {"prompt": "a cat"})
    assert status == 400 and "without text conditioning" in bad["error"]
    status, bad = post(url, {"label": 1})
    assert status == 400 and "unconditional" in bad["error"]
    status, bad = post(url, {"num_images": 5})
    assert status == 400 and "at most 4" in bad["error"]


def test_floor_rule_and_prss_off_flag(t2i_run, tmp_path):
    # calibration beats the run config; the operator's thresholds beat both, key by key
    prss, sources = server_prss(t2i_run)
    assert prss.lambda_ss == HIGH["lambda_ss"] and set(sources.values()) == {"calibration"}
    prss, sources = server_prss(t2i_run, {"lambda_ss": 2.0, "lambda_pr": None})
    assert prss.lambda_ss == 2.0 and sources == {
        "lambda_ss": "server",
        "lambda_pr": "calibration",
        "tau": "calibration",
    }
    bare = tmp_path / "bare"
    bare.mkdir()
    shutil.copy(os.path.join(t2i_run, "run.json"), bare / "run.json")  # the run config, no calibration
    prss, sources = server_prss(str(bare))
    assert (prss.lambda_ss, prss.lambda_pr, prss.tau) == (1.0, 3.0, 5.0) and set(sources.values()) == {"config"}
    with pytest.raises(ValueError, match="tau"):
        server_prss(str(bare), {"tau": 2.0})  # tau must stay above lambda_pr
    assert prss.detect_step == 1
    # a calibration's detection step comes with its lambda_ss (same scale), not with an operator's
    (bare / "prss").mkdir()
    (bare / "prss" / "calibration.json").write_text(json.dumps({**HIGH, "detect_step": 3, "steps": 6}))
    assert server_prss(str(bare))[0].detect_step == 3
    assert server_prss(str(bare), {"lambda_pr": 1e9})[0].detect_step == 3
    assert server_prss(str(bare), {"lambda_ss": 2.0})[0].detect_step == 1
    # ... with the step count it was chosen for, resolved once here for every replica
    assert server_prss(str(bare))[0].detect_reference_steps == 6
    assert server_prss(str(bare), {"lambda_ss": 2.0})[0].detect_reference_steps is None
    # PRSS off only on a server that allows it; thresholds then play no part
    body = json.dumps({"prompt": "a red square", "prss": False}).encode()
    with pytest.raises(RequestError) as err:
        parse_t2i(body, LIMITS, prss)
    assert err.value.status == 403
    job = parse_t2i(body, LIMITS, prss, allow_no_prss=True)
    assert job.prss is False and job.thresholds == {} and job.seeds == [0] and job.steps == LIMITS.default_steps
    with pytest.raises(ValueError, match="max_batch_images"):
        ServeLimits(max_images=8, max_batch_images=4)
    with pytest.raises(ValueError, match="deadline_s"):
        ServeLimits(deadline_s=0)
    with pytest.raises(ValueError, match="max_queued_images"):
        ServeLimits(max_images=8, max_queued_images=4)


# -- under load (issue 16) -------------------------------------------------------------
# prompts of 1 to 7 words: validation counts their tokens while generation pads other prompts
LOAD_PROMPTS = ["a heart", "a red heart", "a big red heart shape", "two small blue circles side by side",
                "one green cross", "a yellow star on white", "grinning face with big open eyes", "a cat"]  # fmt: skip


def test_concurrent_t2i_requests_all_succeed_and_equal_their_solo_images(urls):
    url = urls["t2i"] + "/generate"
    n = len(LOAD_PROMPTS)
    bodies = [{"prompt": [LOAD_PROMPTS[(i + j) % n] for j in range(4)], "steps": 2, "seed": 40 + i} for i in range(n)]
    alone = []
    for body in bodies:
        status, ans = post(url, body)
        assert status == 200, ans
        alone.append([pixels(p).astype(int) for p in pngs(ans)])
    results: list[tuple[int, int, dict[str, Any]]] = []
    lock = threading.Lock()

    def client(k: int) -> None:
        for j in range(8):  # back to back: requests arrive (and are validated) while a batch is encoding
            i = (k + j) % n
            status, ans = post(url, bodies[i])
            with lock:
                results.append((i, status, ans))

    threads = [threading.Thread(target=client, args=(k,)) for k in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=HTTP_TIMEOUT + 10)
    assert len(results) == 128
    failed = [(status, ans.get("error")) for _, status, ans in results if status != 200]
    assert not failed, f"{len(failed)} of 128 failed: {failed[:3]}"
    for i, _, ans in results:  # the batch shape may round the last bit, never more
        got = [pixels(p).astype(int) for p in pngs(ans)]
        assert max(np.abs(g - a).max() for g, a in zip(got, alone[i], strict=True)) <= 1, bodies[i]


def test_slow_connections_do_not_stop_valid_requests_or_probes(urls):
    import socket as sk
    from urllib.parse import urlsplit

    parts = urlsplit(urls["ddpm"])
    head = (f"POST {parts.path}/generate HTTP/1.1\r\nHost: {parts.netloc}\r\nContent-Type: application/json\r\n"
            "Content-Length: 40\r\n\r\n").encode() + b'{"num_images": 1, '  # fmt: skip
    slow = []
    try:
        for _ in range(64):  # headers and half a body, then nothing
            s = sk.create_connection((parts.hostname, parts.port), timeout=30)
            s.sendall(head)
            slow.append(s)
        status, ans = post(urls["ddpm"] + "/generate", {"num_images": 1, "steps": 2}, timeout=60)
        assert status == 200, ans
        for probe in ("/health/live", "/health/ready"):
            with urllib.request.urlopen(urls["ddpm"] + probe, timeout=10) as resp:
                assert resp.status == 200
        # the slow clients are answered 408 once the body deadline passes, and their slots freed
        s = slow[0]
        s.settimeout(LIMITS.body_timeout_s + 30)
        assert s.recv(64).startswith(b"HTTP/1.1 408")
    finally:
        for s in slow:
            s.close()


def test_admission_refuses_what_the_deadline_cannot_hold():
    from memshard.serving.admission import Admission
    from memshard.serving.requests import Job

    limits = ServeLimits(max_images=4, max_batch_images=8, deadline_s=10.0, batch_wait_s=0.0, max_queued_images=20)
    adm = Admission(limits)
    jobs = [Job(seeds=[0, 1, 2, 3], steps=50, seed=0) for _ in range(5)]
    adm.admit(jobs[0])  # not calibrated: nothing is refused on time
    adm.release(jobs[0])
    # 8 images: 1 step in 0.24 s, 11 steps in 1.04 s -> 0.01 s per image-step, 0.02 s per image
    adm.calibrate(8, (1, 11), (0.24, 1.04))
    assert (adm.per_step_s, adm.per_image_s) == (pytest.approx(0.01), pytest.approx(0.02))
    assert adm.predict_s(4, 200) == pytest.approx(2.08)  # this job alone
    for job in jobs[:4]:
        adm.admit(job)  # 4 x 2.08 = 8.32 s queued
    with pytest.raises(RequestError) as err:
        adm.admit(jobs[4])  # 8.32 + 2.08 = 10.4 s > 10 s: refused, retry in about 1 s
    assert err.value.status == 503 and err.value.retry_after == 1 and "10 s deadline" in err.value.message
    short = Job(seeds=[0], steps=2, seed=0)
    adm.admit(short)  # a short one still fits in time: 8.32 + 0.04 s
    with pytest.raises(RequestError, match="queue is full"):  # 17 + 4 images > the memory bound of 20
        adm.admit(Job(seeds=[0, 1, 2, 3], steps=1, seed=0))
    for queued in [*jobs[:4], short, short]:  # a second release of the same job changes nothing
        adm.release(queued)
    assert adm.backlog_s == 0 and adm.images == 0
    big = Job(seeds=[0, 1, 2, 3], steps=1000, seed=0)  # 40 s alone: an idle replica still tries it
    adm.admit(big)
    with pytest.raises(RequestError):
        adm.admit(short)  # but nothing more while it runs
    adm.observe(4, 400, 2 * adm.predict_s(4, 400))  # calls run twice as slow as predicted ...
    assert adm.scale == pytest.approx(1.3)  # ... the estimate follows (exponential average, 0.3)


def test_a_failed_call_logs_its_request_ids_and_tells_the_client_nothing(caplog):
    import asyncio
    import logging
    import time

    from memshard.serving.admission import run_groups
    from memshard.serving.requests import Job

    jobs = [Job(seeds=[0], steps=2, seed=0, request_id="req-a"), Job(seeds=[1], steps=2, seed=1, request_id="req-b"),
            Job(seeds=[2], steps=3, seed=2, request_id="req-late", deadline=time.monotonic() - 1)]  # fmt: skip
    calls: list[list[str]] = []
    told: list[tuple[bool, int]] = []

    def run(group: list[Job]) -> list[dict[str, Any]]:
        calls.append([j.request_id for j in group])
        raise RuntimeError("secret detail: /srv/runs/private")

    serve_log = logging.getLogger("ray.serve")  # Ray's logger does not propagate to the root one caplog watches
    serve_log.addHandler(caplog.handler)
    try:
        out = asyncio.run(run_groups(jobs, run, lambda ok, group, s: told.append((ok, sum(j.work for j in group)))))
    finally:
        serve_log.removeHandler(caplog.handler)
    assert calls == [["req-a", "req-b"]]  # one call for equal settings; the expired job never runs
    assert out == [{"failed": True}, {"failed": True}, {"expired": True}]
    assert told == [(False, 4)]
    assert "req-a, req-b" in caplog.text and "secret detail" in caplog.text  # the detail is in the log only


def test_load_job_small_form(urls, t2i_run, ddpm_run, tmp_path):
    """jobs/load_serve.py in its CI form, against this module's runs, on this module's Serve instance."""
    from urllib.parse import urlsplit

    from tests.conftest import load_job

    job = load_job("load_serve")
    port = urlsplit(urls["t2i"]).port
    out = tmp_path / "load"
    argv = ["--size", "ci", "--out", str(out), "--t2i-run", t2i_run, "--ddpm-run", ddpm_run, "--port", str(port),
            "--cpus-per-replica", "0.5", "--keep-serve"]  # fmt: skip
    assert job.main(argv) == 0
    summary = json.loads((out / "summary.json").read_text())
    size = job.SIZES["ci"]
    for row in summary["load"]:  # every request answered 200, every image as the same request alone
        assert row["success_rate"] == 1.0 and row["mismatched"] == 0, row
        assert row["requests"] == size.requests[row["concurrency"]]
        assert row["compared_with_solo"] == (row["requests"] if row["concurrency"] > 1 else 0)
    assert {(r["kind"], r["concurrency"]) for r in summary["load"]} == {(k, c) for k in job.KINDS for c in (1, 16, 32)}
    slow = summary["slow"]
    assert slow["valid_ok"] == slow["valid_requests"] and slow["slow_clients_answered"] == {"408": 64}
    bad = [a for a in summary["abuse"] if not a["ok"]]
    assert not bad and len(summary["abuse"]) >= 30
    ov = summary["overload"]
    assert ov["all_answered"] and ov["statuses"].get("200", 0) >= 1 and ov["statuses"].get("503", 0) >= 1
    assert ov["refused_with_retry_after"] == ov["statuses"]["503"]
    assert ov["latest_answer_s"] <= ov["deadline_s"] + 2
    assert all(len(summary["rss"][k]["samples"]) > 5 for k in job.KINDS)
    assert (out / "serve-load.png").stat().st_size > 0
    assert "| t2i | 32 | 128 | 100.0% |" in (out / "results.md").read_text()
    health = json.loads(urllib.request.urlopen(urls["t2i"] + "/health", timeout=30).read())
    assert health["status"] == "ok"  # the module's own apps survived the job's load next to them
