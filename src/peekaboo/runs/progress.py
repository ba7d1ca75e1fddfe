"""What a dataset run reports while it goes: the job-wide progress line, and the job-level TensorBoard curves of
each worker (pairs done, seconds per pair, running mIoU, loss quantiles)."""

from __future__ import annotations

import logging
import math
import sys
import time
from collections import defaultdict
from collections.abc import Callable
from typing import Any

import numpy as np

from peekaboo.optim.callbacks import CURVE_KEYS
from peekaboo.optim.module import TOTAL_LOSS
from peekaboo.runs.metrics import curve_points
from peekaboo.runs.outputs import RunDir

log = logging.getLogger(__name__)


class JobProgress:
    """The job-wide progress line of a run: pairs finished (by any worker) of all, and an ETA.

    In a log that is not a terminal (a cluster job's output file) one line every ``run.progress_every_s``
    seconds replaces the per-worker bars, which would garble each other there. Counting reads the run folder,
    so it sees every worker's pairs; the rate is taken from the pairs finished since this process started.
    """

    def __init__(self, run_dir: RunDir, names: list[str], every_s: float):
        self.run_dir, self.names = run_dir, names
        self.every = float(every_s)
        self.poll_s = max(0.1, min(self.every, 5.0))
        self.start = time.monotonic()
        self.at_start = self.finished()
        self.last_time: float | None = None
        self.last_count: int | None = None

    @staticmethod
    def enabled() -> bool:
        """Lines, not bars: stderr is not a terminal."""
        return not sys.stderr.isatty()

    def finished(self) -> int:
        return sum(self.run_dir.done_path(n).is_file() for n in self.names)

    def line(self, finished: int, now: float) -> str:
        total, elapsed = len(self.names), now - self.start
        rate = (finished - self.at_start) / elapsed if elapsed > 0 else 0.0
        eta = _clock((total - finished) / rate) if rate > 0 else "unknown"
        return (f"progress: {finished}/{total} pairs finished ({100 * finished / max(total, 1):.0f}%), "
                f"{_clock(elapsed)} elapsed, ETA {eta}")

    def report(self, final: bool = False) -> None:
        """Log the line when it is due (every ``run.progress_every_s``, if the count changed); ``final``: now,
        unless the last line already said the same."""
        if not self.enabled():
            return
        now = time.monotonic()
        if not final and self.last_time is not None and now - self.last_time < self.every:
            return
        count = self.finished()
        if count != self.last_count or (final and self.last_time is None):
            log.info("%s", self.line(count, now))
            self.last_time, self.last_count = now, count


def _clock(seconds: float) -> str:
    """``H:MM:SS``."""
    s = round(seconds)
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


class JobCurves:
    """One worker's job-level curves through the run's logger, over every pair it finished (with a logger run
    of its own or not: ``run.log_pairs``).

    - In the run ``worker<rank>``, at step = pairs finished in the whole run: ``job/pairs_done``,
      ``job/seconds_per_pair``, ``job/running_miou``, ``job/mask_area`` (the pair's), ``job/pairs_per_hour``
      (this worker's, since it started) and ``job/loss_q10|q50|q90`` (quantiles of the final ``loss/total`` of
      the pairs it finished).
    - In the run ``worker<rank>-losses`` (built by ``losses_logger`` when the worker stops), at step =
      optimization step: ``loss_quantiles/<term>_q10|q50|q90`` for each loss term, over the loss curves of the
      pairs it finished (a pair stopped early counts up to its stop). A resumed worker's attempt replaces what
      the attempt before it logged there (TensorBoard), so no step is written twice.
    """

    def __init__(self, logger: Any, finished: int, losses_logger: Callable[[], Any]):
        self.logger, self.losses_logger = logger, losses_logger
        self.done, self.ious = finished, []
        self.start, self.added = time.monotonic(), 0
        self.final_losses: list[float] = []
        self.curves: dict[str, dict[int, list[float]]] = {key: defaultdict(list) for key in CURVE_KEYS}

    def add(self, records: list[dict]) -> None:
        for record in records:
            self.done += 1
            self.added += 1
            if record.get("iou") is not None:
                self.ious.append(record["iou"])
            metrics = {"job/pairs_done": self.done, "job/seconds_per_pair": record.get("seconds", 0.0),
                       "job/pairs_per_hour": self.added * 3600 / max(time.monotonic() - self.start, 1e-6)}
            if self.ious:
                metrics["job/running_miou"] = float(np.mean(self.ious))
            if record.get("area") is not None:
                metrics["job/mask_area"] = float(record["area"])
            final = record.get("losses", {}).get(TOTAL_LOSS)
            if final is not None and math.isfinite(final):
                self.final_losses.append(final)
            if self.final_losses:
                metrics.update(_quantiles("job/loss", self.final_losses))
            curve = record.get("curve") or {}
            for key in CURVE_KEYS:
                for step, value in curve_points(curve, key):
                    self.curves[key][step].append(value)
            self.logger.log_metrics(metrics, step=self.done)
        self.logger.save()

    def close(self) -> None:
        self.logger.finalize("success")
        steps = sorted({step for by_step in self.curves.values() for step in by_step})
        if not steps:
            return
        losses = self.losses_logger()
        for step in steps:
            metrics: dict[str, float] = {}
            for key, by_step in self.curves.items():
                if by_step.get(step):
                    metrics.update(_quantiles(f"loss_quantiles/{key.rpartition('/')[2]}", by_step[step]))
            losses.log_metrics(metrics, step=step)
        losses.finalize("success")


# The quantiles of the job-level loss curves: the median and a band that holds 80% of the pairs.
QUANTILES = (0.1, 0.5, 0.9)


def _quantiles(prefix: str, values: list[float]) -> dict[str, float]:
    """``{<prefix>_q10: ..., <prefix>_q50: ..., <prefix>_q90: ...}`` of ``values``."""
    return {f"{prefix}_q{round(100 * q)}": float(v) for q, v in zip(QUANTILES, np.quantile(values, QUANTILES),
                                                                    strict=True)}
