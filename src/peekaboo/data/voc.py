"""Pascal VOC 2012 segmentation: one pair per object class present in each image of a split.

Layout (as extracted from ``VOCtrainval_11-May-2012.tar``, i.e. ``VOCdevkit/VOC2012``)::

    <root>/ImageSets/Segmentation/<split>.txt   image ids, one per line (train, val, trainval)
    <root>/JPEGImages/<id>.jpg
    <root>/SegmentationClass/<id>.png           palette PNG of class indices 0..20, 255 = void

Pair ``<id>-<class>`` (e.g. ``2007_000033-aeroplane``) has the prompt ``"a/an <readable name>"`` (``"an
airplane"``, ``"a dining table"``) and the target 1 where the pixel is that class, 255 on void pixels, 0 elsewhere.
Listing reads every segmentation PNG once (to know which classes each image holds); targets are re-read lazily.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from peekaboo.data.base import IGNORE, Pair
from peekaboo.data.captions import article
from peekaboo.errors import ImageError, PeekabooError
from peekaboo.utils.images import load_image

#: The 21 VOC class names, indexed by the values of the segmentation PNGs (0 is background).
VOC_CLASSES: tuple[str, ...] = (
    "background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor",
)
BACKGROUND = 0
# VOC's compound or British names, written as a prompt would say them.
PROMPT_NAMES: dict[str, str] = {
    "aeroplane": "airplane",
    "diningtable": "dining table",
    "pottedplant": "potted plant",
    "tvmonitor": "tv monitor",
}

SPLIT_DIR = Path("ImageSets", "Segmentation")
IMAGE_DIR = "JPEGImages"
LABEL_DIR = "SegmentationClass"
IMAGE_SUFFIX = ".jpg"
_UINT8_VALUES = 256
LABEL_SUFFIX = ".png"


def voc_prompt(name: str) -> str:
    """The prompt for VOC class ``name``: ``"a dog"``, ``"an airplane"``, ``"a dining table"``."""
    readable = PROMPT_NAMES.get(name, name)
    return f"{article(readable)} {readable}"


def voc_pairs(root: str | os.PathLike, split: str = "val") -> list[Pair]:
    """List the pairs of a VOC 2012 segmentation split, image by image in split-file order, classes by index.

    Args:
        root: the ``VOC2012`` folder.
        split: the name of a file in ``ImageSets/Segmentation`` (``train``, ``val``, ``trainval``).

    Returns:
        One :class:`Pair` per (image, class present); ``meta = {"class": VOC name, "class_index": int}``;
        targets are ``(H, W)`` uint8 with 0 / 1 / 255.

    Raises:
        PeekabooError: a missing folder or split file, or a missing or malformed segmentation PNG.
    """
    root = Path(root).absolute()
    split_file = root / SPLIT_DIR / f"{split}.txt"
    if not split_file.is_file():
        available = sorted(p.stem for p in (root / SPLIT_DIR).glob("*.txt"))
        hint = f"choose data.split from {available}" if available else "point data.root at the VOC2012 folder"
        raise PeekabooError(f"VOC split file {split_file} does not exist; {hint}.")
    pairs = []
    for image_id in _read_ids(split_file):
        label_path = root / LABEL_DIR / f"{image_id}{LABEL_SUFFIX}"
        labels = read_labels(label_path)  # ImageError (a PeekabooError) fails the listing: classes are unknown
        image_path = root / IMAGE_DIR / f"{image_id}{IMAGE_SUFFIX}"
        for index in _present(labels):
            if index in (BACKGROUND, IGNORE):
                continue
            name = VOC_CLASSES[index]
            pairs.append(Pair(
                id=f"{image_id}-{name}",
                prompt=voc_prompt(name),
                load_image=functools.partial(load_image, image_path),
                load_target=functools.partial(class_target, label_path, index),
                meta={"class": name, "class_index": index},
                path=image_path,
            ))
    return pairs


def read_labels(path: str | os.PathLike) -> np.ndarray:
    """The class indices of a VOC segmentation PNG, ``(H, W)`` uint8 in 0..20 or 255.

    Raises:
        ImageError: the file is missing, unreadable, not a palette/gray PNG, or holds other values.
    """
    path = Path(path)
    if not path.is_file():
        raise ImageError(f"VOC segmentation {path} does not exist; re-extract the VOC2012 archive.")
    try:
        with Image.open(path) as img:
            img.load()
            if img.mode not in ("P", "L"):
                raise ImageError(f"VOC segmentation {path} is a {img.mode} image, not a palette PNG of class "
                                 "indices; use the original SegmentationClass files.")
            labels = np.asarray(img, dtype=np.uint8)
    except UnidentifiedImageError:
        raise ImageError(f"VOC segmentation {path} is not a PNG Pillow can read; re-extract it.") from None
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        raise ImageError(f"VOC segmentation {path} is truncated or corrupt ({err}); re-extract it.") from None
    bad = sorted(set(_present(labels)) - {*range(len(VOC_CLASSES)), IGNORE})
    if bad:
        raise ImageError(f"VOC segmentation {path} holds values {bad} that are no VOC class (0..20, 255 void); "
                         "use the original SegmentationClass files.")
    return labels


def class_target(label_path: str | os.PathLike, class_index: int) -> np.ndarray:
    """Target for one class: ``(H, W)`` uint8, 1 on the class, 255 on void, 0 elsewhere."""
    labels = read_labels(label_path)
    target = (labels == class_index).astype(np.uint8)
    target[labels == IGNORE] = IGNORE
    return target


def _present(labels: np.ndarray) -> list[int]:
    """The values present in a uint8 label map, ascending (bincount: much faster than np.unique here)."""
    return np.flatnonzero(np.bincount(labels.ravel(), minlength=_UINT8_VALUES)).tolist()


def _read_ids(split_file: Path) -> list[str]:
    """The image ids a split file lists, one per line."""
    try:
        text = split_file.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise PeekabooError(f"VOC split file {split_file} cannot be read ({err}); re-extract the VOC2012 "
                            "archive.") from None
    return [i for i in (line.strip() for line in text.splitlines()) if i]
