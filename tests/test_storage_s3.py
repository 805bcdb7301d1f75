"""Runs on S3: data and run directory on a real S3 API (moto server on loopback), resume from it,
and credentials that reach the workers without landing in a log, a manifest or a printed config.
"""

from __future__ import annotations

import json
import os
import uuid
from pathlib import Path

import pytest
import torch

from memshard.config import load_config
from memshard.data import prepare
from memshard.io.rundir import RunDir
from memshard.io.storage import S3Access, Storage, access_installed, s3_options
from memshard.runtime.driver import train
from tests.conftest import TINY

CREDENTIAL_ENV = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "MEMSHARD_S3_ENDPOINT_URL")


def test_config_settings_override_the_environment_and_secrets_stay_out_of_dumps(monkeypatch):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "env-key")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "env-secret")
    monkeypatch.setenv("AWS_REGION", "eu-west-1")
    monkeypatch.delenv("AWS_SESSION_TOKEN", raising=False)
    secret = f"cfg-secret-{uuid.uuid4().hex}"
    cfg = load_config(
        "demo",
        [
            "storage.endpoint_url=http://127.0.0.1:9",
            "storage.access_key_id=cfg-key",
            f"storage.secret_access_key={secret}",
        ],
    )
    access = S3Access.resolve(cfg.storage)
    assert (access.access_key_id, access.secret_access_key, access.region) == ("cfg-key", secret, "eu-west-1")
    assert access.endpoint_url == "http://127.0.0.1:9"
    for text in (cfg.to_yaml(), cfg.model_dump_json(), repr(cfg), repr(access), str(cfg.storage)):
        assert secret not in text and "cfg-key" not in text  # the key id is masked too
    assert "secret_access_key" not in cfg.to_dict()["storage"]
    # installed for a block only; s3fs gets the credentials explicitly (fsspec's cache is keyed by them)
    with access_installed(access):
        assert os.environ["AWS_SECRET_ACCESS_KEY"] == secret
        opts = s3_options()
        assert (opts["key"], opts["secret"]) == ("cfg-key", secret)
        assert opts["client_kwargs"] == {"endpoint_url": "http://127.0.0.1:9", "region_name": "eu-west-1"}
    assert os.environ["AWS_SECRET_ACCESS_KEY"] == "env-secret"
    assert (
        "MEMSHARD_S3_ENDPOINT_URL" not in os.environ or os.environ["MEMSHARD_S3_ENDPOINT_URL"] != "http://127.0.0.1:9"
    )


@pytest.mark.parametrize(
    ("overrides", "problem"),
    [
        (["storage.access_key_id=AK"], "must be given together"),
        (["storage.secret_access_key=S"], "must be given together"),
        (["storage.endpoint_url=localhost:9000"], "must start with http"),
    ],
)
def test_bad_storage_settings_are_refused(overrides, problem):
    from memshard.config import ConfigError

    with pytest.raises(ConfigError, match=problem):
        load_config("demo", overrides)


def _all_objects(run_uri: str) -> dict[str, bytes]:
    store = Storage(run_uri)
    return {p: store.fs.cat_file(p) for p in store.fs.find(store.root)}


@pytest.mark.ray
def test_full_run_with_data_and_run_dir_on_s3_resumes_from_s3(
    ray_cluster, s3_bucket, s3_server, monkeypatch, capfd, tmp_path
):
    cfg0 = load_config("demo")
    data = f"s3://{s3_bucket}/data/digits.parquet"
    prepare("digits", data, image_size=cfg0.data.image_size, channels=cfg0.data.channels, limit=64)
    # From here on the endpoint and credentials exist only in the config: the driver must install
    # them and hand them to every actor and task (the session's Ray workers never had them).
    for key in CREDENTIAL_ENV:
        monkeypatch.delenv(key, raising=False)
    secret = f"moto-secret-{uuid.uuid4().hex}"
    creds = [
        f"storage.endpoint_url={s3_server}",
        "storage.access_key_id=AKIDMEMSHARD",
        f"storage.secret_access_key={secret}",
    ]
    common = [*TINY, "data.source=null", f"data.path={data}", *creds]
    run = f"s3://{s3_bucket}/runs/r1"

    train(load_config("demo", [*common, "train.rounds=1"]), out=run)
    assert "AWS_SECRET_ACCESS_KEY" not in os.environ  # installed for the call only
    out = train(load_config("demo", common), out=run, resume=True)  # resume reads everything back from S3
    local = str(tmp_path / "local-run")
    train(load_config("demo", common), out=local)  # the same run in one go, run dir on local disk
    with access_installed(S3Access.resolve(load_config("demo", creds).storage)):
        objects = _all_objects(run)
        manifest = json.loads(Storage(run).read_text("run.json"))
        s3_weights, _ = RunDir(run).load_weights(2)
        with Storage(run).local_copy("served") as served_dir:
            from diffusers import DDPMPipeline

            pipe = DDPMPipeline.from_pretrained(served_dir)
            assert pipe.unet.config.sample_size == cfg0.data.image_size
    ref, _ = RunDir(local).load_weights(2)
    assert manifest["rounds_completed"] == 2 and manifest["data_uri"] == data
    assert (out.run_uri, out.served, out.complete) == (run, f"{run}/served", True)
    assert sorted(s3_weights) == sorted(ref)
    for name in ref:  # resumed-from-S3 == uninterrupted on local disk, bit for bit
        assert torch.equal(s3_weights[name], ref[name]), name

    # the secret is nowhere: not in the run's objects, not in what was printed, not in Ray's logs
    assert not [k for k, v in objects.items() if secret.encode() in v]
    printed = capfd.readouterr()
    assert secret not in printed.out and secret not in printed.err
    import ray

    logs = Path(ray._private.worker._global_node.get_logs_dir_path())
    leaked = [p.name for p in logs.rglob("*") if p.is_file() and secret.encode() in p.read_bytes()]
    assert leaked == []
