"""Run one pair's optimization through a Lightning Trainer: the piece ``predict`` and dataset runs share."""

from __future__ import annotations

import logging
import math
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import TensorBoardLogger
from torch.utils.data import DataLoader

from peekaboo.backbone import Backbone
from peekaboo.config import EarlyStopConfig, OptimizationConfig, TrainerConfig
from peekaboo.loggers import make_logger
from peekaboo.module import PeekabooModule

log = logging.getLogger(__name__)

# How many mask/composite snapshots a pair logs to TensorBoard over its optimization.
IMAGE_SNAPSHOTS = 4
# About how many points of each pair's loss curve its result keeps (the run report plots them), and with how
# many significant digits: enough for a plot, small enough for one results.jsonl line per pair.
CURVE_POINTS = 32
CURVE_DIGITS = 4
CURVE_KEYS = ("loss/dream", "loss/alpha", "loss/total")


class _Steps(torch.utils.data.Dataset):
    """The optimization has no data to iterate: each "batch" is just a step index."""

    def __init__(self, n: int):
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> int:
        return i


class MaskImages(Callback):
    """Logs each pair's mask and current composite to its TensorBoard run a few times over the optimization.

    Args:
        every_n_steps: log after every this many steps, and after the last (``max_steps`` or an early stop).
        runs: pair ``i``'s TensorBoard run is ``runs[i]``.
    """

    def __init__(self, every_n_steps: int, runs: list[TensorBoardLogger]):
        self.every, self.runs = max(1, every_n_steps), runs

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: PeekabooModule, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if step % self.every and step != trainer.max_steps and not trainer.should_stop:
            return
        with torch.no_grad():
            alpha = pl_module().detach().float().cpu()  # (B, 1, S, S)
        composite = pl_module.last_composite
        if composite is not None:
            composite = composite.float().clamp(0, 1).cpu()  # (B, 3, S, S)
        for i, run in enumerate(self.runs):
            run.experiment.add_images("mask/alpha", alpha[i : i + 1], step)
            if composite is not None:
                run.experiment.add_images("mask/composite", composite[i : i + 1], step)


class PairCurves(Callback):
    """A batch's curves pair by pair: each pair's values go to its own TensorBoard run (``runs[i]``) at the
    steps the Trainer logs the batch's means, so a pair's run reads as a one-pair run does, whatever batch
    the pair ran in."""

    def __init__(self, runs: list[TensorBoardLogger]):
        self.runs = runs

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: PeekabooModule, outputs, batch, batch_idx) -> None:
        if not pl_module.logged_this_step:
            return
        metrics = pl_module.step_metrics()
        values = torch.stack(list(metrics.values()), 1).float().cpu()  # (B, M): one transfer for all pairs
        step = trainer.global_step - 1  # the index of the step just taken, as Lightning's own logging counts
        for i, run in enumerate(self.runs):
            if not pl_module.failed[i]:
                run.log_metrics(dict(zip(metrics, values[i].tolist(), strict=True)), step)


class StableMaskStop(Callback):
    """Early stopping: stop once no pair's binary mask has flipped more than ``tolerance`` of its pixels per
    step for ``patience`` consecutive steps (and at least ``min_steps`` were taken)."""

    def __init__(self, cfg: EarlyStopConfig, threshold: float):
        self.cfg, self.threshold = cfg, threshold
        self.previous: torch.Tensor | None = None  # (B, S*S) bool
        self.calm_steps = 0

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: PeekabooModule, outputs, batch, batch_idx) -> None:
        # The mask of the step just taken (one update old): enough to tell whether it has stopped changing.
        binary = (pl_module.last_alpha > self.threshold).flatten(1)  # (B, S*S)
        if self.previous is not None:
            flipped = (binary != self.previous).float().mean(1)  # (B,)
            flipped = flipped[~pl_module.failed]
            self.calm_steps = self.calm_steps + 1 if bool((flipped <= self.cfg.tolerance).all()) else 0
        self.previous = binary
        if self.calm_steps >= self.cfg.patience and trainer.global_step >= self.cfg.min_steps:
            trainer.should_stop = True
            # Lightning writes the logged values of the step it stops at: make them this step's.
            if pl_module.loggers and not pl_module.logged_this_step:
                pl_module.log_step_metrics()

    # Saved in checkpoints, so a resumed pair stops exactly where an uninterrupted one would.
    def state_dict(self) -> dict[str, Any]:
        return {"calm_steps": self.calm_steps, "previous": self.previous}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.calm_steps, self.previous = state_dict["calm_steps"], state_dict["previous"]


