"""Manifest source: a JSONL or CSV file listing ``image``, ``prompt`` and optional ``mask`` and ``id``.

JSONL (``.jsonl``, ``.ndjson``): one JSON object per line; blank lines are skipped.
CSV (``.csv``): a header row naming the columns, then one pair per row.

::

    {"image": "imgs/cat.jpg", "prompt": "a cat", "mask": "masks/cat.png", "id": "cat-1"}

    image,prompt,mask
    imgs/cat.jpg,a cat,masks/cat.png

Columns:

- ``image`` (required), ``mask`` (optional): paths relative to the manifest's folder. Absolute paths and paths
  that resolve outside that folder (``../``, symlinks pointing out) are refused unless
  ``data.allow_outside_root=true``. A missing image does not fail the listing: loading that pair raises
  :class:`~peekaboo.errors.ImageError`, so a run records the pair as failed and continues.
- ``prompt`` (required): what to segment; must not be empty.
- ``id`` (optional): unique pair id; by default ``<image stem>-<row index>`` (row index from 0), with a
  numeric suffix added if an explicit id of another row already took that name.
- any other column is kept in the pair's ``meta`` (e.g. a ``class`` column gives per-class scores).

Masks (see :func:`load_mask`): a label PNG (mode ``L`` or ``P``) whose values are within {0, 1, 255} and
include 1 is read as labels: 1 = object, 0 = background, 255 = ignored. Any other image is thresholded on
its gray level: > 127 = object, else background (so a black/white mask works, with no ignore region).
"""

from __future__ import annotations

import csv
import functools
import json
import os
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from peekaboo.data.base import IGNORE, Pair, no_target
from peekaboo.errors import ImageError, PeekabooError
from peekaboo.utils.images import load_image

JSONL_SUFFIXES = (".jsonl", ".ndjson")
CSV_SUFFIXES = (".csv",)
REQUIRED_COLUMNS = ("image", "prompt")
KNOWN_COLUMNS = ("image", "prompt", "mask", "id")
# Gray levels above this are object in a thresholded mask (the midpoint of 8-bit).
MASK_THRESHOLD = 127
LABEL_OBJECT = 1
_LABEL_VALUES = frozenset({0, LABEL_OBJECT, IGNORE})
_SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I", "F")
_EIGHT_BIT_MAX = 255.0
_SIXTEEN_BIT_MAX = 65535.0
# EXIF orientations 5..8 transpose the image, so its upright width and height swap (what load_image returns).
_EXIF_ORIENTATION = 0x0112
_TRANSPOSING_ORIENTATIONS = (5, 6, 7, 8)


def manifest_pairs(manifest: str | os.PathLike, allow_outside_root: bool = False) -> list[Pair]:
    """List the pairs of a JSONL or CSV manifest, in file order.

    Args:
        manifest: the ``.jsonl`` / ``.ndjson`` / ``.csv`` file; its folder is the root of relative paths.
        allow_outside_root: accept absolute paths and paths resolving outside the manifest's folder.

    Returns:
        One :class:`Pair` per row; targets load from ``mask`` as ``(H, W)`` uint8 0/1/255, or None without one.

    Raises:
        PeekabooError: unreadable or empty (zero-row) file, malformed line, missing column, empty prompt,
            duplicate id, or a path outside the manifest's folder.
    """
    path = Path(manifest).absolute()
    if not path.is_file():
        raise PeekabooError(f"Manifest {path} does not exist; check data.manifest.")
    root = path.parent
    rows = list(_read_rows(path))
    if not rows:
        raise PeekabooError(f"Manifest {path} is empty (no rows); add one row per pair, e.g. "
                            "{\"image\": \"imgs/cat.jpg\", \"prompt\": \"a cat\"}, or check data.manifest.")
    explicit = _explicit_ids(path, rows)
    taken = set(explicit.values())
    pairs = []
    for index, (line, row) in enumerate(rows):
        where = f"Manifest {path} row {index} (line {line})"
        image_value = _string(row, "image", where).strip()
        image = _resolve(root, image_value, "image", where, allow_outside_root)
        prompt = _string(row, "prompt", where).strip()
        if not prompt:
            raise PeekabooError(f"{where} has an empty prompt; write what to segment, e.g. \"a cat\".")
        mask_value = _optional_string(row, "mask", where)
        mask = _resolve(root, mask_value, "mask", where, allow_outside_root) if mask_value else None
        pair_id = explicit.get(index) or _unique(f"{Path(image_value).stem}-{index}", taken)
        taken.add(pair_id)
        extras = {k: v for k, v in row.items() if k not in KNOWN_COLUMNS}
        pairs.append(Pair(
            id=pair_id,
            prompt=prompt,
            load_image=functools.partial(load_image, image),
            load_target=functools.partial(load_mask, mask, image) if mask else no_target,
            meta=extras or None,
            path=image,
        ))
    return pairs


