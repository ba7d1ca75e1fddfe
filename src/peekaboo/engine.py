"""Run one pair's optimization through a Lightning Trainer: the piece ``predict`` and dataset runs share."""

from __future__ import annotations

import logging
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
from peekaboo.module import PeekabooModule

log = logging.getLogger(__name__)

# How many mask/composite snapshots a pair logs to TensorBoard over its optimization.
IMAGE_SNAPSHOTS = 4


class _Steps(torch.utils.data.Dataset):
    """The optimization has no data to iterate: each "batch" is just a step index."""

    def __init__(self, n: int):
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> int:
        return i


class MaskImages(Callback):
    """Logs the mask and the current composite to TensorBoard a few times per pair."""

    def __init__(self, every_n_steps: int):
        self.every = max(1, every_n_steps)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: PeekabooModule, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if not isinstance(trainer.logger, TensorBoardLogger) or (step % self.every and step != trainer.max_steps):
            return
        writer = trainer.logger.experiment
        with torch.no_grad():
            writer.add_images("mask/alpha", pl_module().detach().float().cpu(), step)
        if pl_module.last_composite is not None:
            writer.add_images("mask/composite", pl_module.last_composite.float().clamp(0, 1).cpu(), step)


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

    # Saved in checkpoints, so a resumed pair stops exactly where an uninterrupted one would.
    def state_dict(self) -> dict[str, Any]:
        return {"calm_steps": self.calm_steps, "previous": self.previous}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.calm_steps, self.previous = state_dict["calm_steps"], state_dict["previous"]


@dataclass
class PairResult:
    """What one pair's optimization produced."""

    alpha: torch.Tensor  # (S, S) float32 in [0, 1], on CPU
    steps: int
    seconds: float  # wall time of the batch it was optimized in, divided by the batch size
    losses: dict[str, float] = field(default_factory=dict)
    failed: bool = False  # its loss or mask went non-finite (its alpha is then meaningless)


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
) -> list[PairResult]:
    """Optimize the masks of B independent pairs together with one Lightning Trainer.

    Args:
        images: ``(B, 3, S, S)`` working images in [0, 1].
        tb_dir: TensorBoard root; logs go to the run ``<tb_dir>/<run_name>`` (default: the single pair's id,
            or ``<first id>+<B-1>``). None: no logging.
        callbacks: extra callbacks (e.g. checkpointing in dataset runs).
        ckpt_path: resume from this checkpoint.
        devices: which device of the accelerator this process uses (e.g. ``[local_rank]``).

    Returns:
        One result per pair, in order.
    """
    logger: Any = False
    if tb_dir is not None:
        name = run_name or (pair_ids[0] if len(pair_ids) == 1 else f"{pair_ids[0]}+{len(pair_ids) - 1}")
        logger = TensorBoardLogger(str(tb_dir), name=name, version="", default_hp_metric=False)
    every = max(1, trainer_cfg.max_steps // IMAGE_SNAPSHOTS)
    cbs = [MaskImages(every), *(callbacks or [])]
    if opt_cfg.early_stop.enabled:
        cbs.append(StableMaskStop(opt_cfg.early_stop, opt_cfg.threshold))
    has_ckpt = any(type(cb).__name__ == "ModelCheckpoint" for cb in cbs)
    trainer = build_trainer(trainer_cfg, logger, cbs, enable_progress_bar, has_ckpt, devices)
    module = PeekabooModule(images, prompts, pair_ids, opt_cfg, backbone)
    loader = DataLoader(_Steps(trainer_cfg.max_steps), batch_size=None, shuffle=False, num_workers=0)
    start = time.perf_counter()
    with warnings.catch_warnings():
        # The loader yields step indices only: worker processes would add cost and nothing else.
        warnings.filterwarnings("ignore", ".*does not have many workers.*")
        # log_every_n_steps is chosen for 300-step pairs; shorter smoke runs need no reminder.
        warnings.filterwarnings("ignore", ".*smaller than the logging interval.*")
        warnings.filterwarnings("ignore", ".*resuming from a checkpoint that ended before the epoch ended.*")
        warnings.filterwarnings("ignore", ".*isinstance\\(treespec, LeafSpec\\)` is deprecated.*")
        # weights_only: a checkpoint is data (tensors, numbers, strings); never unpickle code from it.
        trainer.fit(module, loader, ckpt_path=str(ckpt_path) if ckpt_path else None, weights_only=True)
    seconds = (time.perf_counter() - start) / len(pair_ids)
    with torch.no_grad():
        alphas = module().detach().float().cpu()[:, 0]  # (B, S, S)
    if logger:
        logger.finalize("success")
    return [
        PairResult(alpha=alphas[i], steps=trainer.global_step, seconds=seconds, failed=bool(module.failed[i]),
                   losses={k: float(v[i]) for k, v in module.last_losses.items()})
        for i in range(len(pair_ids))
    ]
