"""The LightningModule that optimizes the masks of one (image, prompt) pair, or of B independent pairs."""

from __future__ import annotations

import logging

import lightning as L
import torch

from peekaboo import ops
from peekaboo.backbone import Backbone, PromptEmbeddings
from peekaboo.config import OptimConfig, OptimizationConfig
from peekaboo.errors import NonFiniteError
from peekaboo.masks import build_mask

log = logging.getLogger(__name__)

# Settings that overflow float32 when far too large, with a generous "usual" upper bound for each (SD 1.x runs
# use lr 1e-5 .. 0.05, gravity 0.0125 .. 0.05, guidance 15 .. 100, lambda_dream 1): a non-finite loss names the
# one furthest above its bound.
SUSPECT_SETTINGS = {
    "optim.lr": 1.0,
    "loss.gravity": 100.0,
    "guidance.guidance_scale": 1000.0,
    "loss.lambda_dream": 1000.0,
}


def non_finite_hint(cfg: OptimizationConfig, prefix: str = "optimization.") -> str:
    """What to change after a non-finite loss or mask: the setting of ``cfg`` furthest above its usual range
    (``SUSPECT_SETTINGS``), or the learning rate and the image when every setting is in range."""
    ratios = {}
    for key, bound in SUSPECT_SETTINGS.items():
        section, _, leaf = key.partition(".")
        value = float(getattr(getattr(cfg, section), leaf))
        if value > bound:
            ratios[key] = (value / bound, value, bound)
    if not ratios:
        return f"lower {prefix}optim.lr or check the image."
    key, (_, value, bound) = max(ratios.items(), key=lambda item: item[1][0])
    return f"the likely cause is {prefix}{key}={value:g} (usually at most {bound:g}); lower it."