def load_mask(mask: str | os.PathLike, image: str | os.PathLike | None = None) -> np.ndarray:
    """Read a ground-truth mask PNG as ``(H, W)`` uint8 with 0 / 1 / 255 (see the module docstring).

    Args:
        mask: the mask file.
        image: its image; when given and readable, the mask must have the image's upright size.

    Raises:
        ImageError: missing or unreadable mask, or a size different from the image's.
    """
    mask = Path(mask)
    if not mask.is_file():
        raise ImageError(f"Mask {mask} does not exist; check the manifest's mask column.")
    try:
        with Image.open(mask) as img:
            img.load()
            target = _mask_values(img)
    except UnidentifiedImageError:
        raise ImageError(f"Mask {mask} is not an image file Pillow can read; save it as a PNG.") from None
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        raise ImageError(f"Mask {mask} is truncated or corrupt ({err}); re-export it.") from None
    expected = _upright_size(Path(image)) if image is not None else None
    if expected is not None and target.shape != expected:
        raise ImageError(f"Mask {mask} is {target.shape[1]}x{target.shape[0]} pixels but its image {image} is "
                         f"{expected[1]}x{expected[0]}; the mask must have the image's size.")
    return target


def _mask_values(img: Image.Image) -> np.ndarray:
    """Label PNGs keep their 0/1/255 values; everything else is thresholded on gray level."""
    if img.mode in ("L", "P"):
        raw = np.asarray(img)
        values = set(np.unique(raw).tolist())
        if values <= _LABEL_VALUES and LABEL_OBJECT in values:
            return raw.astype(np.uint8)
    if img.mode in _SIXTEEN_BIT_MODES:
        arr = np.asarray(img, dtype=np.float64)
        top = _SIXTEEN_BIT_MAX if img.mode.startswith("I;16") or arr.max() > _EIGHT_BIT_MAX else _EIGHT_BIT_MAX
        gray = arr / top * _EIGHT_BIT_MAX
    else:
        # convert("L") drops any alpha channel: a mask's colour, not its transparency, marks the object.
        gray = np.asarray(img.convert("L"))
    return (gray > MASK_THRESHOLD).astype(np.uint8)


def _upright_size(image: Path) -> tuple[int, int] | None:
    """``(H, W)`` of ``image`` after EXIF rotation (as load_image returns it), or None if unreadable."""
    try:
        with Image.open(image) as img:
            width, height = img.size
            if img.getexif().get(_EXIF_ORIENTATION) in _TRANSPOSING_ORIENTATIONS:
                width, height = height, width
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError):
        return None  # load_image reports a bad image with its own message
    return height, width


def _read_rows(path: Path) -> list[tuple[int, dict]]:
    """``(line number, row)`` for every row, with the line numbers a text editor shows (from 1)."""
    suffix = path.suffix.lower()
    try:
        # utf-8-sig: spreadsheets often write a byte-order mark before the header.
        with path.open(encoding="utf-8-sig", newline="") as f:
            if suffix in JSONL_SUFFIXES:
                return _jsonl_rows(path, f)
            if suffix in CSV_SUFFIXES:
                return _csv_rows(path, f)
    except UnicodeDecodeError as err:
        raise PeekabooError(f"Manifest {path} is not UTF-8 text ({err}); save it as UTF-8.") from None
    raise PeekabooError(f"Manifest {path} has an unknown extension {path.suffix!r}; name it "
                        f"{' or '.join(JSONL_SUFFIXES + CSV_SUFFIXES)}.")


