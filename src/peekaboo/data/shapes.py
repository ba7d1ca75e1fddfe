"""Synthetic "coloured shapes" scenes with captions and exact ground-truth masks.

These scenes are what the project's bundled text-to-image model is trained on, and what the
out-of-the-box demo and the tests segment. Everything here is pure numpy: a scene is a
deterministic function of its integer seed, so the same seed always yields the same pixels,
caption and masks on every machine.

A scene is a ``size`` x ``size`` RGB image (64 x 64 by default) holding 1 to 3 non-overlapping
shapes (circle, square, triangle), each filled with one of a few well-separated named colours, on a
background whose colour is far from every named colour (plain, or with a gentle linear gradient).
Its caption lists every object, in random order: ``"a red circle and a blue square"``.

Seed ranges of the splits (disjoint by construction):

* ``train``: seeds ``0 .. 10**8 - 1`` (``scene_seed("train", i) == i``)
* ``tune``:  seeds ``2 * 10**8 + i``
* ``eval``:  seeds ``3 * 10**8 + i``

Training must draw from the ``train`` range only; ``tune`` is for choosing Peekaboo's settings and
``eval`` for reporting.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = [
    "COLOURS",
    "DISTRACTORS",
    "SHAPES",
    "SPLITS",
    "Scene",
    "ShapeObject",
    "ShapePair",
    "caption_for",
    "eval_pairs",
    "make_scene",
    "scene_seed",
]

#: Named object colours (RGB). Chosen to be far apart from each other so a small model (and a
#: human) can tell them apart at 64 x 64.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 160, 50),
    "blue": (30, 70, 220),
    "yellow": (240, 210, 30),
    "purple": (150, 40, 190),
}

#: Shape words, in a fixed order.
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")

#: Dataset splits; their seed ranges are disjoint (see :func:`scene_seed`).
SPLITS: tuple[str, ...] = ("train", "tune", "eval")

#: Kinds of hard distractor :func:`make_scene` can force.
DISTRACTORS: tuple[str, ...] = ("same_colour", "same_shape")

# Seed layout: each split owns a block of _SPLIT_STRIDE seeds starting at its offset.
_SPLIT_STRIDE = 10**8
_SPLIT_OFFSETS: dict[str, int] = {"train": 0, "tune": 2 * _SPLIT_STRIDE, "eval": 3 * _SPLIT_STRIDE}

# Object size, as the "radius" of the shape in pixels at size 64 (scaled for other sizes).
_MIN_RADIUS = 9
_MAX_RADIUS = 16
# Minimum free gap, in pixels, between the bounding circles of two objects (keeps them apart).
_GAP = 2
# Half side of a square relative to its radius: 0.85 makes its area (2.89 r^2) close to a circle's.
_SQUARE_HALF = 0.85
# Triangle base line below the centre, relative to its radius (apex is at -1).
_TRIANGLE_BASE = 0.8
# Placement attempts per radius before the radius is shrunk by one pixel.
_PLACEMENT_TRIES = 60
# Background colours must be at least this far (Euclidean RGB) from every named colour.
_MIN_BG_DISTANCE = 110.0
# Peak-to-peak amplitude of the optional background gradient (RGB units).
_GRADIENT_AMPLITUDE = 24.0
# Probability that a background carries a gentle gradient instead of being plain.
_P_GRADIENT = 0.5


@dataclass(frozen=True)
class ShapeObject:
    """One shape in a scene."""

    shape: str
    colour: str
    mask: np.ndarray  # (H, W) bool, exactly the pixels painted with this object's colour

    @property
    def name(self) -> str:
        """Colour and shape, e.g. ``"red circle"``."""
        return f"{self.colour} {self.shape}"

    @property
    def prompt(self) -> str:
        """The Peekaboo prompt naming this object, e.g. ``"a red circle"``."""
        return f"a {self.name}"


@dataclass(frozen=True)
class Scene:
    """A rendered scene: image, its objects (with masks) and the caption listing them."""

    image: np.ndarray  # (H, W, 3) uint8
    objects: tuple[ShapeObject, ...]
    caption: str
    seed: int


@dataclass(frozen=True)
class ShapePair:
    """One (image, prompt) segmentation pair: a scene and the index of the object the prompt names."""

    id: str
    scene: Scene
    target: int
    prompt: str

    @property
    def mask(self) -> np.ndarray:
        """Ground-truth (H, W) bool mask of the named object."""
        return self.scene.objects[self.target].mask


def caption_for(objects: tuple[ShapeObject, ...] | list[ShapeObject]) -> str:
    """The caption listing ``objects`` in the given order: ``"a red circle and a blue square"``."""
    return " and ".join(obj.prompt for obj in objects)


def scene_seed(split: str, index: int) -> int:
    """The seed of scene number ``index`` of ``split`` (seed ranges of the splits are disjoint)."""
    if split not in _SPLIT_OFFSETS:
        raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
    if not 0 <= index < _SPLIT_STRIDE:
        raise ValueError(f"scene index {index} outside [0, {_SPLIT_STRIDE})")
    return _SPLIT_OFFSETS[split] + index


def _pick_kinds(rng: np.random.Generator, n_objects: int, distractor: str | None) -> list[tuple[str, str]]:
    """Choose ``n_objects`` distinct (shape, colour) pairs, honouring the requested distractor."""
    colours = list(COLOURS)
    if distractor is None:
        combos = [(s, c) for s in SHAPES for c in colours]
        picks = rng.choice(len(combos), size=n_objects, replace=False)
        return [combos[i] for i in picks]
    if n_objects < 2:
        raise ValueError("a distractor needs at least 2 objects")
    if distractor == "same_colour":
        colour = colours[rng.integers(len(colours))]
        s1, s2 = rng.choice(len(SHAPES), size=2, replace=False)
        kinds = [(SHAPES[s1], colour), (SHAPES[s2], colour)]
    elif distractor == "same_shape":
        shape = SHAPES[rng.integers(len(SHAPES))]
        c1, c2 = rng.choice(len(colours), size=2, replace=False)
        kinds = [(shape, colours[c1]), (shape, colours[c2])]
    else:
        raise ValueError(f"unknown distractor {distractor!r}; expected None or one of {DISTRACTORS}")
    # Any further objects: any combination not used yet.
    rest = [(s, c) for s in SHAPES for c in colours if (s, c) not in kinds]
    for i in rng.choice(len(rest), size=n_objects - 2, replace=False):
        kinds.append(rest[i])
    return kinds


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    """A (size, size, 3) float background far in colour from every named colour."""
    palette = np.array(list(COLOURS.values()), dtype=np.float64)
    while True:
        base = rng.uniform(0.0, 255.0, size=3)
        if np.min(np.linalg.norm(palette - base, axis=1)) >= _MIN_BG_DISTANCE:
            break
    bg = np.broadcast_to(base, (size, size, 3)).copy()
    if rng.random() < _P_GRADIENT:
        # A gentle linear ramp in a random direction, the same for all channels.
        angle = rng.uniform(0.0, 2.0 * np.pi)
        coords = (np.arange(size) + 0.5) / size - 0.5
        yy, xx = np.meshgrid(coords, coords, indexing="ij")
        ramp = np.cos(angle) * xx + np.sin(angle) * yy  # in [-0.71, 0.71]
        bg += (_GRADIENT_AMPLITUDE * ramp)[..., None]
    return bg


def _render_mask(shape: str, cx: float, cy: float, r: float, size: int) -> np.ndarray:
    """Boolean mask of a shape centred at (cx, cy) with "radius" r, sampled at pixel centres."""
    coords = np.arange(size) + 0.5
    yy, xx = np.meshgrid(coords, coords, indexing="ij")
    dx, dy = xx - cx, yy - cy
    if shape == "circle":
        return dx**2 + dy**2 <= r**2
    if shape == "square":
        half = _SQUARE_HALF * r
        return (np.abs(dx) <= half) & (np.abs(dy) <= half)
    if shape == "triangle":
        # Upright isosceles triangle: apex at (0, -r), base from (-r, 0.8 r) to (r, 0.8 r); its
        # half-width grows linearly from 0 at the apex to r at the base.
        base_y = _TRIANGLE_BASE * r
        return (dy <= base_y) & (np.abs(dx) <= (dy + r) * r / (base_y + r))
    raise ValueError(f"unknown shape {shape!r}; expected one of {SHAPES}")


def _extent(shape: str, r: float) -> float:
    """Radius of a circle around the shape's centre that contains the whole shape."""
    if shape == "circle":
        return r
    if shape == "square":
        return float(np.sqrt(2.0) * _SQUARE_HALF * r)
    return float(np.hypot(r, _TRIANGLE_BASE * r))  # triangle: its base corners are farthest


