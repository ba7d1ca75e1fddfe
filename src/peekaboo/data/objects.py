"""Synthetic "objects" scenes: colour emoji of everyday things over photographs, with exact visible-pixel masks.

Harder than :mod:`peekaboo.data.shapes`: objects have several colours and parts, backgrounds are textured, and
objects overlap. A scene is a deterministic function of its integer seed, its :class:`ObjectStyle` and its size:
a ``size`` x ``size`` RGB image (64 by default; anything from 32 to 512 works) with 1 to 4 objects of distinct
kinds (the vocabulary of :mod:`peekaboo.data.atlas`, e.g. ``"dog"``, ``"fire truck"``), each 15% to 60% of the
image side, rotated by up to 25 degrees, maybe mirrored, colour-jittered, maybe crossing the border (at least
40% of each stays visible) and maybe partly hidden by later objects, over a background of
:mod:`peekaboo.data.backgrounds` (photograph crop, texture, plain or graded colour).

An object's mask is its VISIBLE pixels: alpha >= 0.5 and not covered by a later object's alpha >= 0.5. No two
objects of a scene share a kind, so ``"a dog"`` names exactly one object; captions name every object in one of
:data:`CAPTION_FORMS` (``"a dog and a car"``, ``"the dog and the car"``, ``"dog, car"``, ``"a dog, a car and
a cat"``) and :func:`parse_caption` reads them back. Look-alike pairs (apple and tomato, dog and cat, car and
taxi, ...) can be forced into a scene.

Splits, from disjoint seed blocks (:func:`scene_seed`): ``train`` (:func:`training_scene`; the model trains on
it), ``tune`` and ``eval`` (:data:`STANDARD` scenes over the training photographs), ``robust`` (:data:`ROBUST`
scenes: more clutter and JPEG compression, over :data:`~peekaboo.data.backgrounds.HELD_OUT_PHOTOS` only, which
``train`` never uses) and ``tune_robust`` (the robust style from other seeds, for choosing settings).
:func:`eval_pairs` lists the (image, prompt, mask) pairs of the evaluation splits.
"""

from __future__ import annotations

import io
from dataclasses import dataclass, field

import numpy as np
from PIL import Image

from peekaboo.data.atlas import load_atlas
from peekaboo.data.backgrounds import HELD_OUT_PHOTOS, TRAINING_PHOTOS, draw_background
from peekaboo.data.captions import CAPTION_FORMS, CAPTION_WORD_BUDGET, article, content_words, list_caption
from peekaboo.data.object_layout import OCCLUDED_MIN, LayoutParams, composite, hidden_fractions, place_objects
from peekaboo.data.seeds import EVAL_SPLITS, SPLITS, TUNE_SPLITS, scene_seed

__all__ = [
    "CAPTION_FORMS",
    "EVAL_SPLITS",
    "ROBUST",
    "SPLITS",
    "STANDARD",
    "STYLES",
    "TUNE_SPLITS",
    "ObjectPair",
    "ObjectScene",
    "ObjectStyle",
    "SceneObject",
    "caption_for",
    "eval_pairs",
    "make_scene",
    "parse_caption",
    "scene_seed",
    "split_description",
    "training_scene",
]


# Fresh layouts tried before giving up on a scene (never reached in practice: objects shrink when crowded).
_LAYOUT_TRIES = 30


@dataclass(frozen=True)
class ObjectStyle:
    """How varied the scenes are: every knob of :func:`make_scene` that is data."""

    min_objects: int = 1
    max_objects: int = 4
    layout: LayoutParams = field(default_factory=lambda: LayoutParams(
        min_scale=0.15, max_scale=0.6, max_rotation=25.0, p_mirror=0.5, colour_gain=(0.85, 1.15),
        channel_gain=0.06, min_visible=0.4, max_hidden=0.5, min_pixels=20))
    # Per object: may it cross the border; per later object: is it placed over part of an earlier one.
    p_border: float = 0.25
    p_overlap: float = 0.5
    # Per multi-object scene: does it hold a look-alike pair (e.g. apple and tomato).
    p_lookalike: float = 0.35
    # Background kinds and their probabilities (see peekaboo.data.backgrounds.BACKGROUND_KINDS).
    backgrounds: tuple[tuple[str, float], ...] = (("photo", 0.55), ("texture", 0.25), ("plain", 0.2))
    # Photographs from the held-out set (robust splits) instead of the training set.
    held_out_photos: bool = False
    # JPEG quality range the finished image is compressed with; None = no compression.
    jpeg_quality: tuple[int, int] | None = None
    caption_forms: tuple[str, ...] = CAPTION_FORMS
    # Longer captions (commas count as words) fall back to the compact "comma" form.
    max_caption_words: int = CAPTION_WORD_BUDGET

    @property
    def photos(self) -> tuple[str, ...]:
        """The photographs this style's backgrounds are cropped from."""
        return HELD_OUT_PHOTOS if self.held_out_photos else TRAINING_PHOTOS