def _jsonl_rows(path: Path, lines) -> list[tuple[int, dict]]:
    rows = []
    for line_no, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise PeekabooError(f"Manifest {path} line {line_no} is not valid JSON ({err.msg}); write one JSON "
                                "object per line.") from None
        if not isinstance(row, dict):
            raise PeekabooError(f"Manifest {path} line {line_no} is a JSON {type(row).__name__}, not an object; "
                                "write e.g. {\"image\": \"a.jpg\", \"prompt\": \"a cat\"}.")
        _check_columns(path, line_no, row.keys())
        rows.append((line_no, row))
    return rows


def _csv_rows(path: Path, f) -> list[tuple[int, dict]]:
    reader = csv.DictReader(f)
    if reader.fieldnames is None:
        raise PeekabooError(f"Manifest {path} is empty; add a header row (image,prompt[,mask][,id]) and rows.")
    header = [name.strip() for name in reader.fieldnames]
    _check_columns(path, 1, header)
    reader.fieldnames = header
    rows = []
    start = reader.line_num + 1
    for row in reader:
        if None in row:
            raise PeekabooError(f"Manifest {path} line {start} has more fields than the header; quote values "
                                "that contain commas.")
        if any(v is None for v in row.values()):
            raise PeekabooError(f"Manifest {path} line {start} has fewer fields than the header; fill every "
                                "column (leave optional ones empty).")
        if any(v.strip() for v in row.values()):  # a line of only commas is a blank line
            rows.append((start, row))
        start = reader.line_num + 1
    return rows


def _check_columns(path: Path, line_no: int, columns) -> None:
    missing = [c for c in REQUIRED_COLUMNS if c not in columns]
    if missing:
        raise PeekabooError(f"Manifest {path} line {line_no} lacks the column(s) {', '.join(missing)}; every row "
                            f"needs {' and '.join(REQUIRED_COLUMNS)}.")


def _string(row: dict, key: str, where: str) -> str:
    value = row.get(key)
    if not isinstance(value, str):
        raise PeekabooError(f"{where}: {key} must be a string, got {value!r}; quote it.")
    return value


def _optional_string(row: dict, key: str, where: str) -> str | None:
    value = row.get(key)
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    return _string(row, key, where).strip()


def _explicit_ids(path: Path, rows: list[tuple[int, dict]]) -> dict[int, str]:
    """Row index -> the id the row gives, refusing duplicates."""
    ids: dict[int, str] = {}
    seen: dict[str, int] = {}
    for index, (line, row) in enumerate(rows):
        value = row.get("id")
        if value is None or value == "":
            continue
        if isinstance(value, bool) or not isinstance(value, (str, int)):
            raise PeekabooError(f"Manifest {path} line {line}: id must be a string, got {value!r}.")
        pair_id = str(value).strip()
        if pair_id in seen:
            raise PeekabooError(f"Manifest {path} line {line} repeats the id {pair_id!r} of line {seen[pair_id]}; "
                                "ids must be unique.")
        seen[pair_id] = line
        ids[index] = pair_id
    return ids


def _unique(name: str, taken: set[str]) -> str:
    """``name``, or ``name-2``, ``name-3``, ... if an explicit id already took it."""
    candidate, k = name, 1
    while candidate in taken:
        k += 1
        candidate = f"{name}-{k}"
    return candidate


def _resolve(root: Path, value: str, key: str, where: str, allow_outside_root: bool) -> Path:
    """``value`` joined to ``root``; refused when it leaves ``root`` (after resolving ``..`` and symlinks)."""
    if not value.strip():
        raise PeekabooError(f"{where}: {key} is empty; give a path relative to the manifest's folder.")
    relative = Path(value)
    path = relative if relative.is_absolute() else root / relative
    if not allow_outside_root:
        if relative.is_absolute():
            raise PeekabooError(f"{where}: {key} {value!r} is an absolute path; make it relative to {root} or set "
                                "data.allow_outside_root=true.")
        if not path.resolve().is_relative_to(root.resolve()):
            raise PeekabooError(f"{where}: {key} {value!r} resolves outside the manifest's folder {root}; move it "
                                "under that folder or set data.allow_outside_root=true.")
    return path
