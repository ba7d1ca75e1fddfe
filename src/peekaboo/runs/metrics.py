"""Scores of predicted masks against ground truth: per-pair IoU and a run's summary.

Conventions (the same in :func:`pair_scores` and :func:`summarize`):

- Ground-truth pixels equal to :data:`~peekaboo.data.base.IGNORE` (255, VOC's void border) count neither as
  object nor as background: they are left out of the intersection and the union.
- IoU of an empty prediction against an empty target (union 0) is 1.0: saying "nothing here" about an image
  where nothing is there is exactly right. The same holds for a class or a whole run whose union is 0.
- ``miou`` averages the per-pair IoU (every pair weighs the same, as in the referring-segmentation papers);
  ``overall_iou`` divides summed intersections by summed unions (large objects weigh more, RefCOCO's
  "overall IoU"); ``per_class_iou`` accumulates intersections and unions per class, as the VOC benchmark does.
- Only pairs that finished (status ``"done"``) and have ground truth are scored; failed pairs are counted
  in ``failed`` but never scored as 0, so the two numbers must be read together.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np
import torch
from torchmetrics.functional.classification import binary_stat_scores

from peekaboo.data.base import IGNORE

#: IoU thresholds of the precision metrics (the fraction of pairs whose IoU reaches each), reported as ``P@t``.
PRECISION_THRESHOLDS: tuple[float, ...] = (0.2, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)

#: The ``status`` of a pair's record: ``DONE``, or :func:`failed_status` of a reason.
DONE = "done"
FAILED_PREFIX = "failed"


def failed_status(reason: str) -> str:
    """The ``status`` of a pair that failed for ``reason`` (``"input"``, ``"non-finite"``): ``"failed: <reason>"``."""
    return f"{FAILED_PREFIX}: {reason}"


#: The fields :func:`pair_scores` adds to a pair's record.
SCORE_KEYS = ("intersection", "union", "iou")
# Positions in the vector binary_stat_scores returns: [tp, fp, tn, fn, support].
_TP, _FP, _FN = 0, 1, 3
# IoU when the union is empty (see the module docstring).
_EMPTY_IOU = 1.0


def pair_scores(pred: np.ndarray, target: np.ndarray) -> dict:
    """Intersection, union and IoU of one predicted mask against its ground truth.

    Args:
        pred: ``(H, W)`` bool, the predicted object pixels.
        target: ``(H, W)`` uint8 with 0 (background), 1 (object) or 255 (ignored).

    Returns:
        ``{"intersection": int, "union": int, "iou": float}``, ignored pixels excluded; ``iou`` is 1.0 when
        both the prediction and the target are empty outside the ignored pixels.

    Raises:
        ValueError: the shapes differ or ``target`` holds a value other than 0, 1, 255.
    """
    if pred.shape != target.shape or pred.ndim != 2:
        raise ValueError(f"pred {pred.shape} and target {target.shape} must be the same (H, W) shape")
    stats = binary_stat_scores(
        torch.from_numpy(np.ascontiguousarray(pred, dtype=bool)),
        torch.from_numpy(np.ascontiguousarray(target, dtype=np.uint8)),
        ignore_index=IGNORE,
    )
    intersection = int(stats[_TP])
    union = int(stats[_TP] + stats[_FP] + stats[_FN])
    return {"intersection": intersection, "union": union, "iou": _ratio(intersection, union)}


def curve_points(curve: dict, key: str) -> Iterator[tuple[int, float]]:
    """The ``(step, value)`` points of one loss term of a pair's recorded curve (a record's ``curve``:
    ``{"step": [...], key: [...]}``), leaving out the steps where it was not finite (recorded as None)."""
    for step, value in zip(curve.get("step", []), curve.get(key, []), strict=False):
        if value is not None:
            yield int(step), float(value)


def summarize(records: Sequence[dict]) -> dict:
    """Summary of a dataset run from its per-pair records.

    Args:
        records: one dict per pair with ``status`` (``"done"`` or ``"failed: <reason>"``), and for pairs with
            ground truth ``intersection``, ``union`` and ``iou``; optionally ``meta`` with a ``class``.

    Returns:
        In this order: ``pairs``, ``done``, ``failed``, ``scored`` (done pairs with ground truth), ``miou``
        (mean per-pair IoU), ``overall_iou`` (summed intersection / summed union), ``precision``
        (``{"P@0.2": fraction of scored pairs with IoU >= 0.2, ...}`` over :data:`PRECISION_THRESHOLDS`),
        and, when any record has ``meta.class``, ``per_class_iou`` (class name -> summed intersection /
        summed union over that class's scored pairs, sorted by name) and ``class_miou`` (their mean).
        Every score is None when no pair is scored.
    """
    scored = [r for r in records if r.get("status") == DONE and _has_scores(r)]
    summary: dict = {
        "pairs": len(records),
        "done": sum(r.get("status") == DONE for r in records),
        "failed": sum(str(r.get("status", "")).startswith(FAILED_PREFIX) for r in records),
        "scored": len(scored),
        "miou": None,
        "overall_iou": None,
        "precision": None,
    }
    if scored:
        ious = [float(r["iou"]) for r in scored]
        summary["miou"] = sum(ious) / len(ious)
        summary["overall_iou"] = _ratio(sum(int(r["intersection"]) for r in scored),
                                        sum(int(r["union"]) for r in scored))
        summary["precision"] = {
            f"P@{t}": sum(iou >= t for iou in ious) / len(ious) for t in PRECISION_THRESHOLDS
        }
    if any(_class_of(r) is not None for r in records):
        per_class = _per_class_iou(scored)
        summary["per_class_iou"] = per_class or None
        summary["class_miou"] = sum(per_class.values()) / len(per_class) if per_class else None
    return summary


def _per_class_iou(scored: list[dict]) -> dict[str, float]:
    """VOC-style accumulation: per class, summed intersection over summed union."""
    sums: dict[str, list[int]] = {}
    for r in scored:
        name = _class_of(r)
        if name is None:
            continue
        acc = sums.setdefault(name, [0, 0])
        acc[0] += int(r["intersection"])
        acc[1] += int(r["union"])
    return {name: _ratio(*sums[name]) for name in sorted(sums)}


def _class_of(record: dict) -> str | None:
    meta = record.get("meta")
    if isinstance(meta, dict) and meta.get("class") is not None:
        return str(meta["class"])
    return None


def _has_scores(record: dict) -> bool:
    return all(record.get(k) is not None for k in SCORE_KEYS)


def _ratio(intersection: int, union: int) -> float:
    return intersection / union if union else _EMPTY_IOU
