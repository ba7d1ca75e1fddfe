"""Images in and masks out: loading any image as upright RGB, fitting it to the square working canvas, and mapping
masks back to the original pixels (:class:`FinalMask`).

An image a user cannot use surfaces as one :class:`~peekaboo.errors.ImageError` naming the file.
"""

from __future__ import annotations

import os
import re
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps, UnidentifiedImageError

from peekaboo.errors import ImageError

MIN_SIDE = 2  # a 1x1 image has no content to segment
# Pixels an image may claim before it is refused from its header (image_options.max_pixels): Pillow's own
# decompression-bomb limit, twice its warning threshold.
DEFAULT_MAX_PIXELS = 178_956_970
# Images with a side above this many canvas sides are first box-filtered by Pillow (8-bit, in C) down to it,
# so a 100-megapixel photo never becomes a float tensor; the final antialiased resize still averages several
# source pixels per canvas pixel.
PREREDUCE_FACTOR = 4


def load_image(path: str | os.PathLike, flatten_background: tuple[float, float, float] = (0.5, 0.5, 0.5),
               max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Load ``path`` as an upright 8-bit RGB image.

    EXIF orientation is applied; grayscale, palette, 16-bit and CMYK images are converted; images with
    transparency are flattened over ``flatten_background`` (RGB in [0, 1]).

    Raises:
        ImageError: missing, empty, truncated, unreadable or non-image file, too small, or more than
            ``max_pixels`` pixels (a decompression bomb is refused from its header, before decoding).
    """
    path = Path(path)
    if path.is_dir():
        raise ImageError(f"Image {path} is a folder, not an image file; pass the path of the image itself.")
    if not path.is_file():
        raise ImageError(f"Image {path} does not exist; check the path.")
    if path.stat().st_size == 0:
        raise ImageError(f"Image {path} is an empty (zero-byte) file; replace it with a valid image.")
    try:
        with warnings.catch_warnings():
            # Pillow only warns between max_pixels and twice that; both mean: refuse before decoding.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            previous, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, max_pixels
            try:
                with Image.open(path) as img:
                    img.load()
                    img = ImageOps.exif_transpose(img)
                    rgb = to_rgb(img, flatten_background)
            finally:
                Image.MAX_IMAGE_PIXELS = previous
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        claimed = re.search(r"\((\d+) pixels\)", str(err))
        size = f" claims {int(claimed.group(1)):,} pixels," if claimed else " has"
        raise ImageError(
            f"Image {path}{size} more than image_options.max_pixels={max_pixels:,} (a possible decompression "
            "bomb); raise that limit if the image is genuine."
        ) from None
    except UnidentifiedImageError:
        raise ImageError(f"Image {path} is not an image file Pillow can read; convert it to PNG or JPEG.") from None
    except PermissionError:
        raise ImageError(f"Image {path} cannot be read (permission denied); check the file's permissions.") from None
    except MemoryError:
        raise ImageError(f"Image {path} is too large to decode in memory; downscale it or lower "
                         "image_options.max_pixels to refuse such files.") from None
    except (OSError, SyntaxError, ValueError) as err:
        raise ImageError(f"Image {path} is truncated or corrupt ({err}); re-export or replace it.") from None
    except Exception as err:
        # Pillow's decoders raise assorted exceptions on malformed data (TypeError, struct.error, KeyError, ...);
        # an untrusted file must never become a traceback.
        raise ImageError(f"Image {path} is corrupt ({type(err).__name__}: {err}); re-export or replace it.") from None
    if min(rgb.size) < MIN_SIDE:
        raise ImageError(f"Image {path} is only {rgb.width}x{rgb.height} pixels; Peekaboo needs at least 2x2.")
    return rgb


def to_rgb(img: Image.Image, flatten_background: tuple[float, float, float] = (0.5, 0.5, 0.5)) -> Image.Image:
    """Convert any Pillow mode to 8-bit RGB, flattening transparency over ``flatten_background``."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        arr = np.asarray(img, dtype=np.float64)
        hi = 65535.0 if img.mode.startswith("I;16") or arr.max() > 255 else 255.0
        img = Image.fromarray(np.clip(arr / hi * 255.0 + 0.5, 0, 255).astype(np.uint8), "L")
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA") or img.mode.endswith("a"):
        rgba = img.convert("RGBA")
        bg = Image.new("RGBA", rgba.size, (*tuple(round(255 * c) for c in flatten_background), 255))
        return Image.alpha_composite(bg, rgba).convert("RGB")
    return img.convert("RGB")


def image_to_tensor(img: Image.Image) -> torch.Tensor:
    """``(3, H, W)`` float32 in [0, 1]."""
    return torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1).float() / 255.0


