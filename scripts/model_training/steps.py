"""Bookkeeping both training stages share: the learning-rate schedule, per-step batches, atomic progress
checkpoints and the exponential moving average of the weights."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch

from model_training.config import Config

__all__ = ["Ema", "atomic_save", "batch_indices", "lr_at", "n_params", "run_progress"]


def n_params(module: torch.nn.Module) -> int:
    """Number of parameters of a module."""
    return sum(p.numel() for p in module.parameters())


def lr_at(cfg: Config, step: int, progress: float, base_lr: float, warmup_steps: int) -> float:
    """Linear warmup to ``base_lr``, then cosine decay to ``final_lr_fraction`` of it.

    ``progress`` in [0, 1] is the fraction of the run done: of the step count when one is given,
    else of the wall-clock budget (runs are budgeted in minutes because CPU speed varies).
    """
    warm = min(1.0, (step + 1) / warmup_steps)
    cosine = 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    return base_lr * warm * (cfg.final_lr_fraction + (1.0 - cfg.final_lr_fraction) * cosine)


def run_progress(step: int, elapsed: float, minutes: float, max_steps: int | None) -> float:
    """Fraction of the run done (by steps if a step count is given, else by wall time)."""
    return step / max_steps if max_steps is not None else elapsed / (minutes * 60.0)


def atomic_save(obj: object, path: Path) -> None:
    """torch.save to a temporary file and rename, so an interrupted save never corrupts a checkpoint."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(obj, tmp)
    tmp.replace(path)


def batch_indices(cfg: Config, stage: str, step: int, n: int, batch: int) -> np.ndarray:
    """Indices of the training scenes of one step: a function of (seed, stage, step) only, so a
    resumed run sees exactly the batches an uninterrupted one would."""
    rng = np.random.default_rng([cfg.seed, 1 if stage == "vae" else 2, step])
    return rng.integers(0, n, size=batch)


# ----------------------------------------------------------------------------------------------
# Data

class Ema:
    """Exponential moving average of a set of parameters (with the usual warm-up of the decay)."""

    def __init__(self, params: list[torch.nn.Parameter], decay: float) -> None:
        self.params = params
        self.decay = decay
        self.shadow = [p.detach().clone() for p in params]

    @torch.no_grad()
    def update(self, step: int) -> None:
        decay = min(self.decay, (1 + step) / (10 + step))
        torch._foreach_lerp_(self.shadow, [p.detach() for p in self.params], 1.0 - decay)

    @torch.no_grad()
    def copy_to_params(self) -> None:
        for s, p in zip(self.shadow, self.params, strict=True):
            p.copy_(s)
