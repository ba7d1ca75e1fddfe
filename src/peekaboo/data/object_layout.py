"""Placing and pasting the sprites of an object scene (the geometry behind :mod:`peekaboo.data.objects`).

Objects are pasted in depth order, each over the ones before it. An object's ground truth is the set of pixels
where its alpha is at least 0.5 and no later object's alpha is: :func:`composite` keeps that as a label map (each
pixel holds the depth of the topmost object opaque there, or -1), so masks are exactly the visible pixels.

:func:`place_objects` draws each object's size, rotation, mirror and colour gain, then a position: anywhere
wholly inside the image, partly outside it (``crossing``), or overlapping an earlier object (``overlap``), and
keeps it only when every object placed so far still shows at least ``min_visible`` of its whole sprite (border
and occlusion together) and enough pixels. An object counts as occluded when later objects hide at least
:data:`OCCLUDED_MIN` of its in-image pixels.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
from PIL import Image

from peekaboo.data.atlas import ObjectKind

__all__ = ["OCCLUDED_MIN", "LayoutParams", "Placed", "composite", "hidden_fractions", "place_objects"]

#: An object is occluded when later objects hide at least this share of its pixels inside the image.
OCCLUDED_MIN = 0.1
# Alpha (0..255) at or above which a sprite pixel belongs to its object.
_OPAQUE = 128
# Position tries per object size before the object is shrunk.
_TRIES = 40
# Each shrink multiplies the object's scale by this; below the floor the layout fails.
_SHRINK = 0.85
_MIN_SCALE = 0.1
# An overlapping object's centre lies this far (times the sum of the two objects' radii) from its partner's.
_OVERLAP_DISTANCE = (0.35, 0.85)


@dataclass(frozen=True)
class LayoutParams:
    """The geometric knobs of a scene style (lengths relative to the image side)."""

    min_scale: float  # the un-rotated sprite's longer side, as a share of the image side
    max_scale: float
    max_rotation: float  # degrees, either way
    p_mirror: float
    colour_gain: tuple[float, float]  # brightness gain range
    channel_gain: float  # each channel's gain varies by up to this much more
    min_visible: float  # every object keeps this share of its whole sprite visible
    max_hidden: float  # later objects hide at most this share of an object's pixels inside the image
    min_pixels: int  # ... and this many pixels, at 64 x 64 (scaled with the area)


@dataclass(frozen=True, eq=False)
class Placed:
    """One pasted object: its sprite as rendered and where its top-left corner lies (may be outside the image)."""

    kind: str
    rgb: np.ndarray  # (h, w, 3) float32, colour-jittered, premultiplied by alpha
    alpha: np.ndarray  # (h, w) float32 in 0..1
    x: int
    y: int
    full_pixels: int  # opaque pixels of the whole sprite, inside the image or not

    @property
    def opaque(self) -> np.ndarray:
        """(h, w) bool: the sprite's pixels that belong to the object."""
        return self.alpha >= _OPAQUE / 255.0

    @property
    def centre(self) -> tuple[float, float]:
        return self.x + self.alpha.shape[1] / 2.0, self.y + self.alpha.shape[0] / 2.0

    @property
    def radius(self) -> float:
        return max(self.alpha.shape) / 2.0


