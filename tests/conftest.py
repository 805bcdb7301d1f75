import importlib.util
import os
import socket
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")


@pytest.fixture(scope="session")
def ray_cluster():
    """One real local Ray cluster for the whole session (about 3 s to start)."""
    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=2, include_dashboard=False, object_store_memory=300 * 1024 * 1024, log_to_driver=False)
    yield ray
    ray.shutdown()


TINY = [
    "data.limit=48",
    "shards.count=2",
    "train.rounds=2",
    "train.steps_per_round=3",
    "train.batch_size=8",
    "train.warmup_steps=2",
    "resources.cpus_per_shard=0.5",
    "logging.progress=false",
]


@pytest.fixture(scope="session")
def real_emoji():
    """The fetched emoji package; skipped locally when absent, a failure in CI (setup.sh must have fetched it)."""
    from memshard.data import DataError
    from memshard.data.fetch import emoji_dir

    try:
        return emoji_dir()
    except DataError as exc:
        if os.environ.get("CI"):
            pytest.fail(f"CI is set but the emoji set was not fetched by scripts/setup.sh: {exc}")
        pytest.skip(f"emoji set not fetched (run `python -m memshard.data.fetch emoji`): {exc}")


S3_TEST_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
}


@pytest.fixture
def s3_server() -> Iterator[str]:
    """A real S3 API on loopback (moto's server mode on a free port); yields its endpoint URL."""
    server_mod = pytest.importorskip("moto.server")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = server_mod.ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.stop()


@pytest.fixture
def s3_bucket(s3_server: str, monkeypatch: pytest.MonkeyPatch) -> str:
    """A fresh bucket on ``s3_server``, with endpoint and test credentials in this process's environment."""
    boto3 = pytest.importorskip("boto3")
    for key, value in {**S3_TEST_ENV, "MEMSHARD_S3_ENDPOINT_URL": s3_server}.items():
        monkeypatch.setenv(key, value)
    bucket = f"memshard-{uuid.uuid4().hex[:8]}"
    boto3.client("s3", endpoint_url=s3_server, region_name="us-east-1").create_bucket(Bucket=bucket)
    return bucket


def load_job(name: str) -> ModuleType:
    """The benchmark/job script ``jobs/<name>.py`` as a module (jobs/ is not a package)."""
    path = Path(__file__).resolve().parents[1] / "jobs" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod
