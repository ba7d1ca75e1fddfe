"""What every pair source yields: :class:`Pair` (id, image, prompt, optional ground truth)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

# Ground-truth label values: 0 background, 1 the named object, IGNORE excluded from scoring (VOC's 255).
IGNORE = 255


def no_target() -> None:
    """A :attr:`Pair.load_target` for a pair without ground truth."""
    return None


@dataclass(frozen=True)
class Pair:
    """One (image, prompt) pair of a dataset.

    Images and targets load lazily, so listing a dataset of thousands of pairs is cheap and a bad file fails
    only its own pair (in the worker that optimizes it).

    Attributes:
        id: unique within the dataset and stable across runs (seeds and output names derive from it).
        prompt: what to segment.
        load_image: returns the image as upright 8-bit RGB (raises ImageError for a bad file).
        load_target: returns the ground truth ``(H, W)`` uint8 with 0 / 1 / IGNORE at the image's size, or
            None when the source has no ground truth for this pair.
        meta: small JSON-serializable extras written to results (e.g. the VOC class, the RefCOCO ref id).
    """

    id: str
    prompt: str
    load_image: Callable[[], Image.Image]
    load_target: Callable[[], np.ndarray | None]
    meta: dict | None = None
    # The image file, when there is one: the runner then loads it with the run's image options
    # (flatten colour, pixel limit) instead of calling load_image().
    path: Path | None = None
