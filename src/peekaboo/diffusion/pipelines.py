"""Diffusers' own pipelines around a :class:`~peekaboo.diffusion.backbone.Backbone`: text-to-image and inpainting
(``StableDiffusionPipeline``, ``StableDiffusionInpaintPipeline``, or their SDXL counterparts for an SDXL-format
model), assembled from the components the backbone already holds, so the weights are loaded once per process
and shared with the segmentation. Only the scheduler is new: a ``DDIMScheduler`` built from the model folder's
scheduler config (a small JSON file, not weights).
"""

from __future__ import annotations

import contextlib
import copy
import logging
import warnings
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from PIL import Image

from peekaboo.config import PRECISIONS, ModelConfig, SamplingConfig, TrainerConfig
from peekaboo.diffusion.backbone import Backbone
from peekaboo.diffusion.checks import check_model_source, offline
from peekaboo.errors import ConfigError, ModelError

# UNet input channels diffusers' inpainting pipeline accepts: latents only (4), or latents + mask + masked
# image latents (9, a dedicated inpainting checkpoint).
TEXT_TO_IMAGE_CHANNELS = 4
INPAINT_CHANNELS = 9
# Diffusers' Stable Diffusion pipelines refuse sides that are not multiples of 8, whatever the VAE.
_PIPELINE_MULTIPLE = 8

_SCHEDULER_CONFIGS: dict[tuple, dict[str, Any]] = {}
# What diffusers' SDXL pipelines say each time they upcast their float16 VAE themselves: a notice on every cast of
# the VAE and a deprecation of the method they call. Expected here (their VAE is a float16 copy), not actionable.
_UPCAST_NOTICE = "should be kept in float32"
_UPCAST_DEPRECATION = r"`upcast_vae` is deprecated"


def load_scheduler(model_cfg: ModelConfig) -> Any:
    """A ``DDIMScheduler`` from the model's scheduler config (cached per model source).

    DDIM samples well in few steps and its constructor accepts every Stable-Diffusion scheduler config (PNDM,
    DDPM, ...), keeping the betas, timestep spacing and prediction type.

    Raises:
        ModelError: the scheduler config cannot be read.
    """
    from diffusers import DDIMScheduler

    name = check_model_source(model_cfg)
    key = (name, model_cfg.revision, offline(model_cfg))
    if key not in _SCHEDULER_CONFIGS:
        try:
            _SCHEDULER_CONFIGS[key] = dict(DDIMScheduler.load_config(
                name, subfolder="scheduler", revision=model_cfg.revision, local_files_only=offline(model_cfg)))
        except (OSError, ValueError) as err:
            raise ModelError(
                f"Could not read the scheduler config of model.pretrained={model_cfg.pretrained} ({err}); "
                "the folder needs scheduler/scheduler_config.json."
            ) from None
    return DDIMScheduler.from_config(_SCHEDULER_CONFIGS[key])


def _components(backbone: Backbone, model_cfg: ModelConfig) -> dict[str, Any]:
    """The pipeline constructor arguments: the backbone's frozen modules, a fresh scheduler, no safety checker
    (SDXL format: both text encoders, no watermarker)."""
    common = {"vae": backbone.vae, "unet": backbone.unet, "text_encoder": backbone.text_encoder,
              "tokenizer": backbone.tokenizer, "scheduler": load_scheduler(model_cfg)}
    if not backbone.sdxl:
        return {**common, "safety_checker": None, "feature_extractor": None, "requires_safety_checker": False}
    vae = backbone.vae
    if vae.dtype != backbone.dtype:
        # A float32 VAE beside a float16 UNet (an upcast SDXL VAE): diffusers' SDXL pipelines expect a float16 VAE
        # and upcast it themselves (casting it back afterwards), so they get a float16 copy and the backbone's own
        # VAE is never cast.
        with quiet_vae_upcast():
            vae = copy.deepcopy(vae).to(backbone.dtype)
    return {**common, "vae": vae, "text_encoder_2": backbone.text_encoder_2, "tokenizer_2": backbone.tokenizer_2,
            "force_zeros_for_empty_prompt": backbone.zero_empty_prompt, "add_watermarker": False}


