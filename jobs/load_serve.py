"""The serving load-and-abuse job: ``memshard serve`` under load, slow clients and bad input.

Serves two tiny models on loopback with Ray Serve (a text-to-image run of the ``demo-t2i``
preset and an unconditional DDPM run of ``demo``, each trained for one short round and cached;
or the runs given with ``--t2i-run/--ddpm-run``) and measures, with bounded request counts and
time, what an operator would check before putting the endpoint behind a load balancer:

* **load**: success rate, p50/p95/p99 latency (client side, request sent to answer read) and
  images/s at concurrency 1, 16 and 32. Every request body comes from a fixed pool that the
  concurrency-1 phase sends alone first, so each answer under load is also compared with the
  same request made alone (``mismatched``: images that differ by more than ``TOLERANCE`` levels
  of 255; a shared batch rounds differently, by up to 2 levels as measured, see memshard.serving.app);
* **rss**: the replicas' resident memory sampled through the run (from /proc), and its growth
  from the end of warm-up (the concurrency-16 phase) to the end of the concurrency-32 phase;
* **slow**: 64 connections that send the headers and half the body of ``POST /generate`` and
  then wait; valid requests' latency while they are held, against the same requests unloaded,
  the probes' latency, and what the slow clients are answered once the body deadline passes;
* **abuse**: each malformed or hostile request (deep JSON, lone surrogates, wrong content type,
  oversized or slow bodies, ...) with its status and the readiness probe right after it;
* **overload**: more maximum-size requests than the deadline allows: each must be answered in
  time (200) or refused with 503 and ``Retry-After``, never left waiting past the deadline.

It writes ``OUT/summary.json`` (``--publish``: ``docs/results/serve-load.json``, the table in
BENCHMARKS.md is generated from it) and ``OUT/serve-load.png`` (RSS over time, latency by
concurrency).

    python jobs/load_serve.py --size full --out runs/load-serve --publish
    python jobs/load_serve.py --size ci --out /tmp/load-serve      # the CI form, about 2 minutes
"""

from __future__ import annotations

import argparse
import base64
import http.client
import io
import json
import os
import shutil
import socket
import statistics
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the checkout's memshard, installed or not

ROOT = Path(__file__).resolve().parents[1]
RESULTS_DIR = str(ROOT / "docs" / "results")
KINDS = ("t2i", "ddpm")
# Images under load are compared with the same request alone. A shared batch changes float rounding
# (kernels block by batch shape), amplified by guidance over the steps: measured up to 2 levels of 255 at
# 10 steps and guidance 7.5 on CPU. A wrong image (another prompt's conditioning, another seed) differs
# by tens of levels. So "mismatched" is a difference over TOLERANCE; the largest difference is reported too.
TOLERANCE = 4
# prompts of 1 to 8 words (validation counts tokens of new requests while generation pads others)
PROMPTS = [
    "a heart", "a red heart", "grinning face", "a big red heart shape", "two small blue circles side by side",
    "one green cross", "a yellow star on white", "grinning face with big open eyes", "a cat", "smiling cat face",
    "thumbs up", "a rocket", "a red apple on a white background", "a sun with rays", "blue water wave", "fire",
]  # fmt: skip


@dataclass(frozen=True)
class Size:
    """Request counts and server settings of one form of the job."""

    requests: dict[int, int]  # concurrency -> requests, per kind
    steps: int  # sampling steps of the load requests
    slow_connections: int
    slow_valid: int  # valid requests sent while the slow connections are held
    overload_s: float  # how long the overload clients keep sending
    overload_concurrency: int
    overload_steps: int  # steps of the overload requests (max_images images each)
    deadline_s: float  # the servers' end-to-end deadline (short, so that overload is cheap to reach)
    body_timeout_s: float


SIZES = {
    "ci": Size({1: 16, 16: 64, 32: 128}, steps=4, slow_connections=64, slow_valid=16, overload_s=10.0,
               overload_concurrency=48, overload_steps=20, deadline_s=5.0, body_timeout_s=3.0),
    "full": Size({1: 100, 16: 500, 32: 1000}, steps=10, slow_connections=64, slow_valid=50, overload_s=60.0,
                 overload_concurrency=64, overload_steps=50, deadline_s=10.0, body_timeout_s=10.0),
}  # fmt: skip


# --------------------------------------------------------------------------- the models
def tiny_runs(cache: str) -> dict[str, str]:
    """One-round runs of the demo presets, trained once and reused from ``cache``."""
    from memshard.config import load_config
    from memshard.io.rundir import RunDir
    from memshard.runtime.driver import train

    runs = {}
    for kind, preset in (("t2i", "demo-t2i"), ("ddpm", "demo")):
        out = os.path.join(cache, kind)
        manifest = RunDir(out).manifest() if os.path.exists(os.path.join(out, "run.json")) else None
        if manifest is None or manifest.get("rounds_completed", 0) < 1:
            sets = ["train.rounds=1", "train.steps_per_round=2", "shards.count=1", "data.limit=64",
                    "logging.progress=false", "resources.cpus_per_shard=1"]  # fmt: skip
            shutil.rmtree(out, ignore_errors=True)
            print(f"training a one-round {preset} run into {out} (once; reused from the cache)", flush=True)
            train(load_config(preset, sets), out=out)
        runs[kind] = out
    return runs


