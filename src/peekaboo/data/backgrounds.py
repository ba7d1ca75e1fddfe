"""Backgrounds of the object scenes: photograph crops, tinted textures, plain and graded colours.

Every background is a deterministic function of a numpy ``Generator`` and the image side. Sources:

* photographs (:data:`PHOTOS`): scikit-image's sample images that ship inside its wheel (nothing is downloaded),
  restricted to those, or the crops of them (``box``), that show no object of the scenes' vocabulary: a prompt
  must never name something in the background (``chelsea`` is a cat, ``coffee`` a cup, ``astronaut`` a person,
  ``camera`` a man with a camera, ``rocket`` a rocket: only object-free crops of ``coffee`` and ``rocket`` are
  used, the others not at all). A background is a random square crop, maybe mirrored, with mild colour jitter;
  grey photographs are sometimes tinted (duotone).
* :data:`HELD_OUT_PHOTOS` never appear in the training scenes: only the ``robust`` and ``tune_robust`` splits use
  them, so those splits measure how the model copes with photographs it never saw. The two crops of ``rocket``
  are one photograph, so they stay in one split.
* textures (:data:`TEXTURES`): brick, grass and gravel (grey, CC0), tinted with a natural colour, turned and
  mirrored at random.
* plain colours, flat or with a linear gradient.

Photographs are loaded once per process (``functools.cache``) and downscaled to at most 512 px a side.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image

__all__ = [
    "BACKGROUND_KINDS",
    "HELD_OUT_PHOTOS",
    "PHOTOS",
    "TEXTURES",
    "TRAINING_PHOTOS",
    "PhotoSource",
    "draw_background",
    "load_photo",
    "photo_background",
    "plain_background",
    "texture_background",
]


@dataclass(frozen=True)
class PhotoSource:
    """A photograph: which ``skimage.data`` image, which part of it, where it comes from and its licence."""

    loader: str  # name of the skimage.data function that returns it
    box: tuple[int, int, int, int] | None  # (left, top, right, bottom) of the object-free part; None = all
    source: str
    licence: str


_SKIMAGE = "scikit-image sample data (skimage.data, ships in the scikit-image wheel)"

#: Photographs usable as backgrounds, by name. None shows an object of the vocabulary.
PHOTOS: dict[str, PhotoSource] = {
    "hubble_deep_field": PhotoSource("hubble_deep_field", None, f"{_SKIMAGE}; NASA / HubbleSite, 2012",
                                     "public domain (NASA)"),
    "retina": PhotoSource("retina", (250, 250, 1160, 1160), f"{_SKIMAGE}; Mikael Häggström, Wikimedia Commons "
                          "(the square inside the fundus disc)", "CC0 1.0"),
    "coffee_table": PhotoSource("coffee", (490, 0, 600, 400), f"{_SKIMAGE}; Rachel Michetti, Pikolo Espresso Bar "
                                "(only the wooden table right of the cup)", "CC0 1.0"),
    "moon": PhotoSource("moon", None, f"{_SKIMAGE}; surface of the moon", "distributed with scikit-image "
                        "(BSD-3-Clause package); no separate licence stated"),
    "page": PhotoSource("page", None, f"{_SKIMAGE}; scanned page of printed text", "distributed with "
                        "scikit-image (BSD-3-Clause package); no separate licence stated"),
    "text": PhotoSource("text", None, f"{_SKIMAGE}; Wikipedia File:Corner.png, handwriting on paper",
                        "public domain"),
    "cell": PhotoSource("cell", None, f"{_SKIMAGE}; Paul Müller et al., quantitative phase image of a cell",
                        "CC0 1.0"),
    "clock": PhotoSource("clock", None, f"{_SKIMAGE}; Stefan van der Walt, motion-blurred wall clock",
                         "public domain"),
    # Held out of training (see HELD_OUT_PHOTOS).
    "immunohistochemistry": PhotoSource("immunohistochemistry", None, f"{_SKIMAGE}; Center for Microscopy And "
                                        "Molecular Imaging (CMMI), stained colonic glands", "no known copyright "
                                        "restrictions"),
    "coins": PhotoSource("coins", None, f"{_SKIMAGE}; Brooklyn Museum, Greek coins from Pompeii",
                         "no known copyright restrictions"),
    "rocket_left": PhotoSource("rocket", (0, 0, 260, 427), f"{_SKIMAGE}; SpaceX, DSCOVR launch (only the towers "
                               "and sky left of the rocket)", "public domain (SpaceX)"),
    "rocket_right": PhotoSource("rocket", (380, 0, 640, 427), f"{_SKIMAGE}; SpaceX, DSCOVR launch (only the towers "
                                "and sky right of the rocket)", "public domain (SpaceX)"),
}

#: Photographs only the robust splits see (both rocket crops: two views of one scene stay in one split).
HELD_OUT_PHOTOS: tuple[str, ...] = ("immunohistochemistry", "coins", "rocket_left", "rocket_right")
#: Photographs of the training, tune and eval scenes.
TRAINING_PHOTOS: tuple[str, ...] = tuple(name for name in PHOTOS if name not in HELD_OUT_PHOTOS)

#: Textures (grey skimage.data images, CC0) and the colour each is tinted with (jittered per scene).
TEXTURES: dict[str, tuple[int, int, int]] = {
    "brick": (165, 80, 60),
    "grass": (85, 140, 55),
    "gravel": (150, 140, 125),
}

#: What a background can be; a scene records its background as ``"photo:<name>"``, ``"texture:<name>"``,
#: ``"plain"`` or ``"graded"``.
BACKGROUND_KINDS: tuple[str, ...] = ("photo", "texture", "plain")

# Photographs are downscaled to at most this side when loaded (the largest scenes are 512 px).
_MAX_PHOTO_SIDE = 512
# A crop's side is this fraction range of the photo's (or box's) shorter side.
_CROP_FRACTION = (0.35, 1.0)
# Grey photographs are tinted with a random duotone with this probability (else left grey).
_P_TINT = 0.5
# Colour jitter of photographs and textures: brightness gain, contrast gain, saturation gain, per-channel gain.
_BRIGHTNESS = (0.8, 1.2)
_CONTRAST = (0.8, 1.2)
_SATURATION = (0.75, 1.25)
_CHANNEL = 0.05
# Plain backgrounds: probability of a linear gradient, and its peak-to-peak amplitude range.
_P_GRADIENT = 0.6
_GRADIENT = (30.0, 110.0)


def _skimage_image(loader: str) -> np.ndarray:
    """An skimage.data image as (H, W) or (H, W, 3) uint8 (imported lazily: skimage is slow to import)."""
    import skimage.data

    image = np.asarray(getattr(skimage.data, loader)())
    return image[..., :3] if image.ndim == 3 else image


@functools.cache
def load_photo(name: str) -> Image.Image:
    """The photograph ``name`` of :data:`PHOTOS`, cropped to its box and at most 512 px a side.

    Returns:
        An ``"RGB"`` image, or ``"L"`` for grey photographs.
    """
    photo = PHOTOS[name]
    image = Image.fromarray(_skimage_image(photo.loader))
    if photo.box is not None:
        image = image.crop(photo.box)
    if max(image.size) > _MAX_PHOTO_SIDE:
        image.thumbnail((_MAX_PHOTO_SIDE, _MAX_PHOTO_SIDE), Image.Resampling.LANCZOS)
    image.load()
    return image


@functools.cache
def _load_texture(name: str) -> Image.Image:
    """The texture ``name`` as an ``"L"`` image."""
    if name not in TEXTURES:
        raise ValueError(f"unknown texture {name!r}; expected one of {tuple(TEXTURES)}")
    return Image.fromarray(_skimage_image(name))


def _pyramid(image: Image.Image) -> tuple[Image.Image, ...]:
    """``image`` at full size, 1/2, 1/4 and 1/8 (box-filtered): crops are resized from the smallest level that still
    has enough pixels, which costs a fraction of resizing a 400 px crop down to 64 px."""
    levels = [image]
    while len(levels) < 4 and min(levels[-1].size) >= 64:
        levels.append(levels[-1].reduce(2))
    return tuple(levels)


@functools.cache
def _levels(source: str, name: str) -> tuple[Image.Image, ...]:
    """The pyramid of photograph (``source="photo"``) or texture (``"texture"``) ``name``, built once."""
    return _pyramid(load_photo(name) if source == "photo" else _load_texture(name))


def _random_crop(rng: np.random.Generator, levels: tuple[Image.Image, ...], size: int) -> np.ndarray:
    """A random square crop of the image whose pyramid is ``levels``, resized to (size, size).

    Returns:
        (size, size) or (size, size, 3) float32.
    """
    image = levels[0]
    short = min(image.size)
    side = max(1.0, rng.uniform(*_CROP_FRACTION) * short)
    left = rng.uniform(0.0, image.width - side)
    top = rng.uniform(0.0, image.height - side)
    level = 0
    while level + 1 < len(levels) and side / 2 ** (level + 1) >= 1.25 * size:
        level += 1
    f = 1.0 / 2**level
    crop = levels[level].resize((size, size), Image.Resampling.BILINEAR,
                                box=(left * f, top * f, (left + side) * f, (top + side) * f))
    return np.asarray(crop, dtype=np.float32)


def _jitter(rng: np.random.Generator, rgb: np.ndarray) -> np.ndarray:
    """Mild colour jitter of a (H, W, 3) float image (0..255): brightness, contrast, saturation, channel gains."""
    grey = rgb.mean(axis=2, keepdims=True)
    rgb = grey + (rgb - grey) * rng.uniform(*_SATURATION)
    mean = float(rgb.mean())
    rgb = mean + (rgb - mean) * rng.uniform(*_CONTRAST)
    gains = rng.uniform(*_BRIGHTNESS) * rng.uniform(1.0 - _CHANNEL, 1.0 + _CHANNEL, size=3)
    return rgb * gains.astype(np.float32)


def _flip(rng: np.random.Generator, image: np.ndarray, vertical: bool) -> np.ndarray:
    """Mirror left-right with probability 1/2 (and, for textures, up-down and transpose too)."""
    if rng.random() < 0.5:
        image = image[:, ::-1]
    if vertical:
        if rng.random() < 0.5:
            image = image[::-1]
        if rng.random() < 0.5:
            image = np.swapaxes(image, 0, 1)
    return image


def _to_u8(image: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(np.clip(np.rint(image), 0, 255).astype(np.uint8))


def photo_background(rng: np.random.Generator, name: str, size: int) -> np.ndarray:
    """A random crop of photograph ``name``, maybe mirrored, tinted (grey photos) and colour-jittered.

    Returns:
        image: (size, size, 3) uint8.
    """
    crop = _flip(rng, _random_crop(rng, _levels("photo", name), size), vertical=False)
    if crop.ndim == 2:
        if rng.random() < _P_TINT:
            # Duotone: black maps to a dark colour, white to a light one.
            dark, light = rng.uniform(0, 90, size=3), rng.uniform(160, 255, size=3)
            crop = dark + (crop[..., None] / 255.0) * (light - dark)
        else:
            crop = np.repeat(crop[..., None], 3, axis=2)
    return _to_u8(_jitter(rng, crop.astype(np.float32)))


def texture_background(rng: np.random.Generator, name: str, size: int) -> np.ndarray:
    """A random crop of texture ``name``, turned and mirrored, tinted with its colour (jittered).

    Returns:
        image: (size, size, 3) uint8.
    """
    crop = _flip(rng, _random_crop(rng, _levels("texture", name), size), vertical=True)
    tint = np.asarray(TEXTURES[name], dtype=np.float32) * rng.uniform(0.85, 1.15, size=3).astype(np.float32)
    # The tint at the crop's mean brightness, with the texture's contrast halved: multiplying by the raw relative
    # brightness would push the bright blades of grass past 255 into flat neon.
    relative = crop / max(float(crop.mean()), 1.0)
    rgb = (0.45 + 0.55 * relative)[..., None] * tint
    return _to_u8(_jitter(rng, rgb))


def plain_background(rng: np.random.Generator, size: int) -> tuple[np.ndarray, str]:
    """A flat colour, or (with probability 0.6) a linear gradient of one colour in a random direction.

    Returns:
        ``(image, kind)``: image (size, size, 3) uint8; kind ``"plain"`` or ``"graded"``.
    """
    base = rng.uniform(0.0, 255.0, size=3).astype(np.float32)
    image = np.broadcast_to(base, (size, size, 3)).astype(np.float32)
    if rng.random() >= _P_GRADIENT:
        return _to_u8(image), "plain"
    angle = rng.uniform(0.0, 2.0 * np.pi)
    amplitude = rng.uniform(*_GRADIENT)
    coords = (np.arange(size, dtype=np.float32) + 0.5) / size - 0.5
    ramp = np.cos(angle) * coords[None, :] + np.sin(angle) * coords[:, None]  # (size, size), within +/-0.71
    # Each channel ramps by its own share of the amplitude, so the gradient can change hue a little.
    shares = rng.uniform(0.5, 1.0, size=3).astype(np.float32)
    return _to_u8(image + ramp[..., None] * (amplitude * shares)), "graded"


def draw_background(rng: np.random.Generator, size: int, kind: str,
                    photos: Sequence[str] = TRAINING_PHOTOS) -> tuple[np.ndarray, str]:
    """A background of ``kind`` (one of :data:`BACKGROUND_KINDS`).

    Args:
        rng: the scene's generator.
        size: image side in pixels.
        kind: ``"photo"`` (a crop of one of ``photos``, drawn uniformly), ``"texture"`` or ``"plain"``.
        photos: the photographs a ``"photo"`` background draws from.

    Returns:
        ``(image, source)``: image (size, size, 3) uint8; source ``"photo:<name>"``, ``"texture:<name>"``,
        ``"plain"`` or ``"graded"``.
    """
    if kind == "photo":
        name = photos[int(rng.integers(len(photos)))]
        return photo_background(rng, name, size), f"photo:{name}"
    if kind == "texture":
        names = tuple(TEXTURES)
        name = names[int(rng.integers(len(names)))]
        return texture_background(rng, name, size), f"texture:{name}"
    if kind == "plain":
        return plain_background(rng, size)
    raise ValueError(f"unknown background kind {kind!r}; expected one of {BACKGROUND_KINDS}")
