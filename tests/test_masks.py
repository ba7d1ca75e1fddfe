"""Mask parameterizations: shapes, ranges, gradients, and the bilateral filter's edge-following."""

import pytest
import torch
import torch.nn.functional as F

from peekaboo.config import MASK_KINDS, MaskConfig
from peekaboo.optim.masks import apply_bilateral, bilateral_operator, bilateral_weights, build_mask

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
    """The filter written out: replicate-pad, gather every pixel's K*K window, weighted sum."""
    b, kk, h, w = weights.shape
    k = int(kk**0.5)
    x = logits
    for _ in range(iterations):
        windows = F.unfold(F.pad(x, (k // 2,) * 4, mode="replicate"), k).view(b, kk, h, w)
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