@dataclass(frozen=True)
class Placement:
    """Where the square working canvas sits relative to the original image.

    ``box = (left, top, right, bottom)`` is the region of the original image (in original pixels, possibly
    extending beyond it when padding) that the canvas shows.
    """

    width: int
    height: int
    box: tuple[int, int, int, int]


def fit_square(img: Image.Image, size: int, mode: str) -> tuple[torch.Tensor, Placement]:
    """Fit ``img`` to a ``size x size`` canvas.

    Images much larger than the canvas (a side above ``PREREDUCE_FACTOR * size``) are box-filtered by Pillow
    first, so memory and time stay bounded for any image that passes ``image_options.max_pixels``. The
    placement is always in original pixels; for ``"pad"`` the pre-reduction may shift the canvas by at most
    ``1 / PREREDUCE_FACTOR`` of a canvas pixel.

    Args:
        mode: ``"scale"`` stretches the whole image; ``"crop"`` takes the centred square (the mask is 0
            outside it); ``"pad"`` centres the image on a square of edge-replicated padding.

    Returns:
        ``(canvas (3, size, size) in [0, 1], placement)``.
    """
    w, h = img.size
    if mode == "scale":
        box = (0, 0, w, h)
        x = image_to_tensor(_shrink(img, box, size))[None]  # (1, 3, H', W')
    elif mode == "crop":
        side = min(w, h)
        left, top = (w - side) // 2, (h - side) // 2
        box = (left, top, left + side, top + side)
        x = image_to_tensor(_shrink(img, box, size))[None]
    elif mode == "pad":
        side = max(w, h)
        left, top = (side - w) // 2, (side - h) // 2
        box = (-left, -top, side - left, side - top)
        x = image_to_tensor(_shrink(img, (0, 0, w, h), size))[None]
        sw, sh = x.shape[-1], x.shape[-2]  # == (w, h) unless the image was pre-reduced
        s_side = max(sw, sh)
        s_left, s_top = (s_side - sw) // 2, (s_side - sh) // 2
        x = F.pad(x, (s_left, s_side - sw - s_left, s_top, s_side - sh - s_top), mode="replicate")
    else:
        raise ValueError(f"unknown fit mode {mode!r}")
    canvas = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return canvas[0].clamp(0, 1), Placement(w, h, box)


def _shrink(img: Image.Image, box: tuple[int, int, int, int], size: int) -> Image.Image:
    """The region ``box`` of ``img``; box-filtered to a long side of ``PREREDUCE_FACTOR * size`` when larger.

    The resize maps the region's full extent onto the smaller image, so registration stays exact.
    """
    left, top, right, bottom = box
    width, height = right - left, bottom - top
    limit = PREREDUCE_FACTOR * size
    if max(width, height) <= limit:
        return img if box == (0, 0, *img.size) else img.crop(box)
    scale = limit / max(width, height)
    target = (max(1, round(width * scale)), max(1, round(height * scale)))
    return img.resize(target, Image.Resampling.BOX, box=box)


