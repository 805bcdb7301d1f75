"""Per-dataset caches of what a text-to-image UNet is conditioned on and trained in.

A frozen text encoder (and, for latent models, a frozen VAE) gives the same output for the
same row every time, so it is run once per dataset, not once per step: Ray tasks over id
chunks write Parquet parts (``id`` plus fixed-shape tensors as bytes) under a cache
directory keyed by the dataset's files and the encoder, and a ``cache.json`` written LAST
marks the cache complete (an interrupted build is simply rebuilt). Shard actors then read
only their own ids from the cache, with the same filtered Parquet reads as the images, so
it works the same for local paths and s3://.

Layout: ``<cache_dir or <data>.memshard-cache>/<kind>-<key>/{part-00000.parquet, ..., empty.safetensors, cache.json}``.
"""

from __future__ import annotations

import hashlib
import io
import json
import posixpath
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import ray
import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from memshard.config import MemshardConfig
from memshard.data import DataError, load_captions, load_columns, load_rows
from memshard.io.storage import Storage, filesystem
from memshard.models.text import TextCond, load_text_encoder
from memshard.runtime.tasks import remote_call

CACHE_VERSION = 1


def text_encoder_name(cfg: MemshardConfig) -> str:
    """What ``model.text_encoder`` resolves to (``pipeline`` = the fine-tuned pipeline's own encoder)."""
    return cfg.model.pipeline if cfg.model.text_encoder == "pipeline" else cfg.model.text_encoder


def is_latent(cfg: MemshardConfig) -> bool:
    """Latent diffusion: a pipeline to fine-tune whose directory has a VAE."""
    if cfg.model.pipeline is None:
        return False
    return Storage(cfg.model.pipeline).exists("vae/config.json")


def _fingerprint(data_uri: str) -> str:
    """Files, sizes and modification times of the dataset: a changed dataset gets a new cache."""
    fs, path = filesystem(data_uri)
    files = sorted(fs.find(path)) if fs.isdir(path) else [path]
    parts = []
    for f in files:
        if f.endswith(".parquet"):
            info = fs.info(f)
            parts.append(f"{posixpath.basename(f)}:{info.get('size')}:{info.get('mtime') or info.get('LastModified')}")
    return "|".join(parts)


def cache_uri(cfg: MemshardConfig, data_uri: str, kind: str) -> str:
    """Where the ``kind`` (text | latent) cache of this dataset and encoder lives."""
    if kind == "text":
        what = f"text:{text_encoder_name(cfg)}:{cfg.model.max_text_length}"
    else:
        what = f"latent:{cfg.model.pipeline}:{cfg.data.image_size}:{cfg.data.channels}"
    key = hashlib.sha256(f"v{CACHE_VERSION}|{what}|{_fingerprint(data_uri)}".encode()).hexdigest()[:16]
    root = cfg.data.cache_dir or data_uri.rstrip("/") + ".memshard-cache"
    return Storage(root).uri_of(f"{kind}-{key}")


def _tensor_bytes(t: torch.Tensor) -> list[bytes]:
    arr = t.contiguous().numpy()
    return [row.tobytes() for row in arr]


def _write_part(store: Storage, index: int, columns: dict[str, Any]) -> None:
    buf = io.BytesIO()
    pq.write_table(pa.table(columns), buf)
    store.write_bytes(f"part-{index:05d}.parquet", buf.getvalue())


def _encode_text_chunk(cfg_json: str, data_uri: str, cache: str, index: int, ids: np.ndarray) -> int:
    cfg = MemshardConfig.model_validate_json(cfg_json)
    captions = load_captions(data_uri, ids)
    enc = load_text_encoder(text_encoder_name(cfg), cfg.model.max_text_length)
    cond = enc.encode(captions)
    _write_part(
        Storage(cache),
        index,
        {
            "id": pa.array(ids, type=pa.int64()),
            "states": pa.array(_tensor_bytes(cond.states.to(torch.float16)), type=pa.binary()),
            "mask": pa.array(_tensor_bytes(cond.mask.to(torch.uint8)), type=pa.binary()),
        },
    )
    return len(ids)


def _encode_latent_chunk(cfg_json: str, data_uri: str, cache: str, index: int, ids: np.ndarray) -> int:
    cfg = MemshardConfig.model_validate_json(cfg_json)
    vae = load_vae(cfg.model.pipeline)
    _, images, _ = load_rows(data_uri, ids, cfg.data.image_size, cfg.data.channels)
    x = torch.from_numpy(images).float().div(127.5).sub(1.0)
    with torch.no_grad():
        lat = torch.cat([vae.encode(x[i : i + 16]).latent_dist.mean for i in range(0, len(x), 16)])
    lat = lat * vae.config.scaling_factor
    _write_part(
        Storage(cache),
        index,
        {"id": pa.array(ids, type=pa.int64()), "latent": pa.array(_tensor_bytes(lat.float()), type=pa.binary())},
    )
    return len(ids)


