"""A straightforward Peekaboo loop written the way the paper's original code writes it: the baseline that
:mod:`peekaboo.bench.throughput` measures the project's path against.

The original code (github.com/RyannDaGreat/peekaboo, ``source/peekaboo.py``, ``source/bilateral_blur.py``,
``source/learnable_textures.py``, ``source/stable_diffusion.py``) is followed where it costs time:

- one (image, prompt) pair at a time, float32, a plain ``for`` loop, no Lightning;
- the bilateral filter of ``bilateral_blur.py``: its weights ``(K, K, H, W)`` are computed once per image
  (``BilateralProxyBlur.__init__``) from K*K shifted copies of the image; every one of the (40) filter
  iterations builds the K*K shifted copies of the logits (out-of-image neighbours are NaN, then zeroed)
  into a ``(K, K, C, H, W)`` buffer and sums it;
- the mask is rendered twice per step, as ``run_peekaboo`` does: ``alphas = p.alphas()`` for the gravity
  term, and again inside ``p()`` for the composite;
- the dream loss of ``stable_diffusion.py``: ``[uncond, cond]`` in one UNet batch of two, classifier-free
  guidance, ``w(t) = 1 - abar_t``, then ``latents.backward(gradient=grad, retain_graph=True)``; the gravity
  term is a second ``backward``;
- the Fourier MLP of ``learnable_textures.py`` (1x1 convolutions, ``Conv -> ReLU -> BatchNorm``).

Everything else comes from the project's config, so both loops optimize the same problem: the model and
its resolution, the timestep range, guidance scale, gravity, optimizer and learning rate, latent mode
(posterior mean or sample), mask size, initial logit and bilateral settings. The original draws from the
global RNG; here every draw comes from one generator per pair (reproducible, and no slower). The
original's debugging asserts and notebook previews are left out: they are not part of the algorithm.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from peekaboo.config import BilateralConfig, FourierConfig, OptimizationConfig
from peekaboo.diffusion.backbone import Backbone
from peekaboo.optim.masks import uv_grid
from peekaboo.optim.optimizer import build_optimizer

# The paper's code supports these two parameterizations here; the benchmark compares them (and raster
# without the filter would measure nothing the filter changes).
REFERENCE_KINDS = ("raster_bilateral", "fourier_bilateral")
EPSILON = "epsilon"


def shifted_image(image: torch.Tensor, dx: int, dy: int) -> torch.Tensor:
    """``image`` ``(C, H, W)`` shifted by ``dx`` columns and ``dy`` rows; the uncovered border is NaN.

    As in the original, NaN marks out-of-image neighbours so that they can be dropped from the weights.
    """
    _, height, width = image.shape
    if abs(dx) >= width or abs(dy) >= height:
        return torch.full_like(image, math.nan)
    out = image
    if dx:
        cols = torch.full_like(image[:, :, : abs(dx)], math.nan)
        out = torch.cat((cols, out[:, :, :-dx]), 2) if dx > 0 else torch.cat((out[:, :, -dx:], cols), 2)
    if dy:
        rows = torch.full_like(image[:, : abs(dy), :], math.nan)
        out = torch.cat((rows, out[:, :-dy, :]), 1) if dy > 0 else torch.cat((out[:, -dy:, :], rows), 1)
    return out


def gaussian_kernel(size: int, sigma: float) -> torch.Tensor:
    """A normalized ``(size, size)`` spatial Gaussian."""
    axis = torch.arange(size, dtype=torch.float32) - size // 2
    kernel = torch.exp(-(axis[:, None] ** 2 + axis[None, :] ** 2) / (2 * sigma**2))
    return kernel / kernel.sum()


def bilateral_weights(image: torch.Tensor, cfg: BilateralConfig) -> torch.Tensor:
    """The original's ``get_weight_matrix``: weights ``(K, K, H, W)`` of every pixel's neighbours.

    Args:
        image: ``(3, H, W)`` in [0, 1], the guide.

    Returns:
        Spatial Gaussian times colour Gaussian, zero outside the image, summing to 1 over ``(K, K)``.
    """
    k, r = cfg.kernel, cfg.kernel // 2
    c, h, w = image.shape
    shifts = torch.empty(k, k, c, h, w, dtype=image.dtype, device=image.device)
    for u in range(k):
        for v in range(k):
            shifts[u, v] = shifted_image(image, u - r, v - r)
    colour_dist = ((shifts - image[None, None]) ** 2).sum(2).sqrt()  # (K, K, H, W)
    colour = torch.exp(-0.5 * (colour_dist / cfg.colour_tolerance) ** 2)
    weights = (gaussian_kernel(k, cfg.sigma).to(image)[:, :, None, None] * colour).nan_to_num()
    return weights / weights.sum((0, 1), keepdim=True)


def apply_bilateral(x: torch.Tensor, weights: torch.Tensor, iterations: int) -> torch.Tensor:
    """The original's ``apply_weight_matrix``: ``iterations`` passes over K*K shifted copies of ``x``.

    Args:
        x: ``(C, H, W)`` logits.
        weights: ``(K, K, H, W)`` from :func:`bilateral_weights`.
    """
    k, r = weights.shape[0], weights.shape[0] // 2
    for _ in range(iterations):
        weighted = torch.empty(k, k, *x.shape, dtype=x.dtype, device=x.device)
        for u in range(k):
            for v in range(k):
                weighted[u, v] = shifted_image(x, u - r, v - r).nan_to_num() * weights[u, v][None]
        x = weighted.sum((0, 1))
    return x


class RasterBilateral(nn.Module):
    """``LearnableImageRasterBilateral``: a free logit per pixel, bilateral-filtered, then a sigmoid."""

    def __init__(self, size: int, weights: torch.Tensor, iterations: int, init_logit: float):
        super().__init__()
        self.logits = nn.Parameter(torch.full((1, size, size), float(init_logit)))
        self.weights, self.iterations = weights, iterations

    def forward(self) -> torch.Tensor:
        """alpha ``(1, S, S)``."""
        return torch.sigmoid(apply_bilateral(self.logits, self.weights, self.iterations))


class FourierBilateral(nn.Module):
    """``LearnableImageFourierBilateral``: a per-pixel MLP over random Fourier features of (u, v)."""

    def __init__(self, size: int, weights: torch.Tensor, iterations: int, cfg: FourierConfig,
                 generator: torch.Generator):
        super().__init__()
        uv = uv_grid(size).permute(1, 2, 0)  # (S, S, 2): the official get_uv_grid's 0 .. (S - 1) / S
        freqs = torch.randn(2, cfg.num_features, generator=generator) * cfg.scale
        proj = 2 * math.pi * uv @ freqs  # (S, S, F)
        self.register_buffer("features", torch.cat([proj.sin(), proj.cos()], -1).permute(2, 0, 1)[None])
        layers: list[nn.Module] = []
        width = 2 * cfg.num_features
        for _ in range(cfg.layers):
            layers += [nn.Conv2d(width, cfg.hidden, 1), nn.ReLU(), nn.BatchNorm2d(cfg.hidden)]
            width = cfg.hidden
        layers.append(nn.Conv2d(width, 1, 1))
        self.model = nn.Sequential(*layers)
        self.weights, self.iterations = weights, iterations

    def forward(self) -> torch.Tensor:
        """alpha ``(1, S, S)``."""
        return torch.sigmoid(apply_bilateral(self.model(self.features)[0], self.weights, self.iterations))


@dataclass
class ReferenceResult:
    """One pair's reference optimization."""

    alpha: torch.Tensor  # (S, S) float32 on CPU
    step_seconds: list[float] = field(default_factory=list)  # wall time of every step


