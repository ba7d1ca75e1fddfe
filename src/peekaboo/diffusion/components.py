"""Stable-Diffusion-format pipelines built from component configs: one builder for every model the project makes.

The tests' tiny models, the bundled models' training (``scripts/train_bundled_model.py``) and the throughput
benchmark's Stable-Diffusion-1.5-size model are all a VAE, a CLIP text encoder with its tokenizer, a conditional
UNet and a DDPM scheduler, saved with ``save_pretrained`` so that they load through the same ``from_pretrained``
path a user's checkpoint takes. An SDXL-format pipeline adds a second text encoder with a projection
(``text_encoder_2``, whose pooled embedding the UNet's ``text_time`` conditioning takes) and its tokenizer.
:data:`SD15` holds Stable Diffusion 1.5's published component configs (random weights cost the same compute as
real ones).
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

__all__ = ["SD15", "TINY", "Architecture", "build_components", "save_pipeline"]


@dataclass(frozen=True)
class Architecture:
    """The configs of a pipeline's components, as their diffusers / transformers constructors take them.

    ``text_encoder`` is a ``CLIPTextConfig``'s keyword arguments less the token ids, which come from the
    tokenizer; ``scheduler`` a ``DDPMScheduler``'s. ``text_encoder_2`` (SDXL format: a
    ``CLIPTextModelWithProjection``'s ``CLIPTextConfig``, with its ``projection_dim``) makes the pipeline an
    SDXL one; None, a Stable Diffusion 1.x/2.x one.
    """

    unet: dict[str, Any]
    vae: dict[str, Any]
    text_encoder: dict[str, Any]
    scheduler: dict[str, Any] = field(default_factory=lambda: dict(_SD_SCHEDULER))
    text_encoder_2: dict[str, Any] | None = None


_SD_SCHEDULER: dict[str, Any] = {
    "num_train_timesteps": 1000, "beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012,
    "prediction_type": "epsilon", "clip_sample": False, "steps_offset": 1,
}

#: Stable Diffusion 1.5's component configs (its published ``config.json`` files).
SD15 = Architecture(
    unet={
        "sample_size": 64, "in_channels": 4, "out_channels": 4, "layers_per_block": 2,
        "block_out_channels": (320, 640, 1280, 1280),
        "down_block_types": ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        "cross_attention_dim": 768, "attention_head_dim": 8, "norm_num_groups": 32,
    },
    vae={
        "in_channels": 3, "out_channels": 3, "latent_channels": 4, "layers_per_block": 2, "sample_size": 512,
        "block_out_channels": (128, 256, 512, 512), "down_block_types": ("DownEncoderBlock2D",) * 4,
        "up_block_types": ("UpDecoderBlock2D",) * 4, "norm_num_groups": 32, "scaling_factor": 0.18215,
    },
    text_encoder={
        "vocab_size": 49408, "hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12,
        "num_attention_heads": 12, "max_position_embeddings": 77, "hidden_act": "quick_gelu", "projection_dim": 768,
    },
)


#: Stable Diffusion's layout at a tiny size (32x32 images, 8x8x4 latents): the tests' model and the GPU script's dry
#: run. Its text encoder's ``vocab_size`` comes from the tokenizer it is built with.
TINY = Architecture(
    unet={"sample_size": 8, "in_channels": 4, "out_channels": 4, "layers_per_block": 1,
          "block_out_channels": (16, 32), "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D"),
          "up_block_types": ("CrossAttnUpBlock2D", "UpBlock2D"), "cross_attention_dim": 32,
          "attention_head_dim": 4, "norm_num_groups": 8},
    vae={"in_channels": 3, "out_channels": 3, "latent_channels": 4, "block_out_channels": (8, 16, 16),
         "down_block_types": ("DownEncoderBlock2D",) * 3, "up_block_types": ("UpDecoderBlock2D",) * 3,
         "layers_per_block": 1, "norm_num_groups": 8, "sample_size": 32},
    text_encoder={"hidden_size": 32, "intermediate_size": 37, "num_hidden_layers": 2, "num_attention_heads": 4,
                  "max_position_embeddings": 16},
)

def build_components(arch: Architecture, tokenizer: Any, seed: int = 0,
                     device: torch.device | str = "cpu", tokenizer_2: Any = None) -> dict[str, Any]:
    """Randomly initialised components of ``arch``, on the CPU, ready for :func:`save_pipeline` or training.

    Args:
        arch: the component configs.
        tokenizer: a ``CLIPTokenizer``; the text encoder takes its special-token ids.
        seed: seeds the initial weights (the same seed gives the same weights).
        device: where the weights are initialised (a GPU initialises a billion weights much faster); the
            components are returned on the CPU.
        tokenizer_2: SDXL format only: the second text encoder's tokenizer (None: ``tokenizer``).

    Returns:
        ``{"vae", "text_encoder", "tokenizer", "unet", "scheduler"}``, plus ``"text_encoder_2"`` and
        ``"tokenizer_2"`` when ``arch.text_encoder_2`` is set.
    """
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    device = torch.device(device)
    # Modules initialise from the global generator of their device: seed that one inside a fork, so the caller's
    # random state (every other generator's too) is kept.
    cuda = device.type == "cuda"
    index = (device.index if device.index is not None else torch.cuda.current_device()) if cuda else None
    with torch.random.fork_rng(devices=[index] if cuda else []), device:
        torch.default_generator.manual_seed(seed)
        if cuda:
            with torch.cuda.device(index):
                torch.cuda.manual_seed(seed)
        unet = UNet2DConditionModel(**arch.unet)
        vae = AutoencoderKL(**arch.vae)
        text_encoder = CLIPTextModel(_clip_config(arch.text_encoder, tokenizer))
        if arch.text_encoder_2 is not None:
            tokenizer_2 = tokenizer_2 if tokenizer_2 is not None else tokenizer
            text_encoder_2 = CLIPTextModelWithProjection(_clip_config(arch.text_encoder_2, tokenizer_2))
    components = {"vae": vae.cpu(), "text_encoder": text_encoder.cpu(), "tokenizer": tokenizer, "unet": unet.cpu(),
                  "scheduler": DDPMScheduler(**arch.scheduler)}
    if arch.text_encoder_2 is not None:
        components |= {"text_encoder_2": text_encoder_2.cpu(), "tokenizer_2": tokenizer_2}
    return components


def _clip_config(config: dict[str, Any], tokenizer: Any) -> Any:
    """A ``CLIPTextConfig`` of ``config`` with ``tokenizer``'s special-token ids."""
    from transformers import CLIPTextConfig

    return CLIPTextConfig(**config, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                          pad_token_id=tokenizer.pad_token_id)


def save_pipeline(folder: str | Path, components: dict[str, Any], dtype: torch.dtype | None = None) -> Path:
    """Save ``components`` as a Stable Diffusion pipeline folder in diffusers format (safetensors).

    Args:
        folder: replaced if it exists.
        components: ``vae``, ``text_encoder``, ``tokenizer``, ``unet``, ``scheduler`` (any diffusers scheduler);
            with ``text_encoder_2`` and ``tokenizer_2`` too, an SDXL pipeline (``StableDiffusionXLPipeline``, its
            empty prompt embedded as zeros, as SDXL base's is).
        dtype: cast the weights before saving (e.g. float16 to halve a shipped model's size); None keeps them.

    Returns:
        ``folder`` as a Path.
    """
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    if "text_encoder_2" in components:
        pipe = StableDiffusionXLPipeline(**components, add_watermarker=False)
    else:
        pipe = StableDiffusionPipeline(**components, safety_checker=None, feature_extractor=None,
                                       requires_safety_checker=False)
    if dtype is not None:
        pipe = pipe.to(dtype=dtype)
    folder = Path(folder)
    if folder.exists():
        shutil.rmtree(folder)
    pipe.save_pretrained(folder, safe_serialization=True)
    return folder
