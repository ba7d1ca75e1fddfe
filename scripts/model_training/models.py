"""The bundled models' components, sized by :class:`~model_training.config.Config` and built by the project's one
pipeline builder (:mod:`peekaboo.diffusion.components`)."""

from __future__ import annotations

from typing import Any

import torch
from diffusers import AutoencoderKL, DDIMScheduler, DDPMScheduler, UNet2DConditionModel
from transformers import CLIPTextModel, CLIPTokenizer

from model_training.config import Config
from peekaboo.diffusion.components import Architecture, build_components

__all__ = ["architecture", "make_sampling_scheduler", "make_text_encoder", "make_train_scheduler", "make_unet",
           "make_vae"]


def latent_size(cfg: Config) -> int:
    """Side of the latents: each VAE block after the first halves the image."""
    return cfg.image_size // 2 ** (len(cfg.vae_channels) - 1)


def _schedule(cfg: Config) -> dict[str, Any]:
    """The noise schedule both schedulers share (SD-1's scaled-linear betas, epsilon prediction)."""
    return {"num_train_timesteps": cfg.num_train_timesteps, "beta_schedule": "scaled_linear",
            "beta_start": cfg.beta_start, "beta_end": cfg.beta_end, "prediction_type": "epsilon",
            "clip_sample": False}


def architecture(cfg: Config, vocab_size: int) -> Architecture:
    """The component configs of ``cfg``'s pipeline (cross-attention at the UNet levels
    ``cfg.unet_cross_attention`` names)."""
    if len(cfg.unet_cross_attention) != len(cfg.unet_channels):
        raise ValueError(f"unet_cross_attention {cfg.unet_cross_attention} needs one flag per level of "
                         f"unet_channels {cfg.unet_channels}")
    n = len(cfg.vae_channels)
    return Architecture(
        unet={"sample_size": latent_size(cfg), "in_channels": cfg.latent_channels,
              "out_channels": cfg.latent_channels,
              "down_block_types": tuple("CrossAttnDownBlock2D" if x else "DownBlock2D"
                                        for x in cfg.unet_cross_attention),
              "up_block_types": tuple("CrossAttnUpBlock2D" if x else "UpBlock2D"
                                      for x in reversed(cfg.unet_cross_attention)),
              "block_out_channels": cfg.unet_channels, "layers_per_block": cfg.unet_layers_per_block,
              "cross_attention_dim": cfg.text_width, "attention_head_dim": cfg.unet_heads,
              "norm_num_groups": cfg.unet_norm_groups},
        vae={"in_channels": 3, "out_channels": 3, "down_block_types": ("DownEncoderBlock2D",) * n,
             "up_block_types": ("UpDecoderBlock2D",) * n, "block_out_channels": cfg.vae_channels,
             "layers_per_block": cfg.vae_layers_per_block, "latent_channels": cfg.latent_channels,
             "norm_num_groups": min(32, cfg.vae_channels[0]), "sample_size": cfg.image_size},
        text_encoder={"vocab_size": vocab_size, "hidden_size": cfg.text_width, "intermediate_size": cfg.text_ff,
                      "num_hidden_layers": cfg.text_layers, "num_attention_heads": cfg.text_heads,
                      "max_position_embeddings": cfg.max_length, "projection_dim": cfg.text_width},
        scheduler=_schedule(cfg),
    )


def _fresh(cfg: Config, tokenizer: CLIPTokenizer, seed: int) -> dict[str, Any]:
    return build_components(architecture(cfg, len(tokenizer)), tokenizer, seed=seed)


def make_vae(cfg: Config, tokenizer: CLIPTokenizer) -> AutoencoderKL:
    """A fresh AutoencoderKL, its log-variance output starting low (see ``Config.vae_logvar_init``)."""
    vae = _fresh(cfg, tokenizer, cfg.seed)["vae"]
    with torch.no_grad():  # quant_conv outputs [mean, logvar]; bias the logvar half downwards
        vae.quant_conv.bias[cfg.latent_channels:].fill_(cfg.vae_logvar_init)
    return vae


def make_text_encoder(cfg: Config, tokenizer: CLIPTokenizer) -> CLIPTextModel:
    """A fresh CLIP text transformer sized to the scene vocabulary."""
    return _fresh(cfg, tokenizer, cfg.seed + 1)["text_encoder"]


def make_unet(cfg: Config, tokenizer: CLIPTokenizer) -> UNet2DConditionModel:
    """A fresh latent UNet."""
    return _fresh(cfg, tokenizer, cfg.seed + 1)["unet"]


def make_train_scheduler(cfg: Config) -> DDPMScheduler:
    """Stable Diffusion's noise schedule."""
    return DDPMScheduler(**_schedule(cfg))


def make_sampling_scheduler(cfg: Config) -> DDIMScheduler:
    """The scheduler saved with the pipeline: DDIM on the training schedule (SD-1 settings)."""
    return DDIMScheduler(**_schedule(cfg), set_alpha_to_one=False, steps_offset=1)
