"""A run folder's files: its paths, the per-pair outputs and done records, and the results and summary (the
folder's layout: :mod:`peekaboo.runs.layout`)."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from peekaboo.config import TrainConfig
from peekaboo.data import Pair
from peekaboo.errors import PeekabooError
from peekaboo.optim.engine import PairResult
from peekaboo.runs import report
from peekaboo.runs.layout import CONFIG_FILE, REPORT_FILE, RESULTS_FILE, SUMMARY_FILE
from peekaboo.runs.metrics import DONE, pair_scores, summarize
from peekaboo.utils import files, images

log = logging.getLogger(__name__)

# The files a dataset run writes per pair, each under ``<kind>s/<name>.png`` (the overlay only with
# run.save_overlays).
RUN_FILES = ("mask", "alpha", "overlay")


class RunDir:
    """Paths and records of one run folder."""

    def __init__(self, root: Path):
        self.root = root

    def pair_dir(self, name: str) -> Path:
        return self.root / "pairs" / name

    def done_path(self, name: str) -> Path:
        return self.pair_dir(name) / "done.json"

    def ckpt_dir(self, name: str) -> Path:
        return self.pair_dir(name) / "ckpt"

    def record(self, name: str) -> dict | None:
        """The pair's finished record, or None (also for a damaged record: the pair is then redone)."""
        try:
            return json.loads(self.done_path(name).read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            return None

    @property
    def results(self) -> Path:
        return self.root / RESULTS_FILE

    @property
    def summary(self) -> Path:
        return self.root / SUMMARY_FILE

    @property
    def config(self) -> Path:
        return self.root / CONFIG_FILE


def output_names(pairs: list[Pair]) -> list[str]:
    """File-system-safe output names, one per pair; two ids that map to one name are an error."""
    names = [files.safe_name(p.id) for p in pairs]
    seen: dict[str, str] = {}
    for pair, name in zip(pairs, names, strict=True):
        if name in seen:
            raise PeekabooError(f"Pair ids {seen[name]!r} and {pair.id!r} map to the same output name {name!r}; "
                                "make the ids differ in letters or digits.")
        seen[name] = pair.id
    return names


def write_record(run_dir: RunDir, name: str, record: dict) -> dict:
    """Persist a finished pair: its done record first (the truth on rerun), then its results line."""
    files.write_text(json.dumps(record), run_dir.done_path(name))
    files.append_line(json.dumps(record), run_dir.results)
    return record


def write_pair(cfg: TrainConfig, run_dir: RunDir, name: str, img: Image.Image, placement: images.Placement,
                result: PairResult, pair: Pair) -> dict[str, Any]:
    """Write one pair's mask, alpha (and overlay) at the original size; returns its record fields."""
    final = images.finalize_mask(result.alpha, placement, cfg.optimization.threshold)
    kinds = RUN_FILES if cfg.run.save_overlays else tuple(k for k in RUN_FILES if k != "overlay")
    paths = files.write_pair_files(img, final, {kind: run_dir.root / f"{kind}s" / f"{name}.png" for kind in kinds})
    fields: dict[str, Any] = {
        "status": DONE, "outputs": {k: str(v.relative_to(run_dir.root)) for k, v in paths.items()},
        "steps": result.steps, "seconds": round(result.seconds, 3), "losses": result.losses, "curve": result.curve,
        "area": final.area,
    }
    return fields | score_pair(pair, final.mask)


def score_pair(pair: Pair, mask: np.ndarray) -> dict[str, Any]:
    """``mask`` ``(H, W)`` bool (at the image's size) scored against the pair's ground truth
    (:func:`~peekaboo.runs.metrics.pair_scores`); ``{}`` when the pair has none, or when it cannot be used (a
    warning: the mask is written all the same, and once the ground truth is mended ``python -m
    peekaboo.runs.evaluate`` scores it)."""
    try:
        target = pair.load_target()
    except PeekabooError as err:
        log.warning("pair %s: ground truth unusable (%s); not scored.", pair.id, err)
        return {}
    if target is not None and target.shape != mask.shape:  # e.g. the image was replaced after the run
        log.warning("pair %s: its mask is %dx%d but its ground truth %dx%d; not scored.", pair.id, mask.shape[1],
                    mask.shape[0], target.shape[1], target.shape[0])
        return {}
    return {} if target is None else pair_scores(mask, target)


def finalize(run_dir: Path, pairs: list[Pair], names: list[str]) -> dict[str, Any]:
    """Rewrite ``results.jsonl`` (exactly one line per finished pair, in dataset order) and ``summary.json``."""
    rd = RunDir(run_dir)
    records = [r for n in names if (r := rd.record(n)) is not None]
    summary = write_results(rd, records, len(pairs))
    try:
        report.write_report(run_dir)
    except Exception as err:  # the report is a view of the results: it must never cost the run them
        log.warning("could not write %s (%s: %s); the results are intact, and python -m peekaboo.runs.evaluate %s "
                    "writes it again.", run_dir / REPORT_FILE, type(err).__name__, err, run_dir)
    log.info("%s: %d/%d pairs finished, mIoU %s", run_dir, len(records), len(pairs), miou_text(summary))
    return summary


def miou_text(summary: dict[str, Any]) -> str:
    """A run summary's mIoU for people: three decimals, or why there is none."""
    miou = summary.get("miou")
    return "n/a (no ground truth)" if miou is None else f"{miou:.3f}"


def write_results(rd: RunDir, records: list[dict], n_pairs: int) -> dict[str, Any]:
    """Atomically write ``results.jsonl`` (one line per record) and ``summary.json``; returns the summary."""
    with files.atomic_path(rd.results) as tmp:
        tmp.write_text("".join(json.dumps(r) + "\n" for r in records))
    summary = summarize(records)
    summary["pairs"] = n_pairs
    summary["remaining"] = n_pairs - len(records)
    files.write_text(json.dumps(summary, indent=2) + "\n", rd.summary)
    return summary
