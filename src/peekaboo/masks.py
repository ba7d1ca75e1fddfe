"""Mask parameterizations: each renders one pair's alpha, ``(1, H, W)`` in [0, 1].

- ``raster``: a free logit per pixel.
- ``fourier``: a per-pixel MLP (1x1 convolutions) over fixed random Gaussian Fourier features of (u, v).
- ``*_bilateral``: the same logits filtered by an image-guided bilateral filter before the sigmoid, so the
  mask's edges follow the image's. The filter's weights depend only on the image: computed once.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from peekaboo.config import BilateralConfig, FourierConfig, MaskConfig


def bilateral_weights(image: torch.Tensor, kernel: int, sigma: float, colour_tolerance: float) -> torch.Tensor:
    """Normalized bilateral weights of every pixel's ``kernel x kernel`` neighbourhood.

    Args:
        image: ``(3, H, W)`` in [0, 1], the guide.
        kernel: odd window size.
        sigma: spatial Gaussian standard deviation in pixels.
        colour_tolerance: colour Gaussian standard deviation (RGB distance, [0, 1] scale).

    Returns:
        ``(K*K, H, W)`` weights summing to 1 over the first axis. Neighbours beyond the border replicate
        the edge pixel, as the logits are padded the same way in :func:`apply_bilateral`.
    """
    r = kernel // 2
    c, h, w = image.shape
    padded = F.pad(image[None].float(), (r, r, r, r), mode="replicate")
    patches = F.unfold(padded, kernel).view(c, kernel * kernel, h, w)  # (3, K*K, H, W)
    offsets = torch.arange(-r, r + 1, dtype=torch.float32, device=image.device)
    dist2 = (offsets[:, None] ** 2 + offsets[None, :] ** 2).flatten()  # (K*K,)
    spatial = torch.exp(-dist2 / (2 * sigma**2)).view(-1, 1, 1)
    colour = torch.exp(-((patches - image[:, None].float()) ** 2).sum(0) / (2 * colour_tolerance**2))
    weights = spatial * colour  # (K*K, H, W)
    return weights / weights.sum(0, keepdim=True)


def apply_bilateral(logits: torch.Tensor, weights: torch.Tensor, iterations: int) -> torch.Tensor:
    """Filter ``logits`` ``(1, H, W)`` with precomputed ``weights`` ``(K*K, H, W)``, ``iterations`` times."""
    kk, h, w = weights.shape
    kernel = math.isqrt(kk)
    r = kernel // 2
    x = logits[None]  # (1, 1, H, W)
    for _ in range(iterations):
        patches = F.unfold(F.pad(x, (r, r, r, r), mode="replicate"), kernel).view(1, kk, h, w)
        x = (patches * weights[None]).sum(1, keepdim=True)
    return x[0]


class Mask(nn.Module):
    """Base class: subclasses compute logits ``(1, H, W)``; the optional bilateral filter and sigmoid follow."""

    def __init__(self, size: int, guide: torch.Tensor | None = None, bilateral: BilateralConfig | None = None):
        super().__init__()
        self.size = size
        self.iterations = 0
        if bilateral is not None:
            if guide is None:
                raise ValueError("a bilateral mask needs the image as its guide")
            self.iterations = bilateral.iterations
            weights = bilateral_weights(guide, bilateral.kernel, bilateral.sigma, bilateral.colour_tolerance)
            # Not persistent: a checkpoint holds the learned mask only; the weights are recomputed from the image.
            self.register_buffer("bilateral", weights, persistent=False)

    def logits(self) -> torch.Tensor:
        raise NotImplementedError

    def forward(self) -> torch.Tensor:
        """alpha: ``(1, H, W)`` in [0, 1]."""
        x = self.logits()
        if self.iterations:
            x = apply_bilateral(x, self.bilateral, self.iterations)
        return torch.sigmoid(x)


class RasterMask(Mask):
    """One free logit per pixel."""

    def __init__(self, size: int, init_logit: float = 0.0, **kwargs):
        super().__init__(size, **kwargs)
        self.raster = nn.Parameter(torch.full((1, size, size), float(init_logit)))

    def logits(self) -> torch.Tensor:
        return self.raster


class FourierMask(Mask):
    """A per-pixel MLP over fixed random Fourier features of the pixel coordinate (the paper's "neural
    neural texture"): smoother masks than a raster."""

    def __init__(self, size: int, cfg: FourierConfig, generator: torch.Generator, **kwargs):
        super().__init__(size, **kwargs)
        # Fixed features: drawn from the pair's generator so the same seed gives the same mask.
        freqs = torch.randn(cfg.num_features, 2, generator=generator) * cfg.scale  # (F, 2)
        axis = torch.linspace(0.0, 1.0, size)
        uv = torch.stack(torch.meshgrid(axis, axis, indexing="ij"), 0)  # (2, H, W)
        proj = 2 * math.pi * torch.einsum("fc,chw->fhw", freqs, uv)
        self.register_buffer("features", torch.cat([proj.sin(), proj.cos()], 0)[None], persistent=False)
        layers: list[nn.Module] = []
        width = 2 * cfg.num_features
        for _ in range(cfg.layers):
            # BatchNorm over the pixels of this one mask; no running statistics, so the rendered mask is the
            # same in train and eval mode.
            norm = nn.BatchNorm2d(cfg.hidden, track_running_stats=False)
            layers += [nn.Conv2d(width, cfg.hidden, 1), norm, nn.ReLU()]
            width = cfg.hidden
        layers.append(nn.Conv2d(width, 1, 1))
        self.mlp = nn.Sequential(*layers)
        self._init(generator)

    def _init(self, generator: torch.Generator) -> None:
        # nn.Conv2d's own init draws from the global RNG; re-draw from the pair's generator instead.
        for m in self.mlp.modules():
            if isinstance(m, nn.Conv2d):
                bound = 1.0 / math.sqrt(m.in_channels)
                with torch.no_grad():
                    m.weight.copy_(torch.empty_like(m.weight).uniform_(-bound, bound, generator=generator))
                    m.bias.copy_(torch.empty_like(m.bias).uniform_(-bound, bound, generator=generator))

    def logits(self) -> torch.Tensor:
        return self.mlp(self.features)[0]  # (1, H, W)


def build_mask(cfg: MaskConfig, image: torch.Tensor, generator: torch.Generator) -> Mask:
    """Build the mask ``cfg.kind`` for one image.

    Args:
        cfg: mask config.
        image: ``(3, S, S)`` the working image (guide of the bilateral filter), ``S = cfg.size``.
        generator: the pair's CPU generator (initial weights, Fourier features).
    """
    if image.shape != (3, cfg.size, cfg.size):
        raise ValueError(f"mask of size {cfg.size} needs a (3, {cfg.size}, {cfg.size}) image, got {tuple(image.shape)}")
    bilateral = cfg.bilateral if cfg.kind.endswith("_bilateral") else None
    kwargs = {"guide": image, "bilateral": bilateral}
    if cfg.kind.startswith("raster"):
        return RasterMask(cfg.size, cfg.init_logit, **kwargs)
    if cfg.kind.startswith("fourier"):
        return FourierMask(cfg.size, cfg.fourier, generator, **kwargs)
    raise ValueError(f"unknown mask kind {cfg.kind!r}")
