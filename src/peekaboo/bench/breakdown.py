"""Where a benchmark row succeeds and fails: its mIoU and wrong-object rate by what the objects scenes vary (how
many objects, how much of the named one is visible, whether another hides part of it, the background).

The scene facts come from the scenes themselves (:func:`scene_facts`), never from the stored per-pair records, so
a table stored before this report existed gets it too.
"""

from __future__ import annotations

import functools
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from peekaboo.bench.common import fmt
from peekaboo.bench.common import markdown_table as _table
from peekaboo.bench.scoring import load_pairs

#: Visible-area bins of the named object (share of the image's pixels): lower edges, with their labels.
AREA_BINS = ((0.0, "under 2.5%"), (0.025, "2.5% to 6%"), (0.06, "6% or more"))
#: The rows a breakdown shows, where the table has them: the default, its cross-attention start, the baseline.
BREAKDOWN_ROWS = ("peekaboo", "cross_attention_init", "region_init", "cross_attention")


def _area_bin(area: float) -> str:
    return [label for edge, label in AREA_BINS if area >= edge][-1]


#: Each factor: its title, the group a pair's facts fall in, and the groups' order.
FACTORS: tuple[tuple[str, Callable[[dict[str, Any]], str], tuple[str, ...]], ...] = (
    ("objects in the scene", lambda f: str(f["objects"]), ("1", "2", "3", "4")),
    ("visible area of the named object", lambda f: _area_bin(f["visible_area"]), tuple(b for _, b in AREA_BINS)),
    ("named object partly hidden by another", lambda f: "yes" if f["occluded"] else "no", ("no", "yes")),
    ("background", lambda f: f["background"], ("photo", "texture", "graded", "plain")),
)


@functools.cache
def scene_facts(split: str, n: int) -> dict[str, dict[str, Any]]:
    """What each of the first ``n`` objects pairs of ``split`` is like, by pair id: ``objects`` in its scene,
    ``visible_area`` (the named object's visible share of the image), ``occluded`` and ``background`` (its kind:
    photo, texture, graded or plain). Rendered once per process."""
    return {p.id: {"objects": 1 + len(p.others), "visible_area": float(np.mean(p.target == 1)),
                   "occluded": bool(p.meta["occluded"]), "background": p.meta["background"].split(":")[0]}
            for p in load_pairs(split, n, "objects")}


def group_summaries(records: Sequence[dict[str, Any]], facts: dict[str, dict[str, Any]],
                    group_of: Callable[[dict[str, Any]], str]) -> dict[str, dict[str, float]]:
    """mIoU, wrong-object rate and pair count of ``records`` (per-pair results with ``id``, ``iou`` and
    ``wrong_object``) in each group that ``group_of`` puts their pairs' facts in; unscored pairs are left out."""
    groups: dict[str, list[dict[str, Any]]] = {}
    for r in records:
        if r.get("iou") is not None and r["id"] in facts:
            groups.setdefault(group_of(facts[r["id"]]), []).append(r)
    return {g: {"pairs": len(rs), "miou": float(np.mean([r["iou"] for r in rs])),
                "wrong": float(np.mean([bool(r.get("wrong_object")) for r in rs]))} for g, rs in groups.items()}


def markdown(report: dict[str, Any]) -> str:
    """The breakdown of an objects results report's finished :data:`BREAKDOWN_ROWS` ("" for another scene set or
    without those rows): one table per factor, a group per line (the factor's groups in order, then any other),
    with the table's pairs in the group and each row's mIoU (wrong-object rate) over its scored pairs there."""
    rows = [(report["methods"][n]["label"], report["methods"][n].get("records", [])) for n in BREAKDOWN_ROWS
            if n in report["methods"]]
    if report.get("scenes") != "objects" or not rows:
        return ""
    facts = scene_facts(report["split"], report["pairs"])
    lines = ["Each cell: mIoU (wrong-object rate) of the row's pairs in that group.", ""]
    for title, group_of, order in FACTORS:
        by_row = [group_summaries(records, facts, group_of) for _, records in rows]
        pairs_in = Counter(group_of(f) for f in facts.values())
        groups = [g for g in order if g in pairs_in] + sorted(set(pairs_in) - set(order))
        body = [[g, pairs_in[g], *(f"{fmt(s[g]['miou'])} ({100 * s[g]['wrong']:.0f}%)" if g in s else "-"
                                   for s in by_row)]
                for g in groups]
        lines += [f"**By {title}**", "", _table([title, "pairs", *(label for label, _ in rows)], body, right_from=1),
                  ""]
    return "\n".join(lines).rstrip()
