"""Use a mask: regenerate the segmented region from a new prompt.

Editing runs diffusers' inpainting pipeline around the backbone's components (:mod:`peekaboo.diffusion.pipelines`)
on the same square canvas as the segmentation (:func:`peekaboo.utils.images.fit_square`, at the model's native
resolution) and maps the result back to the original image. A UNet with 9 input channels (a dedicated inpainting
checkpoint) is conditioned on the mask by the pipeline; a plain 4-channel text-to-image UNet is handled by the same
pipeline with masked latent blending (after every denoising step the latents outside the mask are replaced by the
input's latents, noised to the next timestep). Either way the VAE round trip alters every pixel a little, so the
untouched original pixels are composited back outside the (dilated, feathered) mask
(:func:`peekaboo.ops.blend_weights`): those pixels are exactly the input's.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from peekaboo import ops
from peekaboo.config import EditConfig, ImageConfig, ModelConfig, SamplingConfig, TrainerConfig
from peekaboo.diffusion.backbone import Backbone
from peekaboo.diffusion.pipelines import inpaint_pipeline, quiet_vae_upcast, sampling_autocast
from peekaboo.utils import images

log = logging.getLogger(__name__)


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
    region, weight = ops.blend_weights(torch.from_numpy(mask).bool() & visible, edit_cfg.dilation, edit_cfg.feather)
    if not bool(region.any()):
        log.warning("The mask for the edit %r is empty, so the image is left unchanged.", prompt)
        return EditResult(img.copy(), region.numpy(), weight.numpy())
    pipe = inpaint_pipeline(backbone, model_cfg)
    target = images.canvas_region(region, placement, size, backbone.vae_scale_factor)  # (S, S)
    with sampling_autocast(backbone.device, precision), quiet_vae_upcast():
        out = pipe(
            prompt=prompt,
            image=Image.fromarray(images.quantize(canvas.permute(1, 2, 0))),
            mask_image=Image.fromarray((target.numpy() * 255).astype(np.uint8), "L"),
            height=size, width=size, strength=edit_cfg.strength, num_inference_steps=sampling.steps,
            guidance_scale=sampling.guidance_scale, generator=torch.Generator().manual_seed(sampling.seed),
            output_type="pt",
        )
    regenerated = images.unfit_image(out.images[0].float().cpu().clamp(0, 1), placement)  # (3, H, W)
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
