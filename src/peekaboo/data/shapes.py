"""Synthetic "coloured shapes" scenes with captions and exact ground-truth masks.

These scenes are what the project's bundled text-to-image model is trained on, and what the
out-of-the-box demo and the tests segment. Everything here is pure numpy: a scene is a
deterministic function of its integer seed and its :class:`SceneStyle`, so the same seed always
yields the same pixels, caption and masks on every machine.

A scene is a ``size`` x ``size`` RGB image (64 x 64 by default) holding non-overlapping shapes
(circle, square, triangle), each filled with one of a few well-separated named colours, on a
background whose colour is far from every named colour. How varied the scenes are is data, a
:class:`SceneStyle`; two are named:

* :data:`CLASSIC`: 1 to 3 objects of radius 9..16 px (at 64 x 64) wholly inside the image, exact
  named colours, plain or gently graded backgrounds, captions ``"a red circle and a blue square"``.
  The ``tune`` and ``eval`` pairs (:func:`eval_pairs`) use it and are pinned byte for byte
  (tests/test_data.py): the published benchmark figures were measured on them.
* :data:`WIDE`: 1 to 4 objects of radius 5..18 px that may cross the image border (their masks
  are clipped to the image, and each keeps at least 40% of its pixels in view), named colours
  jittered by up to +/- 15 per channel, backgrounds plain, graded, noisy and blotchy (every
  background pixel still far from every named colour), and captions in several forms
  (:data:`CAPTION_FORMS`): ``"a red circle and a blue square"``, ``"the red circle and the blue
  square"``, ``"red circle, blue square"``, ``"a red circle, a blue square and a green
  triangle"``. The bundled model's training scenes and the ``robust`` split use it.

In every style, no two objects of a scene share both colour and shape, so a prompt
``"a <colour> <shape>"`` names exactly one object; the hard distractors (a same-colour or a
same-shape pair, :data:`DISTRACTORS`) can be forced. Objects are listed in caption order and
:func:`parse_caption` reads any caption form back into (colour, shape) pairs.

The splits' seed blocks are disjoint (:mod:`peekaboo.data.seeds`). Training must draw from ``train`` only; ``tune``
and ``tune_robust`` are for choosing Peekaboo's settings, ``eval`` for reporting, and ``robust`` for reporting on
the wide style (:func:`robust_pairs`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from peekaboo.data.captions import CAPTION_FORMS, content_words, list_caption
from peekaboo.data.seeds import SPLITS, scene_seed
from peekaboo.data.shape_layout import COLOURS, SHAPES, SceneStyle, ShapeObject, draw_background, place_objects

__all__ = [
    "CAPTION_FORMS",
    "CLASSIC",
    "COLOURS",
    "DISTRACTORS",
    "SHAPES",
    "SPLITS",
    "STYLES",
    "WIDE",
    "Scene",
    "SceneStyle",
    "ShapeObject",
    "ShapePair",
    "caption_for",
    "eval_pairs",
    "make_scene",
    "parse_caption",
    "robust_pairs",
    "scene_seed",
]

#: Kinds of hard distractor :func:`make_scene` can force.
DISTRACTORS: tuple[str, ...] = ("same_colour", "same_shape")


# Fresh layouts (new sizes and places) tried when a scene gets too crowded to place every object.
_LAYOUT_TRIES = 20


#: The original scenes: the ``tune`` / ``eval`` pairs and the first bundled model's training scenes.
CLASSIC = SceneStyle()

#: The widest scenes: the bundled model's training scenes from issue 14 on, and the ``robust`` split.
WIDE = SceneStyle(
    max_objects=4,
    min_radius=5.0,
    max_radius=18.0,
    min_shrunk_radius=5.0,
    p_border=0.3,
    colour_jitter=15,
    p_gradient=0.5,
    gradient_amplitude=40.0,
    p_noise=0.35,
    p_blotches=0.35,
    caption_forms=CAPTION_FORMS,
)

#: Named styles, e.g. for a training config that names its style.
STYLES: dict[str, SceneStyle] = {"classic": CLASSIC, "wide": WIDE}


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


def caption_for(
    objects: tuple[ShapeObject, ...] | list[ShapeObject], form: str = "and", max_words: int | None = None
) -> str:
    """The caption listing ``objects`` in the given order.

    Args:
        objects: the objects, in caption order.
        form: one of :data:`CAPTION_FORMS`; ``"and"`` gives ``"a red circle and a blue square"``.
        max_words: when the caption would be longer (commas count as words), the compact ``"comma"``
            form is used instead; None = no limit.
    """
    return list_caption([obj.name for obj in objects], form, max_words)


def parse_caption(caption: str) -> list[tuple[str, str]]:
    """The (colour, shape) pairs a caption of any form names, in order.

    Raises:
        ValueError: a word that is neither filler, colour nor shape, or a colour without its shape.
    """
    words = content_words(caption)
    pairs = list(zip(words[::2], words[1::2], strict=False))
    if len(words) % 2 or any(c not in COLOURS or s not in SHAPES for c, s in pairs):
        raise ValueError(f"caption {caption!r} is not a list of '<colour> <shape>' names")
    return pairs


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


def make_scene(
    seed: int,
    size: int = 64,
    n_objects: int | None = None,
    distractor: str | None = None,
    style: SceneStyle = CLASSIC,
) -> Scene:
    """Render the scene of ``seed``.

    Args:
        seed: the scene's seed; the scene is a deterministic function of all the arguments.
        size: image side in pixels (shape sizes scale with it; 64 is the native size).
        n_objects: number of objects (``style.min_objects .. style.max_objects``); drawn uniformly
            from that range when None (from 2 on when a distractor is requested).
        distractor: None, ``"same_colour"`` (two objects share a colour, not a shape) or
            ``"same_shape"`` (two objects share a shape, not a colour). No two objects ever share
            both, so every object's prompt names exactly one object.
        style: how varied the scene is (:data:`CLASSIC` by default, the original scenes).

    Returns:
        The scene; objects are listed in caption order.

    Raises:
        ValueError: ``n_objects`` outside the style's range.
        RuntimeError: the objects could not be placed (not seen for the named styles).
    """
    rng = np.random.default_rng(seed)
    if n_objects is None:
        low = max(2, style.min_objects) if distractor is not None else style.min_objects
        n_objects = int(rng.integers(low, style.max_objects + 1))
    if not style.min_objects <= n_objects <= style.max_objects:
        raise ValueError(f"n_objects must be in {style.min_objects}..{style.max_objects}, got {n_objects}")
    kinds = _pick_kinds(rng, n_objects, distractor)
    order = rng.permutation(n_objects)  # caption order is random, not tied to the distractor pair
    kinds = [kinds[i] for i in order]

    image = draw_background(rng, size, style)
    for _ in range(_LAYOUT_TRIES):
        objects = place_objects(rng, kinds, size, style)
        if objects is not None:
            break
    else:
        raise RuntimeError(f"could not place {n_objects} objects for seed {seed}")
    for obj in objects:
        image[obj.mask] = obj.rgb

    form = style.caption_forms[0]
    if len(style.caption_forms) > 1:
        form = style.caption_forms[int(rng.integers(len(style.caption_forms)))]
    image_u8 = np.clip(np.rint(image), 0, 255).astype(np.uint8)
    objs = tuple(objects)
    caption = caption_for(objs, form, style.max_caption_words)
    return Scene(image=image_u8, objects=objs, caption=caption, seed=seed)


def _collect_pairs(split: str, n: int, size: int, style: SceneStyle, layout: tuple[int, ...]) -> list[ShapePair]:
    """The first ``n`` pairs of ``split``: scene ``i`` has ``layout[i % len(layout)]`` objects, and
    even-numbered scenes with 2+ objects carry a distractor, alternating same-colour and same-shape."""
    pairs: list[ShapePair] = []
    index = 0
    while len(pairs) < n:
        n_objects = layout[index % len(layout)]
        distractor = None if index % 2 or n_objects < 2 else DISTRACTORS[(index // 2) % 2]
        scene = make_scene(scene_seed(split, index), size=size, n_objects=n_objects, distractor=distractor, style=style)
        for k, obj in enumerate(scene.objects):
            if len(pairs) >= n:
                break
            pairs.append(ShapePair(id=f"{split}-{index:05d}-{k}", scene=scene, target=k, prompt=obj.prompt))
        index += 1
    return pairs


# Object counts of consecutive evaluation scenes (cycled). Classic: 2, 2, 3 (as it always was). Robust:
# every count of the wide style; its even scenes (2 and 4 objects) carry the distractors.
_CLASSIC_LAYOUT = (2, 2, 3)
_ROBUST_LAYOUT = (2, 3, 4, 1)


#: The scene style and object-count layout of each evaluation split.
_SPLIT_LAYOUTS: dict[str, tuple[SceneStyle, tuple[int, ...]]] = {
    "tune": (CLASSIC, _CLASSIC_LAYOUT), "eval": (CLASSIC, _CLASSIC_LAYOUT), "robust": (WIDE, _ROBUST_LAYOUT),
    "tune_robust": (WIDE, _ROBUST_LAYOUT)}



def split_description(split: str) -> str:
    """One sentence on what the pairs of an evaluation split look like (for reports), from its style."""
    style, layout = _SPLIT_LAYOUTS[split]
    counts = sorted(set(layout))
    count_text = " or ".join(str(c) for c in counts) if len(counts) < 3 else f"{counts[0]} to {counts[-1]}"
    # _collect_pairs gives even-numbered multi-object scenes a distractor: count them over one whole cycle.
    cycle = [layout[i % len(layout)] for i in range(math.lcm(len(layout), 2))]
    multi = [i for i, c in enumerate(cycle) if c >= 2]
    share = sum(i % 2 == 0 for i in multi) / len(multi)
    parts = [f"scenes of {count_text} coloured shapes of radius {style.min_radius:g}..{style.max_radius:g} px "
             f"(at 64x64), {share:.0%} of the multi-object ones with a hard distractor of the same colour or the "
             "same shape"]
    if style.p_border:
        parts.append(f"{style.p_border:.0%} of the objects may cross the image border")
    if style.colour_jitter:
        parts.append(f"colours jittered by up to +/-{style.colour_jitter} per channel")
    if style.textured:
        parts.append("backgrounds plain, graded, noisy or blotched")
    return "; ".join(parts)


def eval_pairs(split: str, n: int, size: int = 64) -> list[ShapePair]:
    """The first ``n`` segmentation pairs of ``split`` (deterministic).

    For ``tune`` / ``eval`` (and ``train``), classic scenes: scene ``i`` has 2 objects, or 3 when
    ``i % 3 == 2``; even-numbered scenes carry a hard distractor, alternating ``"same_colour"``
    (i % 4 == 0) and ``"same_shape"`` (i % 4 == 2), so at least half the scenes have one. Each scene
    contributes one pair per object, in caption order, until ``n`` pairs are collected. Pair ids
    read ``"<split>-<scene index:05d>-<object>"``; prompts ``"a <colour> <shape>"``.
    ``"robust"`` gives :func:`robust_pairs`; ``"tune_robust"`` gives scenes made the same way from its own seeds
    (for choosing settings for wide scenes without looking at ``robust``).
    """
    if split == "robust":
        return robust_pairs(n, size)
    style, layout = _SPLIT_LAYOUTS.get(split, _SPLIT_LAYOUTS["eval"])  # "train" pairs: classic, as tune/eval
    return _collect_pairs(split, n, size, style, layout)


def robust_pairs(n: int, size: int = 64) -> list[ShapePair]:
    """The first ``n`` pairs of the ``robust`` split: :data:`WIDE` scenes (deterministic).

    Scene ``i`` has 2, 3, 4, 1 objects for ``i % 4 == 0, 1, 2, 3``; the 2- and 4-object scenes
    carry a hard distractor, alternating same-colour and same-shape. Objects may cross the border
    (each keeps at least 40% of its pixels in view), colours are jittered, backgrounds textured.
    Prompts stay ``"a <colour> <shape>"`` and each names exactly one object of its scene (no two
    objects share both colour and shape); ids read ``"robust-<scene index:05d>-<object>"``.
    """
    return _collect_pairs("robust", n, size, *_SPLIT_LAYOUTS["robust"])
