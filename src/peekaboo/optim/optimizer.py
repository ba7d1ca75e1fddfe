"""The optimizer over a pair's mask parameters and its learning-rate schedule (``optimization.optim``):
:meth:`PeekabooModule.configure_optimizers <peekaboo.optim.module.PeekabooModule.configure_optimizers>` builds
both from them."""

from __future__ import annotations

import math

import torch

from peekaboo.config import OptimConfig


def is_scheduled(cfg: OptimConfig) -> bool:
    """Whether ``cfg`` changes the learning rate over the run (else the optimizer runs alone, as always)."""
    return cfg.schedule != "constant" or cfg.warmup_steps > 0


def lr_factor(step: int, total_steps: int, cfg: OptimConfig) -> float:
    """The learning rate of step ``step`` (0-based) of ``total_steps``, as a multiple of ``cfg.lr``.

    Linear warm-up over the first ``cfg.warmup_steps`` steps (``(step + 1) / warmup_steps``, so no step has a
    zero rate), then over the remaining steps:

    - ``constant``: 1.
    - ``cosine``: from 1 down to ``final_lr_fraction`` at the last step, ``f + (1 - f) (1 + cos(pi p)) / 2``
      with ``p`` going linearly from 0 (first step after the warm-up) to 1 (step ``total_steps - 1``)
      (Loshchilov & Hutter, 2017, "SGDR: Stochastic Gradient Descent with Warm Restarts", arXiv:1608.03983,
      without restarts).
    - ``step``: ``step_gamma ** (k // step_every)``, ``k`` the steps since the warm-up.
    """
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    since = step - cfg.warmup_steps
    if cfg.schedule == "constant":
        return 1.0
    if cfg.schedule == "step":
        return cfg.step_gamma ** (since // cfg.step_every)
    if cfg.schedule == "cosine":
        progress = min(1.0, since / max(1, total_steps - cfg.warmup_steps - 1))
        f = cfg.final_lr_fraction
        return f + (1.0 - f) * 0.5 * (1.0 + math.cos(math.pi * progress))
    raise ValueError(f"unknown learning-rate schedule {cfg.schedule!r}")


def build_optimizer(cfg: OptimConfig, params) -> torch.optim.Optimizer:
    """SGD, Adam or AdamW with the settings of ``cfg`` (all act element-wise: pairs stay independent)."""
    if cfg.name == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    if cfg.name == "adam":
        return torch.optim.Adam(params, lr=cfg.lr, betas=tuple(cfg.betas), weight_decay=cfg.weight_decay)
    if cfg.name == "adamw":
        return torch.optim.AdamW(params, lr=cfg.lr, betas=tuple(cfg.betas), weight_decay=cfg.weight_decay)
    raise ValueError(f"unknown optimizer {cfg.name!r}")
