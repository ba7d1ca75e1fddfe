"""Cheaper steps: compositing in latent space (``optimization.composite=latent``) and a smaller encoding side
(``optimization.guidance.encode_resolution``). Hand-computed values for the pure functions; the tiny model for
the wiring (no VAE backward, pair independence, the default path unchanged)."""

import pytest
import torch
import torch.nn.functional as F
from tests_support import MODULE_SIZE
from tests_support import cpu_trainer_config as _trainer
from tests_support import small_optimization_config as _cfg

from peekaboo import ops
from peekaboo.config import OptimizationConfig, validate_optimization
from peekaboo.diffusion.backbone import Backbone
from peekaboo.errors import ConfigError
from peekaboo.optim.engine import optimize_pair, optimize_pairs
from peekaboo.optim.module import PeekabooModule

SIZE = MODULE_SIZE
PROMPTS = ["a red circle", "a blue square"]


def _images(n):
    return torch.rand(n, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(5))


def _latent_cfg(mode="sample"):
    cfg = _cfg()
    cfg.composite, cfg.guidance.latent_mode = "latent", mode
    return cfg


def _module(backbone, cfg, n=1):
    """A module of ``n`` pairs, ready for ``training_step`` without a Trainer (step 0: global_step is 0)."""
    module = PeekabooModule(_images(n), PROMPTS[:n], [f"p{i}" for i in range(n)], cfg, backbone)
    module.on_fit_start()
    return module


@torch.no_grad()
def latent_blend_error(
    backbone: Backbone, images: torch.Tensor, alpha: torch.Tensor, background: torch.Tensor,
    resolution: int | None = None,
) -> torch.Tensor:
    """How far the latent composite (``optimization.composite=latent``) is from encoding the pixel composite:
    ``||blend - encode(composite)|| / ||encode(composite)||`` per pair, posterior means throughout.

    Args:
        images: ``(B, 3, S, S)`` in [0, 1].
        alpha: ``(B, 1, S, S)`` in [0, 1].
        background: ``(B, 3, S, S)``.
        resolution: the encoded side (``guidance.encode_resolution``); None = the backbone's.

    Returns:
        ``(B,)`` float32 relative errors (0 where alpha is all ones or all zeros).
    """
    z_image, _ = backbone.encode_posterior(images, resolution)
    z_background, _ = backbone.encode_posterior(background, resolution)
    blend = ops.blend_latents(z_image, z_background, ops.downsample_alpha(alpha, z_image.shape[-2:]))
    true = backbone.encode_images(ops.composite(images, alpha, background), "mean", resolution=resolution)
    return ops.relative_error(blend, true)


# -- pure functions, by hand ------------------------------------------------------------------------------------
def test_downsample_alpha_averages_each_cell_by_hand():
    alpha = torch.tensor([[1.0, 1.0, 0.0, 0.0],
                          [1.0, 1.0, 0.0, 0.0],
                          [0.0, 0.0, 1.0, 0.0],
                          [0.0, 0.0, 0.0, 1.0]]).view(1, 1, 4, 4).requires_grad_(True)
    coarse = ops.downsample_alpha(alpha, (2, 2))
    assert torch.equal(coarse, torch.tensor([[1.0, 0.0], [0.0, 0.5]]).view(1, 1, 2, 2))
    coarse.sum().backward()
    assert torch.equal(alpha.grad, torch.full((1, 1, 4, 4), 0.25))  # each pixel is a quarter of its cell
    same = torch.rand(2, 1, 3, 3)
    assert ops.downsample_alpha(same, (3, 3)) is same
    with pytest.raises(ValueError, match="downsample_alpha"):
        ops.downsample_alpha(torch.rand(1, 3, 4, 4), (2, 2))


def test_blend_latents_by_hand():
    z_img = torch.full((1, 2, 2, 2), 2.0)
    z_bg = torch.full((1, 2, 2, 2), -1.0)
    alpha_l = torch.tensor([[1.0, 0.0], [0.5, 0.25]]).view(1, 1, 2, 2)
    # 2 a - (1 - a): a = 1 -> 2, a = 0 -> -1, a = 0.5 -> 0.5, a = 0.25 -> -0.25; both channels alike.
    expected = torch.tensor([[2.0, -1.0], [0.5, -0.25]]).expand(1, 2, 2, 2)
    assert torch.equal(ops.blend_latents(z_img, z_bg, alpha_l), expected)


def test_relative_error_by_hand():
    estimate = torch.tensor([[3.0, 4.0], [1.0, 1.0]])
    reference = torch.tensor([[3.0, 0.0], [1.0, 1.0]])
    assert torch.allclose(ops.relative_error(estimate, reference), torch.tensor([4.0 / 3.0, 0.0]))
    with pytest.raises(ValueError, match="relative_error"):
        ops.relative_error(torch.zeros(1, 2), torch.zeros(1, 3))


# -- config ---------------------------------------------------------------------------------------------------
def test_defaults_and_validation():
    cfg = OptimizationConfig()
    assert cfg.composite == "pixel" and cfg.guidance.encode_resolution is None
    cfg.composite = "latnet"
    with pytest.raises(ConfigError, match=r"optimization\.composite"):
        validate_optimization(cfg)
    cfg = OptimizationConfig()
    cfg.guidance.encode_resolution = 4
    with pytest.raises(ConfigError, match=r"optimization\.guidance\.encode_resolution"):
        validate_optimization(cfg)


