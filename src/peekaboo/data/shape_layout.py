"""Drawing and placing the shapes of a coloured-shapes scene (the geometry behind :mod:`peekaboo.data.shapes`).

The named colours and shape words, the knobs of how varied a scene is (:class:`SceneStyle`), backgrounds far in
colour from every named colour (plain, graded, noisy or blotched), each shape's mask sampled at pixel centres, and
:func:`place_objects`: non-overlapping objects, wholly inside the image or crossing its border, each keeping enough
of its pixels in view. Every random draw comes from the scene's generator in a fixed order, so the scenes of
:mod:`peekaboo.data.shapes` stay the same byte for byte.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from peekaboo.data.captions import CAPTION_WORD_BUDGET

__all__ = ["COLOURS", "SHAPES", "SceneStyle", "ShapeObject", "draw_background", "place_objects"]

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

# Sizes are given in pixels at this native image side and scaled for other sizes.
_NATIVE_SIZE = 64
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


@dataclass(frozen=True)
class SceneStyle:
    """How varied the scenes are: every knob of :func:`~peekaboo.data.shapes.make_scene` that is data, not code.

    Lengths are in pixels at 64 x 64 (scaled for other sizes); colours in RGB units (0..255).
    Probabilities are per scene (background) or per object (border).
    """

    min_objects: int = 1
    max_objects: int = 3
    min_radius: float = 9.0
    max_radius: float = 16.0
    # A crowded scene shrinks its next object one pixel at a time, down to this radius at most.
    min_shrunk_radius: float = 4.5
    # Probability that an object may cross the image border (its centre then lies anywhere in the image).
    p_border: float = 0.0
    # An object crossing the border keeps at least this fraction of its pixels, and this many, in view.
    min_visible_fraction: float = 0.4
    min_visible_pixels: int = 30
    # Object colours: each channel of the named colour moves by a uniform integer in [-jitter, jitter].
    colour_jitter: int = 0
    # Background: a gentle linear gradient (peak-to-peak amplitude), Gaussian pixel noise (std, clipped
    # at noise_clip), and soft Gaussian blotches of random colour (1..max_blotches of them).
    p_gradient: float = 0.5
    gradient_amplitude: float = 24.0
    p_noise: float = 0.0
    noise_std: float = 6.0
    noise_clip: float = 15.0
    p_blotches: float = 0.0
    max_blotches: int = 4
    blotch_sigma: tuple[float, float] = (4.0, 14.0)
    blotch_amplitude: float = 30.0
    # Textured backgrounds are redrawn until every pixel is at least this far from every named colour
    # (plain and graded ones keep their base colour _MIN_BG_DISTANCE away, as they always did).
    min_bg_pixel_distance: float = 80.0
    # Caption forms drawn from uniformly (see CAPTION_FORMS); forms longer than max_caption_words
    # words fall back to the compact "comma" form.
    caption_forms: tuple[str, ...] = ("and",)
    max_caption_words: int = CAPTION_WORD_BUDGET

    @property
    def textured(self) -> bool:
        """Whether backgrounds can carry pixel noise or blotches."""
        return self.p_noise > 0 or self.p_blotches > 0


@dataclass(frozen=True)
class ShapeObject:
    """One shape in a scene."""

    shape: str
    colour: str
    mask: np.ndarray  # (H, W) bool, exactly the pixels painted with this object's colour (inside the image)
    rgb: tuple[int, int, int] | None = None  # the painted colour (the named one, jittered); None = the named one
    visible_fraction: float = 1.0  # share of the whole shape's pixels that lie inside the image

    @property
    def name(self) -> str:
        """Colour and shape, e.g. ``"red circle"``."""
        return f"{self.colour} {self.shape}"

    @property
    def prompt(self) -> str:
        """The Peekaboo prompt naming this object, e.g. ``"a red circle"``."""
        return f"a {self.name}"


def _texture(rng: np.random.Generator, size: int, style: SceneStyle) -> np.ndarray:
    """A (size, size, 3) float offset: optional clipped pixel noise plus optional colour blotches."""
    scale = size / _NATIVE_SIZE
    texture = np.zeros((size, size, 3))
    if rng.random() < style.p_noise:
        noise = rng.normal(0.0, style.noise_std, size=(size, size, 3))
        texture += np.clip(noise, -style.noise_clip, style.noise_clip)
    if rng.random() < style.p_blotches:
        coords = np.arange(size) + 0.5
        yy, xx = np.meshgrid(coords, coords, indexing="ij")
        for _ in range(int(rng.integers(1, style.max_blotches + 1))):
            cx, cy = rng.uniform(0.0, size, size=2)
            sigma = rng.uniform(*style.blotch_sigma) * scale
            colour = rng.uniform(-style.blotch_amplitude, style.blotch_amplitude, size=3)
            bump = np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / (2.0 * sigma**2))  # (size, size), peak 1
            texture += bump[..., None] * colour
    return texture


def draw_background(rng: np.random.Generator, size: int, style: SceneStyle) -> np.ndarray:
    """A (size, size, 3) float background far in colour from every named colour."""
    palette = np.array(list(COLOURS.values()), dtype=np.float64)
    while True:
        while True:
            base = rng.uniform(0.0, 255.0, size=3)
            if np.min(np.linalg.norm(palette - base, axis=1)) >= _MIN_BG_DISTANCE:
                break
        bg = np.broadcast_to(base, (size, size, 3)).copy()
        if rng.random() < style.p_gradient:
            # A gentle linear ramp in a random direction, the same for all channels.
            angle = rng.uniform(0.0, 2.0 * np.pi)
            coords = (np.arange(size) + 0.5) / size - 0.5
            yy, xx = np.meshgrid(coords, coords, indexing="ij")
            ramp = np.cos(angle) * xx + np.sin(angle) * yy  # in [-0.71, 0.71]
            bg += (style.gradient_amplitude * ramp)[..., None]
        if not style.textured:
            # No per-pixel check here: the classic scenes must keep their exact random draws.
            return bg
        bg += _texture(rng, size, style)
        pixels = np.clip(bg, 0.0, 255.0).reshape(-1, 1, 3)
        if np.min(np.linalg.norm(pixels - palette[None], axis=2)) >= style.min_bg_pixel_distance:
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


def _full_area(shape: str, cx: float, cy: float, r: float, size: int) -> int:
    """Pixels of the whole shape, also those outside the image (rendered on a padded canvas)."""
    pad = math.ceil(_extent(shape, r)) + 1
    return int(_render_mask(shape, cx + pad, cy + pad, r, size + 2 * pad).sum())


def _extent(shape: str, r: float) -> float:
    """Radius of a circle around the shape's centre that contains the whole shape."""
    if shape == "circle":
        return r
    if shape == "square":
        return float(np.sqrt(2.0) * _SQUARE_HALF * r)
    return float(np.hypot(r, _TRIANGLE_BASE * r))  # triangle: its base corners are farthest