def text_to_image_pipeline(backbone: Backbone, model_cfg: ModelConfig) -> Any:
    """A ``StableDiffusionPipeline`` (``StableDiffusionXLPipeline`` for an SDXL-format model) sharing the
    backbone's weights (nothing is loaded; only an upcast SDXL VAE is copied, :func:`_components`)."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    pipeline = StableDiffusionXLPipeline if backbone.sdxl else StableDiffusionPipeline
    pipe = pipeline(**_components(backbone, model_cfg))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def inpaint_pipeline(backbone: Backbone, model_cfg: ModelConfig) -> Any:
    """A ``StableDiffusionInpaintPipeline`` (``StableDiffusionXLInpaintPipeline`` for an SDXL-format model) sharing
    the backbone's weights.

    Raises:
        ModelError: the UNet has neither 4 (text-to-image) nor 9 (inpainting) input channels.
    """
    from diffusers import StableDiffusionInpaintPipeline, StableDiffusionXLInpaintPipeline

    channels = backbone.unet.config.in_channels
    if channels not in (TEXT_TO_IMAGE_CHANNELS, INPAINT_CHANNELS):
        raise ModelError(
            f"model.pretrained={model_cfg.pretrained} has a UNet with {channels} input channels; editing needs a "
            f"text-to-image ({TEXT_TO_IMAGE_CHANNELS}) or inpainting ({INPAINT_CHANNELS}) Stable Diffusion UNet."
        )
    if backbone.sdxl:  # SDXL base's time ids: the target size, no aesthetic score (the refiner's)
        pipe = StableDiffusionXLInpaintPipeline(**_components(backbone, model_cfg), requires_aesthetics_score=False)
    else:
        pipe = StableDiffusionInpaintPipeline(**_components(backbone, model_cfg))
    pipe.set_progress_bar_config(disable=True)
    return pipe


@contextlib.contextmanager
def sampling_autocast(device: torch.device, precision: str) -> Iterator[None]:
    """Sample in the mixed precision the segmentation uses (``trainer.precision``, one of
    :data:`~peekaboo.config.PRECISIONS`) on GPUs; CPUs stay fp32."""
    if precision not in PRECISIONS:
        raise ConfigError(f"precision={precision!r} is not one of {', '.join(PRECISIONS)}; pass one of those.")
    if device.type == "cuda" and precision == "bf16-mixed":
        with torch.autocast("cuda", dtype=torch.bfloat16):
            yield
    else:
        yield


@contextlib.contextmanager
def quiet_vae_upcast() -> Iterator[None]:
    """Leave out the notices of diffusers' own VAE upcast inside the block; every other warning still shows."""
    cast_log = logging.getLogger("diffusers.models.modeling_utils")

    def keep(record: logging.LogRecord) -> bool:
        return _UPCAST_NOTICE not in record.getMessage()

    cast_log.addFilter(keep)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=_UPCAST_DEPRECATION, category=FutureWarning)
            yield
    finally:
        cast_log.removeFilter(keep)


def check_sample_size(size: int, backbone: Backbone) -> None:
    """Raise :class:`ConfigError` unless ``size`` is a side the pipeline and the UNet can both sample."""
    multiple = int(np.lcm(_PIPELINE_MULTIPLE, backbone.latent_multiple))
    if size < multiple or size % multiple:
        raise ConfigError(
            f"sampling.size={size} does not suit this model; use a multiple of {multiple} "
            f"(or null for its native {backbone.native_resolution})."
        )


def generate(
    backbone: Backbone, prompt: str, sampling: SamplingConfig, model_cfg: ModelConfig,
    precision: str = TrainerConfig.precision,
) -> Image.Image:
    """Sample one square image for ``prompt`` with diffusers' text-to-image pipeline.

    Args:
        sampling: steps, classifier-free guidance scale, seed (a CPU ``torch.Generator``, so a seed gives the
            same image on any device) and side (``None``: the model's native resolution).
        precision: ``trainer.precision``; mixed precision applies on GPUs only.

    Returns:
        An RGB image of ``sampling.size`` (or native) pixels square.

    Raises:
        ConfigError: ``sampling.size`` is not a side the model can sample.
    """
    size = sampling.size or backbone.native_resolution
    check_sample_size(size, backbone)
    pipe = text_to_image_pipeline(backbone, model_cfg)
    with sampling_autocast(backbone.device, precision), quiet_vae_upcast():
        out = pipe(
            prompt, height=size, width=size, num_inference_steps=sampling.steps,
            guidance_scale=sampling.guidance_scale, generator=torch.Generator().manual_seed(sampling.seed),
            output_type="pil",
        )
    return out.images[0].convert("RGB")
