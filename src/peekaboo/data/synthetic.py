"""The synthetic sources: ``shapes`` (:func:`peekaboo.data.shapes.eval_pairs`, flat-coloured shapes) and
``objects`` (:func:`peekaboo.data.objects.eval_pairs`, emoji objects over photographs), with exact masks.

The ``eval``, ``tune``, ``robust`` and ``tune_robust`` splits are offered (``val`` means ``eval``): the ``train``
seeds are what the bundled models were trained on, so scoring on them would measure memorization.
"""

from __future__ import annotations

import functools

import numpy as np
from PIL import Image

from peekaboo.data import objects, shapes
from peekaboo.data.base import Pair
from peekaboo.data.seeds import EVAL_SPLITS
from peekaboo.errors import ConfigError

__all__ = ["DEFAULT_NUM_PAIRS", "GENERATORS", "SCENE_SETS", "SPLIT_NAMES", "as_pair", "synthetic_pairs"]

DEFAULT_NUM_PAIRS = 200
#: The synthetic scene sets, each a ``data.source``, and the generator module of each (``eval_pairs``,
#: ``split_description``).
GENERATORS = {"shapes": shapes, "objects": objects}
SCENE_SETS = tuple(GENERATORS)
# data.split names accepted here -> the generators' split (both generators offer the same evaluation splits).
SPLIT_NAMES: dict[str, str] = {"val": "eval", **{split: split for split in EVAL_SPLITS}}


def synthetic_pairs(split: str = "val", num_pairs: int | None = None, scenes: str = "shapes") -> list[Pair]:
    """The first ``num_pairs`` pairs of ``split`` of a synthetic scene set.

    Args:
        split: ``eval`` (alias ``val``), ``tune``, ``robust`` (the hardest style, for reporting) or
            ``tune_robust`` (the same style from other seeds, for choosing settings).
        num_pairs: how many pairs; None = :data:`DEFAULT_NUM_PAIRS`.
        scenes: ``shapes`` or ``objects`` (:data:`SCENE_SETS`).

    Returns:
        Pairs with ids like ``eval-00003-1`` (scene index, object index), images ``(H, W, 3)`` uint8 scenes,
        targets ``(H, W)`` uint8 0/1 (the named object's visible pixels) and ``meta``: ``{"seed", "object",
        "shape", "colour"}`` for shapes, ``{"seed", "object", "kind", "occluded", "background"}`` for objects.

    Raises:
        ConfigError: another split, or ``num_pairs < 1``.
    """
    if scenes not in SCENE_SETS:
        raise ValueError(f"scenes={scenes!r}: expected one of {SCENE_SETS}")
    if split not in SPLIT_NAMES:
        raise ConfigError(f"data.split={split!r} is not a {scenes} split; use eval (alias val), tune, robust or "
                          "tune_robust (train holds the bundled model's training scenes).")
    n = DEFAULT_NUM_PAIRS if num_pairs is None else num_pairs
    if n < 1:
        raise ConfigError(f"data.num_pairs={n} must be >= 1 for the {scenes} source.")
    return [as_pair(pair, scenes) for pair in GENERATORS[scenes].eval_pairs(SPLIT_NAMES[split], n)]


def as_pair(generated, scenes: str) -> Pair:
    """A generator's pair (``GENERATORS[scenes].eval_pairs``: a rendered scene and the index of the named object)
    as a dataset :class:`Pair`; callers that also need the scene's other objects keep ``generated``."""
    return Pair(id=generated.id, prompt=generated.prompt, load_image=functools.partial(_image, generated.scene.image),
                load_target=functools.partial(_target, generated.mask), meta=_meta(generated, scenes))


def _meta(pair, scenes: str) -> dict:
    obj = pair.scene.objects[pair.target]
    if scenes == "shapes":
        return {"seed": pair.scene.seed, "object": pair.target, "shape": obj.shape, "colour": obj.colour}
    return {"seed": pair.scene.seed, "object": pair.target, "kind": obj.kind, "occluded": obj.occluded,
            "background": pair.scene.background}


def _image(pixels: np.ndarray) -> Image.Image:
    """A fresh RGB image each call (callers may draw on it)."""
    return Image.fromarray(np.array(pixels, dtype=np.uint8))  # (H, W, 3) uint8 is RGB


def _target(mask: np.ndarray) -> np.ndarray:
    return mask.astype(np.uint8)