class PeekabooModule(L.LightningModule):
    """B (image, prompt) pairs, optimized together but independently. Its only trainable parameters are
    the masks'.

    Every random draw of pair ``i`` at step ``k`` comes from a generator seeded by (seed, pair id, k), and the
    per-pair losses are summed (each pair's parameters reach only its own loss), so a pair gets the same mask
    whichever batch it lands in. The backbone is a plain attribute (not an ``nn.Module``), so it is never
    part of ``state_dict()``: a checkpoint holds the masks, the optimizer and the loop state only.

    Args:
        images: ``(B, 3, S, S)`` (or one ``(3, S, S)``) working images in [0, 1], ``S = cfg.mask.size``.
        prompts: one prompt per pair (or one string).
        pair_ids: stable identifiers, one per pair (or one string).
        cfg: the optimization settings.
        backbone: the shared frozen diffusion model.
    """

    def __init__(
        self,
        images: torch.Tensor,
        prompts: list[str] | str,
        pair_ids: list[str] | str,
        cfg: OptimizationConfig,
        backbone: Backbone,
    ):
        super().__init__()
        images = images[None] if images.dim() == 3 else images
        self.prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        self.pair_ids = [pair_ids] if isinstance(pair_ids, str) else list(pair_ids)
        if not len(self.prompts) == len(self.pair_ids) == images.shape[0]:
            raise ValueError(f"{images.shape[0]} images, {len(self.prompts)} prompts, {len(self.pair_ids)} ids")
        self.cfg, self.backbone = cfg, backbone
        self.register_buffer("images", images.float(), persistent=False)  # (B, 3, S, S)
        inits = [torch.Generator().manual_seed(ops.pair_seed(cfg.seed, pid)) for pid in self.pair_ids]
        self.mask = build_mask(cfg.mask, self.images, inits)
        # Pairs whose loss or mask went non-finite: they stop contributing; the others go on. Persistent, so
        # a resumed run remembers them.
        self.register_buffer("failed", torch.zeros(len(self.pair_ids), dtype=torch.bool))
        self._emb: PromptEmbeddings | None = None
        self.last_composite: torch.Tensor | None = None  # (B, 3, S, S), for image logging
        self.last_alpha: torch.Tensor | None = None  # (B, 1, S, S) of the last step
        self.last_losses: dict[str, torch.Tensor] = {}  # per pair, (B,)
        self.last_guidance: dict[str, torch.Tensor] = {}  # per pair, (B,): timestep and gradient norm
        self.logged_this_step = False  # whether the last step's curves went to the Trainer's logger

    @property
    def batch_size(self) -> int:
        return len(self.pair_ids)

    def forward(self) -> torch.Tensor:
        """alpha: ``(B, 1, S, S)`` in [0, 1]."""
        return self.mask()

    def on_fit_start(self) -> None:
        self.backbone.to(self.device)
        self._emb = PromptEmbeddings.stack([self.backbone.encode_prompt(p) for p in self.prompts])

    def step_generators(self) -> list[torch.Generator]:
        """One generator per pair for this step, seeded by (seed, pair id, step): an interrupted and resumed
        pair makes exactly the draws an uninterrupted one makes, on any device and in any batch."""
        step = self.global_step
        return [torch.Generator().manual_seed(ops.pair_seed(self.cfg.seed, pid, step)) for pid in self.pair_ids]

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        cfg = self.cfg
        gens = self.step_generators()
        alpha = self.mask()  # (B, 1, S, S)
        background = torch.cat([ops.sample_background(cfg.background, img[None], g)
                                for img, g in zip(self.images, gens, strict=True)])  # (B, 3, S, S)
        comp = ops.composite(self.images, alpha, background)
        latents = self.backbone.encode_images(comp, cfg.guidance.latent_mode, gens)
        assert self._emb is not None, "on_fit_start sets the prompt embeddings"
        terms = self.backbone.dream_loss(latents, self._emb, cfg.guidance, gens)
        dream = cfg.loss.lambda_dream * terms["loss"]  # (B,)
        gravity = ops.gravity_loss(alpha.float(), cfg.loss.gravity, cfg.loss.gravity_reduction)  # (B,)
        total = dream + gravity  # (B,)
        finite = torch.isfinite(total) & torch.isfinite(alpha.flatten(1)).all(dim=1)
        self.failed |= ~finite
        if self.failed.all():
            raise NonFiniteError(
                f"pair(s) {', '.join(self.pair_ids)}: non-finite loss or mask at step {self.global_step}; "
                f"{non_finite_hint(cfg)}"
            )
        # torch.where, not a product: 0 * nan is nan, and a failed pair must not stop the others.
        objective = torch.where(self.failed, torch.zeros_like(total), total).sum()
        self.last_composite = comp.detach()
        self.last_alpha = alpha.detach()  # read by callbacks, so they need not render the mask again
        self.last_losses = {"loss/dream": dream.detach(), "loss/alpha": gravity.detach(),
                            "loss/total": total.detach(), "mask/area": alpha.detach().flatten(1).mean(1)}
        self.last_guidance = {"guidance/t": terms["t"].float(), "guidance/grad_norm": terms["grad_norm"]}
        self.logged_this_step = False
        if self.writes_logs_this_step():
            self.log_step_metrics()
        return objective

    def step_metrics(self) -> dict[str, torch.Tensor]:
        """The last step's curves, per pair: ``{name: (B,)}`` (losses, mask area, timestep, gradient norm)."""
        return {**self.last_losses, **self.last_guidance}

    def writes_logs_this_step(self) -> bool:
        """Whether the Trainer writes the logged values of the step being taken (call in ``training_step``).

        Lightning writes on-step values every ``log_every_n_steps`` steps (counting from 1) and drops the
        rest, so building them on the other steps only costs time: 4% of a B=1 step with the bundled model.
        """
        if not self.loggers or not self.trainer.log_every_n_steps:  # no loggers: also no Trainer
            return False
        return (self.global_step + 1) % self.trainer.log_every_n_steps == 0

    def log_step_metrics(self) -> None:
        """Log the last step's curves to the Trainer's logger, averaged over the pairs still running."""
        ok = ~self.failed
        self.logged_this_step = True
        self.log_dict({k: v[ok].mean() for k, v in self.step_metrics().items()},
                      on_step=True, on_epoch=False, batch_size=self.batch_size)

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        # Checkpoints written before the Fourier MLP dropped its pre-BatchNorm biases still hold them; they
        # never changed the mask (BatchNorm subtracts them), so a resumed run drops them instead of failing.
        own = self.state_dict()
        stale = [k for k in checkpoint["state_dict"] if k not in own and k.startswith("mask.mlp.")
                 and k.endswith(".bias")]
        for key in stale:
            del checkpoint["state_dict"][key]
        # Their Adam moments go too: the optimizer state must match the parameters it is loaded into.
        if stale and checkpoint.get("optimizer_states"):
            log.warning("pair(s) %s: checkpoint from an older Fourier mask; its optimizer state is reset.",
                        ", ".join(self.pair_ids))
            checkpoint["optimizer_states"] = []

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return build_optimizer(self.cfg.optim, self.mask.parameters())


def build_optimizer(cfg: OptimConfig, params) -> torch.optim.Optimizer:
    """SGD, Adam or AdamW with the settings of ``cfg`` (all act element-wise: pairs stay independent)."""
    if cfg.name == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    if cfg.name == "adam":
        return torch.optim.Adam(params, lr=cfg.lr, betas=tuple(cfg.betas), weight_decay=cfg.weight_decay)
    if cfg.name == "adamw":
        return torch.optim.AdamW(params, lr=cfg.lr, betas=tuple(cfg.betas), weight_decay=cfg.weight_decay)
    raise ValueError(f"unknown optimizer {cfg.name!r}")
