"""The LightningModule that optimizes one (image, prompt) pair's mask."""

from __future__ import annotations

import lightning as L
import torch

from peekaboo import ops
from peekaboo.backbone import Backbone, PromptEmbeddings
from peekaboo.config import OptimConfig, OptimizationConfig
from peekaboo.errors import NonFiniteError
from peekaboo.masks import build_mask


class PeekabooModule(L.LightningModule):
    """One (image, prompt) pair. Its only trainable parameters are its mask's.

    The backbone is held as a plain attribute (it is not an ``nn.Module``), so it is never part of
    ``state_dict()``: a checkpoint holds the mask, the optimizer and the loop state only.

    Args:
        image: ``(3, S, S)`` working image in [0, 1], ``S = cfg.mask.size``.
        prompt: what to segment.
        pair_id: stable identifier; with ``cfg.seed`` it seeds every random draw of this pair.
        cfg: the optimization settings.
        backbone: the shared frozen diffusion model.
    """

    def __init__(self, image: torch.Tensor, prompt: str, pair_id: str, cfg: OptimizationConfig, backbone: Backbone):
        super().__init__()
        self.cfg, self.prompt, self.pair_id, self.backbone = cfg, prompt, pair_id, backbone
        self.register_buffer("image", image.float(), persistent=False)  # (3, S, S)
        init = torch.Generator().manual_seed(ops.pair_seed(cfg.seed, pair_id))
        self.mask = build_mask(cfg.mask, self.image, init)
        self._emb: PromptEmbeddings | None = None
        self.last_composite: torch.Tensor | None = None  # (1, 3, S, S), for image logging

    def forward(self) -> torch.Tensor:
        """alpha: ``(1, S, S)`` in [0, 1]."""
        return self.mask()

    def on_fit_start(self) -> None:
        self.backbone.to(self.device)
        self._emb = self.backbone.encode_prompt(self.prompt)

    def step_generator(self) -> torch.Generator:
        """Random draws of this step come from (seed, pair id, step): an interrupted and resumed pair makes
        exactly the draws an uninterrupted one makes, wherever it runs."""
        return torch.Generator().manual_seed(ops.pair_seed(self.cfg.seed, self.pair_id, self.global_step))

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        cfg = self.cfg
        gen = self.step_generator()
        alpha = self.mask()[None]  # (1, 1, S, S)
        image = self.image[None]  # (1, 3, S, S)
        background = ops.sample_background(cfg.background, image, gen)
        comp = ops.composite(image, alpha, background)
        latents = self.backbone.encode_images(comp, cfg.guidance.latent_mode, gen)
        assert self._emb is not None
        terms = self.backbone.dream_loss(latents, self._emb, cfg.guidance, gen)
        dream = cfg.loss.lambda_dream * terms["loss"].sum()
        gravity = ops.gravity_loss(alpha.float(), cfg.loss.gravity, cfg.loss.gravity_reduction).sum()
        total = dream + gravity
        if not torch.isfinite(total) or not torch.isfinite(alpha).all():
            raise NonFiniteError(f"pair {self.pair_id}: non-finite loss or mask at step {self.global_step}")
        self.last_composite = comp.detach()
        self.log_dict(
            {
                "loss/dream": dream.detach(),
                "loss/alpha": gravity.detach(),
                "loss/total": total.detach(),
                "mask/area": alpha.detach().mean(),
                "guidance/t": terms["t"].float().mean(),
                "guidance/grad_norm": terms["grad_norm"].mean(),
            },
            on_step=True, on_epoch=False, batch_size=1,
        )
        return total

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return build_optimizer(self.cfg.optim, self.mask.parameters())


def build_optimizer(cfg: OptimConfig, params) -> torch.optim.Optimizer:
    """SGD, Adam or AdamW with the settings of ``cfg``."""
    if cfg.name == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    if cfg.name == "adam":
        return torch.optim.Adam(params, lr=cfg.lr, betas=tuple(cfg.betas), weight_decay=cfg.weight_decay)
    if cfg.name == "adamw":
        return torch.optim.AdamW(params, lr=cfg.lr, betas=tuple(cfg.betas), weight_decay=cfg.weight_decay)
    raise ValueError(f"unknown optimizer {cfg.name!r}")
