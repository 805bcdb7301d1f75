"""The offline alignment model: it must learn, generalise to held-out pairs, and be reproducible.

The data is synthetic on purpose: 16x16 images of coloured shapes whose caption says the
colour and the shape ("a red square"), so what the model should learn is known exactly
and a run takes seconds. Positions and sizes vary so the model cannot match pixels.
"""

from __future__ import annotations

import builtins
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from memshard.evaluation.alignment import MODEL_NAME, AlignmentConfig, AlignmentModel, clip_scorer, train_alignment

COLOURS = {"red": (220, 30, 30), "green": (30, 180, 40), "blue": (30, 60, 220), "yellow": (230, 210, 20)}
SHAPES = ("square", "circle", "cross", "stripe")
CFG = AlignmentConfig(channels=3, input_size=16, width=16, embed_dim=32)
TRAIN = {"steps": 150, "batch_size": 48, "config": CFG, "holdout": 0.25}


def _draw(shape: str, colour: tuple[int, int, int], rng: np.random.Generator, size: int = 16) -> np.ndarray:
    img = np.full((size, size, 3), 245, np.uint8)
    r = int(rng.integers(4, 7))
    cy, cx = (int(v) for v in rng.integers(r, size - r, 2))
    yy, xx = np.mgrid[:size, :size]
    if shape == "square":
        mask = (abs(yy - cy) <= r - 1) & (abs(xx - cx) <= r - 1)
    elif shape == "circle":
        mask = (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r
    elif shape == "cross":
        mask = ((abs(yy - cy) <= 1) & (abs(xx - cx) <= r)) | ((abs(xx - cx) <= 1) & (abs(yy - cy) <= r))
    else:  # a horizontal bar across the image
        mask = abs(yy - cy) <= 1
    img[mask] = colour
    return img


def _pairs(n: int, seed: int) -> tuple[np.ndarray, list[str]]:
    rng = np.random.default_rng(seed)
    combos = [(c, s) for c in COLOURS for s in SHAPES]
    images, captions = [], []
    for i in range(n):
        colour, shape = combos[i % len(combos)]
        images.append(_draw(shape, COLOURS[colour], rng))
        captions.append(f"a {colour} {shape}")
    return np.stack(images), captions


@pytest.fixture(scope="module")
def data() -> tuple[np.ndarray, list[str]]:
    return _pairs(64, seed=0)


@pytest.fixture(scope="module")
def model(data: tuple[np.ndarray, list[str]]) -> AlignmentModel:
    images, captions = data
    return train_alignment(images, captions, seed=0, **TRAIN)


def test_learns_and_retrieves_held_out_pairs(model: AlignmentModel) -> None:
    info = model.info
    assert info["num_pairs"] == 64 and info["num_holdout"] == 16 and info["num_train"] == 48
    assert model.name == f"{MODEL_NAME} (trained on 48 pairs)"
    chance = info["holdout_chance_top1"]
    assert 0 < chance <= 0.2  # at least 5 distinct captions among the 16 held-out pairs
    assert info["holdout_top1"] >= max(0.5, 3 * chance), info  # about 0.7 to 0.8 over seeds 0-2
    assert info["holdout_top5"] >= info["holdout_top1"]
    assert math.isfinite(info["final_loss"]) and info["train_seconds"] > 0


def test_matching_pairs_score_higher_on_new_images(model: AlignmentModel) -> None:
    images, captions = _pairs(32, seed=7)  # images never seen in training
    matched = model.score(images, captions)
    shifted = captions[1:] + captions[:1]  # every image with another colour/shape's caption
    mismatched = model.score(images, shifted)
    assert matched.shape == (32,) and matched.dtype == np.float32
    assert np.all(np.abs(matched) <= 1 + 1e-5)
    assert matched.mean() > mismatched.mean() + 0.15  # about 0.35 to 0.5 over seeds 0-2
    assert (matched > mismatched).mean() >= 0.65  # about 0.7 to 0.9 over seeds 0-2
    # layouts and channel counts are the caller's business: NCHW and grayscale are accepted too
    np.testing.assert_allclose(model.score(images.transpose(0, 3, 1, 2), captions), matched, atol=1e-6)
    assert model.score(images[..., 0], captions).shape == (32,)
    assert model.score(images[:0], []).shape == (0,)
    with pytest.raises(ValueError, match="prompts"):
        model.score(images, captions[:-1])


def test_save_load_round_trip(model: AlignmentModel, tmp_path: Path) -> None:
    images, captions = _pairs(16, seed=3)
    model.save(tmp_path / "align")
    assert sorted(p.name for p in (tmp_path / "align").iterdir()) == ["alignment.json", "alignment.safetensors"]
    loaded = AlignmentModel.load(tmp_path / "align")
    assert loaded.config == model.config and loaded.name == model.name
    assert loaded.info["holdout_top1"] == model.info["holdout_top1"]
    np.testing.assert_array_equal(loaded.score(images, captions), model.score(images, captions))
    with pytest.raises(FileNotFoundError, match=r"alignment\.json"):
        AlignmentModel.load(tmp_path / "nothing-here")


def test_deterministic_under_a_seed(model: AlignmentModel, data: tuple[np.ndarray, list[str]]) -> None:
    images, captions = data
    again = train_alignment(images, captions, seed=0, **TRAIN)
    other = train_alignment(images, captions, seed=1, **TRAIN)
    probe, probe_caps = _pairs(16, seed=5)
    np.testing.assert_array_equal(again.score(probe, probe_caps), model.score(probe, probe_caps))
    assert again.info["holdout_top1"] == model.info["holdout_top1"]
    assert not np.array_equal(other.score(probe, probe_caps), model.score(probe, probe_caps))


def test_rejects_bad_inputs(data: tuple[np.ndarray, list[str]]) -> None:
    images, captions = data
    with pytest.raises(ValueError, match="captions"):
        train_alignment(images, captions[:-1])
    with pytest.raises(ValueError, match="holdout"):
        train_alignment(images, captions, holdout=1.0)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        train_alignment(images.astype(np.float32), captions)  # 0..255 floats: not [0, 1]


def test_clip_scorer_names_what_is_missing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(FileNotFoundError, match=r"missing\.pt"):
        clip_scorer(tmp_path / "missing.pt", "ViT-B-32")
    weights = tmp_path / "clip.pt"
    weights.write_bytes(b"not really weights")
    real_import = builtins.__import__

    def no_open_clip(name: str, *args: Any, **kwargs: Any) -> Any:
        if name == "open_clip":  # the package may be installed elsewhere; here it must look absent
            raise ImportError("No module named 'open_clip'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_open_clip)
    with pytest.raises(ImportError, match="open_clip"):
        clip_scorer(weights, "ViT-B-32")