class LossCurves(Callback):
    """Each pair's losses every ``ceil(max_steps / CURVE_POINTS)`` steps and at the last step, whatever the
    logger (or none); saved in checkpoints, so a resumed pair's curve is whole."""

    def __init__(self, max_steps: int):
        self.every = max(1, math.ceil(max_steps / CURVE_POINTS))
        self.steps: list[int] = []
        self.values: list[list[list[float]]] = []  # per recorded step: (K, B) for the K = len(CURVE_KEYS) terms

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: PeekabooModule, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if step % self.every and step != trainer.max_steps and not trainer.should_stop:
            return
        self.steps.append(step)
        self.values.append(torch.stack([pl_module.last_losses[k] for k in CURVE_KEYS]).float().cpu().tolist())

    def curve(self, i: int) -> dict[str, list]:
        """Pair ``i``'s curve: ``{"step": [...], "loss/dream": [...], ...}`` (non-finite values as None)."""
        out: dict[str, list] = {"step": list(self.steps)}
        for k, key in enumerate(CURVE_KEYS):
            out[key] = [float(f"{v[k][i]:.{CURVE_DIGITS}g}") if math.isfinite(v[k][i]) else None for v in self.values]
        return out

    def state_dict(self) -> dict[str, Any]:
        return {"steps": self.steps, "values": self.values}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.steps, self.values = state_dict["steps"], state_dict["values"]


@dataclass
class PairResult:
    """What one pair's optimization produced."""

    alpha: torch.Tensor  # (S, S) float32 in [0, 1], on CPU
    steps: int
    seconds: float  # wall time of the batch it was optimized in, divided by the batch size
    losses: dict[str, float] = field(default_factory=dict)
    failed: bool = False  # its loss or mask went non-finite (its alpha is then meaningless)
    curve: dict[str, list] = field(default_factory=dict)  # LossCurves.curve: losses at a few steps


def build_trainer(
    cfg: TrainerConfig,
    logger: Any = False,
    callbacks: list[Callback] | None = None,
    enable_progress_bar: bool | None = None,
    enable_checkpointing: bool = False,
    devices: Any = 1,
) -> L.Trainer:
    """A Trainer for one pair: one device, ``max_steps`` optimization steps, no validation."""
    return L.Trainer(
        accelerator=cfg.accelerator,
        devices=devices,
        precision=cfg.precision,
        max_steps=cfg.max_steps,
        max_epochs=1,  # one epoch = max_steps step indices
        log_every_n_steps=cfg.log_every_n_steps,
        logger=logger,
        callbacks=callbacks or [],
        enable_checkpointing=enable_checkpointing,
        enable_progress_bar=cfg.enable_progress_bar if enable_progress_bar is None else enable_progress_bar,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        deterministic=False,
    )


def optimize_pair(image: torch.Tensor, prompt: str, pair_id: str, *args, **kwargs) -> PairResult:
    """Optimize one pair's mask: :func:`optimize_pairs` with a batch of one; ``image`` is ``(3, S, S)``."""
    return optimize_pairs(image[None], [prompt], [pair_id], *args, **kwargs)[0]


