"""The synthetic compositional caption set: captions that compose, images whose detail a copy reproduces."""

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from memshard.data import prepare
from memshard.data.images import decode_image
from memshard.data.shapes import (
    COLOURS,
    POSITIONS,
    SHAPES,
    combinations,
    render,
    shape_mask,
    shapes_rows,
)


def _ncc(a: np.ndarray, b: np.ndarray) -> float:
    a = a.astype(np.float64).ravel() - a.mean()
    b = b.astype(np.float64).ravel() - b.mean()
    return float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))


def test_every_combination_is_one_distinctly_worded_caption_naming_its_attributes():
    combos = combinations()
    assert len(combos) == len(COLOURS) * len(SHAPES) * len(POSITIONS) * (len(COLOURS) - 1)
    assert len(set(combos)) == len(combos) and all(fg != bg for fg, _, _, bg in combos)
    _, caps, labels = shapes_rows()
    assert len(caps) == len(combos) and len(set(caps)) == len(caps)  # a caption means one image
    by_caption = dict(zip(caps, labels.tolist(), strict=True))
    for cap in caps[:200]:
        words = cap.replace(",", "").split()
        assert sum(w in COLOURS for w in words) == 2  # foreground and background colour
        assert [w for w in words if w in SHAPES] == [SHAPES[by_caption[cap]]]  # the label is the shape
        assert any(p in cap for p in POSITIONS) and "background" in words
        assert " a orange" not in cap and not cap.startswith("a orange")


def test_render_draws_the_named_shape_in_the_named_place_over_a_textured_background():
    rng = np.random.default_rng(3)
    img = render("red", "square", "in the bottom right", "blue", rng)
    red = np.all(img == COLOURS["red"], axis=-1)
    ys, xs = np.nonzero(red)
    assert red.sum() > 100 and xs.mean() > 0.6 * img.shape[1] and ys.mean() > 0.6 * img.shape[0]
    background = img[~red].astype(np.float64)
    assert np.abs(background.mean(axis=0) - COLOURS["blue"]).max() < 40  # the named colour, on average
    assert background.std(axis=0).min() > 15  # and a texture, not a flat fill


def test_a_new_rendering_of_a_caption_is_no_copy_of_another():
    """What the PRSS benchmark relies on: the texture makes a copy identifiable at 16 px."""

    def small(a: np.ndarray) -> np.ndarray:
        return np.asarray(Image.fromarray(a).resize((16, 16), Image.Resampling.BILINEAR))

    rng = np.random.default_rng(0)
    combo = ("yellow", "circle", "in the top left", "green")
    first = small(render(*combo, rng))
    others = [_ncc(first, small(render(*combo, rng))) for _ in range(8)]
    assert _ncc(first, first) == pytest.approx(1.0)
    assert max(others) < 0.9  # the benchmark's distinct-image bar


def test_prepare_writes_a_seeded_captioned_shape_labelled_parquet(tmp_path):
    res = prepare("shapes", str(tmp_path / "a.parquet"), image_size=16, limit=12)
    again = prepare("shapes", str(tmp_path / "b.parquet"), image_size=16, limit=12)
    assert res.num_rows == 12 and res.has_caption and res.num_classes == len(SHAPES) and res.image_size == 16
    a, b = pq.read_table(res.path), pq.read_table(again.path)
    assert a.equals(b)  # the same set on every machine: nothing random but the fixed seed
    _, caps, labels = shapes_rows(limit=12)
    assert a.column("caption").to_pylist() == caps and a.column("label").to_pylist() == labels.tolist()
    img = decode_image(a.column("image")[0].as_py(), 16, 3)
    assert img.shape == (3, 16, 16)


def test_unknown_shape_is_refused_by_name():
    with pytest.raises(ValueError, match=r"hexagon.*circle"):
        shape_mask("hexagon", 8, 8, 4, 16)


def test_a_rewording_names_the_same_combination_in_another_template():
    from memshard.data.shapes import TEMPLATES, caption, paraphrases, rewording

    combo = ("orange", "ring", "in the middle", "white")
    words = {caption(*combo, template=t) for t in range(len(TEMPLATES))}
    for text in words:
        other = rewording(text)
        assert other in words and other != text
        # the paraphrases: every other wording, once each, the rewording first
        para = paraphrases(text)
        assert set(para) == words - {text} and len(para) == len(TEMPLATES) - 1 and para[0] == other
    for bad in (rewording, paraphrases):
        with pytest.raises(ValueError, match="no caption"):
            bad("a pretzel")
