"""The pure math against hand-computed values."""

import pytest
import torch

from peekaboo import ops


def test_composite_hand_values():
    image = torch.tensor([0.2, 0.4, 0.6]).view(1, 3, 1, 1).expand(1, 3, 2, 2)
    alpha = torch.tensor([[1.0, 0.0], [0.5, 0.25]]).view(1, 1, 2, 2)
    background = torch.full((1, 3, 2, 2), 1.0)
    out = ops.composite(image, alpha, background)
    # red channel: 1*0.2, 0*0.2 + 1, 0.5*0.2 + 0.5, 0.25*0.2 + 0.75
    assert torch.allclose(out[0, 0], torch.tensor([[0.2, 1.0], [0.6, 0.8]]))


def test_composite_rejects_mismatched_shapes():
    with pytest.raises(ValueError):
        ops.composite(torch.zeros(1, 3, 4, 4), torch.zeros(1, 1, 2, 2), torch.zeros(1, 3, 4, 4))


@pytest.mark.parametrize("kind", ["solid", "noise", "blur"])
def test_backgrounds_shape_range_and_seeding(kind):
    image = torch.rand(2, 3, 8, 8)
    a = ops.sample_background(kind, image, torch.Generator().manual_seed(1))
    b = ops.sample_background(kind, image, torch.Generator().manual_seed(1))
    c = ops.sample_background(kind, image, torch.Generator().manual_seed(2))
    assert a.shape == (2, 3, 8, 8) and a.min() >= 0 and a.max() <= 1
    assert torch.equal(a, b) and not torch.equal(a, c)
    if kind == "solid":
        assert torch.equal(a, a[..., :1, :1].expand_as(a))


def test_sds_gradient_hand_values():
    eps_u, eps_c, noise = torch.full((1, 1, 1, 1), 0.1), torch.full((1, 1, 1, 1), 0.3), torch.full((1, 1, 1, 1), 0.5)
    abar = torch.tensor([0.75])
    grad = ops.sds_gradient(eps_u, eps_c, noise, abar, guidance_scale=10.0)
    # w = 0.25; eps_hat = 0.1 + 10 * 0.2 = 2.1; grad = 0.25 * (2.1 - 0.5) = 0.4
    assert grad.item() == pytest.approx(0.4)


def test_sds_gradient_zeroes_non_finite():
    grad = ops.sds_gradient(torch.tensor([[[[float("nan")]]]]), torch.zeros(1, 1, 1, 1), torch.zeros(1, 1, 1, 1),
                            torch.tensor([0.5]), 1.0)
    assert grad.item() == 0.0


def test_dream_loss_gradient_is_grad():
    gen = torch.Generator().manual_seed(0)
    latents = torch.randn(2, 4, 3, 3, generator=gen).requires_grad_()
    grad = torch.randn(2, 4, 3, 3, generator=gen)
    loss = ops.dream_loss(latents, grad)
    assert loss.shape == (2,)
    loss.sum().backward()
    # z - (z - g) rounds in float32: equal to g up to one rounding of z's magnitude.
    assert torch.allclose(latents.grad, grad, rtol=0, atol=1e-6)


def test_v_to_epsilon_inverts_v_definition():
    z0, eps = torch.randn(1, 4, 2, 2), torch.randn(1, 4, 2, 2)
    abar = torch.tensor([0.3])
    zt = ops.add_noise(z0, eps, abar)
    v = abar.sqrt() * eps - (1 - abar).sqrt() * z0  # v = sqrt(abar) eps - sqrt(1-abar) x0
    assert torch.allclose(ops.v_to_epsilon(v, zt, abar), eps, atol=1e-6)


def test_gravity_sum_and_mean():
    alpha = torch.tensor([[[[1.0, 0.0], [0.5, 0.5]]]])
    assert ops.gravity_loss(alpha, 0.1, "sum").item() == pytest.approx(0.2)
    assert ops.gravity_loss(alpha, 0.1, "mean").item() == pytest.approx(0.05)


def test_pair_seed_is_stable_and_distinct():
    assert ops.pair_seed(0, "a", 3) == ops.pair_seed(0, "a", 3)
    assert len({ops.pair_seed(0, "a", 3), ops.pair_seed(1, "a", 3), ops.pair_seed(0, "b", 3),
                ops.pair_seed(0, "a", 4), ops.pair_seed(0, "a")}) == 5
    assert 0 <= ops.pair_seed(123, "x") < 2**63


def test_pair_generator_draws_from_the_pair_seed():
    gen = ops.pair_generator(7, "a", 2)
    assert gen.initial_seed() == ops.pair_seed(7, "a", 2)
    assert torch.equal(torch.rand(3, generator=gen), torch.rand(3, generator=ops.pair_generator(7, "a", 2)))
