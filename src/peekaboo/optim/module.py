"""The LightningModule that optimizes the masks of one (image, prompt) pair, or of B independent pairs."""

from __future__ import annotations

import math

import lightning as L
import torch

from peekaboo import ops
from peekaboo.config import OptimizationConfig, check_mask_init
from peekaboo.diffusion.attention import cross_attention_map
from peekaboo.diffusion.backbone import Backbone, posterior_noise
from peekaboo.diffusion.prompts import PromptEmbeddings
from peekaboo.errors import NonFiniteError
from peekaboo.optim.masks import MASK_REVISIONS, REVISION_KEY, build_mask, check_checkpoint_revision, map_logits
from peekaboo.optim.optimizer import build_optimizer, is_scheduled, lr_factor
from peekaboo.optim.regions import ranked_regions
from peekaboo.optim.restarts import chooses_early, pair_of

# Settings that overflow float32 when far too large, with a generous "usual" upper bound for each (SD 1.x runs
# use lr 1e-5 .. 0.05, gravity 0.0125 .. 0.05, guidance 15 .. 100, lambda_dream 1): a non-finite loss names the
# one furthest above its bound.
SUSPECT_SETTINGS = {
    "optim.lr": 1.0,
    "loss.gravity": 100.0,
    "guidance.guidance_scale": 1000.0,
    "loss.lambda_dream": 1000.0,
}


# The per-pair loss terms of a step (``last_losses``, each pair's loss curve and result): the dream loss, the alpha
# regularizer, and their sum, which the optimizer minimizes.
DREAM_LOSS, ALPHA_LOSS, TOTAL_LOSS = "loss/dream", "loss/alpha", "loss/total"
LOSS_KEYS = (DREAM_LOSS, ALPHA_LOSS, TOTAL_LOSS)

# A pair whose dream-loss gradient has non-finite entries (the model's outputs overflowed) this many steps in a
# row, or at every step of a shorter run, has failed: the zeroed gradient leaves gravity alone to move its mask.
NONFINITE_STEPS = 10


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


