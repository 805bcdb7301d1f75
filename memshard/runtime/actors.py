"""Ray shells over the training core: one shard actor per proxy, plus the aggregation task.

The actors hold no logic of their own beyond fault tolerance:

* constructor arguments are small (config JSON, URIs, ids), so a Ray restart
  (``max_restarts``) can always rebuild the actor; the proxy state is reloaded from the
  run directory's last committed round, never kept only in memory;
* ``train_round(r, weights)`` is idempotent per round id: it (re)starts from the state
  committed after round r-1 whenever its in-memory state is not exactly that, so a
  retried call (``max_task_retries``) or a redo after a driver crash gives the same result.
"""

from __future__ import annotations

import os
import time
from typing import Any

import numpy as np
import ray
import torch

from memshard.config import config_from_json
from memshard.data import load_rows
from memshard.data.conditioning import cache_meta, load_empty, load_latents, load_text
from memshard.iet.aggregate import StreamingAverage, shard_weights
from memshard.iet.proxy import NONFINITE_IDS_SHOWN, Proxy, ShardData, resolve_device
from memshard.io.rundir import RunDir
from memshard.io.storage import S3Access, install_access
from memshard.models.text import TextCond
from memshard.models.unet import latent_shape


@ray.remote
class ShardActor:
    """Trains the proxy of one shard, round after round."""

    def __init__(
        self,
        config_json: str,
        run_uri: str,
        data_uri: str,
        shard_id: int,
        coordinator: str,
        access: S3Access | None = None,
    ) -> None:
        install_access(access)  # before anything reads the run directory or the data
        self.cfg = config_from_json(config_json)
        self.run = RunDir(run_uri)
        self.data_uri = data_uri
        self.shard_id = shard_id
        self.coordinator_name = coordinator  # a name, not a handle: restarts need small arguments
        self._coordinator: Any = None
        self.device = resolve_device(self.cfg)
        self.proxy: Proxy | None = None
        self.state_round: int | None = None  # the committed round whose end-state the proxy holds
        self._cache: dict[int, tuple[np.ndarray, int, Any]] = {}  # id -> (image or latent, label, text row)
        self._cache_uris: dict[str, str | None] | None = None

    def ping(self) -> dict[str, Any]:
        return {"pid": os.getpid(), "device": str(self.device), "shard": self.shard_id}

    def _restore(self, committed: int) -> None:
        """Rebuild the proxy as it stood after round ``committed`` (0 = fresh optimizer and bank)."""
        self.proxy = Proxy(self.cfg, self.shard_id, self.device)
        if committed > 0:
            tensors, meta = self.run.load_proxy_state(committed, self.shard_id)
            self.proxy.load_state(tensors, meta)
        self.state_round = committed

    def _shard_data(self, committed: int) -> ShardData:
        """This shard's rows for the next round: the assignment after round ``committed``.

        Decoded images are cached across rounds, so after a migration only the newly
        arrived ids are read from the dataset (by id filter, never the whole dataset).
        """
        ids, _ = self.run.read_assignment(committed, self.shard_id)
        if len(ids) == 0:
            raise RuntimeError(f"shard {self.shard_id} has no samples after round {committed}")
        missing = np.array([i for i in ids.tolist() if i not in self._cache], dtype=np.int64)
        caches = self._caches()
        if len(missing):
            got_ids, images, labels = load_rows(
                self.data_uri, missing, self.cfg.data.image_size, self.cfg.data.channels
            )
            if caches.get("latent"):
                images = load_latents(caches["latent"], got_ids, latent_shape(self.cfg)).numpy()
            text = load_text(caches["text"], got_ids) if caches.get("text") else None
            for j, sid in enumerate(got_ids.tolist()):
                row_text = (text.states[j], text.mask[j]) if text is not None else None
                self._cache[sid] = (images[j], int(labels[j]) if labels is not None else -1, row_text)
        keep = set(ids.tolist())
        for sid in [s for s in self._cache if s not in keep]:
            del self._cache[sid]
        rows = [self._cache[i] for i in ids.tolist()]
        images = torch.from_numpy(np.stack([r[0] for r in rows]))
        labels_np = np.array([r[1] for r in rows], dtype=np.int64)
        labels = torch.from_numpy(labels_np).to(self.device) if (labels_np >= 0).all() else None
        data = ShardData(ids=ids.astype(np.int64), images=images.to(self.device), labels=labels)
        if caches.get("text"):
            data.text = TextCond(torch.stack([r[2][0] for r in rows]), torch.stack([r[2][1] for r in rows]))
            data.text = data.text.to(self.device)
            data.empty_text = load_empty(caches["text"]).to(self.device)
            data.text_mask = cache_meta(caches["text"]).get("encoder_kind") != "clip"
        return data

    def _caches(self) -> dict[str, str | None]:
        """URIs of the condition caches the run was created with (manifest), read once."""
        if self._cache_uris is None:
            self._cache_uris = (self.run.manifest() or {}).get("caches") or {}
        return self._cache_uris

    @ray.method(num_returns=2)
    def train_round(self, round_id: int, global_weights: tuple[dict, dict | None] | None) -> tuple[dict, dict]:
        """Train round ``round_id`` from ``global_weights`` (None: from this proxy's own weights).

        Returns (weights, statistics)."""
        start = time.perf_counter()
        if self.proxy is None or self.state_round != round_id - 1:
            self._restore(round_id - 1)
        t_data = time.perf_counter()
        data = self._shard_data(round_id - 1)
        data_s = time.perf_counter() - t_data  # the step loop never waits for data: it is all on the device
        raw, ema = global_weights if global_weights is not None else (None, None)
        self.proxy.start_round(round_id, raw, ema)

        def progress(done: int, total: int) -> None:
            try:
                if self._coordinator is None:
                    self._coordinator = ray.get_actor(self.coordinator_name)
                self._coordinator.report_progress.remote(self.shard_id, round_id, done, total)
            except Exception:  # progress is best effort; training must not fail for it
                self._coordinator = None

        try:
            result = self.proxy.train_round(round_id, data, on_progress=progress)
        except BaseException:
            # the proxy stopped part-way (e.g. NonFiniteLossError): a retry must reload the committed state
            self.state_round = None
            raise
        train_s = time.perf_counter() - start
        tensors, meta = self.proxy.state()
        self.run.save_proxy_state(round_id, self.shard_id, tensors, meta)
        self.state_round = round_id
        raw_w, ema_w = self.proxy.weights()
        summary = {
            "shard": self.shard_id,
            "size": len(data),
            "steps": result.steps,
            "loss": result.mean_batch_loss,
            "skip_rate": result.skip_rate,
            "extra_steps": result.extra_steps,
            "nonfinite_steps": result.nonfinite_steps,  # skipped for a NaN/inf loss (part of steps)
            "captions_dropped": result.captions_dropped,  # text models: the dropout rate the model saw
            "train_s": train_s,
            "data_s": data_s,  # reading + decoding new rows and moving the shard to the device (part of train_s)
            "compile": self.proxy.model.status,  # off / verified / rejected: <why>
            "images_per_s": result.steps * self.cfg.train.batch_size / max(train_s, 1e-9),
        }
        if result.nonfinite_ids is not None and len(result.nonfinite_ids):
            summary["nonfinite_ids"] = result.nonfinite_ids[:NONFINITE_IDS_SHOWN].tolist()
        return {"raw": raw_w, "ema": ema_w, "size": len(data)}, {"summary": summary, "columns": result.as_columns()}


def aggregate_round(run_uri: str, round_id: int, weight_refs: list[ray.ObjectRef]) -> tuple[dict, dict | None]:
    """Size-weighted average of the proxies, streamed one proxy at a time; commits the weights.

    The refs arrive wrapped in a list so Ray does not resolve them all at once: at most one
    proxy plus the accumulators are in this process's memory. ``num_cpus=0`` because shard
    actors may hold every CPU of a small cluster; a bookkeeping task must still run.
    """
    raw_avg, ema_avg = StreamingAverage(), StreamingAverage()
    sizes: list[int] = []
    has_ema = False
    for ref in weight_refs:
        part = ray.get(ref)
        sizes.append(part["size"])
        raw_avg.add(part["raw"], float(part["size"]))
        if part["ema"] is not None:
            ema_avg.add(part["ema"], float(part["size"]))
            has_ema = True
        del part
    shard_weights(sizes)  # a clear error if every shard is empty
    raw = raw_avg.result()
    ema = ema_avg.result() if has_ema else None
    RunDir(run_uri).save_weights(round_id, raw, ema)
    return raw, ema
