import os

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