def optimize_pairs(
    images: torch.Tensor,
    prompts: list[str],
    pair_ids: list[str],
    opt_cfg: OptimizationConfig,
    trainer_cfg: TrainerConfig,
    backbone: Backbone,
    tb_dir: str | Path | None = None,
    callbacks: list[Callback] | None = None,
    ckpt_path: str | Path | None = None,
    enable_progress_bar: bool | None = None,
    devices: Any = 1,
    run_name: str | None = None,
    pair_run_names: list[str] | None = None,
    logger_kind: str = "tensorboard",
) -> list[PairResult]:
    """Optimize the masks of B independent pairs together with one Lightning Trainer.

    Args:
        images: ``(B, 3, S, S)`` working images in [0, 1].
        tb_dir: the logger's root; each pair's curves (and, for TensorBoard, images) go to the run
            ``<tb_dir>/<pair run name>`` and, for B > 1, the batch's means to ``<tb_dir>/<run_name>`` (default
            ``<first name>+<B-1>``). None: no logging.
        callbacks: extra callbacks (e.g. checkpointing in dataset runs).
        ckpt_path: resume from this checkpoint.
        devices: which device of the accelerator this process uses (e.g. ``[local_rank]``).
        run_name: the TensorBoard run of the whole batch (for B = 1, the pair's run).
        pair_run_names: each pair's TensorBoard run name (default: its id).
        logger_kind: which Lightning logger writes the runs (:func:`peekaboo.loggers.make_logger`).

    Returns:
        One result per pair, in order.
    """
    logger: Any = False
    cbs = list(callbacks or [])
    if opt_cfg.early_stop.enabled:
        cbs.append(StableMaskStop(opt_cfg.early_stop, opt_cfg.threshold))
    curves = LossCurves(trainer_cfg.max_steps)  # after StableMaskStop: it records the step a pair stops at
    cbs.append(curves)
    pair_runs: list[Any] = []
    if tb_dir is not None:
        names = pair_run_names or pair_ids
        name = run_name or (names[0] if len(names) == 1 else f"{names[0]}+{len(names) - 1}")
        logger = make_logger(logger_kind, tb_dir, name)
        # A batch logs its means to its own run and each pair's curves and images to the pair's run.
        pair_runs = [logger] if len(names) == 1 else [make_logger(logger_kind, tb_dir, n) for n in names]
        # Both after StableMaskStop, which may end the run (and log its curves) at this step.
        if isinstance(logger, TensorBoardLogger):  # the other loggers have no common image call
            cbs.append(MaskImages(max(1, trainer_cfg.max_steps // IMAGE_SNAPSHOTS), pair_runs))
        if len(names) > 1:
            cbs.append(PairCurves(pair_runs))
    has_ckpt = any(type(cb).__name__ == "ModelCheckpoint" for cb in cbs)
    trainer = build_trainer(trainer_cfg, logger, cbs, enable_progress_bar, has_ckpt, devices)
    module = PeekabooModule(images, prompts, pair_ids, opt_cfg, backbone)
    loader = DataLoader(_Steps(trainer_cfg.max_steps), batch_size=None, shuffle=False, num_workers=0)
    start = time.perf_counter()
    try:
        with warnings.catch_warnings():
            # The loader yields step indices only: worker processes would add cost and nothing else.
            warnings.filterwarnings("ignore", ".*does not have many workers.*")
            # log_every_n_steps is chosen for 300-step pairs; shorter smoke runs need no reminder.
            warnings.filterwarnings("ignore", ".*smaller than the logging interval.*")
            warnings.filterwarnings("ignore", ".*resuming from a checkpoint that ended before the epoch ended.*")
            warnings.filterwarnings("ignore", ".*isinstance\\(treespec, LeafSpec\\)` is deprecated.*")
            # weights_only: a checkpoint is data (tensors, numbers, strings); never unpickle code from it.
            trainer.fit(module, loader, ckpt_path=str(ckpt_path) if ckpt_path else None, weights_only=True)
    finally:  # an interrupted batch keeps what its pairs' runs logged (the Trainer closes its own logger)
        for run in pair_runs:
            if run is not logger:
                run.finalize("success")
    seconds = (time.perf_counter() - start) / len(pair_ids)
    with torch.no_grad():
        alphas = module().detach().float().cpu()[:, 0]  # (B, S, S)
    if logger:
        logger.finalize("success")
    return [
        PairResult(alpha=alphas[i], steps=trainer.global_step, seconds=seconds, failed=bool(module.failed[i]),
                   losses={k: float(v[i]) for k, v in module.last_losses.items()}, curve=curves.curve(i))
        for i in range(len(pair_ids))
    ]
