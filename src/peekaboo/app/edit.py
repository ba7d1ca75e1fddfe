"""Use a mask: regenerate the segmented region from a new prompt, and sample images to segment (text to RGBA).

Both run diffusers' own pipelines (``StableDiffusionInpaintPipeline``, ``StableDiffusionPipeline``, or their SDXL
counterparts for an SDXL-format model) assembled around the components a
:class:`~peekaboo.diffusion.backbone.Backbone` already holds, so the weights are loaded once per process and shared
with the segmentation. Only the scheduler is new: a ``DDIMScheduler`` built from the model folder's scheduler
config (a small JSON file, not weights).

Editing works on the same square canvas as the segmentation (:func:`peekaboo.utils.images.fit_square`, at the
model's native resolution) and maps the result back to the original image. A UNet with 9 input channels (a
dedicated inpainting checkpoint) is conditioned on the mask by the pipeline; a plain 4-channel text-to-image
UNet is handled by the same pipeline with masked latent blending (after every denoising step the latents
outside the mask are replaced by the input's latents, noised to the next timestep). Either way the VAE
round trip alters every pixel a little, so the untouched original pixels are composited back outside the
(dilated, feathered) mask: those pixels are exactly the input's.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from peekaboo.config import EditConfig, ImageConfig, ModelConfig, SamplingConfig, TrainerConfig
from peekaboo.diffusion.backbone import Backbone
from peekaboo.diffusion.checks import check_model_source, offline
from peekaboo.errors import ConfigError, ModelError
from peekaboo.utils import images

log = logging.getLogger(__name__)

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


@dataclass(frozen=True)
class EditResult:
    """An edited image and where it was allowed to change.

    Attributes:
        image: the edited RGB image, original size.
        region: ``(H, W)`` bool, the segmentation mask dilated by ``edit.dilation`` (and clipped to the part
            of the image the canvas shows); every pixel outside it equals the input exactly.
        weight: ``(H, W)`` float32 in [0, 1], how much of the regenerated pixel each output pixel holds
            (0 outside ``region``, ramping up to 0.95 over ``edit.feather`` pixels inside it).
    """

    image: Image.Image
    region: np.ndarray
    weight: np.ndarray


# -- pipelines ------------------------------------------------------------------------------------------------
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
        with _quiet_vae_upcast():
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
def _autocast(device: torch.device, precision: str) -> Iterator[None]:
    """Sample in the mixed precision the segmentation uses (``trainer.precision``) on GPUs; CPUs stay fp32."""
    if device.type == "cuda" and precision == "bf16-mixed":
        with torch.autocast("cuda", dtype=torch.bfloat16):
            yield
    else:
        yield


@contextlib.contextmanager
def _quiet_vae_upcast() -> Iterator[None]:
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
    levels = len(backbone.unet.config.block_out_channels) - 1  # the UNet halves the latents this many times
    multiple = int(np.lcm(_PIPELINE_MULTIPLE, backbone.vae_scale_factor * 2**levels))
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
    with _autocast(backbone.device, precision), _quiet_vae_upcast():
        out = pipe(
            prompt, height=size, width=size, num_inference_steps=sampling.steps,
            guidance_scale=sampling.guidance_scale, generator=torch.Generator().manual_seed(sampling.seed),
            output_type="pil",
        )
    return out.images[0].convert("RGB")


# -- masks ----------------------------------------------------------------------------------------------------
def _disc(radius: int) -> torch.Tensor:
    """``(2r+1, 2r+1)`` float kernel: 1 on the pixels within Euclidean distance ``radius`` of the centre."""
    offsets = torch.arange(-radius, radius + 1)
    yy, xx = torch.meshgrid(offsets, offsets, indexing="ij")
    return (yy**2 + xx**2 <= radius**2).float()


def dilate(mask: torch.Tensor, radius: int) -> torch.Tensor:
    """Grow a binary mask by ``radius`` pixels (a Euclidean disc).

    Args:
        mask: ``(H, W)`` bool.

    Returns:
        ``(H, W)`` bool: pixels within ``radius`` of a mask pixel.
    """
    if radius <= 0:
        return mask.clone()
    kernel = _disc(radius)[None, None]
    hits = F.conv2d(mask.float()[None, None], kernel, padding=radius)[0, 0]  # counts of mask pixels nearby
    return hits > 0.5


def gaussian_blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of ``x`` ``(H, W)``; the border is replicated, so the image frame does not count
    as "outside" the mask (an object touching the frame is not feathered against it)."""
    radius = max(1, int(np.ceil(3 * sigma)))
    t = torch.arange(-radius, radius + 1, dtype=torch.float32)
    k = torch.exp(-0.5 * (t / sigma) ** 2)
    k = k / k.sum()
    y = F.pad(x[None, None].float(), (radius, radius, radius, radius), mode="replicate")
    y = F.conv2d(y, k.view(1, 1, 1, -1))
    y = F.conv2d(y, k.view(1, 1, -1, 1))
    return y[0, 0]