# --------------------------------------------------------------------------- HTTP
@dataclass
class Answer:
    status: int
    latency_s: float
    body: dict[str, Any] | None = None
    headers: dict[str, str] = field(default_factory=dict)
    error: str | None = None  # a transport failure (timeout, reset): no status


class Client:
    """One keep-alive HTTP/1.1 connection per thread (as a pool of real clients would hold)."""

    def __init__(self, base: str, timeout_s: float) -> None:
        parts = urlsplit(base)
        self.host, self.port, self.prefix = parts.hostname or "127.0.0.1", parts.port or 80, parts.path.rstrip("/")
        self.timeout_s = timeout_s
        self.local = threading.local()

    def _conn(self) -> http.client.HTTPConnection:
        conn = getattr(self.local, "conn", None)
        if conn is None:
            conn = self.local.conn = http.client.HTTPConnection(self.host, self.port, timeout=self.timeout_s)
        return conn

    def call(self, method: str, path: str, body: dict[str, Any] | None = None) -> Answer:
        data = json.dumps(body).encode() if body is not None else None
        headers = {"Content-Type": "application/json"} if data is not None else {}
        t0 = time.perf_counter()
        try:
            conn = self._conn()
            conn.request(method, self.prefix + path, body=data, headers=headers)
            resp = conn.getresponse()
            raw = resp.read()
            out = Answer(resp.status, time.perf_counter() - t0, headers={k.lower(): v for k, v in resp.getheaders()})
            try:
                out.body = json.loads(raw) if raw else None
            except ValueError:
                out.body = {"raw": raw[:200].decode("latin-1")}
            if resp.getheader("connection", "").lower() == "close":
                self.close()
            return out
        except (OSError, http.client.HTTPException) as exc:
            self.close()
            return Answer(0, time.perf_counter() - t0, error=f"{type(exc).__name__}: {exc}")

    def close(self) -> None:
        conn = getattr(self.local, "conn", None)
        if conn is not None:
            conn.close()
            self.local.conn = None


def percentile(values: list[float], q: float) -> float | None:
    return float(np.percentile(values, q)) if values else None


def pixels(b64: str) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(base64.b64decode(b64)))).astype(np.int16)


def bodies_for(kind: str, steps: int) -> list[dict[str, Any]]:
    """The fixed request pool of a kind: one image each, distinct seeds (and prompts for t2i)."""
    if kind == "t2i":
        return [{"prompt": p, "steps": steps, "seed": 100 + i} for i, p in enumerate(PROMPTS)]
    return [{"num_images": 1, "steps": steps, "seed": 100 + i} for i in range(len(PROMPTS))]


def run_load(
    client: Client, bodies: list[dict[str, Any]], n: int, concurrency: int, solo: dict[int, np.ndarray] | None
) -> tuple[dict[str, Any], dict[int, np.ndarray]]:
    """``n`` requests (body ``k % len(bodies)``) from ``concurrency`` clients; stats and each body's first image."""
    lock = threading.Lock()
    answers: list[tuple[int, Answer]] = []
    images: dict[int, np.ndarray] = {}

    def one(k: int) -> None:
        i = k % len(bodies)
        ans = client.call("POST", "/generate", bodies[i])
        img = pixels(ans.body["images"][0]) if ans.status == 200 and ans.body else None
        with lock:
            answers.append((i, ans))
            if img is not None:
                images.setdefault(i, img)
                if solo is not None and i in solo:
                    diffs.append(int(np.abs(img - solo[i]).max()))

    diffs: list[int] = []
    t0 = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        list(pool.map(one, range(n)))
    wall = time.perf_counter() - t0
    ok = [a for _, a in answers if a.status == 200]
    lat = [a.latency_s for a in ok]
    statuses: dict[str, int] = {}
    for _, a in answers:
        key = str(a.status) if a.status else "no answer"
        statuses[key] = statuses.get(key, 0) + 1
    errors = sorted({(a.body or {}).get("error") or a.error or "" for _, a in answers if a.status != 200})
    stats = {
        "concurrency": concurrency,
        "requests": n,
        "ok": len(ok),
        "success_rate": len(ok) / n,
        "statuses": statuses,
        "errors": [e for e in errors if e][:5],
        "p50_s": percentile(lat, 50),
        "p95_s": percentile(lat, 95),
        "p99_s": percentile(lat, 99),
        "mean_s": statistics.fmean(lat) if lat else None,
        "images_per_s": sum(len(a.body["images"]) for a in ok) / wall,
        "wall_s": wall,
        "compared_with_solo": len(diffs),
        "mismatched": sum(d > TOLERANCE for d in diffs),
        "over_1_level": sum(d > 1 for d in diffs),
        "max_pixel_diff": max(diffs) if diffs else None,
        "batch_requests_max": max((a.body["batch"]["requests"] for a in ok), default=None),
    }
    return stats, images