#: Training, tune and eval scenes.
STANDARD = ObjectStyle()
#: The robust splits: 2-4 objects, smaller and more often crossing the border or overlapping, stronger colour
#: jitter, only (held-out) photographs behind them, and JPEG compression.
ROBUST = ObjectStyle(
    min_objects=2,
    layout=LayoutParams(min_scale=0.13, max_scale=0.55, max_rotation=30.0, p_mirror=0.5, colour_gain=(0.75, 1.25),
                        channel_gain=0.1, min_visible=0.4, max_hidden=0.55,
                        min_pixels=16),
    p_border=0.4,
    p_overlap=0.5,
    backgrounds=(("photo", 1.0),),
    held_out_photos=True,
    jpeg_quality=(35, 70),
)
STYLES: dict[str, ObjectStyle] = {"standard": STANDARD, "robust": ROBUST}


@dataclass(frozen=True, eq=False)
class SceneObject:
    """One object of a scene."""

    kind: str  # the atlas kind's name, e.g. "fire truck"
    mask: np.ndarray  # (H, W) bool: exactly the object's visible pixels
    depth: int  # paste order: 0 lies at the bottom
    box: tuple[int, int, int, int]  # (left, top, right, bottom) of the whole sprite; may reach past the image
    full_pixels: int  # pixels of the whole object (alpha >= 0.5), inside the image or not
    hidden_fraction: float  # share of its pixels inside the image that later objects hide

    @property
    def name(self) -> str:
        """What prompts call it, e.g. ``"fire truck"``."""
        return self.kind

    @property
    def prompt(self) -> str:
        """The evaluation prompt naming this object: ``"a dog"``, ``"an apple"``."""
        return f"{article(self.kind)} {self.kind}"

    @property
    def occluded(self) -> bool:
        """Whether later objects hide a real part of it (at least 10% of its in-image pixels)."""
        return self.hidden_fraction >= OCCLUDED_MIN

    @property
    def visible_fraction(self) -> float:
        """Share of the whole object that is visible (border and occlusion together)."""
        return float(self.mask.sum()) / max(self.full_pixels, 1)


@dataclass(frozen=True, eq=False)
class ObjectScene:
    """A rendered scene; objects are listed in caption order."""

    image: np.ndarray  # (H, W, 3) uint8
    objects: tuple[SceneObject, ...]
    caption: str
    seed: int
    background: str  # "photo:<name>", "texture:<name>", "plain" or "graded"
    labels: np.ndarray  # (H, W) int16: caption index of the object visible at each pixel, -1 = background


@dataclass(frozen=True, eq=False)
class ObjectPair:
    """One (image, prompt) pair: a scene and the index (caption order) of the object the prompt names."""

    id: str
    scene: ObjectScene
    target: int
    prompt: str

    @property
    def mask(self) -> np.ndarray:
        """Ground truth: (H, W) bool, the named object's visible pixels."""
        return self.scene.objects[self.target].mask

    @property
    def occluded(self) -> bool:
        """Whether another object partly hides the named one."""
        return self.scene.objects[self.target].occluded


def caption_for(names: list[str] | tuple[str, ...], form: str = "and", max_words: int | None = None) -> str:
    """The caption listing the kinds ``names`` in order, in one of :data:`CAPTION_FORMS`.

    When ``max_words`` is given and the caption is longer (commas count as words), the ``"comma"`` form is used.
    """
    return list_caption(names, form, max_words, article)


def parse_caption(caption: str) -> list[str]:
    """The kind names a caption of any form lists, in order (two-word names such as ``"fire truck"`` included).

    Raises:
        ValueError: a word that is neither filler nor part of a kind's name.
    """
    names = set(load_atlas().names)
    words = content_words(caption)
    found, i = [], 0
    while i < len(words):
        two = " ".join(words[i:i + 2])
        if i + 1 < len(words) and two in names:
            found.append(two)
            i += 2
        elif words[i] in names:
            found.append(words[i])
            i += 1
        else:
            raise ValueError(f"caption {caption!r}: {words[i]!r} is not part of an object name")
    return found