def load_vae(pipeline_dir: str) -> Any:
    from diffusers import AutoencoderKL

    with Storage(pipeline_dir).local_copy("vae") as local:
        vae = AutoencoderKL.from_pretrained(local, low_cpu_mem_usage=False, use_safetensors=True)
        return vae.eval().requires_grad_(False)


@dataclass
class Caches:
    """URIs of the complete caches a run reads (None where the model does not need one)."""

    text: str | None = None
    latent: str | None = None

    def as_dict(self) -> dict[str, str | None]:
        return {"text": self.text, "latent": self.latent}


def build_caches(cfg: MemshardConfig, data_uri: str, ids: np.ndarray, in_process: bool = False) -> Caches:
    """Make sure the text (and latent) caches for ``ids`` exist; build what is missing, in parallel."""
    out = Caches()
    if not cfg.model.text_conditional:
        return out
    chunk = cfg.data.validate_rows_per_task
    jobs = [("text", _encode_text_chunk)]
    if is_latent(cfg):
        jobs.append(("latent", _encode_latent_chunk))
    cfg_json = cfg.model_dump_json()
    for kind, encode in jobs:
        uri = cache_uri(cfg, data_uri, kind)
        store = Storage(uri)
        ids_sha = hashlib.sha256(np.ascontiguousarray(ids, dtype=np.int64).tobytes()).hexdigest()
        if store.exists("cache.json") and json.loads(store.read_text("cache.json")).get("ids_sha256") == ids_sha:
            setattr(out, kind, uri)
            continue
        store.remove("")
        chunks = [ids[i : i + chunk] for i in range(0, len(ids), chunk)]
        if not in_process:
            ray.get([remote_call(encode, cfg_json, data_uri, uri, i, c) for i, c in enumerate(chunks)])
        else:
            for i, c in enumerate(chunks):
                encode(cfg_json, data_uri, uri, i, c)
        meta: dict[str, Any] = {
            "version": CACHE_VERSION,
            "kind": kind,
            "num_rows": len(ids),
            "ids_sha256": ids_sha,
            "parts": len(chunks),
        }
        if kind == "text":
            enc = load_text_encoder(text_encoder_name(cfg), cfg.model.max_text_length)
            empty = enc.encode([""])
            store.write_bytes("empty.safetensors", st_save({"states": empty.states, "mask": empty.mask}))
            meta.update(encoder=enc.name, encoder_kind=enc.kind, dim=enc.dim, max_length=enc.max_length)
        store.write_text("cache.json", json.dumps(meta, indent=2))  # last: the cache is complete
        setattr(out, kind, uri)
    return out


def cache_meta(uri: str) -> dict[str, Any]:
    store = Storage(uri)
    if not store.exists("cache.json"):
        raise DataError(f"condition cache {uri} is incomplete (no cache.json); rerun training to rebuild it")
    return json.loads(store.read_text("cache.json"))


def load_text(uri: str, ids: np.ndarray) -> TextCond:
    """Cached caption states (float16) and masks of ``ids``, in order."""
    meta = cache_meta(uri)
    table = load_columns(uri, ids, ["states", "mask"])
    length, dim = int(meta["max_length"]), int(meta["dim"])
    states = np.frombuffer(b"".join(table.column("states").to_pylist()), dtype=np.float16).reshape(-1, length, dim)
    mask = np.frombuffer(b"".join(table.column("mask").to_pylist()), dtype=np.uint8).reshape(-1, length)
    return TextCond(torch.from_numpy(states.copy()), torch.from_numpy(mask.astype(bool)))


def load_empty(uri: str) -> TextCond:
    """The empty prompt's states (1, L, D): what caption dropout substitutes."""
    got = st_load(Storage(uri).read_bytes("empty.safetensors"))
    return TextCond(got["states"].float(), got["mask"].bool())


def load_latents(uri: str, ids: np.ndarray, shape: tuple[int, int, int]) -> torch.Tensor:
    """Cached, scaled VAE latents (N, C, h, w) float32 of ``ids``, in order."""
    table = load_columns(uri, ids, ["latent"])
    flat = np.frombuffer(b"".join(table.column("latent").to_pylist()), dtype=np.float32)
    return torch.from_numpy(flat.reshape(-1, *shape).copy())
