"""A synthetic captioned set whose captions compose: coloured shapes on textured backgrounds.

Why it exists: a text-to-image model can only follow a prompt it never saw when the words of
that prompt mean the same thing across the training set. Emoji names are once-seen labels
("pretzel", "hamsa"), so a small model trained on a few thousand of them follows no held-out
prompt at all, and PRSS -- which steers a memorized prompt towards semantically close ones --
has nowhere to lead (the emoji PRSS benchmark, BENCHMARKS.md). Here every caption names four
attributes (foreground colour, shape, position, background colour) that recur across thousands
of images, so held-out combinations are learnable; and every image carries a random smooth
background texture and a jittered size and position that the caption does not describe, so a
generation that reproduces one training image (its texture included) is a copy, while a new
rendering of the same caption is not. That is LAION's situation in miniature: captions describe
content, images hold detail, and duplicated pairs are memorized detail and all.

Rows are one per attribute combination (8 colours x 6 shapes x 5 positions x 7 background
colours = 1,680), in a seeded order, each worded with one of a few templates; the label is the
shape. Nothing downloads: the set is drawn from ``seed`` at prepare time.
"""

from __future__ import annotations

from collections.abc import Iterator
from functools import cache

import numpy as np
from PIL import Image

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 170, 50),
    "blue": (35, 70, 220),
    "yellow": (240, 220, 40),
    "purple": (140, 40, 170),
    "orange": (245, 140, 20),
    "white": (245, 245, 245),
    "black": (20, 20, 20),
}
SHAPES = ("circle", "square", "triangle", "cross", "ring", "bar")
# centre (x, y) as a fraction of the side
POSITIONS: dict[str, tuple[float, float]] = {
    "in the top left": (0.3, 0.3),
    "in the top right": (0.7, 0.3),
    "in the bottom left": (0.3, 0.7),
    "in the bottom right": (0.7, 0.7),
    "in the middle": (0.5, 0.5),
}
TEMPLATES = (
    "{a_fg} {fg} {shape} {pos} on {a_bg} {bg} background",
    "{fg} {shape} {pos}, {bg} background",
    "{a_bg} {bg} background with {a_fg} {fg} {shape} {pos}",
)
RENDER_SIZE = 64  # drawn at 64 px; prepare() resizes (antialiased) to the requested size
TEXTURE_AMPLITUDE = 40.0  # std of the background texture, in 0-255 units per channel
TEXTURE_CHROMA = 0.4  # share of the texture drawn per channel (the rest is shared: light and shade)
TEXTURE_GRID = 5  # the texture's control points per side: blotches about a fifth of the image
RADIUS = (0.17, 0.23)  # shape half-size as a fraction of the side (uniform)
JITTER = 0.05  # position jitter as a fraction of the side (uniform, each axis)


def combinations() -> list[tuple[str, str, str, str]]:
    """Every (fg colour, shape, position, bg colour) with fg != bg, in a fixed order."""
    return [
        (fg, shape, pos, bg) for fg in COLOURS for shape in SHAPES for pos in POSITIONS for bg in COLOURS if bg != fg
    ]


def caption(fg: str, shape: str, pos: str, bg: str, template: int = 0) -> str:
    """The caption of one combination in template ``template``."""
    return TEMPLATES[template].format(fg=fg, shape=shape, pos=pos, bg=bg, a_fg=_article(fg), a_bg=_article(bg))


def all_wordings() -> list[str]:
    """Every caption the templates can word (each combination in every template): a caption pool.

    A prompt bank for PRSS's semantic search, as a web caption pool would be: it holds other
    wordings of any training image's content, which the set itself (one wording per image) does not.
    """
    return list(_wordings())


@cache
def _wordings() -> dict[str, tuple[tuple[str, str, str, str], int]]:
    return {caption(*c, template=t): (c, t) for c in combinations() for t in range(len(TEMPLATES))}


def parse(text: str) -> tuple[tuple[str, str, str, str], int]:
    """(combination, template) of caption ``text``: the inverse of :func:`caption`.

    ValueError when ``text`` is no caption of this set.
    """
    try:
        return _wordings()[text]
    except KeyError:
        raise ValueError(f"{text!r} is no caption of the shapes set") from None


