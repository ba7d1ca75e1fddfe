"""The objects benchmark's targets, checked against a results report: what the default has to reach for the
benchmark to count as evidence that the method works on objects (and not only that some start does)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from peekaboo.bench.common import markdown_table

#: Row kinds that run no optimization: a start scored alone and the training-free baselines.
NO_OPTIMIZATION_KINDS = ("start_only", "cross_attention", "random", "whole_image")


@dataclass(frozen=True)
class Goal:
    """One target: what it asks, the figure it reads from a report (None where the report lacks the rows), and
    whether the figure must be at least (``at_least``) or at most the target."""

    text: str
    figure: Callable[[dict[str, Any]], float | None]
    target: float
    at_least: bool = True
    percent: bool = False

    def met(self, value: float) -> bool:
        return value >= self.target if self.at_least else value <= self.target

    def show(self, value: float) -> str:
        return f"{100 * value:.1f}%" if self.percent else f"{value:.3f}"


def _summary(report: dict[str, Any], name: str, field: str) -> float | None:
    row = report["methods"].get(name)
    return None if row is None else row["summary"].get(field)


def best_unoptimized(report: dict[str, Any]) -> tuple[float, str] | None:
    """The best mIoU of the rows that run no optimization, with the row's label (None without such rows)."""
    found = [(row["summary"]["miou"], row["label"]) for row in report["methods"].values()
             if row.get("kind") in NO_OPTIMIZATION_KINDS and row["summary"].get("miou") is not None]
    return max(found) if found else None


def _margin_over_unoptimized(report: dict[str, Any]) -> float | None:
    default, best = _summary(report, "peekaboo", "miou"), best_unoptimized(report)
    return None if default is None or best is None else default - best[0]


def _margin_over(name: str) -> Callable[[dict[str, Any]], float | None]:
    def margin(report: dict[str, Any]) -> float | None:
        default, other = _summary(report, "peekaboo", "miou"), _summary(report, name, "miou")
        return None if default is None or other is None else default - other
    return margin


def _from_alpha_half(report: dict[str, Any]) -> float | None:
    """The run from alpha 0.5: its own row, or the default's where the default starts there itself."""
    own = _summary(report, "constant_init", "miou")
    if own is not None:
        return own
    default = report["methods"].get("peekaboo")
    starts_at_half = default is not None and (default.get("settings") or {}).get("mask", {}).get("init") == "constant"
    return _summary(report, "peekaboo", "miou") if starts_at_half else None


#: The targets by split of the objects benchmark.
GOALS: dict[str, tuple[Goal, ...]] = {
    "eval": (
        Goal("the default's mIoU", lambda r: _summary(r, "peekaboo", "miou"), 0.70),
        Goal("the default's wrong-object rate", lambda r: _summary(r, "peekaboo", "wrong_object_rate"), 0.10,
             at_least=False, percent=True),
        Goal("the default over the best row without optimization (mIoU)", _margin_over_unoptimized, 0.10),
        Goal("the run from alpha 0.5 (mIoU)", _from_alpha_half, 0.60),
        Goal("the default over the cross-attention baseline (mIoU)", _margin_over("cross_attention"), 0.20),
    ),
    "robust": (
        Goal("the default's mIoU", lambda r: _summary(r, "peekaboo", "miou"), 0.60),
        Goal("the default's wrong-object rate", lambda r: _summary(r, "peekaboo", "wrong_object_rate"), 0.15,
             at_least=False, percent=True),
    ),
}


def markdown(report: dict[str, Any]) -> str:
    """The targets of an objects report's split beside its figures ("" for another scene set or split)."""
    goals = GOALS.get(report["split"]) if report.get("scenes") == "objects" else None
    if not goals:
        return ""
    rows = []
    for goal in goals:
        value = goal.figure(report)
        target = f"{'>=' if goal.at_least else '<='} {goal.show(goal.target)}"
        rows.append([goal.text, target, "-" if value is None else goal.show(value),
                     "not measured yet" if value is None else ("met" if goal.met(value) else "**not met**")])
    return markdown_table(["target", "goal", "figure", "status"], rows)
