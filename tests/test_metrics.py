"""IoU, precision and the run summary against hand-computed numbers."""

from __future__ import annotations

import math

import numpy as np
import pytest

from peekaboo.runs.metrics import PRECISION_THRESHOLDS, curve_points, pair_scores, summarize

IGN = 255


def test_pair_scores_excludes_ignored_pixels():
    # (0,0) tp, (0,1) fp, (0,2) predicted on an ignored pixel -> excluded, (1,0) fn, (1,1) tp, (1,2) tn.
    pred = np.array([[1, 1, 1], [0, 1, 0]], dtype=bool)
    target = np.array([[1, 0, IGN], [1, 1, 0]], dtype=np.uint8)
    assert pair_scores(pred, target) == {"intersection": 2, "union": 4, "iou": 0.5}


def test_pair_scores_empty_cases():
    empty = np.zeros((3, 4), dtype=bool)
    assert pair_scores(empty, np.zeros((3, 4), np.uint8)) == {"intersection": 0, "union": 0, "iou": 1.0}
    # Everything the target marks is ignored: nothing left to find, nothing predicted.
    assert pair_scores(empty, np.full((3, 4), IGN, np.uint8))["iou"] == 1.0
    target = np.zeros((3, 4), np.uint8)
    target[1, 1:3] = 1
    assert pair_scores(empty, target) == {"intersection": 0, "union": 2, "iou": 0.0}
    assert pair_scores(target.astype(bool), target) == {"intersection": 2, "union": 2, "iou": 1.0}


def test_pair_scores_rejects_shape_mismatch():
    with pytest.raises(ValueError, match="same"):
        pair_scores(np.zeros((2, 3), bool), np.zeros((3, 2), np.uint8))


def _rec(status, inter=None, union=None, cls=None):
    rec = {"status": status}
    if inter is not None:
        rec.update(intersection=inter, union=union, iou=inter / union)
    if cls is not None:
        rec["meta"] = {"class": cls}
    return rec


def test_summarize_hand_computed():
    records = [
        _rec("done", 1, 2, "dog"),       # IoU 0.5
        _rec("done", 3, 4, "dog"),       # IoU 0.75
        _rec("done", 0, 5, "cat"),       # IoU 0
        _rec("failed: ImageError: bad file", cls="cat"),
        _rec("done"),                    # no ground truth
    ]
    s = summarize(records)
    assert list(s) == ["pairs", "done", "failed", "scored", "miou", "overall_iou", "precision", "per_class_iou",
                       "class_miou"]
    assert (s["pairs"], s["done"], s["failed"], s["scored"]) == (5, 4, 1, 3)
    assert math.isclose(s["miou"], (0.5 + 0.75 + 0.0) / 3)
    assert math.isclose(s["overall_iou"], 4 / 11)
    assert list(s["precision"]) == [f"P@{t}" for t in PRECISION_THRESHOLDS]
    expected = {"P@0.2": 2 / 3, "P@0.4": 2 / 3, "P@0.5": 2 / 3, "P@0.6": 1 / 3, "P@0.7": 1 / 3, "P@0.8": 0.0,
                "P@0.9": 0.0}
    assert s["precision"] == pytest.approx(expected)
    # VOC accumulation: dog (1+3)/(2+4), cat 0/5 (its failed pair is not scored).
    assert list(s["per_class_iou"]) == ["cat", "dog"]
    assert s["per_class_iou"] == pytest.approx({"cat": 0.0, "dog": 4 / 6})
    assert math.isclose(s["class_miou"], (0.0 + 4 / 6) / 2)


def test_summarize_without_classes_or_scores():
    s = summarize([_rec("failed: NonFiniteError"), _rec("done")])
    assert s == {"pairs": 2, "done": 1, "failed": 1, "scored": 0, "miou": None, "overall_iou": None,
                 "precision": None}
    s = summarize([_rec("failed: x", cls="dog")])
    assert s["per_class_iou"] is None and s["class_miou"] is None
    assert summarize([])["miou"] is None


def test_summarize_of_pair_scores():
    target = np.array([[1, 1], [0, IGN]], dtype=np.uint8)
    pred = np.array([[1, 0], [1, 1]], dtype=bool)
    rec = {"status": "done", **pair_scores(pred, target)}  # I=1, U=3
    s = summarize([rec, {"status": "done", **pair_scores(target == 1, target)}])
    assert math.isclose(s["miou"], (1 / 3 + 1) / 2)
    assert math.isclose(s["overall_iou"], 3 / 5)


def test_curve_points_skip_the_steps_a_term_was_not_finite():
    curve = {"step": [1, 2, 3], "loss/dream": [0.5, None, 0.25], "loss/total": [1.0, 2.0]}
    assert list(curve_points(curve, "loss/dream")) == [(1, 0.5), (3, 0.25)]
    assert list(curve_points(curve, "loss/total")) == [(1, 1.0), (2, 2.0)]  # a shorter term ends early
    assert list(curve_points({}, "loss/dream")) == []
