"""The objects benchmark's targets against a report (peekaboo.bench.goals)."""

from __future__ import annotations

import pytest

from peekaboo.bench import goals


def _row(kind: str, miou: float, wrong: float = 0.0, init: str | None = None) -> dict:
    return {"kind": kind, "label": f"{kind} row", "summary": {"miou": miou, "wrong_object_rate": wrong},
            **({"settings": {"mask": {"init": init}}} if init else {})}


def test_figures_by_hand():
    report = {"scenes": "objects", "split": "eval", "methods": {
        "peekaboo": _row("peekaboo", 0.72, 0.08, init="constant"),
        "default_start": _row("start_only", 0.05), "region_start": _row("start_only", 0.30),
        "cross_attention": _row("cross_attention", 0.50), "whole_image": _row("whole_image", 0.06)}}
    figures = {g.text: g.figure(report) for g in goals.GOALS["eval"]}
    assert figures["the default's mIoU"] == 0.72
    assert figures["the default over the best row without optimization (mIoU)"] == pytest.approx(0.72 - 0.50)
    assert figures["the default over the cross-attention baseline (mIoU)"] == pytest.approx(0.22)
    # The default starts at alpha 0.5 itself, so it is the run from alpha 0.5.
    assert figures["the run from alpha 0.5 (mIoU)"] == 0.72
    assert goals.best_unoptimized(report) == (0.50, "cross_attention row")
    table = goals.markdown(report)
    assert "| the default's wrong-object rate | <= 10.0% | 8.0% | met |" in table
    assert "| the default over the cross-attention baseline (mIoU) | >= 0.200 | 0.220 | met |" in table


def test_a_start_of_its_own_is_not_the_run_from_alpha_half():
    methods = {"peekaboo": _row("peekaboo", 0.8, init="region")}
    report = {"scenes": "objects", "split": "eval", "methods": methods}
    figure = next(g for g in goals.GOALS["eval"] if "alpha 0.5" in g.text).figure
    assert figure(report) is None
    assert "| the run from alpha 0.5 (mIoU) | >= 0.600 | - | not measured yet |" in goals.markdown(report)
    methods["constant_init"] = _row("peekaboo", 0.55)
    assert figure(report) == 0.55
    assert "| the run from alpha 0.5 (mIoU) | >= 0.600 | 0.550 | **not met** |" in goals.markdown(report)


def test_only_the_objects_splits_have_targets():
    report = {"scenes": "objects", "split": "robust", "methods": {"peekaboo": _row("peekaboo", 0.61, 0.2)}}
    assert goals.markdown(report).count("\n| ") == 2  # header rule excluded: the two robust targets
    assert "| 20.0% | **not met** |" in goals.markdown(report)
    assert goals.markdown({**report, "scenes": "shapes"}) == ""
    assert goals.markdown({**report, "split": "tune"}) == ""