def test_encode_resolution_must_suit_the_model(tiny_backbone):
    cfg = _cfg()
    cfg.guidance.encode_resolution = 12  # tiny model: VAE factor 4 x UNet downsampling 2 = multiples of 8
    with pytest.raises(ConfigError, match=r"encode_resolution.*multiple of 8"):
        PeekabooModule(_images(1), PROMPTS[0], "p", cfg, tiny_backbone)


# -- the tiny model ---------------------------------------------------------------------------------------------
def test_latent_blend_error_is_zero_for_an_opaque_or_empty_mask(tiny_backbone):
    images = _images(2)
    background = ops.sample_background("solid", images, torch.Generator().manual_seed(1))
    ones, zeros = torch.ones(2, 1, SIZE, SIZE), torch.zeros(2, 1, SIZE, SIZE)
    assert torch.equal(latent_blend_error(tiny_backbone, images, ones, background), torch.zeros(2))
    assert torch.equal(latent_blend_error(tiny_backbone, images, zeros, background), torch.zeros(2))
    half = torch.zeros(2, 1, SIZE, SIZE)
    half[..., : SIZE // 2] = 1.0
    err = latent_blend_error(tiny_backbone, images, half, background)
    assert err.shape == (2,) and bool((err > 0).all()) and bool(torch.isfinite(err).all())


def test_default_pixel_path_is_the_old_encoding(tiny_backbone):
    """composite=pixel computes exactly what the step computed before the switch existed."""
    module = _module(tiny_backbone, _cfg())
    images, alpha = module.images, module.mask().detach()
    background = torch.full_like(images, 0.3)
    comp, latents = module.composite_latents(images, alpha, background, [torch.Generator().manual_seed(3)], None)
    # The encoding as it was: resize to the model's side, [-1, 1], posterior sample, shift and scale.
    x = F.interpolate(alpha * images + (1 - alpha) * background, size=(tiny_backbone.resolution,) * 2,
                      mode="bilinear", align_corners=False)
    dist = tiny_backbone.vae.encode(2 * x - 1).latent_dist
    noise = torch.randn(dist.mean.shape[1:], generator=torch.Generator().manual_seed(3))[None]
    old = (dist.mean + dist.std * noise - tiny_backbone.shift_factor) * tiny_backbone.scaling_factor
    assert torch.equal(comp, ops.composite(images, alpha, background))
    assert torch.equal(latents, old)


@pytest.mark.parametrize("mode", ["mean", "sample"])
def test_opaque_latent_composite_is_the_pixel_encoding(tiny_backbone, mode):
    """With alpha = 1 the blend is the image's latent: the same draw (same generator stream) as the pixel path."""
    module = _module(tiny_backbone, _latent_cfg(mode))
    ones = torch.ones(1, 1, SIZE, SIZE)
    background = torch.full_like(module.images, 0.7)
    _, latent = module.composite_latents(module.images, ones, background, [torch.Generator().manual_seed(4)], None)
    module.cfg.composite = "pixel"
    _, pixel = module.composite_latents(module.images, ones, background, [torch.Generator().manual_seed(4)], None)
    assert torch.allclose(latent, pixel, atol=1e-5)


def test_latent_step_gives_the_mask_a_gradient_without_a_vae_backward(tiny_backbone):
    calls = []  # per encoder call: whether its output is part of the autograd graph
    hook = tiny_backbone.vae.encoder.register_forward_hook(lambda m, args, out: calls.append(out.requires_grad))
    try:
        module = _module(tiny_backbone, _latent_cfg(), n=2)
        loss = module.training_step(None, 0)
        loss.backward()
        assert calls == [False, False]  # the images once (then cached), this step's backgrounds
        assert module.image_latent_mean is not None and module.image_latent_mean.shape == (2, 4, 8, 8)
        grads = [p.grad for p in module.mask.parameters()]
        assert all(g is not None and torch.isfinite(g).all() for g in grads)
        assert any(g.abs().sum() > 0 for g in grads)
        module.training_step(None, 1)  # the image latents are cached: one encoder call, the background's
        assert calls == [False, False, False]
        calls.clear()
        pixel = _module(tiny_backbone, _cfg())
        pixel.training_step(None, 0)
        assert calls == [True]  # the default encodes the composite with gradient
    finally:
        hook.remove()
    assert "image_latent_mean" not in module.state_dict()


def test_latent_pairs_are_independent_and_optimize(tiny_backbone):
    cfg = _latent_cfg()
    images, ids = _images(2), ["a", "b"]
    batched = optimize_pairs(images, PROMPTS, ids, cfg, _trainer(4), tiny_backbone)
    for i in range(2):
        alone = optimize_pair(images[i], PROMPTS[i], ids[i], cfg, _trainer(4), tiny_backbone)
        assert torch.allclose(batched[i].alpha, alone.alpha, atol=1e-2)
        assert bool(torch.isfinite(alone.alpha).all())
    start = _module(tiny_backbone, cfg).mask().detach()[0]
    assert not torch.allclose(batched[0].alpha, start)  # the mask moved


@pytest.mark.parametrize("composite", ["pixel", "latent"])
def test_a_smaller_encode_resolution_gives_the_unet_smaller_latents(tiny_backbone, composite):
    cfg = _cfg()
    cfg.composite, cfg.guidance.encode_resolution = composite, 16  # tiny model: native 32, latents 8x8
    shapes = []
    hook = tiny_backbone.unet.register_forward_pre_hook(lambda m, args: shapes.append(tuple(args[0].shape[-2:])))
    try:
        result = optimize_pair(_images(1)[0], PROMPTS[0], "p", cfg, _trainer(2), tiny_backbone)
    finally:
        hook.remove()
    assert shapes == [(4, 4), (4, 4)] and bool(torch.isfinite(result.alpha).all())
