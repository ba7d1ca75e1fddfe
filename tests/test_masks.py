"""Mask parameterizations: shapes, ranges, gradients, the bilateral filter's edge-following, and both masks against
the official code's."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from peekaboo.config import MASK_KINDS, MaskConfig
from peekaboo.optim.masks import apply_bilateral, bilateral_operator, bilateral_weights, build_mask, uv_grid

SIZE = 16


def _two_tone(size=SIZE):
    image = torch.zeros(3, size, size)
    image[0, :, : size // 2] = 1.0  # left half red, right half black
    return image


@pytest.mark.parametrize("kind", MASK_KINDS)
def test_mask_shape_range_and_gradients(kind):
    cfg = MaskConfig(kind=kind, size=SIZE)
    cfg.fourier.hidden, cfg.fourier.num_features = 16, 8
    mask = build_mask(cfg, _two_tone()[None], [torch.Generator().manual_seed(0)])
    alpha = mask()
    assert alpha.shape == (1, 1, SIZE, SIZE)
    assert alpha.min() >= 0 and alpha.max() <= 1
    (alpha * torch.linspace(-1, 1, SIZE)).sum().backward()
    params = list(mask.parameters())
    assert params and all(p.grad is not None and p.grad.abs().sum() > 0 for p in params[:1])
    # Only the learned mask goes into a checkpoint: no bilateral weights, no Fourier features.
    assert all(not k.startswith(("bilateral", "features")) for k in mask.state_dict())


@pytest.mark.parametrize("kind", MASK_KINDS)
def test_mask_stays_float32_inside_a_mixed_precision_step(kind):
    # bf16-mixed runs training_step under autocast, which would compute a Fourier mask's matmuls in bfloat16.
    cfg = MaskConfig(kind=kind, size=SIZE)
    cfg.fourier.hidden, cfg.fourier.num_features = 16, 8
    mask = build_mask(cfg, _two_tone()[None], [torch.Generator().manual_seed(0)])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = mask()
    assert mixed.dtype == torch.float32 and torch.equal(mixed, mask())


def test_same_generator_same_fourier_mask():
    cfg = MaskConfig(kind="fourier", size=SIZE)
    a = build_mask(cfg, _two_tone()[None], [torch.Generator().manual_seed(3)])()
    b = build_mask(cfg, _two_tone()[None], [torch.Generator().manual_seed(3)])()
    c = build_mask(cfg, _two_tone()[None], [torch.Generator().manual_seed(4)])()
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_bilateral_weights_normalized_and_edge_aware():
    w = bilateral_weights(_two_tone(), kernel=3, sigma=5.0, colour_tolerance=0.08)
    assert w.shape == (9, SIZE, SIZE)
    assert torch.allclose(w.sum(0), torch.ones(SIZE, SIZE))
    # A pixel left of the colour edge gives (almost) no weight to its right neighbour (offset index 5).
    assert w[5, 4, SIZE // 2 - 1] < 1e-6
    # In a flat region the weights are the spatial Gaussian alone: centre weight = 1 / sum(exp(-d^2/50)).
    d2 = torch.tensor([2, 1, 2, 1, 0, 1, 2, 1, 2], dtype=torch.float32)
    expected = 1.0 / torch.exp(-d2 / 50).sum()
    assert w[4, 8, 2].item() == pytest.approx(expected.item(), rel=1e-5)


def test_bilateral_filter_keeps_edges_that_follow_the_image():
    logits = torch.where(torch.arange(SIZE) < SIZE // 2, 5.0, -5.0).expand(1, SIZE, SIZE).clone()
    w = bilateral_weights(_two_tone(), 3, 5.0, 0.08)
    filtered = apply_bilateral(logits, bilateral_operator(w), iterations=40)
    assert torch.allclose(filtered, logits, atol=1e-3)  # the edge is the image's: nothing leaks across
    flat = bilateral_weights(torch.zeros(3, SIZE, SIZE), 3, 5.0, 0.08)
    blurred = apply_bilateral(logits, bilateral_operator(flat), iterations=40)
    assert blurred[0, 0, SIZE // 2 - 1] < 4.0  # on a flat image the same edge is smoothed


def _filter_by_hand(logits, weights, iterations):
    """The filter written out: pad (out-of-image neighbours weigh 0), gather every pixel's K*K window, weighted sum."""
    b, kk, h, w = weights.shape
    k = int(kk**0.5)
    x = logits
    for _ in range(iterations):
        windows = F.unfold(F.pad(x, (k // 2,) * 4), k).view(b, kk, h, w)
        x = (windows * weights).sum(1, keepdim=True)
    return x


@pytest.mark.parametrize("kernel", [3, 5])
def test_bilateral_operator_is_the_filter_and_keeps_pairs_apart(kernel):
    gen = torch.Generator().manual_seed(0)
    images = torch.rand(2, 3, SIZE, SIZE, generator=gen)
    logits = torch.randn(2, 1, SIZE, SIZE, generator=gen)
    weights = bilateral_weights(images, kernel, 5.0, 0.3)
    for iterations in (1, 40):
        batched = apply_bilateral(logits, bilateral_operator(weights), iterations)
        assert torch.allclose(batched, _filter_by_hand(logits, weights, iterations), atol=1e-5)
        for i in range(2):  # block-diagonal: each pair alone gives its slice of the batch
            alone = apply_bilateral(logits[i], bilateral_operator(weights[i]), iterations)
            assert torch.allclose(alone, batched[i], atol=1e-6)


def test_bilateral_filter_gradient_is_the_transposed_filter():
    gen = torch.Generator().manual_seed(1)
    weights = bilateral_weights(torch.rand(2, 3, 6, 6, generator=gen), 3, 5.0, 0.3)
    logits = torch.randn(2, 1, 6, 6, generator=gen, requires_grad=True)
    seed = torch.randn(2, 1, 6, 6, generator=gen)
    (grad,) = torch.autograd.grad((apply_bilateral(logits, bilateral_operator(weights), 7) * seed).sum(), logits)
    (expected,) = torch.autograd.grad((_filter_by_hand(logits, weights, 7) * seed).sum(), logits)
    assert grad.abs().max() > 0 and torch.allclose(grad, expected, atol=1e-6)


# -- the official code's masks (github.com/RyannDaGreat/Peekaboo, source/bilateral_blur.py, learnable_textures.py) --


def _official_filter(image, logits, kernel, sigma, tolerance, iterations):
    """The official bilateral blur, written from its description: each of the K*K neighbours of a pixel found by
    shifting (out-of-image ones NaN), weights = spatial Gaussian x colour Gaussian with the NaN ones zeroed and the
    rest normalized, then ``iterations`` weighted sums with out-of-image values read as 0.

    ``image`` ``(3, H, W)``, ``logits`` ``(1, H, W)``."""
    r = kernel // 2

    def shifted(x, dy, dx):  # out[y, x] = x[y - dy, x - dx], NaN where that is outside
        out = torch.full_like(x, float("nan"))
        h, w = x.shape[-2:]
        out[:, max(dy, 0):h + min(dy, 0), max(dx, 0):w + min(dx, 0)] = x[:, max(-dy, 0):h - max(dy, 0),
                                                                        max(-dx, 0):w - max(dx, 0)]
        return out

    offsets = [(dy, dx) for dy in range(-r, r + 1) for dx in range(-r, r + 1)]
    weights = []
    for dy, dx in offsets:
        colour = torch.exp(-0.5 * ((shifted(image, dy, dx) - image) ** 2).sum(0) / tolerance**2)
        weights.append((math.exp(-(dy * dy + dx * dx) / (2 * sigma**2)) * colour).nan_to_num())
    weights = torch.stack(weights)
    weights = weights / weights.sum(0, keepdim=True)
    for _ in range(iterations):
        logits = sum(w * shifted(logits, dy, dx).nan_to_num() for w, (dy, dx) in zip(weights, offsets, strict=True))
    return logits


@pytest.mark.parametrize("kernel", [3, 5])
def test_bilateral_filter_is_the_official_one_borders_included(kernel):
    gen = torch.Generator().manual_seed(2)
    images = torch.rand(2, 3, 9, 7, generator=gen)
    logits = torch.randn(2, 1, 9, 7, generator=gen)
    ours = apply_bilateral(logits, bilateral_operator(bilateral_weights(images, kernel, 5.0, 0.3)), 6)
    for i in range(2):
        assert torch.allclose(ours[i], _official_filter(images[i], logits[i], kernel, 5.0, 0.3, 6), atol=1e-5)
    # A corner pixel averages its in-image neighbours only: the others weigh nothing, the rest sum to 1.
    w = bilateral_weights(torch.zeros(3, 4, 4), 3, 5.0, 0.08)  # (9, 4, 4), unfold's row-major window order
    assert torch.equal(w[[0, 1, 2, 3, 6], 0, 0], torch.zeros(5))
    assert w[[4, 5, 7, 8], 0, 0].sum().item() == pytest.approx(1.0)


def test_fourier_mlp_is_the_official_conv_relu_batchnorm():
    cfg = MaskConfig(kind="fourier", size=SIZE)
    cfg.fourier.hidden, cfg.fourier.num_features = 16, 8
    mask = build_mask(cfg, torch.rand(2, 3, SIZE, SIZE), [torch.Generator().manual_seed(i) for i in (0, 1)])
    with torch.no_grad():  # move the BatchNorms' affine parameters off their (1, 0) start
        for norm in (m for m in mask.mlp if isinstance(m, nn.BatchNorm2d)):
            norm.weight.uniform_(0.5, 1.5)
            norm.bias.uniform_(-0.5, 0.5)
    logits = mask.logits()
    features = mask.features.view(2, -1, SIZE, SIZE)
    for i in range(2):
        # Pair i's MLP as the official LearnableImageFourier builds it: Conv(+bias) -> ReLU -> BatchNorm per hidden
        # layer (a fresh BatchNorm2d in training mode: batch statistics over the pixels), a Conv(+bias) out.
        layers, width = [], 2 * cfg.fourier.num_features
        for _ in range(cfg.fourier.layers):
            layers += [nn.Conv2d(width, cfg.fourier.hidden, 1), nn.ReLU(), nn.BatchNorm2d(cfg.fourier.hidden)]
            width = cfg.fourier.hidden
        official = nn.Sequential(*layers, nn.Conv2d(width, 1, 1))
        for ours, theirs in zip(mask.mlp, official, strict=True):
            for name, param in theirs.named_parameters():
                rows = getattr(ours, name).shape[0] // 2
                with torch.no_grad():
                    param.copy_(getattr(ours, name)[i * rows:(i + 1) * rows])
        assert torch.allclose(logits[i], official(features[i][None])[0], atol=1e-5)
    assert torch.equal(mask(), torch.sigmoid(logits))
    # Every convolution has its bias: the hidden ones come before the ReLU, where BatchNorm does not remove them.
    assert all(m.bias is not None for m in mask.mlp if isinstance(m, nn.Conv2d))


def test_fourier_coordinates_are_the_official_half_open_grid():
    uv = uv_grid(4)
    assert uv.shape == (2, 4, 4)
    assert torch.equal(uv[0, :, 0], torch.tensor([0.0, 0.25, 0.5, 0.75]))  # rows, [0, 1): the edge is not 1
    assert torch.equal(uv[1, 0], torch.tensor([0.0, 0.25, 0.5, 0.75]))  # columns
