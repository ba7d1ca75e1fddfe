"""The benchmarks' pairs and their scores: the synthetic pairs (shapes or objects) with every object's mask, and
the per-pair record of a predicted mask (IoU terms, whether it took another object of the scene, its area)."""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from peekaboo.data.seeds import EVAL_SPLITS
from peekaboo.data.synthetic import GENERATORS, SCENE_SETS, SPLIT_NAMES, as_pair
from peekaboo.errors import PeekabooError
from peekaboo.runs.metrics import DONE, pair_scores, summarize

BENCH_SPLITS = EVAL_SPLITS


@dataclass(frozen=True)
class BenchPair:
    """One evaluation pair with everything scoring needs.

    Attributes:
        image: the scene, ``(H, W, 3)`` uint8 RGB as a PIL image.
        target: ``(H, W)`` uint8 0/1 mask of the named object.
        others: ``(H, W)`` bool masks of the scene's other objects.
    """

    id: str
    prompt: str
    image: Any
    target: np.ndarray
    others: tuple[np.ndarray, ...]
    meta: dict = field(default_factory=dict)


def load_pairs(split: str, n: int, scenes: str = "shapes") -> list[BenchPair]:
    """The first ``n`` pairs of ``split`` of a synthetic scene set (those of
    :func:`peekaboo.data.synthetic.synthetic_pairs`), with the other objects' masks; each scene is rendered once.

    Raises:
        PeekabooError: an unknown split or scene set, or ``n < 1``.
    """
    if split not in BENCH_SPLITS:
        raise PeekabooError(f"--split {split}: use one of {', '.join(BENCH_SPLITS)}.")
    if scenes not in SCENE_SETS:
        raise PeekabooError(f"--scenes {scenes}: use one of {', '.join(SCENE_SETS)}.")
    if n < 1:
        raise PeekabooError(f"--pairs {n}: score at least 1 pair.")
    out = []
    for generated in GENERATORS[scenes].eval_pairs(SPLIT_NAMES[split], n):
        pair = as_pair(generated, scenes)
        others = tuple(o.mask for k, o in enumerate(generated.scene.objects) if k != generated.target)
        out.append(BenchPair(pair.id, pair.prompt, pair.load_image(), pair.load_target(), others, pair.meta or {}))
    return out


def wrong_object(pred: np.ndarray, target: np.ndarray, others: Sequence[np.ndarray]) -> bool:
    """Whether the prediction covers some other object more than the named one.

    Args:
        pred: ``(H, W)`` bool predicted mask.
        target: ``(H, W)`` the named object (nonzero = object; 255, ignored, counts as not object).
        others: ``(H, W)`` bool masks of the scene's other objects.

    Returns:
        True when ``|pred & other_k| > |pred & target|`` for some ``k``. An empty prediction is never wrong
        (it chose nothing; its IoU of 0 already counts against it).
    """
    on_target = int(np.count_nonzero(pred & (target == 1)))
    return any(int(np.count_nonzero(pred & other)) > on_target for other in others)


def score(pred: np.ndarray, pair: BenchPair) -> dict[str, Any]:
    """The per-pair record fields of a predicted ``(H, W)`` bool mask: IoU terms, wrong object, area."""
    return {**pair_scores(pred, pair.target), "wrong_object": wrong_object(pred, pair.target, pair.others),
            "area": float(pred.mean())}


def summarize_method(records: Sequence[dict]) -> dict[str, Any]:
    """:func:`peekaboo.runs.metrics.summarize` plus the wrong-object rate and the median seconds per pair.

    The median, not the mean: a long row runs across sessions, and a batch whose process was paused (SIGSTOP,
    while the CPU timed something else) or shared its core would otherwise set the row's time."""
    summary = summarize(records)
    scored = [r for r in records if r.get("status") == DONE]
    summary["wrong_object_rate"] = (sum(bool(r["wrong_object"]) for r in scored) / len(scored)) if scored else None
    summary["seconds_per_pair"] = statistics.median(float(r["seconds"]) for r in records) if records else None
    return summary
