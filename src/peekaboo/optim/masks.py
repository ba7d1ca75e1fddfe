"""Mask parameterizations: each renders the alphas of B independent pairs, ``(B, 1, H, W)`` in [0, 1]
(one pair's alpha is ``(1, H, W)``). Pairs share no parameter and no normalization statistic, so optimizing
B pairs together gives each the mask it would get alone.

- ``raster``: a free logit per pixel.
- ``fourier``: a per-pixel MLP (1x1 convolutions) over fixed random Gaussian Fourier features of (u, v).
- ``*_bilateral``: the same logits filtered by an image-guided bilateral filter before the sigmoid, so the
  mask's edges follow the image's. The filter depends only on the image: built once, as a sparse matrix.

Both follow the official code (github.com/RyannDaGreat/Peekaboo, ``source/learnable_textures.py`` and
``source/bilateral_blur.py``); docs/DESIGN.md lists where the project departs from it and why.
"""

from __future__ import annotations

import math
import warnings

import torch
import torch.nn.functional as F
from torch import nn

from peekaboo.config import BilateralConfig, FourierConfig, MaskConfig
from peekaboo.errors import ConfigError

#: What a checkpoint of each mask kind holds and renders: a checkpoint records its kind's revision
#: (:meth:`PeekabooModule.on_save_checkpoint <peekaboo.optim.module.PeekabooModule.on_save_checkpoint>`) and one
#: of another revision is not resumed (:func:`check_checkpoint_revision`). Checkpoints written before revisions
#: were recorded are revision 1. Revision 2 follows the official code: the Fourier MLP is
#: ``Conv(+bias) -> ReLU -> BatchNorm`` over coordinates in [0, 1) (other parameter keys), and the bilateral
#: filter leaves out-of-image neighbours out (other masks near the border); the plain raster did not change.
MASK_REVISIONS = {"raster": 1, "raster_bilateral": 2, "fourier": 2, "fourier_bilateral": 2}
#: Checkpoints without a recorded revision.
LEGACY_REVISION = 1
#: The checkpoint entry that records it.
REVISION_KEY = "mask_revision"


def bilateral_weights(image: torch.Tensor, kernel: int, sigma: float, colour_tolerance: float) -> torch.Tensor:
    """Normalized bilateral weights of every pixel's ``kernel x kernel`` neighbourhood.

    Args:
        image: ``(3, H, W)`` or ``(B, 3, H, W)`` in [0, 1], the guide.
        kernel: odd window size.
        sigma: spatial Gaussian standard deviation in pixels.
        colour_tolerance: colour Gaussian standard deviation (RGB distance, [0, 1] scale).

    Returns:
        ``(K*K, H, W)`` (or ``(B, K*K, H, W)``) weights in ``F.unfold``'s order of the window, summing to 1 over
        the neighbours inside the image; a neighbour beyond the border has weight 0, as in the official code
        (``bilateral_blur.py``, ``get_weight_matrix``), so a border pixel averages fewer neighbours.
    """
    if image.dim() == 3:
        return bilateral_weights(image[None], kernel, sigma, colour_tolerance)[0]
    r = kernel // 2
    b, c, h, w = image.shape
    image = image.float()
    patches = F.unfold(F.pad(image, (r, r, r, r)), kernel).view(b, c, kernel * kernel, h, w)  # (B, 3, K*K, H, W)
    inside = F.unfold(F.pad(torch.ones_like(image[:1, :1]), (r, r, r, r)), kernel).view(1, -1, h, w)  # (1, K*K, H, W)
    offsets = torch.arange(-r, r + 1, dtype=torch.float32, device=image.device)
    dist2 = (offsets[:, None] ** 2 + offsets[None, :] ** 2).flatten()  # (K*K,)
    spatial = torch.exp(-dist2 / (2 * sigma**2)).view(1, -1, 1, 1)
    colour = torch.exp(-((patches - image[:, :, None]) ** 2).sum(1) / (2 * colour_tolerance**2))
    weights = spatial * colour * inside  # (B, K*K, H, W); the centre is always inside, so no sum is zero
    return weights / weights.sum(1, keepdim=True)