# --------------------------------------------------------------------------- memory
def replica_pids(app: str) -> list[int]:
    from memshard.testing.chaos import ray_processes

    return ray_processes(f"ray::ServeReplica:{app}:")


def rss_mb(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


class RssMonitor:
    """Samples each app's replica RSS every ``period_s`` in a thread; phases are marked by name."""

    def __init__(self, apps: dict[str, str], period_s: float = 0.5) -> None:
        self.apps, self.period_s = apps, period_s
        self.samples: dict[str, list[tuple[float, float, str]]] = {k: [] for k in apps}
        self.phase = "start"
        self.t0 = time.monotonic()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self) -> None:
        while not self._stop.is_set():
            for kind, app in self.apps.items():
                total = [rss_mb(p) for p in replica_pids(app)]
                if total and all(v is not None for v in total):
                    self.samples[kind].append((time.monotonic() - self.t0, float(sum(total)), self.phase))
            self._stop.wait(self.period_s)

    def __enter__(self) -> RssMonitor:
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def summary(self, kind: str) -> dict[str, Any]:
        """Growth from the end of warm-up (last quarter of the c16 phase) to the end of the c32 phase."""
        s = self.samples[kind]

        def tail(phase: str, frac: float) -> float | None:
            vals = [mb for _, mb, p in s if p == phase]
            return statistics.median(vals[int(len(vals) * (1 - frac)) :]) if vals else None

        ref, end = tail(f"{kind}-c16", 0.25), tail(f"{kind}-c32", 0.25)
        step = max(1, len(s) // 400)
        return {
            "warm_mb": ref,
            "end_mb": end,
            "peak_mb": max((mb for _, mb, _ in s), default=None),
            "growth": (end / ref - 1) if ref and end else None,
            "samples": [[round(t, 2), round(mb, 1), p] for t, mb, p in s[::step]],
        }


# --------------------------------------------------------------------------- raw requests
def raw_request(
    method: str, path: str, host: str, body: bytes | None = b"", content_type: str | None = "application/json",
    headers: dict[str, str] | None = None, content_length: str | None = None,
) -> bytes:  # fmt: skip
    """The bytes of one HTTP/1.1 request, exactly as given (bad headers included)."""
    lines = [f"{method} {path} HTTP/1.1", f"Host: {host}", "Connection: close"]
    if content_type is not None:
        lines.append(f"Content-Type: {content_type}")
    if content_length is not None:
        lines.append(f"Content-Length: {content_length}")
    elif body is not None:
        lines.append(f"Content-Length: {len(body)}")
    lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + (body or b"")


def status_of(sock: socket.socket, timeout_s: float) -> tuple[int | None, bytes]:
    """The status code (None: no answer before the timeout or a closed connection) and the response read."""
    sock.settimeout(timeout_s)
    data = b""
    try:
        while b"\r\n\r\n" not in data:
            chunk = sock.recv(4096)
            if not chunk:
                break
            data += chunk
        head, _, rest = data.partition(b"\r\n\r\n")
        for line in head.split(b"\r\n")[1:]:  # read the body too (Content-Length), for the error message
            if line.lower().startswith(b"content-length:"):
                need = int(line.split(b":")[1])
                while len(rest) < need:
                    chunk = sock.recv(4096)
                    if not chunk:
                        break
                    rest += chunk
        data = head + b"\r\n\r\n" + rest
    except OSError:
        pass
    try:
        return int(data.split(b" ", 2)[1]), data
    except (IndexError, ValueError):
        return None, data


@dataclass
class Case:
    """One abuse request: raw bytes sent to a kind's app, the status it must get (None: the client hangs up)."""

    name: str
    kind: str
    expected: int | None
    request: Callable[[str, str], bytes]  # (path prefix, host) -> bytes
    close_early: bool = False  # hang up without reading (a client that disconnects)


def _post(body: bytes | str, content_type: str | None = "application/json", **kw: Any) -> Callable[[str, str], bytes]:
    data = body.encode("utf-8", "surrogatepass") if isinstance(body, str) else body
    return lambda prefix, host: raw_request("POST", prefix + "/generate", host, data, content_type, **kw)


def abuse_cases() -> list[Case]:
    """Every malformed or hostile request the issue lists, and their neighbours."""
    deep = '{"prompt": ' + "[" * 30_000 + "]" * 30_000 + "}"
    ok_t2i = '{"prompt": "a red heart", "steps": 2}'
    t2i = [
        Case("deep JSON (30,000 levels)", "t2i", 400, _post(deep)),
        Case("lone surrogate in prompt", "t2i", 400, _post('{"prompt": "a\\ud800", "steps": 2}')),
        Case("lone surrogate, raw bytes", "t2i", 400, _post('{"prompt": "a\ud800"}')),
        Case("invalid UTF-8", "t2i", 400, _post(b'{"prompt": "\xff\xfe"}')),
        Case("wrong content type (text/plain)", "t2i", 415, _post(ok_t2i, "text/plain")),
        Case("form content type (curl -d)", "t2i", 415, _post(ok_t2i, "application/x-www-form-urlencoded")),
        Case("no content type", "t2i", 415, _post(ok_t2i, None)),
        Case("not JSON", "t2i", 400, _post("{not json")),
        Case("empty body", "t2i", 400, _post(b"")),
        Case("JSON array", "t2i", 400, _post("[1, 2]")),
        Case("NaN", "t2i", 400, _post('{"prompt": "a", "lambda_ss": NaN}')),
        Case("1e999 (infinity)", "t2i", 400, _post('{"prompt": "a", "guidance_scale": 1e999}')),
        Case("unknown field", "t2i", 400, _post('{"prompt": "a", "colour": "red"}')),
        Case("string for an integer", "t2i", 400, _post('{"prompt": "a", "steps": "4"}')),
        Case("negative seed", "t2i", 400, _post('{"prompt": "a", "seed": -1}')),
        Case("seed of 400 digits", "t2i", 400, _post('{"prompt": "a", "seed": ' + "9" * 400 + "}")),
        Case("too many images", "t2i", 400, _post('{"prompt": "a", "num_images": 1000000}')),
        Case("too many steps", "t2i", 400, _post('{"prompt": "a", "steps": 100000}')),
        Case("prompt of 3,000 characters", "t2i", 400, _post(json.dumps({"prompt": "a" * 3000}))),
        Case("prompt over the token limit", "t2i", 400, _post(json.dumps({"prompt": "word " * 200}))),
        Case("empty prompt", "t2i", 400, _post('{"prompt": " "}')),
        Case("prompt list of 10,000", "t2i", 400, _post(json.dumps({"prompt": ["a"] * 10_000}))),
        Case("PRSS off (not allowed)", "t2i", 403, _post('{"prompt": "a", "prss": false}')),
        Case("tau <= lambda_pr", "t2i", 400, _post('{"prompt": "a", "lambda_pr": 1.0, "tau": 0.5}')),
        Case("declared 1 GB body", "t2i", 413, _post(b"", content_length=str(10**9))),
        Case("bad Content-Length", "t2i", 400, _post(b"{}", content_length="abc")),
        Case("slow body (half, then nothing)", "t2i", 408, _post(b'{"prompt": ', content_length="40")),
        Case("client gone mid-body", "t2i", None, _post(b'{"prompt": ', content_length="40"), close_early=True),
        Case("GET /generate", "t2i", 405, lambda p, h: raw_request("GET", p + "/generate", h, None, None)),
        Case("unknown path", "t2i", 404, lambda p, h: raw_request("POST", p + "/admin", h, b"{}")),
        Case("header of 64 KB", "t2i", 431, _post(ok_t2i, headers={"X-Pad": "a" * 65_536})),
        Case("header of 4 MB", "t2i", 431, _post(ok_t2i, headers={"X-Pad": "a" * 4_000_000})),
    ]
    ddpm = [
        Case("prompt to an image model", "ddpm", 400, _post('{"prompt": "a cat"}')),
        Case("label to an unconditional model", "ddpm", 400, _post('{"label": 3}')),
        Case("num_images 0", "ddpm", 400, _post('{"num_images": 0}')),
        Case("deep JSON (30,000 levels)", "ddpm", 400, _post('{"seeds": ' + "[" * 30_000 + "]" * 30_000 + "}")),
    ]
    return t2i + ddpm


def probe(client: Client, path: str = "/health/ready") -> tuple[int, float]:
    ans = client.call("GET", path)
    return ans.status, ans.latency_s


def run_abuse(urls: dict[str, str], size: Size) -> list[dict[str, Any]]:
    out = []
    for case in abuse_cases():
        parts = urlsplit(urls[case.kind])
        host, port = parts.hostname or "127.0.0.1", parts.port or 80
        t0 = time.perf_counter()
        with socket.create_connection((host, port), timeout=30) as sock:
            try:
                sock.sendall(case.request(parts.path.rstrip("/"), parts.netloc))
            except OSError:
                pass  # the server may close on an oversized header before it is all sent
            if case.close_early:
                status, data = None, b""
            else:
                status, data = status_of(sock, size.body_timeout_s + 30)
        took = time.perf_counter() - t0
        msg = ""
        if data:
            try:
                msg = json.loads(data.partition(b"\r\n\r\n")[2] or b"{}").get("error", "")
            except (ValueError, AttributeError):
                msg = data.partition(b"\r\n\r\n")[2][:80].decode("latin-1")
        health = Client(urls[case.kind], 30)
        ready, ready_s = probe(health)
        health.close()
        out.append({
            "case": case.name, "kind": case.kind, "status": status, "expected": case.expected,
            "ok": status == case.expected and ready == 200, "message": msg[:120], "seconds": round(took, 3),
            "ready_after": ready, "ready_after_s": round(ready_s, 4),
        })  # fmt: skip
    return out


# --------------------------------------------------------------------------- slow clients
def run_slow(url: str, size: Size, bodies: list[dict[str, Any]], unloaded_p95: float | None) -> dict[str, Any]:
    """Hold ``size.slow_connections`` half-sent requests; time valid requests and probes meanwhile."""
    parts = urlsplit(url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 80
    head = raw_request("POST", parts.path.rstrip("/") + "/generate", parts.netloc, b'{"prompt": "a re',
                       content_length="40")  # fmt: skip
    socks = []
    t_open = time.monotonic()
    try:
        for _ in range(size.slow_connections):
            s = socket.create_connection((host, port), timeout=30)
            s.sendall(head)
            socks.append(s)
        client = Client(url, size.deadline_s + size.body_timeout_s + 30)
        lat, ok = [], 0
        live, ready = [], []
        for k in range(size.slow_valid):
            ans = client.call("POST", "/generate", bodies[k % len(bodies)])
            ok += ans.status == 200
            if ans.status == 200:
                lat.append(ans.latency_s)
            live.append(probe(client, "/health/live")[1])
            ready.append(probe(client, "/health/ready")[1])
        client.close()
        held_for = time.monotonic() - t_open
        statuses: dict[str, int] = {}
        t_wait = time.monotonic()
        for s in socks:  # answered once the body deadline passes (counted from when each was sent)
            code, _ = status_of(s, max(1.0, size.body_timeout_s + 10 - (time.monotonic() - t_wait)))
            statuses[str(code)] = statuses.get(str(code), 0) + 1
    finally:
        for s in socks:
            s.close()
    p95 = percentile(lat, 95)
    return {
        "connections": size.slow_connections,
        "valid_requests": size.slow_valid,
        "valid_ok": ok,
        "valid_p50_s": percentile(lat, 50),
        "valid_p95_s": p95,
        "unloaded_p95_s": unloaded_p95,
        "p95_ratio": p95 / unloaded_p95 if p95 and unloaded_p95 else None,
        "live_probe_max_s": max(live) if live else None,
        "ready_probe_max_s": max(ready) if ready else None,
        "held_s": held_for,
        "slow_clients_answered": statuses,
        "body_timeout_s": size.body_timeout_s,
    }


# --------------------------------------------------------------------------- overload
def run_overload(url: str, size: Size, limits: dict[str, Any]) -> dict[str, Any]:
    """``overload_concurrency`` clients send large requests back to back for ``overload_s``: far more work
    than the replica can do in its deadline. Each answer must come in time (200) or be a quick 503 with
    Retry-After; a refused client waits as long as Retry-After asks (at most until the end) and sends again."""
    body = {"prompt": "a red heart", "num_images": limits["max_images"], "steps": size.overload_steps}
    client = Client(url, size.deadline_s + size.body_timeout_s + 60)
    answers: list[Answer] = []
    lock = threading.Lock()
    stop = time.monotonic() + size.overload_s

    def one(k: int) -> None:
        seed = k * 10_000
        while time.monotonic() < stop:
            ans = client.call("POST", "/generate", dict(body, seed=seed))
            seed += 1
            with lock:
                answers.append(ans)
            if ans.status != 200:
                wait = float(ans.headers.get("retry-after", "1"))
                time.sleep(max(0.0, min(wait, stop - time.monotonic())))

    t0 = time.perf_counter()
    with ThreadPoolExecutor(size.overload_concurrency) as pool:
        list(pool.map(one, range(size.overload_concurrency)))
    wall = time.perf_counter() - t0
    client.close()
    statuses: dict[str, int] = {}
    for a in answers:
        statuses[str(a.status or "no answer")] = statuses.get(str(a.status or "no answer"), 0) + 1
    ok = [a for a in answers if a.status == 200]
    refused = [a for a in answers if a.status == 503]
    return {
        "clients": size.overload_concurrency,
        "seconds": size.overload_s,
        "images_per_request": limits["max_images"],
        "steps": size.overload_steps,
        "deadline_s": limits["deadline_s"],
        "requests": len(answers),
        "statuses": statuses,
        "ok_p50_s": percentile([a.latency_s for a in ok], 50),
        "ok_max_s": max((a.latency_s for a in ok), default=None),
        "refused_p50_s": percentile([a.latency_s for a in refused], 50),
        "refused_max_s": max((a.latency_s for a in refused), default=None),
        "refused_with_retry_after": sum("retry-after" in a.headers for a in refused),
        "all_answered": all(a.status in (200, 503) for a in answers),
        "latest_answer_s": max((a.latency_s for a in answers), default=None),
        "images_per_s": len(ok) * limits["max_images"] / wall,
        "wall_s": wall,
    }


# --------------------------------------------------------------------------- targets
def targets(summary: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The issue's targets, each with the measured value and whether it is met."""
    load = {(r["kind"], r["concurrency"]): r for r in summary["load"]}
    out: dict[str, dict[str, Any]] = {}
    for kind in summary["kinds"]:
        c32, c16 = load.get((kind, 32)), load.get((kind, 16))
        if c32:
            out[f"{kind}: success at concurrency 32"] = {
                "value": c32["success_rate"], "target": "1.0", "met": c32["success_rate"] == 1.0}  # fmt: skip
            out[f"{kind}: images equal to the request alone, concurrency 32"] = {
                "value": c32["mismatched"], "target": "0 mismatched", "met": c32["mismatched"] == 0}  # fmt: skip
        if c16 and c16["p50_s"]:
            ratio = c16["p99_s"] / c16["p50_s"]
            out[f"{kind}: p99/p50 at concurrency 16"] = {"value": ratio, "target": "<= 2", "met": ratio <= 2}
        growth = summary["rss"].get(kind, {}).get("growth")
        if growth is not None:
            out[f"{kind}: RSS growth after warm-up"] = {"value": growth, "target": "<= 5%", "met": abs(growth) <= 0.05}
    slow = summary.get("slow")
    if slow:
        ratio = slow["p95_ratio"]
        met = slow["valid_ok"] == slow["valid_requests"] and ratio is not None and ratio <= 2
        out["valid p95 with 64 slow connections / unloaded"] = {"value": ratio, "target": "<= 2", "met": met}
    if summary.get("abuse"):
        bad = [a["case"] for a in summary["abuse"] if not a["ok"]]
        out["abuse cases answered as expected, ready after each"] = {
            "value": f"{len(summary['abuse']) - len(bad)}/{len(summary['abuse'])}",
            "target": "all",
            "met": not bad,
        }
    ov = summary.get("overload")
    if ov:
        met = ov["all_answered"] and ov["refused_with_retry_after"] == ov["statuses"].get("503", 0)
        met = met and (ov["latest_answer_s"] or 0) <= ov["deadline_s"] + 2
        out["overload: 200 within the deadline or 503 + Retry-After"] = {
            "value": ov["statuses"], "target": f"latest <= {ov['deadline_s'] + 2:g} s", "met": met}  # fmt: skip
    return out


# --------------------------------------------------------------------------- report
def _f(x: Any, fmt: str = ".3f") -> str:
    return "-" if x is None else format(x, fmt)


def render(summary: dict[str, Any], plot_path: str) -> str:
    """The job's Markdown (results.md, and BENCHMARKS.md's generated section)."""
    dev = summary["device"]
    lim = summary["limits"]
    rows = ["| model | concurrency | requests | success | p50 s | p95 s | p99 s | images/s | mismatched vs alone "
            "| largest difference (levels of 255) |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]  # fmt: skip
    for r in summary["load"]:
        rows.append(
            f"| {r['kind']} | {r['concurrency']} | {r['requests']} | {r['success_rate']:.1%} | {_f(r['p50_s'])} | "
            f"{_f(r['p95_s'])} | {_f(r['p99_s'])} | {r['images_per_s']:.1f} | "
            f"{r['mismatched']}/{r['compared_with_solo']} | {_f(r['max_pixel_diff'], 'd')} |"
        )
    rss = ["| model | RSS after warm-up MB | at the end MB | peak MB | growth |", "|---|---:|---:|---:|---:|"]
    for kind, r in summary["rss"].items():
        rss.append(f"| {kind} | {_f(r['warm_mb'], '.0f')} | {_f(r['end_mb'], '.0f')} | {_f(r['peak_mb'], '.0f')} | "
                   f"{_f(r['growth'], '+.1%')} |")  # fmt: skip
    parts = [
        f"Command: `{summary['command']}` ({summary['date']}, {dev.get('gpu') or dev['cpu_model']}, "
        f"{dev['cpu_count']} cores, {summary['elapsed_s'] / 60:.0f} min). Models: {summary['models']['t2i']}; "
        f"{summary['models']['ddpm']}. Load requests: one image, {summary['steps']} steps. Server: one replica per "
        f"model, {lim['max_batch_images']} images per batch, deadline {lim['deadline_s']:g} s, body timeout "
        f"{lim['body_timeout_s']:g} s, {lim['max_connections']} connections per replica.",
        "**Load** (latency: client side, sent to answer read; each image under load against the same request "
        f"alone, mismatched = more than {TOLERANCE} levels of 255 apart):\n\n" + "\n".join(rows),
        "**Memory** (replica RSS; growth from the end of the concurrency-16 phase to the end of the "
        "concurrency-32 phase):\n\n" + "\n".join(rss),
    ]
    slow = summary.get("slow")
    if slow:
        parts.append(
            f"**{slow['connections']} slow connections held** (headers and half a body, then nothing): "
            f"{slow['valid_ok']}/{slow['valid_requests']} valid requests answered, p95 {_f(slow['valid_p95_s'])} s "
            f"against {_f(slow['unloaded_p95_s'])} s unloaded ({_f(slow['p95_ratio'], '.2f')}x); probes at most "
            f"{_f(slow['live_probe_max_s'])} s (live), {_f(slow['ready_probe_max_s'])} s (ready); the slow clients "
            f"were answered {slow['slow_clients_answered']} after the {slow['body_timeout_s']:g} s body deadline."
        )
    ov = summary.get("overload")
    if ov:
        parts.append(
            f"**Overload**: {ov['clients']} clients sending text-to-image requests of {ov['images_per_request']} "
            f"images x {ov['steps']} steps back to back for {ov['seconds']:g} s (after a refusal, each waits as "
            f"Retry-After asks), against a {ov['deadline_s']:g} s deadline: {ov['requests']} requests, statuses "
            f"{ov['statuses']}; 200s in {_f(ov['ok_p50_s'], '.2f')} s median, {_f(ov['ok_max_s'], '.2f')} s at most "
            f"({ov['images_per_s']:.1f} images/s); refusals in {_f(ov['refused_max_s'], '.3f')} s at most, "
            f"{ov['refused_with_retry_after']} of {ov['statuses'].get('503', 0)} with Retry-After."
        )
    ab = ["| case | model | status | expected | ready after |", "|---|---|---:|---:|---:|"]
    for a in summary.get("abuse", []):
        ab.append(f"| {a['case']} | {a['kind']} | {a['status'] or 'hung up'} | {a['expected'] or 'none'} | "
                  f"{a['ready_after']} |")  # fmt: skip
    if summary.get("abuse"):
        parts.append("<details><summary>Abuse cases</summary>\n\n" + "\n".join(ab) + "\n\n</details>")
    tg = ["| target | measured | target | met |", "|---|---|---|---|"]
    for name, t in summary["targets"].items():
        v = t["value"]
        v = _f(v, "+.1%" if "RSS" in name else ".3g") if isinstance(v, float) else v
        tg.append(f"| {name} | {v} | {t['target']} | {'yes' if t['met'] else '**no**'} |")
    parts.append("**Targets**:\n\n" + "\n".join(tg))
    parts.append(f"![serve load]({plot_path})")
    return "\n\n".join(parts)


def plot(summary: dict[str, Any], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4))
    for kind, r in summary["rss"].items():
        if r["samples"]:
            t, mb, _ = zip(*r["samples"], strict=True)
            a1.plot(t, mb, label=kind)
    a1.set_xlabel("seconds into the job")
    a1.set_ylabel("replica RSS (MB)")
    a1.set_title("memory over the whole job")
    a1.legend()
    for kind in summary["kinds"]:
        rows = [r for r in summary["load"] if r["kind"] == kind and r["p50_s"]]
        for q, style in (("p50_s", "-o"), ("p99_s", "--x")):
            a2.plot([r["concurrency"] for r in rows], [r[q] for r in rows], style, label=f"{kind} {q[:-2]}")
    a2.set_xlabel("concurrent clients")
    a2.set_ylabel("latency (s)")
    a2.set_title("latency by concurrency")
    a2.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def publish(out: str) -> tuple[str, str]:
    os.makedirs(RESULTS_DIR, exist_ok=True)
    js, png = os.path.join(RESULTS_DIR, "serve-load.json"), os.path.join(RESULTS_DIR, "serve-load.png")
    shutil.copyfile(os.path.join(out, "summary.json"), js)
    shutil.copyfile(os.path.join(out, "serve-load.png"), png)
    return js, png


# --------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", choices=sorted(SIZES), default="full")
    parser.add_argument("--out", default=None, help="output directory (default runs/load-serve-SIZE)")
    parser.add_argument("--cache", default="runs/load-serve-models", help="where the tiny runs are trained once")
    parser.add_argument("--t2i-run", help="serve this text-to-image run instead of the tiny one")
    parser.add_argument("--ddpm-run", help="serve this DDPM run instead of the tiny one")
    parser.add_argument("--port", type=int, default=None, help="Serve's HTTP port (default: a free one)")
    parser.add_argument("--cpus-per-replica", type=float, default=1.0)
    parser.add_argument("--keep-serve", action="store_true", help="delete only this job's apps (Serve was running)")
    parser.add_argument("--publish", action="store_true", help="copy summary.json and the plot to docs/results/")
    args = parser.parse_args(argv)
    size = SIZES[args.size]
    out = args.out or f"runs/load-serve-{args.size}"
    os.makedirs(out, exist_ok=True)
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    import ray
    from ray import serve

    from memshard.runtime.machine import device_info
    from memshard.serving.app import free_port, serve_run
    from memshard.serving.requests import ServeLimits

    started = time.monotonic()
    if not ray.is_initialized():
        ray.init(num_cpus=max(2, os.cpu_count() or 2), include_dashboard=False, log_to_driver=False)
    runs = tiny_runs(args.cache) if not (args.t2i_run and args.ddpm_run) else {}
    runs.update({k: v for k, v in (("t2i", args.t2i_run), ("ddpm", args.ddpm_run)) if v})
    limits = ServeLimits(deadline_s=size.deadline_s, body_timeout_s=size.body_timeout_s)
    port = args.port or free_port()
    apps = {kind: f"load-{kind}" for kind in KINDS}
    urls = {}
    try:
        for kind in KINDS:
            urls[kind] = serve_run(runs[kind], port=port, name=apps[kind], route_prefix=f"/{apps[kind]}",
                                   limits=limits, cpus_per_replica=args.cpus_per_replica, timeout_s=300)  # fmt: skip
            print(f"serving {kind} at {urls[kind]}", flush=True)
        summary: dict[str, Any] = {
            "job": "load_serve", "size": args.size,
            "command": "python jobs/load_serve.py " + " ".join(argv if argv is not None else sys.argv[1:]),
            "date": datetime.now(timezone.utc).strftime("%Y-%m-%d"), "device": device_info(),
            "kinds": list(KINDS), "limits": asdict(limits), "steps": size.steps,
            "models": {"t2i": "demo-t2i preset (16 px, MiniLM text encoder), one round",
                       "ddpm": "demo preset (16 px digits), one round"}
            if not (args.t2i_run or args.ddpm_run) else {k: os.path.basename(v.rstrip("/")) for k, v in runs.items()},
            "load": [], "rss": {},
        }  # fmt: skip
        with RssMonitor(apps) as mon:
            for kind in KINDS:
                bodies = bodies_for(kind, size.steps)
                client = Client(urls[kind], size.deadline_s + size.body_timeout_s + 30)
                solo: dict[int, np.ndarray] | None = None
                for conc, n in sorted(size.requests.items()):
                    mon.phase = f"{kind}-c{conc}"
                    stats, images = run_load(client, bodies, n, conc, solo)
                    if solo is None:
                        solo = images
                    summary["load"].append({"kind": kind, **stats})
                    print(f"{kind} c={conc}: {stats['ok']}/{n} ok, p50 {_f(stats['p50_s'])} s, p99 "
                          f"{_f(stats['p99_s'])} s, {stats['images_per_s']:.1f} images/s, "
                          f"{stats['mismatched']} mismatched vs alone", flush=True)  # fmt: skip
                client.close()
            mon.phase = "slow"
            c1 = next(r for r in summary["load"] if r["kind"] == "t2i" and r["concurrency"] == 1)
            summary["slow"] = run_slow(urls["t2i"], size, bodies_for("t2i", size.steps), c1["p95_s"])
            print(f"slow: {summary['slow']['valid_ok']}/{size.slow_valid} ok, p95 x{_f(summary['slow']['p95_ratio'])}",
                  flush=True)  # fmt: skip
            mon.phase = "abuse"
            summary["abuse"] = run_abuse(urls, size)
            bad = [a for a in summary["abuse"] if not a["ok"]]
            print(f"abuse: {len(summary['abuse']) - len(bad)}/{len(summary['abuse'])} as expected"
                  + "".join(f"\n  {a['case']}: {a['status']} (expected {a['expected']}) {a['message']}" for a in bad),
                  flush=True)  # fmt: skip
            mon.phase = "overload"
            summary["overload"] = run_overload(urls["t2i"], size, summary["limits"])
            print(f"overload: {summary['overload']['statuses']}", flush=True)
        summary["rss"] = {kind: mon.summary(kind) for kind in KINDS}
    finally:
        for app in apps.values():
            try:
                serve.delete(app)
            except Exception:  # cleanup must not hide the job's own error
                pass
        if not args.keep_serve:
            serve.shutdown()
    summary["targets"] = targets(summary)
    summary["elapsed_s"] = time.monotonic() - started
    with open(os.path.join(out, "summary.json"), "w") as fh:
        json.dump(summary, fh, indent=2)
    plot(summary, os.path.join(out, "serve-load.png"))
    with open(os.path.join(out, "results.md"), "w") as fh:
        fh.write(render(summary, "serve-load.png") + "\n")
    for name, t in summary["targets"].items():
        print(f"{'met' if t['met'] else 'NOT MET'}: {name} = {t['value']} (target {t['target']})")
    if args.publish:
        print("published", *publish(out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
