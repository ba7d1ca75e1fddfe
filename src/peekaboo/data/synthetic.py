"""The synthetic-shapes source: pairs of :func:`peekaboo.data.shapes.eval_pairs`, with exact masks.

The ``eval``, ``tune``, ``robust`` and ``tune_robust`` splits are offered (``val`` means ``eval``): the ``train``
seeds are what the bundled model was trained on, so scoring on them would measure memorization.
"""

from __future__ import annotations

import functools

import numpy as np
from PIL import Image

from peekaboo.data.base import Pair
from peekaboo.data.shapes import EVAL_SPLITS, eval_pairs
from peekaboo.errors import ConfigError

DEFAULT_NUM_PAIRS = 200
# data.split names accepted here -> shapes split.
SPLIT_NAMES: dict[str, str] = {"val": "eval", **{split: split for split in EVAL_SPLITS}}


def synthetic_pairs(split: str = "val", num_pairs: int | None = None) -> list[Pair]:
    """The first ``num_pairs`` shapes pairs of ``split``.

    Args:
        split: ``eval`` (alias ``val``), ``tune``, ``robust`` (the widest scene style, for reporting) or
            ``tune_robust`` (the same style from other seeds, for choosing settings).
        num_pairs: how many pairs; None = :data:`DEFAULT_NUM_PAIRS`.

    Returns:
        Pairs with ids like ``eval-00003-1``, images ``(H, W, 3)`` uint8 scenes, targets ``(H, W)`` uint8 0/1,
        and ``meta = {"seed", "object", "shape", "colour"}``.

    Raises:
        ConfigError: another split, or ``num_pairs < 1``.
    """
    if split not in SPLIT_NAMES:
        raise ConfigError(f"data.split={split!r} is not a shapes split; use eval (alias val), tune, robust or "
                          "tune_robust (train holds the bundled model's training scenes).")
    n = DEFAULT_NUM_PAIRS if num_pairs is None else num_pairs
    if n < 1:
        raise ConfigError(f"data.num_pairs={n} must be >= 1 for the shapes source.")
    pairs = []
    for shape_pair in eval_pairs(SPLIT_NAMES[split], n):
        obj = shape_pair.scene.objects[shape_pair.target]
        pairs.append(Pair(
            id=shape_pair.id,
            prompt=shape_pair.prompt,
            load_image=functools.partial(_image, shape_pair.scene.image),
            load_target=functools.partial(_target, shape_pair.mask),
            meta={"seed": shape_pair.scene.seed, "object": shape_pair.target, "shape": obj.shape,
                  "colour": obj.colour},
        ))
    return pairs


def _image(pixels: np.ndarray) -> Image.Image:
    """A fresh RGB image each call (callers may draw on it)."""
    return Image.fromarray(np.array(pixels, dtype=np.uint8))  # (H, W, 3) uint8 is RGB


def _target(mask: np.ndarray) -> np.ndarray:
    return mask.astype(np.uint8)
