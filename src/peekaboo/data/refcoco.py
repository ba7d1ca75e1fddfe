"""RefCOCO / RefCOCO+ / RefCOCOg: one pair per referring sentence of the refs in a split.

Layout (the ``refer`` toolkit's data folders, e.g. ``refcoco/``)::

    <root>/refs(<split_by>).p   pickle: list of refs {ref_id, ann_id, image_id, split, sentences: [{sent, sent_id}]}
    <root>/instances.json       COCO: images (file_name, height, width), annotations (segmentation), categories
    <images_dir>/<file_name>    COCO train2014 images (default images_dir: <root>/images)

``split_by`` is ``unc`` for RefCOCO and RefCOCO+, ``umd`` or ``google`` for RefCOCOg. Pair
``ref<ref_id>-sent<sent_id>`` has the sentence as prompt and the referred annotation's mask as target
(polygons merged; RLE, compressed or not, decoded), 0/1 with no ignore region.

The refs pickle is read with :class:`SafeUnpickler`, which accepts plain containers, strings and numbers only
and refuses any class or function reference, so a tampered file cannot run code when listed.
"""

from __future__ import annotations

import functools
import json
import os
import pickle
import warnings
from pathlib import Path

import numpy as np
from pycocotools import mask as mask_utils

from peekaboo.data.base import Pair
from peekaboo.errors import PeekabooError
from peekaboo.utils.images import load_image

INSTANCES_FILE = "instances.json"
DEFAULT_IMAGES_DIR = "images"
REF_KEYS = ("ref_id", "ann_id", "image_id", "split", "sentences")
# A polygon needs at least 3 points (x, y); pycocotools reads a first "polygon" of 4 numbers as a box.
_MIN_POLYGON_COORDS = 6
_PYCOCOTOOLS_NUMPY2_WARNING = r"__array__ implementation doesn't accept a copy keyword"


def refs_file(root: str | os.PathLike, split_by: str = "unc") -> Path:
    """``<root>/refs(<split_by>).p``."""
    return Path(root) / f"refs({split_by}).p"


class SafeUnpickler(pickle.Unpickler):
    """An unpickler for data-only pickles: every global (class, function) is refused.

    Lists, dicts, tuples, strings, bytes, numbers, booleans and None are built by opcodes that never call
    :meth:`find_class`; anything else (objects, ``os.system`` in a ``__reduce__``) needs it and is refused
    before it can run.
    """

    def __init__(self, file, source: str = "the pickle", **kwargs) -> None:
        super().__init__(file, **kwargs)
        self.source = source

    def find_class(self, module: str, name: str):
        raise PeekabooError(f"Refusing to load {self.source}: it contains code/objects "
                            f"({module}.{name}), not plain data; use the original refs file from the refer "
                            "toolkit.")


def load_refs(path: str | os.PathLike) -> list[dict]:
    """Read a refs pickle safely (see :class:`SafeUnpickler`).

    Raises:
        PeekabooError: missing or unreadable file, a file holding code/objects, or not a list of refs.
    """
    path = Path(path)
    if not path.is_file():
        raise PeekabooError(f"RefCOCO refs file {path} does not exist; check data.root and data.split_by.")
    try:
        with path.open("rb") as f:
            # utf-8: the original files were written by Python 2, whose str is bytes.
            refs = SafeUnpickler(f, source=str(path), encoding="utf-8").load()
    except PeekabooError:
        raise
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError,
            UnicodeDecodeError, OSError) as err:
        raise PeekabooError(f"RefCOCO refs file {path} is not a readable pickle ({err}); download it again.") from None
    if not isinstance(refs, list):
        raise PeekabooError(f"RefCOCO refs file {path} holds a {type(refs).__name__}, not a list of refs.")
    for i, ref in enumerate(refs):
        missing = [k for k in REF_KEYS if not isinstance(ref, dict) or k not in ref]
        if missing:
            raise PeekabooError(f"RefCOCO refs file {path}: ref {i} lacks {', '.join(missing)}; download it again.")
    return refs