def _pick_kinds(rng: np.random.Generator, n: int, lookalike: bool) -> list[str]:
    """``n`` distinct kind names; with ``lookalike``, the first two are look-alike partners."""
    atlas = load_atlas()
    names = list(atlas.names)
    if not lookalike or n < 2:
        return [names[i] for i in rng.choice(len(names), size=n, replace=False)]
    first = names[int(rng.integers(len(names)))]
    partners = atlas.by_name[first].lookalikes
    picked = [first, partners[int(rng.integers(len(partners)))]]
    rest = [name for name in names if name not in picked]
    return picked + [rest[i] for i in rng.choice(len(rest), size=n - 2, replace=False)]


def _weighted(rng: np.random.Generator, options: tuple[tuple[str, float], ...]) -> str:
    weights = np.array([w for _, w in options], dtype=np.float64)
    return options[int(rng.choice(len(options), p=weights / weights.sum()))][0]


def make_scene(seed: int, size: int = 64, style: ObjectStyle = STANDARD, n_objects: int | None = None,
               background: str | None = None, occlusion: bool | None = None,
               lookalike: bool | None = None) -> ObjectScene:
    """Render the scene of ``seed``: a deterministic function of all the arguments.

    Args:
        seed: the scene's seed.
        size: image side in pixels (32 to 512; object sizes are relative to it).
        style: how varied the scene is.
        n_objects: number of objects; None = uniform in the style's range.
        background: ``"photo"``, ``"texture"`` or ``"plain"``; None = drawn with the style's probabilities.
        occlusion: None = each later object overlaps an earlier one with the style's probability; True = that,
            and at least one object is partly hidden by a later one (needs 2+ objects); False = no overlap.
        lookalike: True = two of the objects are look-alike partners (2+ objects); None = the style's probability.

    Returns:
        The scene: image (size, size, 3) uint8, objects in caption order with (size, size) bool masks.

    Raises:
        ValueError: ``n_objects`` outside the style's range, or a forced occlusion or look-alike with 1 object.
        RuntimeError: no layout was found (not seen with the named styles).
    """
    rng = np.random.default_rng(seed)
    if n_objects is None:
        n_objects = int(rng.integers(style.min_objects, style.max_objects + 1))
    if not style.min_objects <= n_objects <= style.max_objects:
        raise ValueError(f"n_objects must be in {style.min_objects}..{style.max_objects}, got {n_objects}")
    if n_objects < 2 and (occlusion or lookalike):
        raise ValueError("a forced occlusion or look-alike pair needs at least 2 objects")
    if lookalike is None:
        lookalike = n_objects >= 2 and rng.random() < style.p_lookalike
    names = _pick_kinds(rng, n_objects, lookalike)
    names = [names[i] for i in rng.permutation(n_objects)]  # paste order, independent of the look-alike pair
    kind = background or _weighted(rng, style.backgrounds)
    bg, source = draw_background(rng, size, kind, style.photos)

    # Deliberate overlaps: each later object with the style's probability (unless occlusion=False), and a forced one.
    overlaps = [bool(occlusion is not False and rng.random() < style.p_overlap) for _ in range(n_objects)]
    if occlusion:
        overlaps[int(rng.integers(1, n_objects))] = True
    atlas = load_atlas()
    for _ in range(_LAYOUT_TRIES):
        layout = place_objects(rng, [atlas.by_name[n] for n in names], size, style.layout, style.p_border, overlaps)
        if layout is not None:
            break
    else:
        raise RuntimeError(f"could not place {n_objects} objects for seed {seed}")
    placed, depth_labels = layout
    image = np.clip(np.rint(composite(bg, placed)), 0, 255).astype(np.uint8)
    if style.jpeg_quality is not None:
        buffer = io.BytesIO()
        quality = int(rng.integers(*style.jpeg_quality, endpoint=True))
        Image.fromarray(image).save(buffer, format="JPEG", quality=quality)
        image = np.asarray(Image.open(buffer).convert("RGB"))

    order = rng.permutation(n_objects)  # caption position -> depth
    counts = hidden_fractions(placed, depth_labels)
    objects = []
    labels = np.full((size, size), -1, dtype=np.int16)
    for index, depth in enumerate(order):
        obj = placed[depth]
        mask = depth_labels == depth
        labels[mask] = index
        h, w = obj.alpha.shape
        objects.append(SceneObject(kind=obj.kind, mask=mask, depth=int(depth), box=(obj.x, obj.y, obj.x + w, obj.y + h),
                                   full_pixels=obj.full_pixels, hidden_fraction=counts[depth][1]))
    form = style.caption_forms[int(rng.integers(len(style.caption_forms)))]
    caption = caption_for([o.kind for o in objects], form, style.max_caption_words)
    return ObjectScene(image=image, objects=tuple(objects), caption=caption, seed=seed, background=source,
                       labels=labels)


