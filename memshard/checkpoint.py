"""The run directory: committed rounds, the manifest, and the served model.

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
import struct
import tempfile
import time
import uuid
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from .storage import Storage

MANIFEST = "run.json"
FORMAT_VERSION = 1

StateDict = dict[str, torch.Tensor]
Shapes = Mapping[str, Sequence[int]]

# The only weight files memshard reads; anything else beside them (a planted pickle `.bin`) is never opened.
WEIGHTS_SAFETENSORS = ("diffusion_pytorch_model.safetensors", "model.safetensors")
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
_MAX_HEADER = 100 * 2**20


class WeightsError(ValueError):
    """Weights that do not fit the model they are loaded into, or are not stored as safetensors."""


def shapes_of(state: Mapping[str, Any]) -> dict[str, tuple[int, ...]]:
    return {k: tuple(int(d) for d in torch.as_tensor(v).shape) for k, v in state.items()}


def check_shapes(expected: Shapes, got: Shapes, source: str, target: str = "the model") -> None:
    """Raise WeightsError naming ``source`` and the first mismatching tensor unless ``got`` fits ``expected``."""
    missing = sorted(set(expected) - set(got))
    extra = sorted(set(got) - set(expected))
    wrong = [k for k in sorted(set(expected) & set(got)) if tuple(got[k]) != tuple(expected[k])]
    if not (missing or extra or wrong):
        return
    parts = []
    if wrong:
        k = wrong[0]
        more = f" (and {len(wrong) - 1} more tensor(s) of the wrong shape)" if len(wrong) > 1 else ""
        parts.append(f"tensor {k!r} has shape {tuple(got[k])} but {target} needs {tuple(expected[k])}{more}")
    if missing:
        parts.append(f"{len(missing)} tensor(s) {target} needs are missing (first: {missing[0]!r})")
    if extra:
        parts.append(f"{len(extra)} tensor(s) {target} does not have (first: {extra[0]!r})")
    raise WeightsError(
        f"{source}: weights do not fit {target}: " + "; ".join(parts) + " (another run's or model's weights, "
        "or a config or model directory changed since they were written?)"
    )


def load_checked(module: torch.nn.Module, state: Mapping[str, Any], source: str) -> None:
    """``module.load_state_dict(state)``, but a mismatch is a WeightsError naming ``source`` and the tensor."""
    check_shapes(shapes_of(module.state_dict()), shapes_of(state), source, f"the {type(module).__name__}")
    module.load_state_dict({k: torch.as_tensor(v) for k, v in state.items()})


def model_shapes(cls: type, config: Mapping[str, Any]) -> dict[str, tuple[int, ...]]:
    """Tensor shapes of ``cls(**config)``, built on the meta device (no memory, no weights read)."""
    with torch.device("meta"):
        model = cls.from_config(dict(config)) if hasattr(cls, "from_config") else cls(**config)
    return shapes_of(model.state_dict())


def safetensors_shapes(store: Storage, rel: str) -> dict[str, tuple[int, ...]]:
    """Tensor shapes from a safetensors file's header only (8 + header bytes read, local or remote)."""
    with store.open_input(rel) as fh:
        head = fh.read(8)
        n = struct.unpack("<Q", head)[0] if len(head) == 8 else -1
        if not 0 < n <= _MAX_HEADER:
            raise WeightsError(f"{store.uri_of(rel)} is not a safetensors file")
        try:
            header = json.loads(fh.read(n))
        except ValueError:
            raise WeightsError(f"{store.uri_of(rel)} is not a safetensors file (unreadable header)") from None
    return {k: tuple(v["shape"]) for k, v in header.items() if k != "__metadata__"}


