"""The run directory: committed rounds, the manifest, and the atomic swap RUN/served is published with.

Layout (RUN may be a local path or s3://)::

    RUN/run.json                          manifest: config, rounds_completed, per-round metrics
    RUN/data/<source>.parquet             a built-in dataset prepared for this run
    RUN/shards/round-XXXX.parquet         assignment id -> shard after round XXXX (0000 = initial split)
    RUN/stats/round-XXXX.parquet          per-sample statistics of round XXXX
    RUN/rounds/XXXX/global.safetensors    aggregated raw weights after round XXXX (0000 = initial weights)
    RUN/rounds/XXXX/ema.safetensors       aggregated EMA weights
    RUN/rounds/XXXX/proxies/shard-NNN.*   per-proxy optimizer / bank / step state
    RUN/served/                           latest aggregated model as a diffusers DDPMPipeline directory

Commit protocol: everything of round r is written first, the manifest (``rounds_completed =
r``) last. Readers trust only the manifest, so a crash mid-round leaves at worst files of
an uncommitted round, which the redo overwrites. ``served/`` is derived data: it is
rebuilt from the last committed round on resume, so a crash while publishing it cannot
lose the model.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import time
import uuid
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from memshard.config import split_init_from
from memshard.io.storage import Storage
from memshard.io.weights import (
    Shapes,
    StateDict,
    check_model_dir,
    check_shapes,
    shapes_of,
)

MANIFEST = "run.json"
FORMAT_VERSION = 1


def round_name(r: int) -> str:
    return f"{r:04d}"


def _contiguous(state: StateDict) -> StateDict:
    return {k: torch.as_tensor(v).detach().cpu().contiguous() for k, v in state.items()}


def table_bytes(columns: dict[str, Any]) -> bytes:
    buf = io.BytesIO()
    pq.write_table(pa.table(columns), buf)
    return buf.getvalue()


class RunDir:
    """Typed access to one run directory."""

    def __init__(self, uri: str) -> None:
        self.uri = uri
        self.store = Storage(uri)

    # --------------------------------------------------------------- manifest
    def manifest(self) -> dict[str, Any] | None:
        if not self.store.exists(MANIFEST):
            return None
        return json.loads(self.store.read_text(MANIFEST))

    def write_manifest(self, manifest: dict[str, Any]) -> None:
        manifest = dict(manifest, format_version=FORMAT_VERSION, updated=time.time())
        self.store.write_text(MANIFEST, json.dumps(manifest, indent=2, default=json_default))

    def rounds_completed(self) -> int:
        m = self.manifest()
        return int(m["rounds_completed"]) if m else -1

    # ---------------------------------------------------------------- weights
    def save_weights(self, r: int, raw: StateDict, ema: StateDict | None) -> None:
        base = f"rounds/{round_name(r)}"
        self.store.write_bytes(f"{base}/global.safetensors", st_save(_contiguous(raw)))
        if ema is not None:
            self.store.write_bytes(f"{base}/ema.safetensors", st_save(_contiguous(ema)))

    def load_weights(self, r: int, expected: Shapes | None = None) -> tuple[StateDict, StateDict | None]:
        """Raw and EMA weights committed after round r; ``expected`` (name -> shape, the config's UNet) checks them."""
        base = f"rounds/{round_name(r)}"
        raw = st_load(self.store.read_bytes(f"{base}/global.safetensors"))
        ema = (
            st_load(self.store.read_bytes(f"{base}/ema.safetensors"))
            if self.store.exists(f"{base}/ema.safetensors")
            else None
        )
        if expected is not None:
            for name, state in (("global", raw), ("ema", ema)):
                if state is not None:
                    check_shapes(
                        expected, shapes_of(state), f"run {self.uri}: {base}/{name}.safetensors", "the config's UNet"
                    )
        return raw, ema

    def check_served(self) -> None:
        """Refuse a served model whose UNet weights are not safetensors or do not fit its config (WeightsError)."""
        if not self.store.exists("served/model_index.json"):
            raise FileNotFoundError(f"{self.uri}: no served model (RUN/served/model_index.json missing)")
        for sub in ("unet", "unet_raw"):
            if sub == "unet" or self.store.exists(f"served/{sub}"):
                check_model_dir(self.store, f"served/{sub}", f"run {self.uri}")

    def save_proxy_state(self, r: int, shard: int, tensors: StateDict, meta: dict[str, Any]) -> None:
        base = f"rounds/{round_name(r)}/proxies/shard-{shard:03d}"
        self.store.write_bytes(f"{base}.safetensors", st_save(_contiguous(tensors)))
        self.store.write_text(f"{base}.json", json.dumps(meta, default=json_default))

    def load_proxy_state(self, r: int, shard: int) -> tuple[StateDict, dict[str, Any]]:
        base = f"rounds/{round_name(r)}/proxies/shard-{shard:03d}"
        return st_load(self.store.read_bytes(f"{base}.safetensors")), json.loads(self.store.read_text(f"{base}.json"))

    # ------------------------------------------------------------- assignment
    def write_assignment(self, r: int, ids: np.ndarray, shards: np.ndarray) -> None:
        order = np.argsort(ids, kind="stable")
        cols = {"id": np.asarray(ids, dtype=np.int64)[order], "shard": np.asarray(shards, dtype=np.int32)[order]}
        self.store.write_bytes(f"shards/round-{round_name(r)}.parquet", table_bytes(cols))

    def read_assignment(self, r: int, shard: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(ids, shards) of the assignment after round r, optionally only one shard's rows."""
        with self.store.open_input(f"shards/round-{round_name(r)}.parquet") as fh:
            filters = [("shard", "=", shard)] if shard is not None else None
            table = pq.read_table(fh, filters=filters)
        return table.column("id").to_numpy(), table.column("shard").to_numpy()

    def write_stats(self, r: int, columns: dict[str, np.ndarray]) -> None:
        self.store.write_bytes(f"stats/round-{round_name(r)}.parquet", table_bytes(columns))

    def read_stats(self, r: int) -> pa.Table:
        with self.store.open_input(f"stats/round-{round_name(r)}.parquet") as fh:
            return pq.read_table(fh)

    # ------------------------------------------------------------ migrations
    def write_migrations(self, r: int, columns: dict[str, np.ndarray]) -> None:
        """RUN/migrations/round-XXXX.parquet: the moves planned after round r (id, from_shard, to_shard, ...)."""
        self.store.write_bytes(f"migrations/round-{round_name(r)}.parquet", table_bytes(columns))

    def read_migrations(self, r: int) -> pa.Table | None:
        rel = f"migrations/round-{round_name(r)}.parquet"
        if not self.store.exists(rel):
            return None
        with self.store.open_input(rel) as fh:
            return pq.read_table(fh)

    def write_ledger(self, r: int, ids: np.ndarray, since_move: np.ndarray, by_shard: np.ndarray) -> None:
        """RUN/msr/ledger-XXXX.parquet: MSR's skip counters after round r (so a restart resumes them)."""
        k = by_shard.shape[1]
        flat = pa.array(np.ascontiguousarray(by_shard, dtype=np.int64).reshape(-1))
        cols = {
            "id": ids,
            "skips_since_move": since_move,
            "shard_skips": pa.FixedSizeListArray.from_arrays(flat, k),
        }
        self.store.write_bytes(f"msr/ledger-{round_name(r)}.parquet", table_bytes(cols))

    def read_ledger(self, r: int) -> dict[str, np.ndarray] | None:
        rel = f"msr/ledger-{round_name(r)}.parquet"
        if not self.store.exists(rel):
            return None
        with self.store.open_input(rel) as fh:
            t = pq.read_table(fh)
        col = t.column("shard_skips").combine_chunks()
        k = col.type.list_size
        return {
            "id": t.column("id").to_numpy(),
            "skips_since_move": t.column("skips_since_move").to_numpy(),
            "shard_skips": col.flatten().to_numpy().reshape(-1, k),
        }

    # ----------------------------------------------------------------- served
    # RUN/served is written by memshard.serving.publish (it builds diffusers pipelines, which
    # this module, a layer below the models, does not know about); swap_in is its atomic step.
    def swap_in(self, local_dir: str, rel: str) -> None:
        if not self.store.local:
            self.store.put_dir(local_dir, rel)
            return
        target = self.store.path(rel)
        staged = f"{target}.new-{uuid.uuid4().hex[:8]}"
        shutil.copytree(local_dir, staged)
        old = f"{target}.old-{uuid.uuid4().hex[:8]}"
        if os.path.exists(target):
            os.replace(target, old)
        os.replace(staged, target)
        shutil.rmtree(old, ignore_errors=True)

    # ----------------------------------------------------------- housekeeping
    def discard_uncommitted(self, committed: int) -> None:
        """Remove files of rounds after ``committed`` (left by a crash before the manifest)."""
        for name in self.store.listdir("rounds"):
            if name.isdigit() and int(name) > committed:
                self.store.remove(f"rounds/{name}")
        for sub in ("shards", "stats", "migrations", "msr"):
            for name in self.store.listdir(sub):
                stem = name.removeprefix("round-").removeprefix("ledger-").removesuffix(".parquet")
                if stem.isdigit() and int(stem) > committed:
                    self.store.remove(f"{sub}/{name}")


def training_through(manifest: dict[str, Any], r: int) -> dict[str, float]:
    """Optimizer steps (all shards) and training wall time up to and including round r.

    A warm-started run (``train.init_from``) counts the steps and time of the weights it started
    from (manifest ``init``): its round 0 is not free, and comparisons in steps must see that.
    """
    init = manifest.get("init") or {}
    rounds = [s for s in manifest.get("rounds", []) if int(s["round"]) <= r]
    return {
        "train_steps": int(init.get("steps", 0)) + int(sum(s["steps"] for s in rounds)),
        "train_wall_s": float(init.get("wall_s", 0.0)) + float(sum(s["round_s"] for s in rounds)),
    }


@dataclass
class WarmStart:
    """Round-0 weights taken from a committed round of an earlier run (``train.init_from``)."""

    uri: str
    round: int
    raw: StateDict
    ema: StateDict | None
    steps: int
    wall_s: float

    def manifest_entry(self) -> dict[str, Any]:
        return {"from": self.uri, "round": self.round, "steps": self.steps, "wall_s": self.wall_s}


def load_warm_start(spec: str, expected: Shapes) -> WarmStart:
    """The weights ``spec`` (``train.init_from``: RUN or RUN@ROUND) names, checked against ``expected``.

    Raises ValueError naming the problem (no run there, a round it has not committed, weights of
    another model) so that a bad warm start is refused before any training.
    """
    uri, round_id = split_init_from(spec)
    src = RunDir(uri)
    manifest = src.manifest()
    if manifest is None:
        raise ValueError(f"train.init_from={spec!r}: {uri} holds no run (no {MANIFEST})")
    done = int(manifest["rounds_completed"])
    r = done if round_id is None else round_id
    if r > done:
        raise ValueError(f"train.init_from={spec!r}: that run has committed {done} round(s), not round {r}")
    try:
        raw, ema = src.load_weights(r, expected=expected)
    except ValueError as exc:
        raise ValueError(f"train.init_from={spec!r}: {exc}") from None
    so_far = training_through(manifest, r)
    return WarmStart(uri, r, raw, ema, int(so_far["train_steps"]), float(so_far["train_wall_s"]))


def json_default(obj: Any) -> Any:
    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, np.floating):
        return float(obj)
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")
