"""Image I/O: loading any image as upright RGB, fitting it to the square working canvas and mapping masks
back to the original pixels, and atomic writes (a kill never leaves a half-written file)."""

from __future__ import annotations

import contextlib
import os
import tempfile
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps, UnidentifiedImageError

from peekaboo.errors import ImageError

MIN_SIDE = 2  # a 1x1 image has no content to segment


def load_image(path: str | os.PathLike, flatten_background: tuple[float, float, float] = (0.5, 0.5, 0.5),
               max_pixels: int = 178_956_970) -> Image.Image:
    """Load ``path`` as an upright 8-bit RGB image.

    EXIF orientation is applied; grayscale, palette, 16-bit and CMYK images are converted; images with
    transparency are flattened over ``flatten_background`` (RGB in [0, 1]).

    Raises:
        ImageError: missing, empty, truncated or non-image file, too small, or too large (decompression bomb).
    """
    path = Path(path)
    if not path.is_file():
        raise ImageError(f"Image {path} does not exist; check the path.")
    if path.stat().st_size == 0:
        raise ImageError(f"Image {path} is an empty (zero-byte) file; replace it with a valid image.")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            previous, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, max_pixels
            try:
                with Image.open(path) as img:
                    img.load()
                    img = ImageOps.exif_transpose(img)
                    rgb = to_rgb(img, flatten_background)
            finally:
                Image.MAX_IMAGE_PIXELS = previous
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise ImageError(
            f"Image {path} has more than image_options.max_pixels={max_pixels} pixels (a possible decompression "
            "bomb); raise that limit if the image is genuine."
        ) from None
    except UnidentifiedImageError:
        raise ImageError(f"{path} is not an image file Pillow can read; convert it to PNG or JPEG.") from None
    except (OSError, SyntaxError, ValueError) as err:
        raise ImageError(f"Image {path} is truncated or corrupt ({err}); re-export or replace it.") from None
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

    Args:
        mode: ``"scale"`` stretches the whole image; ``"crop"`` takes the centred square (the mask is 0
            outside it); ``"pad"`` centres the image on a square of edge-replicated padding.

    Returns:
        ``(canvas (3, size, size) in [0, 1], placement)``.
    """
    w, h = img.size
    x = image_to_tensor(img)[None]  # (1, 3, H, W)
    if mode == "scale":
        box = (0, 0, w, h)
    elif mode == "crop":
        side = min(w, h)
        left, top = (w - side) // 2, (h - side) // 2
        box = (left, top, left + side, top + side)
        x = x[..., top : top + side, left : left + side]
    elif mode == "pad":
        side = max(w, h)
        left, top = (side - w) // 2, (side - h) // 2
        box = (-left, -top, side - left, side - top)
        x = F.pad(x, (left, side - w - left, top, side - h - top), mode="replicate")
    else:
        raise ValueError(f"unknown fit mode {mode!r}")
    canvas = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return canvas[0].clamp(0, 1), Placement(w, h, box)


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
    out = torch.zeros(placement.height, placement.width)
    # Intersect the canvas region with the image (padding falls outside it; a crop covers only part).
    y0, x0 = max(top, 0), max(left, 0)
    y1, x1 = min(bottom, placement.height), min(right, placement.width)
    out[y0:y1, x0:x1] = region[y0 - top : y1 - top, x0 - left : x1 - left]
    return out.clamp(0, 1)


def quantize(alpha: torch.Tensor) -> np.ndarray:
    """Soft alpha in [0, 1] as the uint8 values saved to PNG."""
    return (alpha.clamp(0, 1) * 255.0).round().to(torch.uint8).cpu().numpy()


def binarize(alpha_u8: np.ndarray, threshold: float) -> np.ndarray:
    """Binary mask from the SAVED (8-bit) alpha, so ``mask.png == alpha.png / 255 > threshold`` exactly."""
    return alpha_u8.astype(np.float64) / 255.0 > threshold


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it is renamed over ``path`` (atomic on POSIX)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def save_png(img: Image.Image, path: str | os.PathLike) -> Path:
    """Write ``img`` as PNG atomically."""
    with atomic_path(path) as tmp:
        img.save(tmp, format="PNG")
    return Path(path)


def write_text(text: str, path: str | os.PathLike) -> Path:
    """Write ``text`` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text)
    return Path(path)


def append_line(line: str, path: str | os.PathLike) -> None:
    """Append one line with a single ``write`` and fsync, so a reader never sees a partial line
    (with O_APPEND each write lands whole at the end)."""
    data = (line.rstrip("\n") + "\n").encode()
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)


def overlay(img: Image.Image, mask: np.ndarray, colour: tuple[int, int, int] = (255, 40, 40),
            opacity: float = 0.5) -> Image.Image:
    """The image with ``mask`` ``(H, W)`` bool tinted in ``colour``, and the mask's outline drawn."""
    base = np.asarray(img, dtype=np.float32)
    tint = np.asarray(colour, dtype=np.float32)
    out = base.copy()
    out[mask] = (1 - opacity) * base[mask] + opacity * tint
    edge = mask ^ _erode(mask)
    out[edge] = tint
    return Image.fromarray(out.clip(0, 255).astype(np.uint8))


def _erode(mask: np.ndarray) -> np.ndarray:
    m = np.pad(mask, 1, mode="edge")
    return m[1:-1, 1:-1] & m[:-2, 1:-1] & m[2:, 1:-1] & m[1:-1, :-2] & m[1:-1, 2:]


def cutout(img: Image.Image, alpha_u8: np.ndarray) -> Image.Image:
    """RGBA image whose alpha channel is the soft mask."""
    rgba = np.dstack([np.asarray(img, dtype=np.uint8), alpha_u8])
    return Image.fromarray(rgba, "RGBA")


def safe_name(name: str, max_len: int = 80) -> str:
    """A file-system-safe, collision-resistant name for ``name`` (a pair id or prompt).

    Spaces become ``_``; keeps ``[A-Za-z0-9._-]`` and replaces everything else with ``-``; when that (or
    shortening) changed the name beyond its spaces, a short digest of the original is appended so distinct
    ids do not share an output file. The result is never ``.``/``..`` and has no path separator.
    """
    import hashlib
    import re

    spaced = name.strip().replace(" ", "_")
    clean = re.sub(r"[^A-Za-z0-9._-]+", "-", spaced).strip("-.")[:max_len] or "pair"
    if clean != spaced:
        clean = f"{clean}-{hashlib.sha1(name.encode()).hexdigest()[:8]}"
    return clean
