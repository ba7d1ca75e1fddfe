"""Experiment loggers of dataset runs: Lightning's own TensorBoard, CSV, Weights & Biases and MLflow loggers.

``run.logger`` picks one; in a dataset run each pair of a sample (``run.log_pairs``) gets its own run of it
(``<run folder>/<LOG_DIRS[kind]>/<pair name>``), a batch of those pairs one more for its means, and each worker
two for the job-level aggregates of all its pairs (``worker<rank>``, ``worker<rank>-losses``); ``predict`` logs
every prompt. The wandb and mlflow packages are optional extras, imported only when their logger is built
(``peekaboo.config`` checks at start-up that they are installed).
"""

from __future__ import annotations

from pathlib import Path

from lightning.pytorch.loggers import Logger

# Where each logger's files go inside a run folder (or a predict output folder).
LOG_DIRS = {"tensorboard": "tb", "csv": "csv", "wandb": "wandb", "mlflow": "mlruns"}
# The wandb project every run of this package logs to (the run name groups its pairs inside it).
WANDB_PROJECT = "peekaboo"


def log_root(folder: str | Path, kind: str | None) -> Path | None:
    """The folder a ``kind`` logger writes under inside ``folder``; None when logging is off."""
    return None if kind is None else Path(folder) / LOG_DIRS[kind]


def make_logger(kind: str, root: str | Path, name: str, resume_step: int | None = None) -> Logger:
    """One run named ``name`` of the ``kind`` logger, under ``root`` (from :func:`log_root`).

    A resumed pair appends to the run it started (TensorBoard, CSV); TensorBoard first drops what that run
    logged from ``resume_step`` on (logged after the checkpoint it resumes from, so about to be logged again).
    For wandb and mlflow the name of the
    folder holding ``root`` (the run's name) groups the pairs: a wandb group, an MLflow experiment; both read
    their usual environment variables (``WANDB_MODE=offline``, ``MLFLOW_TRACKING_URI``).

    Args:
        kind: ``tensorboard`` | ``csv`` | ``wandb`` | ``mlflow`` (validated by the config).
        root: the logger's folder, e.g. ``runs/<name>/tb``.
        name: the run, e.g. a pair's output name.
        resume_step: the step of the checkpoint the run resumes from, if any.
    """
    root = Path(root)
    if kind == "tensorboard":
        from lightning.pytorch.loggers import TensorBoardLogger

        return TensorBoardLogger(str(root), name=name, version="", default_hp_metric=False, purge_step=resume_step)
    if kind == "csv":
        from lightning.pytorch.loggers import CSVLogger

        return CSVLogger(str(root), name=name, version="")
    if kind == "wandb":
        from lightning.pytorch.loggers import WandbLogger

        root.mkdir(parents=True, exist_ok=True)
        return WandbLogger(name=name, save_dir=str(root), project=WANDB_PROJECT, group=root.parent.name)
    if kind == "mlflow":
        from lightning.pytorch.loggers import MLFlowLogger

        return MLFlowLogger(experiment_name=root.parent.name, run_name=name, save_dir=str(root))
    raise ValueError(f"unknown logger {kind!r}; choose one of {', '.join(LOG_DIRS)}")