def make_scene(seed: int, size: int = 64, n_objects: int | None = None, distractor: str | None = None) -> Scene:
    """Render the scene of ``seed``.

    Args:
        seed: the scene's seed; the scene is a deterministic function of all the arguments.
        size: image side in pixels (shape sizes scale with it; 64 is the native size).
        n_objects: number of objects (1..3); drawn uniformly from 1..3 when None (2..3 when a
            distractor is requested).
        distractor: None, ``"same_colour"`` (two objects share a colour, not a shape) or
            ``"same_shape"`` (two objects share a shape, not a colour). No two objects ever share
            both, so every object's prompt names exactly one object.

    Returns:
        The scene; objects are listed in caption order.
    """
    rng = np.random.default_rng(seed)
    if n_objects is None:
        low = 2 if distractor is not None else 1
        n_objects = int(rng.integers(low, 4))
    if not 1 <= n_objects <= 3:
        raise ValueError(f"n_objects must be in 1..3, got {n_objects}")
    kinds = _pick_kinds(rng, n_objects, distractor)
    order = rng.permutation(n_objects)  # caption order is random, not tied to the distractor pair
    kinds = [kinds[i] for i in order]

    scale = size / 64.0
    image = _background(rng, size)
    placed: list[tuple[float, float, float]] = []  # (cx, cy, extent) of placed objects
    objects: list[ShapeObject] = []
    for shape, colour in kinds:
        radius = rng.uniform(_MIN_RADIUS, _MAX_RADIUS) * scale
        while True:
            ext = _extent(shape, radius)
            centre = None
            for _ in range(_PLACEMENT_TRIES):
                cx, cy = rng.uniform(ext, size - ext, size=2)
                if all(np.hypot(cx - px, cy - py) >= ext + pe + _GAP * scale for px, py, pe in placed):
                    centre = (cx, cy)
                    break
            if centre is not None:
                break
            # Crowded: try a smaller object (never below the minimum size scaled down further).
            radius -= scale
            if radius < 0.5 * _MIN_RADIUS * scale:
                raise RuntimeError(f"could not place {n_objects} objects for seed {seed}")
        cx, cy = centre
        placed.append((cx, cy, ext))
        mask = _render_mask(shape, cx, cy, radius, size)
        image[mask] = COLOURS[colour]
        objects.append(ShapeObject(shape=shape, colour=colour, mask=mask))

    image_u8 = np.clip(np.rint(image), 0, 255).astype(np.uint8)
    objs = tuple(objects)
    return Scene(image=image_u8, objects=objs, caption=caption_for(objs), seed=seed)


def eval_pairs(split: str, n: int, size: int = 64) -> list[ShapePair]:
    """The first ``n`` segmentation pairs of ``split`` (deterministic).

    Scene ``i`` of the split has 2 objects, or 3 when ``i % 3 == 2``; even-numbered scenes carry a
    hard distractor, alternating ``"same_colour"`` (i % 4 == 0) and ``"same_shape"`` (i % 4 == 2),
    so at least half the scenes have one. Each scene contributes one pair per object, in caption
    order, until ``n`` pairs are collected. Pair ids read ``"<split>-<scene index:05d>-<object>"``.
    """
    pairs: list[ShapePair] = []
    index = 0
    while len(pairs) < n:
        distractor = None if index % 2 else DISTRACTORS[(index // 2) % 2]
        n_objects = 3 if index % 3 == 2 else 2
        scene = make_scene(scene_seed(split, index), size=size, n_objects=n_objects, distractor=distractor)
        for k, obj in enumerate(scene.objects):
            if len(pairs) >= n:
                break
            pairs.append(ShapePair(id=f"{split}-{index:05d}-{k}", scene=scene, target=k, prompt=obj.prompt))
        index += 1
    return pairs