def unfit(alpha: torch.Tensor, placement: Placement) -> torch.Tensor:
    """Map a canvas-sized soft mask back onto the original image's pixels.

    Args:
        alpha: ``(S, S)`` in [0, 1].

    Returns:
        ``(height, width)`` in [0, 1]; pixels the canvas did not show (outside a centre crop) are 0.
    """
    left, top, right, bottom = placement.box
    region = F.interpolate(alpha[None, None].float(), size=(bottom - top, right - left), mode="bilinear",
                           align_corners=False)[0, 0]
    if placement.box == (0, 0, placement.width, placement.height):
        return region.clamp_(0, 1)  # "scale": the region is the image (no second full-size copy)
    out = torch.zeros(placement.height, placement.width)
    # Intersect the canvas region with the image (padding falls outside it; a crop covers only part).
    y0, x0 = max(top, 0), max(left, 0)
    y1, x1 = min(bottom, placement.height), min(right, placement.width)
    out[y0:y1, x0:x1] = region[y0 - top : y1 - top, x0 - left : x1 - left]
    return out.clamp_(0, 1)


@dataclass(frozen=True)
class FinalMask:
    """A pair's result at the original image size, exactly as its files hold it.

    Attributes:
        alpha_u8: ``(H, W)`` uint8, the soft alpha as saved in ``alpha.png``.
        mask: ``(H, W)`` bool, the binary mask as saved in ``mask.png``: ``alpha_u8 / 255 > threshold``.
    """

    alpha_u8: np.ndarray
    mask: np.ndarray

    @property
    def alpha(self) -> np.ndarray:
        """The soft alpha ``(H, W)`` as float32 in [0, 1] (the saved 8-bit values)."""
        return self.alpha_u8.astype(np.float32) / 255.0

    @property
    def area(self) -> float:
        """Fraction of the image inside the binary mask."""
        return float(self.mask.mean())


def canvas_region(region: torch.Tensor, placement: Placement, size: int, cell: int) -> torch.Tensor:
    """The square-canvas pixels to regenerate: any canvas pixel that shows part of ``region``, grown to whole
    latent cells.

    The 4-channel inpainting path blends latents, and diffusers samples the pixel mask down to the latent grid
    with nearest-neighbour interpolation (one pixel per cell); a cell only partly covered could then keep the
    input's latents and bring an edge of the old object back. Covering whole cells avoids that.

    Args:
        region: ``(H, W)`` bool on the original image.
        placement: how the canvas sits on the original image (:func:`fit_square`).
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


def unfit_image(canvas: torch.Tensor, placement: Placement) -> torch.Tensor:
    """Map a canvas image back onto the original frame (the image counterpart of :func:`unfit`).

    Args:
        canvas: ``(3, S, S)`` in [0, 1].

    Returns:
        ``(3, H, W)`` in [0, 1]; 0 where the canvas did not show the image (outside a centre crop).
    """
    return torch.stack([unfit(channel, placement) for channel in canvas])


def finalize_mask(alpha: torch.Tensor, placement: Placement, threshold: float) -> FinalMask:
    """The one way a working-canvas alpha ``(S, S)`` in [0, 1] becomes a pair's result: mapped back to the
    original size, quantized to the 8 bits saved, then thresholded (so the mask follows from the saved alpha)."""
    alpha_u8 = quantize(unfit(alpha, placement))
    return FinalMask(alpha_u8=alpha_u8, mask=binarize(alpha_u8, threshold))


def read_mask(path: str | os.PathLike) -> np.ndarray:
    """A binary mask written by :func:`write_pair_files` as ``(H, W)`` bool (its pixels are 0 or 255).

    Raises:
        ImageError: the file is missing or not an image.
    """
    try:
        with Image.open(path) as im:
            return np.asarray(im.convert("L")) >= 128
    except (OSError, UnidentifiedImageError) as err:
        raise ImageError(f"Saved mask {path} cannot be read ({type(err).__name__}); rerun the run to rewrite "
                         "it.") from None


def quantize(alpha: torch.Tensor) -> np.ndarray:
    """Soft alpha in [0, 1] as the uint8 values saved to PNG."""
    return (alpha.clamp(0, 1) * 255.0).round().to(torch.uint8).cpu().numpy()


def binarize(alpha_u8: np.ndarray, threshold: float) -> np.ndarray:
    """Binary mask from the SAVED (8-bit) alpha, so ``mask.png == alpha.png / 255 > threshold`` exactly."""
    return alpha_u8.astype(np.float64) / 255.0 > threshold
