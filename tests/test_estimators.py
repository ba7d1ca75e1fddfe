"""The dream-loss estimators (guidance.estimator: sds, nfsd, full; peekaboo.diffusion.estimators): hand-computed
values for the pure math, the tiny model for the wiring, and the retired switches' refusal."""

import pytest
import torch
from lightning.pytorch.callbacks import Callback
from tests_support import MODULE_SIZE
from tests_support import cpu_trainer_config as _trainer
from tests_support import small_optimization_config as _cfg

from peekaboo import ops
from peekaboo.config import GuidanceConfig, OptimizationConfig, PredictConfig, load_config, validate_optimization
from peekaboo.diffusion import estimators
from peekaboo.errors import ConfigError
from peekaboo.optim.engine import optimize_pair, optimize_pairs

PROMPTS = ["a red circle", "a blue square", "a green triangle"]
# Each switch (guidance key -> value) and the UNet rows per draw of the dream loss's own call.
SWITCHES = {
    "nfsd": ({"estimator": "nfsd"}, 2),
    "nfsd_negative": ({"estimator": "nfsd", "nfsd_negative_prompt": "a dog"}, 3),
    "full": ({"estimator": "full"}, 2),
}


def _one(value: float, n: int = 1) -> torch.Tensor:
    return torch.full((n, 1, 1, 1), value)


# -- the pure math ----------------------------------------------------------------------------------------------
def test_guided_score_and_sds_hand_values():
    assert ops.guided_score(_one(0.1), _one(0.3), 10.0).item() == pytest.approx(2.1)  # 0.1 + 10 * 0.2
    # sds_gradient is unchanged: 0.25 * (2.1 - 0.5)
    assert ops.sds_gradient(_one(0.1), _one(0.3), _one(0.5), torch.tensor([0.75]), 10.0).item() == pytest.approx(0.4)


def test_nfsd_gradient_hand_values():
    eps_u, eps_c, eps_neg = _one(0.1, 2), _one(0.3, 2), _one(0.4, 2)
    abar = torch.tensor([0.75, 0.75])  # w = 0.25
    small_t = torch.tensor([True, False])
    grad = ops.nfsd_gradient(eps_u, eps_c, eps_neg, small_t, abar, 10.0).flatten()
    # small t: delta_D = eps_u = 0.1; large t: delta_D = 0.1 - 0.4 = -0.3; s * delta_C = 10 * 0.2 = 2
    assert grad.tolist() == pytest.approx([0.25 * 2.1, 0.25 * 1.7])
    # An empty negative prompt (eps_neg = eps_u): delta_D = 0 at large t, only the condition direction is left.
    grad = ops.nfsd_gradient(eps_u, eps_c, eps_u, small_t, abar, 10.0).flatten()
    assert grad.tolist() == pytest.approx([0.25 * 2.1, 0.25 * 2.0])


def test_guided_denoising_objective_hand_values():
    # w = 0.25; s (eps_c - eps)^2 = 10 * 0.04 = 0.4; (s - 1) (eps_u - eps)^2 = 9 * 0.16 = 1.44; two elements
    objective = ops.guided_denoising_objective(torch.full((1, 2, 1, 1), 0.1), torch.full((1, 2, 1, 1), 0.3),
                                               torch.full((1, 2, 1, 1), 0.5), torch.tensor([0.75]), 10.0)
    assert objective.tolist() == pytest.approx([0.5 * 0.25 * (0.4 - 1.44) * 2])


class _IdentityJacobian:
    """A stand-in backbone whose predictions are ``z_t`` plus a constant per prompt: its Jacobian is the identity,
    where score distillation's approximation is exact."""

    def predict_noise(self, noisy, t, emb, batch_cfg=True, grad=False):
        assert grad  # the full estimator must ask for the graph
        return noisy + 0.1, noisy - 0.2


def test_full_gradient_is_sds_where_the_unets_jacobian_is_the_identity():
    noisy, noise = _latents(seed=2), _latents(seed=3)
    abar = torch.tensor([0.3, 0.8])
    grad = estimators.gradient(_IdentityJacobian(), noisy, noise, torch.tensor([700, 200]), abar, _Emb(),
                               _guidance(estimator="full"))
    sds = ops.sds_gradient(noisy + 0.1, noisy - 0.2, noise, abar, 7.5)
    assert torch.allclose(grad, abar.sqrt().view(-1, 1, 1, 1) * sds, atol=1e-5)  # dz_t / dz = sqrt(abar)


class _Emb:
    uncond = cond = pooled_uncond = pooled_cond = None


# -- config -----------------------------------------------------------------------------------------------------
def test_defaults_are_the_papers_sds():
    g = GuidanceConfig()
    assert (g.estimator, g.noise, g.nfsd_t_threshold, g.nfsd_negative_prompt) == ("sds", "random", 0.2, "")


@pytest.mark.parametrize(("key", "value"), [("estimator", "vsd"), ("nfsd_t_threshold", 1.0),
                                            ("nfsd_t_threshold", 0.0), ("noise", "sobol")])
