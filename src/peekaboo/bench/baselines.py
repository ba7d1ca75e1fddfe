"""Training-free baselines that Peekaboo is compared with, computed from the same frozen model.

- :func:`whole_image`: every pixel is the object. Its IoU is the target's share of the image: the score of
  a method that ignores the prompt and segments nothing away.
- :func:`random_mask`: a disc of a typical object size at a random position: the chance level of a method
  that knows how big objects are but not where the named one is.
- :func:`attention_mask`: the cross-attention map of :func:`peekaboo.diffusion.attention.cross_attention_map` (where
  the UNet's cross-attention layers look at the prompt's content words when they denoise the image, the
  signal "attention-map" zero-shot segmenters threshold), thresholded. It needs no optimization at all, so it
  is the natural "what does the model already know" baseline for Peekaboo.
"""

from __future__ import annotations

import numpy as np
import torch

#: Radius range of the random disc, as fractions of the image's shorter side. The synthetic shapes have
#: "radii" of 9 to 16 pixels at 64x64 (peekaboo.data.shapes), so a disc of this size has a typical
#: object's area.
RANDOM_DISC_RADIUS: tuple[float, float] = (9 / 64, 16 / 64)


# -- trivial baselines --------------------------------------------------------------------------------------
def whole_image(h: int, w: int) -> np.ndarray:
    """The mask that keeps everything: ``(h, w)`` bool, all True."""
    return np.ones((h, w), dtype=bool)


def random_mask(h: int, w: int, generator: torch.Generator) -> np.ndarray:
    """A disc of a typical object size (:data:`RANDOM_DISC_RADIUS`) at a uniformly random position.

    The disc lies entirely inside the image. It is the chance baseline: right size, random place.

    Args:
        generator: a CPU generator (radius and centre are drawn from it, in that order).

    Returns:
        ``(h, w)`` bool.
    """
    side = min(h, w)
    lo, hi = RANDOM_DISC_RADIUS
    u = torch.rand(3, generator=generator, dtype=torch.float64).tolist()
    radius = side * (lo + (hi - lo) * u[0])
    cx = radius + (w - 2 * radius) * u[1]
    cy = radius + (h - 2 * radius) * u[2]
    yy, xx = np.mgrid[0:h, 0:w] + 0.5  # pixel centres
    return (xx - cx) ** 2 + (yy - cy) ** 2 <= radius**2


# -- cross-attention baseline --------------------------------------------------------------------------------
def attention_mask(heat: torch.Tensor, threshold: float) -> np.ndarray:
    """The cross-attention baseline's mask: ``heat > threshold``.

    Args:
        heat: ``(H, W)`` a :func:`peekaboo.diffusion.attention.cross_attention_map`, min-max normalized to [0, 1]
            per pair.
        threshold: chosen on the tune split (``peekaboo.bench.methods.CROSS_ATTENTION_THRESHOLD``).

    Returns:
        ``(H, W)`` bool.
    """
    return (heat > threshold).numpy()
