"""The frozen text-to-image diffusion model as one object: VAE encoding, UNet calls and the noise draws of the
dream loss; its prompt embeddings come from :mod:`peekaboo.diffusion.prompts`.

Two formats: Stable Diffusion 1.x/2.x (one text encoder; the UNet takes its last hidden states) and SDXL (two
text encoders; the UNet takes both encoders' penultimate hidden states, concatenated, and, through its
``text_time`` added conditioning, the second encoder's pooled embedding and the image's size ids). Every UNet call
goes through :meth:`Backbone.run_unet`, which adds SDXL's conditioning.

A :class:`Backbone` is a plain object (not an ``nn.Module``), so a LightningModule holding it never puts its
weights into ``state_dict`` or a checkpoint. :func:`peekaboo.diffusion.loading.shared_backbone` loads one per
process and model config and hands the same object to every pair; the gradient the dream loss pushes into the
latents comes from :mod:`peekaboo.diffusion.estimators`.
"""

from __future__ import annotations

from typing import Any

import torch

from peekaboo import ops
from peekaboo.config import GuidanceConfig
from peekaboo.diffusion import estimators
from peekaboo.diffusion.prompts import PromptEmbeddings, PromptEncoder
from peekaboo.errors import ConfigError, ModelError

PREDICTION_TYPES = ("epsilon", "v_prediction")
# The UNet's addition_embed_type of the SDXL format: the pooled text embedding plus the size ids (time ids).
TEXT_TIME = "text_time"
# SDXL base's time ids: original size (h, w), crop top-left (y, x), target size (h, w).
TIME_IDS = 6


def is_sdxl_format(unet_config: dict[str, Any]) -> bool:
    """Whether a UNet (its config) takes SDXL's added ``text_time`` conditioning: the one test of "SDXL format"."""
    return unet_config.get("addition_embed_type") == TEXT_TIME


def prediction_message(model: str, prediction: str) -> str:
    """Why a model whose scheduler predicts ``prediction`` cannot be driven."""
    return f"{model}: the scheduler predicts {prediction!r}; Peekaboo supports {' or '.join(PREDICTION_TYPES)} models."


def channels_message(model: str, unet_channels: int, latent_channels: int) -> str:
    """Why a UNet whose input channels differ from the VAE's latent channels cannot segment."""
    return (f"{model}: its UNet takes {unet_channels} input channels but its VAE makes {latent_channels}-channel "
            "latents (an inpainting or depth model?); segmenting needs a text-to-image model.")