class ReferenceLoop:
    """The paper's loop for one pair over the project's frozen model weights.

    Args:
        backbone: the frozen model (its VAE, UNet, text encoder, tokenizer and noise schedule are used).
        cfg: the optimization settings; ``cfg.mask.kind`` must be one of :data:`REFERENCE_KINDS`.
    """

    def __init__(self, backbone: Backbone, cfg: OptimizationConfig):
        if cfg.mask.kind not in REFERENCE_KINDS:
            raise ValueError(f"the reference loop implements {REFERENCE_KINDS}, not {cfg.mask.kind!r}")
        if backbone.prediction_type != EPSILON:
            raise ValueError("the reference loop, like the paper's code, drives epsilon-prediction models only")
        if backbone.sdxl:
            # The paper's code predates SDXL (two text encoders, pooled embeddings and time ids as added
            # conditioning); a reference written for it would be this project's guess, not the paper's loop.
            raise ValueError("the reference loop, like the paper's code, drives Stable Diffusion 1.x/2.x models only, "
                             "not SDXL")
        self.bb, self.cfg = backbone, cfg
        t_count = backbone.num_train_timesteps
        self.min_step, self.max_step = int(t_count * cfg.guidance.t_min), int(t_count * cfg.guidance.t_max)
        self.alphas_cumprod = backbone.alphas_cumprod.to(backbone.device)

    @torch.no_grad()
    def text_embeddings(self, prompt: str) -> torch.Tensor:
        """``get_text_embeddings``: ``(2, L, D)`` in the order ``[uncond, cond]``."""
        tok = self.bb.tokenizer
        ids = [tok(p, padding="max_length", max_length=tok.model_max_length, truncation=True,
                   return_tensors="pt").input_ids for p in ("", prompt)]
        return torch.cat([self.bb.text_encoder(i.to(self.bb.device))[0] for i in ids])

    def encode(self, rgb: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """``encode_imgs``: latents ``(1, C, h, w)`` of ``rgb`` ``(1, 3, R, R)``, with gradients."""
        dist = self.bb.vae.encode(2 * rgb - 1).latent_dist
        if self.cfg.guidance.latent_mode == "mean":
            z = dist.mean
        else:
            z = dist.mean + dist.std * torch.randn(dist.mean.shape, generator=generator).to(dist.mean)
        return (z - self.bb.shift_factor) * self.bb.scaling_factor

    def train_step(self, embeddings: torch.Tensor, composite: torch.Tensor, generator: torch.Generator) -> None:
        """``StableDiffusion.train_step``: push the dream-loss gradient into the composite's graph."""
        res = self.bb.resolution
        latents = self.encode(F.interpolate(composite, (res, res), mode="bilinear", align_corners=False), generator)
        t = torch.randint(self.min_step, self.max_step + 1, (1,), generator=generator).to(latents.device)
        with torch.no_grad():
            noise = torch.randn(latents.shape, generator=generator).to(latents)
            abar = self.alphas_cumprod[t]
            noisy = abar.sqrt() * latents + (1 - abar).sqrt() * noise
            pred = self.bb.unet(torch.cat([noisy] * 2), t, encoder_hidden_states=embeddings).sample
        pred_uncond, pred_text = pred.chunk(2)
        pred = pred_uncond + self.cfg.guidance.guidance_scale * (pred_text - pred_uncond)
        grad = (1 - abar) * (pred - noise)
        latents.backward(gradient=grad, retain_graph=True)

    def build_mask(self, image: torch.Tensor, generator: torch.Generator) -> nn.Module:
        """The mask of :data:`REFERENCE_KINDS` for ``image`` ``(3, S, S)``."""
        m = self.cfg.mask
        weights = bilateral_weights(image, m.bilateral)
        if m.kind == "raster_bilateral":
            return RasterBilateral(m.size, weights, m.bilateral.iterations, m.init_logit)
        return FourierBilateral(m.size, weights, m.bilateral.iterations, m.fourier, generator)

    def run(self, image: torch.Tensor, prompt: str, steps: int, seed: int,
            on_step: Callable[[int], None] | None = None) -> ReferenceResult:
        """Optimize one pair's mask for ``steps`` steps.

        Args:
            image: ``(3, S, S)`` in [0, 1], ``S = cfg.mask.size``.
            seed: seeds the pair's generator (initial weights, backgrounds, timesteps, noise).
            on_step: called after every step with its index (e.g. to synchronize a GPU before timing).
        """
        cfg, device = self.cfg, self.bb.device
        gen = torch.Generator().manual_seed(seed)
        image = image.to(device).float()
        torch.manual_seed(seed)  # nn.Conv2d's own initialization reads the global RNG
        mask = self.build_mask(image, gen).to(device)
        optim = build_optimizer(cfg.optim, mask.parameters())
        embeddings = self.text_embeddings(prompt)
        gravity_scale = 1.0 if cfg.loss.gravity_reduction == "sum" else 1.0 / image[0].numel()
        result = ReferenceResult(alpha=torch.empty(0))
        for step in range(steps):
            start = time.perf_counter()
            alphas = mask()  # the gravity term's render ...
            background = torch.rand(3, 1, 1, generator=gen).to(device)
            alpha = mask()  # ... and the composite's, as p() renders the mask again
            composite = alpha * image + (1 - alpha) * background  # (3, S, S)
            self.train_step(embeddings, composite[None], gen)
            (alphas.sum() * cfg.loss.gravity * gravity_scale).backward()
            optim.step()
            optim.zero_grad()
            if on_step is not None:
                on_step(step)
            result.step_seconds.append(time.perf_counter() - start)
        with torch.no_grad():
            result.alpha = mask()[0].float().cpu()
        return result