def non_finite_message(subject: str, cfg: OptimizationConfig, step: int | None = None) -> str:
    """The one-line error of pairs whose loss, mask or model output went non-finite: ``subject`` names them
    (``"pair(s) a, b"``), then the step where known, then what to change (:func:`non_finite_hint`)."""
    at = "" if step is None else f" at step {step}"
    return f"{subject}: non-finite loss or mask (or model output: guidance/nonfinite){at}; {non_finite_hint(cfg)}"


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
        max_steps: the run's length when no Trainer is attached (a Trainer's ``max_steps`` wins): the horizon
            of the learning-rate and timestep schedules.

    With early stopping, a pair that has stopped (:meth:`stop_pairs`) is frozen: it leaves the objective and
    the model calls, and its parameters keep their values, while the others go on. Restart candidates chosen
    against early (:meth:`prune`) are frozen the same way.
    """

    def __init__(
        self,
        images: torch.Tensor,
        prompts: list[str] | str,
        pair_ids: list[str] | str,
        cfg: OptimizationConfig,
        backbone: Backbone,
        max_steps: int | None = None,
        mask_inits: list[str] | None = None,
    ):
        super().__init__()
        images = images[None] if images.dim() == 3 else images
        self.prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        self.pair_ids = [pair_ids] if isinstance(pair_ids, str) else list(pair_ids)
        if not len(self.prompts) == len(self.pair_ids) == images.shape[0]:
            raise ValueError(f"{images.shape[0]} images, {len(self.prompts)} prompts, {len(self.pair_ids)} ids")
        # Each pair's mask.init (restarts may mix them, optimization.restarts.mask_inits); default: mask.init.
        self.mask_inits = list(mask_inits) if mask_inits is not None else [cfg.mask.init] * len(self.pair_ids)
        if len(self.mask_inits) != len(self.pair_ids):
            raise ValueError(f"{len(self.mask_inits)} mask inits for {len(self.pair_ids)} pairs")
        for init in dict.fromkeys(self.mask_inits):
            check_mask_init(cfg.mask, init=init)
        self.cfg, self.backbone = cfg, backbone
        self.register_buffer("images", images.float(), persistent=False)  # (B, 3, S, S)
        backbone.check_encode_resolution(cfg.guidance.encode_resolution)
        # composite=latent: the images' VAE posterior (mean, std), each (B, C, h, w), encoded on first use.
        self.register_buffer("image_latent_mean", None, persistent=False)
        self.register_buffer("image_latent_std", None, persistent=False)
        inits = [ops.pair_generator(cfg.seed, pid) for pid in self.pair_ids]
        self.mask = build_mask(cfg.mask, self.images, inits)
        # Whether the masks have had their start from the model (a mask init other than constant: the
        # cross-attention map or a ranked region). Persistent there only, where it can matter: Lightning loads a
        # checkpoint before on_fit_start, so a resumed run sees True and keeps its checkpointed mask.
        self.register_buffer("initialized", torch.tensor(False),
                             persistent=any(init != "constant" for init in self.mask_inits))
        # Pairs whose loss or mask went non-finite: they stop contributing; the others go on. Persistent, so
        # a resumed run remembers them.
        self.register_buffer("failed", torch.zeros(len(self.pair_ids), dtype=torch.bool))
        # The step count at which each pair stopped early (-1: still running). Persistent only when a pair can
        # stop (early stopping, or restarts chosen early), where it can matter.
        self.register_buffer("stopped_at", torch.full((len(self.pair_ids),), -1, dtype=torch.long),
                             persistent=self.can_stop)
        # Restart candidates frozen because another candidate of their pair was chosen early
        # (restarts.choose_at): never the kept mask. Persistent where that can happen.
        self.register_buffer("pruned", torch.zeros(len(self.pair_ids), dtype=torch.bool),
                             persistent=self.chooses_early)
        # Consecutive steps each pair's gradient had non-finite entries (NONFINITE_STEPS). Persistent, so a
        # resumed pair fails at the step an uninterrupted one would.
        self.register_buffer("nonfinite_steps", torch.zeros(len(self.pair_ids), dtype=torch.long))
        self.took_step = torch.ones(len(self.pair_ids), dtype=torch.bool)  # (B,): the pairs the last step moved
        self.max_steps = max_steps
        self._emb: PromptEmbeddings | None = None
        self.last_composite: torch.Tensor | None = None  # (B, 3, S, S), for image logging
        self.last_alpha: torch.Tensor | None = None  # (B, 1, S, S) of the last step
        self.last_losses: dict[str, torch.Tensor] = {}  # per pair, (B,)
        self.last_guidance: dict[str, torch.Tensor] = {}  # per pair, (B,): timestep, gradient norm, non-finite
        self.final_alpha: torch.Tensor | None = None  # (B, 1, S, S) float32 on CPU: the mask the fit ended with
        self.logged_this_step = False  # whether the last step's curves went to the Trainer's logger

    @property
    def batch_size(self) -> int:
        return len(self.pair_ids)

    @property
    def chooses_early(self) -> bool:
        """Whether this module's rows are restart candidates of which all but one per pair are frozen after
        ``restarts.choose_at`` steps (:class:`~peekaboo.optim.callbacks.EarlyChoice`)."""
        return chooses_early(self.cfg.restarts)

    @property
    def can_stop(self) -> bool:
        """Whether pairs of this module may be frozen while the others go on (early stopping, early choice)."""
        return self.cfg.early_stop.enabled or self.chooses_early

    @property
    def total_steps(self) -> int | None:
        """The run's length in steps: the Trainer's ``max_steps``, else the constructor's (None: unknown)."""
        if self._trainer is not None and self.trainer.max_steps > 0:
            return int(self.trainer.max_steps)
        return self.max_steps

    def forward(self) -> torch.Tensor:
        """alpha: ``(B, 1, S, S)`` in [0, 1]."""
        return self.mask()

    def stop_pairs(self, pairs: torch.Tensor, step: int) -> None:
        """Freeze the pairs ``pairs`` (``(B,)`` bool) after ``step`` steps; pairs already stopped keep theirs."""
        pairs = pairs.to(self.stopped_at.device) & (self.stopped_at < 0)
        self.stopped_at[pairs] = step

    def prune(self, candidates: torch.Tensor, step: int) -> None:
        """Freeze the restart ``candidates`` (``(B,)`` bool) after ``step`` steps for good: another candidate of
        their pair was chosen (:class:`~peekaboo.optim.callbacks.EarlyChoice`)."""
        candidates = candidates.to(self.pruned.device)
        self.pruned |= candidates
        self.stop_pairs(candidates, step)

    def steps_used(self, steps_taken: int) -> list[int]:
        """Each pair's optimization steps: where it stopped, or ``steps_taken`` (the fit's) if it never did."""
        return torch.where(self.stopped_at >= 0, self.stopped_at, steps_taken).tolist()

    def on_fit_start(self) -> None:
        self.backbone.to(self.device)
        self._emb = PromptEmbeddings.stack([self.backbone.encode_prompt(p) for p in self.prompts])
        if bool(self.initialized):
            return
        rows = [i for i, init in enumerate(self.mask_inits) if init == "cross_attention"]
        if rows:
            self.start_from_cross_attention(rows)
        rows = [i for i, init in enumerate(self.mask_inits) if init == "region"]
        if rows:
            self.start_from_regions(rows)

    def start_from_cross_attention(self, rows: list[int]) -> None:
        """Set the raster logits of pairs ``rows`` to :func:`~peekaboo.optim.masks.map_logits` of the
        cross-attention map of their prompt over their image (``mask.init=cross_attention``), and mark the masks
        initialized.

        Each map's noise is seeded by (seed, pair id), so a pair starts from the same mask in any batch.
        """
        m = self.cfg.mask
        maps = torch.stack([
            cross_attention_map(self.backbone, self.images[i], self.prompts[i],
                                generator=ops.pair_generator(self.cfg.seed, self.pair_ids[i]))
            for i in rows
        ])  # (R, S, S) in [0, 1], on CPU
        logits = map_logits(maps[:, None], m.init_scale, m.init_threshold).to(self.images.device)  # (R, 1, S, S)
        self.mask.start_from(logits, torch.tensor(rows, device=self.images.device))
        self.initialized.fill_(True)

    def start_from_regions(self, rows: list[int]) -> None:
        """Set the raster logits of pairs ``rows`` to :func:`~peekaboo.optim.masks.map_logits` of an image region
        (``mask.init=region``): the k-th such row of a pair (its restarts, :func:`~peekaboo.optim.restarts.pair_of`)
        starts on the pair's k-th best region of :func:`~peekaboo.optim.regions.ranked_regions`; a row past the last
        region keeps its constant start. Marks the masks initialized."""
        m = self.cfg.mask
        ranked: dict[str, torch.Tensor] = {}  # pair id -> (M, S, S), ranked once per pair
        starts, kept = [], []
        for i in rows:
            pid = pair_of(self.pair_ids[i])
            if pid not in ranked:
                ranked[pid] = ranked_regions(self.backbone, self.images[i], self.prompts[i], pid, m.regions,
                                             self.cfg.seed, self.cfg.background)
            k = sum(pair_of(self.pair_ids[j]) == pid for j in kept)  # this pair's region starts so far
            if k < len(ranked[pid]):
                starts.append(ranked[pid][k])
                kept.append(i)
        if kept:
            logits = map_logits(torch.stack(starts)[:, None], m.init_scale, m.init_threshold)  # (R, 1, S, S)
            self.mask.start_from(logits.to(self.images.device), torch.tensor(kept, device=self.images.device))
        self.initialized.fill_(True)

    def on_train_start(self) -> None:
        # A checkpoint saved on the step its last running pair stopped resumes with none left to run (Lightning
        # does not save should_stop): end the fit before its first step, which would have no rows.
        if self.can_stop and bool((self.stopped_at >= 0).all()):
            self.trainer.should_stop = True

    def step_generators(self) -> list[torch.Generator]:
        """One generator per pair for this step, seeded by (seed, pair id, step): an interrupted and resumed
        pair makes exactly the draws an uninterrupted one makes, on any device and in any batch."""
        step = self.global_step
        return [ops.pair_generator(self.cfg.seed, pid, step) for pid in self.pair_ids]

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        """One step of every running pair: the losses (:meth:`pair_losses`), the failures they show
        (:meth:`track_failures`), the per-pair records callbacks and loggers read (:meth:`record_step`); returns
        the summed loss of the pairs that have not failed."""
        alpha = self.mask()  # (B, 1, S, S)
        running = self.stopped_at < 0  # (B,)
        # Only the pairs still running pay for the VAE and the UNet: R of the B rows (all of them, untouched,
        # until early stopping freezes one; without early stopping, no device sync to find that out).
        rows = None if not self.can_stop or bool(running.all()) else running.nonzero()[:, 0]  # (R,)
        alpha_r = alpha if rows is None else alpha[rows]  # (R, 1, S, S)
        losses, terms, comp = self.pair_losses(alpha_r, rows)
        failed_r = self.track_failures(losses[TOTAL_LOSS], alpha_r, terms["nonfinite"], rows)
        self.record_step(alpha, comp, losses, terms, rows, running)
        # torch.where, not a product: 0 * nan is nan, and a failed pair must not stop the others.
        total = losses[TOTAL_LOSS]
        return torch.where(failed_r, torch.zeros_like(total), total).sum()

    def pair_losses(
        self, alpha: torch.Tensor, rows: torch.Tensor | None
    ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], torch.Tensor]:
        """The step's losses for the R running rows ``rows`` (None: all B pairs), whose masks are ``alpha``
        ``(R, 1, S, S)``: each pair's composite over a background drawn from its own generator, scored by the
        dream loss, plus the alpha regularizer.

        Returns:
            ``{DREAM_LOSS, ALPHA_LOSS, TOTAL_LOSS}`` each ``(R,)``; the dream loss's terms (``t``,
            ``grad_norm``, ``nonfinite``: the gradient entries it zeroed, each ``(R,)``); the composite
            ``(R, 3, S, S)``.
        """
        cfg = self.cfg
        gens = self.step_generators()
        images, emb = self.images, self._emb
        assert emb is not None, "on_fit_start sets the prompt embeddings"
        if rows is not None:
            images, emb = images[rows], emb.select(rows)  # (R, 3, S, S)
            gens = [gens[i] for i in rows.tolist()]
        background = torch.cat([ops.sample_background(cfg.background, img[None], g)
                                for img, g in zip(images, gens, strict=True)])  # (R, 3, S, S)
        comp, latents = self.composite_latents(images, alpha, background, gens, rows)  # (R, 3, S, S), (R, C, h, w)
        terms = self.backbone.dream_loss(latents, emb, cfg.guidance, gens, self.global_step, self.total_steps)
        terms.setdefault("nonfinite", torch.zeros_like(terms["loss"], dtype=torch.long))  # a stand-in may not count
        dream = cfg.loss.lambda_dream * terms["loss"]  # (R,)
        gravity = ops.gravity_loss(alpha.float(), cfg.loss.gravity, cfg.loss.gravity_reduction)  # (R,)
        return {DREAM_LOSS: dream, ALPHA_LOSS: gravity, TOTAL_LOSS: dream + gravity}, terms, comp

    def track_failures(
        self, total: torch.Tensor, alpha: torch.Tensor, nonfinite: torch.Tensor, rows: torch.Tensor | None
    ) -> torch.Tensor:
        """Mark as failed the running rows ``rows`` whose loss ``total`` ``(R,)`` or mask ``alpha``
        ``(R, 1, S, S)`` is not finite, or whose gradient had ``nonfinite`` ``(R,)`` entries for
        ``NONFINITE_STEPS`` steps in a row; raise :class:`NonFiniteError` once every pair has failed.

        Returns:
            ``(R,)`` bool: which running rows have failed (now or before).
        """
        streak = self.nonfinite_steps if rows is None else self.nonfinite_steps[rows]
        streak = torch.where(nonfinite > 0, streak + 1, torch.zeros_like(streak))  # (R,)
        self.nonfinite_steps = _rows_to_pairs(streak, rows, self.nonfinite_steps, self.batch_size)
        finite = (torch.isfinite(total) & torch.isfinite(alpha.flatten(1)).all(dim=1)
                  & (streak < min(NONFINITE_STEPS, self.total_steps or NONFINITE_STEPS)))
        self.failed |= _rows_to_pairs(~finite, rows, torch.zeros_like(self.failed), self.batch_size)
        if self.failed.all():
            raise NonFiniteError(non_finite_message(f"pair(s) {', '.join(self.pair_ids)}", self.cfg, self.global_step))
        return self.failed if rows is None else self.failed[rows]

    def record_step(self, alpha: torch.Tensor, comp: torch.Tensor, losses: dict[str, torch.Tensor],
                    terms: dict[str, torch.Tensor], rows: torch.Tensor | None, running: torch.Tensor) -> None:
        """Keep the step's per-pair records over all B pairs (a frozen pair keeps those of the last step it
        took) for callbacks and loggers, and log them on the steps the Trainer writes. ``alpha`` is all B
        masks ``(B, 1, S, S)``; ``comp``, ``losses`` and ``terms`` are the R running rows' (:meth:`pair_losses`)."""
        b = self.batch_size
        alpha_r = alpha if rows is None else alpha[rows]
        self.last_composite = _rows_to_pairs(comp.detach(), rows, self.last_composite, b, 0.0)
        self.last_alpha = alpha.detach()  # read by callbacks, so they need not render the mask again
        step_losses = {**{k: v.detach() for k, v in losses.items()}, "mask/area": alpha_r.detach().flatten(1).mean(1)}
        self.last_losses = {k: _rows_to_pairs(v, rows, self.last_losses.get(k), b) for k, v in step_losses.items()}
        self.last_guidance = {k: _rows_to_pairs(v, rows, self.last_guidance.get(k), b) for k, v in {
            "guidance/t": terms["t"].float(), "guidance/grad_norm": terms["grad_norm"],
            "guidance/nonfinite": terms["nonfinite"].float()}.items()}
        self.took_step = running
        self.logged_this_step = False
        if self.writes_logs_this_step():
            self.log_step_metrics()

    def composite_latents(
        self, images: torch.Tensor, alpha: torch.Tensor, background: torch.Tensor,
        generators: list[torch.Generator], rows: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The step's pixel composite ``(R, 3, S, S)`` and the latents ``(R, C, h, w)`` the dream loss scores,
        for the R running rows ``rows`` (None: all B pairs) of ``images``, ``alpha`` and ``background``.

        - ``composite=pixel``: the composite, VAE-encoded with gradient (``guidance.latent_mode``).
        - ``composite=latent``: ``alpha_l * z_img + (1 - alpha_l) * z_bg``, ``alpha_l`` alpha area-averaged to
          the latent grid, ``z_img`` from the images' cached posterior, ``z_bg`` the background encoded without
          gradient. With ``latent_mode=sample`` both are drawn with the same noise, one draw per pair from its
          generator (as the pixel path draws). Alpha's gradient goes through the blend only: no VAE backward;
          the returned composite is detached (it is only logged).
        """
        mode, side = self.cfg.guidance.latent_mode, self.cfg.guidance.encode_resolution
        if self.cfg.composite == "pixel":
            comp = ops.composite(images, alpha, background)
            return comp, self.backbone.encode_images(comp, mode, generators, side)
        mean, std = self.image_posterior()
        if rows is not None:
            mean, std = mean[rows], std[rows]  # (R, C, h, w)
        bg_mean, bg_std = self.backbone.encode_posterior(background, side)  # (R, C, h, w), no gradient
        z_img, z_bg = mean, bg_mean
        if mode == "sample":
            noise = posterior_noise(mean, generators)  # (R, C, h, w)
            z_img, z_bg = mean + std * noise, bg_mean + bg_std * noise
        latents = ops.blend_latents(z_img, z_bg, ops.downsample_alpha(alpha, mean.shape[-2:]))
        with torch.no_grad():
            comp = ops.composite(images, alpha, background)
        return comp, latents

    def image_posterior(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The images' VAE posterior ``(mean, std)``, each ``(B, C, h, w)`` (:meth:`Backbone.encode_posterior`):
        encoded once, on the module's device, on first use, and cached in non-persistent buffers."""
        if self.image_latent_mean is None or self.image_latent_mean.device != self.images.device:
            mean, std = self.backbone.encode_posterior(self.images, self.cfg.guidance.encode_resolution)
            self.image_latent_mean, self.image_latent_std = mean, std
        assert self.image_latent_std is not None
        return self.image_latent_mean, self.image_latent_std

    def optimizer_step(self, epoch: int, batch_idx: int, optimizer, optimizer_closure=None) -> None:
        """The optimizer's step, after which every frozen pair's parameters are put back: a zero gradient
        alone would not freeze them (Adam's moments and weight decay still move a parameter)."""
        frozen = self.stopped_at >= 0
        if not self.can_stop or not bool(frozen.any()):
            return super().optimizer_step(epoch, batch_idx, optimizer, optimizer_closure)
        rows = frozen.nonzero()[:, 0]
        # Every mask parameter is pair-major (masks.py): pair i owns the i-th of B equal leading chunks.
        params = list(self.mask.parameters())
        kept = [p.detach().view(self.batch_size, -1)[rows].clone() for p in params]  # each (F, numel / B)
        super().optimizer_step(epoch, batch_idx, optimizer, optimizer_closure)
        with torch.no_grad():
            for p, values in zip(params, kept, strict=True):
                p.view(self.batch_size, -1)[rows] = values
        return None

    def step_metrics(self) -> dict[str, torch.Tensor]:
        """The last step's curves, per pair: ``{name: (B,)}`` (losses, mask area, timestep, gradient norm, and
        ``guidance/nonfinite``: the gradient's entries that were not finite, zeroed before they were applied)."""
        return {**self.last_losses, **self.last_guidance}

    def writes_logs_this_step(self) -> bool:
        """Whether the Trainer writes the logged values of the step being taken (call in ``training_step``).

        Lightning writes on-step values every ``log_every_n_steps`` steps (counting from 1) and drops the
        rest, so building them on the other steps only costs time.
        """
        if not self.loggers or not self.trainer.log_every_n_steps:  # no loggers: also no Trainer
            return False
        return (self.global_step + 1) % self.trainer.log_every_n_steps == 0

    def log_step_metrics(self) -> None:
        """Log the last step's curves to the Trainer's logger, averaged over the pairs still running."""
        ok = ~self.failed & self.took_step.to(self.failed.device)
        self.logged_this_step = True
        self.log_dict({k: v[ok].mean() for k, v in self.step_metrics().items()},
                      on_step=True, on_epoch=False, batch_size=self.batch_size)

    def on_train_end(self) -> None:
        # The final mask, rendered on the device the fit ran on (a Fourier MLP, a bilateral filter's passes):
        # Lightning's teardown moves the module to the CPU next.
        with torch.no_grad():
            self.final_alpha = self().detach().float().cpu()

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint[REVISION_KEY] = MASK_REVISIONS[self.cfg.mask.kind]

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        # Lightning calls this before it loads the state dict: a mask of another revision (other parameter keys,
        # or another mask from the same ones) is refused here with one line, not a missing-keys traceback.
        check_checkpoint_revision(self.cfg.mask.kind, checkpoint.get(REVISION_KEY),
                                  f"The checkpoint of pair(s) {', '.join(self.pair_ids)}")
        own = self.state_dict()
        saved = checkpoint["state_dict"]
        # Checkpoints written before the non-finite streak was a buffer held it beside the state dict (and
        # older ones not at all: no streak).
        streak = checkpoint.pop("nonfinite_steps", None)
        if streak is None or streak.shape != self.nonfinite_steps.shape:
            streak = torch.zeros_like(self.nonfinite_steps)
        # Buffers persistent only where they can matter: a checkpoint without one is read as the value it would
        # have held, and one this module does not keep is dropped. Which pairs had stopped early or were pruned:
        # none had; whether the masks had their start: a checkpoint of a run that started (from whatever init),
        # so its mask is kept.
        for name, absent in (("stopped_at", torch.full_like(self.stopped_at, -1)),
                             ("pruned", torch.zeros_like(self.pruned)),
                             ("initialized", torch.tensor(True)),
                             ("nonfinite_steps", streak)):
            if name not in own:
                saved.pop(name, None)
            elif name not in saved:
                saved[name] = absent

    def configure_optimizers(self):
        """The optimizer, and with a schedule (``optim.schedule``, ``optim.warmup_steps``) a per-step
        ``LambdaLR`` over the run's ``max_steps``, in Lightning's dict form (its state goes into checkpoints)."""
        optimizer = build_optimizer(self.cfg.optim, self.mask.parameters())
        if not is_scheduled(self.cfg.optim):
            return optimizer  # no scheduler at all: the constant rate of before, and checkpoints as before
        total, cfg = self.total_steps, self.cfg.optim
        if total is None:
            raise ValueError(f"optim.schedule={cfg.schedule} needs the run's length: attach a Trainer or pass "
                             "max_steps")
        # A closure, not a bound method: LambdaLR's state_dict then holds numbers only (weights_only loads).
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, total, cfg))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step", "frequency": 1}}


def _rows_to_pairs(values: torch.Tensor, rows: torch.Tensor | None, fill: torch.Tensor | None, batch: int,
                   missing: float = math.nan) -> torch.Tensor:
    """Per-pair values ``(B, ...)`` from the R running rows' ``values`` ``(R, ...)``: ``values`` itself when
    every pair ran (``rows`` None); else ``fill`` (the stopped pairs' earlier values) with the running rows
    replaced, or ``missing`` for a stopped pair when there is no ``fill`` (a run resumed after it stopped)."""
    if rows is None:
        return values
    if fill is None:
        base = torch.full((batch, *values.shape[1:]), missing, dtype=values.dtype, device=values.device)
    else:
        base = fill.to(values.device, values.dtype).clone()
    return base.index_copy(0, rows, values)