@functools.cache
def _pyramid(kind: ObjectKind, mirrored: bool) -> tuple[Image.Image, ...]:
    """The sprite (mirrored or not) in premultiplied "RGBa" mode at its full size, 1/2, 1/4 and 1/8: each render
    resizes from the smallest level at least as large as it needs, which is several times faster."""
    sprite = kind.sprite.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if mirrored else kind.sprite
    levels = [sprite.convert("RGBa")]
    for _ in range(3):
        w, h = levels[-1].size
        levels.append(levels[-1].resize((max(1, w // 2), max(1, h // 2)), Image.Resampling.BOX))
    return tuple(levels)


def _render(rng: np.random.Generator, kind: ObjectKind, long_side: float, params: LayoutParams,
            ) -> tuple[np.ndarray, np.ndarray]:
    """The sprite of ``kind`` scaled so its longer side is ``long_side`` px, mirrored, rotated and colour-jittered.

    Returns:
        ``(rgb, alpha)``: (h, w, 3) float32 colour premultiplied by alpha (0..255) and (h, w) float32 alpha (0..1).
    """
    levels = _pyramid(kind, bool(rng.random() < params.p_mirror))
    source = next((level for level in reversed(levels) if max(level.size) >= long_side), levels[0])
    factor = long_side / max(levels[0].size)
    size = (max(1, round(levels[0].width * factor)), max(1, round(levels[0].height * factor)))
    # Resize first, then rotate the small sprite: five times faster than rotating at 128 px, and looks the same.
    # Premultiplied alpha throughout ("RGBa"), so transparent pixels never darken the edges.
    sprite = source.resize(size, Image.Resampling.BILINEAR)
    angle = rng.uniform(-params.max_rotation, params.max_rotation)
    sprite = sprite.rotate(angle, resample=Image.Resampling.BICUBIC, expand=True)
    pixels = np.asarray(sprite, dtype=np.float32)
    gains = rng.uniform(*params.colour_gain) * rng.uniform(1 - params.channel_gain, 1 + params.channel_gain, size=3)
    alpha = pixels[..., 3] / 255.0
    rgb = np.minimum(pixels[..., :3] * gains.astype(np.float32), 255.0 * alpha[..., None])
    return rgb, alpha


def _clip(x: int, y: int, h: int, w: int, size: int) -> tuple[slice, slice, slice, slice] | None:
    """Image and sprite slices of a (h, w) sprite at (x, y); None when it lies wholly outside the image."""
    x0, y0, x1, y1 = max(x, 0), max(y, 0), min(x + w, size), min(y + h, size)
    if x0 >= x1 or y0 >= y1:
        return None
    return slice(y0, y1), slice(x0, x1), slice(y0 - y, y1 - y), slice(x0 - x, x1 - x)


def _fits(labels: np.ndarray, visible: list[int], inside_pixels: list[int], placed: list[Placed], opaque: np.ndarray,
          full: int, x: int, y: int, params: LayoutParams, min_pixels: float, overlap: int | None,
          ) -> tuple[list[int], int] | None:
    """The visible-pixel counts of every object after pasting a new one at (x, y), new one last, and the new one's
    pixels inside the image; None when some object would show too little (or, for an ``overlap`` with object
    ``overlap``, that one too little hidden)."""
    size = labels.shape[0]
    where = _clip(x, y, *opaque.shape, size)
    if where is None:
        return None
    iy, ix, sy, sx = where
    mine = opaque[sy, sx]
    inside = int(np.count_nonzero(mine))
    if inside < params.min_visible * full or inside < min_pixels:
        return None
    under = labels[iy, ix][mine]  # depth of the object each new opaque pixel would cover (-1: none)
    if overlap is None:
        # A non-overlapping object must not touch the others (the common, cheap rejection).
        return None if (under >= 0).any() else ([*visible, inside], inside)
    covered = np.bincount(under + 1, minlength=len(placed) + 1)[1:]
    if covered[overlap] < 1.5 * OCCLUDED_MIN * inside_pixels[overlap]:
        return None  # aim past the occlusion threshold, so the partner really counts as occluded
    after = [v - int(c) for v, c in zip(visible, covered, strict=True)]
    for obj, seen, own in zip(placed, after, inside_pixels, strict=True):
        if seen < params.min_visible * obj.full_pixels or seen < min_pixels or seen < (1 - params.max_hidden) * own:
            return None
    return [*after, inside], inside


def place_objects(rng: np.random.Generator, kinds: list[ObjectKind], size: int, params: LayoutParams,
                  p_border: float, overlaps: list[bool]) -> tuple[list[Placed], np.ndarray] | None:
    """Render and place one object per kind, in paste (depth) order.

    Args:
        rng: the scene's generator.
        kinds: the objects' kinds, bottom first.
        size: image side in pixels.
        params: sizes, rotation, jitter and visibility limits.
        p_border: probability that an object may cross the image border.
        overlaps: per object, whether it is placed over part of an earlier one (ignored for the first).

    Returns:
        ``(placed, labels)``: the objects and the (size, size) int16 label map (depth of the topmost object at
        each pixel, -1 for background); None when the scene got too crowded (try again with fresh draws).
    """
    labels = np.full((size, size), -1, dtype=np.int16)
    min_pixels = params.min_pixels * (size / 64.0) ** 2
    placed: list[Placed] = []
    visible: list[int] = []  # per object, its pixels visible so far
    inside_pixels: list[int] = []  # per object, its pixels inside the image (visible or hidden)
    max_scale = params.max_scale - 0.05 * (len(kinds) - 1)  # crowded scenes hold smaller objects
    for depth, kind in enumerate(kinds):
        scale = rng.uniform(params.min_scale, max(params.min_scale, max_scale))
        crossing = rng.random() < p_border
        overlap = int(rng.integers(depth)) if depth and overlaps[depth] else None
        found = None
        while found is None:
            rgb, alpha = _render(rng, kind, scale * size, params)
            opaque = alpha >= _OPAQUE / 255.0
            full = int(opaque.sum())
            h, w = alpha.shape
            # All of this size's candidate positions (top-left corners) in one draw.
            if overlap is not None:
                partner = placed[overlap]
                distance = rng.uniform(*_OVERLAP_DISTANCE, size=_TRIES) * (partner.radius + max(h, w) / 2.0)
                angle = rng.uniform(0.0, 2.0 * np.pi, size=_TRIES)
                cx, cy = partner.centre
                xs = np.rint(cx + distance * np.cos(angle) - w / 2.0).astype(int)
                ys = np.rint(cy + distance * np.sin(angle) - h / 2.0).astype(int)
            elif crossing:
                xs = rng.integers(-(w // 2), size - w // 2, size=_TRIES)
                ys = rng.integers(-(h // 2), size - h // 2, size=_TRIES)
            else:
                xs = rng.integers(0, max(1, size - w + 1), size=_TRIES)
                ys = rng.integers(0, max(1, size - h + 1), size=_TRIES)
            for x, y in zip(xs.tolist(), ys.tolist(), strict=True):
                fit = _fits(labels, visible, inside_pixels, placed, opaque, full, x, y, params, min_pixels, overlap)
                if fit is not None:
                    found = (x, y, *fit)
                    break
            if found is None:
                scale *= _SHRINK
                if scale < _MIN_SCALE:
                    return None
        x, y, visible, inside = found
        inside_pixels.append(inside)
        obj = Placed(kind=kind.name, rgb=rgb, alpha=alpha, x=x, y=y, full_pixels=full)
        iy, ix, sy, sx = _clip(x, y, h, w, size)
        labels[iy, ix][opaque[sy, sx]] = depth
        placed.append(obj)
    return placed, labels


def composite(background: np.ndarray, placed: list[Placed]) -> np.ndarray:
    """Paste the objects over ``background`` (alpha blending, in order).

    Args:
        background: (H, W, 3) uint8.
        placed: the objects, bottom first.

    Returns:
        image: (H, W, 3) float32, 0..255.
    """
    image = background.astype(np.float32)
    size = image.shape[0]
    for obj in placed:
        where = _clip(obj.x, obj.y, *obj.alpha.shape, size)
        if where is None:
            continue
        iy, ix, sy, sx = where
        a = obj.alpha[sy, sx, None]
        image[iy, ix] = image[iy, ix] * (1.0 - a) + obj.rgb[sy, sx]  # rgb is premultiplied
    return image


def hidden_fractions(placed: list[Placed], labels: np.ndarray) -> list[tuple[int, float]]:
    """Per object, its visible pixel count and the share of its in-image pixels that later objects hide."""
    size = labels.shape[0]
    out = []
    for depth, obj in enumerate(placed):
        visible = int((labels == depth).sum())
        where = _clip(obj.x, obj.y, *obj.alpha.shape, size)
        inside = int(obj.opaque[where[2], where[3]].sum()) if where is not None else 0
        out.append((visible, 1.0 - visible / inside if inside else 0.0))
    return out
