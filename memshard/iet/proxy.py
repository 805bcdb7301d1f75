"""One proxy model trained on one shard: the Ray-free training core of IET-AGC.

A :class:`Proxy` owns what the spec says is NOT averaged and NOT reset between rounds:
optimizer moments, the LR-schedule position and the AGC memory bank. Each round it
starts from the global (aggregated) weights, trains ``steps`` optimizer steps on its
shard with the AGC skip rule, and hands back its weights plus per-sample statistics.

Determinism: every random choice of round r on shard i (data order, timesteps, noise,
dropout) comes from generators seeded by ``round_seed(seed, r, i)``. Redoing a round from
the same committed state therefore gives bit-identical results on CPU, which is what
makes ``train_round`` idempotent and ``--resume`` exact.

Non-finite losses: a batch with a NaN/inf per-sample loss is skipped whole (weights,
optimizer moments, EMA, memory bank and statistics stay as if it never came), counted in
``nonfinite_steps`` and the ids of its offending samples remembered; past
``train.max_nonfinite_steps`` such steps the proxy raises :class:`NonFiniteLossError`. The
check adds no host synchronisation per step where the optimizer is fused (CUDA).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from memshard.config import MemshardConfig, TAAConfig
from memshard.iet import agc
from memshard.iet import taa as augmentation
from memshard.iet.compiled import CompiledModel
from memshard.iet.schedule import extrapolates, keeps_own_weights
from memshard.models.text import TextCond
from memshard.models.unet import build_scheduler, build_unet
from memshard.seeds import round_seed

StateDict = dict[str, torch.Tensor]

NONFINITE_IDS_KEPT = 1000  # offending ids remembered per proxy (state meta); the error lists the first 20
NONFINITE_IDS_SHOWN = 20


class NonFiniteLossError(RuntimeError):
    """More optimizer steps had a NaN/inf loss than ``train.max_nonfinite_steps`` allows."""


class _CounterProbe:
    """Reads a growing device counter at progress points without stalling the device.

    On CPU the read is exact and free. On CUDA a read would wait for every queued kernel, so
    each probe starts an asynchronous copy into pinned memory and returns the value of an
    earlier copy once its event has completed: a lower bound that lags by a probe or two
    (the exact count is read at the end of the round, where the loop synchronises anyway).
    """

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.value = 0
        if self.cuda:
            self.host = torch.zeros((), dtype=torch.int64).pin_memory()
            self.event = torch.cuda.Event()
            self.in_flight = False

    def read(self, counter: torch.Tensor) -> int:
        if not self.cuda:
            return int(counter)
        if self.in_flight:
            if not self.event.query():
                return self.value
            self.value = int(self.host)
        self.host.copy_(counter, non_blocking=True)
        self.event.record()
        self.in_flight = True
        return self.value


@dataclass
class ShardData:
    """A shard's training rows, resident on the proxy's device.

    ``images`` are uint8 pixels (N, C, H, W), or float VAE latents (already scaled) for
    latent models. Text-conditional models carry the cached caption states (float16 to
    save memory) and the empty prompt's states that caption dropout substitutes.
    """

    ids: np.ndarray  # int64, (N,)
    images: torch.Tensor  # uint8 (N, C, H, W) pixels, or float latents
    labels: torch.Tensor | None  # int64, (N,)
    text: TextCond | None = None  # (N, L, D) caption token states + masks
    empty_text: TextCond | None = None  # (1, L, D): the empty prompt
    text_mask: bool = True  # pass the attention mask to the UNet (BERT-style encoders; SD's CLIP: no)

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def latent(self) -> bool:
        return self.images.dtype != torch.uint8

    def x0(self, idx: torch.Tensor) -> torch.Tensor:
        """Training targets in model space: pixels mapped to [-1, 1], or latents as cached."""
        if self.latent:
            return self.images[idx].float()
        return self.images[idx].float().div_(127.5).sub_(1.0)


Cond = torch.Tensor | TextCond | None  # class labels, caption states, or nothing


def select(cond: Cond, sel: torch.Tensor) -> Cond:
    """Rows ``sel`` of a conditioning (whatever its kind)."""
    if cond is None:
        return None
    return cond.index(sel) if isinstance(cond, TextCond) else cond[sel]


@dataclass
class RoundResult:
    """What a proxy reports after a round (statistics are per sample of its shard)."""

    ids: np.ndarray
    visits: np.ndarray
    skips: np.ndarray
    mean_loss: np.ndarray  # NaN where never visited
    mean_ratio: np.ndarray  # mean of l / m[t] over visits where the bank was non-zero; NaN if none
    steps: int
    mean_batch_loss: float
    skip_rate: float
    augmented: np.ndarray | None = None  # TAA: augmented visits per sample
    mean_strength: np.ndarray | None = None  # TAA: mean strength s over kept visits; NaN if none
    extra_steps: int = 0  # TAA queue/prototype: steps on augmented batches (queue: part of ``steps``)
    nonfinite_steps: int = 0  # steps of this round skipped for a NaN/inf loss (part of ``steps``)
    nonfinite_ids: np.ndarray | None = None  # ids of the samples whose loss was NaN/inf this round
    captions_dropped: float | None = None  # text models: share of this round's conditions that were the empty prompt

    def as_columns(self) -> dict[str, np.ndarray]:
        n = len(self.ids)
        return {
            "id": self.ids,
            "visits": self.visits,
            "skips": self.skips,
            "mean_loss": self.mean_loss,
            "mean_ratio": self.mean_ratio,
            "augmented": self.augmented if self.augmented is not None else np.zeros(n, np.int64),
            "mean_strength": self.mean_strength if self.mean_strength is not None else np.full(n, np.nan),
        }


def resolve_device(cfg: MemshardConfig) -> torch.device:
    if cfg.train.device == "cuda" or (cfg.train.device == "auto" and torch.cuda.is_available()):
        return torch.device("cuda")
    return torch.device("cpu")


def steps_for(cfg: MemshardConfig, shard_size: int) -> int:
    if cfg.train.steps_per_round is not None:
        return cfg.train.steps_per_round
    return max(1, math.ceil(cfg.train.epochs_per_round * shard_size / cfg.train.batch_size))


def warmup_for(cfg: MemshardConfig, shard_size: int) -> int:
    if cfg.train.warmup_steps is not None:
        return cfg.train.warmup_steps
    return math.ceil(cfg.train.warmup_epochs * shard_size / cfg.train.batch_size)


def batch_order(n: int, steps: int, batch_size: int, rng: np.random.Generator) -> np.ndarray:
    """Indices for ``steps`` batches: concatenated seeded permutations (every sample once per epoch)."""
    need = steps * batch_size
    epochs = math.ceil(need / n)
    order = np.concatenate([rng.permutation(n) for _ in range(epochs)])[:need]
    return order.reshape(steps, batch_size)


class Proxy:
    """The proxy model of one shard, with its optimizer, EMA and AGC memory bank."""

    def __init__(self, cfg: MemshardConfig, shard_id: int, device: torch.device | None = None) -> None:
        self.cfg = cfg
        self.shard_id = shard_id
        self.device = device or resolve_device(cfg)
        torch.manual_seed(cfg.seed)  # weights are overwritten by the global ones; seeded anyway
        self.unet = build_unet(cfg).to(self.device)
        self.unet.train()
        on_cuda = self.device.type == "cuda"
        self.channels_last = cfg.train.channels_last if cfg.train.channels_last is not None else on_cuda
        if self.channels_last:
            self.unet.to(memory_format=torch.channels_last)
        self.noise_scheduler = build_scheduler(cfg)
        self.alphas_cumprod = self.noise_scheduler.alphas_cumprod.to(self.device, torch.float32)
        params = [p for p in self.unet.parameters() if p.requires_grad]
        opt_cls = torch.optim.AdamW if cfg.train.optimizer == "adamw" else torch.optim.Adam
        kwargs = {
            "lr": cfg.train.lr,
            "betas": cfg.train.betas,
            "eps": cfg.train.eps,
            "weight_decay": cfg.train.weight_decay,
        }
        if self.device.type == "cuda":
            kwargs["fused"] = True
        self.optimizer = opt_cls(params, **kwargs)
        self.ema: StateDict | None = (
            {k: v.detach().clone() for k, v in self.unet.state_dict().items()} if cfg.train.ema else None
        )
        self.bank = torch.full(
            (cfg.model.num_train_timesteps,), cfg.agc.bank_init, dtype=torch.float32, device=self.device
        )
        self.step = 0  # optimizer steps taken by this proxy over all rounds
        self.taa_strength: dict[int, float] = {}  # TAA inline mode: last strength per sample id
        self.last_round_seed: int | None = None
        self.nonfinite_steps = 0  # steps skipped for a NaN/inf loss over all rounds
        # caption dropout as the model sees it: dropped and drawn conditions (dropped counted on the
        # device, so no step syncs), reset by each train_round
        self._drop_count = torch.zeros((), dtype=torch.int64, device=self.device)
        self._cond_count = 0
        self.nonfinite_ids: list[int] = []  # their offending sample ids, sorted, at most NONFINITE_IDS_KEPT
        self.amp_dtype = self._amp_dtype()
        self.text_mask = True  # pass caption masks to the UNet; set per round from the shard (CLIP: no mask)
        # what the step calls; self.unet (the same parameters) is what is saved, loaded and averaged
        self.model = CompiledModel(
            self.unet,
            cfg.train.compile if cfg.train.compile is not None else on_cuda,
            cfg.train.compile_mode,
            self.amp_dtype,
        )
        self.scaler = torch.amp.GradScaler("cuda") if self.amp_dtype == torch.float16 else None

    # ----------------------------------------------------------------- weights
    def _amp_dtype(self) -> torch.dtype | None:
        mp = self.cfg.train.mixed_precision
        if self.device.type != "cuda" or mp == "no":
            return None
        return torch.float16 if mp == "fp16" else torch.bfloat16

    def load_global(self, raw: StateDict, ema: StateDict | None) -> None:
        """Start the round from the aggregated weights (copying: object-store arrays are read-only)."""
        from memshard.io.weights import load_checked

        load_checked(self.unet, raw, f"the global weights given to shard {self.shard_id}")
        if self.ema is not None:
            source = ema if ema is not None else raw
            for k, v in self.ema.items():
                v.copy_(torch.as_tensor(source[k]))

    @property
    def keeps_own_weights(self) -> bool:
        """Whether this proxy's own end-of-round weights matter next round (so they are checkpointed)."""
        return keeps_own_weights(self.cfg)

    def start_round(self, round_id: int, raw: StateDict | None, ema: StateDict | None) -> None:
        """Set the weights round ``round_id`` starts from.

        ``raw is None``: continue from this proxy's own weights (after a non-aggregating MSR
        round). ``proxy.update = extrapolate`` for rounds 2..R_e+1: b*theta_bar - (b-1)*theta_i,
        a step past the average away from this proxy's own shard. Otherwise the average. The
        served model is always the plain average of the proxies' end-of-round weights, whichever
        start the proxies take.
        """
        if raw is None:
            return
        pu = self.cfg.proxy
        if extrapolates(self.cfg, round_id):
            b = pu.extrapolate_factor
            own = self.unet.state_dict()
            start = {}
            for k, v in raw.items():
                g = torch.as_tensor(v)
                start[k] = b * g.to(own[k].dtype) - (b - 1) * own[k].detach().cpu() if g.is_floating_point() else g
            self.unet.load_state_dict(start)
            if self.ema is not None:
                source = ema if ema is not None else raw
                for k, v in self.ema.items():
                    v.copy_(torch.as_tensor(source[k]))
            return
        self.load_global(raw, ema)

    def weights(self) -> tuple[StateDict, StateDict | None]:
        """CPU copies of (raw, ema) weights, for aggregation."""

        def host(v: torch.Tensor) -> torch.Tensor:  # channels_last weights leave in the standard layout
            return v.detach().to("cpu", copy=True, memory_format=torch.contiguous_format)

        raw = {k: host(v) for k, v in self.unet.state_dict().items()}
        ema = {k: host(v) for k, v in self.ema.items()} if self.ema is not None else None
        return raw, ema

    # ------------------------------------------------------------ proxy state
    def state(self) -> tuple[StateDict, dict]:
        """Everything that persists across rounds but is not averaged: (tensors, json meta)."""
        tensors: StateDict = {"bank": self.bank.detach().cpu().clone()}
        if self.taa_strength:
            keys = sorted(self.taa_strength)
            tensors["taa.ids"] = torch.tensor(keys, dtype=torch.int64)
            tensors["taa.strength"] = torch.tensor([self.taa_strength[k] for k in keys], dtype=torch.float32)
        if self.keeps_own_weights:
            raw, ema = self.weights()
            tensors.update({f"w.raw.{k}": v for k, v in raw.items()})
            if ema is not None:
                tensors.update({f"w.ema.{k}": v for k, v in ema.items()})
        opt = self.optimizer.state_dict()
        for idx, pstate in opt["state"].items():
            for name, value in pstate.items():
                if torch.is_tensor(value):
                    tensors[f"opt.{idx}.{name}"] = value.detach().cpu().clone()
        # RNG state: every random stream of a round is re-derived from (seed, round, shard),
        # so the seed of the last round is the whole RNG state needed to reproduce it.
        meta = {
            "step": self.step,
            "nonfinite_steps": self.nonfinite_steps,
            "nonfinite_ids": self.nonfinite_ids,
            "rng": {"scheme": "sha256(seed,round,shard)", "last_round_seed": self.last_round_seed},
        }
        if self.scaler is not None:
            meta["grad_scaler"] = {
                k: float(v) if isinstance(v, (int, float)) else v for k, v in self.scaler.state_dict().items()
            }
        return tensors, meta

    def load_state(self, tensors: StateDict, meta: dict) -> None:
        self.bank.copy_(tensors["bank"].to(self.device))
        if "taa.ids" in tensors:
            ids, st = tensors["taa.ids"].tolist(), tensors["taa.strength"].tolist()
            self.taa_strength = dict(zip(ids, st, strict=True))
        own_raw = {k[6:]: v for k, v in tensors.items() if k.startswith("w.raw.")}
        if own_raw:
            own_ema = {k[6:]: v for k, v in tensors.items() if k.startswith("w.ema.")}
            self.load_global(own_raw, own_ema or None)
        self.step = int(meta["step"])
        self.nonfinite_steps = int(meta.get("nonfinite_steps", 0))
        self.nonfinite_ids = [int(x) for x in meta.get("nonfinite_ids", [])]
        current = self.optimizer.state_dict()
        state: dict[int, dict[str, torch.Tensor]] = {}
        for key, value in tensors.items():
            if key.startswith("opt."):  # (w.* and taa.* keys were taken above)
                _, idx, name = key.split(".", 2)
                state.setdefault(int(idx), {})[name] = value
        self.optimizer.load_state_dict({"state": state, "param_groups": current["param_groups"]})
        if self.scaler is not None and "grad_scaler" in meta:
            self.scaler.load_state_dict(meta["grad_scaler"])

    # --------------------------------------------------------------- training
    def lr_at(self, step: int, warmup: int) -> float:
        if warmup <= 0:
            return self.cfg.train.lr
        return self.cfg.train.lr * min(1.0, (step + 1) / warmup)

    def train_round(
        self,
        round_id: int,
        data: ShardData,
        steps: int | None = None,
        on_progress: Callable[[int, int], None] | None = None,
    ) -> RoundResult:
        """Train ``steps`` optimizer steps on ``data``; returns per-sample statistics.

        A step whose batch has a NaN/inf loss is skipped and leaves no trace in the statistics
        (its samples are not counted as visited); it still uses up a step of the budget and its
        random draws, so the other batches train exactly as they would have. Raises
        :class:`NonFiniteLossError` once this proxy has skipped more than
        ``train.max_nonfinite_steps`` steps (checked every ``progress_every`` steps and at the end).
        """
        cfg = self.cfg
        n = len(data)
        if n == 0:
            raise ValueError(f"shard {self.shard_id} is empty in round {round_id}")
        steps = steps if steps is not None else steps_for(cfg, n)
        warmup = warmup_for(cfg, n)
        self.text_mask = data.text_mask
        seed = round_seed(cfg.seed, round_id, self.shard_id)
        self.last_round_seed = seed
        torch.manual_seed(seed)  # dropout and any other global-RNG use
        order_np = batch_order(n, steps, cfg.train.batch_size, np.random.default_rng(seed))
        order = torch.from_numpy(order_np).to(self.device)
        gen = torch.Generator(device=self.device).manual_seed(seed)
        T = cfg.model.num_train_timesteps

        visits = torch.zeros(n, dtype=torch.int64, device=self.device)
        skips = torch.zeros(n, dtype=torch.int64, device=self.device)
        loss_sum = torch.zeros(n, dtype=torch.float64, device=self.device)
        ratio_sum = torch.zeros(n, dtype=torch.float64, device=self.device)
        ratio_n = torch.zeros(n, dtype=torch.int64, device=self.device)
        batch_loss_sum = torch.zeros((), dtype=torch.float64, device=self.device)
        report_every = cfg.train.progress_every
        # non-finite losses, counted on the device: read at progress points (probe) and at the end
        bad_visits = torch.zeros(n, dtype=torch.int64, device=self.device)  # NaN/inf losses per sample
        bad_steps = torch.zeros((), dtype=torch.int64, device=self.device)  # steps skipped for them
        good_batches = torch.zeros((), dtype=torch.int64, device=self.device)  # regular batches that stepped
        probe = _CounterProbe(self.device)

        taa = cfg.taa if (cfg.taa.enabled and cfg.agc.enabled) else None
        aug_gen = torch.Generator(device=self.device).manual_seed(seed ^ 0x7AA)  # TAA's own stream
        augmented = torch.zeros(n, dtype=torch.int64, device=self.device)
        strength_sum = torch.zeros(n, dtype=torch.float64, device=self.device)
        strength_n = torch.zeros(n, dtype=torch.int64, device=self.device)
        # inline mode: each sample's last strength, carried across rounds by id
        last_strength = torch.tensor(
            [self.taa_strength.get(int(i), 0.0) for i in data.ids.tolist()], dtype=torch.float32, device=self.device
        )
        queue: list[torch.Tensor] = []  # queue mode: (index, strength) rows of kept samples, this round only
        queued = 0
        queue_size = taa.augmented_batch(cfg.train.batch_size) if taa is not None else 0
        # prototype mode: the regular batch only decides (no-grad forward, no step); kept samples train augmented
        learn = taa is None or taa.mode != "prototype"
        extra_steps = 0
        regular = 0  # batches of the precomputed order consumed
        self._drop_count.zero_()
        self._cond_count = 0

        i = 0
        while i < steps:
            idx = order[regular]
            regular += 1
            x0 = data.x0(idx)
            cond = self._cond(data, idx, gen)
            t = torch.randint(0, T, (idx.numel(),), generator=gen, device=self.device)
            noise = torch.randn(x0.shape, generator=gen, device=self.device)
            if taa is not None and taa.mode == "inline":
                s_prev = last_strength[idx]
                x0 = self._augment(x0, s_prev, taa, aug_gen, data.latent)
            per, keep, ratio, bank_before, ok = self._step(x0, noise, t, cond, self.lr_at(self.step, warmup), learn)
            # a skipped (non-finite) batch adds nothing: every update below is masked by ``ok``
            stepped = ok.to(torch.int64)
            bad_steps += 1 - stepped
            good_batches += stepped
            bad_visits.index_add_(0, idx, (~torch.isfinite(per)).to(torch.int64))
            visits.index_add_(0, idx, torch.ones_like(idx) * stepped)
            skips.index_add_(0, idx, (~keep & ok).to(torch.int64))
            loss_sum.index_add_(0, idx, torch.where(ok, per, 0.0).double())
            finite = torch.isfinite(ratio) & ok
            ratio_sum.index_add_(0, idx, torch.where(finite, ratio, torch.zeros_like(ratio)).double())
            ratio_n.index_add_(0, idx, finite.to(torch.int64))
            batch_loss_sum += torch.where(ok, per.double().mean(), 0.0)
            self.step += 1
            i += 1
            if taa is not None:
                if taa.mode == "inline":
                    augmented.index_add_(0, idx, ((s_prev > 0) & ok).to(torch.int64))
                s_new = augmentation.strength(per, bank_before, t, cfg.agc.ratio, taa.alpha)
                kept = keep & ok
                k_idx, k_s = idx[kept], s_new[kept]
                strength_sum.index_add_(0, k_idx, k_s.double())
                strength_n.index_add_(0, k_idx, torch.ones_like(k_idx))
                if taa.mode == "inline":
                    last_strength[k_idx] = k_s.float()
                else:
                    queue.append(torch.stack([k_idx.double(), k_s.double()], dim=1))
                    queued += int(k_idx.numel())
                    # queue mode: the extra step is part of the step budget and the overflow waits for the
                    # next one; prototype mode: the budget counts regular batches, the overflow is dropped
                    if queued >= queue_size and (i < steps or not learn):
                        rows = torch.cat(queue)
                        take, rest = rows[:queue_size], rows[queue_size:]
                        queue, queued = ([rest] if len(rest) and learn else []), (len(rest) if learn else 0)
                        q_idx = take[:, 0].long()
                        q_finite = self._augmented_step(data, q_idx, take[:, 1].float(), taa, gen, aug_gen, warmup)
                        q_stepped = q_finite.all().to(torch.int64)
                        bad_steps += 1 - q_stepped
                        bad_visits.index_add_(0, q_idx, (~q_finite).to(torch.int64))
                        augmented.index_add_(0, q_idx, torch.ones_like(q_idx) * q_stepped)
                        extra_steps += 1
                        if learn:
                            self.step += 1
                            i += 1
            if i % report_every == 0 and i < steps:
                self._check_nonfinite(round_id, self.nonfinite_steps + probe.read(bad_steps), data, bad_visits)
            if on_progress is not None and (i % report_every == 0 or i >= steps):
                on_progress(min(i, steps), steps)

        if taa is not None and taa.mode == "inline":
            for sid, val in zip(data.ids.tolist(), last_strength.cpu().tolist(), strict=True):
                if val > 0:
                    self.taa_strength[int(sid)] = float(val)

        # one device->host copy per round
        round_bad = int(bad_steps)
        round_bad_ids = data.ids[bad_visits.cpu().numpy() > 0].astype(np.int64)
        self.nonfinite_steps += round_bad
        self.nonfinite_ids = sorted(set(self.nonfinite_ids) | set(round_bad_ids.tolist()))[:NONFINITE_IDS_KEPT]
        self._check_nonfinite(round_id, self.nonfinite_steps)
        v = visits.cpu().numpy()
        s = skips.cpu().numpy()
        with np.errstate(invalid="ignore", divide="ignore"):
            mean_loss = np.where(v > 0, loss_sum.cpu().numpy() / np.maximum(v, 1), np.nan)
            rn = ratio_n.cpu().numpy()
            mean_ratio = np.where(rn > 0, ratio_sum.cpu().numpy() / np.maximum(rn, 1), np.nan)
            sn = strength_n.cpu().numpy()
            mean_strength = np.where(sn > 0, strength_sum.cpu().numpy() / np.maximum(sn, 1), np.nan)
        return RoundResult(
            ids=data.ids.astype(np.int64),
            visits=v.astype(np.int64),
            skips=s.astype(np.int64),
            mean_loss=mean_loss.astype(np.float64),
            mean_ratio=mean_ratio.astype(np.float64),
            steps=steps,
            mean_batch_loss=float(batch_loss_sum.item() / max(int(good_batches), 1)),
            skip_rate=float(s.sum() / max(v.sum(), 1)),
            augmented=augmented.cpu().numpy().astype(np.int64),
            mean_strength=mean_strength.astype(np.float64),
            extra_steps=extra_steps,
            nonfinite_steps=round_bad,
            nonfinite_ids=round_bad_ids,
            captions_dropped=int(self._drop_count.item()) / self._cond_count if self._cond_count else None,  # one sync
        )

    def _check_nonfinite(
        self, round_id: int, total: int, data: ShardData | None = None, bad_visits: torch.Tensor | None = None
    ) -> None:
        """Raise :class:`NonFiniteLossError` if ``total`` skipped steps exceed the configured limit.

        Mid-round (``data`` given) this round's offending ids are read from ``bad_visits`` and
        added to those remembered from earlier rounds; at the end they are already remembered.
        """
        limit = self.cfg.train.max_nonfinite_steps
        if total <= limit:
            return
        ids = set(self.nonfinite_ids)
        if data is not None and bad_visits is not None:
            ids |= set(data.ids[bad_visits.cpu().numpy() > 0].tolist())
        shown = sorted(ids)[:NONFINITE_IDS_SHOWN]
        more = f" and {len(ids) - len(shown)} more" if len(ids) > len(shown) else ""
        raise NonFiniteLossError(
            f"shard {self.shard_id}, round {round_id}: {total} optimizer steps had a non-finite (NaN/inf) loss "
            f"and were skipped, more than train.max_nonfinite_steps={limit}. Sample ids with a non-finite loss: "
            f"{shown}{more}. Check those samples (corrupt image, latent or caption) and the learning rate, or raise "
            "train.max_nonfinite_steps to tolerate more."
        )

    def _targets(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        ac = self.alphas_cumprod[t].view(-1, 1, 1, 1)
        a, b = ac.sqrt(), (1 - ac).sqrt()
        xt = a * x0 + b * noise
        target = noise if self.cfg.model.prediction_type == "epsilon" else a * noise - b * x0
        return xt, target

    def _cond(self, data: ShardData, idx: torch.Tensor, gen: torch.Generator) -> Cond:
        """The conditioning of batch ``idx``; captions dropped to the empty prompt at ``caption_dropout``.

        The dropout draw comes from the round's generator only for text models, so the
        random streams of unconditional and class-conditional runs are unchanged.
        """
        if data.text is not None and self.cfg.model.text_conditional:
            cond = data.text.index(idx)
            p = self.cfg.model.caption_dropout
            self._cond_count += idx.numel()
            if p > 0 and data.empty_text is not None:
                drop = torch.rand(idx.numel(), generator=gen, device=self.device) < p
                self._drop_count += drop.sum()
                empty = data.empty_text.to(self.device)
                states = torch.where(drop.view(-1, 1, 1), empty.states.to(cond.states.dtype), cond.states)
                mask = torch.where(drop.view(-1, 1), empty.mask, cond.mask)
                cond = TextCond(states, mask)
            return cond if data.text_mask else TextCond(cond.states, torch.ones_like(cond.mask))
        if data.labels is not None and self.cfg.model.class_conditional:
            return data.labels[idx]
        return None

    def _forward(self, xt: torch.Tensor, t: torch.Tensor, cond: Cond) -> torch.Tensor:
        if self.channels_last:
            xt = xt.contiguous(memory_format=torch.channels_last)
        kwargs: dict = {"class_labels": cond}
        if isinstance(cond, TextCond):
            # decided per shard, not per batch: reading the mask on the host would sync every step
            mask = cond.mask if self.text_mask else None
            kwargs = {"encoder_hidden_states": cond.states.to(xt.dtype), "encoder_attention_mask": mask}

        def run(model: Callable[..., Any]) -> torch.Tensor:
            with torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None):
                return model(xt, t, **kwargs).sample

        return self.model(run)

    @property
    def _skips_on_device(self) -> bool:
        """Whether a non-finite step is skipped by the optimizer kernel itself (fused optimizers: CUDA)."""
        return bool(self.optimizer.defaults.get("fused"))

    def _optimizer_step(self, loss: torch.Tensor | None, lr: float, ok: torch.Tensor) -> None:
        """Backward ``loss`` (None: every sample was skipped, zero gradients) and step, if ``ok``.

        A batch with every sample skipped still steps (spec): with zero gradients Adam's
        moments decay and the parameters move by their momentum, as in the masked-loss form.

        ``ok`` (a 0-dim bool on the device) False means the batch had a non-finite loss: the
        weights, Adam's moments and step count, and the EMA stay exactly as they were. With a
        fused optimizer (CUDA) this is decided on the device, so no step waits for the host:
        the kernel skips its update when ``found_inf`` is set (the mechanism GradScaler uses)
        and the EMA moves towards weights chosen by ``torch.where``. Otherwise (the for-loop
        optimizer on CPU, where reading a flag costs nothing) the flag is read and the backward
        not even run. With fp16's GradScaler the scaler's own overflow check does the skip (the
        loss is made NaN), which also backs off its scale once.
        """
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        on_device = self._skips_on_device
        if not on_device and not bool(ok):
            return
        if loss is None:
            for p in self.unet.parameters():
                if p.requires_grad:
                    p.grad = torch.zeros_like(p)
        elif self.scaler is not None:
            # + 0.0 is exact; + NaN makes the scaler see non-finite gradients and skip the step
            self.scaler.scale(loss + torch.where(ok, 0.0, float("nan"))).backward()
            self.scaler.unscale_(self.optimizer)
        else:
            loss.backward()
        if self.cfg.train.grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(self.unet.parameters(), self.cfg.train.grad_clip)
        if self.scaler is not None and loss is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        elif on_device:
            self.optimizer.found_inf = (~ok).to(torch.float32)
            try:
                self.optimizer.step()
            finally:
                del self.optimizer.found_inf
        else:
            self.optimizer.step()
        if self.ema is not None:
            self._update_ema(ok if on_device else None)

    def _step(
        self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor, cond: Cond, lr: float, learn: bool = True
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """One optimizer step with the AGC rule, skipped if any per-sample loss is NaN/inf.

        ``learn=False`` (TAA's prototype mode) only decides: a no-grad forward, the keep mask
        and the bank update, no optimizer step.

        Returns (per-sample loss, keep mask, loss ratio, the bank the decision used, whether
        the step was taken: a 0-dim bool on the device). With
        ``agc.decide_before_backward`` the decision comes from a no-grad forward and only the
        kept samples are forwarded again with gradients, so skipped samples cost no backward;
        the loss is then the mean over kept samples, which is exactly the masked loss.
        """
        cfg = self.cfg
        xt, target = self._targets(x0, noise, t)
        self.optimizer.zero_grad(set_to_none=True)
        bank_before = self.bank
        if not learn or (cfg.agc.enabled and cfg.agc.decide_before_backward):
            with torch.no_grad():
                per = agc.per_sample_loss(self._forward(xt, t, cond), target)
            ok = torch.isfinite(per).all()
            keep = agc.keep_mask(per, self.bank, t, cfg.agc.ratio)
            loss = None
            # this mode reads the mask anyway; a skipped batch needs no second forward
            if learn and bool(keep.any() & ok):
                sel = keep.nonzero().squeeze(1)
                loss = agc.per_sample_loss(self._forward(xt[sel], t[sel], select(cond, sel)), target[sel]).mean()
        else:
            per_g = agc.per_sample_loss(self._forward(xt, t, cond), target)
            per = per_g.detach()
            keep = (
                agc.keep_mask(per, self.bank, t, cfg.agc.ratio)
                if cfg.agc.enabled
                else torch.ones_like(per, dtype=torch.bool)
            )
            loss = agc.masked_loss(per_g, keep)
            ok = torch.isfinite(per).all()
        ratio = agc.loss_ratio(per, self.bank, t)
        if learn:
            self._optimizer_step(loss, lr, ok)
        # The bank sees every sample, skipped or not, after the mask was taken. It is kept
        # even with AGC off, so a baseline run records the same loss-ratio statistics. A
        # non-finite batch leaves it untouched: one NaN in m[t] would skip timestep t forever.
        self.bank = torch.where(ok, agc.update_bank(self.bank, per, t, cfg.agc.bank_decay), self.bank)
        return per, keep, ratio, bank_before, ok

    @staticmethod
    def _augment(
        x0: torch.Tensor, strengths: torch.Tensor, taa: TAAConfig, aug_gen: torch.Generator, latent: bool
    ) -> torch.Tensor:
        """TAA's augmentation of ``x0`` by ``strengths``, on the configured scale."""
        return augmentation.apply(
            x0, strengths, taa.scale, taa.max_magnitude, taa.per_sample, taa.num_ops, aug_gen, latent=latent
        )

    def _augmented_step(
        self,
        data: ShardData,
        idx: torch.Tensor,
        strengths: torch.Tensor,
        taa: TAAConfig,
        gen: torch.Generator,
        aug_gen: torch.Generator,
        warmup: int,
    ) -> torch.Tensor:
        """TAA queue/prototype mode: one optimizer step on queued kept samples, augmented by strength.

        Plain diffusion loss (no skipping, no bank update): these samples were kept moments
        ago, and feeding augmented losses into the bank would bias the skip threshold. Returns
        which per-sample losses were finite; if any was not, the step was skipped.
        """
        x0 = self._augment(data.x0(idx), strengths, taa, aug_gen, data.latent)
        cond = self._cond(data, idx, gen)
        t = torch.randint(0, self.cfg.model.num_train_timesteps, (idx.numel(),), generator=gen, device=self.device)
        noise = torch.randn(x0.shape, generator=gen, device=self.device)
        xt, target = self._targets(x0, noise, t)
        self.optimizer.zero_grad(set_to_none=True)
        per = agc.per_sample_loss(self._forward(xt, t, cond), target)
        finite = torch.isfinite(per.detach())
        self._optimizer_step(per.mean(), self.lr_at(self.step, warmup), finite.all())
        return finite

    @torch.no_grad()
    def _update_ema(self, ok: torch.Tensor | None = None) -> None:
        """EMA <- lerp(EMA, weights); with ``ok`` False (on the device) towards the EMA itself: no change."""
        decay = self.cfg.train.ema_decay
        state = self.unet.state_dict()
        floats = [(self.ema[k], v) for k, v in state.items() if v.is_floating_point()]
        if floats:
            ends = [v.detach() if ok is None else torch.where(ok, v.detach(), e) for e, v in floats]
            torch._foreach_lerp_([e for e, _ in floats], ends, 1.0 - decay)
        for k, v in state.items():
            if not v.is_floating_point():
                self.ema[k].copy_(v)
