"""How a mask is shown: the image with the mask's outline over a dimmed outside, and the RGBA cutout."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

# Overlay: how much of its brightness and colour the image keeps outside the mask (dimmed and desaturated, so
# the mask reads at a glance whatever the object's colour), and the outline colours it picks from.
OVERLAY_OUTSIDE_BRIGHTNESS = 0.45
OVERLAY_OUTSIDE_SATURATION = 0.25
OUTLINE_COLOURS: tuple[tuple[int, int, int], ...] = ((255, 0, 255), (0, 255, 255), (255, 255, 0), (0, 255, 0),
                                                     (255, 255, 255), (0, 0, 0))
# Outline width in pixels per this many pixels of the image's shorter side (at least 1 pixel).
OUTLINE_PER_SIDE = 256


def overlay(img: Image.Image, mask: np.ndarray) -> Image.Image:
    """The image with ``mask`` ``(H, W)`` bool shown: pixels inside unchanged, pixels outside dimmed and
    desaturated, and the mask's outline drawn in the palette colour farthest from the pixels it runs over (a
    red object gets no red outline). Drawn with torchvision's ``draw_segmentation_masks``."""
    from torchvision.utils import draw_segmentation_masks

    rgb = torch.from_numpy(np.array(img.convert("RGB"), dtype=np.uint8)).permute(2, 0, 1)  # (3, H, W) uint8
    inside = torch.from_numpy(np.ascontiguousarray(mask, dtype=bool))  # (H, W)
    x = rgb.float()
    grey = x.mean(0, keepdim=True)  # (1, H, W)
    faded = OVERLAY_OUTSIDE_BRIGHTNESS * (grey + OVERLAY_OUTSIDE_SATURATION * (x - grey))
    out = torch.where(inside, x, faded).round().clamp(0, 255).to(torch.uint8)  # (3, H, W)
    width = max(1, min(mask.shape) // OUTLINE_PER_SIDE)
    edge = mask_outline(mask, width)
    if edge.any():
        under = rgb[:, torch.from_numpy(edge)].float().mean(1)  # (3,) mean colour the outline covers
        palette = torch.tensor(OUTLINE_COLOURS, dtype=torch.float32)  # (K, 3)
        colour = OUTLINE_COLOURS[int((palette - under).norm(dim=1).argmax())]
        out = draw_segmentation_masks(out, torch.from_numpy(edge)[None], alpha=1.0, colors=[colour])
    return Image.fromarray(out.permute(1, 2, 0).numpy())


def mask_outline(mask: np.ndarray, width: int = 1) -> np.ndarray:
    """The ``(H, W)`` bool band of ``mask`` within ``width`` pixels of its border (4-neighbour erosion)."""
    core = mask.astype(bool)
    for _ in range(width):
        core = _erode(core)
    return mask.astype(bool) & ~core


def _erode(mask: np.ndarray) -> np.ndarray:
    m = np.pad(mask, 1, mode="edge")
    return m[1:-1, 1:-1] & m[:-2, 1:-1] & m[2:, 1:-1] & m[1:-1, :-2] & m[1:-1, 2:]


def cutout(img: Image.Image, alpha_u8: np.ndarray) -> Image.Image:
    """RGBA image whose alpha channel is the soft mask."""
    rgba = np.dstack([np.asarray(img, dtype=np.uint8), alpha_u8])
    return Image.fromarray(rgba, "RGBA")