def blend_weights(mask: torch.Tensor, dilation: int, feather: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Where an edit may change pixels, and by how much.

    The region is ``mask`` dilated by ``dilation`` pixels. The feathering stays INSIDE it, so every pixel
    outside the region keeps its value exactly: the weight is ``2 * blur(region) - 1`` clipped to [0, 1], with
    a Gaussian blur of sigma ``feather / 2``. Along a straight edge that is ``erf(d / (sigma sqrt 2))`` of the
    distance ``d`` from the region's border: 0 at the border, 0.68 at ``feather / 2`` pixels inside and 0.95
    at ``feather`` pixels inside. With ``feather <= dilation`` the segmented object itself (``dilation``
    pixels inside the border) is replaced almost completely, so no faint outline of it survives.

    Args:
        mask: ``(H, W)`` bool, the binary segmentation mask.
        dilation: pixels to grow the mask by.
        feather: width in pixels of the ramp from 0 to 0.95 inside the region's border; 0 = a hard edge.

    Returns:
        ``(region (H, W) bool, weight (H, W) float32 in [0, 1], 0 outside region)``.
    """
    region = dilate(mask, dilation)
    if feather <= 0:
        return region, region.float()
    weight = (2.0 * gaussian_blur(region.float(), feather / 2.0) - 1.0).clamp(0.0, 1.0)
    return region, torch.where(region, weight, torch.zeros_like(weight))


def canvas_region(region: torch.Tensor, placement: images.Placement, size: int, cell: int) -> torch.Tensor:
    """The square-canvas pixels to regenerate: any canvas pixel that shows part of ``region``, grown to whole
    latent cells.

    The 4-channel inpainting path blends latents, and diffusers samples the pixel mask down to the latent grid
    with nearest-neighbour interpolation (one pixel per cell); a cell only partly covered could then keep the
    input's latents and bring an edge of the old object back. Covering whole cells avoids that.

    Args:
        region: ``(H, W)`` bool on the original image.
        placement: how the canvas sits on the original image (:func:`peekaboo.utils.images.fit_square`).
        size: canvas side ``S`` (a multiple of ``cell``).
        cell: pixels per latent cell (the VAE's downsampling factor).

    Returns:
        ``(S, S)`` bool.
    """
    left, top, right, bottom = placement.box
    shown = torch.zeros(bottom - top, right - left)  # the part of the original frame the canvas shows
    y0, x0 = max(top, 0), max(left, 0)
    y1, x1 = min(bottom, placement.height), min(right, placement.width)
    shown[y0 - top : y1 - top, x0 - left : x1 - left] = region[y0:y1, x0:x1].float()
    # Adaptive max pooling marks a canvas pixel when any original pixel it covers is in the region, both when
    # the canvas is smaller than the image and when it is larger.
    on_canvas = F.adaptive_max_pool2d(shown[None, None], (size, size))
    cells = F.max_pool2d(on_canvas, kernel_size=cell, stride=cell)
    return F.interpolate(cells, scale_factor=cell, mode="nearest")[0, 0] > 0.5


def unfit_image(canvas: torch.Tensor, placement: images.Placement) -> torch.Tensor:
    """Map a canvas image back onto the original frame (the image counterpart of :func:`peekaboo.utils.images.unfit`).

    Args:
        canvas: ``(3, S, S)`` in [0, 1].

    Returns:
        ``(3, H, W)`` in [0, 1]; 0 where the canvas did not show the image (outside a centre crop).
    """
    return torch.stack([images.unfit(channel, placement) for channel in canvas])


# -- editing --------------------------------------------------------------------------------------------------
def edit_region(
    backbone: Backbone,
    img: Image.Image,
    mask: np.ndarray,
    prompt: str,
    edit_cfg: EditConfig,
    sampling: SamplingConfig,
    model_cfg: ModelConfig,
    fit: str = ImageConfig.fit,
    precision: str = TrainerConfig.precision,
) -> EditResult:
    """Regenerate the masked region of ``img`` from ``prompt``; every pixel outside the dilated mask is kept.

    Args:
        img: the original RGB image.
        mask: ``(H, W)`` bool, the binary segmentation mask at the original size (``mask.png``).
        prompt: what to put there, e.g. ``"a blue square"``.
        edit_cfg: ``strength`` (1: regenerate from pure noise), ``dilation`` and ``feather`` (pixels of ``img``).
        sampling: steps, guidance scale and seed; the canvas is the model's native resolution.
        fit: ``image_options.fit``, the same canvas mapping the segmentation used.
        precision: ``trainer.precision``; mixed precision applies on GPUs only.

    Returns:
        The edited image (original size) with the region and blend weight used.
    """
    original = np.asarray(img, dtype=np.uint8)  # (H, W, 3)
    size = backbone.native_resolution
    canvas, placement = images.fit_square(img, size, fit)  # (3, S, S)
    # Pixels the canvas does not show (outside a centre crop) cannot be regenerated: keep them.
    visible = images.unfit(torch.ones(size, size), placement) > 0.5
    region, weight = blend_weights(torch.from_numpy(mask).bool() & visible, edit_cfg.dilation, edit_cfg.feather)
    if not bool(region.any()):
        log.warning("The mask for the edit %r is empty, so the image is left unchanged.", prompt)
        return EditResult(img.copy(), region.numpy(), weight.numpy())
    pipe = inpaint_pipeline(backbone, model_cfg)
    target = canvas_region(region, placement, size, backbone.vae_scale_factor)  # (S, S)
    with _autocast(backbone.device, precision), _quiet_vae_upcast():
        out = pipe(
            prompt=prompt,
            image=Image.fromarray(images.quantize(canvas.permute(1, 2, 0))),
            mask_image=Image.fromarray((target.numpy() * 255).astype(np.uint8), "L"),
            height=size, width=size, strength=edit_cfg.strength, num_inference_steps=sampling.steps,
            guidance_scale=sampling.guidance_scale, generator=torch.Generator().manual_seed(sampling.seed),
            output_type="pt",
        )
    regenerated = unfit_image(out.images[0].float().cpu().clamp(0, 1), placement)  # (3, H, W)
    w = weight.numpy()[..., None]  # (H, W, 1)
    blend = original / 255.0 + w * (regenerated.permute(1, 2, 0).numpy() - original / 255.0)
    edited = np.clip(np.rint(blend * 255.0), 0, 255).astype(np.uint8)
    # The float round trip above already gives the input where w == 0; copying makes "exactly" unconditional.
    edited = np.where(w > 0, edited, original)
    return EditResult(Image.fromarray(edited, "RGB"), region.numpy(), weight.numpy())


def compare_strip(img: Image.Image, weight: np.ndarray, edited: Image.Image) -> Image.Image:
    """``input | mask | edited`` side by side; the middle panel is the blend weight (white = regenerated).

    Args:
        weight: ``(H, W)`` in [0, 1].
    """
    mask_rgb = Image.fromarray(images.quantize(torch.from_numpy(weight)), "L").convert("RGB")
    panels = [img.convert("RGB"), mask_rgb, edited.convert("RGB")]
    strip = Image.new("RGB", (sum(p.width for p in panels), img.height))
    x = 0
    for panel in panels:
        strip.paste(panel, (x, 0))
        x += panel.width
    return strip
