"""The benchmark report's breakdown by what the objects scenes vary (peekaboo.bench.breakdown)."""

from __future__ import annotations

import numpy as np

from peekaboo.bench import breakdown
from peekaboo.bench.report import render_docs
from peekaboo.bench.scoring import load_pairs


def test_group_summaries_by_hand():
    facts = {"a": {"objects": 1}, "b": {"objects": 2}, "c": {"objects": 2}, "d": {"objects": 2}}
    records = [{"id": "a", "iou": 0.9, "wrong_object": False}, {"id": "b", "iou": 0.2, "wrong_object": True},
               {"id": "c", "iou": 0.6, "wrong_object": False},
               {"id": "d", "iou": None, "status": "failed"},  # unscored: left out
               {"id": "e", "iou": 1.0}]  # not among the facts: left out
    got = breakdown.group_summaries(records, facts, lambda f: str(f["objects"]))
    assert got == {"1": {"pairs": 1, "miou": 0.9, "wrong": 0.0},
                   "2": {"pairs": 2, "miou": np.mean([0.2, 0.6]), "wrong": 0.5}}


def test_area_bins_take_the_highest_edge_reached():
    assert [breakdown._area_bin(a) for a in (0.0, 0.0249, 0.025, 0.0599, 0.06, 0.5)] == [
        "under 2.5%", "under 2.5%", "2.5% to 6%", "2.5% to 6%", "6% or more", "6% or more"]


def test_scene_facts_are_the_scenes_own():
    pairs = load_pairs("eval", 6, "objects")
    facts = breakdown.scene_facts("eval", 6)
    for p in pairs:
        f = facts[p.id]
        assert f["objects"] == 1 + len(p.others) and f["occluded"] == p.meta["occluded"]
        assert f["visible_area"] == float(np.mean(p.target == 1)) > 0
        assert p.meta["background"].startswith(f["background"])


def test_the_objects_report_shows_each_factor_for_its_finished_rows():
    pairs = load_pairs("eval", 6, "objects")
    facts = breakdown.scene_facts("eval", 6)
    default = [{"id": p.id, "iou": k / 10, "wrong_object": k % 2 == 1} for k, p in enumerate(pairs)]
    # Another row with other figures, one pair unscored: each column is its own row's.
    baseline = [{"id": p.id, "iou": 1 - k / 8, "wrong_object": k == 0} for k, p in enumerate(pairs[1:])]
    baseline.append({"id": pairs[0].id, "iou": None, "status": "failed"})
    report = {"scenes": "objects", "split": "eval", "pairs": 6,
              "methods": {"peekaboo": {"label": "Peekaboo (default)", "records": default},
                          "cross_attention": {"label": "cross-attention map", "records": baseline},
                          "random": {"label": "random disc", "records": default}}}
    text = breakdown.markdown(report)
    assert text.count("| objects in the scene | pairs | Peekaboo (default) | cross-attention map |") == 1
    assert "random disc" not in text  # not one of BREAKDOWN_ROWS
    for title, group_of, _ in breakdown.FACTORS:
        table = text.split(f"**By {title}**")[1].split("**By")[0]
        cells = [line.split(" | ") for line in table.splitlines() if line.startswith("| ") and "---" not in line][1:]
        assert sum(int(c[1]) for c in cells) == 6  # every pair of the table once, in its group
        for c in cells:
            group = c[0].removeprefix("| ")
            for column, records in ((2, default), (3, baseline)):
                ious = [r["iou"] for r in records if r["iou"] is not None and group_of(facts[r["id"]]) == group]
                cell = c[column].removesuffix(" |")
                assert cell.startswith(f"{np.mean(ious):.3f} (") if ious else cell == "-"
    # Not for the shapes scenes, nor without a breakdown row.
    assert breakdown.markdown({**report, "scenes": "shapes"}) == ""
    assert breakdown.markdown({**report, "methods": {"random": report["methods"]["random"]}}) == ""


def test_groups_outside_a_factors_order_are_shown_after_it(monkeypatch):
    pairs = load_pairs("eval", 3, "objects")
    facts = {p.id: {"objects": 5 + k % 2, "visible_area": 0.1, "occluded": False, "background": "sky"}
             for k, p in enumerate(pairs)}
    monkeypatch.setattr(breakdown, "scene_facts", lambda split, n: facts)
    records = [{"id": p.id, "iou": 0.5, "wrong_object": False} for p in pairs]
    text = breakdown.markdown({"scenes": "objects", "split": "eval", "pairs": 3,
                               "methods": {"peekaboo": {"label": "default", "records": records}}})
    assert "| 5 | 2 | 0.500 (0%) |" in text and "| 6 | 1 | 0.500 (0%) |" in text and "| sky | 3 |" in text


def test_render_docs_carries_the_breakdown():
    pairs = load_pairs("eval", 2, "objects")
    records = [{"id": p.id, "iou": 0.5, "wrong_object": False} for p in pairs]
    row = {"label": "Peekaboo (default)", "kind": "peekaboo", "about": "x", "overrides": [], "same_as": None,
           "summary": {"miou": 0.5, "wrong_object_rate": 0.0}, "records": records}
    report = {"scenes": "objects", "split": "eval", "pairs": 2, "methods": {"peekaboo": row}, "table": "T",
              "command": "c", "model": "m", "date": "d",
              "machine": {"platform": "p", "cpu_count": 2, "torch_threads": 2, "torch": "t", "python": "3"}}
    text = render_docs(report)
    assert "## Where it succeeds and fails" in text and breakdown.markdown(report) in text