def training_scene(index: int, size: int = 64) -> ObjectScene:
    """Training scene ``index`` (seed ``scene_seed("train", index)``, :data:`STANDARD` style, all draws random).

    Captions are never empty here: dropping some for classifier-free guidance is the trainer's business.
    """
    return make_scene(scene_seed("train", index), size=size, style=STANDARD)


# Evaluation layouts, cycled over scene indices: object counts, background kinds. Every multi-object scene has an
# occluded object and even-numbered ones a look-alike pair, so the mix below holds for any number of pairs.
_STANDARD_COUNTS = (2, 3, 1, 2, 4)  # 80% of scenes hold 2+ objects
_STANDARD_BACKGROUNDS = ("photo", "texture", "photo", "plain")  # 75% photograph or texture
_ROBUST_COUNTS = (3, 2, 4, 3, 2)
_SPLIT_LAYOUTS: dict[str, tuple[ObjectStyle, tuple[int, ...], tuple[str, ...]]] = {
    "tune": (STANDARD, _STANDARD_COUNTS, _STANDARD_BACKGROUNDS),
    "eval": (STANDARD, _STANDARD_COUNTS, _STANDARD_BACKGROUNDS),
    "robust": (ROBUST, _ROBUST_COUNTS, ("photo",)),
    "tune_robust": (ROBUST, _ROBUST_COUNTS, ("photo",)),
}


def split_description(split: str) -> str:
    """One line on what the pairs of an evaluation split look like (for reports)."""
    style, counts, backgrounds = _SPLIT_LAYOUTS[split]
    multi = sum(c >= 2 for c in counts) / len(counts)
    shown = sum(b != "plain" for b in backgrounds) / len(backgrounds)
    photos = "held-out photographs only" if style.held_out_photos else "training photographs, textures or plain colours"
    parts = [f"scenes of {min(counts)} to {max(counts)} emoji objects ({len(load_atlas().kinds)} kinds) "
             f"{style.layout.min_scale:.0%}..{style.layout.max_scale:.0%} of the image side, {multi:.0%} with 2+ "
             "objects, every multi-object scene with a partly hidden object and half with a look-alike pair",
             f"backgrounds {shown:.0%} photograph or texture ({photos})"]
    if style.jpeg_quality:
        parts.append(f"JPEG quality {style.jpeg_quality[0]}..{style.jpeg_quality[1]}")
    return "; ".join(parts)


def eval_pairs(split: str, n: int, size: int = 64) -> list[ObjectPair]:
    """The first ``n`` (image, prompt, mask) pairs of an evaluation split (deterministic).

    Scene ``i`` takes its object count and background kind from the split's cycles (``tune`` / ``eval``:
    2, 3, 1, 2, 4 objects; photograph, texture, photograph, plain), multi-object scenes have at least one occluded
    object and even-numbered ones a look-alike pair. Each scene gives one pair per object, in caption order, until
    ``n`` pairs are collected. Ids read ``"<split>-<scene index:05d>-<object index>"``; prompts ``"a dog"``,
    ``"an apple"``.

    Raises:
        ValueError: ``split`` is not one of :data:`EVAL_SPLITS`.
    """
    if split not in _SPLIT_LAYOUTS:
        raise ValueError(f"{split!r} has no evaluation pairs; expected one of {EVAL_SPLITS}")
    style, counts, backgrounds = _SPLIT_LAYOUTS[split]
    pairs: list[ObjectPair] = []
    index = 0
    while len(pairs) < n:
        n_objects = counts[index % len(counts)]
        multi = n_objects >= 2
        scene = make_scene(scene_seed(split, index), size=size, style=style, n_objects=n_objects,
                           background=backgrounds[index % len(backgrounds)], occlusion=multi or None,
                           lookalike=multi and index % 2 == 0)
        for k, obj in enumerate(scene.objects[: n - len(pairs)]):
            pairs.append(ObjectPair(id=f"{split}-{index:05d}-{k}", scene=scene, target=k, prompt=obj.prompt))
        index += 1
    return pairs