def test_bad_values_name_the_key(key, value):
    cfg = OptimizationConfig()
    setattr(cfg.guidance, key, value)
    with pytest.raises(ConfigError, match=f"optimization.guidance.{key}"):
        validate_optimization(cfg)


@pytest.mark.parametrize(("override", "allowed"), [("estimator=dds", "allowed: sds | nfsd | full"),
                                                   ("noise=ddim_inversion", "allowed: random")])
def test_retired_switches_are_refused_with_the_allowed_values(override, allowed):
    with pytest.raises(ConfigError, match=allowed):
        load_config(PredictConfig, ["image=x.png", "prompt=a", f"optimization.guidance.{override}"])


def test_switches_are_set_from_the_command_line():
    cfg = load_config(PredictConfig, ["image=x.png", "prompt=a", "optimization.guidance.estimator=nfsd",
                                      "optimization.guidance.nfsd_negative_prompt=a dog"])
    g = cfg.optimization.guidance
    assert (g.estimator, g.nfsd_negative_prompt) == ("nfsd", "a dog")


# -- the tiny model ---------------------------------------------------------------------------------------------
def _guidance(**switches) -> GuidanceConfig:
    return GuidanceConfig(guidance_scale=7.5, **switches)


def _dream(backbone, cfg, latents, seed=7):
    """The dream loss's gradient w.r.t. ``latents`` ``(B, 4, 8, 8)``, its terms, and the UNet calls' batch sizes."""
    z = latents.clone().requires_grad_()
    sizes = []
    hook = backbone.unet.register_forward_pre_hook(lambda m, args: sizes.append(args[0].shape[0]))
    try:
        gens = [torch.Generator().manual_seed(seed + i) for i in range(latents.shape[0])]
        terms = backbone.dream_loss(z, backbone.encode_prompt("a red circle"), cfg, gens)
        terms["loss"].sum().backward()
    finally:
        hook.remove()
    return z.grad, terms, sizes


def _latents(n=2, seed=1):
    return torch.randn(n, 4, 8, 8, generator=torch.Generator().manual_seed(seed))


def test_default_is_todays_sds_bit_for_bit(tiny_backbone):
    latents = _latents()
    grad, terms, sizes = _dream(tiny_backbone, _guidance(), latents)
    gens = [torch.Generator().manual_seed(7 + i) for i in range(2)]
    draws = [(torch.randint(20, 980, (1,), generator=g), torch.randn(4, 8, 8, generator=g)) for g in gens]
    t, noise = torch.cat([d[0] for d in draws]), torch.stack([d[1] for d in draws])
    abar = tiny_backbone.alphas_cumprod[t]
    emb = tiny_backbone.encode_prompt("a red circle")
    eps_u, eps_c = tiny_backbone.predict_noise(ops.add_noise(latents, noise, abar), t, emb)
    replica = latents.clone().requires_grad_()
    ops.dream_loss(replica, ops.sds_gradient(eps_u, eps_c, noise, abar, 7.5)).sum().backward()
    assert sizes == [4]  # one call, [uncond, cond] x 2 pairs
    assert torch.equal(grad, replica.grad)
    assert torch.equal(terms["t"], t.float())


@pytest.mark.parametrize("name", list(SWITCHES))
def test_each_switch_changes_the_gradient_in_its_unet_rows(tiny_backbone, name):
    switches, rows = SWITCHES[name]
    latents = _latents()
    sds, sds_terms, _ = _dream(tiny_backbone, _guidance(), latents)
    grad, terms, sizes = _dream(tiny_backbone, _guidance(**switches), latents)
    assert sizes == [2 * rows]  # batched into one call
    assert torch.equal(terms["t"], sds_terms["t"])  # the same draws: only the estimate differs
    assert torch.isfinite(grad).all() and not torch.allclose(grad, sds)


def test_nfsd_gradient_is_the_hand_formula_on_the_backbones_predictions(tiny_backbone):
    latents, t = _latents(), torch.tensor([100, 700])  # one draw below nfsd_t_threshold (0.2 * 1000), one above
    abar = tiny_backbone.alphas_cumprod[t]
    noise = torch.randn(latents.shape, generator=torch.Generator().manual_seed(3))
    noisy = ops.add_noise(latents, noise, abar)
    emb = tiny_backbone.encode_prompt("a red circle")
    cfg = _guidance(estimator="nfsd", nfsd_negative_prompt="a dog")
    grad = estimators.gradient(tiny_backbone, noisy, noise, t, abar, emb, cfg)
    eps_u, eps_c = tiny_backbone.predict_noise(noisy, t, emb)
    _, eps_neg = tiny_backbone.predict_noise(noisy, t, tiny_backbone.encode_prompt("a dog"))
    delta_d = torch.stack([eps_u[0], eps_u[1] - eps_neg[1]])
    expected = (1 - abar).view(-1, 1, 1, 1) * (delta_d + 7.5 * (eps_c - eps_u))
    assert torch.allclose(grad, expected, atol=1e-5)