def refcoco_pairs(root: str | os.PathLike, split: str = "val", split_by: str = "unc",
                  images_dir: str | os.PathLike | None = None) -> list[Pair]:
    """List the pairs of a RefCOCO-family split, in refs-file order, sentences in order.

    Args:
        root: the folder holding ``refs(<split_by>).p`` and ``instances.json``.
        split: the refs' split (``train``, ``val``, ``testA``, ``testB``; ``test`` for RefCOCOg umd).
        split_by: selects the refs file (``unc``, ``umd``, ``google``).
        images_dir: the COCO train2014 images; default ``<root>/images``.

    Returns:
        One :class:`Pair` per sentence; targets are ``(H, W)`` uint8 0/1; ``meta`` has ``ref_id``, ``ann_id``,
        ``image_id`` and ``category`` (the COCO category name).

    Raises:
        PeekabooError: missing or malformed files, an unknown split, or a ref whose image or annotation is not
            in instances.json.
    """
    root = Path(root).absolute()
    images = Path(images_dir).absolute() if images_dir is not None else root / DEFAULT_IMAGES_DIR
    refs_path = refs_file(root, split_by)
    refs = load_refs(refs_path)
    chosen = [r for r in refs if r["split"] == split]
    if not chosen:
        splits = sorted({str(r["split"]) for r in refs})
        raise PeekabooError(f"RefCOCO refs file {refs_path} has no refs in split {split!r}; choose data.split "
                            f"from {splits}.")
    coco = _load_instances(root / INSTANCES_FILE)
    image_info = {img["id"]: img for img in coco["images"]}
    annotations = {ann["id"]: ann for ann in coco["annotations"]}
    categories = {cat["id"]: cat["name"] for cat in coco.get("categories", [])}
    pairs = []
    for ref in chosen:
        where = f"RefCOCO ref {ref['ref_id']} of {refs_path}"
        ann = annotations.get(ref["ann_id"])
        info = image_info.get(ref["image_id"])
        if ann is None or info is None:
            missing = f"annotation {ref['ann_id']}" if ann is None else f"image {ref['image_id']}"
            raise PeekabooError(f"{where} names {missing}, which {root / INSTANCES_FILE} lacks; use the "
                                "instances.json that ships with these refs.")
        image_path = images / _relative_file_name(info.get("file_name"), where)
        meta = {"ref_id": ref["ref_id"], "ann_id": ref["ann_id"], "image_id": ref["image_id"],
                "category": categories.get(ann.get("category_id", ref.get("category_id")))}
        load_target = functools.partial(decode_segmentation, ann.get("segmentation"), int(info["height"]),
                                        int(info["width"]), where)
        for sentence in ref["sentences"]:
            text = sentence.get("sent") if isinstance(sentence, dict) else None
            if not isinstance(text, str) or not text.strip() or "sent_id" not in sentence:
                raise PeekabooError(f"{where} has a sentence without text or sent_id ({sentence!r}); download the "
                                    "refs file again.")
            pairs.append(Pair(
                id=f"ref{ref['ref_id']}-sent{sentence['sent_id']}",
                prompt=text.strip(),
                load_image=functools.partial(load_image, image_path),
                load_target=load_target,
                meta=dict(meta),
                path=image_path,
            ))
    return pairs


def decode_segmentation(segmentation: list | dict | None, height: int, width: int, where: str = "annotation"
                        ) -> np.ndarray:
    """Rasterize a COCO segmentation at ``(height, width)``.

    Args:
        segmentation: a list of polygons ``[[x0, y0, x1, y1, ...], ...]`` (merged), an uncompressed RLE
            ``{"counts": [int, ...], "size": [h, w]}`` (crowd annotations) or a compressed one (``counts`` a
            string).
        where: names the annotation in error messages.

    Returns:
        ``(height, width)`` uint8, 1 inside the object, 0 outside.

    Raises:
        PeekabooError: an unknown segmentation format or a mask of another size.
    """
    if isinstance(segmentation, list):
        polygons = [p for p in segmentation if isinstance(p, list) and len(p) >= _MIN_POLYGON_COORDS]
        if not polygons:
            return np.zeros((height, width), dtype=np.uint8)
        rle = mask_utils.merge(mask_utils.frPyObjects(polygons, height, width))
    elif isinstance(segmentation, dict) and isinstance(segmentation.get("counts"), list):
        rle = mask_utils.frPyObjects(segmentation, height, width)
    elif isinstance(segmentation, dict) and isinstance(segmentation.get("counts"), (str, bytes)):
        rle = segmentation
    else:
        raise PeekabooError(f"{where}: unknown segmentation format {type(segmentation).__name__}; expected COCO "
                            "polygons or RLE.")
    with warnings.catch_warnings():
        # pycocotools' Cython decoder predates NumPy 2's copy keyword; the warning is harmless and not ours.
        warnings.filterwarnings("ignore", message=_PYCOCOTOOLS_NUMPY2_WARNING, category=DeprecationWarning)
        mask = mask_utils.decode(rle)
    if mask.shape != (height, width):
        raise PeekabooError(f"{where}: its mask is {mask.shape[1]}x{mask.shape[0]} but its image is "
                            f"{width}x{height}; use the instances.json that ships with these refs.")
    return (mask > 0).astype(np.uint8)


def _load_instances(path: Path) -> dict:
    if not path.is_file():
        raise PeekabooError(f"RefCOCO instances file {path} does not exist; put the dataset's instances.json "
                            "beside the refs file.")
    try:
        coco = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError, OSError) as err:
        raise PeekabooError(f"RefCOCO instances file {path} cannot be read as JSON ({err}); download it again.") \
            from None
    if not isinstance(coco, dict) or not all(isinstance(coco.get(k), list) for k in ("images", "annotations")):
        raise PeekabooError(f"RefCOCO instances file {path} lacks the COCO lists images and annotations.")
    return coco


def _relative_file_name(file_name: object, where: str) -> Path:
    """The image's path under images_dir; absolute names and ``..`` are refused (the JSON is data, not a map
    of the file system)."""
    if not isinstance(file_name, str) or not file_name:
        raise PeekabooError(f"{where}: its image in instances.json has no file_name.")
    path = Path(file_name)
    if path.is_absolute() or ".." in path.parts:
        raise PeekabooError(f"{where}: image file_name {file_name!r} is not a plain name under data.images_dir; "
                            "fix instances.json.")
    return path
