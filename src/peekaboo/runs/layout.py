"""The names of a run folder's files, stated once, and the record of a run's start.

Layout of ``<run.root>/<run.name>/``::

    config.yaml  cmd.txt          the resolved config and the command line that started the run
    weights.txt                   the digest of the model weights it started with (a resume must match it)
    masks/<id>.png                binary mask at the image's original size
    alphas/<id>.png               soft alpha (0..255) at the original size
    overlays/<id>.png             mask tinted over the image (run.save_overlays)
    pairs/<id>/done.json          the pair's result record: it is finished (skipped on rerun)
    pairs/<id>/ckpt/last.ckpt     the pair's latest checkpoint while it runs (resumed from on rerun)
    batches/<...>/ckpt/last.ckpt  the same for a batch of pairs (data.pairs_per_step > 1), beside members.json
    results.jsonl                 one line per finished pair
    summary.json                  pairs done / failed, mIoU, overall IoU, precision at IoU thresholds
    report.html  report/*.png     the run report (peekaboo.runs.report): summary, figures, gallery, failures
    tb/<id>/                      TensorBoard: one run per pair of a sample (run.log_pairs);
                                  tb/worker<rank>/ and tb/worker<rank>-losses/ job-level aggregates of all
                                  pairs (csv/, wandb/, mlruns/ instead with run.logger=csv | wandb | mlflow)

``predict.py``'s output folder holds the same ``config.yaml`` and ``cmd.txt``.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path

from peekaboo.utils import files

CONFIG_FILE = "config.yaml"
COMMAND_FILE = "cmd.txt"
#: The record of the weights a run started with (:func:`~peekaboo.diffusion.identity.model_fingerprint`).
WEIGHTS_FILE = "weights.txt"
RESULTS_FILE = "results.jsonl"
SUMMARY_FILE = "summary.json"
REPORT_FILE = "report.html"
#: A pair's (or a batch's) checkpoint, in its ``ckpt/`` folder.
CHECKPOINT_FILE = "last.ckpt"
#: The file in a batch's folder that lists its members, so a rerun can rebuild the batch around its checkpoint.
BATCH_MEMBERS = "members.json"


def write_start(root: Path, config_yaml: str, argv: Sequence[str] | None, weights: str | None = None) -> None:
    """Record how a run (or a ``predict.py`` call) started in ``root``: the command line (``argv``, or this
    process's ``sys.argv``), the weights' digest where given, and the resolved config last, so that its presence
    marks a start whose record is complete."""
    files.write_text(" ".join(sys.argv if argv is None else argv) + "\n", root / COMMAND_FILE)
    if weights is not None:
        files.write_text(weights + "\n", root / WEIGHTS_FILE)
    files.write_text(config_yaml, root / CONFIG_FILE)
