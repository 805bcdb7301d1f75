"""Storage faults: transient S3 errors are retried with backoff, a real outage ends in a clear
StorageError, a failed commit never leaves a manifest pointing at missing files, and local
disk-full / permission errors name the path.

The S3 cases run against a real S3 API on loopback (moto's server) that the tests stop and
start again on the same port. moto keeps its state in this process, so objects written
before a stop are there after the restart (the bucket is recreated if it is not).
"""

from __future__ import annotations

import builtins
import errno
import logging
import os
import pickle
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from memshard.io.rundir import RunDir
from memshard.io.storage import (
    BACKOFF_BASE,
    BACKOFF_MAX,
    RETRY_ATTEMPTS,
    RetryPolicy,
    Storage,
    StorageError,
    StoragePermissionError,
    is_transient,
)

FAST = RetryPolicy(attempts=3, base=0.01, max_delay=0.02)


class RestartableS3:
    """A moto S3 server on a fixed loopback port that can be stopped and started again."""

    def __init__(self, port: int, bucket: str, secret: str) -> None:
        self.port, self.bucket, self.secret = port, bucket, secret
        self.url = f"http://127.0.0.1:{port}"
        self._server = None

    def start(self) -> None:
        from moto.server import ThreadedMotoServer

        self._server = ThreadedMotoServer(ip_address="127.0.0.1", port=self.port, verbose=False)
        self._server.start()
        client = self.client()
        try:
            client.head_bucket(Bucket=self.bucket)
        except client.exceptions.ClientError:
            client.create_bucket(Bucket=self.bucket)

    def stop(self) -> None:
        if self._server is not None:
            self._server.stop()
            self._server = None

    def client(self):
        import boto3
        from botocore.config import Config

        return boto3.client(
            "s3", endpoint_url=self.url, region_name="us-east-1", config=Config(retries={"total_max_attempts": 1})
        )

    def get(self, key: str) -> bytes:
        """An object read by an independent client (not through memshard)."""
        return self.client().get_object(Bucket=self.bucket, Key=key)["Body"].read()