def bilateral_operator(weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One pass of the bilateral filter as a sparse matrix, and its transpose.

    Args:
        weights: ``(B, K*K, H, W)`` from :func:`bilateral_weights` (or ``(K*K, H, W)`` for one pair).

    Returns:
        ``(A, A^T)``, each ``(B*H*W, B*H*W)`` sparse CSR: ``(A x)[b*H*W + p]`` is the weighted mean of pixel
        ``p``'s neighbours inside the image in pair ``b``'s logits. ``A`` is block-diagonal, so pairs never mix.
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
    ny, nx = ys + dy, xs + dx  # (K*K, H, W) each pixel's neighbours
    inside = ((ny >= 0) & (ny < h) & (nx >= 0) & (nx < w)).expand(b, kk, h, w)  # the others have weight 0
    start = (torch.arange(b, device=device) * h * w).view(b, 1, 1, 1)  # each pair's block
    rows = (start + ys * w + xs).expand(b, kk, h, w)[inside]
    cols = (start + ny * w + nx)[inside]
    n = b * h * w
    op = torch.sparse_coo_tensor(torch.stack([rows, cols]), weights[inside], (n, n), check_invariants=True).coalesce()
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
            self.iterations = bilateral.iterations
            weights = bilateral_weights(guide, bilateral.kernel, bilateral.sigma, bilateral.colour_tolerance)
            op, op_t = bilateral_operator(weights)
            # Not persistent: a checkpoint holds the learned mask only; the filter is rebuilt from the image.
            self.register_buffer("bilateral", op, persistent=False)
            self.register_buffer("bilateral_t", op_t, persistent=False)

    def logits(self) -> torch.Tensor:
        raise NotImplementedError

    def forward(self) -> torch.Tensor:
        """alpha: ``(B, 1, H, W)`` in [0, 1], float32 also inside a mixed-precision step: the mask is the only
        trained function, and autocast would run a Fourier mask's matmuls in half precision."""
        device = next(self.parameters()).device
        with torch.autocast(device_type=device.type, enabled=False):
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


def uv_grid(size: int) -> torch.Tensor:
    """Pixel coordinates ``(2, S, S)``: (row, column) from 0 to ``(S - 1) / S``, as the official ``get_uv_grid``
    spaces them (``[0, 1)``: the left edge at 0, the right edge one pixel short of 1)."""
    axis = torch.arange(size, dtype=torch.float32) / size
    return torch.stack(torch.meshgrid(axis, axis, indexing="ij"), 0)


class FourierMask(Mask):
    """A per-pixel MLP over fixed random Fourier features of the pixel coordinate (the paper's "neural
    neural texture"): smoother masks than a raster.

    Each hidden layer is ``Conv 1x1 (+bias) -> ReLU -> BatchNorm`` and the output a ``Conv 1x1 (+bias)``, the
    official ``LearnableImageFourier``'s order; the BatchNorm normalizes over the mask's pixels (no running
    statistics: the official code never leaves training mode, so its running statistics are never read).

    B pairs are B separate MLPs. Their parameters are stored as grouped 1x1 convolutions (``groups=B``, one
    tensor per layer, pair ``i`` owning rows ``i*C:(i+1)*C``) and BatchNorms over ``B*C`` channels; each pair's
    MLP runs on its own pixels (:meth:`logits`), so a BatchNorm channel normalizes one pair's pixels only and
    pairs never mix.
    """

    def __init__(self, size: int, cfg: FourierConfig, generators: list[torch.Generator], **kwargs):
        super().__init__(size, **kwargs)
        b = self.batch
        uv = uv_grid(size)  # (2, H, W)
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
            conv = nn.Conv2d(b * width, b * cfg.hidden, 1, groups=b)
            layers += [conv, nn.ReLU(), nn.BatchNorm2d(b * cfg.hidden, track_running_stats=False)]
            width = cfg.hidden
        layers.append(nn.Conv2d(b * width, b, 1, groups=b))
        self.mlp = nn.Sequential(*layers)
        self._init(generators)

    def _init(self, generators: list[torch.Generator]) -> None:
        # nn.Conv2d's own init draws from the global RNG; each pair's slice is re-drawn from its generator
        # (PyTorch's default uniform bound 1/sqrt(fan_in), weights and biases, as the official MLP starts), so a
        # pair's init does not depend on its batch.
        for gen_index, gen in enumerate(generators):
            for m in self.mlp.modules():
                if isinstance(m, nn.Conv2d):
                    per = m.out_channels // self.batch
                    rows = slice(gen_index * per, (gen_index + 1) * per)
                    bound = 1.0 / math.sqrt(m.in_channels // self.batch)
                    with torch.no_grad():
                        m.weight[rows].uniform_(-bound, bound, generator=gen)
                        m.bias[rows].uniform_(-bound, bound, generator=gen)

    def logits(self) -> torch.Tensor:
        # Pair by pair rather than one grouped convolution: at B=16 a grouped convolution's activations outgrow
        # the CPU's caches, so each pair costs more than alone; one pair's stay in them. Same arithmetic.
        b, hw = self.batch, self.size * self.size
        h = list(self.features.view(b, -1, hw).unbind(0))  # B x (2F, HW)
        *hidden, last = list(self.mlp)
        for conv, _relu, norm in zip(hidden[0::3], hidden[1::3], hidden[2::3], strict=True):
            weights = conv.weight.view(b, conv.out_channels // b, -1).unbind(0)  # B x (C_out, C_in)
            biases = conv.bias.view(b, -1).unbind(0)  # B x (C_out,)
            gammas, betas = norm.weight.view(b, -1).unbind(0), norm.bias.view(b, -1).unbind(0)  # B x (C_out,)
            h = [F.batch_norm(F.relu(torch.addmm(bias[:, None], w, x))[None], None, None, g, be, True, 0.0,
                              norm.eps)[0]
                 for w, x, bias, g, be in zip(weights, h, biases, gammas, betas, strict=True)]  # B x (C_out, HW)
        weights, biases = last.weight.view(b, 1, -1).unbind(0), last.bias.view(b, 1).unbind(0)
        out = torch.stack([torch.addmm(bias[:, None], w, x) for w, x, bias in zip(weights, h, biases, strict=True)])
        return out.view(b, 1, self.size, self.size)  # (B, 1, HW) -> (B, 1, S, S)


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


def check_checkpoint_revision(kind: str, saved: int | None, where: str) -> None:
    """Refuse to resume a checkpoint whose mask of kind ``kind`` has another revision than this version's
    (:data:`MASK_REVISIONS`): its parameters would load under other keys, or render another mask.

    Args:
        kind: the mask kind being resumed (``optimization.mask.kind``).
        saved: the revision the checkpoint records; None for one written before revisions were recorded.
        where: what holds the checkpoint, the message's subject (e.g. ``"Checkpoint runs/x/pairs/p/ckpt/last.ckpt"``).

    Raises:
        ConfigError: one line naming ``where``, both revisions and the fix.
    """
    saved = LEGACY_REVISION if saved is None else int(saved)
    now = MASK_REVISIONS[kind]
    if saved != now:
        raise ConfigError(
            f"{where} holds a {kind} mask of mask revision {saved}, written by another version of Peekaboo (this "
            f"one's is {now}: the Fourier MLP and the bilateral filter's borders follow the official code), so it "
            "cannot be resumed; rerun with a new run.name, or delete the run's checkpoints (its pairs/*/ckpt/ and "
            "batches/ folders) to restart its unfinished pairs."
        )