def _jittered(rng: np.random.Generator, colour: str, jitter: int) -> tuple[int, int, int]:
    """The named colour moved by a uniform integer in [-jitter, jitter] per channel (clipped to 0..255)."""
    rgb = np.asarray(COLOURS[colour])
    if jitter > 0:
        rgb = np.clip(rgb + rng.integers(-jitter, jitter + 1, size=3), 0, 255)
    return (int(rgb[0]), int(rgb[1]), int(rgb[2]))


def place_objects(
    rng: np.random.Generator, kinds: list[tuple[str, str]], size: int, style: SceneStyle
) -> list[ShapeObject] | None:
    """Place and colour one object per (shape, colour), apart from each other; None when the scene got
    too crowded (an object would have to shrink below ``style.min_shrunk_radius``)."""
    scale = size / _NATIVE_SIZE
    min_pixels = style.min_visible_pixels * scale**2
    placed: list[tuple[float, float, float]] = []  # (cx, cy, extent) of placed objects
    objects: list[ShapeObject] = []
    for shape, colour in kinds:
        radius = rng.uniform(style.min_radius, style.max_radius) * scale
        # Random draws only where the style uses them, so the classic scenes keep their exact pixels.
        crossing = style.p_border > 0 and rng.random() < style.p_border
        found = None
        while found is None:
            ext = _extent(shape, radius)
            for _ in range(_PLACEMENT_TRIES):
                low, high = (0.0, size) if crossing else (ext, size - ext)
                cx, cy = rng.uniform(low, high, size=2)
                if not all(np.hypot(cx - px, cy - py) >= ext + pe + _GAP * scale for px, py, pe in placed):
                    continue
                mask = _render_mask(shape, cx, cy, radius, size)
                visible = 1.0
                if crossing:
                    visible = float(mask.sum()) / max(_full_area(shape, cx, cy, radius, size), 1)
                    if visible < style.min_visible_fraction or mask.sum() < min_pixels:
                        continue
                found = (cx, cy, mask, visible)
                break
            if found is None:
                # Crowded: try a smaller object (never below the style's smallest shrunk radius).
                radius -= scale
                if radius < style.min_shrunk_radius * scale:
                    return None
        cx, cy, mask, visible = found
        placed.append((cx, cy, ext))
        rgb = _jittered(rng, colour, style.colour_jitter)
        objects.append(ShapeObject(shape=shape, colour=colour, mask=mask, rgb=rgb, visible_fraction=visible))
    return objects