def paraphrases(text: str) -> list[str]:
    """Every other wording of caption ``text``'s combination, the next template first.

    Exact paraphrases: what the PRSS paper's LLM is asked to write (same content, other words),
    here without an LLM's errors, so a search over them is the ceiling of paraphrase candidates.
    """
    combo, t = parse(text)
    return [caption(*combo, template=(t + k) % len(TEMPLATES)) for k in range(1, len(TEMPLATES))]


def rewording(text: str) -> str:
    """The same combination as caption ``text`` in the next template: what a user rewording a prompt by hand gives."""
    return paraphrases(text)[0]


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def shape_mask(shape: str, cx: float, cy: float, r: float, n: int) -> np.ndarray:
    """Boolean (n, n) mask of ``shape`` centred at pixel (cx, cy) with half-size r pixels."""
    y, x = np.mgrid[0:n, 0:n].astype(np.float64) + 0.5
    dx, dy = x - cx, y - cy
    if shape == "circle":
        return dx**2 + dy**2 <= r**2
    if shape == "ring":
        d2 = dx**2 + dy**2
        return (d2 <= r**2) & (d2 >= (0.55 * r) ** 2)
    if shape == "square":
        return (np.abs(dx) <= 0.85 * r) & (np.abs(dy) <= 0.85 * r)
    if shape == "triangle":  # apex up: inside when below the two edges and above the base
        return (dy <= 0.8 * r) & (dy >= -r + 2.0 * np.abs(dx))
    if shape == "cross":
        arm = 0.33 * r
        return ((np.abs(dx) <= arm) & (np.abs(dy) <= r)) | ((np.abs(dy) <= arm) & (np.abs(dx) <= r))
    if shape == "bar":
        return (np.abs(dx) <= r) & (np.abs(dy) <= 0.38 * r)
    raise ValueError(f"unknown shape {shape!r}: one of {', '.join(SHAPES)}")


def texture(rng: np.random.Generator, n: int) -> np.ndarray:
    """A smooth random colour field (n, n, 3), zero mean, std about TEXTURE_AMPLITUDE."""
    fields = []
    for _ in range(4):  # a shared field and one per channel
        grid = rng.standard_normal((TEXTURE_GRID, TEXTURE_GRID)).astype(np.float32)
        fields.append(np.asarray(Image.fromarray(grid, mode="F").resize((n, n), Image.Resampling.BICUBIC)))
    shared, own = fields[0][..., None], np.stack(fields[1:], axis=-1)
    out = (1.0 - TEXTURE_CHROMA) * shared + TEXTURE_CHROMA * own
    return out / max(out.std(), 1e-6) * TEXTURE_AMPLITUDE


def render(fg: str, shape: str, pos: str, bg: str, rng: np.random.Generator, n: int = RENDER_SIZE) -> np.ndarray:
    """uint8 (n, n, 3): the shape over its textured background; size, jitter and texture drawn from ``rng``."""
    img = np.asarray(COLOURS[bg], dtype=np.float64) + texture(rng, n)
    fx, fy = POSITIONS[pos]
    cx = (fx + rng.uniform(-JITTER, JITTER)) * n
    cy = (fy + rng.uniform(-JITTER, JITTER)) * n
    r = rng.uniform(*RADIUS) * n
    img[shape_mask(shape, cx, cy, r, n)] = COLOURS[fg]
    return np.clip(np.round(img), 0, 255).astype(np.uint8)


def shapes_rows(limit: int | None = None, seed: int = 0) -> tuple[Iterator[Image.Image], list[str], np.ndarray]:
    """(lazy RGB images, captions, shape labels) of the set: one row per combination, seeded order."""
    rng = np.random.default_rng(seed)
    combos = combinations()
    order = rng.permutation(len(combos))[:limit]
    templates = rng.integers(0, len(TEMPLATES), size=len(order))
    chosen = [combos[i] for i in order]
    caps = [caption(*c, template=int(t)) for c, t in zip(chosen, templates, strict=True)]
    labels = np.asarray([SHAPES.index(c[1]) for c in chosen], dtype=np.int64)

    def images() -> Iterator[Image.Image]:
        draw = np.random.default_rng([seed, 1])  # one stream for the renders, apart from the order's
        for c in chosen:
            yield Image.fromarray(render(*c, draw))

    return images(), caps, labels