def check_model_dir(store: Storage, rel: str, what: str) -> None:
    """Check the diffusers model directory ``rel`` of ``store`` before anything loads it.

    Its weights must be safetensors (memshard never unpickles a ``.bin``: a planted one is
    ignored, and a directory holding only pickle weights is refused), and their tensor
    shapes must be those of the architecture its ``config.json`` describes.
    """
    import diffusers

    where = store.uri_of(rel)
    if not store.exists(f"{rel}/config.json"):
        raise WeightsError(f"{what}: {where}/config.json is missing")
    conf = json.loads(store.read_text(f"{rel}/config.json"))
    names = store.listdir(rel)
    index = next((f"{n}.index.json" for n in WEIGHTS_SAFETENSORS if f"{n}.index.json" in names), None)
    files = [n for n in WEIGHTS_SAFETENSORS if n in names]
    if index is None and not files:
        pickles = [n for n in names if n.endswith(PICKLE_SUFFIXES)]
        found = f"; found {', '.join(pickles)}, which memshard never loads (pickle can run code)" if pickles else ""
        raise WeightsError(f"{what}: no safetensors weights in {where}{found}")
    got: dict[str, tuple[int, ...]] = {}
    if index is not None:
        weight_map = json.loads(store.read_text(f"{rel}/{index}")).get("weight_map", {})
        for shard in sorted(set(weight_map.values())):
            if not shard.endswith(".safetensors"):
                raise WeightsError(f"{what}: {where}/{index} points at {shard}, not a safetensors file")
            got.update(safetensors_shapes(store, f"{rel}/{shard}"))
    else:
        got = safetensors_shapes(store, f"{rel}/{files[0]}")
    cls_name = conf.get("_class_name")
    cls = getattr(diffusers, cls_name, None) if isinstance(cls_name, str) else None
    if cls is None or not isinstance(cls, type) or not issubclass(cls, diffusers.ModelMixin):
        return  # not a diffusers model we can rebuild (a transformers text encoder...): safetensors is enough
    try:
        expected = model_shapes(cls, {k: v for k, v in conf.items() if not k.startswith("_")})
    except (TypeError, ValueError) as exc:
        raise WeightsError(f"{what}: {where}/config.json does not describe a valid {cls_name} ({exc})") from None
    check_shapes(expected, got, f"{what}: weights in {where}", f"the {cls_name} of its config.json")


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
        self.store.write_text(MANIFEST, json.dumps(manifest, indent=2, default=_json_default))

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
        self.store.write_text(f"{base}.json", json.dumps(meta, default=_json_default))

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
    def publish_served(
        self,
        unet_config: dict[str, Any],
        scheduler_config: dict[str, Any],
        raw: StateDict,
        ema: StateDict | None,
        info: dict[str, Any],
        model_cfg: dict[str, Any] | None = None,
    ) -> None:
        """Write RUN/served as a pipeline directory (EMA weights when present; raw UNet beside).

        Unconditional / class-conditional models: a DDPMPipeline. Text-conditional ones
        (``model_cfg`` given, the run's ``model`` section): a StableDiffusionPipeline for
        fine-tuned SD-style pipelines, else memshard's text-to-image pipeline.
        """
        from diffusers import DDPMPipeline, DDPMScheduler, UNet2DConditionModel, UNet2DModel

        source = f"run {self.uri}: weights of round {info.get('round')}"
        tmp = tempfile.mkdtemp(prefix="memshard-served-")
        try:
            if model_cfg is not None and model_cfg.get("text_conditional"):
                from .pipeline import write_served_t2i

                unet = UNet2DConditionModel(**unet_config)
                load_checked(unet, ema if ema is not None else raw, source)
                write_served_t2i(tmp, unet, scheduler_config, model_cfg)
            else:
                unet = UNet2DModel(**unet_config)
                load_checked(unet, ema if ema is not None else raw, source)
                pipe = DDPMPipeline(unet=unet, scheduler=DDPMScheduler.from_config(scheduler_config))
                pipe.save_pretrained(tmp, safe_serialization=True)
            if ema is not None:
                load_checked(unet, raw, source)
                unet.save_pretrained(os.path.join(tmp, "unet_raw"), safe_serialization=True)
            with open(os.path.join(tmp, "memshard.json"), "w") as fh:
                json.dump(dict(info, weights="ema" if ema is not None else "raw"), fh, indent=2, default=_json_default)
            self._swap_in(tmp, "served")
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    def _swap_in(self, local_dir: str, rel: str) -> None:
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


def _json_default(obj: Any) -> Any:
    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, np.floating):
        return float(obj)
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")