def test_full_gradient_is_the_objectives_derivative_through_the_unet(tiny_backbone):
    """A finite difference of the guided denoising objective along a random direction matches the estimator's
    gradient; score distillation's, which drops the UNet's Jacobian, does not."""
    clean, t = _latents(n=1), torch.tensor([500])
    abar = tiny_backbone.alphas_cumprod[t]
    noise = _latents(n=1, seed=3)
    emb = tiny_backbone.encode_prompt("a red circle")
    direction = _latents(n=1, seed=4)

    def objective(z):
        eps_u, eps_c = tiny_backbone.predict_noise(ops.add_noise(z, noise, abar), t, emb)
        return ops.guided_denoising_objective(eps_u, eps_c, noise, abar, 7.5).double()

    h = 1e-2
    slope = ((objective(clean + h * direction) - objective(clean - h * direction)) / (2 * h)).item()
    noisy = ops.add_noise(clean, noise, abar)
    full = estimators.gradient(tiny_backbone, noisy, noise, t, abar, emb, _guidance(estimator="full"))
    sds = estimators.gradient(tiny_backbone, noisy, noise, t, abar, emb, _guidance())
    assert (full * direction).sum().item() == pytest.approx(slope, rel=0.02)
    assert (abar.sqrt() * sds * direction).sum().item() != pytest.approx(slope, rel=0.2)


def test_an_unknown_estimator_is_refused(tiny_backbone):
    """Validation refuses it first; the dispatch does not fall back to sds when handed one anyway."""
    latents, t = _latents(), torch.tensor([100, 700])
    abar = tiny_backbone.alphas_cumprod[t]
    emb = tiny_backbone.encode_prompt("a red circle")
    with pytest.raises(ValueError, match="'dds'"):
        estimators.gradient(tiny_backbone, latents, latents, t, abar, emb, _guidance(estimator="dds"))


def _images(n):
    return torch.rand(n, 3, MODULE_SIZE, MODULE_SIZE, generator=torch.Generator().manual_seed(5))


def _switched(name):
    cfg = _cfg()
    cfg.guidance.guidance_scale = 7.5
    for key, value in SWITCHES[name][0].items():
        setattr(cfg.guidance, key, value)
    return cfg


def test_nfsd_runs_end_to_end_and_keeps_pairs_independent(tiny_backbone):
    cfg = _switched("nfsd_negative")
    batched = optimize_pairs(_images(2), PROMPTS[:2], ["a", "b"], cfg, _trainer(2), tiny_backbone)
    alone = optimize_pair(_images(2)[1], PROMPTS[1], "b", cfg, _trainer(2), tiny_backbone)
    assert batched[1].steps == 2 and torch.isfinite(batched[1].alpha).all()
    assert torch.allclose(batched[1].alpha, alone.alpha, atol=1e-2)  # float noise of a batch only


def test_full_runs_end_to_end_with_a_frozen_model(tiny_backbone):
    before = [p.clone() for p in tiny_backbone.unet.parameters()]
    result = optimize_pair(_images(1)[0], PROMPTS[0], "a", _switched("full"), _trainer(2), tiny_backbone)
    assert result.steps == 2 and torch.isfinite(result.alpha).all()
    after = list(tiny_backbone.unet.parameters())
    assert all(p.grad is None and torch.equal(p, b) for p, b in zip(after, before, strict=True))


class _StopPair(Callback):
    """Freezes pair ``pair`` after step ``step``, as early stopping would."""

    def __init__(self, pair, step):
        self.pair, self.step = pair, step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == self.step:
            pairs = torch.zeros(pl_module.batch_size, dtype=torch.bool)
            pairs[self.pair] = True
            pl_module.stop_pairs(pairs, trainer.global_step)


def test_the_negative_prompt_rows_follow_the_running_rows(tiny_backbone):
    cfg = _switched("nfsd_negative")
    cfg.early_stop.enabled, cfg.early_stop.tolerance = True, -1.0  # only the callback stops a pair
    ids = ["a", "b", "c"]
    free = optimize_pairs(_images(3)[1:], PROMPTS[1:], ids[1:], cfg, _trainer(3), tiny_backbone)
    sizes = []
    hook = tiny_backbone.unet.register_forward_pre_hook(lambda m, args: sizes.append(args[0].shape[0]))
    try:
        results = optimize_pairs(_images(3), PROMPTS, ids, cfg, _trainer(3), tiny_backbone,
                                 callbacks=[_StopPair(pair=0, step=1)])
    finally:
        hook.remove()
    assert sizes == [9, 6, 6]  # 3 rows per pair: [uncond, cond] and the negative prompt's
    assert [r.steps for r in results] == [1, 3, 3]
    for i in (1, 2):  # pair 0's rows left with it: the others keep their own masks
        assert torch.allclose(results[i].alpha, free[i - 1].alpha, atol=1e-2)