@pytest.fixture
def s3(monkeypatch: pytest.MonkeyPatch) -> Iterator[RestartableS3]:
    pytest.importorskip("moto.server")
    pytest.importorskip("boto3")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = RestartableS3(port, f"memshard-faults-{uuid.uuid4().hex[:8]}", f"secret-{uuid.uuid4().hex}")
    env = {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": server.secret,
        "AWS_DEFAULT_REGION": "us-east-1",
        "MEMSHARD_S3_ENDPOINT_URL": server.url,
        # botocore's own retries (about 5 s per call against a closed port) off: memshard's policy is measured
        "AWS_MAX_ATTEMPTS": "1",
    }
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    for key in ("AWS_SESSION_TOKEN", "AWS_PROFILE", "MEMSHARD_STORAGE_RETRIES", "MEMSHARD_STORAGE_BACKOFF"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.delenv("MEMSHARD_STORAGE_BACKOFF_MAX", raising=False)
    server.start()
    try:
        yield server
    finally:
        server.stop()


def _retry_records(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == "memshard.io.storage" and "retrying" in r.getMessage()]


def _wait_for(cond: Callable[[], bool], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "timed out waiting"
        time.sleep(0.02)


# ------------------------------------------------------------------ S3 outages
def test_write_rides_out_an_s3_restart_on_the_same_port(s3, caplog):
    caplog.set_level(logging.WARNING, logger="memshard.io.storage")
    store = Storage(f"s3://{s3.bucket}/run", retry=RetryPolicy(attempts=80, base=0.05, max_delay=0.25))
    store.write_bytes("before.txt", b"old")
    payload = os.urandom(300_000)
    rel = "rounds/0001/global.safetensors"

    s3.stop()
    outcome: dict[str, object] = {}

    def write() -> None:
        try:
            store.write_bytes(rel, payload)
            outcome["ok"] = True
        except BaseException as exc:
            outcome["error"] = exc

    writer = threading.Thread(target=write, daemon=True)
    writer.start()
    _wait_for(lambda: len(_retry_records(caplog)) >= 3 or not writer.is_alive(), 30)
    assert writer.is_alive() and not outcome, f"the write should wait for S3, got {outcome}"

    s3.start()  # same port: the endpoint the client knows comes back
    writer.join(60)
    assert not writer.is_alive(), "the write did not finish after S3 came back"
    assert outcome == {"ok": True}, outcome
    assert s3.get(f"run/{rel}") == payload
    assert store.read_bytes(rel) == payload
    assert store.read_bytes("before.txt") == b"old"
    records = _retry_records(caplog)
    assert all(f"s3://{s3.bucket}/run/{rel}" in r.getMessage() for r in records)
    assert not any(s3.secret in r.getMessage() for r in records)


def test_write_fails_with_storage_error_when_s3_stays_down(s3, monkeypatch, caplog):
    caplog.set_level(logging.WARNING, logger="memshard.io.storage")
    monkeypatch.setenv("MEMSHARD_STORAGE_RETRIES", "3")
    monkeypatch.setenv("MEMSHARD_STORAGE_BACKOFF", "0.01")
    monkeypatch.setenv("MEMSHARD_STORAGE_BACKOFF_MAX", "0.02")
    store = Storage(f"s3://{s3.bucket}/run")  # policy from the environment
    s3.stop()

    started = time.monotonic()
    with pytest.raises(StorageError) as info:
        store.write_bytes("run.json", b"{}")
    assert time.monotonic() - started < 20

    err = info.value
    message = str(err)
    assert isinstance(err, OSError)
    assert f"s3://{s3.bucket}/run/run.json" in message
    assert "write" in message and "3 attempt" in message
    assert (err.op, err.uri, err.attempts) == ("write", f"s3://{s3.bucket}/run/run.json", 3)
    assert s3.secret not in message and s3.secret not in repr(err)
    assert len(_retry_records(caplog)) == 2  # 3 attempts, 2 waits
    # the error survives pickling (Ray ships it from a worker to the driver)
    again = pickle.loads(pickle.dumps(err))
    assert type(again) is StorageError and str(again) == message and again.uri == err.uri

    # reads and listings fail the same way, each naming its URI
    with pytest.raises(StorageError, match=f"s3://{s3.bucket}/run/missing"):
        store.read_bytes("missing")
    with pytest.raises(StorageError, match=f"list s3://{s3.bucket}/run/rounds"):
        store.listdir("rounds")


def test_missing_objects_are_not_retried(s3, caplog):
    caplog.set_level(logging.WARNING, logger="memshard.io.storage")
    store = Storage(f"s3://{s3.bucket}/run", retry=RetryPolicy(attempts=5, base=2.0, max_delay=2.0))
    started = time.monotonic()
    with pytest.raises(FileNotFoundError) as info:
        store.read_bytes("no-such-object")
    assert not isinstance(info.value, StorageError)
    assert time.monotonic() - started < 1.5, "a missing object must fail at once"
    assert store.exists("no-such-object") is False
    assert store.listdir("no-such-dir") == []
    assert _retry_records(caplog) == []


# ------------------------------------------------------- commit under an outage
def _weights(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"w": torch.randn(16, 8, generator=g), "b": torch.randn(8, generator=g)}


def _commit(run: RunDir, r: int, weights: dict[str, torch.Tensor]) -> None:
    """Round r as the driver commits it: every file of the round first, the manifest last."""
    run.save_weights(r, weights, weights)
    ids = np.arange(12)
    run.write_assignment(r, ids, ids % 3)
    manifest = run.manifest() or {"config": {"seed": 0}}
    run.write_manifest(dict(manifest, rounds_completed=r))


def _assert_consistent(uri: str, expect_rounds: int, weights: dict[int, dict[str, torch.Tensor]]) -> None:
    """A fresh reader: the manifest parses, and every round it declares committed is complete."""
    reader = RunDir(uri)
    manifest = reader.manifest()
    assert manifest is not None, "the manifest disappeared"
    assert manifest["rounds_completed"] == expect_rounds
    for r in range(manifest["rounds_completed"] + 1):
        raw, ema = reader.load_weights(r)
        assert ema is not None
        for key, value in weights[r].items():
            torch.testing.assert_close(raw[key], value)
            torch.testing.assert_close(ema[key], value)
        ids, shards = reader.read_assignment(r)
        assert len(ids) == 12 and (shards == ids % 3).all()


@pytest.mark.parametrize("kill_before", ["rounds/0001/ema.safetensors", "run.json"])
def test_a_commit_cut_by_an_outage_leaves_the_previous_round_readable(s3, monkeypatch, kill_before):
    monkeypatch.setenv("MEMSHARD_STORAGE_RETRIES", "3")
    monkeypatch.setenv("MEMSHARD_STORAGE_BACKOFF", "0.01")
    uri = f"s3://{s3.bucket}/runs/a"
    run = RunDir(uri)
    weights = {0: _weights(0), 1: _weights(1)}
    _commit(run, 0, weights[0])
    _assert_consistent(uri, 0, weights)

    # S3 goes away right before the chosen PUT of round 1 (mid-data, or the commit point itself)
    fs = run.store.fs
    real_pipe = fs.pipe_file
    armed = {"on": True}

    def pipe_file(path: str, *args, **kwargs):
        if armed["on"] and path.endswith(kill_before):
            armed["on"] = False
            s3.stop()
        return real_pipe(path, *args, **kwargs)

    monkeypatch.setattr(fs, "pipe_file", pipe_file)
    with pytest.raises(StorageError, match=f"{uri}/{kill_before}"):
        _commit(run, 1, weights[1])
    assert not armed["on"], "the outage was never injected"

    s3.start()
    assert s3.get("runs/a/rounds/0000/global.safetensors"), "moto lost its state on restart"
    # the round-0 manifest is intact and everything it references is there
    _assert_consistent(uri, 0, weights)
    assert b'"rounds_completed": 0' in s3.get("runs/a/run.json")

    # resume as the driver does: drop the uncommitted leftovers, redo the round
    run.discard_uncommitted(0)
    assert run.store.listdir("rounds") == ["0000"]
    assert run.store.listdir("shards") == ["round-0000.parquet"]
    _commit(run, 1, weights[1])
    _assert_consistent(uri, 1, weights)


# ------------------------------------------------------------------ local files
def _refuse_open(monkeypatch, under: Path, *, writing: bool, exc: OSError) -> None:
    """Make ``open`` refuse files under ``under`` as the kernel would (for root, whom chmod does not stop)."""
    real_open = builtins.open

    def fake_open(file, mode="r", *args, **kwargs):
        is_write = any(c in mode for c in "wax+")
        if isinstance(file, (str, os.PathLike)) and str(file).startswith(str(under)) and is_write == writing:
            raise type(exc)(exc.errno, exc.strerror, os.fspath(file))
        return real_open(file, mode, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", fake_open)


def test_writing_into_a_read_only_directory_names_the_path(tmp_path, monkeypatch):
    run = tmp_path / "run"
    run.mkdir()
    (run / "run.json").write_text("old")
    run.chmod(0o500)
    try:
        if os.access(run, os.W_OK):  # running as root: chmod does not stop us, so simulate the refusal
            _refuse_open(monkeypatch, run, writing=True, exc=PermissionError(errno.EACCES, "Permission denied"))
        with pytest.raises(PermissionError) as info:
            Storage(str(run)).write_text("run.json", "new")
        monkeypatch.undo()
    finally:
        run.chmod(0o700)
    err = info.value
    assert isinstance(err, StoragePermissionError) and isinstance(err, StorageError)
    assert err.errno == errno.EACCES
    message = str(err)
    assert str(run / "run.json") in message and "not writable" in message and "permission denied" in message
    assert (run / "run.json").read_text() == "old"
    assert sorted(p.name for p in run.iterdir()) == ["run.json"]  # no temp file left behind


def test_reading_an_unreadable_file_names_the_path(tmp_path, monkeypatch):
    run = tmp_path / "run"
    run.mkdir()
    (run / "run.json").write_text("{}")
    (run / "run.json").chmod(0o000)
    try:
        if os.access(run / "run.json", os.R_OK):
            _refuse_open(monkeypatch, run, writing=False, exc=PermissionError(errno.EACCES, "Permission denied"))
        with pytest.raises(PermissionError) as info:
            Storage(str(run)).read_text("run.json")
        monkeypatch.undo()
    finally:
        (run / "run.json").chmod(0o600)
    message = str(info.value)
    assert isinstance(info.value, StoragePermissionError)
    assert str(run / "run.json") in message and "not readable" in message


def test_a_full_disk_says_so_and_keeps_the_old_file(tmp_path, monkeypatch):
    run = tmp_path / "run"
    run.mkdir()
    (run / "run.json").write_text("old")

    def fsync(fd: int) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", fsync)
    with pytest.raises(StorageError) as info:
        Storage(str(run)).write_text("run.json", "new" * 1000)
    monkeypatch.undo()
    err = info.value
    assert err.errno == errno.ENOSPC and not isinstance(err, PermissionError)
    message = str(err)
    assert "disk is full" in message and str(run / "run.json") in message
    assert (run / "run.json").read_text() == "old"
    assert sorted(p.name for p in run.iterdir()) == ["run.json"]


def test_other_local_errors_pass_through_unchanged(tmp_path):
    store = Storage(str(tmp_path))
    with pytest.raises(FileNotFoundError) as info:
        store.read_bytes("missing")
    assert not isinstance(info.value, StorageError)
    with pytest.raises(ValueError, match="escapes"):
        store.write_bytes("../outside", b"x")


# -------------------------------------------------------------- classification
def _client_error(code: str, status: int):
    from botocore.exceptions import ClientError

    return ClientError({"Error": {"Code": code, "Message": code}, "ResponseMetadata": {"HTTPStatusCode": status}}, "Op")


def _translated(code: str, status: int) -> BaseException:
    from s3fs.errors import translate_boto_error

    return translate_boto_error(_client_error(code, status))


def _transient_cases() -> list[tuple[str, Callable[[], BaseException], bool]]:
    import aiohttp
    from botocore.exceptions import EndpointConnectionError, ReadTimeoutError

    return [
        ("connection refused", lambda: ConnectionRefusedError(errno.ECONNREFUSED, "refused"), True),
        ("connection reset", lambda: ConnectionResetError(errno.ECONNRESET, "reset"), True),
        ("timeout", lambda: TimeoutError("timed out"), True),
        ("botocore endpoint", lambda: EndpointConnectionError(endpoint_url="http://x"), True),
        ("botocore read timeout", lambda: ReadTimeoutError(endpoint_url="http://x"), True),
        ("aiohttp disconnect", lambda: aiohttp.ServerDisconnectedError(), True),
        ("SlowDown", lambda: _client_error("SlowDown", 503), True),
        ("InternalError", lambda: _client_error("InternalError", 500), True),
        ("502 unknown code", lambda: _client_error("BadGateway", 502), True),
        ("429", lambda: _client_error("TooManyRequests", 429), True),
        ("s3fs SlowDown", lambda: _translated("SlowDown", 503), True),
        ("s3fs 504 as EIO", lambda: _translated("GatewayTimeout", 504), True),
        ("NoSuchKey", lambda: _client_error("NoSuchKey", 404), False),
        ("AccessDenied", lambda: _client_error("AccessDenied", 403), False),
        ("s3fs NoSuchKey", lambda: _translated("NoSuchKey", 404), False),
        ("s3fs AccessDenied", lambda: _translated("AccessDenied", 403), False),
        ("s3fs 400 as EINVAL", lambda: _translated("InvalidArgument", 400), False),
        ("FileNotFoundError", lambda: FileNotFoundError(errno.ENOENT, "gone"), False),
        ("PermissionError", lambda: PermissionError(errno.EACCES, "no"), False),
        ("ValueError", lambda: ValueError("bad"), False),
        ("disk full", lambda: OSError(errno.ENOSPC, "full"), False),
        ("StorageError", lambda: StorageError("given up"), False),
        ("RuntimeError", lambda: RuntimeError("bug"), False),
    ]


def test_only_transient_errors_are_retried():
    pytest.importorskip("botocore")
    pytest.importorskip("s3fs")
    wrong = [name for name, make, expected in _transient_cases() if is_transient(make()) is not expected]
    assert wrong == []


def test_retry_policy_defaults_ride_out_two_minutes_and_the_environment_overrides(monkeypatch):
    for key in ("MEMSHARD_STORAGE_RETRIES", "MEMSHARD_STORAGE_BACKOFF", "MEMSHARD_STORAGE_BACKOFF_MAX"):
        monkeypatch.delenv(key, raising=False)
    policy = RetryPolicy.from_env()
    assert (policy.attempts, policy.base, policy.max_delay) == (RETRY_ATTEMPTS, BACKOFF_BASE, BACKOFF_MAX)
    waits = [RetryPolicy(policy.attempts, policy.base, policy.max_delay, jitter=0).delay(i) for i in range(1, 10)]
    assert waits[:3] == [0.5, 1.0, 2.0] and max(waits) == 30.0
    assert sum(waits[: policy.attempts - 1]) >= 120  # an outage of about two minutes is waited out
    assert all(policy.delay(3) <= 2.0 * 1.25 for _ in range(50))

    monkeypatch.setenv("MEMSHARD_STORAGE_RETRIES", "4")
    monkeypatch.setenv("MEMSHARD_STORAGE_BACKOFF", "0.1")
    monkeypatch.setenv("MEMSHARD_STORAGE_BACKOFF_MAX", "2")
    policy = RetryPolicy.from_env()
    assert (policy.attempts, policy.base, policy.max_delay) == (4, 0.1, 2.0)
    monkeypatch.setenv("MEMSHARD_STORAGE_RETRIES", "lots")
    with pytest.raises(ValueError, match="MEMSHARD_STORAGE_RETRIES"):
        RetryPolicy.from_env()
    monkeypatch.setenv("MEMSHARD_STORAGE_RETRIES", "0")
    with pytest.raises(ValueError, match="attempts must be >= 1"):
        RetryPolicy.from_env()


@pytest.mark.ray
def test_a_training_run_on_s3_survives_the_server_going_away_mid_run(ray_cluster, s3, tmp_path):
    """S3 stops for a few seconds after round 1 is committed and comes back on the same port.

    The run either rides the outage out (retries) or fails cleanly and resumes; either way it
    ends with every file its manifest names present and weights equal to an undisturbed run.
    """
    from memshard.config import load_config
    from memshard.data import prepare
    from memshard.runtime.driver import train
    from memshard.testing.chaos import same_weights
    from tests.conftest import TINY

    cfg0 = load_config("demo")
    data = f"s3://{s3.bucket}/data/digits.parquet"
    prepare("digits", data, image_size=cfg0.data.image_size, channels=cfg0.data.channels, limit=64)
    common = [*TINY, "train.rounds=3", "data.source=null", f"data.path={data}", "logging.tensorboard=false"]
    run = f"s3://{s3.bucket}/runs/outage"
    outage: dict[str, float] = {}

    def cut() -> None:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            try:
                import json

                if json.loads(s3.get("runs/outage/run.json"))["rounds_completed"] >= 1:
                    break
            except Exception:  # not there yet
                pass
            time.sleep(0.1)
        else:
            return
        s3.stop()
        outage["stopped"] = time.monotonic()
        time.sleep(4.0)
        s3.start()
        outage["restarted"] = time.monotonic()

    thread = threading.Thread(target=cut, daemon=True)
    thread.start()
    failed: BaseException | None = None
    try:
        train(load_config("demo", common), out=run)
    except Exception as exc:  # a clean failure is allowed: then resume must finish the run
        failed = exc
    thread.join(timeout=60)
    assert "restarted" in outage, "the outage never happened (did the run end before round 1 was read back?)"
    if failed is not None:
        train(load_config("demo", common), out=run, resume=True)
    manifest = RunDir(run).manifest()
    assert manifest is not None and manifest["rounds_completed"] == 3
    store = RunDir(run).store
    for r in range(4):  # every round the manifest commits is readable
        RunDir(run).load_weights(r)
    assert store.exists("served/model_index.json")
    local = str(tmp_path / "undisturbed")
    train(load_config("demo", common), out=local)
    assert same_weights(run, local, 3) == []