class Backbone:
    """A frozen Stable-Diffusion-style model (vae, unet, text_encoder, tokenizer, scheduler config; SDXL format:
    text_encoder_2 and tokenizer_2 too).

    Args:
        vae, unet, text_encoder, tokenizer: diffusers / transformers components, already frozen.
        scheduler_config: the scheduler's config dict (betas, number of timesteps, prediction type).
        resolution: side length the composite is resized to before encoding.
        text_encoder_2, tokenizer_2: SDXL format (a UNet with ``addition_embed_type="text_time"``): the second
            text encoder (a ``CLIPTextModelWithProjection``) and its tokenizer.
        zero_empty_prompt: SDXL format: the unconditional embeddings are zeros, not the empty prompt's encoding
            (``force_zeros_for_empty_prompt`` of SDXL base's ``model_index.json``).

    Raises:
        ModelError: an SDXL-format UNet without a second text encoder, or tokenizers of different lengths.
    """

    def __init__(self, vae, unet, text_encoder, tokenizer, scheduler_config: dict[str, Any], resolution: int,
                 text_encoder_2=None, tokenizer_2=None, zero_empty_prompt: bool = False):
        from diffusers import DDPMScheduler

        self.vae, self.unet, self.text_encoder, self.tokenizer = vae, unet, text_encoder, tokenizer
        self.text_encoder_2, self.tokenizer_2 = text_encoder_2, tokenizer_2
        #: SDXL format: the UNet takes the pooled embedding and the size ids (``added_cond_kwargs``).
        self.sdxl = is_sdxl_format(unet.config)
        if self.sdxl and (text_encoder_2 is None or tokenizer_2 is None):
            raise ModelError("The model's UNet takes SDXL's text_time conditioning, but no text_encoder_2 and "
                             "tokenizer_2 were given.")
        if self.sdxl and tokenizer_2.model_max_length != tokenizer.model_max_length:
            raise ModelError(f"The model's tokenizers make {tokenizer.model_max_length} and "
                             f"{tokenizer_2.model_max_length} tokens; SDXL's two embeddings need the same length.")
        self.zero_empty_prompt = self.sdxl and zero_empty_prompt
        #: The text side: prompt embeddings from the text encoder(s) above, and the cache of them.
        self.prompt_encoder = PromptEncoder(text_encoder, tokenizer, self.sdxl, text_encoder_2, tokenizer_2,
                                            self.zero_empty_prompt)
        for model in self.models:
            model.eval().requires_grad_(False)
        self.prediction_type = scheduler_config.get("prediction_type", "epsilon")
        if self.prediction_type not in PREDICTION_TYPES:
            raise ModelError(prediction_message("The loaded model", self.prediction_type))
        # DDPM's constructor turns any SD scheduler config (PNDM, DDIM, ...) into the training noise schedule.
        schedule = DDPMScheduler.from_config(scheduler_config)
        self.num_train_timesteps = int(schedule.config.num_train_timesteps)
        self.alphas_cumprod = schedule.alphas_cumprod.float()  # (T,)
        self.resolution = resolution
        self.scaling_factor = float(vae.config.scaling_factor)
        self.shift_factor = float(getattr(vae.config, "shift_factor", None) or 0.0)

    @property
    def models(self) -> tuple[Any, ...]:
        """The frozen modules: vae, unet, text_encoder (and text_encoder_2)."""
        return tuple(m for m in (self.vae, self.unet, self.text_encoder, self.text_encoder_2) if m is not None)

    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device

    @property
    def vae_scale_factor(self) -> int:
        """Pixels per latent cell along one side: 2 per VAE downsampling (8 for SD 1.x)."""
        return vae_scale_factor(self.vae)

    @property
    def latent_multiple(self) -> int:
        """Pixels an encoded side must be a multiple of: the VAE's factor times the UNet's downsampling (every
        latent side halves evenly through the UNet's down blocks)."""
        return self.vae_scale_factor * 2 ** (len(self.unet.config.block_out_channels) - 1)

    @property
    def native_resolution(self) -> int:
        """The side the model was trained at: ``unet.sample_size * vae_scale_factor`` (512 for SD 1.x)."""
        return native_resolution(self.unet, self.vae)

    @property
    def dtype(self) -> torch.dtype:
        return next(self.unet.parameters()).dtype

    def to(self, device: torch.device | str) -> Backbone:
        """Move the weights (and cached embeddings) to ``device``; a no-op when already there."""
        device = torch.device(device)
        if self.device != device:
            for model in self.models:
                model.to(device)
            self.prompt_encoder.move_cache(device)
        return self

    def set_vae_gradient_checkpointing(self, enabled: bool) -> None:
        """Recompute the VAE encoder's activations block by block in the backward pass instead of keeping them
        (``model.vae_gradient_checkpointing``): less memory per pair for one more encoder forward per step."""
        if enabled:
            self.vae.enable_gradient_checkpointing()
        else:
            self.vae.disable_gradient_checkpointing()

    # -- text -----------------------------------------------------------------------------------------------
    def tokenize(self, prompt: str) -> torch.Tensor:
        """Token ids ``(1, L)`` of ``prompt``, truncated with a warning where longer than the model reads
        (:meth:`PromptEncoder.tokenize <peekaboo.diffusion.prompts.PromptEncoder.tokenize>`)."""
        return self.prompt_encoder.tokenize(prompt)

    def encode_prompt(self, prompt: str) -> PromptEmbeddings:
        """Embeddings ``[uncond, cond]`` of ``prompt``, cached
        (:meth:`PromptEncoder.encode_prompt <peekaboo.diffusion.prompts.PromptEncoder.encode_prompt>`)."""
        return self.prompt_encoder.encode_prompt(prompt)

    # -- images ---------------------------------------------------------------------------------------------
    def encode_images(
        self, images: torch.Tensor, mode: str = "sample", generators: list[torch.Generator] | None = None,
        resolution: int | None = None,
    ) -> torch.Tensor:
        """VAE-encode images at the model's resolution; gradients flow through the encoder.

        Args:
            images: ``(B, 3, S, S)`` in [0, 1] (any S: resized to ``resolution``).
            mode: ``"mean"`` (posterior mean) or ``"sample"`` (a draw from the posterior; sample ``i`` uses
                ``generators[i]``, so a pair's draw does not depend on its batch).
            resolution: the side encoded; None = ``self.resolution``.

        Returns:
            latents ``(B, C, h, w)``, float32, scaled by the VAE's ``scaling_factor``.
        """
        dist = self.vae.encode(self._vae_input(images, resolution)).latent_dist
        if mode == "mean":
            z = dist.mean
        else:
            noise = posterior_noise(dist.mean, generators)
            z = dist.mean + dist.std * noise
        return self._scaled(z)

    def _scaled(self, z: torch.Tensor) -> torch.Tensor:
        """VAE latents ``(B, C, h, w)`` in the units the UNet takes (``shift_factor``, ``scaling_factor``), float32."""
        return (z.float() - self.shift_factor) * self.scaling_factor

    def _vae_input(self, images: torch.Tensor, resolution: int | None = None) -> torch.Tensor:
        """``images`` ``(B, 3, S, S)`` in [0, 1] as the VAE takes them: resized to ``resolution`` (None:
        ``self.resolution``), in [-1, 1], in the VAE's dtype."""
        side = resolution or self.resolution
        x = images
        if x.shape[-1] != side or x.shape[-2] != side:
            # Bilinear, as matrix products where deterministic kernels are asked for (ops.resample).
            x = ops.resample(x, (side, side), "bilinear")
        return (2.0 * x - 1.0).to(self.vae.dtype)

    @torch.no_grad()
    def encode_posterior(
        self, images: torch.Tensor, resolution: int | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The VAE posterior of ``images`` ``(B, 3, S, S)``, without gradient, in the scaled latent units of
        :meth:`encode_images`: ``(mean, std)``, each ``(B, C, h, w)`` float32. ``mean + std * eps`` is the
        latent :meth:`encode_images` draws with noise ``eps`` (up to rounding)."""
        dist = self.vae.encode(self._vae_input(images, resolution)).latent_dist
        return self._scaled(dist.mean), dist.std.float() * self.scaling_factor

    def check_encode_resolution(self, side: int | None, key: str = "optimization.guidance.encode_resolution") -> None:
        """Refuse an encoding side the VAE and UNet cannot take: it must be a multiple of the VAE's factor
        times the UNet's downsampling (every latent side halves evenly through the UNet's down blocks).

        Raises:
            ConfigError: naming ``key``, the side and the multiple.
        """
        if side is None:
            return
        multiple = self.latent_multiple
        if side % multiple:
            nearest = max(multiple, side // multiple * multiple)
            raise ConfigError(f"Config key {key!r} = {side} is out of range for this model; allowed: a multiple "
                              f"of {multiple} (VAE factor {self.vae_scale_factor} times the UNet's downsampling "
                              f"{multiple // self.vae_scale_factor}), e.g. {nearest}.")

    # -- UNet calls -----------------------------------------------------------------------------------------
    def time_ids(self, latent_size: tuple[int, int], rows: int) -> torch.Tensor:
        """SDXL's size conditioning for latents of ``latent_size`` ``(h, w)``: original size, crop top-left and
        target size, ``(H, W, 0, 0, H, W)`` with ``H = h * vae_scale_factor``: the composite is a whole, uncropped
        image at the side encoded. ``(rows, 6)`` in the UNet's dtype, on its device."""
        height, width = (side * self.vae_scale_factor for side in latent_size)
        ids = torch.tensor([height, width, 0, 0, height, width], dtype=self.unet.dtype, device=self.device)
        return ids.expand(rows, TIME_IDS)

    def run_unet(self, noisy: torch.Tensor, t: torch.Tensor, hidden: torch.Tensor,
                 pooled: torch.Tensor | None = None) -> torch.Tensor:
        """One UNet call, in the UNet's dtype, with SDXL's added conditioning where the UNet takes it.

        Args:
            noisy: ``(N, C, h, w)`` noisy latents.
            t: ``(N,)`` integer timesteps.
            hidden: ``(N, L, D)`` text embeddings, or a shared ``(1, L, D)``.
            pooled: SDXL format: ``(N, P)`` pooled text embeddings, or a shared ``(1, P)``; ignored otherwise.

        Returns:
            the UNet's output ``(N, C, h, w)`` (epsilon or v, as the model predicts), in the UNet's dtype.

        Raises:
            ValueError: an SDXL-format UNet called without ``pooled``.
        """
        rows, dtype = noisy.shape[0], self.unet.dtype
        added = {}
        if self.sdxl:
            if pooled is None:
                raise ValueError("an SDXL-format UNet needs the pooled text embeddings (PromptEmbeddings.pooled_*)")
            added = {"added_cond_kwargs": {"text_embeds": pooled.expand(rows, -1).to(dtype),
                                           "time_ids": self.time_ids(noisy.shape[-2:], rows)}}
        return self.unet(noisy.to(dtype), t, encoder_hidden_states=hidden.expand(rows, -1, -1).to(dtype),
                         **added).sample

    # -- dream loss -----------------------------------------------------------------------------------------
    def predict_eps(
        self, noisy: list[torch.Tensor], t: list[torch.Tensor], hidden: list[torch.Tensor], batch: bool = True,
        pooled: list[torch.Tensor | None] | None = None, grad: bool = False,
    ) -> list[torch.Tensor]:
        """UNet epsilon predictions for groups of rows (v-predictions are converted to epsilon).

        Args:
            noisy: per group ``(N_i, C, h, w)`` noisy latents ``z_t``.
            t: per group ``(N_i,)`` integer timesteps.
            hidden: per group text embeddings ``(N_i, L, D)``, or a shared ``(1, L, D)``.
            batch: one UNet call over all groups' rows instead of one call per group.
            pooled: per group the SDXL format's pooled text embeddings ``(N_i, P)``, or a shared ``(1, P)``
                (the ``pooled_*`` of :class:`PromptEmbeddings`, None for SD 1.x/2.x).
            grad: keep the autograd graph from ``noisy`` to the predictions (the ``full`` estimator
                differentiates through the UNet); by default the call records nothing.

        Returns:
            per group ``(N_i, C, h, w)`` float32.
        """
        with torch.set_grad_enabled(grad):
            channels = self.unet.config.in_channels
            if noisy[0].shape[1] != channels:  # e.g. an inpainting UNet loaded for editing
                raise ModelError(channels_message("The loaded model", channels, noisy[0].shape[1]))
            sizes = [z.shape[0] for z in noisy]
            hidden = [e.expand(n, -1, -1) for n, e in zip(sizes, hidden, strict=True)]
            groups = None if pooled is None or any(p is None for p in pooled) else [
                p.expand(n, -1) for n, p in zip(sizes, pooled, strict=True)]
            if batch:
                out = self.run_unet(torch.cat(noisy), torch.cat(t), torch.cat(hidden),
                                    None if groups is None else torch.cat(groups))
                outs = list(out.float().split(sizes))
            else:
                outs = [self.run_unet(z, tt, e, None if groups is None else groups[i]).float()
                        for i, (z, tt, e) in enumerate(zip(noisy, t, hidden, strict=True))]
            if self.prediction_type == "v_prediction":
                abar = self.alphas_cumprod.to(noisy[0].device)
                outs = [ops.v_to_epsilon(o, z, abar[tt]) for o, z, tt in zip(outs, noisy, t, strict=True)]
            return outs

    def predict_noise(
        self, noisy: torch.Tensor, t: torch.Tensor, emb: PromptEmbeddings, batch_cfg: bool = True, grad: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """UNet epsilon predictions for ``[uncond, cond]`` (v-predictions are converted to epsilon).

        Args:
            noisy: ``(B, C, h, w)`` noisy latents ``z_t``.
            t: ``(B,)`` integer timesteps.
            emb: prompt embeddings, each ``(B, L, D)`` or a shared ``(1, L, D)`` (SDXL: with the pooled ones).
            batch_cfg: one UNet call of batch ``2B`` instead of two calls of ``B``.
            grad: keep the autograd graph (:meth:`predict_eps`).

        Returns:
            ``(eps_uncond, eps_cond)``, each ``(B, C, h, w)`` float32.
        """
        eps_u, eps_c = self.predict_eps([noisy, noisy], [t, t], [emb.uncond, emb.cond], batch_cfg,
                                        [emb.pooled_uncond, emb.pooled_cond], grad)
        return eps_u, eps_c

    def sample_timestep(
        self, cfg: GuidanceConfig, generator: torch.Generator, index: int = 0, count: int | None = None
    ) -> torch.Tensor:
        """Draw ``index`` of a pair's run of ``count`` timestep draws under ``cfg.t_schedule``
        (:func:`peekaboo.ops.timestep_range`; ``uniform``: ``t ~ U[t_min * T, t_max * T)``). One int64
        timestep, shape ``(1,)``, on CPU."""
        lo, hi = ops.timestep_range(cfg.t_schedule, index, count, cfg.t_min, cfg.t_max, cfg.t_anneal_jitter,
                                    cfg.t_strata)
        return ops.draw_timestep(lo, hi, self.num_train_timesteps, generator)

    def dream_loss(
        self,
        latents: torch.Tensor,
        emb: PromptEmbeddings,
        cfg: GuidanceConfig,
        generators: list[torch.Generator],
        step: int = 0,
        total_steps: int | None = None,
    ) -> dict[str, torch.Tensor]:
        """Score-distillation loss terms for ``latents`` ``(B, C, h, w)``.

        Sample ``i`` makes ``K = cfg.samples_per_step`` draws from ``generators[i]``, each its ``t`` and then its
        ``eps``; all ``B*K`` noisy latents go through one UNet call, and the loss's gradient w.r.t. ``latents``
        is the mean over the K draws of ``cfg.estimator``'s gradient (:func:`peekaboo.diffusion.estimators.gradient`),
        by default (``sds``) ``w(t) (eps_u + s (eps_c - eps_u) - eps)``.

        Args:
            step: the step being taken, and ``total_steps`` the run's length: the timestep schedule's position
                (draw ``k`` of the step is draw ``step * K + k`` of the run's ``total_steps * K``).

        Returns:
            ``{"loss": (B,), "t": (B,) float (the mean timestep of the K draws), "grad_norm": (B,), "nonfinite":
            (B,) int64}``: ``grad_norm`` is the norm of the gradient applied, whose non-finite entries (over the
            K draws, ``nonfinite`` of them) were zeroed.
        """
        k_draws = cfg.samples_per_step
        count = None if total_steps is None else total_steps * k_draws
        # Pair-major order: pair i's K draws are rows i*K .. i*K+K-1 of every (B*K, ...) tensor below.
        draws = [(self.sample_timestep(cfg, g, step * k_draws + k, count), torch.randn(latents.shape[1:], generator=g))
                 for g in generators for k in range(k_draws)]
        t = torch.cat([d[0] for d in draws]).to(latents.device)  # (B*K,)
        noise = torch.stack([d[1] for d in draws]).to(latents.device)  # (B*K, C, h, w)
        abar = self.alphas_cumprod.to(latents.device)[t]  # (B*K,)
        clean = latents.detach()
        if k_draws > 1:  # K = 1 keeps exactly the tensors (and results) of a single draw
            clean = clean.repeat_interleave(k_draws, 0)  # (B*K, C, h, w)
            emb = emb.repeat_interleave(k_draws)  # (B*K, L, D), or a shared (1, L, D)
        noisy = ops.add_noise(clean, noise, abar)  # (B*K, C, h, w)
        grad = estimators.gradient(self, noisy, noise, t, abar, emb, cfg)  # (B*K, C, h, w)
        # Counted before they are zeroed: a model whose outputs overflow (e.g. float16) otherwise looks like one
        # whose gradient is small, and gravity alone empties the mask.
        grad, nonfinite = ops.drop_nonfinite(grad)  # (B*K, C, h, w), (B*K,)
        t_mean = t.float()  # (B*K,), which is (B,) for K = 1
        if k_draws > 1:
            grad = grad.view(-1, k_draws, *grad.shape[1:]).mean(1)  # (B, K, C, h, w) -> (B, C, h, w)
            t_mean = t_mean.view(-1, k_draws).mean(1)  # (B,)
            nonfinite = nonfinite.view(-1, k_draws).sum(1)  # (B,)
        return {"loss": ops.dream_loss(latents, grad), "t": t_mean, "grad_norm": grad.flatten(1).norm(dim=1),
                "nonfinite": nonfinite}


def posterior_noise(like: torch.Tensor, generators: list[torch.Generator] | None) -> torch.Tensor:
    """One standard normal draw per sample for a posterior sample shaped like ``like`` ``(B, C, h, w)``:
    sample ``i`` from ``generators[i]`` (a CPU generator; None: the global one), in ``like``'s device and
    dtype, so a pair's draw does not depend on its batch."""
    gens = generators or [torch.default_generator] * like.shape[0]
    noise = torch.stack([torch.randn(like.shape[1:], generator=g) for g in gens])  # (B, C, h, w)
    return noise.to(like.device, like.dtype)


def vae_scale_factor(vae) -> int:
    """Pixels per latent cell along one side of ``vae``: it halves the side once per block after the first."""
    return 2 ** (len(vae.config.block_out_channels) - 1)


def native_resolution(unet, vae) -> int:
    """The image side ``unet`` and ``vae`` were trained at: the UNet's latent side times the VAE's factor."""
    size = unet.config.sample_size
    return int(size if isinstance(size, int) else size[0]) * vae_scale_factor(vae)
