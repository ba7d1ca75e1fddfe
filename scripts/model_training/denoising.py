"""What the bundled models' conditioning checks compare: a pipeline's denoising errors under captions, on shared
noise (:mod:`model_training.samples` for shapes, :mod:`model_training.object_checks` for objects)."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import StableDiffusionPipeline

from model_training.scenes import to_tensor

__all__ = ["denoising_errors", "embed", "encode"]


def embed(pipe: StableDiffusionPipeline, texts: list[str]) -> torch.Tensor:
    """The text encoder's hidden states ``(N, L, D)`` of ``texts``."""
    ids = pipe.tokenizer(texts, padding="max_length", max_length=pipe.tokenizer.model_max_length,
                         truncation=True, return_tensors="pt").input_ids
    return pipe.text_encoder(ids)[0]


def encode(pipe: StableDiffusionPipeline, images: np.ndarray) -> torch.Tensor:
    """Scaled posterior-mean latents ``(N, C, h, w)`` of uint8 images ``(N, H, W, 3)``."""
    return pipe.vae.encode(to_tensor(images)).latent_dist.mean * pipe.vae.config.scaling_factor


def denoising_errors(pipe: StableDiffusionPipeline, z0: torch.Tensor, embs: list[torch.Tensor], t_val: int,
                     gen: torch.Generator) -> torch.Tensor:
    """Denoising errors ``(T, N)`` of latents ``z0`` ``(N, C, h, w)`` at timestep ``t_val`` under each of the ``T``
    embeddings ``(N, L, D)``, on one noise draw from ``gen`` shared by all of them."""
    abar = pipe.scheduler.alphas_cumprod
    noise = torch.randn(z0.shape, generator=gen)
    t = torch.full((len(z0),), t_val)
    zt = abar[t_val].sqrt() * z0 + (1 - abar[t_val]).sqrt() * noise
    return torch.stack([F.mse_loss(pipe.unet(zt, t, encoder_hidden_states=e).sample, noise,
                                   reduction="none").mean(dim=(1, 2, 3)) for e in embs])
