"""Re-score a finished (or partial) run from its saved masks: ``python -m peekaboo.runs.evaluate runs/NAME``.

Nothing is re-optimized: each done pair's ``masks/<id>.png`` is compared with the source's ground truth and
``summary.json`` (and the scores in ``results.jsonl``) are rewritten, and the run report ``report.html``.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from peekaboo.config import TrainConfig, drop_retired_keys
from peekaboo.data import Pair, build_source
from peekaboo.errors import PeekabooError, exit_status
from peekaboo.runs.metrics import DONE, SCORE_KEYS
from peekaboo.runs.outputs import RunDir, output_names, score_pair, write_results
from peekaboo.runs.report import write_report
from peekaboo.utils import images

log = logging.getLogger(__name__)


def evaluate(run_dir: str | Path) -> dict[str, Any]:
    """Recompute every done pair's IoU from its saved mask, then ``results.jsonl``, ``summary.json`` and
    ``report.html``; returns the summary."""
    rd = RunDir(Path(run_dir))
    if not rd.config.is_file():
        raise PeekabooError(f"{rd.root} has no {rd.config.name}, so it is not a peekaboo run folder; pass "
                            "runs/<name>.")
    cfg = OmegaConf.merge(OmegaConf.structured(TrainConfig), drop_retired_keys(OmegaConf.load(rd.config)))
    pairs = build_source(cfg.data)
    records = []
    for pair, name in zip(pairs, output_names(pairs), strict=True):
        record = rd.record(name)
        if record is None:
            continue
        records.append(_rescored(rd, pair, record) if record.get("status") == DONE else record)
    summary = write_results(rd, records, len(pairs))
    write_report(rd.root)
    return summary


def _rescored(rd: RunDir, pair: Pair, record: dict[str, Any]) -> dict[str, Any]:
    """``record`` with the scores of its saved mask against the pair's ground truth as they are now: none where
    either is gone or unusable (a warning), never the old ones."""
    record = {k: v for k, v in record.items() if k not in SCORE_KEYS}
    try:
        mask = images.read_mask(rd.root / record["outputs"]["mask"])
    except PeekabooError as err:
        log.warning("pair %s: its saved mask is unusable (%s); not scored.", pair.id, err)
        return record
    return record | score_pair(pair, mask)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m peekaboo.runs.evaluate", description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", help="a run folder, e.g. runs/NAME")
    args = parser.parse_args(argv)
    return exit_status(lambda: print(json.dumps(evaluate(args.run_dir), indent=2)))


if __name__ == "__main__":
    raise SystemExit(main())
