"""Mask parameterizations: each renders the alphas of B independent pairs, ``(B, 1, H, W)`` in [0, 1]
(one pair's alpha is ``(1, H, W)``). Pairs share no parameter and no normalization statistic, so optimizing
B pairs together gives each the mask it would get alone.

- ``raster``: a free logit per pixel.
- ``fourier``: a per-pixel MLP (1x1 convolutions) over fixed random Gaussian Fourier features of (u, v).
- ``*_bilateral``: the same logits filtered by an image-guided bilateral filter before the sigmoid, so the
  mask's edges follow the image's. The filter depends only on the image: built once, as a sparse matrix.
"""

from __future__ import annotations

import math
import warnings

import torch
import torch.nn.functional as F
from torch import nn

from peekaboo.config import BilateralConfig, FourierConfig, MaskConfig


def bilateral_weights(image: torch.Tensor, kernel: int, sigma: float, colour_tolerance: float) -> torch.Tensor:
    """Normalized bilateral weights of every pixel's ``kernel x kernel`` neighbourhood.

    Args:
        image: ``(3, H, W)`` or ``(B, 3, H, W)`` in [0, 1], the guide.
        kernel: odd window size.
        sigma: spatial Gaussian standard deviation in pixels.
        colour_tolerance: colour Gaussian standard deviation (RGB distance, [0, 1] scale).

    Returns:
        ``(K*K, H, W)`` (or ``(B, K*K, H, W)``) weights summing to 1 over the neighbourhood axis, in
        ``F.unfold``'s order of the window. Neighbours beyond the border replicate the edge pixel, as
        :func:`bilateral_operator` does for the logits.
    """
    if image.dim() == 3:
        return bilateral_weights(image[None], kernel, sigma, colour_tolerance)[0]
    r = kernel // 2
    b, c, h, w = image.shape
    padded = F.pad(image.float(), (r, r, r, r), mode="replicate")
    patches = F.unfold(padded, kernel).view(b, c, kernel * kernel, h, w)  # (B, 3, K*K, H, W)
    offsets = torch.arange(-r, r + 1, dtype=torch.float32, device=image.device)
    dist2 = (offsets[:, None] ** 2 + offsets[None, :] ** 2).flatten()  # (K*K,)
    spatial = torch.exp(-dist2 / (2 * sigma**2)).view(1, -1, 1, 1)
    colour = torch.exp(-((patches - image[:, :, None].float()) ** 2).sum(1) / (2 * colour_tolerance**2))
    weights = spatial * colour  # (B, K*K, H, W)
    return weights / weights.sum(1, keepdim=True)


def bilateral_operator(weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One pass of the bilateral filter as a sparse matrix, and its transpose.

    Args:
        weights: ``(B, K*K, H, W)`` from :func:`bilateral_weights` (or ``(K*K, H, W)`` for one pair).

    Returns:
        ``(A, A^T)``, each ``(B*H*W, B*H*W)`` sparse CSR: ``(A x)[b*H*W + p]`` is the weighted mean of pixel
        ``p``'s neighbourhood in pair ``b``'s logits, a neighbour beyond the border counting as the edge pixel
        it replicates. ``A`` is block-diagonal, so pairs never mix.
    """
    if weights.dim() == 3:
        weights = weights[None]
    b, kk, h, w = weights.shape
    kernel = math.isqrt(kk)
    r = kernel // 2
    device = weights.device
    ys, xs = torch.meshgrid(torch.arange(h, device=device), torch.arange(w, device=device), indexing="ij")
    offsets = torch.arange(-r, r + 1, device=device)
    dy, dx = (o.reshape(kk, 1, 1) for o in torch.meshgrid(offsets, offsets, indexing="ij"))  # unfold's order
    source = (ys + dy).clamp(0, h - 1) * w + (xs + dx).clamp(0, w - 1)  # (K*K, H, W) flat neighbour index
    start = (torch.arange(b, device=device) * h * w).view(b, 1, 1, 1)  # each pair's block
    rows = (start + ys * w + xs).expand(b, kk, h, w)
    cols = start + source
    n = b * h * w
    # coalesce() sums the entries that replicated borders map onto the same edge pixel.
    op = torch.sparse_coo_tensor(torch.stack([rows.flatten(), cols.flatten()]), weights.flatten(), (n, n),
                                 check_invariants=True).coalesce()
    with warnings.catch_warnings():
        # Torch's once-per-process beta notice on the first CSR tensor: nothing a user can act on (the filter
        # only multiplies the matrix with a vector).
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta state")
        return op.to_sparse_csr(), op.t().coalesce().to_sparse_csr()


class _RepeatedLinear(torch.autograd.Function):
    """``x -> A^n x`` with the backward ``g -> (A^T)^n g``: the filter is linear, so its backward needs none of
    the forward's intermediate results (n passes would otherwise each keep a ``(B, K*K, H, W)`` buffer)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, op: torch.Tensor, op_t: torch.Tensor, iterations: int) -> torch.Tensor:
        ctx.op_t, ctx.iterations = op_t, iterations
        return _power(op, x, iterations)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return _power(ctx.op_t, grad, ctx.iterations), None, None, None


def _power(op: torch.Tensor, x: torch.Tensor, iterations: int) -> torch.Tensor:
    # The mask is float32 by design: under mixed precision the filter is not autocast to half.
    with torch.autocast(device_type=x.device.type, enabled=False):
        x = x.float()
        for _ in range(iterations):
            x = op @ x
    return x


def apply_bilateral(logits: torch.Tensor, operator: tuple[torch.Tensor, torch.Tensor], iterations: int) -> torch.Tensor:
    """Filter ``logits`` ``(B, 1, H, W)`` (or one pair's ``(1, H, W)``) ``iterations`` times with the
    ``(A, A^T)`` of :func:`bilateral_operator`; differentiable with respect to ``logits``."""
    if logits.dim() == 3:
        return apply_bilateral(logits[None], operator, iterations)[0]
    op, op_t = operator
    if op.shape[0] != logits.numel():
        raise ValueError(f"bilateral operator of size {op.shape[0]} for logits {tuple(logits.shape)}")
    x = _RepeatedLinear.apply(logits.reshape(-1, 1), op, op_t, iterations)  # (B*H*W, 1)
    return x.view(logits.shape)


class Mask(nn.Module):
    """Base class: subclasses compute logits ``(B, 1, H, W)``; the optional bilateral filter and sigmoid
    follow. ``guide`` is the images ``(B, 3, H, W)``."""

    def __init__(self, size: int, guide: torch.Tensor, bilateral: BilateralConfig | None = None):
        super().__init__()
        self.size = size
        self.batch = guide.shape[0]
        self.iterations = 0
        if bilateral is not None:
            if guide is None:
                raise ValueError("a bilateral mask needs the image as its guide")
            self.iterations = bilateral.iterations
            weights = bilateral_weights(guide, bilateral.kernel, bilateral.sigma, bilateral.colour_tolerance)
            op, op_t = bilateral_operator(weights)
            # Not persistent: a checkpoint holds the learned mask only; the filter is rebuilt from the image.
            self.register_buffer("bilateral", op, persistent=False)
            self.register_buffer("bilateral_t", op_t, persistent=False)

    def logits(self) -> torch.Tensor:
        raise NotImplementedError

    def forward(self) -> torch.Tensor:
        """alpha: ``(B, 1, H, W)`` in [0, 1]."""
        x = self.logits()
        if self.iterations:
            x = apply_bilateral(x, (self.bilateral, self.bilateral_t), self.iterations)
        return torch.sigmoid(x)


class RasterMask(Mask):
    """One free logit per pixel."""

    def __init__(self, size: int, init_logit: float = 0.0, **kwargs):
        super().__init__(size, **kwargs)
        self.raster = nn.Parameter(torch.full((self.batch, 1, size, size), float(init_logit)))

    def logits(self) -> torch.Tensor:
        return self.raster

    @torch.no_grad()
    def start_from(self, logits: torch.Tensor, rows: torch.Tensor) -> None:
        """Replace the logits of pairs ``rows`` (``(R,)`` indices) with ``logits`` ``(R, 1, H, W)``, before the
        first step (e.g. with :func:`map_logits`)."""
        shape = (len(rows), *self.raster.shape[1:])
        if logits.shape != shape:
            raise ValueError(f"logits {tuple(logits.shape)} for {len(rows)} rows of a raster of "
                             f"{tuple(self.raster.shape)}")
        self.raster[rows] = logits


def map_logits(m: torch.Tensor, scale: float, threshold: float) -> torch.Tensor:
    """Starting logits from a map ``m`` in [0, 1] (any shape): ``scale * (m - threshold)``, so
    ``sigmoid`` of them is 0.5 where ``m == threshold`` and grows with ``m`` (``mask.init=cross_attention``)."""
    return scale * (m - threshold)


class FourierMask(Mask):
    """A per-pixel MLP over fixed random Fourier features of the pixel coordinate (the paper's "neural
    neural texture"): smoother masks than a raster.

    B pairs are B separate MLPs. Their parameters are stored as grouped 1x1 convolutions (``groups=B``, one
    tensor per layer, pair ``i`` owning rows ``i*C:(i+1)*C``) and BatchNorms over ``B*C`` channels; each pair's
    MLP runs on its own pixels (:meth:`logits`), so a BatchNorm channel normalizes one pair's pixels only and
    pairs never mix.
    """

    def __init__(self, size: int, cfg: FourierConfig, generators: list[torch.Generator], **kwargs):
        super().__init__(size, **kwargs)
        b = self.batch
        axis = torch.linspace(0.0, 1.0, size)
        uv = torch.stack(torch.meshgrid(axis, axis, indexing="ij"), 0)  # (2, H, W)
        # Fixed features, drawn from each pair's generator so the same seed gives the same mask.
        feats = []
        for gen in generators:
            freqs = torch.randn(cfg.num_features, 2, generator=gen) * cfg.scale  # (F, 2)
            proj = 2 * math.pi * torch.einsum("fc,chw->fhw", freqs, uv)
            feats.append(torch.cat([proj.sin(), proj.cos()], 0))  # (2F, H, W)
        self.register_buffer("features", torch.cat(feats, 0)[None], persistent=False)  # (1, B*2F, H, W)
        layers: list[nn.Module] = []
        width = 2 * cfg.num_features
        for _ in range(cfg.layers):
            # BatchNorm over the pixels of each mask; no running statistics, so the rendered mask is the same
            # in train and eval mode.
            norm = nn.BatchNorm2d(b * cfg.hidden, track_running_stats=False)
            # No bias: BatchNorm subtracts it again, so its true gradient is zero and Adam would turn the
            # rounding noise of that zero into lr-sized steps, making masks depend on the CPU and the batch.
            conv = nn.Conv2d(b * width, b * cfg.hidden, 1, groups=b, bias=False)
            layers += [conv, norm, nn.ReLU()]
            width = cfg.hidden
        layers.append(nn.Conv2d(b * width, b, 1, groups=b))
        self.mlp = nn.Sequential(*layers)
        self._init(generators)

    def _init(self, generators: list[torch.Generator]) -> None:
        # nn.Conv2d's own init draws from the global RNG; each pair's slice is re-drawn from its generator
        # (PyTorch's default uniform bound 1/sqrt(fan_in)), so a pair's init does not depend on its batch.
        for gen_index, gen in enumerate(generators):
            for m in self.mlp.modules():
                if isinstance(m, nn.Conv2d):
                    per = m.out_channels // self.batch
                    rows = slice(gen_index * per, (gen_index + 1) * per)
                    bound = 1.0 / math.sqrt(m.in_channels // self.batch)
                    with torch.no_grad():
                        m.weight[rows].uniform_(-bound, bound, generator=gen)
                        if m.bias is not None:
                            m.bias[rows].uniform_(-bound, bound, generator=gen)

    def logits(self) -> torch.Tensor:
        # Pair by pair rather than one grouped convolution: at B=16 a grouped convolution's activations outgrow
        # the CPU's caches, so each pair costs more than alone; one pair's stay in them. Same arithmetic.
        b, hw = self.batch, self.size * self.size
        h = list(self.features.view(b, -1, hw).unbind(0))  # B x (2F, HW)
        *hidden, last = list(self.mlp)
        for conv, norm, _relu in zip(hidden[0::3], hidden[1::3], hidden[2::3], strict=True):
            weights = conv.weight.view(b, conv.out_channels // b, -1).unbind(0)  # B x (C_out, C_in)
            gammas, betas = norm.weight.view(b, -1).unbind(0), norm.bias.view(b, -1).unbind(0)  # B x (C_out,)
            h = [F.relu(F.batch_norm(torch.mm(w, x)[None], None, None, g, be, True, 0.0, norm.eps)[0])
                 for w, x, g, be in zip(weights, h, gammas, betas, strict=True)]  # B x (C_out, HW)
        weights, biases = last.weight.view(b, 1, -1).unbind(0), last.bias.view(b, 1).unbind(0)
        out = torch.stack([torch.mm(w, x) + bias[:, None] for w, x, bias in zip(weights, h, biases, strict=True)])
        return out.view(b, 1, self.size, self.size)  # (B, 1, 1, HW) -> (B, 1, S, S)


def build_mask(cfg: MaskConfig, images: torch.Tensor, generators: list[torch.Generator]) -> Mask:
    """Build the masks ``cfg.kind`` of B pairs.

    Args:
        cfg: mask config.
        images: ``(B, 3, S, S)`` the working images (guides of the bilateral filter), ``S = cfg.size``.
        generators: one CPU generator per pair (initial weights, Fourier features).
    """
    b = images.shape[0]
    if images.shape[1:] != (3, cfg.size, cfg.size) or len(generators) != b:
        raise ValueError(f"mask of size {cfg.size} needs (B, 3, {cfg.size}, {cfg.size}) images and B generators, "
                         f"got {tuple(images.shape)} and {len(generators)}")
    bilateral = cfg.bilateral if cfg.kind.endswith("_bilateral") else None
    kwargs = {"guide": images, "bilateral": bilateral}
    if cfg.kind.startswith("raster"):
        return RasterMask(cfg.size, cfg.init_logit, **kwargs)
    if cfg.kind.startswith("fourier"):
        return FourierMask(cfg.size, cfg.fourier, generators, **kwargs)
    raise ValueError(f"unknown mask kind {cfg.kind!r}")
